"""Long conversations (issue 25, part 2): a branch that outgrows the context's budget is summarised
by the model in the background, and the summary is sent (in the system message) ahead of the newest
messages that fit; CHATSVC_CONTEXT_WINDOW, which the budget follows; a model's refusal for length.
Asserted on the fake's requests (what the model receives), the summaries and usage_calls rows, and
what GET conversation presents."""

from __future__ import annotations

import logging
import re
import threading

import pytest
from fake_dashscope import Reply, overflow_replies
from support import wait_for

import chatsvc

API = "/api/v1"
CONV = f"{API}/context/conversations"
SYSTEM = "You are a helpful assistant."


def is_summary(seen) -> bool:
    return seen.body["messages"][0]["content"] == chatsvc.SUMMARY_PROMPT


def replies(fake, summaries: list[str] | None = None, fail: Reply | None = None, hold=None):
    """The fake answers a chat with 'answer to <question>', and a summary request with the next of
    `summaries` (or `fail`, or a reply held until `hold` is set)."""
    made = iter(summaries or [f"SUMMARY-{n}" for n in range(1, 100)])

    def reply(seen) -> Reply:
        if is_summary(seen):
            if fail is not None:
                return fail
            return Reply.answer([next(made)], hold=hold, hold_at=0) if hold else Reply.answer([next(made)])
        return Reply.answer([f"answer to {seen.body['messages'][-1]['content']}"])

    fake.default = reply


def chats(fake) -> list:
    return [seen for seen in fake.requests if seen.body and not is_summary(seen)]


def summary_requests(fake) -> list:
    return [seen for seen in fake.requests if seen.body and is_summary(seen)]


def say(client, text: str, sid: str = "s1", **more) -> dict:
    r = client.post(f"{API}/chat/{sid}", json={"message": text, **more})
    assert r.status_code == 200, r.text
    return r.json()


def framed(summary: str) -> str:
    return f"{SYSTEM}\n\n{chatsvc.SUMMARY_OPEN}\n{summary}\n{chatsvc.SUMMARY_CLOSE}"


def turns(n: int, start: int = 1) -> list[str]:
    return [f"q{i}" for i in range(start, start + n)]


def flat(messages: list[dict]) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in messages]


def history(questions: list[str]) -> list[tuple[str, str]]:
    out = []
    for q in questions:
        out += [("user", q), ("assistant", f"answer to {q}")]
    return out


@pytest.fixture
def long_service(make_service):
    return make_service(CHATSVC_SUMMARIES="on", CHATSVC_MAX_CONTEXT_MESSAGES="6")


def test_a_long_branch_is_summarised_and_the_summary_sent_then_rolled(long_service, fake):
    service = long_service
    replies(fake)
    with service.client() as client:
        for q in turns(4):
            say(client, q)
        # q4's answer: the branch (8 messages) no longer fits 6; q1..a3 are summarised, q4..a4 kept
        row = wait_for(lambda: service.rows("SELECT * FROM summaries"))[0]
        (asked,) = summary_requests(fake)
        assert asked.body["model"] == "qwen-plus" and asked.body["max_tokens"] == 6000 // 4
        assert asked.body["messages"][1]["content"] == "Conversation:\n" + "\n\n".join(
            f"User: q{i}\n" if False else f"User: q{i}\n\nAssistant: answer to q{i}" for i in range(1, 4)
        )
        assert (row["content"], row["covered"], row["model"]) == ("SUMMARY-1", 6, "qwen-plus")
        ids = [r["id"] for r in service.rows("SELECT id FROM messages ORDER BY id")]
        assert (row["first_id"], row["message_id"]) == (ids[0], ids[5])
        say(client, "q5")
        sent = chats(fake)[-1].body["messages"]
        assert sent[0] == {"role": "system", "content": framed("SUMMARY-1")}
        assert flat(sent[1:]) == [*history(["q4"]), ("user", "q5")]  # exactly what follows the summary
        # the usage ledger holds the summary's call, settled
        calls = service.rows("SELECT purpose, state, outcome, session_id FROM usage_calls WHERE purpose = 'summary'")
        assert calls == [{"purpose": "summary", "state": "settled", "outcome": "complete", "session_id": "s1"}]
        # presented: where it stands, what it says, and which messages it covers
        conversation = client.get(f"{CONV}/s1").json()
        assert conversation["summary"]["content"] == "SUMMARY-1" and conversation["summary"]["covered"] == 6
        assert conversation["summary"]["message_id"] == ids[5] and conversation["summary"]["first_id"] == ids[0]
        marked = [m["id"] for m in conversation["messages"] if m.get("summarized")]
        assert marked == ids[:6]
        say(client, "q6")
        say(client, "q7")
        # rolling: the second summary is asked with the first, covers it and what followed
        second = wait_for(lambda: len(summary_requests(fake)) == 2 and summary_requests(fake)[1])
        assert second.body["messages"][1]["content"].startswith(
            "Earlier summary:\nSUMMARY-1\n\nConversation:\nUser: q4"
        )
        rows = wait_for(
            lambda: (
                len(service.rows("SELECT * FROM summaries")) == 2
                and service.rows("SELECT * FROM summaries ORDER BY message_id DESC")
            )
        )
        assert rows[0]["content"] == "SUMMARY-2" and rows[0]["first_id"] == ids[0] and rows[0]["covered"] > 6
        say(client, "q8")
        sent = chats(fake)[-1].body["messages"]
        assert sent[0]["content"] == framed("SUMMARY-2")
        assert flat(sent[1:])[-1] == ("user", "q8") and ("user", "q4") not in flat(sent[1:])


def test_a_branch_that_forks_before_the_summary_does_not_see_it(long_service, fake):
    service = long_service
    replies(fake)
    with service.client() as client:
        answers = [say(client, q) for q in turns(4)]
        wait_for(lambda: service.rows("SELECT * FROM summaries"))
        # an edit of q2: the new branch forks before the summary's message (a3)
        q2 = service.rows("SELECT id FROM messages WHERE content = 'q2'")[0]["id"]
        r = client.post(f"{API}/chat/s1", json={"message": "q2 again", "edit": q2})
        assert r.status_code == 200, r.text
        sent = chats(fake)[-1].body["messages"]
        assert sent[0]["content"] == SYSTEM and flat(sent[1:]) == [*history(["q1"]), ("user", "q2 again")]
        assert "summary" not in client.get(f"{CONV}/s1").json()
        # a regeneration of a4 goes through a3: it sees the summary
        r = client.post(f"{API}/chat/s1", json={"regenerate": answers[3]["message_id"]})
        assert r.status_code == 200, r.text
        sent = chats(fake)[-1].body["messages"]
        assert sent[0]["content"] == framed("SUMMARY-1") and flat(sent[1:]) == [("user", "q4")]


def test_a_failed_summary_leaves_the_newest_that_fit_and_says_why(long_service, fake, caplog):
    service = long_service
    replies(fake, fail=Reply.error(400, "invalid_parameter_error", "the summary model is broken"))
    with caplog.at_level(logging.WARNING, logger="chatsvc"), service.client() as client:
        for q in turns(4):
            say(client, q)
        wait_for(lambda: any("no summary of session s1" in r.getMessage() for r in caplog.records))
        say(client, "q5")

        def settled() -> tuple[list, list] | None:
            """The summary calls and the warnings once no call is in flight and every failed one is
            logged (a call is settled in the store first, then logged: read between the two, they differ)."""
            calls = service.rows("SELECT state, outcome FROM usage_calls WHERE purpose = 'summary' ORDER BY id")
            warned = [r for r in caplog.records if "no summary of session s1" in r.getMessage()]
            in_flight = any(c["state"] == "reserved" for c in calls)
            return None if in_flight or len(warned) != sum(c["outcome"] == "failed" for c in calls) else (calls, warned)

        # q4's summary failed, once logged; q5's was tried again (and failed too): each failure logged once
        calls, warned = wait_for(settled)
    assert "the summary model is broken" in warned[0].getMessage()
    assert service.rows("SELECT * FROM summaries") == []
    sent = chats(fake)[-1].body["messages"]
    assert sent[0]["content"] == SYSTEM and flat(sent[1:]) == [*history(["q2", "q3", "q4"]), ("user", "q5")]
    assert calls[0]["outcome"] == "failed"


def test_no_summaries_when_off_and_short_conversations_are_sent_as_always(make_service, fake):
    for setting in ("off", "on"):
        fake.reset()
        replies(fake)
        service = make_service(
            CHATSVC_SUMMARIES=setting, CHATSVC_MAX_CONTEXT_MESSAGES="6" if setting == "off" else "20"
        )
        with service.client() as client:
            for q in turns(5, start=1):
                say(client, q, sid=f"s-{setting}")
        assert summary_requests(fake) == []
        sent = chats(fake)[-1].body
        if setting == "on":  # fits: byte-for-byte the request of a service without summaries
            assert sent == {
                "model": "qwen-plus",
                "messages": [
                    {"role": "system", "content": SYSTEM},
                    *[{"role": r, "content": c} for r, c in [*history(turns(4)), ("user", "q5")]],
                ],
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        else:
            assert flat(sent["messages"][1:]) == [*history(["q2", "q3", "q4"]), ("user", "q5")]


def test_a_context_clear_deletes_the_summaries_before_it(long_service, fake):
    service = long_service
    replies(fake)
    with service.client() as client:
        for q in turns(4):
            say(client, q)
        wait_for(lambda: service.rows("SELECT * FROM summaries"))
        assert client.delete(f"{CONV}/s1/context").status_code in (200, 204)
        assert service.rows("SELECT * FROM summaries") == []
        say(client, "after")
        sent = chats(fake)[-1].body["messages"]
        assert flat(sent) == [("system", SYSTEM), ("user", "after")]


def test_a_first_token_never_waits_for_a_summary(long_service, fake):
    service = long_service
    held = threading.Event()
    replies(fake, hold=held)
    try:
        with service.client() as client:
            for q in turns(4):
                say(client, q)
            wait_for(lambda: summary_requests(fake))  # the summary call is held by the fake
            r = client.post(f"{API}/chat/s2/stream", json={"message": "meanwhile"})
            assert r.status_code == 200 and b'"answer to meanwhile"' in r.content
            assert say(client, "q5")["response"] == "answer to q5"  # the same conversation too
            assert service.rows("SELECT * FROM summaries") == []
            held.set()
            wait_for(lambda: service.rows("SELECT * FROM summaries"))
    finally:
        held.set()


def test_over_its_owners_limit_no_summary_is_made(make_service, fake, caplog):
    service = make_service(CHATSVC_SUMMARIES="on", CHATSVC_MAX_CONTEXT_MESSAGES="6", CHATSVC_LIMIT_TOKENS_PER_DAY="40")
    replies(fake)
    with caplog.at_level(logging.INFO, logger="chatsvc"), service.client() as client:
        for q in turns(4):
            say(client, q, max_tokens=10)
        wait_for(lambda: any("no summary of session s1" in r.getMessage() for r in caplog.records))
    assert summary_requests(fake) == [] and service.rows("SELECT * FROM summaries") == []


# ── the window, and a model's refusal for length ─────────────────────────────────────


def test_the_context_window_setting_is_read_and_checked():
    read = chatsvc.Settings.from_env(
        {"CHATSVC_CONTEXT_WINDOW": "qwen-plus=131072, qwen-turbo*=1000000, 8192"}, env_file=None
    )
    window = read.context_window
    assert (window.of("qwen-plus"), window.of("qwen-turbo-latest"), window.of("other")) == (131072, 1000000, 8192)
    assert read.context_budget("qwen-plus", None) == 131072 - 4096 - 131072 // 16
    assert read.context_budget("other", 1000) == 8192 - 1000 - 512
    both = chatsvc.Settings.from_env(
        {"CHATSVC_CONTEXT_WINDOW": "8192", "CHATSVC_MAX_CONTEXT_TOKENS": "3000"}, env_file=None
    )
    assert both.context_budget("qwen-plus", None) == 3000
    assert chatsvc.Settings.from_env({}, env_file=None).context_budget("qwen-plus", None) == 6000
    for bad, said in [
        ("lots", "'lots' is not a whole number of tokens nor model=tokens"),
        ("8192,4096", "give one bare number"),
        ("qwen-plus=12", "between 256 and 100000000"),
        ("q*x=4096", "at most a trailing *"),
    ]:
        with pytest.raises(ValueError, match="CHATSVC_CONTEXT_WINDOW") as error:
            chatsvc.Settings.from_env({"CHATSVC_CONTEXT_WINDOW": bad}, env_file=None)
        assert said in str(error.value)


@pytest.mark.parametrize("server", ["dashscope", "llama-server", "openai", "vllm", "litellm"])
def test_a_refusal_for_length_is_422_and_the_window_prevents_it(make_service, fake, server):
    fake.window, fake.overflow_server = 2048, server
    service = make_service(CHATSVC_SUMMARIES="on", CHATSVC_MAX_CONTEXT_TOKENS="50000")
    long = "word " * 1200  # ~1,500 tokens a message: two turns pass the fake's 2,048
    with service.client() as client:
        replies(fake)
        say(client, long)
        r = client.post(f"{API}/chat/s1", json={"message": long})
        assert r.status_code == 422 and r.json()["code"] == "context_too_long", r.text
        assert "CHATSVC_CONTEXT_WINDOW" in r.json()["detail"]
        row = service.rows("SELECT status, error_code FROM messages WHERE role = 'assistant' ORDER BY id DESC")[0]
        assert row == {"status": "failed", "error_code": "context_too_long"}
    fixed = make_service(CHATSVC_CONTEXT_WINDOW="2048", CHATSVC_RESERVE_OUTPUT_TOKENS="512", CHATSVC_SUMMARIES="off")
    with fixed.client() as client:
        r = client.post(f"{API}/chat/s1", json={"message": long, "max_tokens": 100})
        assert r.status_code == 200, r.text  # the window's budget sends only what fits
    assert overflow_replies()  # the bodies the fake sends are those tests/test_model_servers.py checks


# ── found in review (fix-sum) ─────────────────────────────────────────────────────────


def test_a_window_the_output_allowance_fills_is_a_setup_error_and_a_too_large_max_tokens_a_422(make_service, fake):
    # llama.cpp's 2,048-token window with the default CHATSVC_RESERVE_OUTPUT_TOKENS (4,096): no room at all
    for window in ("2048", "qwen-plus=2048,131072", "qwen-plus=131072,4096"):
        with pytest.raises(ValueError, match="CHATSVC_CONTEXT_WINDOW") as error:
            chatsvc.Settings.from_env({"CHATSVC_CONTEXT_WINDOW": window}, env_file=None)
        assert "CHATSVC_RESERVE_OUTPUT_TOKENS" in str(error.value)
    read = chatsvc.Settings.from_env(
        {"CHATSVC_CONTEXT_WINDOW": "2048", "CHATSVC_RESERVE_OUTPUT_TOKENS": "512"}, env_file=None
    )
    assert read.context_budget("qwen-plus", None) == 2048 - 512 - 128
    service = make_service(CHATSVC_CONTEXT_WINDOW="4096", CHATSVC_RESERVE_OUTPUT_TOKENS="1024")
    replies(fake)
    with service.client() as client:
        r = client.post(f"{API}/chat/s1", json={"message": "hi", "max_tokens": 4000})
        assert r.status_code == 422 and r.json()["code"] == "context_too_long", r.text
        detail = r.json()["detail"]
        assert "'max_tokens'" in detail and "4000" in detail and "CHATSVC_CONTEXT_WINDOW" in detail, detail
        assert fake.requests == []
        assert say(client, "hi", max_tokens=1000)["response"] == "answer to hi"


def test_an_answer_waiting_for_tool_results_is_never_summarised_away(make_service, fake):
    """An answer that called the app's tool and is over the kept share alone: the summary must not
    cover it, else the turn of its results is sent tool messages without the calls they answer."""
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    service = make_service(CHATSVC_SUMMARIES="on", CHATSVC_MAX_CONTEXT_TOKENS="1000")
    made = iter(f"SUMMARY-{n}" for n in range(1, 100))
    call = Reply.tool_calls([("get_weather", {"city": "Hangzhou"})], content=["Let me look it up. " + "word " * 700])

    def reply(seen) -> Reply:
        if is_summary(seen):
            return Reply.answer([next(made)])
        if seen.body["messages"][-1]["role"] == "tool":
            return Reply.answer(["Sunny."])
        if seen.body["messages"][-1]["content"] == "weather?":
            return call
        return Reply.answer([f"answer to {seen.body['messages'][-1]['content']}"])

    fake.default = reply
    with service.client() as client:
        say(client, "q1")
        waiting = say(client, "weather?", tools=[weather])
        assert waiting["finish_reason"] == "tool_calls"
        # the branch is over the trigger; whatever is summarised, it is not the answer that waits
        wait_for(lambda: service.rows("SELECT * FROM usage_calls WHERE purpose = 'summary' AND state = 'settled'"))
        covering = service.rows("SELECT message_id FROM summaries WHERE message_id >= ?", waiting["message_id"])
        assert covering == []
        results = [{"tool_call_id": call.calls[0]["id"], "content": "sunny"}]
        r = client.post(f"{API}/chat/s1", json={"tool_results": results, "tools": [weather]})
        assert r.status_code == 200 and r.json()["response"] == "Sunny.", r.text
        sent = chats(fake)[-1].body["messages"]
        assert [m["role"] for m in sent[-2:]] == ["assistant", "tool"] and sent[-2]["tool_calls"], sent


def test_a_summary_request_fits_the_summary_models_window_after_summaries_failed_a_while(make_service, fake):
    """Summaries failed for some turns (the branch grew past the context); once the model answers again,
    the summary's own request must fit the window, else it is refused for length on every turn after."""
    fake.window = 2048
    service = make_service(CHATSVC_SUMMARIES="on", CHATSVC_CONTEXT_WINDOW="2048", CHATSVC_RESERVE_OUTPUT_TOKENS="512",
                           CHATSVC_MAX_CONTEXT_MESSAGES="200")  # fmt: skip
    broken = threading.Event()
    broken.set()
    made = iter(f"SUMMARY-{n}" for n in range(1, 100))
    answered = []  # the summary requests the model answered, in order (a retry of a failed one may be the first)

    def reply(seen) -> Reply:
        if is_summary(seen):
            if broken.is_set():
                return Reply.error(500, "InternalError", "down")
            answered.append(seen)
            return Reply.answer([next(made)])
        return Reply.answer(["answer " + "word " * 120])

    fake.default = reply
    with service.client() as client:
        for n in range(12):
            say(client, f"q{n} " + "word " * 120)
            wait_for(lambda: not service.rows("SELECT 1 FROM usage_calls WHERE state = 'reserved'"))
        assert service.rows("SELECT * FROM summaries") == [] and summary_requests(fake)
        broken.clear()
        say(client, "q12 " + "word " * 120)
        wait_for(lambda: service.rows("SELECT 1 FROM summaries WHERE content = 'SUMMARY-1'"))
        # the request SUMMARY-1 answered (others may follow it in the background: not the last one sent)
        assert answered[0].body["messages"][1]["content"].startswith("Conversation:\nUser: q0 ")
        # what was left out of that request rolls on into the next summaries (made in the background
        # meanwhile): q13 is sent one of them, the newest stored when it was planned
        say(client, "q13")
        sent = chats(fake)[-1].body["messages"]
        assert re.search(r"SUMMARY-\d+", sent[0]["content"]) and sent[-1]["content"] == "q13"
