"""Client-facing streaming over real sockets: chatsvc under uvicorn, the fake DashScope pacing
its chunks, and raw SSE bytes read the way curl and EventSource read them."""

from __future__ import annotations

import json
import threading
import time

import pytest
from fake_dashscope import Reply
from live import LiveServer, SSEReader, parse_events
from support import wait_for

API = "/api/v1"
USAGE = {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}


@pytest.fixture
def live(service):
    with LiveServer(service.settings) as server:
        yield server


def listen(live, session_id="s1", **kw) -> SSEReader:
    """A channel listener, returned once it is connected and waiting."""
    before = live.listeners(session_id)
    reader = live.reader("GET", f"{API}/chat/{session_id}/stream", **kw)
    wait_for(lambda: live.listeners(session_id) > before)
    return reader


def background_chat(live, message="hi", session_id="s1") -> threading.Thread:
    """A non-streaming chat running in its own thread with its own connection; join it at the end."""

    def post():
        with live.client() as client:
            client.post(f"{API}/chat/{session_id}", json={"message": message})

    thread = threading.Thread(target=post)
    thread.start()
    return thread


def texts(events):
    return [(e["type"], e["data"].get("content", e["data"].get("full_text"))) for e in events]


def test_post_stream_bytes_on_the_wire(live, fake, service):
    fake.push(Reply.answer(["Hel", "lo ✓"], usage=USAGE))
    with live.client() as client:
        r = client.post(f"{API}/chat/s1/stream", json={"message": "hi"})
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert r.headers["x-accel-buffering"] == "no"
    assert "no-store" in r.headers["cache-control"] and "no-transform" in r.headers["cache-control"]
    assert "content-encoding" not in r.headers
    mid = parse_events(r.content)[0]["data"]["message_id"]
    question = service.rows("SELECT id FROM messages WHERE role = 'user'")[0]["id"]

    def event(seq, type_, data):
        payload = json.dumps({"type": type_, "data": data}, ensure_ascii=False, separators=(",", ":"))
        return f"id: {mid}:{seq}\ndata: {payload}\n\n"

    assert r.content.decode() == (
        "retry: 1000\n\n"
        + event(0, "start", {"session_id": "s1", "message_id": mid, "model": "qwen-plus", "parent_id": question})
        + event(1, "chunk", {"content": "Hel"})
        + event(2, "chunk", {"content": "lo ✓"})
        + event(3, "end", {"full_text": "Hello ✓", "message_id": mid, "finish_reason": "stop", "usage": USAGE})
    )


def test_listeners_and_the_post_reader_see_the_same_events(live, fake):
    fake.push(Reply.answer([f"c{i} " for i in range(10)], pause=0.01))
    a, b = listen(live), listen(live)
    with live.client() as client:
        post = SSEReader(client, "POST", f"{API}/chat/s1/stream", json={"message": "hi"})
        posted = post.until_end()
    got_a, got_b = a.until_end(), b.until_end()
    assert posted == got_a == got_b
    assert [e["type"] for e in posted] == ["start"] + ["chunk"] * 10 + ["end"]
    assert posted[-1]["data"]["full_text"] == "".join(f"c{i} " for i in range(10))
    assert [e["id"] for e in posted] == [f"{posted[0]['data']['message_id']}:{i}" for i in range(12)]


def test_get_before_post_delivers_exactly_one_whole_answer(live, fake, service):
    fake.push(Reply.answer(["one", " two"]))
    reader = listen(live)
    with live.client() as client:
        assert client.post(f"{API}/chat/s1", json={"message": "hi"}).status_code == 200
    events = reader.until_end()
    assert texts(events) == [("start", None), ("chunk", "one"), ("chunk", " two"), ("end", "one two")]
    assert wait_for(lambda: live.listeners("s1") == 1)  # back to waiting for the next answer, nothing more sent
    assert reader._pending == [] and b"\n\n" not in reader._buf


def test_post_finished_before_get_is_replayed_once(live, fake):
    fake.push(Reply.answer(["instant"]))
    with live.client() as client:
        assert client.post(f"{API}/chat/s1", json={"message": "hi"}).status_code == 200
    first = live.reader("GET", f"{API}/chat/s1/stream")
    assert texts(first.until_end()) == [("start", None), ("chunk", "instant"), ("end", "instant")]
    second = listen(live)  # the answer has been delivered now: a later listener waits for the next one
    fake.push(Reply.answer(["next"]))
    with live.client() as client:
        client.post(f"{API}/chat/s1", json={"message": "again"})
    assert texts(second.until_end())[-1] == ("end", "next")


def test_a_second_message_never_replays_the_first(live, fake):
    """The seed client's pattern: a new EventSource and a POST at the same moment, every message."""
    with live.client() as client:
        # the first answer went out over a POST stream only, so no channel listener has seen it
        fake.push(Reply.answer(["first"]))
        client.post(f"{API}/chat/s1/stream", json={"message": "one"})
        fake.push(Reply.answer(["second"], pause=0.01))
        reader = live.reader("GET", f"{API}/chat/s1/stream")
        time.sleep(0.05)
        client.post(f"{API}/chat/s1/stream", json={"message": "two"})
    assert texts(reader.until_end()) == [("start", None), ("chunk", "second"), ("end", "second")]


def test_last_event_id_resumes_at_every_position(make_service, fake):
    # A finished answer's events are replayable for CHATSVC_REPLAY_SECONDS after its end (then a resume
    # gets its stored end alone: the next test). 21 resumes outlast the suite's 5 s on a busy machine.
    service = make_service(CHATSVC_REPLAY_SECONDS="600")
    fake.push(Reply.answer([f"t{i}" for i in range(20)]))
    with LiveServer(service.settings) as live:
        with live.client() as client:
            full = parse_events(client.post(f"{API}/chat/s1/stream", json={"message": "hi"}).content)
        assert len(full) == 22
        for k, seen in enumerate(full[:-1]):
            via = {"headers": {"Last-Event-ID": seen["id"]}} if k % 2 else {"params": {"last_event_id": seen["id"]}}
            reader = live.reader("GET", f"{API}/chat/s1/stream", **via)
            assert reader.until_end() == full[k + 1 :], k
            reader.close()


def test_a_malformed_last_event_id_is_a_fresh_listener(live, fake):
    # NUL and such never reach the database (PostgreSQL refuses NUL in text): the id is just not one of ours
    reader = live.reader("GET", f"{API}/chat/s1/stream", params={"last_event_id": "a\x00b:3"})
    wait_for(lambda: live.listeners("s1"))
    with live.client() as client:
        posted = parse_events(client.post(f"{API}/chat/s1/stream", json={"message": "hi"}).content)
    assert reader.until_end() == posted


def test_reconnect_mid_answer_has_no_gap_and_no_duplicate(live, fake):
    fake.push(Reply.answer([f"w{i} " for i in range(30)], pause=0.01))
    first = listen(live)
    chat = background_chat(live)
    got = [first.next_event() for _ in range(8)]
    first.close()  # the connection drops mid-answer
    second = live.reader("GET", f"{API}/chat/s1/stream", headers={"Last-Event-ID": got[-1]["id"]})
    got += second.until_end()
    assert [e["id"].rsplit(":", 1)[1] for e in got] == [str(i) for i in range(32)]
    assert "".join(e["data"]["content"] for e in got if e["type"] == "chunk") == got[-1]["data"]["full_text"]
    chat.join(10)


def test_resume_after_the_log_is_dropped_sends_the_stored_end(make_service, fake):
    service = make_service(CHATSVC_REPLAY_SECONDS="0.2")
    fake.push(Reply.answer(["all", " of", " it"]))
    with LiveServer(service.settings) as live, live.client() as client:
        full = parse_events(client.post(f"{API}/chat/s1/stream", json={"message": "hi"}).content)
        wait_for(lambda: live.relay.registry.find(full[0]["data"]["message_id"]) is None)  # kept no longer
        reader = live.reader("GET", f"{API}/chat/s1/stream", headers={"Last-Event-ID": full[1]["id"]})
        assert reader.until_end() == [full[-1]]  # same id, same data: the client ends with the full text
        reader.close()


def test_client_disconnect_does_not_stop_the_answer(live, fake, service):
    fake.push(Reply.answer([f"p{i} " for i in range(20)], pause=0.02))
    with live.client() as client:
        reader = SSEReader(client, "POST", f"{API}/chat/s1/stream", json={"message": "hi"})
        reader.next_event(), reader.next_event()
        reader.close()
    wait_for(lambda: service.rows("SELECT 1 FROM messages WHERE status = 'complete' AND role = 'assistant'"), 10)
    with live.client() as client:
        messages = client.get(f"{API}/context/conversations/s1").json()["messages"]
    assert messages[1]["content"] == "".join(f"p{i} " for i in range(20)) and messages[1]["status"] == "complete"


def test_stop_stores_what_readers_saw(live, fake, service):
    fake.push(Reply.answer([f"s{i} " for i in range(100)], pause=0.02))
    reader = listen(live)
    with live.client() as client:
        chat = background_chat(live)
        seen = [reader.next_event() for _ in range(5)]
        r = client.post(f"{API}/chat/s1/stop")
        assert r.status_code == 200 and r.json() == {"session_id": "s1", "stopped": True,
                                                     "message_id": seen[0]["data"]["message_id"]}  # fmt: skip
        stored = service.rows("SELECT content, status, finish_reason FROM messages WHERE role = 'assistant'")[0]
        seen += reader.until_end()
        assert client.post(f"{API}/chat/s1/stop").json()["stopped"] is False
    assert seen[-1]["type"] == "end" and seen[-1]["data"]["finish_reason"] == "stopped"
    text = "".join(e["data"]["content"] for e in seen if e["type"] == "chunk")
    assert stored == {"content": text, "status": "stopped", "finish_reason": "stopped"}
    assert seen[-1]["data"]["full_text"] == text and 0 < len(text) < len("s0 ") * 100
    chat.join(10)


def test_delete_stops_the_answer_first(live, fake, service):
    fake.push(Reply.answer(["x"] * 100, pause=0.02))
    reader = listen(live)
    with live.client() as client:
        chat = background_chat(live)
        reader.next_event(), reader.next_event()
        assert client.delete(f"{API}/context/conversations/s1").status_code == 204
    assert reader.until_end()[-1]["data"]["finish_reason"] == "stopped"
    assert service.rows("SELECT * FROM messages") == []
    chat.join(10)


def test_upstream_error_after_start_is_one_error_event(live, fake, service):
    fake.push(Reply.error(401, "invalid_api_key", "Incorrect API key provided."))
    with live.client() as client:
        events = parse_events(client.post(f"{API}/chat/s1/stream", json={"message": "hi"}).content)
    assert [e["type"] for e in events] == ["start", "error"]
    assert events[1]["data"]["code"] == "upstream_auth" and "API key" in events[1]["data"]["message"]
    assert events[1]["data"]["partial_text"] == ""


def test_errors_before_the_stream_are_json(live, fake):
    fake.push(Reply.answer(["slow"] * 20, pause=0.02))
    with live.client() as client:
        r = client.post(f"{API}/chat/s1/stream", json={"message": ""})
        assert r.status_code == 422 and r.headers["content-type"] == "application/json"
        assert "blank" in r.json()["detail"]
        chat = background_chat(live)
        wait_for(lambda: live.relay.registry.running(("", "s1")))
        r = client.post(f"{API}/chat/s1/stream", json={"message": "again"})
        assert r.status_code == 409 and r.json()["code"] == "conversation_busy"
    chat.join(10)


def test_reasoning_events_come_before_chunks(live, fake):
    fake.push(Reply.answer(["4"], reasoning=["2+2", " is 4"]))
    with live.client() as client:
        events = parse_events(client.post(f"{API}/chat/s1/stream", json={"message": "2+2?"}).content)
    assert [(e["type"], e["data"].get("content")) for e in events[:-1]] == [
        ("start", None), ("reasoning", "2+2"), ("reasoning", " is 4"), ("chunk", "4")]  # fmt: skip
    assert events[-1]["data"]["full_text"] == "4"


def test_idle_channel_gets_pings_and_one_retry(make_service):
    service = make_service(CHATSVC_PING_SECONDS="0.1")
    with LiveServer(service.settings) as live, live.client() as client:
        with client.stream("GET", f"{API}/chat/new-conversation/stream") as r:
            assert r.status_code == 200  # a conversation that does not exist yet is not an error here
            raw = b""
            for chunk in r.iter_raw():
                raw += chunk
                if raw.count(b": ping\n\n") >= 2:
                    break
    assert raw.startswith(b"retry: 1000\n\n") and raw.count(b"retry:") == 1
    assert b"event:" not in raw


def test_channel_follows_the_conversation_across_answers(live, fake):
    reader = listen(live)
    with live.client() as client:
        for word in ("one", "two", "three"):
            fake.push(Reply.answer([word]))
            client.post(f"{API}/chat/s1", json={"message": word})
            assert reader.until_end()[-1]["data"]["full_text"] == word
