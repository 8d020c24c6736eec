"""The Database room: a transaction's statements, all or nothing, in order, on SQLite and PostgreSQL;
on SQLite, `later` writes go to the write connection's thread with the statement after them (one hop
each, where every statement was one)."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest
from fake_dashscope import Reply
from support import pg

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


def test_a_turn_and_its_end_on_sqlite_reach_the_write_thread_in_five_hops(tmp_path, fake):
    """What the `later` writes buy: a turn's transaction was six hops (BEGIN, the conversation, the
    messages, the owner's usage, the call's row, COMMIT) and its end six: now two (BEGIN, the
    conversation, the messages and the owner's usage; the call's row and COMMIT) and three (BEGIN,
    the answer's final row and the calls it settles; their settlement; the owners' windows and
    COMMIT)."""
    from support import Service

    service = Service(f"sqlite+aiosqlite:///{tmp_path / 'chatsvc.db'}", fake)
    with service.client() as client:
        fake.push(Reply.answer(["warm"]))
        assert client.post(f"{API}/chat/s0", json={"message": "warm"}).status_code == 200
        fake.push(Reply.answer(["a ", "b"]))
        with Hops(client.app.state.store.db._raw[chatsvc.WRITE]) as hops:
            reply = client.post(f"{API}/chat/s1", json={"message": "hi"})
        assert reply.status_code == 200 and reply.json()["response"] == "a b"
        assert hops.count == 5
        [row] = service.rows("SELECT content, status FROM messages WHERE session_id = 's1' AND role = 'assistant'")
        assert row == {"content": "a b", "status": "complete"}
        [call] = service.rows("SELECT state FROM usage_calls WHERE session_id = 's1'")
        assert call == {"state": "settled"}
