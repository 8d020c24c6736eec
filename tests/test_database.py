"""The Database room: a transaction's statements, all or nothing, in order, on SQLite and PostgreSQL;
on SQLite, `later` writes go to the write connection's thread with the statement after them (one hop
each, where every statement was one)."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3

import pytest
from fake_dashscope import Reply
from support import pg
from test_metrics import samples_of, value

import chatsvc

API = "/api/v1"


def on(database: str, body) -> None:
    """`body(db)` with an open Database on `database`, a table `later_t` of its own, dropped after."""

    async def run() -> None:
        db = chatsvc.Database(database)
        await db.open()
        try:
            await db.execute("DROP TABLE IF EXISTS later_t")
            await db.execute("CREATE TABLE later_t (n INTEGER PRIMARY KEY)")
            await body(db)
        finally:
            await db.close()

    asyncio.run(run())
    if not database.startswith("sqlite"):
        pg(database, "DROP TABLE IF EXISTS later_t")


class Hops:
    """Counts the statements sent to a SQLite connection's thread (its aiosqlite hops)."""

    def __init__(self, handle):
        self.count, self.handle, self.sent = 0, handle, handle.execute_fetchall

        async def counted(sql, parameters=None):
            self.count += 1
            return await self.sent(sql, parameters)

        handle.execute_fetchall = counted

    def __enter__(self) -> Hops:
        return self

    def __exit__(self, *exc) -> None:
        self.handle.execute_fetchall = self.sent


def test_a_transactions_later_writes_come_before_its_next_statement_in_order(database):
    async def body(db: chatsvc.Database) -> None:
        async with db.transaction():
            await db.execute("INSERT INTO later_t (n) VALUES (:n)", {"n": 1}, later=True)
            await db.execute("INSERT INTO later_t (n) VALUES (:n)", {"n": 2}, later=True)
            seen = await db.fetch_all("SELECT n FROM later_t ORDER BY n")
            await db.execute("DELETE FROM later_t WHERE n = 1", later=True)
        assert [row["n"] for row in seen] == [1, 2]  # its own reads see its later writes
        assert [row["n"] for row in await db.fetch_all("SELECT n FROM later_t")] == [2]

    on(database, body)


def test_a_later_write_that_fails_takes_its_whole_transaction_with_it(database):
    async def body(db: chatsvc.Database) -> None:
        await db.execute("INSERT INTO later_t (n) VALUES (7)")
        with pytest.raises(Exception) as failed:
            async with db.transaction():
                await db.execute("INSERT INTO later_t (n) VALUES (1)")
                await db.execute("INSERT INTO later_t (n) VALUES (2)", later=True)
                await db.execute("INSERT INTO later_t (n) VALUES (7)", later=True)  # taken: raised at the COMMIT
        assert chatsvc._violation(failed.value) == "unique"  # raised as it is, not as a storage fault
        assert [row["n"] for row in await db.fetch_all("SELECT n FROM later_t")] == [7]
        async with db.transaction():  # nothing of it is left open
            await db.execute("INSERT INTO later_t (n) VALUES (3)", later=True)
        assert [row["n"] for row in await db.fetch_all("SELECT n FROM later_t ORDER BY n")] == [3, 7]

    on(database, body)


def test_a_later_statements_rows_are_there_once_the_statement_after_it_has_run(database):
    """fetch_later: a write whose rows are wanted, sent with the next statement (SQLite) or at once."""

    async def body(db: chatsvc.Database) -> None:
        await db.execute("INSERT INTO later_t (n) VALUES (1)")
        async with db.transaction():
            took = await db.fetch_later("UPDATE later_t SET n = n + 10 WHERE n = :n RETURNING n", {"n": 1})
            missed = await db.fetch_later("UPDATE later_t SET n = n + 10 WHERE n = :n RETURNING n", {"n": 5})
            seen = await db.fetch_all("SELECT n FROM later_t")  # it carries both, in order
            assert took.rows == [{"n": 11}] and missed.rows == [] and seen == [{"n": 11}]
            last = await db.fetch_later("DELETE FROM later_t WHERE n = :n RETURNING n", {"n": 11})
        assert last.rows == [{"n": 11}]  # sent with the COMMIT
        assert await db.fetch_all("SELECT n FROM later_t") == []
        await db.execute("INSERT INTO later_t (n) VALUES (7)")
        with pytest.raises(Exception) as failed:
            async with db.transaction():
                await db.fetch_later("INSERT INTO later_t (n) VALUES (7) RETURNING n", {})
                await db.fetch_all("SELECT n FROM later_t")
        assert chatsvc._violation(failed.value) == "unique"  # raised by the statement after, as it is
        outside = await db.fetch_later("UPDATE later_t SET n = 8 RETURNING n", {})  # no transaction: at once
        assert outside.rows == [{"n": 8}]

    on(database, body)


def test_a_transaction_that_raises_sends_none_of_its_later_writes(database):
    async def body(db: chatsvc.Database) -> None:
        with pytest.raises(KeyError):
            async with db.transaction():
                await db.execute("INSERT INTO later_t (n) VALUES (1)", later=True)
                raise KeyError("the body failed")
        assert await db.fetch_all("SELECT n FROM later_t") == []
        async with db.transaction():
            pass  # one with no statement at all
        assert await db.fetch_all("SELECT n FROM later_t") == []

    on(database, body)


def test_a_sqlite_transaction_is_one_hop_for_its_begin_its_later_writes_and_the_statement_after(tmp_path):
    async def body(db: chatsvc.Database) -> None:
        with Hops(db._raw[chatsvc.WRITE]) as hops:
            async with db.transaction():
                await db.execute("INSERT INTO later_t (n) VALUES (1)", later=True)
                await db.execute("INSERT INTO later_t (n) VALUES (2)", later=True)
                await db.fetch_one("SELECT COUNT(*) AS c FROM later_t")
                await db.execute("INSERT INTO later_t (n) VALUES (3)", later=True)
        assert hops.count == 2  # BEGIN, two INSERTs and the SELECT; the third INSERT and the COMMIT
        assert len(await db.fetch_all("SELECT n FROM later_t")) == 3

    on(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}", body)


def test_a_batch_reaching_a_connection_that_does_not_know_it_is_refused_not_cut_short():
    batch = chatsvc._Batch.of([("CREATE TABLE t (n INTEGER)", {}), ("INSERT INTO t VALUES (1)", {})], "SELECT 1")
    with pytest.raises(sqlite3.ProgrammingError):
        sqlite3.connect(":memory:").execute(batch)


def test_a_turn_and_its_end_on_sqlite_reach_the_write_thread_in_four_hops(tmp_path, fake):
    """What the `later` writes buy: a turn's transaction was six hops (BEGIN, the conversation, the
    messages, the owner's usage, the call's row, COMMIT) and its end six: now two (BEGIN, the
    conversation, the messages and the owner's usage; the call's row and COMMIT) and two (BEGIN, the
    answer's final row, the read of its other calls still reserved and its call's settlement; the
    owners' windows and COMMIT). Its end was three while its calls were read before they were settled."""
    from support import Service

    service = Service(f"sqlite+aiosqlite:///{tmp_path / 'chatsvc.db'}", fake)
    with service.client() as client:
        fake.push(Reply.answer(["warm"]))
        assert client.post(f"{API}/chat/s0", json={"message": "warm"}).status_code == 200
        fake.push(Reply.answer(["a ", "b"]))
        with Hops(client.app.state.store.db._raw[chatsvc.WRITE]) as hops:
            reply = client.post(f"{API}/chat/s1", json={"message": "hi"})
        assert reply.status_code == 200 and reply.json()["response"] == "a b"
        assert hops.count == 4
        [row] = service.rows("SELECT content, status FROM messages WHERE session_id = 's1' AND role = 'assistant'")
        assert row == {"content": "a b", "status": "complete"}
        [call] = service.rows("SELECT state FROM usage_calls WHERE session_id = 's1'")
        assert call == {"state": "settled"}


@contextlib.asynccontextmanager
async def _held(db: chatsvc.Database):
    """Another transaction (it stores 0) holds the write connection until the block ends."""
    holding, release = asyncio.Event(), asyncio.Event()

    async def hold() -> None:
        async with db.transaction():
            await db.execute("INSERT INTO later_t (n) VALUES (0)")
            holding.set()
            await release.wait()

    holder = asyncio.ensure_future(hold())
    await holding.wait()
    try:
        yield
    finally:
        release.set()
        await holder


async def _gathered_behind_a_transaction(db: chatsvc.Database, bodies: list) -> list:
    """Each of `bodies` through db.together, all arriving while another transaction holds the write
    connection (on SQLite they form one group); their outcomes, results or exceptions, in order."""
    async with _held(db):
        waiting = [asyncio.ensure_future(db.together(body)) for body in bodies]
        await asyncio.sleep(0.05)  # every one of them has joined
    return await asyncio.gather(*waiting, return_exceptions=True)


def test_bodies_that_arrive_together_are_each_all_or_nothing_and_share_one_commit(database):
    """Database.together: a body's refusal undoes its own writes only, whether it had sent some or none;
    the others are kept. On SQLite the five are one group: one BEGIN, one COMMIT, a hop each."""

    async def body(db: chatsvc.Database) -> None:
        def insert(*numbers, refuse=None, early=False):
            async def body():
                if early:
                    raise chatsvc.ConversationBusy("refused before it wrote anything")
                for n in numbers:
                    await db.execute("INSERT INTO later_t (n) VALUES (:n)", {"n": n}, later=True)
                await db.fetch_all("SELECT n FROM later_t WHERE n = :n", {"n": numbers[0]})
                if refuse:
                    raise chatsvc.ConversationBusy(refuse)
                return numbers

            return body

        with Hops(db._raw[chatsvc.WRITE]) if db.is_sqlite else contextlib.nullcontext() as counted:
            outcomes = await _gathered_behind_a_transaction(
                db,
                [
                    insert(8, early=True),
                    insert(1, 2),
                    insert(3, refuse="its own refusal"),
                    insert(4, early=True),
                    insert(5, 6),
                ],
            )  # the first refuses before the group's BEGIN is sent: its own refusal still, not the group's
        if counted:
            # the holder's two (its INSERT, its COMMIT); the group's four: a hop for each body that sent
            # a statement (its SAVEPOINT and its later writes went with it), and one COMMIT
            assert counted.count == 2 + 4
        assert outcomes[1] == (1, 2) and outcomes[4] == (5, 6)
        assert isinstance(outcomes[2], chatsvc.ConversationBusy) and str(outcomes[2]) == "its own refusal"
        assert all(isinstance(outcomes[n], chatsvc.ConversationBusy) for n in (0, 3))
        stored = [row["n"] for row in await db.fetch_all("SELECT n FROM later_t ORDER BY n")]
        assert stored == [0, 1, 2, 5, 6]

    on(database, body)


def test_a_write_one_body_left_for_later_that_fails_undoes_the_whole_group(tmp_path):
    """SQLite: body A's later write travels with body B's first statement; its failure is not B's: the
    group is undone (503 for both), not B alone."""
    database = f"sqlite+aiosqlite:///{tmp_path / 'group.db'}"

    async def body(db: chatsvc.Database) -> None:
        await db.execute("INSERT INTO later_t (n) VALUES (7)")

        async def a():
            await db.execute("INSERT INTO later_t (n) VALUES (1)")
            await db.execute("INSERT INTO later_t (n) VALUES (7)", later=True)  # taken: fails in B's hop

        async def b():
            try:
                await db.execute("INSERT INTO later_t (n) VALUES (2)")
            except Exception as exc:  # as a body that reads a violation as its own refusal would
                if chatsvc._violation(exc):
                    raise chatsvc.ConversationBusy("B's own, it thinks") from None
                raise

        outcomes = await _gathered_behind_a_transaction(db, [a, b])
        assert all(isinstance(outcome, chatsvc.StorageUnavailable) for outcome in outcomes), outcomes
        assert "nothing of either was kept" in str(outcomes[1])
        assert [row["n"] for row in await db.fetch_all("SELECT n FROM later_t ORDER BY n")] == [0, 7]
        async with db.transaction():  # the write connection is free, and no transaction is left open
            await db.execute("INSERT INTO later_t (n) VALUES (3)")
        assert [row["n"] for row in await db.fetch_all("SELECT n FROM later_t ORDER BY n")] == [0, 3, 7]

    on(database, body)


def test_a_caller_cancelled_before_its_body_starts_is_left_out_of_its_group(tmp_path):
    database = f"sqlite+aiosqlite:///{tmp_path / 'group.db'}"

    async def body(db: chatsvc.Database) -> None:
        async with _held(db):
            first = asyncio.ensure_future(db.together(lambda: db.execute("INSERT INTO later_t (n) VALUES (1)")))
            left = asyncio.ensure_future(db.together(lambda: db.execute("INSERT INTO later_t (n) VALUES (2)")))
            await asyncio.sleep(0.05)
            left.cancel()
        await first
        with pytest.raises(asyncio.CancelledError):
            await left
        assert [row["n"] for row in await db.fetch_all("SELECT n FROM later_t ORDER BY n")] == [0, 1]

    on(database, body)


def test_turns_that_arrive_together_are_each_stored_whole_and_a_second_on_one_conversation_is_409(service, fake):
    """Thirty turns at once through a live server (on SQLite, stored in groups): each new conversation's
    answer is stored complete with its question and its settled call; of two turns on one conversation
    exactly one is answered and the other is 409 conversation_busy, leaving nothing of itself."""
    import httpx2 as httpx
    from live import LiveServer

    async def chat(client, sid: str):
        return await client.post(f"{API}/chat/{sid}", json={"message": "hello"})

    async def all_at_once(url: str):
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            replies = await asyncio.gather(*(chat(client, f"g{i}") for i in range(28)), chat(client, "same"),
                                           chat(client, "same"))  # fmt: skip
            return replies, (await client.get("/metrics")).text

    fake.push(*[Reply.answer(["t0 ", "t1 ", "t2 "], pause=0.05) for _ in range(29)])  # the 409 calls no model
    with LiveServer(service.settings) as server:
        replies, metrics = asyncio.run(all_at_once(server.url))
    bodies, groups = _grouped(metrics)
    if service.is_sqlite:  # groups formed (a body alone is no group), and none held more than GROUP_BODIES
        at_most = value(samples_of(metrics), "chatsvc_db_group_bodies_bucket", le=f"{chatsvc.GROUP_BODIES}.0")
        assert bodies > groups > 0 and at_most == groups, metrics
    else:  # PostgreSQL: every turn its own transaction
        assert (bodies, groups) == (0, 0)
    assert [r.status_code for r in replies[:28]] == [200] * 28
    assert all(r.json()["response"] == "t0 t1 t2 " for r in replies[:28])
    same = sorted(r.status_code for r in replies[28:])
    assert same == [200, 409], [r.text for r in replies[28:]]
    assert next(r for r in replies[28:] if r.status_code == 409).json()["code"] == "conversation_busy"
    rows = service.rows("SELECT session_id, role, content, status FROM messages ORDER BY session_id, role")
    assert len(rows) == 29 * 2  # a question and its answer for each conversation answered, nothing else
    assert {(r["role"], r["status"]) for r in rows} == {("user", "complete"), ("assistant", "complete")}
    assert all(r["content"] == "t0 t1 t2 " for r in rows if r["role"] == "assistant")
    calls = service.rows("SELECT state FROM usage_calls")
    assert [c["state"] for c in calls] == ["settled"] * 29


def _grouped(metrics: str) -> tuple[float, float]:
    """From /metrics: the bodies stored in groups (SQLite's group commit), and the groups."""
    samples = samples_of(metrics)
    assert ("chatsvc_db_group_bodies_count", ()) in samples, metrics
    return value(samples, "chatsvc_db_group_bodies_sum"), value(samples, "chatsvc_db_group_bodies_count")


def test_continuations_that_arrive_together_each_go_on_once_and_a_second_on_one_answer_is_409(service, fake):
    """Twelve answers cut at max_tokens, continued at once, one of them twice: each goes on exactly
    once, its text the two parts', its calls settled; the second continue of one answer is 409
    conversation_busy and leaves it as its continuation made it. On SQLite, a transaction holds the
    write connection while they arrive: all thirteen are stored in groups behind it."""
    import threading

    import httpx2 as httpx
    from live import LiveServer, parse_events
    from support import wait_for

    async def continue_all(url: str, answers: dict[str, str]):
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            go = [client.post(f"{API}/chat/{sid}", json={"continue": mid}) for sid, mid in answers.items()]
            return await asyncio.gather(*go, client.post(f"{API}/chat/c0", json={"continue": answers["c0"]}))

    with LiveServer(service.settings) as server, server.client() as client:
        answers = {}
        for i in range(12):
            fake.push(Reply.answer(["cut "], finish="length"))
            reply = client.post(f"{API}/chat/c{i}/stream", json={"message": "go on"})
            answers[f"c{i}"] = parse_events(reply.content)[0]["data"]["message_id"]
        asked = len(fake.requests)
        hold = threading.Event()  # the continuations' answers wait: their ends are not grouped with their starts
        fake.push(*[Reply.answer(["on"], hold=hold, hold_at=1) for _ in range(12)])  # the 409 calls no model
        db, release = server.relay.store.db, threading.Event()
        if service.is_sqlite:  # a transaction holds the write connection until all thirteen wait for it

            async def held() -> None:
                async with db.transaction():
                    await asyncio.to_thread(release.wait, 30)

            holder = asyncio.run_coroutine_threadsafe(held(), server.server.servers[0].get_loop())
            wait_for(lambda: db._write_lock.locked())
        replies: list = []
        sent = threading.Thread(target=lambda: replies.extend(asyncio.run(continue_all(server.url, answers))))
        sent.start()
        if service.is_sqlite:  # GROUP_BODIES in the first group, the rest in the second
            wait_for(lambda: db._forming is not None and len(db._forming) == 13 - chatsvc.GROUP_BODIES, timeout=20)
            release.set()
            holder.result(10)
        wait_for(lambda: len(fake.requests) == asked + 12, timeout=20)
        metrics = client.get("/metrics").text
        hold.set()
        sent.join(30)
    statuses = [r.status_code for r in replies]
    assert statuses[1:12] == [200] * 11 and sorted(statuses[::12]) == [200, 409], [r.text for r in replies]
    assert next(r for r in replies if r.status_code == 409).json()["code"] == "conversation_busy"
    assert all(r.json()["response"] == "cut on" for r in replies if r.status_code == 200)
    rows = service.rows("SELECT content, status, continued FROM messages WHERE role = 'assistant'")
    assert rows == [{"content": "cut on", "status": "complete", "continued": 1}] * 12
    calls = service.rows("SELECT purpose, state FROM usage_calls ORDER BY purpose")
    assert (
        calls
        == [{"purpose": "answer", "state": "settled"}] * 12 + [{"purpose": "continuation", "state": "settled"}] * 12
    )
    bodies, groups = _grouped(metrics)
    if service.is_sqlite:  # a full group, and the rest
        full = groups - value(
            samples_of(metrics), "chatsvc_db_group_bodies_bucket", le=f"{chatsvc.GROUP_BUCKETS[-2]}.0"
        )
        assert bodies == 13 and groups == 2 and full == 1, metrics
    else:
        assert (bodies, groups) == (0, 0)


def test_a_group_holds_at_most_group_bodies_and_the_rest_form_the_next(tmp_path):
    """SQLite: GROUP_BODIES + 2 bodies arriving behind a held transaction are two groups, the first
    of GROUP_BODIES; all of them are kept."""
    database = f"sqlite+aiosqlite:///{tmp_path / 'group.db'}"
    size = chatsvc.GROUP_BODIES

    async def body(db: chatsvc.Database) -> None:
        def insert(n):
            return lambda: db.execute("INSERT INTO later_t (n) VALUES (:n)", {"n": n})

        await _gathered_behind_a_transaction(db, [insert(n) for n in range(1, size + 3)])
        registry = db.metrics.registry
        assert registry.get_sample_value("chatsvc_db_group_bodies_count") == 2
        assert registry.get_sample_value("chatsvc_db_group_bodies_bucket", {"le": "2.0"}) == 1
        assert registry.get_sample_value("chatsvc_db_group_bodies_sum") == size + 2
        assert [row["n"] for row in await db.fetch_all("SELECT n FROM later_t ORDER BY n")] == list(range(size + 3))

    on(database, body)


def test_a_body_that_swallows_a_fault_beyond_its_own_writes_does_not_keep_the_group(tmp_path):
    """SQLite: body B catches every exception of its statement; the failure it caught was body A's
    later write: the group is undone all the same, and both are told."""
    database = f"sqlite+aiosqlite:///{tmp_path / 'group.db'}"

    async def body(db: chatsvc.Database) -> None:
        await db.execute("INSERT INTO later_t (n) VALUES (7)")

        async def a():
            await db.execute("INSERT INTO later_t (n) VALUES (1)")
            await db.execute("INSERT INTO later_t (n) VALUES (7)", later=True)

        async def b():
            with contextlib.suppress(Exception):
                await db.execute("INSERT INTO later_t (n) VALUES (2)")
            return "went on"

        outcomes = await _gathered_behind_a_transaction(db, [a, b])
        assert all(isinstance(outcome, chatsvc.StorageUnavailable) for outcome in outcomes), outcomes
        assert [row["n"] for row in await db.fetch_all("SELECT n FROM later_t ORDER BY n")] == [0, 7]

    on(database, body)


def test_fetch_each_runs_a_statement_for_each_values_in_one_hop_and_stops_at_a_failure(tmp_path):
    """SQLite: each statement is a transaction of its own, and each Later gets its rows; a failure is
    raised, the statements before it kept (their Laters have rows), those after it not run (None)."""
    database = f"sqlite+aiosqlite:///{tmp_path / 'each.db'}"

    async def body(db: chatsvc.Database) -> None:
        await db.execute("INSERT INTO later_t (n) VALUES (2)")
        sql = "INSERT INTO later_t (n) VALUES (:n) RETURNING n"
        each = [({"n": n}, chatsvc.Later()) for n in (1, 3)]
        with Hops(db._raw[chatsvc.BACKGROUND]) as hops:
            await db.fetch_each(sql, each, chatsvc.BACKGROUND)
        assert hops.count == 1 and [later.rows for _, later in each] == [[{"n": 1}], [{"n": 3}]]
        each = [({"n": n}, chatsvc.Later()) for n in (4, 2, 5)]
        with pytest.raises(Exception) as failed:
            await db.fetch_each(sql, each, chatsvc.BACKGROUND)
        assert chatsvc._violation(failed.value) == "unique", failed.value
        assert [later.rows for _, later in each] == [[{"n": 4}], None, None]
        assert [row["n"] for row in await db.fetch_all("SELECT n FROM later_t ORDER BY n")] == [1, 2, 3, 4]

    on(database, body)
