"""Usage accounting through an answer's life (docs/design/usage.md, part 2): one ledger row per
upstream call (an answer's rounds, a title), reserved before the call and settled after it with what
the model service reported (reasoning and cached tokens too) or chatsvc's estimate, marked so; its
cost to the micro with a price table; the answer's `end` event, reply and stored message carrying its
usage and cost; the owner's row always equal to the ledger's sums. Through the HTTP app and the fake
DashScope, on SQLite and PostgreSQL; a SIGKILLed process's answer settled by the next start (SQLite)
or the heartbeat's sweep (PostgreSQL)."""

from __future__ import annotations

import json
import math
from decimal import Decimal

import pytest
from fake_dashscope import Reply, dashscope_usage
from live import LiveServer, SSEReader, parse_events
from procs import ServerProcess
from support import wait_for

import chatsvc
from chatsvc import estimate_tokens, sent_tokens

API = "/api/v1"
PRICES = {
    "currency": "CNY",
    "models": {
        "qwen-plus": {"input": 0.8, "output": 2, "output_thinking": 8, "cached_input": 0.2},
        "qwen-flash": {"input": 0.15, "output": 1.5},
    },
}
PRICED = json.dumps(PRICES)
WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}
RESERVE = 4096  # CHATSVC_RESERVE_OUTPUT_TOKENS' default


def micros(*parts: tuple[int, str]) -> int:
    """Tokens at prices per million (so: micros), added, rounded up once."""
    return math.ceil(sum(tokens * Decimal(price) for tokens, price in parts))


def calls(service) -> list[dict]:
    return service.rows("SELECT * FROM usage_calls ORDER BY id")


def answer_ids(service) -> list[str]:
    return [row["id"] for row in service.rows("SELECT id FROM messages WHERE role = 'assistant' ORDER BY id")]


def ledger_agrees(service) -> None:
    """Each owner's row equals what the ledger holds: its window's settled tokens and cost, what its
    reserved calls hold, and its running answers."""
    every = calls(service)
    for owner in service.rows("SELECT * FROM usage_owners"):
        mine = [c for c in every if c["owner"] == owner["owner"]]
        settled = [c for c in mine if c["state"] == "settled"]
        reserved = [c for c in mine if c["state"] == "reserved"]
        assert owner["day_tokens"] == sum(c["total_tokens"] for c in settled if c["day"] == owner["day"])
        assert owner["month_tokens"] == sum(c["total_tokens"] for c in settled if c["month"] == owner["month"])
        assert owner["month_cost"] == sum(c["cost_micros"] or 0 for c in settled if c["month"] == owner["month"])
        assert owner["day_reserved"] == sum(c["reserved_tokens"] for c in reserved if c["day"] == owner["day"])
        assert owner["month_reserved"] == sum(c["reserved_tokens"] for c in reserved)
        assert owner["month_reserved_cost"] == sum(c["reserved_cost"] for c in reserved)
        streaming = service.rows(
            "SELECT COUNT(*) AS n FROM messages WHERE owner = ? AND status = 'streaming'", owner["owner"]
        )[0]["n"]
        assert owner["running"] == streaming
        for call in settled:
            assert (
                call["total_tokens"] == call["prompt_tokens"] + call["completion_tokens"]
                or call["source"] == "reported"
            )


def settled_as(call: dict, **expected) -> None:
    assert call["state"] == "settled" and call["settled_at"] is not None
    assert {k: call[k] for k in expected} == expected


def messages_of(client, session_id="s1") -> list[dict]:
    return client.get(f"{API}/context/conversations/{session_id}/messages").json()["messages"]


# ── what the model service reports ──────────────────────────────────────────────────


def test_sane_usage_keeps_the_details_dashscope_sends():
    usage = dashscope_usage(29719, 435, reasoning=382, cached=0, cache_creation=29713)
    assert chatsvc.sane_usage(usage) == {
        "prompt_tokens": 29719, "completion_tokens": 435, "total_tokens": 30154,
        "reasoning_tokens": 382, "cached_tokens": 0, "cache_creation_tokens": 29713,
    }  # fmt: skip
    assert chatsvc.sane_usage(dashscope_usage(3019, 104, cached=2048)) == {
        "prompt_tokens": 3019, "completion_tokens": 104, "total_tokens": 3123, "cached_tokens": 2048,
    }  # fmt: skip
    assert chatsvc.sane_usage(dashscope_usage(10, 2, cached=7, top_level_cached=True))["cached_tokens"] == 7
    # a plain usage has no details; a bad detail is dropped, the rest kept
    assert chatsvc.sane_usage({"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}) == {
        "prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3,
    }  # fmt: skip
    odd = {"prompt_tokens": 1, "completion_tokens_details": {"reasoning_tokens": -1}, "prompt_tokens_details": "x"}
    assert chatsvc.sane_usage(odd) == {"prompt_tokens": 1}
    # rounds add up, details too
    one, two = chatsvc.sane_usage(dashscope_usage(10, 5, reasoning=3)), chatsvc.sane_usage(dashscope_usage(20, 1))
    assert chatsvc.added_usage(one, two) == {
        "prompt_tokens": 30, "completion_tokens": 6, "total_tokens": 36, "reasoning_tokens": 3,
    }  # fmt: skip


# ── an answer's rows: complete, stopped, failed ─────────────────────────────────────


def test_a_complete_answer_is_one_reported_row_with_its_reasoning_cached_tokens_and_cost(make_service, fake):
    service = make_service(CHATSVC_PRICES=PRICED)
    fake.push(Reply.answer(["Hel", "lo"], reasoning=["Let me ", "think."], usage=dashscope_usage(3019, 104,
              reasoning=60, cached=2048)))  # fmt: skip
    # thinking: every output token at 8; 971 prompt tokens at 0.8, 2048 cached at 0.2
    cost = micros((971, "0.8"), (2048, "0.2"), (104, "8"))
    assert cost == 2019
    shown = {"prompt_tokens": 3019, "completion_tokens": 104, "total_tokens": 3123, "reasoning_tokens": 60,
             "cached_tokens": 2048}  # fmt: skip
    with service.client() as client:
        events = parse_events(client.post(f"{API}/chat/s1/stream", json={"message": "hi"}).content)
        end = events[-1]
        assert end["type"] == "end" and end["data"]["usage"] == shown
        assert end["data"]["cost"] == 0.002019 and end["data"]["currency"] == "CNY"
        message = messages_of(client)[1]
        assert message["usage"] == shown and (message["cost"], message["currency"]) == (0.002019, "CNY")
        # the channel's replay of a stored answer says the same
        mid = end["data"]["message_id"]
        with LiveServer(service.settings) as live:
            reader = live.reader("GET", f"{API}/chat/s1/stream", headers={"Last-Event-ID": f"{mid}:1"})
            assert reader.until_end()[-1]["data"] == end["data"]
        metrics = client.get("/metrics").text
    assert 'chatsvc_cost_total{currency="CNY",model="qwen-plus"} 0.002019' in metrics
    assert 'chatsvc_tokens_total{kind="reasoning",model="qwen-plus"} 60.0' in metrics
    assert 'chatsvc_tokens_total{kind="cached",model="qwen-plus"} 2048.0' in metrics
    [call] = calls(service)
    settled_as(
        call, owner="", session_id="s1", message_id=mid, purpose="answer", model="qwen-plus", outcome="complete",
        source="reported", prompt_tokens=3019, completion_tokens=104, total_tokens=3123, reasoning_tokens=60,
        cached_tokens=2048, cache_creation_tokens=None, cost_micros=cost, currency="CNY",
    )  # fmt: skip
    assert call["reserved_tokens"] == sent_tokens(fake.requests[0].body) + RESERVE
    stored = service.rows(
        "SELECT reasoning_tokens, cached_tokens, cost_micros, currency FROM messages WHERE id = ?", mid
    )
    assert stored == [{"reasoning_tokens": 60, "cached_tokens": 2048, "cost_micros": cost, "currency": "CNY"}]
    ledger_agrees(service)


def test_reasoning_tokens_alone_price_the_call_as_thinking_and_cache_creation_is_kept(make_service, fake):
    service = make_service(CHATSVC_PRICES=PRICED, CHATSVC_USER_HEADER="X-User")
    # design 1.1's explicit cache creation, thinking on (no reasoning text relayed here)
    fake.push(Reply.answer(["ok"], usage=dashscope_usage(29719, 435, reasoning=382, cached=0, cache_creation=29713)))
    cost = micros((29719, "0.8"), (435, "8"))  # creation tokens at the input price (no price for it yet)
    with service.client() as client:
        body = client.post(f"{API}/chat/s1", json={"message": "hi"}, headers={"X-User": "alice"}).json()
    assert body["usage"] == {"prompt_tokens": 29719, "completion_tokens": 435, "total_tokens": 30154,
                             "reasoning_tokens": 382, "cached_tokens": 0}  # fmt: skip
    assert body["cost"] == cost / 1e6 and body["currency"] == "CNY"
    [call] = calls(service)
    settled_as(call, owner="alice", source="reported", cache_creation_tokens=29713, cached_tokens=0, cost_micros=cost)
    owner = service.rows("SELECT * FROM usage_owners")[0]
    assert (owner["owner"], owner["day_tokens"], owner["month_cost"], owner["running"]) == ("alice", 30154, cost, 0)
    ledger_agrees(service)


def test_a_stopped_answer_is_estimated_from_what_it_received(make_service, fake):
    service = make_service(CHATSVC_PRICES=PRICED)
    fake.push(Reply.answer([f"s{i} " for i in range(200)], pause=0.02))
    with LiveServer(service.settings) as live, live.client() as client:
        reader = live.reader("POST", f"{API}/chat/s1/stream", json={"message": "count for me"})
        for _ in range(6):
            reader.next_event()
        assert client.post(f"{API}/chat/s1/stop").json()["stopped"] is True
        end = reader.until_end()[-1]
        message = messages_of(client)[1]
    text = service.rows("SELECT content FROM messages WHERE role = 'assistant'")[0]["content"]
    assert end["data"]["full_text"] == text and end["data"]["finish_reason"] == "stopped"
    prompt, completion = sent_tokens(fake.requests[0].body), estimate_tokens(text)
    cost = micros((prompt, "0.8"), (completion, "2"))
    assert "usage" not in end["data"] and end["data"]["cost"] == cost / 1e6  # usage: only when reported
    assert message["usage"] is None and message["cost"] == cost / 1e6
    [call] = calls(service)
    settled_as(
        call,
        outcome="stopped",
        source="estimated",
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        reasoning_tokens=None,
        cached_tokens=None,
        cost_micros=cost,
    )
    ledger_agrees(service)


def test_an_answer_failed_before_any_chunk_spent_nothing(make_service, fake):
    service = make_service(CHATSVC_PRICES=PRICED)
    fake.push(Reply.error(400, "invalid_parameter_error", "bad request"))
    with service.client() as client:
        r = client.post(f"{API}/chat/s1", json={"message": "hi"})
        assert r.status_code == 502
        message = messages_of(client)[1]
    assert message["status"] == "failed" and message["cost"] == 0
    [call] = calls(service)
    settled_as(
        call, outcome="failed", source="none", prompt_tokens=0, completion_tokens=0, total_tokens=0, cost_micros=0
    )
    ledger_agrees(service)


def test_an_answer_cut_mid_stream_is_estimated(make_service, fake):
    service = make_service(CHATSVC_PRICES=PRICED)
    fake.push(
        Reply.answer(["Once upon", " a time"], reasoning=["Hmm."], finish=None, usage=False, done=False, cut=True)
    )
    with service.client() as client:
        r = client.post(f"{API}/chat/s1", json={"message": "a story"})
        assert r.status_code == 502 and r.json()["partial_text"] == "Once upon a time"
    prompt, completion = sent_tokens(fake.requests[0].body), estimate_tokens("Once upon a timeHmm.")
    [call] = calls(service)
    settled_as(
        call,
        outcome="failed",
        source="estimated",
        prompt_tokens=prompt,
        completion_tokens=completion,
        cost_micros=micros((prompt, "0.8"), (completion, "8")),
    )  # reasoning came: thinking
    ledger_agrees(service)


def test_a_retried_call_counts_its_last_attempt(make_service, fake):
    service = make_service(CHATSVC_PRICES=PRICED, CHATSVC_UPSTREAM_RETRIES="1")
    fake.push(
        Reply.error(503, "ModelUnavailable", "busy", retry_after="0"),
        Reply.answer(["ok"], usage=dashscope_usage(30, 2)),
    )
    with service.client() as client:
        assert client.post(f"{API}/chat/s1", json={"message": "hi"}).status_code == 200
    [call] = calls(service)
    settled_as(
        call, source="reported", prompt_tokens=30, completion_tokens=2, cost_micros=micros((30, "0.8"), (2, "2"))
    )
    ledger_agrees(service)


# ── rounds, titles ──────────────────────────────────────────────────────────────────


def test_each_model_round_of_an_answer_is_its_own_row(make_service, fake):
    service = make_service(CHATSVC_PRICES=PRICED)
    one, two = dashscope_usage(1000, 50, cached=512), dashscope_usage(1100, 5)
    # an unknown tool is an error result the model sees: a second round
    fake.push(Reply.tool_calls([("nosuch", {"q": 1})], usage=one), Reply.answer(["ok"], usage=two))
    with service.client() as client:
        body = client.post(f"{API}/chat/s1", json={"message": "go", "tools": [WEATHER]}).json()
        message = messages_of(client)[1]
    costs = micros((488, "0.8"), (512, "0.2"), (50, "2")), micros((1100, "0.8"), (5, "2"))
    assert body["usage"] == {"prompt_tokens": 2100, "completion_tokens": 55, "total_tokens": 2155, "cached_tokens": 512}
    assert body["cost"] == message["cost"] == sum(costs) / 1e6 and message["usage"] == body["usage"]
    first, second = calls(service)
    settled_as(
        first,
        purpose="answer",
        message_id=body["message_id"],
        outcome="complete",
        source="reported",
        prompt_tokens=1000,
        cached_tokens=512,
        cost_micros=costs[0],
    )
    settled_as(
        second,
        purpose="tool_round",
        message_id=body["message_id"],
        outcome="complete",
        source="reported",
        prompt_tokens=1100,
        cost_micros=costs[1],
    )
    # each reserved what its own request sent (the second: the first's calls and results too)
    assert first["reserved_tokens"] == sent_tokens(fake.requests[0].body) + RESERVE
    assert second["reserved_tokens"] == sent_tokens(fake.requests[1].body) + RESERVE
    assert second["reserved_tokens"] > first["reserved_tokens"]
    ledger_agrees(service)


def test_a_round_failing_after_a_reported_one_is_estimated_on_its_own(make_service, fake):
    service = make_service(CHATSVC_PRICES=PRICED)
    fake.push(
        Reply.tool_calls([("nosuch", {})], usage=dashscope_usage(100, 10)),
        Reply.answer(["half an"], finish=None, usage=False, done=False, cut=True),
    )
    with service.client() as client:
        assert client.post(f"{API}/chat/s1", json={"message": "go", "tools": [WEATHER]}).status_code == 502
    first, second = calls(service)
    settled_as(first, purpose="answer", source="reported", total_tokens=110)
    prompt, completion = sent_tokens(fake.requests[1].body), estimate_tokens("half an")
    settled_as(
        second,
        purpose="tool_round",
        outcome="failed",
        source="estimated",
        prompt_tokens=prompt,
        completion_tokens=completion,
    )
    ledger_agrees(service)


def test_a_ledger_failure_between_rounds_loses_neither_the_answer_nor_its_tokens(make_service, fake):
    service = make_service()
    fake.push(
        Reply.tool_calls([("nosuch", {})], usage=dashscope_usage(100, 10)),
        Reply.answer(["fine"], usage=dashscope_usage(200, 3)),
    )
    with service.client() as client:
        usage = client.app.state.relay.store.usage

        async def failing(*_):
            raise chatsvc.StorageUnavailable("The database is unreachable (test).")

        usage.next_round = failing
        body = client.post(f"{API}/chat/s1", json={"message": "go", "tools": [WEATHER]}).json()
        assert body["response"] == "fine"
    # the first round's row is settled at the end with both rounds' use
    [call] = calls(service)
    settled_as(
        call,
        purpose="answer",
        outcome="complete",
        source="reported",
        prompt_tokens=300,
        completion_tokens=13,
        total_tokens=313,
        cost_micros=None,
        currency=None,
    )
    ledger_agrees(service)


def test_a_title_is_a_row_of_its_own(make_service, fake):
    service = make_service(CHATSVC_PRICES=PRICED, CHATSVC_TITLES="model", CHATSVC_TITLE_MODEL="qwen-flash")
    fake.push(Reply.answer(["Once"]), Reply.answer(["A Story"], usage=dashscope_usage(30, 5)))
    with service.client() as client:
        client.post(f"{API}/chat/s1", json={"message": "tell me a story"})
        wait_for(lambda: len(calls(service)) == 2 and calls(service)[1]["state"] == "settled")
        fake.push(Reply.answer(["Twice"]), Reply.error(400, "invalid_parameter_error", "no"))
        client.post(f"{API}/chat/s2", json={"message": "another"})
        wait_for(lambda: len(calls(service)) == 4)
        metrics = client.get("/metrics").text
    answer, title, _, failed = calls(service)
    settled_as(answer, purpose="answer", model="qwen-plus")
    settled_as(
        title,
        purpose="title",
        session_id="s1",
        message_id=None,
        model="qwen-flash",
        outcome="complete",
        source="reported",
        prompt_tokens=30,
        completion_tokens=5,
        total_tokens=35,
        cost_micros=micros((30, "0.15"), (5, "1.5")),
        currency="CNY",
        reserved_tokens=title["reserved_tokens"],
    )
    assert title["reserved_tokens"] == sent_tokens(fake.requests[1].body) + 40  # its max_tokens
    settled_as(failed, purpose="title", session_id="s2", outcome="failed", source="none", total_tokens=0)
    assert 'chatsvc_tokens_total{kind="title_prompt",model="qwen-flash"} 30.0' in metrics
    ledger_agrees(service)


# ── prices and limits on the answer ────────────────────────────────────────────────


@pytest.mark.parametrize(
    "prices", [None, json.dumps({"currency": "USD", "models": {"qwen-max": {"input": 1, "output": 1}}})]
)
def test_without_prices_or_a_price_for_the_model_there_is_no_cost(make_service, fake, prices):
    service = make_service(CHATSVC_PRICES=prices)
    with service.client() as client:
        end = parse_events(client.post(f"{API}/chat/s1/stream", json={"message": "hi"}).content)[-1]
        assert end["data"]["usage"] == {"prompt_tokens": 22, "completion_tokens": 17, "total_tokens": 39}
        assert "cost" not in end["data"] and "currency" not in end["data"]
        message = messages_of(client)[1]
        assert "cost" not in message and "currency" not in message
        assert "cost" not in client.post(f"{API}/chat/s1", json={"message": "again"}).json()
    assert [(c["source"], c["total_tokens"], c["cost_micros"], c["currency"]) for c in calls(service)] == [
        ("reported", 39, None, None)
    ] * 2
    ledger_agrees(service)


def test_under_a_budget_a_request_without_max_tokens_is_sent_the_reserve(make_service, fake):
    service = make_service(CHATSVC_LIMIT_TOKENS_PER_MONTH="1000000", CHATSVC_RESERVE_OUTPUT_TOKENS="300")
    with service.client() as client:
        client.post(f"{API}/chat/s1", json={"message": "hi"})
        client.post(f"{API}/chat/s2", json={"message": "hi", "max_tokens": 50})
    assert [r.body.get("max_tokens") for r in fake.requests] == [300, 50]
    first, second = calls(service)
    assert first["reserved_tokens"] == sent_tokens(fake.requests[0].body) + 300
    assert second["reserved_tokens"] == sent_tokens(fake.requests[1].body) + 50
    ledger_agrees(service)
    # no budget (a rate limit is none): the request is sent as asked
    fake.requests.clear()
    with make_service(CHATSVC_LIMIT_ANSWERS_PER_MINUTE="100").client() as client:
        client.post(f"{API}/chat/s3", json={"message": "hi"})
    assert "max_tokens" not in fake.requests[0].body


def test_a_refused_turn_stores_nothing_calls_nothing_and_is_counted(make_service, fake):
    service = make_service(CHATSVC_LIMIT_TOKENS_PER_DAY="0")
    with service.client() as client:
        r = client.post(f"{API}/chat/s1", json={"message": "hi"})
        assert r.status_code == 429 and r.json()["code"] == "quota_exceeded", r.text
        r = client.post(f"{API}/chat/s1/stream", json={"message": "hi"})
        assert r.status_code == 429
        metrics = client.get("/metrics").text
    assert 'chatsvc_limit_refusals_total{limit="tokens_per_day"} 2.0' in metrics
    assert fake.requests == [] and calls(service) == []
    assert service.rows("SELECT id FROM messages") == [] and service.rows("SELECT session_id FROM conversations") == []


def test_export_still_writes_the_three_counts(make_service, fake):
    service = make_service(CHATSVC_PRICES=PRICED)
    fake.push(Reply.answer(["ok"], reasoning=["hm"], usage=dashscope_usage(10, 4, reasoning=2, cached=8)))
    with service.client() as client:
        client.post(f"{API}/chat/s1", json={"message": "hi"})
        exported = client.get(f"{API}/context/conversations/s1/export").json()
        [answer] = [m for m in find_messages(exported) if m["role"] == "assistant"]
        assert answer["usage"] == {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14}
        assert "cost" not in answer
        # a fork copies the message as it is (its usage and cost shown again, not spent again)
        original = messages_of(client)[1]
        r = client.post(f"{API}/context/conversations/s1/fork", json={"message_id": original["id"], "session_id": "s2"})
        assert r.status_code == 201, r.text
        copy = messages_of(client, "s2")[1]
        assert (copy["usage"], copy["cost"], copy["currency"]) == (original["usage"], original["cost"], "CNY")
    assert len(calls(service)) == 1


# ── a process killed mid-answer ────────────────────────────────────────────────────


def test_an_answer_cut_by_sigkill_is_settled_as_estimated_by_the_next_process(make_service, fake, tmp_path):
    service = make_service(CHATSVC_PRICES=PRICED, CHATSVC_CHECKPOINT_SECONDS="0.2", CHATSVC_HEARTBEAT_SECONDS="0.2")
    fake.push(Reply.answer(["one ", "two ", "three "], reasoning=["so"], stall_at=5, stall=60))
    server = ServerProcess(service.env, tmp_path).start()
    with server.client() as client:
        reader = SSEReader(client, "POST", f"{API}/chat/s1/stream", json={"message": "count"})
        for _ in range(5):
            reader.next_event()
        wait_for(lambda: service.rows("SELECT content FROM messages WHERE role = 'assistant'")[0]["content"]
                 == "one two three ", 5)  # fmt: skip
        server.kill()
    [call] = calls(service)
    assert call["state"] == "reserved" and call["prompt_tokens"] == sent_tokens(fake.requests[0].body)
    owner = service.rows("SELECT running, day_reserved FROM usage_owners")[0]
    assert owner == {"running": 1, "day_reserved": call["reserved_tokens"]}
    server = ServerProcess(service.env, tmp_path).start()  # SQLite: at its start; PostgreSQL: its heartbeat's sweep
    try:
        wait_for(lambda: calls(service)[0]["state"] == "settled", 10)
    finally:
        server.stop()
    prompt, completion = call["prompt_tokens"], estimate_tokens("one two three so")
    settled_as(
        calls(service)[0],
        outcome="interrupted",
        source="estimated",
        prompt_tokens=prompt,
        completion_tokens=completion,
        cost_micros=micros((prompt, "0.8"), (completion, "8")),
    )
    assert service.rows("SELECT status FROM messages WHERE role = 'assistant'") == [{"status": "interrupted"}]
    ledger_agrees(service)


@pytest.mark.parametrize("rounds", [1, 2])
def test_an_answer_interrupted_by_shutdown_is_settled_by_its_own_final_write(make_service, fake, rounds):
    service = make_service(CHATSVC_SHUTDOWN_GRACE="0")
    replies = [Reply.tool_calls([("nosuch", {})], usage=dashscope_usage(100, 10))] if rounds == 2 else []
    fake.push(*replies, Reply.answer([f"w{i} " for i in range(300)], pause=0.02))
    with LiveServer(service.settings) as live:
        reader = live.reader("POST", f"{API}/chat/s1/stream", json={"message": "go", "tools": [WEATHER]})
        while sum(e["type"] == "chunk" for e in reader.events) < 3:
            reader.next_event()
    # the server stopped: the answer was interrupted, and stored
    wait_for(lambda: all(c["state"] == "settled" for c in calls(service)), 5)
    *earlier, last = calls(service)
    assert [c["source"] for c in earlier] == ["reported"] * (rounds - 1)
    text = service.rows("SELECT content FROM messages WHERE role = 'assistant'")[0]["content"]
    settled_as(
        last,
        outcome="interrupted",
        source="estimated",
        prompt_tokens=sent_tokens(fake.requests[-1].body),
        completion_tokens=estimate_tokens(text),
    )
    ledger_agrees(service)


def find_messages(exported: dict) -> list[dict]:
    """The messages of an export, wherever its version puts them."""
    if isinstance(exported.get("messages"), list):
        return exported["messages"]
    return next(find_messages(v) for v in exported.values() if isinstance(v, dict) and find_messages(v) is not None)


def test_a_final_write_retried_after_storage_failed_settles_its_call_once(make_service, fake):
    """The settlement is in the final write's transaction: a failure rolls both back, the retry writes both."""
    service = make_service(CHATSVC_PRICES=PRICED, CHATSVC_STORAGE_TIMEOUT="0.3")
    fake.push(Reply.answer(["fine"], usage=dashscope_usage(40, 4)))
    with service.client() as client:
        usage = client.app.state.relay.store.usage
        settle, failures = usage.settle_answer, []

        async def failing(*args, **kw):
            if len(failures) < 3:
                failures.append(args)
                raise chatsvc.StorageUnavailable("The database is unreachable (test).")
            await settle(*args, **kw)

        usage.settle_answer = failing
        r = client.post(f"{API}/chat/s1", json={"message": "hi"})
        assert r.status_code == 503 and r.json()["code"] == "storage_failed", r.text
        assert service.rows("SELECT status FROM messages WHERE role = 'assistant'") == [{"status": "streaming"}]
        wait_for(lambda: calls(service)[0]["state"] == "settled", 15)
        message = messages_of(client)[1]
    assert len(failures) == 3 and message["status"] == "complete"
    cost = micros((40, "0.8"), (4, "2"))
    assert message["cost"] == cost / 1e6
    [call] = calls(service)
    settled_as(call, outcome="complete", source="reported", total_tokens=44, cost_micros=cost)
    ledger_agrees(service)
