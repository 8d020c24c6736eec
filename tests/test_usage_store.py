"""The usage ledger and the owners' windows (schema step 6) through the store's API (`Store.usage`),
on SQLite and PostgreSQL: admission and settlement arithmetic, each limit at its edge, windows that
reset by the database's clock, the answers-per-minute bucket, unenforced rounds, the sweep's
estimates, titles, an admin's limits and resets, where an owner stands, reports and their pages,
their query plans, and the race of many admissions from two processes for the last of a budget."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import time

import pytest

import chatsvc
from chatsvc import Hold, Limits, OverLimit, Purpose, Source, Spent

ANSWER, TOOL_ROUND, TITLE = Purpose.ANSWER, Purpose.TOOL_ROUND, Purpose.TITLE


class FlatPrices:
    """A stand-in price table: a micro per prompt token, two per output token (eight when it thought)."""

    currency = "CNY"

    def cost(self, model: str, spent: Spent, thinking: bool) -> int | None:
        if model == "unpriced":
            return None
        return spent.prompt_tokens + spent.completion_tokens * (8 if thinking else 2)


def run(database: str, body, limits: Limits | None = None, prices=None):
    """`body(store)` on a store of the test's database, opened and closed on a loop of its own."""

    async def go():
        store = chatsvc.Store(database, limits=limits, prices=prices)
        await store.open()
        try:
            return await body(store)
        finally:
            await store.close()

    return asyncio.run(go())


def hold(owner="alice", purpose=ANSWER, prompt=100, output=50, cost=0, message_id=None, session="s", model="qwen-plus"):
    if message_id is None and purpose is not TITLE:
        message_id = chatsvc.new_message_id()
    return Hold(chatsvc.new_message_id(), owner, session, message_id, purpose, model, prompt, output, cost)


def reported(prompt: int, completion: int, **more) -> Spent:
    return Spent(Source.REPORTED, prompt, completion, prompt + completion, **more)


async def admit(store, h: Hold, enforce: bool = True) -> Limits:
    """An admission as begin_turn makes it: inside a transaction of its own."""
    async with store.db.transaction():
        return await store.usage.admit(h, enforce)


async def refused(store, h: Hold) -> OverLimit:
    before = await ledger(store)
    with pytest.raises(OverLimit) as caught:
        await admit(store, h)
    assert await ledger(store) == before  # nothing written
    return caught.value


async def settle(store, call_id: str, spent: Spent, outcome: str = "complete", ends: bool = True) -> None:
    async with store.db.transaction():
        await store.usage.settle(call_id, spent, outcome, ends)


async def owner(store, name: str = "alice") -> dict:
    return await store.db.fetch_one("SELECT * FROM usage_owners WHERE owner = :o", {"o": name})


async def call(store, call_id: str) -> dict:
    return await store.db.fetch_one("SELECT * FROM usage_calls WHERE id = :id", {"id": call_id})


async def ledger(store) -> tuple[list[dict], list[dict]]:
    return (
        await store.db.fetch_all("SELECT * FROM usage_owners ORDER BY owner"),
        await store.db.fetch_all("SELECT * FROM usage_calls ORDER BY id"),
    )


async def set_row(store, name: str = "alice", **columns) -> None:
    """Set columns of an owner's row, as a window left behind by time would (no clock is moved)."""
    sets = ", ".join(f"{column} = :{column}" for column in columns)
    await store.db.execute(f"UPDATE usage_owners SET {sets} WHERE owner = :o", {**columns, "o": name})


async def clock(store) -> dict:
    """The database's day, month and epoch seconds, as the ledger reads them."""
    u = store.usage
    return await store.db.fetch_one(f"SELECT {u._today} AS day, {u._month} AS month, {u._epoch} AS now")


def test_admission_reserves_and_settlement_counts(database):
    async def body(store):
        h = hold(prompt=100, output=50)
        assert await admit(store, h) == Limits()
        now = await clock(store)
        row = await owner(store)
        assert (row["day"], row["month"]) == (now["day"], now["month"])
        assert (row["day_tokens"], row["day_reserved"], row["month_tokens"], row["month_reserved"]) == (0, 150, 0, 150)
        assert (row["running"], row["bucket"], row["bucket_at"]) == (1, None, None)  # no bucket without its limit
        c = await call(store, h.call_id)
        assert (c["state"], c["purpose"], c["prompt_tokens"], c["reserved_tokens"], c["completion_tokens"]) == (
            "reserved", "answer", 100, 150, None,
        )  # fmt: skip
        assert (c["day"], c["month"], c["owner"], c["session_id"], c["message_id"]) == (
            now["day"], now["month"], "alice", "s", h.message_id,
        )  # fmt: skip
        assert c["created_at"][:10] == now["day"] and c["created_at"].endswith("Z") and len(c["created_at"]) == 24
        # a second answer of the same owner, at once
        other = hold(prompt=10, output=20)
        await admit(store, other)
        assert (await owner(store))["day_reserved"] == 180
        spent = reported(90, 40, reasoning_tokens=10, cached_tokens=20, cost=1234, currency="CNY")
        await settle(store, h.call_id, spent)
        c = await call(store, h.call_id)
        names = ("state", "outcome", "source", "prompt_tokens", "completion_tokens", "total_tokens",
                 "reasoning_tokens", "cached_tokens", "cache_creation_tokens", "cost_micros", "currency")  # fmt: skip
        assert [c[name] for name in names] == [
            "settled",
            "complete",
            "reported",
            90,
            40,
            130,
            10,
            20,
            None,
            1234,
            "CNY",
        ]
        assert c["settled_at"] >= c["created_at"]
        row = await owner(store)
        assert (row["day_tokens"], row["day_reserved"], row["month_tokens"], row["month_reserved"]) == (
            130,
            30,
            130,
            30,
        )
        assert (row["month_cost"], row["month_reserved_cost"], row["running"]) == (1234, 0, 1)
        # settled again (the final write retried, or the sweep came first): nothing changes
        await settle(store, h.call_id, reported(1, 1))
        assert await owner(store) == row
        assert (await call(store, h.call_id))["total_tokens"] == 130
        await settle(store, other.call_id, Spent(Source.NONE), outcome="failed")
        row = await owner(store)
        assert (row["day_tokens"], row["day_reserved"], row["month_reserved"], row["running"]) == (130, 0, 0, 0)

    run(database, body)


def test_each_budget_refuses_at_its_edge_and_admits_one_below(database):
    limits = Limits(tokens_per_day=1000, tokens_per_month=5000, cost_per_month=5_000_000)

    async def body(store):
        await admit(store, hold())  # the row
        await store.db.execute("DELETE FROM usage_calls")
        now = await clock(store)
        midnight = chatsvc._next_day(now["day"])
        first = chatsvc._next_month(now["month"])
        cases = [
            ("tokens_per_day", {"day_tokens": 999}, {"day_tokens": 1000}, 1000, 1000, midnight),
            ("tokens_per_day", {"day_tokens": 899, "day_reserved": 100}, {"day_tokens": 900, "day_reserved": 100},
             1000, 1000, midnight),
            ("tokens_per_month", {"month_tokens": 4999}, {"month_tokens": 5000}, 5000, 5000, first),
            ("tokens_per_month", {"month_tokens": 4000, "month_reserved": 999}, {"month_reserved": 1000}, 5000, 5000,
             first),
            ("cost_per_month", {"month_cost": 4_999_999}, {"month_cost": 5_000_000}, 5_000_000, 5_000_000, first),
            ("cost_per_month", {"month_cost": 0, "month_reserved_cost": 4_999_999},
             {"month_reserved_cost": 5_000_000}, 5_000_000, 5_000_000, first),
        ]  # fmt: skip
        for kind, below, at, size, used, resets in cases:
            empty = dict.fromkeys(("day_tokens", "day_reserved", "month_tokens", "month_reserved", "month_cost",
                                   "month_reserved_cost", "running"), 0)  # fmt: skip
            await set_row(store, **{**empty, **below})
            h = hold()
            await admit(store, h)  # one below the edge: admitted (and may end past it)
            await store.db.execute("DELETE FROM usage_calls")
            await set_row(store, **{**empty, **below, **at})
            refusal = await refused(store, hold())
            assert (refusal.code, refusal.limit, refusal.size, refusal.used, refusal.status) == (
                "quota_exceeded", kind, size, used, 429,
            ), (kind, below)  # fmt: skip
            assert refusal.resets_at == resets.isoformat().replace("+00:00", "Z")
            assert 0 < refusal.retry_after <= (resets - chatsvc.datetime.fromtimestamp(now["now"], chatsvc.timezone.utc)
                                               ).total_seconds()  # fmt: skip
            assert refusal.resets_at in refusal.detail and "(UTC)" in refusal.detail
        # the detail, as a person reads it
        await set_row(store, day_tokens=10_240, day_reserved=2_000, month_tokens=0, month_reserved=0, month_cost=0,
                      month_reserved_cost=0)  # fmt: skip
        refusal = await refused(store, hold())
        assert refusal.detail == (
            f"You have used 12,240 of your 1,000 tokens for today (UTC), 2,000 of them held by calls still running;"
            f" the limit resets at {refusal.resets_at}."
        )
        await set_row(store, day_tokens=0, day_reserved=0, month_cost=5_250_000, month_reserved_cost=10)
        refusal = await refused(store, hold())
        assert refusal.detail == (
            "You have spent 5.25001 of your 5 CNY for this month (UTC), 0.00001 CNY of it held by calls still"
            f" running; the limit resets at {refusal.resets_at}."
        )
        assert (refusal.size, refusal.used) == (5_000_000, 5_250_010)  # micros (the API shows money)

    run(database, body, limits, FlatPrices())


def test_concurrent_answers_at_the_edge(database):
    async def body(store):
        first, second = hold(), hold()
        await admit(store, first)
        await admit(store, second)
        refusal = await refused(store, hold())
        assert (refusal.code, refusal.limit, refusal.size, refusal.used, refusal.resets_at, refusal.retry_after) == (
            "rate_limited", "concurrent_answers", 2, 2, None, 1.0,
        )  # fmt: skip
        assert "2 answers running" in refusal.detail
        # a title or a later round is not an answer: never counted, never refused by it
        await admit(store, hold(purpose=TOOL_ROUND, message_id=first.message_id), enforce=False)
        await store.usage.record(hold(purpose=TITLE), reported(5, 5), "complete")
        assert (await owner(store))["running"] == 2
        await settle(store, first.call_id, reported(1, 1))  # the answer ends: its slot is free
        await admit(store, hold())
        assert (await owner(store))["running"] == 2

    run(database, body, Limits(concurrent_answers=2))


def test_answers_per_minute_is_a_bucket_that_refills_by_the_database_clock(database):
    async def body(store):
        for _ in range(3):
            await admit(store, hold())
        row = await owner(store)
        assert 0 <= row["bucket"] < 0.01  # three taken, a few milliseconds' refill
        refusal = await refused(store, hold())
        assert (refusal.code, refusal.limit, refusal.size, refusal.used) == ("rate_limited", "answers_per_minute", 3, 3)
        assert 19.8 < refusal.retry_after <= 20.0  # (1 - bucket) * 60 / 3, exactly
        assert refusal.resets_at > chatsvc.utcnow() and "answers per minute" in refusal.detail
        # a minute later by the database's clock (its fill time set back): full again, and no fuller
        await set_row(store, bucket_at=row["bucket_at"] - 60)
        await admit(store, hold())
        assert 2 <= (await owner(store))["bucket"] < 2.01
        # the edge, with no refill (its fill time ahead of the clock, as a faster replica's would be)
        ahead = (await clock(store))["now"] + 1000
        await set_row(store, bucket=1.0, bucket_at=ahead)
        await admit(store, hold())
        row = await owner(store)
        assert (row["bucket"], row["bucket_at"]) == (0.0, ahead)  # the fill time never goes back
        await set_row(store, bucket=0.999)
        refusal = await refused(store, hold())
        assert refusal.retry_after == pytest.approx(0.001 * 20, rel=1e-6)
        assert (await standing(store))["answers_per_minute"]["remaining"] == 0

    async def standing(store):
        return (await store.usage.standing("alice"))["limits"]

    run(database, body, Limits(answers_per_minute=3, concurrent_answers=100))


def test_windows_left_behind_reset_in_the_admission(database):
    async def body(store):
        await admit(store, hold())
        now = await clock(store)
        # yesterday's row (the database's clock moved on): its day reads 0, its month still counts
        await set_row(store, day="2000-01-01", day_tokens=5000, day_reserved=7, month_tokens=800, month_reserved=0)
        standing = (await store.usage.standing("alice"))["limits"]
        assert (standing["tokens_per_day"]["used"], standing["tokens_per_day"]["reserved"]) == (0, 0)
        assert standing["tokens_per_month"]["used"] == 800
        await admit(store, hold())
        row = await owner(store)
        assert (row["day"], row["day_tokens"], row["day_reserved"]) == (now["day"], 0, 150)
        assert (row["month"], row["month_tokens"], row["month_reserved"]) == (now["month"], 800, 150)
        # last month's
        await set_row(
            store, month="2000-01", month_tokens=50_000, month_reserved=3, month_cost=9, month_reserved_cost=9
        )
        await admit(store, hold())
        row = await owner(store)
        assert (row["month"], row["month_tokens"], row["month_reserved"], row["month_cost"]) == (
            now["month"],
            0,
            150,
            0,
        )
        assert row["day_reserved"] == 300

    run(database, body, Limits(tokens_per_day=1000, tokens_per_month=1000, cost_per_month=5))


def test_a_call_settled_after_its_window_ended_counts_in_none(database):
    async def body(store):
        h = hold()
        await admit(store, h)
        # reserved yesterday, last month; the row has since moved to today's windows (which it holds nothing of)
        await store.db.execute(
            "UPDATE usage_calls SET day = '2000-01-01', month = '2000-01' WHERE id = :id", {"id": h.call_id}
        )
        await set_row(store, day_reserved=0, month_reserved=0, day_tokens=10, month_tokens=10)
        await settle(store, h.call_id, reported(100, 100, cost=5))
        row = await owner(store)
        assert (row["day_tokens"], row["month_tokens"], row["month_cost"], row["running"]) == (10, 10, 0, 0)
        assert (await call(store, h.call_id))["total_tokens"] == 200  # the ledger has it

    run(database, body)


def test_one_window_is_added_as_the_statement_for_many_adds_it(database):
    """Usage._add_windows: an answer's end (one owner, one window) is a plain UPDATE; what it leaves in
    the owner's row is what the statement for many windows leaves, whether the window is still the
    row's day and month or not, and when more is given back than is held (never below 0)."""
    import itertools

    cases = list(itertools.product((True, False), (True, False), (0, 7), (0, 3, 200), (0, 1)))

    async def body(store):
        usage = store.usage
        today = await clock(store)
        for n, (same_day, same_month, reserved, held, ends) in enumerate(cases):
            names = (f"one{n}", f"many{n}")
            day = today["day"] if same_day else "2000-01-01"
            month = today["month"] if same_month else "2000-01"
            for name in names:
                async with store.db.transaction():
                    await usage.admit(hold(owner=name), enforce=False)
                await set_row(store, name, day_tokens=5, day_reserved=reserved, month_tokens=6, month_reserved=reserved,
                              month_cost=4, month_reserved_cost=reserved, running=1)  # fmt: skip
            counts = [11, held, 13, held, ends]
            async with store.db.transaction():
                await usage._add_windows([((names[0], day, month), list(counts))])  # the plain statement
            async with store.db.transaction():  # the statement for many: with an owner it does not change
                await usage._add_windows([((names[1], day, month), list(counts)), (("nobody", day, month), counts)])
            one, many = await owner(store, names[0]), await owner(store, names[1])
            assert {**one, "owner": None} == {**many, "owner": None}, (n, one, many)
            kept = same_day, same_month
            assert (one["day_tokens"], one["month_tokens"], one["month_cost"]) == (
                16 if kept[0] else 5,
                17 if kept[1] else 6,
                17 if kept[1] else 4,
            )
            assert one["day_reserved"] == (max(reserved - held, 0) if kept[0] else reserved)
            assert one["running"] == 1 - ends

    run(database, body)


def test_unenforced_rounds_reserve_past_every_limit(database):
    limits = Limits(tokens_per_day=100, tokens_per_month=100, cost_per_month=1, answers_per_minute=1,
                    concurrent_answers=1)  # fmt: skip

    async def body(store):
        first = hold(prompt=10, output=10)
        await admit(store, first)
        row = await owner(store)
        assert await refused(store, hold())
        nxt = hold(purpose=TOOL_ROUND, prompt=500, output=50, cost=7, message_id=first.message_id)
        assert await admit(store, nxt, enforce=False) == limits
        after = await owner(store)
        assert (after["running"], after["bucket"], after["bucket_at"]) == (
            row["running"],
            row["bucket"],
            row["bucket_at"],
        )
        assert (after["day_reserved"], after["month_reserved"], after["month_reserved_cost"]) == (570, 570, 7)
        # next_round: the round settled and the next reserved in one transaction, never refused
        third = hold(purpose=TOOL_ROUND, prompt=600, output=50, message_id=first.message_id)
        await store.usage.next_round(nxt.call_id, reported(480, 30), third)
        assert ((await call(store, nxt.call_id))["state"], (await call(store, third.call_id))["state"]) == (
            "settled", "reserved",
        )  # fmt: skip
        assert (await call(store, nxt.call_id))["outcome"] == "complete"
        after = await owner(store)
        assert (after["day_tokens"], after["day_reserved"], after["running"]) == (510, 20 + 650, 1)
        # a round found settled already (its answer swept) reserves no next one
        fourth = hold(purpose=TOOL_ROUND, message_id=first.message_id)
        await store.usage.next_round(nxt.call_id, reported(1, 1), fourth)
        assert await call(store, fourth.call_id) is None

    run(database, body, limits)


def test_the_sweep_settles_what_its_answers_held_with_an_estimate(database):
    steps = json.dumps([
        {"type": "tool_call", "data": {"id": "c1", "name": "lookup", "arguments": '{"city": "杭州"}', "round": 1}},
        {"type": "tool_result", "data": {"id": "c1", "content": "sunny " * 500}},
    ])  # fmt: skip

    async def body(store):
        # alice's answer: a first round reported, a second round reserved when its process died
        first = hold(prompt=100, output=50)
        await admit(store, first)
        second = hold(purpose=TOOL_ROUND, prompt=300, output=50, message_id=first.message_id)
        await store.usage.next_round(first.call_id, reported(100, 12), second)
        # an answer that stored nothing, bob's (priced: not thinking, and thinking), and one with no call at all
        empty, bobs, thought = hold(), hold(owner="bob", prompt=40), hold(owner="bob", prompt=40)
        for h in (empty, bobs, thought):
            await admit(store, h)
        await store.db.execute("UPDATE usage_owners SET day_tokens = 1000 WHERE owner = 'bob'")
        answers = [
            {"id": first.message_id, "content": "It is sunny in Hangzhou.", "reasoning_content": "Look it up.",
             "tool_steps": steps},
            {"id": empty.message_id, "content": "", "reasoning_content": None},
            {"id": bobs.message_id, "content": "你好" * 30, "reasoning_content": None},
            {"id": thought.message_id, "content": "ok", "reasoning_content": "hmm"},
            {"id": chatsvc.new_message_id(), "content": "no hold", "reasoning_content": None},
        ]  # fmt: skip
        async with store.db.transaction():
            await store.usage.settle_swept(answers)
        out = chatsvc.estimate_tokens(chatsvc.answer_output(answers[0]["content"], "Look it up.", steps))
        assert out == chatsvc.estimate_tokens('It is sunny in Hangzhou.Look it up.{"city": "杭州"}')
        c = await call(store, second.call_id)
        names = ("state", "outcome", "source", "prompt_tokens", "completion_tokens", "total_tokens")
        assert [c[name] for name in names] == ["settled", "interrupted", "estimated", 300, out - 12, 300 + out - 12]
        assert c["cost_micros"] == 300 + (out - 12) * 8 and c["currency"] == "CNY"  # it thought
        c = await call(store, empty.call_id)
        # nothing, at a price: 0, as an answer's own round that got no chunk (the answer's cost stays known)
        assert (c["source"], c["prompt_tokens"], c["completion_tokens"], c["total_tokens"], c["cost_micros"]) == (
            "none", 0, 0, 0, 0,
        )  # fmt: skip
        c = await call(store, bobs.call_id)
        bob_out = chatsvc.estimate_tokens("你好" * 30)
        assert (c["source"], c["total_tokens"], c["cost_micros"]) == ("estimated", 40 + bob_out, 40 + bob_out * 2)
        c = await call(store, thought.call_id)
        thought_out = chatsvc.estimate_tokens("okhmm")
        assert c["cost_micros"] == 40 + thought_out * 8
        alice, bob = await owner(store), await owner(store, "bob")
        assert (alice["running"], alice["day_reserved"], alice["month_reserved"]) == (0, 0, 0)
        assert alice["day_tokens"] == 112 + 300 + out - 12
        assert (bob["running"], bob["day_reserved"], bob["day_tokens"]) == (0, 0, 1000 + 80 + bob_out + thought_out)
        assert bob["month_cost"] == 80 + bob_out * 2 + thought_out * 8
        # swept again: nothing left reserved, nothing changes
        before = await ledger(store)
        async with store.db.transaction():
            await store.usage.settle_swept(answers)
        assert await ledger(store) == before

    run(database, body, prices=FlatPrices())


def test_the_sweep_of_many_answers(database):
    async def body(store):
        holds = [hold(owner=f"o{n % 7}", prompt=10, output=10) for n in range(130)]
        for h in holds:
            await admit(store, h)
        async with store.db.transaction():
            await store.usage.settle_swept([{"id": h.message_id, "content": "abcd", "reasoning_content": None}
                                            for h in holds])  # fmt: skip
        assert await store.db.fetch_all("SELECT id FROM usage_calls WHERE state = 'reserved'") == []
        rows = await store.db.fetch_all("SELECT running, day_reserved, day_tokens FROM usage_owners")
        each = 10 + chatsvc.estimate_tokens("abcd")
        assert sorted(r["day_tokens"] for r in rows) == sorted(each * sum(1 for n in range(130) if n % 7 == k)
                                                                for k in range(7))  # fmt: skip
        assert {(r["running"], r["day_reserved"]) for r in rows} == {(0, 0)}

    run(database, body)


def test_titles_are_recorded_never_refused(database):
    async def body(store):
        await store.usage.record(hold(purpose=TITLE, prompt=30, output=20), reported(30, 8, cost=99, currency="CNY"),
                                 "complete")  # fmt: skip
        await store.usage.record(
            hold(purpose=TITLE), Spent(Source.NONE), "failed"
        )  # over the limit now: still recorded
        rows = (await ledger(store))[1]
        assert [(r["purpose"], r["state"], r["outcome"], r["source"], r["message_id"], r["total_tokens"],
                 r["cost_micros"]) for r in rows] == [
            ("title", "settled", "complete", "reported", None, 38, 99),
            ("title", "settled", "failed", "none", None, 0, None),
        ]  # fmt: skip
        row = await owner(store)
        assert (row["day_tokens"], row["day_reserved"], row["month_cost"], row["running"]) == (38, 0, 99, 0)

    run(database, body, Limits(tokens_per_day=10))


def test_an_admins_limits_replace_the_global_ones(database):
    limits = Limits(tokens_per_day=1000, concurrent_answers=1, answers_per_minute=60)

    async def body(store):
        u = store.usage
        assert await u.owner_limits("alice") == {}
        mine = {"tokens_per_day": 400, "cost_per_month": 2_500_000, "concurrent_answers": None}
        await u.set_limits("alice", mine)
        assert await u.owner_limits("alice") == mine
        row = await owner(store)
        assert row["limits_at"] and row["running"] == 0
        # its own limits apply: no limit on concurrent answers, 400 tokens a day
        first = hold()
        assert await admit(store, first) == Limits(400, None, 2_500_000, 60, None)
        await admit(store, hold())
        await settle(store, first.call_id, reported(3, 3))
        await set_row(store, day_tokens=250)  # and 150 held
        refusal = await refused(store, hold())
        assert (refusal.limit, refusal.size, refusal.used) == ("tokens_per_day", 400, 400)
        standing = (await u.standing("alice"))["limits"]
        assert {kind: (s["limit"], s["source"]) for kind, s in standing.items()} == {
            "tokens_per_day": (400, "user"), "tokens_per_month": (None, "none"), "cost_per_month": (2_500_000, "user"),
            "answers_per_minute": (60, "global"), "concurrent_answers": (None, "none"),
        }  # fmt: skip
        # replaced whole: the global ones again
        await u.set_limits("alice", {})
        assert await u.owner_limits("alice") == {}
        refusal = await refused(store, hold())
        assert (refusal.limit, refusal.size) == ("concurrent_answers", 1)
        # an owner with no row yet gets one with the limits
        await u.set_limits("carol", {"answers_per_minute": 0})
        assert await u.owner_limits("carol") == {"answers_per_minute": 0}
        refusal = await refused(store, hold(owner="carol"))
        assert (refusal.limit, refusal.size, refusal.code) == ("answers_per_minute", 0, "rate_limited")
        with pytest.raises(ValueError, match="not a limit"):
            await u.set_limits("alice", {"tokens_per_week": 1})

    run(database, body, limits)


def test_an_admin_resets_a_window(database):
    async def body(store):
        h = hold()
        await admit(store, h)
        await set_row(store, day_tokens=700, month_tokens=900, month_cost=55)
        await store.usage.reset("alice", "day")
        row = await owner(store)
        assert (row["day_tokens"], row["day_reserved"], row["month_tokens"], row["month_cost"]) == (0, 150, 900, 55)
        assert row["day_reset_at"] and row["month_reset_at"] is None
        await store.usage.reset("alice", "month")
        row = await owner(store)
        assert (row["month_tokens"], row["month_cost"], row["month_reserved"]) == (0, 0, 150)
        assert row["month_reset_at"]
        assert (await call(store, h.call_id))["state"] == "reserved"  # the ledger keeps it all
        await store.usage.reset("nobody", "day")  # no row: nothing to reset
        with pytest.raises(ValueError):
            await store.usage.reset("alice", "week")

    run(database, body)


def test_where_an_owner_stands(database):
    limits = Limits(tokens_per_day=1000, tokens_per_month=10_000, cost_per_month=3_000_000, answers_per_minute=4,
                    concurrent_answers=3)  # fmt: skip

    async def body(store):
        u = store.usage
        now = await clock(store)
        fresh = await u.standing("nobody")
        assert (fresh["day"], fresh["month"]) == (now["day"], now["month"])
        assert fresh["limits"]["tokens_per_day"] == {
            "limit": 1000, "source": "global", "used": 0, "reserved": 0, "remaining": 1000,
            "resets_at": chatsvc._next_day(now["day"]).isoformat().replace("+00:00", "Z"),
        }  # fmt: skip
        assert fresh["limits"]["answers_per_minute"] == {
            "limit": 4, "source": "global", "used": 0, "reserved": 0, "remaining": 4, "resets_at": None,
        }  # fmt: skip
        assert fresh["limits"]["concurrent_answers"]["remaining"] == 3
        h = hold(prompt=100, output=100, cost=40)
        await admit(store, h)
        await set_row(store, day_tokens=300, month_tokens=2000, month_cost=1_000_000)
        s = (await u.standing("alice"))["limits"]
        assert s["tokens_per_day"] | {"resets_at": None} == {
            "limit": 1000, "source": "global", "used": 300, "reserved": 200, "remaining": 500, "resets_at": None,
        }  # fmt: skip
        assert (s["tokens_per_month"]["used"], s["tokens_per_month"]["remaining"]) == (2000, 7800)
        assert s["tokens_per_month"]["resets_at"] == chatsvc._next_month(now["month"]).isoformat().replace(
            "+00:00", "Z"
        )
        assert (s["cost_per_month"]["used"], s["cost_per_month"]["reserved"], s["cost_per_month"]["remaining"]) == (
            1_000_000, 40, 1_999_960,
        )  # fmt: skip
        assert (s["answers_per_minute"]["used"], s["answers_per_minute"]["remaining"]) == (1, 3)
        assert s["answers_per_minute"]["resets_at"] > chatsvc.utcnow()
        assert (s["concurrent_answers"]["used"], s["concurrent_answers"]["remaining"]) == (1, 2)
        await set_row(store, day_tokens=5000)
        assert (await u.standing("alice"))["limits"]["tokens_per_day"]["remaining"] == 0

    run(database, body, limits)


def test_reports_group_and_page(database):
    async def body(store):
        u = store.usage
        made = [
            # owner, session, purpose, model, day, prompt, completion, source, cost
            ("alice", "s1", ANSWER, "qwen-plus", "2026-11-03", 100, 10, Source.REPORTED, 110),
            ("alice", "s1", TOOL_ROUND, "qwen-plus", "2026-11-03", 200, 20, Source.ESTIMATED, 220),
            ("alice", "s2", ANSWER, "qwen-max", "2026-11-05", 300, 30, Source.REPORTED, None),
            ("alice", "s2", TITLE, "qwen-flash", "2026-11-05", 40, 4, Source.REPORTED, 44),
            ("bob", "s1", ANSWER, "qwen-plus", "2026-11-04", 500, 50, Source.REPORTED, None),
            ("carol", "s9", ANSWER, "qwen-plus", "2026-12-01", 600, 60, Source.REPORTED, 660),  # after the range
        ]
        for who, sid, purpose, model, day, p, c, source, cost in made:
            h = hold(owner=who, session=sid, purpose=purpose, model=model)
            await u.record(h, Spent(source, p, c, p + c, reasoning_tokens=1, cached_tokens=2, cost=cost,
                                    currency="CNY"), "complete")  # fmt: skip
            await store.db.execute("UPDATE usage_calls SET created_at = :at WHERE id = :id",
                                   {"at": f"{day}T12:00:00.000Z", "id": h.call_id})  # fmt: skip
        running = hold(owner="alice", session="s2", model="qwen-max")
        await admit(store, running)  # still running: a call and an answer, no tokens yet
        await store.db.execute("UPDATE usage_calls SET created_at = '2026-11-30T23:59:59.999Z' WHERE id = :id",
                               {"id": running.call_id})  # fmt: skip

        def sums(rows):
            p, c = sum(r[5] for r in rows), sum(r[6] for r in rows)
            costs = [r[8] for r in rows if r[8] is not None]
            return {"calls": len(rows), "answers": sum(r[2] is ANSWER for r in rows), "prompt_tokens": p,
                    "completion_tokens": c, "reasoning_tokens": len(rows), "cached_tokens": 2 * len(rows),
                    "total_tokens": p + c, "estimated_tokens": sum(r[5] + r[6] for r in rows
                                                                   if r[7] is Source.ESTIMATED),
                    "cost": sum(costs) if costs else None}  # fmt: skip

        start, end = "2026-11-01", "2026-12-01T00:00:00Z"
        alice = [r for r in made if r[0] == "alice"]
        with_running = {"calls": 1, "answers": 1}
        totals, groups, cursor = await u.report("alice", start, end, "none", 10, None)
        expected = sums(alice)
        assert totals == expected | {"calls": 5, "answers": 3} and groups == [] and cursor is None
        assert list(totals) == list(chatsvc.USAGE_FIELDS_REPORTED)
        _, groups, cursor = await u.report("alice", start, end, "day", 10, None)
        assert cursor is None
        assert groups == [
            {"key": "2026-11-03", **sums(alice[:2])},
            {"key": "2026-11-05", **sums(alice[2:])},
            {"key": "2026-11-30", **sums([]), **with_running},
        ]
        _, groups, _ = await u.report("alice", start, end, "model", 10, None)
        assert groups == [
            {"key": "qwen-flash", **sums(alice[3:])},
            {"key": "qwen-max", **sums(alice[2:3]) | {"calls": 2, "answers": 2}},
            {"key": "qwen-plus", **sums(alice[:2])},
        ]
        _, groups, _ = await u.report("alice", start, end, "conversation", 10, None)
        assert [(g["key"], g["calls"], g["cost"]) for g in groups] == [("s1", 2, 330), ("s2", 3, 44)]
        _, groups, _ = await u.report("alice", start, end, "purpose", 10, None)
        assert [(g["key"], g["calls"], g["answers"]) for g in groups] == [("answer", 3, 3), ("title", 1, 0),
                                                                         ("tool_round", 1, 0)]  # fmt: skip
        everyone, groups, _ = await u.report(None, start, end, "user", 10, None)
        assert [(g["key"], g["calls"], g["total_tokens"], g["cost"]) for g in groups] == [
            ("alice", 5, 704, 374), ("bob", 1, 550, None),
        ]  # fmt: skip
        assert everyone["calls"] == 6 and everyone["total_tokens"] == 1254
        # [start, end): a call at the end is out, at the start in
        totals, _, _ = await u.report(None, "2026-11-03T12:00:00Z", "2026-11-05T12:00:00.000Z", "none", 10, None)
        assert (totals["calls"], totals["total_tokens"]) == (3, 880)
        totals, groups, _ = await u.report("dave", start, end, "day", 10, None)
        assert groups == [] and totals == sums([]) | {"calls": 0}
        # pages of one group, on every grouping: the same groups, in the same order
        for group_by in ("day", "model", "conversation", "purpose", "user"):
            owner_ = None if group_by == "user" else "alice"
            _, whole, _ = await u.report(owner_, start, end, group_by, 100, None)
            paged, cursor = [], None
            while True:
                _, page, cursor = await u.report(owner_, start, end, group_by, 1, cursor)
                paged += page
                if cursor is None:
                    break
                assert cursor == page[-1]["key"]
            assert paged == whole, group_by
        _, page, cursor = await u.report("alice", start, end, "day", 2, None)
        assert [g["key"] for g in page] == ["2026-11-03", "2026-11-05"] and cursor == "2026-11-05"
        with pytest.raises(ValueError):
            await u.report("alice", start, end, "week", 10, None)

    run(database, body)


def test_reports_and_admission_read_by_index(database):
    """No statement of the ledger reads a table whole: each reads a range of an index (the plans
    PostgreSQL would choose on a big table; bench/usage.py shows them on 1,000,000 calls)."""
    statements: list[tuple[str, dict]] = []

    async def body(store):
        u = store.usage
        h = hold()
        await admit(store, h)
        await settle(store, h.call_id, reported(1, 1))
        await u.record(hold(purpose=TITLE), reported(1, 1), "complete")
        first = hold()
        await admit(store, first)
        second = hold(purpose=TOOL_ROUND, message_id=first.message_id)
        await u.next_round(first.call_id, reported(1, 1), second)
        all_rows = store.db.fetch_all

        async def recorded(sql, values=None, role=chatsvc.READ):
            if not sql.startswith("EXPLAIN"):
                statements.append((sql, dict(values or {})))
            return await all_rows(sql, values, role)

        store.db.fetch_all = recorded
        await admit(store, hold())
        await all_rows("UPDATE usage_owners SET day_tokens = 10000", None, chatsvc.WRITE)
        with pytest.raises(OverLimit):
            await admit(store, hold())
        async with store.db.transaction():
            await u.settle_swept([{"id": first.message_id, "content": "x", "reasoning_content": None}])
        await u.standing("alice")
        await u.owner_limits("alice")
        for group_by in ("day", "model", "conversation", "purpose"):
            await u.report("alice", "2026-01-01", "2027-01-01", group_by, 10, "a")
        await u.report(None, "2026-01-01", "2027-01-01", "user", 10, "a")
        await u.report(None, "2026-01-01", "2027-01-01", "model", 10, None)
        store.db.fetch_all = all_rows
        plans = []
        for sql, values in statements:
            if not any(table in sql for table in ("usage_calls", "usage_owners")) or sql.startswith("INSERT"):
                continue
            if store.db.is_sqlite:
                rows = await store.db.fetch_all("EXPLAIN QUERY PLAN " + sql, values)
                plans.append((sql, " / ".join(r["detail"] for r in rows)))
            else:
                async with store.db.transaction():
                    await store.db.execute("SET LOCAL enable_seqscan = off")
                    rows = await store.db.fetch_all("EXPLAIN " + sql, values)
                plans.append((sql, " / ".join(r["QUERY PLAN"] for r in rows)))
        assert len(plans) >= 15
        for sql, plan in plans:
            if store.db.is_sqlite:
                scans = [step for step in plan.split(" / ") if step.startswith("SCAN") and "usage_" in step]
                # the VALUES of a settlement are scanned (a few rows), and the constant row of a standing
                assert all(step.startswith(("SCAN v", "SCAN clock", "SCAN CONSTANT")) for step in scans), (sql, plan)
            else:
                assert "Seq Scan on usage" not in plan, (sql, plan)

    run(database, body, Limits(tokens_per_day=1000))
    assert statements


# ── the race: many admissions from two processes for the last answer of a budget ──


def _race(url: str, owner: str, each: int, barrier, results) -> None:
    """One process's share of the race: `each` admissions at once, once both processes are ready."""

    async def go() -> int:
        store = chatsvc.Store(url)
        await store.open(upgrade=False)
        try:

            async def one() -> int:
                try:
                    async with store.db.transaction():
                        await store.usage.admit(hold(owner=owner, prompt=100, output=50))
                    return 1
                except OverLimit:
                    return 0

            barrier.wait(30)
            return sum(await asyncio.gather(*(one() for _ in range(each))))
        finally:
            await store.close()

    results.put(asyncio.run(go()))


@pytest.mark.slow
@pytest.mark.parametrize("limit", ["tokens_per_day", "concurrent_answers", "answers_per_minute"])
def test_fifty_admissions_from_two_processes_for_the_last_answer_let_one_through(database, limit):
    """docs/design/usage.md 1.4: the conditional UPDATE re-reads its WHERE on the row its winner left."""
    sizes = {"tokens_per_day": 1000, "concurrent_answers": 3, "answers_per_minute": 1}
    start = {"tokens_per_day": {"day_tokens": 900}, "concurrent_answers": {"running": 2}, "answers_per_minute": {}}

    async def prepare(store):
        await store.usage.set_limits("racer", {limit: sizes[limit]})
        if start[limit]:
            await set_row(store, "racer", **start[limit])

    run(database, prepare)
    url = database if database.startswith("sqlite") else database + "?min_size=1&max_size=25"
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    workers = [context.Process(target=_race, args=(url, "racer", 25, barrier, results)) for _ in range(2)]
    started = time.monotonic()
    for worker in workers:
        worker.start()
    admitted = [results.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(30)
        assert worker.exitcode == 0
    assert sum(admitted) == 1, (admitted, time.monotonic() - started)

    async def check(store):
        calls = await store.db.fetch_all("SELECT state FROM usage_calls WHERE owner = 'racer'")
        return calls, await owner(store, "racer")

    calls, row = run(database, check)
    assert calls == [{"state": "reserved"}]
    assert (row["day_reserved"], row["running"]) == (150, start[limit].get("running", 0) + 1)
