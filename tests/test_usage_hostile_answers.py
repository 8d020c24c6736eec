"""Issue 24's hostile review, answered: each test reproduces what a reviewer found (a reservation or a
running answer that leaked, a cost or a usage shown wrong, a refusal that misleads) and states what
must hold now. Through the store, the HTTP app and the fake DashScope, on SQLite and PostgreSQL;
the ones that kill or start processes are marked slow."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import datetime, timezone

import httpx2 as httpx
import pytest
from fake_dashscope import Reply, dashscope_usage
from live import LiveServer, SSEReader
from procs import ServerProcess
from support import EMPTY_POSTGRES, Service, pg, wait_for
from test_usage_accounting import PRICED, WEATHER, calls, ledger_agrees, micros

import chatsvc
from chatsvc import FinalState, Hold, Purpose, Source, Spent, Turn

API = "/api/v1"
USER = "X-Chat-User"


def run(database, body, limits=None, prices=None):
    async def go():
        store = chatsvc.Store(database, limits=limits, prices=prices)
        await store.open()
        try:
            return await body(store)
        finally:
            await store.close()

    return asyncio.run(go())


def new_turn(owner="alice", session="s", prompt=100, output=50) -> Turn:
    uid = chatsvc.new_message_id()
    aid = chatsvc.new_message_id(uid)
    turn = Turn(owner, session, aid, "qwen-plus", uid, "question", True, None)
    turn.hold = Hold(chatsvc.new_message_id(), owner, session, aid, Purpose.ANSWER, "qwen-plus", prompt, output)
    return turn


def reported(prompt, completion) -> Spent:
    return Spent(Source.REPORTED, prompt, completion, prompt + completion)


def final(call_id, spent, status="complete") -> FinalState:
    return FinalState(status, "an answer", None, "stop", None, None, None, 3, call_id=call_id, spent=spent)


async def books(store, owner="alice"):
    row = await store.db.fetch_one("SELECT * FROM usage_owners WHERE owner = :o", {"o": owner})
    reserved = await store.db.fetch_all(
        "SELECT id, message_id FROM usage_calls WHERE owner = :o AND state = 'reserved'", {"o": owner}
    )
    streaming = await store.db.fetch_all(
        "SELECT id FROM messages WHERE owner = :o AND status = 'streaming'", {"o": owner}
    )
    return row, reserved, streaming


# ── no reservation outlives its answer ──────────────────────────────────────────────


def test_the_sweep_racing_next_round_leaves_no_reservation(database):
    """The producer (alive, its heartbeat late) goes to its second round while another replica's sweep
    takes the answer for dead: the sweep reads the ledger again until none of its calls is reserved."""
    if database.startswith("sqlite"):
        pytest.skip("PostgreSQL: two transactions at once")

    async def body(store):
        turn = new_turn()
        await store.tree.begin_turn(turn)
        second = Hold(chatsvc.new_message_id(), "alice", "s", turn.answer_id, Purpose.TOOL_ROUND, "qwen-plus", 300, 50)
        inside, release = asyncio.Event(), asyncio.Event()
        admit = store.usage.admit

        async def admit_and_pause(h, enforce=True):
            limits = await admit(h, enforce)
            if h is second:  # next_round's transaction holds the settled round 1 and the reserved round 2
                inside.set()
                await release.wait()
            return limits

        store.usage.admit = admit_and_pause
        producer = asyncio.create_task(store.usage.next_round(turn.hold.call_id, reported(100, 10), second))
        await inside.wait()
        sweep = asyncio.create_task(store.answers.recover_interrupted(None))
        await asyncio.sleep(0.5)  # the sweep read the ledger and waits for round 1's row
        release.set()
        await producer
        swept = await sweep
        assert [r["id"] for r in swept] == [turn.answer_id]
        # the producer's own end then finds the row taken: its verdict stands
        assert not await store.answers.finish(turn.answer_id, final(second.call_id, reported(300, 20)))
        row, reserved, streaming = await books(store)
        assert (streaming, reserved) == ([], [])
        assert (row["running"], row["day_reserved"], row["month_reserved"]) == (0, 0, 0)
        [first, then] = await store.db.fetch_all("SELECT * FROM usage_calls ORDER BY id")
        assert (first["source"], first["total_tokens"], then["source"], then["outcome"]) == (
            "reported", 110, "none", "interrupted",
        )  # fmt: skip

    run(database, body)


def test_deleting_a_conversation_under_a_running_answer_leaves_no_reservation(database):
    """DELETE .../conversations/s while its answer runs (another replica's that did not end within
    Replicas.stop's wait, or one begun just after relay.stop found nothing): the delete settles the
    answer's calls first; the answer's own end, its row gone, settles nothing twice."""

    async def body(store):
        turn = new_turn()
        await store.tree.begin_turn(turn)
        await store.answers.checkpoint([chatsvc.Checkpoint(turn.answer_id, "so far", None, 2)])
        assert await store.conversations.delete("alice", "s")
        row, reserved, _ = await books(store)
        assert reserved == [] and (row["running"], row["day_reserved"]) == (0, 0)
        [call] = await store.db.fetch_all("SELECT * FROM usage_calls")
        assert (call["source"], call["prompt_tokens"], call["completion_tokens"]) == (
            "estimated", 100, chatsvc.estimate_tokens("so far"),
        )  # fmt: skip
        assert not await store.answers.finish(turn.answer_id, final(turn.hold.call_id, reported(100, 20)))
        assert await store.answers.recover_interrupted(None) == []
        assert (await books(store))[0] == row
        [again] = await store.db.fetch_all("SELECT * FROM usage_calls")
        assert again == call

    run(database, body)


def test_an_answer_whose_round_was_reserved_after_the_delete_settles_it_at_its_end(database):
    """The answer's end settles its calls still reserved even when its row is gone."""

    async def body(store):
        turn = new_turn()
        await store.tree.begin_turn(turn)
        store.answers.usage.settle_swept, real = (lambda rows: _nothing()), store.answers.usage.settle_swept
        assert await store.conversations.delete("alice", "s")  # as if its next round came after the delete
        store.answers.usage.settle_swept = real
        assert not await store.answers.finish(turn.answer_id, final(turn.hold.call_id, reported(100, 20)))
        row, reserved, _ = await books(store)
        assert reserved == [] and (row["running"], row["day_reserved"], row["day_tokens"]) == (0, 0, 120)

    run(database, body)


async def _nothing():
    return []


@pytest.mark.parametrize("own", ["reserved", "settled already"])
def test_an_answer_of_one_round_settles_its_other_calls_still_reserved_and_gives_its_answer_back_once(database, own):
    """An answer of one round (none carried) is settled without a read before it (the end's two hops
    on SQLite): a call of the answer still reserved that its round does not name (lost track of) is
    read in the same hop and settled with it, as the sweep estimates it; its running answer is given
    back once, by its own round's row, or by the other's when its own was settled already. A second
    answer stays running, so a running answer given back twice, or not at all, shows."""

    async def body(store):
        turn, running = new_turn(), new_turn(session="s2")
        await store.tree.begin_turn(turn)
        await store.tree.begin_turn(running)
        usage = store.answers.usage
        if own == "reserved":  # a reserved row of the answer's that no round names, and what it holds
            lost = chatsvc.new_message_id()
            await store.db.execute(
                "INSERT INTO usage_calls (id, owner, session_id, message_id, purpose, model, state, prompt_tokens,"
                " reserved_tokens, reserved_cost, day, month, created_at) SELECT :lost, owner, session_id, message_id,"
                " purpose, model, state, prompt_tokens, reserved_tokens, reserved_cost, day, month, created_at"
                " FROM usage_calls WHERE id = :id",
                {"lost": lost, "id": turn.hold.call_id},
            )
            await store.db.execute(
                "UPDATE usage_owners SET day_reserved = day_reserved + 150, month_reserved = month_reserved + 150"
                " WHERE owner = 'alice'"
            )
        else:  # its round settled and the next reserved, then the answer ends naming the first round
            nxt = Hold(chatsvc.new_message_id(), "alice", "s", turn.answer_id, Purpose.ANSWER, "qwen-plus", 100, 50)
            await usage.next_round(turn.hold.call_id, reported(100, 20), nxt)
            lost = nxt.call_id
        assert await store.answers.finish(turn.answer_id, final(turn.hold.call_id, reported(100, 20)))
        row, reserved, _ = await books(store)
        assert reserved == [{"id": running.hold.call_id, "message_id": running.answer_id}]
        assert (row["running"], row["day_reserved"], row["day_tokens"]) == (1, 150, 220)
        [other] = await store.db.fetch_all("SELECT * FROM usage_calls WHERE id = :id", {"id": lost})
        assert (other["state"], other["outcome"], other["source"], other["total_tokens"]) == (
            "settled", "complete", "estimated", 100,
        )  # fmt: skip

    run(database, body)


@pytest.mark.slow
def test_delete_after_a_replica_died_mid_answer_gives_the_reservation_back(postgres_database, fake, tmp_path):
    """A replica killed mid-answer, its conversation deleted on the survivor before the sweep took the
    answer for dead: with CHATSVC_LIMIT_CONCURRENT_ANSWERS=1 the user can start another answer."""
    pg(postgres_database, EMPTY_POSTGRES)
    service = Service(postgres_database, fake, CHATSVC_USER_HEADER=USER, CHATSVC_CHECKPOINT_SECONDS="0.1",
                      CHATSVC_UPSTREAM_IDLE_TIMEOUT="120", CHATSVC_LIMIT_CONCURRENT_ANSWERS="1")  # fmt: skip
    a, b = ServerProcess(service.env, tmp_path), ServerProcess(service.env, tmp_path)
    a.start()
    b.start()
    hold = threading.Event()
    fake.push(Reply.answer([f"w{i} " for i in range(8)], hold=hold, hold_at=6))
    try:
        with b.client() as client, client.stream("POST", f"{API}/chat/s1/stream", json={"message": "hi"},
                                                 headers={USER: "victim"}) as response:  # fmt: skip
            assert response.status_code == 200
            wait_for(lambda: service.rows("SELECT 1 FROM messages WHERE owner = 'victim' AND role = 'assistant'"
                                          " AND content <> ''"), 30)  # fmt: skip
            b.kill()
            with httpx.Client(base_url=a.url, timeout=60) as other:
                deleted = other.delete(f"{API}/context/conversations/s1", headers={USER: "victim"})
            assert deleted.status_code == 204, deleted.text
    finally:
        hold.set()
    calls_now = service.rows("SELECT state FROM usage_calls WHERE owner = 'victim'")
    row = service.rows("SELECT running, day_reserved FROM usage_owners WHERE owner = 'victim'")[0]
    fake.default = Reply.transcript("stream_usage.sse")
    with a.client() as client:
        again = client.post(f"{API}/chat/s2", json={"message": "hello again"}, headers={USER: "victim"})
    a.stop()
    assert (calls_now, row["running"], row["day_reserved"], again.status_code) == (
        [{"state": "settled"}], 0, 0, 200,
    ), (calls_now, row, again.text)  # fmt: skip


def test_an_ambiguous_commit_between_rounds_leaks_no_reservation(make_service, fake):
    """The write between two rounds commits but its caller sees a failure (the connection lost at
    COMMIT): the answer's end finds the first round's row settled and the second's reserved, and
    settles that one with the second round's use: each round counted once, nothing held."""
    service = make_service(CHATSVC_LIMIT_CONCURRENT_ANSWERS="1")
    fake.push(
        Reply.tool_calls([("nosuch", {})], usage=dashscope_usage(100, 10)),
        Reply.answer(["fine"], usage=dashscope_usage(200, 3)),
    )
    with service.client() as client:
        usage = client.app.state.relay.store.usage
        real = usage.next_round

        async def committed_then_failed(*args):
            await real(*args)
            raise chatsvc.StorageUnavailable("The connection was lost at COMMIT (test).")

        usage.next_round = committed_then_failed
        body = client.post(f"{API}/chat/s1", json={"message": "go", "tools": [WEATHER]}).json()
        assert body["response"] == "fine"
        usage.next_round = real
        r = client.post(f"{API}/chat/s2", json={"message": "hello"})  # the user's next answer
    assert r.status_code == 200, r.text
    first, second, _ = calls(service)
    assert (first["state"], first["total_tokens"], second["state"], second["total_tokens"]) == (
        "settled", 110, "settled", 203,
    )  # fmt: skip
    ledger_agrees(service)


@pytest.mark.parametrize("committed", [True, False])
def test_a_failed_write_between_rounds_then_a_good_one(make_service, fake, committed):
    """Three rounds; the write after the first fails (committed or rolled back), the one after the
    second succeeds: every round is counted once, in the rows that exist, and nothing stays held."""
    service = make_service()
    fake.push(
        Reply.tool_calls([("nosuch", {})], usage=dashscope_usage(100, 10)),
        Reply.tool_calls([("nosuch", {"again": 1})], usage=dashscope_usage(200, 20)),
        Reply.answer(["fine"], usage=dashscope_usage(300, 3)),
    )
    with service.client() as client:
        usage = client.app.state.relay.store.usage
        real, failed = usage.next_round, []

        async def once_failing(*args):
            if not failed:
                failed.append(args)
                if committed:
                    await real(*args)
                raise chatsvc.StorageUnavailable("The database is unreachable (test).")
            await real(*args)

        usage.next_round = once_failing
        body = client.post(f"{API}/chat/s1", json={"message": "go", "tools": [WEATHER]}).json()
        assert body["response"] == "fine"
    rows = calls(service)
    assert all(c["state"] == "settled" for c in rows)
    totals = [c["total_tokens"] for c in rows]
    assert totals == ([110, 220, 303] if committed else [330, 303])
    ledger_agrees(service)


# ── a swept answer: its cost on its message, its use in the metrics ──────────────────


def killed_and_swept(make_service, fake, tmp_path):
    service = make_service(CHATSVC_PRICES=PRICED, CHATSVC_CHECKPOINT_SECONDS="0.2", CHATSVC_HEARTBEAT_SECONDS="0.2")
    fake.push(Reply.answer(["one ", "two ", "three "], stall_at=4, stall=60))
    server = ServerProcess(service.env, tmp_path).start()
    with server.client() as client:
        reader = SSEReader(client, "POST", f"{API}/chat/s1/stream", json={"message": "count"})
        for _ in range(4):
            reader.next_event()
        wait_for(lambda: service.rows("SELECT content FROM messages WHERE role = 'assistant'")[0]["content"]
                 == "one two three ", 5)  # fmt: skip
        server.kill()
    server = ServerProcess(service.env, tmp_path).start()
    try:
        wait_for(lambda: calls(service)[0]["state"] == "settled", 10)
        with server.client() as client:
            message = client.get(f"{API}/context/conversations/s1/messages").json()["messages"][1]
            metrics = client.get("/metrics").text
    finally:
        server.stop()
    [call] = calls(service)
    assert call["source"] == "estimated" and call["cost_micros"] > 0 and message["status"] == "interrupted"
    return call, message, metrics


@pytest.mark.slow
def test_a_swept_answer_carries_its_cost_and_is_in_the_metrics(make_service, fake, tmp_path):
    call, message, metrics = killed_and_swept(make_service, fake, tmp_path)
    # CONTRACT: "Every answer's end event, the non-streaming reply and its stored message carry ... cost"
    assert (message.get("cost"), message.get("currency")) == (call["cost_micros"] / 1e6, "CNY")
    assert message.get("usage") is None  # the model service reported none: the ledger has the estimate
    cost = f'chatsvc_cost_total{{currency="CNY",model="qwen-plus"}} {call["cost_micros"] / 1e6}'
    assert cost in metrics, [line for line in metrics.splitlines() if "cost" in line]
    completion = f'chatsvc_tokens_estimated_total{{kind="completion",model="qwen-plus"}} {call["completion_tokens"]}.0'
    assert completion in metrics


def test_the_sweep_puts_the_cost_of_all_its_rounds_on_the_message(database):
    async def body(store):
        turn = new_turn(prompt=1000)
        await store.tree.begin_turn(turn)
        second = Hold(chatsvc.new_message_id(), "alice", "s", turn.answer_id, Purpose.TOOL_ROUND, "qwen-plus", 300, 50)
        first_spent = reported(1000, 10)
        first_spent.cost, first_spent.currency = 820, "CNY"
        await store.usage.next_round(turn.hold.call_id, first_spent, second)
        await store.answers.checkpoint([chatsvc.Checkpoint(turn.answer_id, "x" * 400, None, 2)])
        [swept] = await store.answers.recover_interrupted(None)
        [(model, used)] = swept["spent"]
        assert model == "qwen-plus" and used.source is Source.ESTIMATED
        row = await store.answers.get(turn.answer_id)
        assert (row["cost_micros"], row["currency"]) == (820 + used.cost, "CNY")
        assert (row["prompt_tokens"], row["total_tokens"]) == (None, None)  # not reported

    run(database, body, prices=chatsvc.Prices.parse(PRICED))


# ── an answer's usage: every round's, or none ────────────────────────────────────────


def test_an_answer_usage_is_not_one_round_of_two(make_service, fake):
    """A round that reported no usage (its use estimated in the ledger): the answer shows no usage
    rather than the other round's as if it were the whole; its cost counts both rounds."""
    service = make_service(CHATSVC_PRICES=PRICED)
    fake.push(
        Reply.tool_calls([("nosuch", {})], usage=dashscope_usage(100, 10)),
        Reply.answer(["a long enough final answer"], usage=False),  # complete, but no usage chunk
    )
    with service.client() as client:
        body = client.post(f"{API}/chat/s1", json={"message": "go", "tools": [WEATHER]}).json()
        message = client.get(f"{API}/context/conversations/s1/messages").json()["messages"][1]
    first, second = calls(service)
    assert (first["source"], second["source"]) == ("reported", "estimated")
    assert body["cost"] == (first["cost_micros"] + second["cost_micros"]) / 1e6
    assert "usage" not in body or body["usage"] is None, body
    assert message.get("usage") is None, message
    ledger_agrees(service)


def test_an_answer_of_two_reported_rounds_shows_both(make_service, fake):
    service = make_service(CHATSVC_PRICES=PRICED)
    fake.push(
        Reply.tool_calls([("nosuch", {})], usage=dashscope_usage(100, 10)),
        Reply.answer(["fine"], usage=dashscope_usage(200, 3)),
    )
    with service.client() as client:
        body = client.post(f"{API}/chat/s1", json={"message": "go", "tools": [WEATHER]}).json()
    assert body["usage"] == {"prompt_tokens": 300, "completion_tokens": 13, "total_tokens": 313}
    assert body["cost"] == micros((300, "0.8"), (13, "2")) / 1e6


# ── a limit of 0: no answer can start under it, and the refusal says so ──────────────


@pytest.mark.parametrize("own", [False, True], ids=["global", "admin"])
@pytest.mark.parametrize("kind", chatsvc.LIMIT_KINDS)
def test_a_limit_of_zero_does_not_ask_to_retry_soon(database, kind, own):
    """A limit of 0 refuses for good: the refusal names what sets it, and its Retry-After is long
    (a budget's: its window's reset; a rate's: a day), never 'in a second' or 'when one ends'."""

    async def body(store):
        if own:
            await store.usage.set_limits("alice", {kind: 0})
        with pytest.raises(chatsvc.OverLimit) as caught:
            await store.tree.begin_turn(new_turn())
        refusal = caught.value
        assert (refusal.limit, refusal.size, refusal.used) == (kind, 0, 0)
        assert "no answer can start under it" in refusal.detail, refusal.detail
        assert "when one of them ends" not in refusal.detail and "resets at" not in refusal.detail
        assert "PUT /api/v1/admin/users/{user}/limits" in refusal.detail
        assert (f"CHATSVC_LIMIT_{kind.upper()}" in refusal.detail) is not own, refusal.detail
        if kind in ("answers_per_minute", "concurrent_answers"):
            assert (refusal.resets_at, refusal.retry_after) == (None, 86400)
        else:
            reset = datetime.fromisoformat(refusal.resets_at.replace("Z", "+00:00"))
            left = (reset - datetime.now(timezone.utc)).total_seconds()
            assert abs(refusal.retry_after - max(left, 1)) < 5
        assert (await books(store))[1] == []

    run(database, body, limits=chatsvc.Limits() if own else chatsvc.Limits(**{kind: 0}))


def test_a_concurrent_limit_of_zero_is_a_429_with_a_long_retry_after(make_service, fake):
    service = make_service(CHATSVC_LIMIT_CONCURRENT_ANSWERS="0")
    with service.client() as client:
        r = client.post(f"{API}/chat/s1", json={"message": "hi"})
    assert (r.status_code, r.headers["Retry-After"], r.json()["code"]) == (429, "86400", "rate_limited")
    assert "CHATSVC_LIMIT_CONCURRENT_ANSWERS" in r.json()["detail"] and fake.requests == []


# ── max_tokens: a whole number a model takes ────────────────────────────────────────


@pytest.mark.parametrize("max_tokens", [2**31, 2**63, 10**30, 1e30])
def test_a_huge_max_tokens_is_a_422(make_service, fake, max_tokens):
    """A max_tokens past what any model takes overflowed the ledger's reservation (a BIGINT): a 5xx."""
    service = make_service(CHATSVC_LIMIT_TOKENS_PER_DAY="1000000")
    with service.client() as client:
        r = client.post(f"{API}/chat/s1", json={"message": "hi", "max_tokens": max_tokens})
        ok = client.post(f"{API}/chat/s2", json={"message": "hi", "max_tokens": 2**31 - 1})
    assert (r.status_code, r.json()["code"]) == (422, "invalid_request"), r.text
    assert r.json()["detail"] == "'max_tokens' must be a whole number from 1 to 2147483647."
    assert ok.status_code == 200 and fake.requests[-1].body["max_tokens"] == 2**31 - 1


# ── a title cut by shutdown ──────────────────────────────────────────────────────────


def test_a_title_cut_by_shutdown_is_still_recorded(make_service, fake):
    """The title's upstream call was made and streamed, then the service stopped: it is in the ledger,
    interrupted, estimated from what it received."""
    service = make_service(CHATSVC_TITLES="model", CHATSVC_SHUTDOWN_GRACE="0")
    fake.push(Reply.answer(["Once"]), Reply.answer(["A ", "Story ", "Title"], stall_at=2, stall=30))
    with LiveServer(service.settings) as live, live.client() as client:
        assert client.post(f"{API}/chat/s1", json={"message": "tell me a story"}).status_code == 200
        wait_for(lambda: len(fake.requests) == 2)  # the title call is under way and has streamed a chunk
        time.sleep(0.3)
    # the server stopped mid-title
    answer, title = calls(service)
    assert (answer["purpose"], title["purpose"], title["state"], title["outcome"]) == (
        "answer", "title", "settled", "interrupted",
    )  # fmt: skip
    assert (title["source"], title["completion_tokens"]) == ("estimated", chatsvc.estimate_tokens("A "))
    ledger_agrees(service)


# ── a budget's max_tokens and a small model's context ────────────────────────────────


def vllm(max_model_len: int):
    """A vLLM-like server: it refuses (400) a request whose prompt plus max_tokens exceeds its context,
    as vLLM's serving layer does; without max_tokens it answers (it writes up to the context's end)."""

    def reply(seen):
        prompt = chatsvc.sent_tokens(seen.body)  # stands in for the server's own count
        wanted = seen.body.get("max_tokens")
        if wanted is not None and prompt + wanted > max_model_len:
            return Reply.json(400, {"error": {"message": (
                f"This model's maximum context length is {max_model_len} tokens. However, you requested"
                f" {wanted} output tokens and your prompt contains at least {prompt} input tokens, for a total"
                f" of at least {prompt + wanted} tokens. Please reduce the length of the input prompt or the"
                " number of requested output tokens."), "type": "BadRequestError", "param": "input_tokens",
                "code": 400}})  # fmt: skip
        return Reply.answer(["fine"])

    return reply


@pytest.mark.parametrize("budget", [None, "100000000"])
@pytest.mark.parametrize("max_tokens", [None, 4096])
def test_a_budget_s_own_max_tokens_is_named_when_the_context_cannot_hold_it(make_service, fake, budget, max_tokens):
    """A budget sends max_tokens = CHATSVC_RESERVE_OUTPUT_TOKENS to every answer without one: a model
    with an 8K context then refuses a turn of 4K tokens, which answered before. The refusal names the
    setting (the context budget plus the reserve must fit the model), not only the context budget."""
    service = make_service(CHATSVC_LIMIT_TOKENS_PER_MONTH=budget)
    fake.default = vllm(8192)
    with service.client() as client:
        body = {"message": "word " * 3600} | ({} if max_tokens is None else {"max_tokens": max_tokens})
        r = client.post(f"{API}/chat/s1", json=body)
    if budget is None and max_tokens is None:
        assert r.status_code == 200, r.text
        return
    assert (r.status_code, r.json()["code"]) == (422, "context_too_long"), r.text
    named = "CHATSVC_RESERVE_OUTPUT_TOKENS" in r.json()["detail"]
    assert named is (max_tokens is None), r.json()["detail"]  # a max_tokens the request set is its own
    assert "CHATSVC_MAX_CONTEXT_TOKENS" in r.json()["detail"]


# ── a cost hold errs high ────────────────────────────────────────────────────────────


@pytest.mark.parametrize("thinking", [None, False])
def test_a_cost_hold_prices_the_output_at_the_thinking_rate(make_service, fake, thinking):
    """A model may think though the request did not ask it to (by default, or always): the hold prices
    its output at the higher rate, so an answer that thinks never costs more than it held."""
    service = make_service(CHATSVC_PRICES=PRICED, CHATSVC_LIMIT_COST_PER_MONTH="100")
    fake.push(Reply.answer(["fine"], reasoning=["so"], usage=dashscope_usage(40, 4)))
    request = {"message": "hi"} | ({} if thinking is None else {"enable_thinking": thinking})
    with service.client() as client:
        assert client.post(f"{API}/chat/s1", json=request).status_code == 200
    [call] = calls(service)
    prompt = chatsvc.sent_tokens(fake.requests[0].body)
    assert call["reserved_cost"] == micros((prompt, "0.8"), (4096, "8"))
    assert call["cost_micros"] == micros((40, "0.8"), (4, "8"))  # it thought: all its output at 8
