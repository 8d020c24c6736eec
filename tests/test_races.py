"""The conversation tree under concurrency, on PostgreSQL: a branch switch, a branch delete and a new
answer racing each other. Each race is made to happen, not hoped for: another connection holds the
conversation's row (as a transaction of another replica would) so that the requests queue behind
it in a known order, or a statement of the service waits at a known point until the other request
has done its part. (On SQLite, write transactions run one at a time and a switch is one statement:
these interleavings cannot happen there.)"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

import asyncpg
import pytest
from fake_dashscope import Reply
from live import LiveServer
from support import EMPTY_POSTGRES, Service, pg, wait_for

import chatsvc

API = "/api/v1"
CONV = f"{API}/context/conversations"
LOCKED_ELSEWHERE = "locked by another process"


class Session:
    """A PostgreSQL connection of the test's own (another process, to the service), driven from
    synchronous test code through an event loop of its own."""

    def __init__(self, url: str):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.conn = self.call(asyncpg.connect(url))

    def call(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self, sql: str, *args) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(self.conn.fetch(sql, *args), self.loop)

    def execute(self, sql: str, *args) -> list:
        return self.call(self.conn.fetch(sql, *args))

    def close(self) -> None:
        self.call(self.conn.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def waiting_for_locks(url: str) -> int:
    """How many statements on this database wait for a lock right now."""
    rows = pg(url, "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database()"
                   " AND wait_event_type = 'Lock'")  # fmt: skip
    return rows[0]["n"]


@pytest.fixture
def pg_service(postgres_database, fake):
    pg(postgres_database, EMPTY_POSTGRES)
    return Service(postgres_database, fake)


@pytest.fixture
def live(pg_service):
    with LiveServer(pg_service.settings) as server:
        yield server


@pytest.fixture
def pool():
    with concurrent.futures.ThreadPoolExecutor(4) as workers:
        yield workers


def send(client, fake, **body) -> dict:
    fake.push(Reply.answer([f"re: {body.get('message', 'again')}"]))
    r = client.post(f"{API}/chat/s1", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def conversation_locked(service: Service) -> Session:
    """Another connection holds the conversation's row (FOR UPDATE) until its transaction ends."""
    holder = Session(service.url)
    holder.execute("BEGIN")
    holder.execute("SELECT 1 FROM conversations WHERE session_id = 's1' FOR UPDATE")
    return holder


def test_a_switch_racing_the_delete_of_its_branch_never_lands_on_a_deleted_message(live, fake, pg_service, pool):
    """The switch to a1 (whose newest leaf is a2) and the delete of a1's branch queue behind another
    transaction on the conversation's row, the switch first. Before the fix the switch's leaf came
    from the snapshot its statement started with, and it set current_message_id to a2 after the
    delete had removed it: the conversation showed no messages and a chat without parent_id was 404."""
    with live.client() as client:
        first = send(client, fake, message="q1")
        other = send(client, fake, regenerate=first["message_id"])  # q1 → {a1, a1b}; current: a1b
        assert client.patch(f"{CONV}/s1", json={"current_message_id": first["message_id"]}).status_code == 200
        second = send(client, fake, message="q2")  # a1 → q2 → a2
        assert client.patch(f"{CONV}/s1", json={"current_message_id": other["message_id"]}).status_code == 200
        holder = conversation_locked(pg_service)
        try:
            switch = pool.submit(client.patch, f"{CONV}/s1", json={"current_message_id": first["message_id"]})
            wait_for(lambda: waiting_for_locks(pg_service.url) == 1, timeout=30)
            delete = pool.submit(client.delete, f"{CONV}/s1/messages/{first['message_id']}")
            wait_for(lambda: waiting_for_locks(pg_service.url) == 2, timeout=30)
            holder.execute("COMMIT")
            switched, deleted = switch.result(30), delete.result(30)
        finally:
            holder.close()
        assert switched.status_code in (200, 404), switched.text
        assert deleted.status_code == 200, deleted.text
        assert deleted.json()["current_message_id"] == other["message_id"]
        ids = {row["id"] for row in pg_service.rows("SELECT id FROM messages")}
        assert ids == {first["parent_id"], other["message_id"]}
        (row,) = pg_service.rows("SELECT current_message_id FROM conversations")
        assert row["current_message_id"] == other["message_id"]  # the deleted message's parent's newest leaf
        assert second["message_id"] not in ids
        # a client that knows nothing of trees goes on where the user is
        assert [m["content"] for m in client.get(f"{CONV}/s1").json()["messages"]] == ["q1", "re: again"]
        third = send(client, fake, message="q3")
        assert fake.requests[-1].body["messages"][1:] == [
            {"role": "user", "content": "q1"}, {"role": "assistant", "content": "re: again"},
            {"role": "user", "content": "q3"},
        ]  # fmt: skip
        assert client.get(f"{CONV}/s1").json()["current_message_id"] == third["message_id"]


def test_a_delete_queued_behind_a_regeneration_of_its_answer_is_409_and_the_answer_goes_on(
    live, fake, pg_service, pool
):
    """The regeneration of a1 and the delete of its question q1 queue behind another transaction on
    the conversation's row, the regeneration first. Before the fix the delete locked q1 and then the
    conversation, the regeneration the conversation and then q1: a deadlock, answered `503 ... locked
    by another process`. Now both take the conversation's row first: the regeneration is stored, and
    the delete, which then sees its answer `streaming`, is `409 conversation_busy`."""
    with live.client() as client:
        first = send(client, fake, message="q1")
        fake.push(Reply.answer([f"w{i} " for i in range(300)], pause=0.02))  # 6 s: running while the delete reads
        holder = conversation_locked(pg_service)
        try:
            reader = pool.submit(live.reader, "POST", f"{API}/chat/s1/stream", json={"regenerate": first["message_id"]})
            wait_for(lambda: waiting_for_locks(pg_service.url) == 1, timeout=30)
            delete = pool.submit(client.delete, f"{CONV}/s1/messages/{first['parent_id']}")
            wait_for(lambda: waiting_for_locks(pg_service.url) == 2, timeout=30)
            holder.execute("COMMIT")
            deleted = delete.result(30)
            stream = reader.result(30)
        finally:
            holder.close()
        assert LOCKED_ELSEWHERE not in deleted.text
        assert deleted.status_code == 409 and deleted.json()["code"] == "conversation_busy", deleted.text
        assert "stop it first" in deleted.json()["detail"]
        assert [stream.next_event()["type"], stream.next_event()["type"]] == ["start", "chunk"]
        assert client.post(f"{API}/chat/s1/stop").json()["stopped"] is True
        events = stream.until_end()
        assert events[-1]["type"] == "end" and events[-1]["data"]["finish_reason"] == "stopped", events[-1]
        rows = pg_service.rows("SELECT id, status, content FROM messages ORDER BY id")
        assert [r["status"] for r in rows] == ["complete", "complete", "stopped"]
        assert rows[0]["id"] == first["parent_id"]
        assert rows[2]["content"] == events[-1]["data"]["full_text"] != ""  # nothing it said is lost


def test_a_regeneration_never_slips_between_a_deletes_check_and_its_delete(live, fake, pg_service, pool, monkeypatch):
    """The delete of q1 has found no running answer below it, and waits there until the regeneration
    of a1 has either been stored or is waiting for a lock. Before the fix the regeneration was
    stored meanwhile and the delete deleted it while it streamed (`200`; its reader was told the
    service stopped). Now the regeneration waits for the conversation's row: the delete goes first,
    whole, and the regeneration finds its question gone (`404`)."""
    checked, go_on = threading.Event(), threading.Event()
    all_rows = chatsvc.Database.fetch_all

    async def paused(self, sql, values=None, role=chatsvc.READ):
        if sql.endswith("DELETE FROM messages WHERE id IN (SELECT id FROM sub)"):
            checked.set()
            await asyncio.to_thread(go_on.wait, 30)
        return await all_rows(self, sql, values, role)

    monkeypatch.setattr(chatsvc.Database, "fetch_all", paused)
    with live.client() as client:
        first = send(client, fake, message="q1")
        fake.push(Reply.answer([f"w{i} " for i in range(20)], pause=0.02))
        delete = pool.submit(client.delete, f"{CONV}/s1/messages/{first['parent_id']}")
        assert checked.wait(30)

        def regeneration_stored_or_waiting() -> bool:
            streaming = pg_service.rows("SELECT id FROM messages WHERE status = 'streaming'")
            return bool(streaming) or waiting_for_locks(pg_service.url) == 1

        regenerate = pool.submit(client.post, f"{API}/chat/s1", json={"regenerate": first["message_id"]})
        try:
            wait_for(regeneration_stored_or_waiting, timeout=30)
        finally:
            go_on.set()
        deleted, regenerated = delete.result(30), regenerate.result(30)
    assert deleted.status_code == 200, deleted.text
    assert regenerated.status_code == 404 and regenerated.json()["code"] == "not_found", regenerated.text
    assert regenerated.json()["detail"] == f"Conversation 's1' has no message '{first['parent_id']}'."
    assert pg_service.rows("SELECT id FROM messages") == []
    assert pg_service.rows("SELECT current_message_id FROM conversations") == [{"current_message_id": None}]


def test_a_delete_takes_the_deleted_messages_own_parent_whatever_order_the_walk_returns(
    client, fake, service, monkeypatch
):
    """Both databases. The walk of the branch below a message has no ORDER BY: a database may return
    its rows in any order (PostgreSQL's hash join: in the table's physical order, where a child
    can come before its parent once a vacuum has freed space before them). Here they come deepest
    first. Before the fix the first row was taken to be the deleted message: the current leaf moved
    to the parent of a deleted message, that is nowhere (`current_message_id` null, the conversation
    empty, the next chat without history)."""
    first = send(client, fake, message="q1")
    send(client, fake, message="q2")
    send(client, fake, message="q3")  # q1 → a1 → q2 → a2 → q3 → a3
    all_rows = chatsvc.Database.fetch_all

    async def deepest_first(self, sql, values=None, role=chatsvc.READ):
        rows = await all_rows(self, sql, values, role)
        if sql.startswith("WITH RECURSIVE sub") and "DELETE" not in sql:
            rows = sorted(rows, key=lambda row: row["id"], reverse=True)
        return rows

    monkeypatch.setattr(chatsvc.Database, "fetch_all", deepest_first)
    r = client.delete(f"{CONV}/s1/messages/{first['message_id']}")  # a1 and everything below it
    assert r.status_code == 200, r.text
    assert r.json()["current_message_id"] == first["parent_id"]  # a1's parent, q1, has no other child
    assert [m["content"] for m in client.get(f"{CONV}/s1").json()["messages"]] == ["q1"]
    assert service.rows("SELECT current_message_id FROM conversations") == [{"current_message_id": first["parent_id"]}]


def deadlock(url: str) -> BaseException:
    """A real deadlock between two connections: the error PostgreSQL gives the one it cancels."""

    async def run() -> BaseException:
        a, b = await asyncpg.connect(url), await asyncpg.connect(url)
        try:
            await a.execute("CREATE TABLE IF NOT EXISTS cycle (n INTEGER PRIMARY KEY)")
            await a.execute("INSERT INTO cycle VALUES (1), (2) ON CONFLICT DO NOTHING")
            await b.execute("SET deadlock_timeout = '20s'")  # a is the one that finds the cycle
            async with a.transaction(), b.transaction():
                await a.execute("UPDATE cycle SET n = n WHERE n = 1")
                await b.execute("UPDATE cycle SET n = n WHERE n = 2")
                waits = asyncio.ensure_future(b.execute("UPDATE cycle SET n = n WHERE n = 1"))
                try:
                    await a.execute("UPDATE cycle SET n = n WHERE n = 2")
                except Exception as exc:
                    return exc
                finally:
                    await asyncio.wait_for(waits, 30)
                raise AssertionError("no deadlock")
        finally:
            await a.close()
            await b.close()

    return asyncio.run(run())


def test_a_deadlock_is_said_as_what_it_is(postgres_database):
    """PostgreSQL's deadlock message says which process each one is "blocked by": before the fix it
    was classified `locked` and said "locked by another process (a backup, or an open sqlite3
    shell?)"."""
    exc = deadlock(postgres_database)
    assert type(exc).__name__ == "DeadlockDetectedError" and "blocked by" in str(exc)
    assert chatsvc.fault_kind(exc) == "deadlock"
    detail = chatsvc.storage_fault(exc)
    assert LOCKED_ELSEWHERE not in detail and "deadlock" in detail and "try again" in detail
    # and what is locked is still said so
    assert chatsvc.fault_kind(Exception("database is locked")) == "locked"
    assert chatsvc.fault_kind(Exception("canceling statement due to lock timeout")) == "locked"


def test_a_delete_cancelled_by_a_deadlock_runs_again(live, fake, pg_service, pool):
    """Another transaction holds a2's row and then asks for the conversation's, which the delete of
    q2's branch holds while it waits for a2: PostgreSQL cancels the delete (this transaction's
    deadlock_timeout is the longer). The delete wrote nothing, so it runs again once the other
    transaction has ended, and answers `200`; the deadlock is counted as one."""
    with live.client() as client:
        send(client, fake, message="q1")
        second = send(client, fake, message="q2")
        holder = Session(pg_service.url)
        try:
            holder.execute("SET deadlock_timeout = '20s'")
            holder.execute("BEGIN")
            holder.execute("SELECT 1 FROM messages WHERE id = $1 FOR UPDATE", second["message_id"])
            delete = pool.submit(client.delete, f"{CONV}/s1/messages/{second['parent_id']}")
            wait_for(lambda: waiting_for_locks(pg_service.url) == 1, timeout=30)
            holder.execute("SELECT 1 FROM conversations WHERE session_id = 's1' FOR UPDATE")  # the delete is cancelled
            holder.execute("ROLLBACK")
            deleted = delete.result(30)
        finally:
            holder.close()
        assert deleted.status_code == 200, deleted.text
        assert [m["content"] for m in client.get(f"{CONV}/s1").json()["messages"]] == ["q1", "re: q1"]
        metrics = client.get("/metrics").text
    assert 'chatsvc_storage_faults_total{kind="deadlock"} 1.0' in metrics


@pytest.mark.parametrize("purge", [True, False])
def test_a_clear_waiting_behind_a_turn_takes_that_turn_too(live, fake, pg_service, pool, purge):
    """Another replica's turn (q2 and its answer, still being written) commits while the clear waits
    for the conversation's row. Before the fix the clear computed its start from the snapshot its
    UPDATE began with, below that turn: a purge then deleted q2's parent and left q2 (a raw foreign key
    error, 500), and a plain clear left the turn in the model's context."""
    with live.client() as client:
        first = send(client, fake, message="q1")
        (top,) = pg_service.rows("SELECT MAX(id) AS id FROM messages")
        q2 = chatsvc.new_message_id(top["id"])
        a2 = chatsvc.new_message_id(q2)
        now = chatsvc.utcnow()
        holder = Session(pg_service.url)
        try:  # a turn as begin_turn writes it: the conversation's row first, then its two messages
            holder.execute("BEGIN")
            holder.execute("UPDATE conversations SET current_message_id = $1, updated_at = $2 WHERE session_id = 's1'",
                           a2, now)  # fmt: skip
            holder.execute(
                "INSERT INTO messages (id, parent_id, owner, session_id, role, content, status, model, created_at,"
                " updated_at) VALUES ($1, $2, '', 's1', 'user', 'q2', 'complete', NULL, $4, $4),"
                " ($3, $1, '', 's1', 'assistant', '', 'streaming', 'qwen-plus', $4, $4)",
                q2, first["message_id"], a2, now,
            )  # fmt: skip
            clear = pool.submit(client.delete, f"{CONV}/s1/context", params={"purge": str(purge).lower()})
            wait_for(lambda: waiting_for_locks(pg_service.url) == 1, timeout=30)
            holder.execute("COMMIT")
            cleared = clear.result(30)
        finally:
            holder.close()
        assert cleared.status_code == 200, cleared.text
        assert cleared.json()["context_message_count"] == 0  # nothing after the clear
        rows = {r["id"]: r for r in pg_service.rows("SELECT id, parent_id FROM messages")}
        (conversation,) = pg_service.rows("SELECT context_start, current_message_id FROM conversations")
        assert conversation["context_start"] >= a2  # the turn committed first: it is before the clear
        if purge:
            assert set(rows) == {a2}  # everything before went, the running answer stays as a first message
            assert rows[a2]["parent_id"] is None
            assert conversation["current_message_id"] == a2
        else:
            assert set(rows) == {first["parent_id"], first["message_id"], q2, a2}
            assert rows[q2]["parent_id"] == first["message_id"]
