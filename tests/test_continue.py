"""Continuing an answer that did not finish (`{"continue": "<answer id>"}`): CONTRACT.md, "Continuing an
answer". On SQLite and PostgreSQL, against the fake DashScope, which checks partial mode's shape."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest
from fake_dashscope import Reply
from live import LiveServer, SSEReader, parse_events
from support import wait_for

import chatsvc

API = "/api/v1"
U1 = {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14}
U2 = {"prompt_tokens": 20, "completion_tokens": 3, "total_tokens": 23}
U3 = {"prompt_tokens": 30, "completion_tokens": 5, "total_tokens": 35}


@pytest.fixture
def live(service):
    with LiveServer(service.settings) as server:
        yield server


def answer_row(service) -> dict:
    return service.rows(
        "SELECT id, content, status, finish_reason, continued, last_seq, prompt_tokens, completion_tokens,"
        " total_tokens, error_code FROM messages WHERE role = 'assistant'"
    )[0]


def cut_at_length(client, fake) -> dict:
    """A first answer cut at max_tokens (finish_reason "length")."""
    fake.push(Reply.answer(["Once ", "upon ", "a "], finish="length", usage=U1))
    r = client.post(f"{API}/chat/s1", json={"message": "tell a story", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["finish_reason"] == "length"
    return r.json()


def test_continue_a_length_answer_sends_partial_mode_and_sums_the_row(client, fake, service):
    first = cut_at_length(client, fake)
    before = answer_row(service)
    fake.push(Reply.answer(["time ", "there was."], usage=U2))
    r = client.post(f"{API}/chat/s1", json={"continue": first["message_id"]})
    assert r.status_code == 200, r.text
    assert r.json()["response"] == "Once upon a time there was."
    assert r.json()["message_id"] == first["message_id"] and r.json()["finish_reason"] == "stop"
    assert r.json()["usage"] == {"prompt_tokens": 30, "completion_tokens": 7, "total_tokens": 37}
    # the upstream body, byte for byte: the regeneration's context, then the text as a partial message
    sent = fake.requests[-1].body
    assert sent == {
        "model": "qwen-plus",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "tell a story"},
            {"role": "assistant", "content": "Once upon a ", "partial": True},
        ],
        "stream": True,
        "stream_options": {"include_usage": True},
        "enable_thinking": False,
    }
    row = answer_row(service)
    assert row["id"] == first["message_id"] and row["content"] == "Once upon a time there was."
    assert (row["status"], row["finish_reason"], row["continued"]) == ("complete", "stop", 1)
    assert (row["prompt_tokens"], row["completion_tokens"], row["total_tokens"]) == (30, 7, 37)
    assert row["last_seq"] > before["last_seq"]
    calls = service.rows("SELECT purpose, state, prompt_tokens, completion_tokens FROM usage_calls ORDER BY id")
    assert calls == [
        {"purpose": "answer", "state": "settled", "prompt_tokens": 10, "completion_tokens": 4},
        {"purpose": "continuation", "state": "settled", "prompt_tokens": 20, "completion_tokens": 3},
    ]
    shown = client.get(f"{API}/context/conversations/s1").json()["messages"]
    assert shown[1]["continued"] == 1 and shown[1]["content"] == "Once upon a time there was."
    assert "continued" not in shown[0]
    # and its export keeps the count, which an import reads back
    exported = client.get(f"{API}/context/conversations/s1/export").json()
    assert exported["messages"][1]["continued"] == 1 and "continued" not in exported["messages"][0]
    exported["conversation"]["session_id"] = "s2"
    assert client.post(f"{API}/context/conversations/import", json=exported).status_code in (200, 201)
    assert service.rows("SELECT continued FROM messages WHERE session_id = 's2' AND role = 'assistant'") == [
        {"continued": 1}
    ]


def test_the_fake_refuses_a_partial_request_with_thinking_on(client, fake):
    """The fake checks what DashScope checks (so the test above can fail): thinking on is refused."""
    import httpx2 as httpx

    body = {
        "model": "qwen-plus",
        "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "partial": True}],
        "stream": True,
    }
    r = httpx.post(fake.url + "/chat/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_parameter_error"
    r = httpx.post(fake.url + "/chat/completions", json={**body, "enable_thinking": False})
    assert r.status_code == 200


def test_vllm_style_sends_continue_final_message(make_service, fake):
    service = make_service(CHATSVC_CONTINUE_STYLE="continue_final_message")
    with service.client() as client:
        first = cut_at_length(client, fake)
        fake.push(Reply.answer(["time."], usage=U2))
        r = client.post(f"{API}/chat/s1", json={"continue": first["message_id"], "temperature": 0.5})
        assert r.status_code == 200 and r.json()["response"] == "Once upon a time."
    sent = fake.requests[-1].body
    assert sent["messages"][-1] == {"role": "assistant", "content": "Once upon a "}
    assert sent["continue_final_message"] is True and sent["add_generation_prompt"] is False
    assert sent["temperature"] == 0.5 and "partial" not in json.dumps(sent["messages"])


@pytest.mark.parametrize(
    ("style", "last", "extra"),
    [
        ("partial", {"partial": True}, {"enable_thinking": False}),
        ("continue_final_message", {}, {"continue_final_message": True, "add_generation_prompt": False}),
        ("prefill", {}, {}),
    ],
)
@pytest.mark.parametrize("asked", [{}, {"enable_thinking": False}])
def test_each_styles_exact_body(make_service, fake, style, last, extra, asked):
    """Only partial mode, which requires it, is sent enable_thinking false; the other styles' bodies are
    the request's own options (its own enable_thinking false passed on, as for any turn)."""
    service = make_service(CHATSVC_CONTINUE_STYLE=style)
    with service.client() as client:
        first = cut_at_length(client, fake)
        fake.push(Reply.answer(["time."], usage=U2))
        r = client.post(f"{API}/chat/s1", json={"continue": first["message_id"], **asked})
        assert r.status_code == 200 and r.json()["response"] == "Once upon a time."
    assert json.dumps(fake.requests[-1].body) == json.dumps(
        {
            "model": "qwen-plus",
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "tell a story"},
                {"role": "assistant", "content": "Once upon a ", **last},
            ],
            "stream": True,
            "stream_options": {"include_usage": True},
            **asked,
            **extra,
        }
    )


def test_continue_style_off_refuses(make_service, fake):
    service = make_service(CHATSVC_CONTINUE_STYLE="off")
    with service.client() as client:
        first = cut_at_length(client, fake)
        r = client.post(f"{API}/chat/s1", json={"continue": first["message_id"]})
    assert r.status_code == 422 and r.json()["code"] == "continue_unsupported"
    assert "CHATSVC_CONTINUE_STYLE" in r.json()["detail"]


def test_refusals(client, fake, service):
    fake.push(Reply.answer(["whole."], usage=U1))
    whole = client.post(f"{API}/chat/s1", json={"message": "q1"}).json()
    question = service.rows("SELECT id FROM messages WHERE role = 'user'")[0]["id"]
    n = len(fake.requests)
    r = client.post(f"{API}/chat/s1", json={"continue": whole["message_id"]})
    assert r.status_code == 409 and r.json()["code"] == "not_continuable" and "it is complete" in r.json()["detail"]
    r = client.post(f"{API}/chat/s1", json={"continue": whole["message_id"], "message": "x"})
    assert r.status_code == 422 and r.json()["code"] == "invalid_request" and "'message'" in r.json()["detail"]
    r = client.post(f"{API}/chat/s1", json={"continue": whole["message_id"], "regenerate": whole["message_id"]})
    assert r.status_code == 422 and "'regenerate'" in r.json()["detail"]
    r = client.post(f"{API}/chat/s1", json={"continue": whole["message_id"], "enable_thinking": True})
    assert r.status_code == 422 and "enable_thinking" in r.json()["detail"]
    r = client.post(f"{API}/chat/s1", json={"continue": "nope"})
    assert r.status_code == 404
    r = client.post(f"{API}/chat/s1", json={"continue": question})
    assert r.status_code == 404 and "'continue' names an answer" in r.json()["detail"]
    r = client.post(f"{API}/chat/s2", json={"continue": whole["message_id"]})  # another conversation's
    assert r.status_code == 404
    # an answer cut at length, with a reply after it: refused (its text was answered)
    fake.push(Reply.answer(["cut"], finish="length", usage=U1), Reply.answer(["next"], usage=U1))
    cut = client.post(f"{API}/chat/s1", json={"message": "q2"}).json()
    client.post(f"{API}/chat/s1", json={"message": "q3"})
    n = len(fake.requests)
    r = client.post(f"{API}/chat/s1", json={"continue": cut["message_id"]})
    assert r.status_code == 409 and "it has replies" in r.json()["detail"]
    # an answer that waits for tool results
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    fake.push(Reply.tool_calls([("lookup", {"q": 1})]))
    waiting = client.post(f"{API}/chat/s1", json={"message": "q4", "tools": tools}).json()
    n = len(fake.requests)
    r = client.post(f"{API}/chat/s1", json={"continue": waiting["message_id"]})
    assert r.status_code == 409 and "waits for tool results" in r.json()["detail"]
    # a failed answer with no text
    fake.push(Reply.error(400, "invalid_parameter_error", "bad"))
    failed = client.post(f"{API}/chat/s1", json={"message": "q5"})
    failed_id = failed.json()["message_id"]
    r = client.post(f"{API}/chat/s1", json={"continue": failed_id})
    assert r.status_code == 409 and "no text to continue" in r.json()["detail"]
    assert len(fake.requests) == n + 1  # only the failed one reached the model
    rows = service.rows("SELECT continued FROM messages WHERE continued > 0")
    assert rows == []


def test_an_answer_as_long_as_an_answer_may_be_is_not_continued(make_service, fake):
    """An answer cut at CHATSVC_MAX_ANSWER_CHARS (text and reasoning) can add nothing: 409, no model call,
    nothing billed, the message unchanged."""
    service = make_service(CHATSVC_MAX_ANSWER_CHARS="12")
    with service.client() as client:
        fake.push(Reply.answer(["Once ", "upon ", "a time"], usage=U1))
        first = client.post(f"{API}/chat/s1", json={"message": "tell a story"}).json()
        assert (first["response"], first["finish_reason"]) == ("Once upon a ", "length")
        before, sent = answer_row(service), len(fake.requests)
        r = client.post(f"{API}/chat/s1", json={"continue": first["message_id"]})
    assert r.status_code == 409 and r.json() == {
        "detail": f"Answer '{first['message_id']}' cannot be continued: it is as long as an answer may be"
        " (CHATSVC_MAX_ANSWER_CHARS).",
        "code": "not_continuable",
    }
    assert len(fake.requests) == sent and answer_row(service) == before
    assert [c["purpose"] for c in service.rows("SELECT purpose FROM usage_calls")] == ["answer"]


def test_an_answer_from_the_web_keeps_its_sources_when_continued(make_service, fake):
    """An answer from the web (its `sources` stored) cut at length, continued: the continuation does not
    search (the compatible endpoint, partial mode), and the whole's `end` and stored row keep its sources
    and search count; `web_search` with `continue` is refused by name."""
    from fake_dashscope import NATIVE_PATH, native_events
    from test_web_search import SOURCES

    service = make_service(CHATSVC_WEB_SEARCH="allowed")
    with service.client() as client:
        fake.push(Reply.of_events(native_events(["Hot [1]", " today"], finish="length")))
        first = client.post(f"{API}/chat/s1", json={"message": "weather?", "web_search": True}).json()
        assert (first["finish_reason"], first["sources"]) == ("length", SOURCES)
        mid = first["message_id"]
        r = client.post(f"{API}/chat/s1", json={"continue": mid, "web_search": True})
        assert r.status_code == 422 and r.json()["code"] == "invalid_request" and "'web_search'" in r.json()["detail"]
        fake.push(Reply.answer([" [ref_2]."], usage=U2))
        r = client.post(f"{API}/chat/s1/stream", json={"continue": mid})
    assert fake.requests[-1].path != NATIVE_PATH and "enable_search" not in json.dumps(fake.requests[-1].body)
    events = parse_events(r.content)
    assert [e["type"] for e in events] == ["start", "chunk", "end"]
    assert events[-1]["data"]["full_text"] == "Hot [1] today [ref_2]." and events[-1]["data"]["sources"] == SOURCES
    row = service.rows("SELECT content, sources, searches, continued FROM messages WHERE role = 'assistant'")[0]
    assert (row["content"], json.loads(row["sources"]), row["searches"], row["continued"]) == (
        "Hot [1] today [ref_2].",
        SOURCES,
        1,
        1,
    )


def test_over_limit_continue_changes_nothing(make_service, fake):
    service = make_service(CHATSVC_LIMIT_ANSWERS_PER_MINUTE="1")
    with service.client() as client:
        first = cut_at_length(client, fake)
        before = answer_row(service)
        r = client.post(f"{API}/chat/s1", json={"continue": first["message_id"]})
        assert r.status_code == 429
    assert answer_row(service) == before
    assert [c["purpose"] for c in service.rows("SELECT purpose FROM usage_calls")] == ["answer"]


def test_failed_mid_stream_keeps_its_text_and_continues(client, fake, service):
    fake.push(Reply.answer(["Half ", "way"], done=False, finish=None, usage=False, cut=True))
    r = client.post(f"{API}/chat/s1", json={"message": "q"})
    assert r.status_code >= 500 and r.json()["partial_text"] == "Half way"
    mid = r.json()["message_id"]
    assert answer_row(service)["status"] == "failed"
    fake.push(Reply.answer([" there."], usage=U2))
    r = client.post(f"{API}/chat/s1", json={"continue": mid})
    assert r.status_code == 200 and r.json()["response"] == "Half way there."
    row = answer_row(service)
    assert (row["status"], row["error_code"], row["continued"]) == ("complete", None, 1)
    assert fake.requests[-1].body["messages"][-1] == {"role": "assistant", "content": "Half way", "partial": True}
    # its first part's usage was not known: the sum is not either
    assert row["total_tokens"] is None


def test_interrupted_answer_continues_with_ids_past_its_end(make_service, fake):
    service = make_service()
    with service.client() as client:
        first = cut_at_length(client, fake)
    mid = first["message_id"]
    # as a crash leaves it: `streaming`, its heartbeat old; the next start sweeps it to interrupted
    service.rows("UPDATE messages SET status = 'streaming', updated_at = '2000-01-01T00:00:00Z' WHERE id = ?", mid)
    with LiveServer(service.settings) as live:
        wait_for(lambda: answer_row(service)["status"] == "interrupted")
        assert answer_row(service)["last_seq"] == chatsvc.INTERRUPTED_SEQ
        fake.push(Reply.answer(["time."], usage=U2))
        with live.client() as c:
            r = c.post(f"{API}/chat/s1/stream", json={"continue": mid})
        events = parse_events(r.content)
        assert events[0]["type"] == "start" and events[0]["id"] == f"{mid}:{chatsvc.INTERRUPTED_SEQ + 1}"
        assert events[0]["data"]["continues"] == {"message_id": mid, "chars": len("Once upon a ")}
        assert [e["data"]["content"] for e in events if e["type"] == "chunk"] == ["time."]
        assert events[-1]["type"] == "end" and events[-1]["data"]["full_text"] == "Once upon a time."
    row = answer_row(service)
    assert row["status"] == "complete" and row["last_seq"] == int(events[-1]["id"].rsplit(":", 1)[1])


def stopped_answer(live, fake, service) -> tuple[str, list]:
    """An answer stopped after two chunks; its events as its stream sent them."""
    hold = threading.Event()
    fake.push(Reply.answer(["A1 ", "A2 ", "A3 "], hold=hold, hold_at=3, usage=U1))
    with live.client() as client:
        reader = SSEReader(client, "POST", f"{API}/chat/s1/stream", json={"message": "q"})
        seen = [reader.next_event() for _ in range(3)]  # start, A1, A2
        with live.client() as other:
            assert other.post(f"{API}/chat/s1/stop").json()["stopped"] is True
        hold.set()
        seen += reader.until_end()
        reader.close()
    return seen[0]["data"]["message_id"], seen


def test_stream_wire_and_resumes(live, fake, service):
    mid, old = stopped_answer(live, fake, service)
    old_end = old[-1]
    assert old_end["type"] == "end" and old_end["data"]["full_text"] == "A1 A2 "
    old_last = int(old_end["id"].rsplit(":", 1)[1])
    assert answer_row(service)["last_seq"] == old_last
    fake.push(Reply.answer(["B1 ", "B2"], usage=U2))
    first = live.reader("GET", f"{API}/chat/s1/stream")  # the stopped answer, which no listener had, replayed
    assert first.until_end()[-1] == old_end
    waiting = live.reader("GET", f"{API}/chat/s1/stream")  # then a listener waiting for the next answer
    wait_for(lambda: live.listeners("s1") == 2)
    with live.client() as client:
        r = client.post(f"{API}/chat/s1/stream", json={"continue": mid})
    assert r.status_code == 200
    events = parse_events(r.content)
    assert waiting.until_end() == events  # from the continuation's start, as the POST stream
    seqs = [int(e["id"].rsplit(":", 1)[1]) for e in events]
    assert seqs == list(range(old_last + 1, old_last + 1 + len(events)))
    assert events[0]["type"] == "start" and events[0]["data"]["continues"] == {"message_id": mid, "chars": 6}
    assert events[0]["data"]["message_id"] == mid
    assert [e["data"]["content"] for e in events if e["type"] == "chunk"] == ["B1 ", "B2"]
    assert events[-1]["data"]["full_text"] == "A1 A2 B1 B2"
    assert "usage" not in events[-1]["data"]  # the stopped part's usage was never reported: the sum is not known
    # a reader that saw the old part up to its first chunk: its end (the whole stored text) and the new part
    with live.client() as client:
        resumed = SSEReader(client, "GET", f"{API}/chat/s1/stream", headers={"Last-Event-ID": old[1]["id"]})
        got = [resumed.next_event() for _ in range(len(events) + 1)]
        resumed.close()
    assert got[0] == old_end and got[1:] == events
    # a reader that saw the old end: only the new part
    with live.client() as client:
        resumed = SSEReader(client, "GET", f"{API}/chat/s1/stream", headers={"Last-Event-ID": old_end["id"]})
        assert [resumed.next_event() for _ in range(len(events))] == events
        resumed.close()
    # one that saw the new part's first chunk: the rest of it
    with live.client() as client:
        resumed = SSEReader(client, "GET", f"{API}/chat/s1/stream", headers={"Last-Event-ID": events[1]["id"]})
        assert resumed.until_end() == events[2:]
        resumed.close()


def test_stop_mid_continuation_then_continue_again(live, fake, service):
    mid, _ = stopped_answer(live, fake, service)
    hold = threading.Event()
    fake.push(Reply.answer(["B1 ", "B2 ", "B3"], hold=hold, hold_at=3, usage=U2))
    with live.client() as client:
        reader = SSEReader(client, "POST", f"{API}/chat/s1/stream", json={"continue": mid})
        seen = [reader.next_event() for _ in range(3)]  # start, B1, B2
        # one answer at a time: a second continue (or any turn) meanwhile is refused
        with live.client() as other:
            r = other.post(f"{API}/chat/s1", json={"continue": mid})
            assert r.status_code == 409 and r.json()["code"] == "conversation_busy"
            assert other.post(f"{API}/chat/s1/stop").json() == {"session_id": "s1", "stopped": True, "message_id": mid}
        hold.set()
        seen += reader.until_end()
        reader.close()
    assert seen[-1]["type"] == "end" and seen[-1]["data"]["full_text"] == "A1 A2 B1 B2 "
    row = answer_row(service)
    assert (row["content"], row["status"], row["continued"]) == ("A1 A2 B1 B2 ", "stopped", 1)
    fake.push(Reply.answer(["C"], usage=U2))
    with live.client() as client:
        r = client.post(f"{API}/chat/s1", json={"continue": mid})
    assert r.status_code == 200 and r.json()["response"] == "A1 A2 B1 B2 C"
    row = answer_row(service)
    assert (row["status"], row["continued"]) == ("complete", 2)
    assert fake.requests[-1].body["messages"][-1]["content"] == "A1 A2 B1 B2 "
    purposes = [c["purpose"] for c in service.rows("SELECT purpose FROM usage_calls ORDER BY id")]
    assert purposes == ["answer", "continuation", "continuation"]


def test_concurrent_continues_one_409(live, fake, service):
    mid, _ = stopped_answer(live, fake, service)
    hold = threading.Event()
    fake.default = Reply.answer(["B"], hold=hold, hold_at=1, usage=U2)
    results: list[int] = []

    def post():
        with live.client() as c:
            results.append(c.post(f"{API}/chat/s1", json={"continue": mid}).status_code)

    threads = [threading.Thread(target=post) for _ in range(2)]
    for t in threads:
        t.start()
    wait_for(lambda: 409 in results)
    hold.set()
    for t in threads:
        t.join(10)
    assert sorted(results) == [200, 409]
    assert answer_row(service)["continued"] == 1


def test_an_earlier_parts_forget_timer_leaves_the_running_continuation():
    """Registry: the timer that forgets the earlier part (its CHATSVC_REPLAY_SECONDS after it ended)
    forgets that part only, not the continuation registered since under the same id."""
    registry = chatsvc.Registry(None, None)
    old = chatsvc.Answer("", "s1", "m1", model="qwen-plus")
    registry.register(old)
    registry.end(old)
    new = chatsvc.Answer("", "s1", "m1", model="qwen-plus")
    registry.register(new)
    registry._forget(old)
    assert registry.find("m1") is new and registry.running(("", "s1")) is new
    registry.end(new)
    registry._forget(new)
    assert registry.find("m1") is None


def test_resume_mid_continuation_after_the_earlier_parts_replay_window(make_service, fake):
    """A reader resuming mid-continuation once the earlier part's replay window has passed gets the rest
    of it, from this replica's own answer (on PostgreSQL: never a mirror of itself, so stop still stops it)."""
    service = make_service(CHATSVC_REPLAY_SECONDS="0.2")
    with LiveServer(service.settings) as live:
        registry = live.relay.registry
        forgotten: list = []
        forget = registry._forget
        registry._forget = lambda answer: (forget(answer), forgotten.append(answer))
        fake.push(Reply.answer(["Once ", "upon "], finish="length", usage=U1))
        with live.client() as c:
            mid = c.post(f"{API}/chat/s1", json={"message": "story", "max_tokens": 2}).json()["message_id"]
        old = registry.find(mid)
        hold = threading.Event()
        fake.push(Reply.answer(["a ", "time ", "there."], hold=hold, hold_at=3, usage=U2))
        with live.client() as c:
            poster = SSEReader(c, "POST", f"{API}/chat/s1/stream", json={"continue": mid})
            seen = [poster.next_event() for _ in range(3)]  # start, "a ", "time "
            wait_for(lambda: old in forgotten)  # the earlier part's replay window passed while it runs
            resumed = live.reader("GET", f"{API}/chat/s1/stream", headers={"Last-Event-ID": seen[1]["id"]})
            assert resumed.next_event() == seen[2]
            assert not isinstance(registry.running(("", "s1")), chatsvc.Mirror)
            with live.client() as other:
                stopped = other.post(f"{API}/chat/s1/stop").json()
            assert stopped == {"session_id": "s1", "stopped": True, "message_id": mid}
            hold.set()
            rest = poster.until_end()
            poster.close()
        assert resumed.until_end() == rest
    assert rest[-1]["type"] == "end" and rest[-1]["data"]["full_text"] == "Once upon a time "
    row = answer_row(service)
    assert (row["content"], row["status"], row["continued"]) == ("Once upon a time ", "stopped", 1)


def test_a_mirror_joining_a_continuation_late_starts_its_log_at_the_checkpoint():
    """Replicas._fill: a mirror that catches up with a running continuation from the checkpoint (its ids
    past 2**31 after an interrupted part) holds the events from there, not an empty place per id before
    it (2**31 of them: 16 GiB). Run in a child capped at 2 GiB of address space, so that the bug is a
    MemoryError there, not the machine's memory."""
    code = """
import json, resource, sys, chatsvc
resource.setrlimit(resource.RLIMIT_AS, (2 * 2**30, 2 * 2**30))
mirror = chatsvc.Mirror("", "s1", "m1", model="")
seq = chatsvc.INTERRUPTED_SEQ + 5
row = {"model": "qwen-plus", "parent_id": "q1", "content": "Once upon a time", "reasoning_content": None,
       "tool_steps": None, "last_seq": seq, "continued": 1}
chatsvc.Replicas._fill(chatsvc.Replicas, mirror, row, seq)
print(json.dumps([len(mirror.log), mirror.base, b"".join(mirror.log[mirror.base:]).decode()]))
"""
    root = chatsvc.__file__.rsplit("/", 1)[0]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=120)
    assert done.returncode == 0, done.stderr[-800:]
    length, base, raw = json.loads(done.stdout)
    assert length == chatsvc.INTERRUPTED_SEQ + 5 and base == chatsvc.INTERRUPTED_SEQ + 4
    events = parse_events(raw.encode())
    assert [(e["id"], e["type"], e["data"]) for e in events] == [
        (f"m1:{chatsvc.INTERRUPTED_SEQ + 4}", "chunk", {"content": "Once upon a time"})
    ]


# ── replicas (PostgreSQL, real processes) ──────────────────────────────────────────────

from test_replicas import channel_listeners, cluster, slow  # noqa: E402, F401  (the cluster fixture)


@pytest.mark.slow
def test_killed_answer_continued_on_another_replica_and_followed_on_a_third(cluster, fake):  # noqa: F811
    service, a, b, replica = cluster
    fake.push(slow(400))
    poster = SSEReader(b.client(), "POST", f"{API}/chat/s1/stream", json={"message": "hi"})
    for _ in range(5):
        poster.next_event()
    b.kill()  # SIGKILL: a finds its heartbeat gone and stores the answer interrupted
    mid = poster.events[0]["data"]["message_id"]
    wait_for(lambda: service.rows("SELECT status FROM messages WHERE role = 'assistant'")[0]["status"] == "interrupted")
    stored = service.rows("SELECT content, last_seq FROM messages WHERE role = 'assistant'")[0]
    assert stored["last_seq"] == chatsvc.INTERRUPTED_SEQ and stored["content"].startswith("w0 ")
    c = replica()
    c.start()
    listener = SSEReader(c.client(), "GET", f"{API}/chat/s1/stream")
    wait_for(lambda: channel_listeners(c) == 1, 30)
    fake.push(Reply.answer(["and ", "more"], pause=0.02, usage=U2))
    with a.client() as client:
        posted = SSEReader(client, "POST", f"{API}/chat/s1/stream", json={"continue": mid}).until_end()
    heard = listener.until_end()
    assert heard == posted  # the same ids, types and data on the replica that followed it
    assert posted[0]["id"] == f"{mid}:{chatsvc.INTERRUPTED_SEQ + 1}"
    assert posted[0]["data"]["continues"] == {"message_id": mid, "chars": len(stored["content"])}
    assert posted[-1]["data"]["full_text"] == stored["content"] + "and more"
    row = service.rows("SELECT content, status, continued FROM messages WHERE role = 'assistant'")[0]
    assert row == {"content": stored["content"] + "and more", "status": "complete", "continued": 1}
    listener.close()


@pytest.mark.slow
def test_a_third_replica_resumes_a_continuation_past_2_31(cluster, fake, monkeypatch):  # noqa: F811
    """A replica that joins a continuation of an interrupted answer (ids past 2**31) late, from its
    checkpoint, for a reader resuming there: its address space capped at 3 GiB, so that padding the
    log to 2**31 places would be a MemoryError in its log rather than the machine's memory."""
    import resource

    import procs

    service, a, _, replica = cluster
    with a.client() as c:
        fake.push(Reply.answer(["Once ", "upon "], finish="length", usage=U1))
        mid = c.post(f"{API}/chat/s1", json={"message": "story", "max_tokens": 2}).json()["message_id"]
    # as a crash leaves it: `streaming`, its heartbeat old; the sweep stores it interrupted
    service.rows("UPDATE messages SET status = 'streaming', updated_at = '2000-01-01T00:00:00Z' WHERE id = ?", mid)
    wait_for(lambda: answer_row(service)["status"] == "interrupted")
    fake.push(Reply.answer([f"w{i} " for i in range(100)], pause=0.05, usage=U2))
    with a.client() as c:
        poster = SSEReader(c, "POST", f"{API}/chat/s1/stream", json={"continue": mid})
        seen = [poster.next_event() for _ in range(4)]
        assert int(seen[0]["id"].rsplit(":", 1)[1]) == chatsvc.INTERRUPTED_SEQ + 1
        last = int(seen[-1]["id"].rsplit(":", 1)[1])
        wait_for(lambda: answer_row(service)["last_seq"] > last)  # a checkpoint past the ids seen
        cap = 3 * 2**30
        popen = procs.subprocess.Popen
        monkeypatch.setattr(
            procs.subprocess,
            "Popen",
            lambda *args, **kw: popen(
                *args, **kw, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
            ),
        )
        third = replica().start()
        monkeypatch.setattr(procs.subprocess, "Popen", popen)
        with third.client() as tc:
            resumed = SSEReader(tc, "GET", f"{API}/chat/s1/stream", headers={"Last-Event-ID": seen[2]["id"]})
            got = resumed.until_end()
        posted = seen + poster.until_end()
    assert "MemoryError" not in third.log(), third.log()[-2000:]
    assert got[-1] == posted[-1] and got[-1]["type"] == "end"
    # from the checkpoint: one event with the whole text it holds, then the live events after it
    assert got[0]["type"] == "chunk" and "".join(e["data"]["content"] for e in got[:-1]) == got[-1]["data"]["full_text"]
    # then the live events, each once, in order (a gap a lost notification left is filled from a later
    # checkpoint the same way: one event with the text the gap held, under the gap's last id)
    seqs = [int(e["id"].rsplit(":", 1)[1]) for e in got]
    assert seqs == sorted(set(seqs)) and seqs[0] > chatsvc.INTERRUPTED_SEQ
    assert {e["id"] for e in got[1:]} <= {e["id"] for e in posted}


@pytest.mark.slow
def test_crash_mid_continuation_leaves_no_token_sum_and_continues(service, fake, tmp_path):
    """SIGKILL mid-continuation: the message keeps the text checkpointed, and its token counts are not
    known (the crashed part's were never reported), while its cost is what the ledger holds (its calls
    settled by the sweep with an estimate); continued again, the sum is still not known."""
    from procs import ServerProcess

    env = {**service.env, "CHATSVC_CHECKPOINT_SECONDS": "0.1", "CHATSVC_HEARTBEAT_SECONDS": "0.2"}
    server = ServerProcess(env, tmp_path).start()
    with server.client() as c:
        fake.push(Reply.answer(["Once ", "upon "], finish="length", usage=U1))
        mid = c.post(f"{API}/chat/s1", json={"message": "story", "max_tokens": 2}).json()["message_id"]
        assert answer_row(service)["total_tokens"] == 14
        fake.push(Reply.answer([f"w{i} " for i in range(400)], pause=0.03, usage=U2))
        reader = SSEReader(c, "POST", f"{API}/chat/s1/stream", json={"continue": mid})
        for _ in range(6):
            reader.next_event()
        wait_for(lambda: answer_row(service)["content"].startswith("Once upon w0 w1 w2 w3 "))  # checkpointed
        server.kill()
    server = ServerProcess(env, tmp_path).start()
    try:
        wait_for(lambda: answer_row(service)["status"] == "interrupted")
        row = answer_row(service)
        assert row["content"].startswith("Once upon w0 w1 w2 w3 ") and row["continued"] == 1
        assert (row["prompt_tokens"], row["completion_tokens"], row["total_tokens"]) == (None, None, None)
        calls = service.rows("SELECT purpose, state, source FROM usage_calls ORDER BY id")
        assert [(c["purpose"], c["state"], c["source"]) for c in calls] == [
            ("answer", "settled", "reported"),
            ("continuation", "settled", "estimated"),
        ]
        costs = service.rows("SELECT cost_micros FROM usage_calls")
        stored = service.rows("SELECT cost_micros FROM messages WHERE role = 'assistant'")[0]["cost_micros"]
        assert stored == (None if None in [c["cost_micros"] for c in costs] else sum(c["cost_micros"] for c in costs))
        fake.push(Reply.answer(["end."], usage=U3))
        with server.client() as c:
            r = c.post(f"{API}/chat/s1", json={"continue": mid})
            shown = c.get(f"{API}/context/conversations/s1").json()["messages"][1]
        assert r.status_code == 200 and r.json()["response"].endswith("end.")
        assert "usage" not in r.json(), r.json()  # not parts 1 and 3 only
        assert shown.get("usage") is None, shown
        row = answer_row(service)
        assert (row["status"], row["continued"], row["total_tokens"]) == ("complete", 2, None)
    finally:
        server.stop()


def test_a_producer_taken_for_dead_writes_nothing_over_the_continuation(database):
    """A replica's answer is taken for dead (its heartbeat late: a stall, a partition), and the user
    continues it elsewhere. When the first producer comes back, its checkpoint, its heartbeat and its
    final write no longer match the row: it is `streaming` again, but with the continuation's
    generation (`continued`). So the continuation's text, its reservation and its running answer
    stay as they are; the first producer learns it was taken; the continuation then ends as any."""
    from support import pg
    from test_usage_hostile_answers import books, final, new_turn, reported, run

    from chatsvc import Checkpoint, Continuation, Hold, Purpose

    async def body(store):
        turn = new_turn()
        await store.tree.begin_turn(turn)
        other = new_turn(owner="bob", session="s2")  # another answer, checkpointed in the same statement
        await store.tree.begin_turn(other)
        written = await store.answers.checkpoint(
            [Checkpoint(turn.answer_id, "part one", None, 3), Checkpoint(other.answer_id, 'ü, 中文, "q"', "r", 2)]
        )
        assert written == {turn.answer_id, other.answer_id}
        assert (await store.db.fetch_one(
            "SELECT content, reasoning_content, last_seq FROM messages WHERE id = :id", {"id": other.answer_id}
        )) == {"content": "ü, 中文, \"q\"", "reasoning_content": "r", "last_seq": 2}  # fmt: skip
        [swept] = await store.answers.recover_interrupted(None, only=[turn.answer_id])  # as another replica's sweep
        assert swept["content"] == "part one"
        hold = Hold(chatsvc.new_message_id(), "alice", "s", turn.answer_id, Purpose.CONTINUATION, "qwen-plus", 100, 50)
        cont = Continuation("alice", "s", turn.answer_id, "qwen-plus", turn.question_id, "interrupted",
                            chatsvc.INTERRUPTED_SEQ, b"", "part one", None, [], None, None, None,
                            hold=hold)  # fmt: skip
        await store.tree.begin_continuation(cont)
        assert cont.generation == 1

        async def row() -> dict:
            return await store.db.fetch_one(
                "SELECT content, status, continued, last_seq FROM messages WHERE id = :id", {"id": turn.answer_id}
            )

        continuing = await row()
        assert (continuing["status"], continuing["continued"]) == ("streaming", 1)
        if not store.db.is_sqlite:  # the first producer's heartbeat finds it taken; the continuation's beats
            assert pg(database, chatsvc.HEARTBEAT_SQL, [turn.answer_id], [0]) == []
            assert pg(database, chatsvc.HEARTBEAT_SQL, [turn.answer_id], [1]) == [{"id": turn.answer_id}]
            assert pg(database, chatsvc.HEARTBEAT_SQL, [turn.answer_id], [None]) == [{"id": turn.answer_id}]
        # the first producer, back: its checkpoint and its final write match nothing
        late = [Checkpoint(turn.answer_id, "part one, then the old producer", None, 9)]
        assert await store.answers.checkpoint(late) == set()
        assert not await store.answers.finish(turn.answer_id, final(turn.hold.call_id, reported(100, 20)))
        assert await row() == continuing
        owner, reserved, streaming = await books(store)
        assert reserved == [{"id": hold.call_id, "message_id": turn.answer_id}]  # the continuation's, still held
        assert owner["running"] == 1 and streaming == [{"id": turn.answer_id}]
        # the continuation writes and ends as any answer
        now = [Checkpoint(turn.answer_id, "part one, part two", None, 5, generation=1)]
        assert await store.answers.checkpoint(now) == {turn.answer_id}
        assert (await row())["content"] == "part one, part two"
        done = final(hold.call_id, reported(100, 20))
        done.content, done.generation = "part one, part two.", 1
        assert await store.answers.finish(turn.answer_id, done)
        assert (await row())["status"] == "complete"
        owner, reserved, streaming = await books(store)
        assert (reserved, streaming, owner["running"], owner["day_reserved"]) == ([], [], 0, 0)

    run(database, body)


def test_readers_of_a_producer_taken_and_continued_elsewhere_are_told_what_the_store_holds(make_service, fake):
    """The same race through a running service: its answer is taken for dead and continued by another
    process (done here in the database, as that process would) while the model stalls. When the model
    goes on, the producer's writes change nothing of the continuation, and its readers are told the
    verdict on its part, as stored then: interrupted, with the text of its last checkpoint, which the
    continuation's row begins with, not the text its checkpoints after the take tried to write. On
    PostgreSQL its heartbeat finds it taken and stops it first."""
    service = make_service(CHATSVC_CHECKPOINT_SECONDS="0.1", CHATSVC_HEARTBEAT_SECONDS="0.2")
    hold = threading.Event()
    # paced: after the take, its checkpoints run (and match nothing) before it ends
    fake.push(Reply.answer(["a ", "b ", "c ", "d "], hold=hold, hold_at=3, usage=U1, pause=0.3))
    with LiveServer(service.settings) as live, live.client() as client:
        reader = SSEReader(client, "POST", f"{API}/chat/s1/stream", json={"message": "q"})
        mid = reader.next_event()["data"]["message_id"]
        chunks = []
        while len(chunks) < 2:
            event = reader.next_event()
            chunks += [event["data"]["content"]] if event["type"] == "chunk" else []
        assert chunks == ["a ", "b "]
        wait_for(lambda: answer_row(service)["content"] == "a b ")
        service.rows(
            "UPDATE messages SET status = 'interrupted', error_code = 'interrupted', last_seq = ? WHERE id = ?",
            chatsvc.INTERRUPTED_SEQ, mid,
        )  # fmt: skip
        service.rows(
            "UPDATE messages SET status = 'streaming', continued = 1, content = 'a b (continued)' WHERE id = ?", mid
        )
        continued = answer_row(service)
        hold.set()
        end = reader.until_end()[-1]
        reader.close()
    assert end["type"] == "error" and end["data"]["code"] == "interrupted", end
    assert end["data"]["partial_text"] == "a b "
    assert answer_row(service) == continued
