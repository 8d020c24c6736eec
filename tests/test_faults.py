"""Storage faults, made real: a write lock held by another process, a full disk (a small tmpfs
mounted for the test), what the model sends that no column can hold, SIGKILL in a pause between
chunks, SIGKILL and an immediate restart, a second process on one SQLite file, an answer taken
for dead by another replica. For each: what every reader received equals what is stored, or the
reader was told `storage_failed` / `interrupted`; no 500; the conversation takes a new message once
the fault clears; /readyz says what is true."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fake_dashscope import Reply, chunk_event
from live import LiveServer, SSEReader
from procs import ServerProcess
from support import EMPTY_POSTGRES, Service, pg, wait_for

import chatsvc

API = "/api/v1"
pytestmark = pytest.mark.slow

# Each holds the lock until its standard input closes (or 60 s pass).
HOLD_SQLITE_LOCK = """
import select, sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
select.select([sys.stdin], [], [], 60)
db.execute("ROLLBACK")
"""

HOLD_POSTGRES_LOCK = """
import asyncio, select, sys, asyncpg
async def main():
    conn = await asyncpg.connect(sys.argv[1])
    async with conn.transaction():
        await conn.execute("LOCK TABLE messages IN EXCLUSIVE MODE")  # reads go on, writes wait
        print("locked", flush=True)
        await asyncio.to_thread(select.select, [sys.stdin], [], [], 60)
asyncio.run(main())
"""


@contextlib.contextmanager
def write_lock(service: Service):
    """Another process holds the database's write lock until the block ends."""
    if service.is_sqlite:
        script, target = HOLD_SQLITE_LOCK, service.url.split("///", 1)[1]
    else:
        script, target = HOLD_POSTGRES_LOCK, service.url
    holder = subprocess.Popen([sys.executable, "-c", script, target], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert holder.stdout is not None and holder.stdout.readline().strip() == b"locked"
    try:
        yield holder
    finally:
        holder.stdin.close()
        holder.stdout.close()
        assert holder.wait(15) == 0


def answer_row(service: Service, session_id: str = "s1") -> dict:
    rows = service.rows(
        "SELECT content, reasoning_content, status, error_code, prompt_tokens, completion_tokens, total_tokens,"
        " last_seq FROM messages WHERE role = 'assistant' AND session_id = ? ORDER BY id",
        session_id,
    )
    return rows[-1]


def chunk_text(events) -> str:
    return "".join(e["data"]["content"] for e in events if e["type"] == "chunk")


# ── a write lock held by another process ────────────────────────────────────────────


def test_a_locked_database_delays_storage_never_chunks(make_service, fake):
    service = make_service(CHATSVC_CHECKPOINT_SECONDS="0.1", CHATSVC_UPSTREAM_IDLE_TIMEOUT="30")
    words = [f"w{i} " for i in range(80)]
    fake.push(Reply.answer(words, pause=0.1))  # 8 s at the model's pace
    fake.default = Reply.answer(["later"])
    with LiveServer(service.settings) as live, live.client(timeout=30) as client:
        reader = live.reader("POST", f"{API}/chat/s1/stream", json={"message": "long"})
        reader.next_event(), reader.next_event()
        with write_lock(service):
            arrivals = []
            while len(arrivals) < 20:  # 2 s of chunks while the database is locked
                reader.next_event()
                arrivals.append(time.monotonic())
            assert max(b - a for a, b in itertools.pairwise(arrivals)) < 1.0
            assert client.get(f"{API}/context/conversations/s1").status_code == 200  # reads go on
            r = client.post(f"{API}/chat/s2", json={"message": "hello"})  # a write waits, then says why
            assert r.status_code == 503 and r.json()["code"] == "storage_unavailable", r.text
            assert "locked" in r.json()["detail"] and int(r.headers["retry-after"]) >= 1
            ready = client.get("/readyz")
            assert ready.status_code == 503 and ready.json()["code"] == "storage_unavailable"
        events = reader.until_end()
        assert events[-1]["type"] == "end" and events[-1]["data"]["full_text"] == "".join(words)
        assert chunk_text(reader.events) == "".join(words)
        assert answer_row(service)["content"] == "".join(words) and answer_row(service)["status"] == "complete"
        wait_for(lambda: client.get("/readyz").status_code == 200, 10)  # recovers by itself
        assert client.post(f"{API}/chat/s2", json={"message": "hello"}).json()["response"] == "later"
    assert service.rows("SELECT content FROM messages WHERE session_id = 's2' AND role = 'user'") == [
        {"content": "hello"}
    ]  # the refused turn stored nothing


def test_a_final_write_that_keeps_failing_is_storage_failed_then_stored(make_service, fake):
    service = make_service(CHATSVC_STORAGE_TIMEOUT="1", CHATSVC_CHECKPOINT_SECONDS="0.1")
    fake.push(Reply.answer(["a ", "b ", "c "], pause=0.3))
    fake.default = Reply.answer(["next"])
    with LiveServer(service.settings) as live, live.client(timeout=30) as client:
        reader = live.reader("POST", f"{API}/chat/s1/stream", json={"message": "q"})
        listener = live.reader("GET", f"{API}/chat/s1/stream")
        reader.next_event()
        with write_lock(service):
            end = reader.until_end()[-1]
            assert end["type"] == "error" and end["data"]["code"] == "storage_failed"
            assert end["data"]["partial_text"] == "a b c " == chunk_text(reader.events)  # all it saw
            assert "keeps trying" in end["data"]["message"]
            assert listener.until_end()[-1] == end
            busy = client.post(f"{API}/chat/s1", json={"message": "again"})
            assert busy.status_code == 503 and busy.json()["code"] == "storage_unavailable", busy.text
            assert "not stored yet" in busy.json()["detail"]
            assert client.get("/readyz").status_code == 503
            assert answer_row(service)["status"] == "streaming"  # not stored yet: what readers were told
        wait_for(lambda: answer_row(service)["status"] == "complete", 20)  # the write went on, and landed
        assert answer_row(service)["content"] == "a b c "
        wait_for(lambda: client.get("/readyz").status_code == 200, 10)
        assert client.post(f"{API}/chat/s1", json={"message": "again"}).json()["response"] == "next"


# ── a full disk ──────────────────────────────────────────────────────────────────────


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB filesystem of its own (tmpfs): it fills up for real."""
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("the full-disk test needs root to mount a small filesystem")
        pytest.skip("needs root to mount a small filesystem")
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(mount: Path) -> Path:
    filler = mount / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def test_a_full_disk_answers_503_loses_nothing_and_recovers(small_disk, fake):
    service = Service(f"sqlite+aiosqlite:///{small_disk / 'chatsvc.db'}", fake, CHATSVC_STORAGE_TIMEOUT="1",
                      CHATSVC_CHECKPOINT_SECONDS="0.1")  # fmt: skip
    words = [f"v{i} " for i in range(15)]
    fake.push(Reply.answer(["first"]), Reply.answer(words, pause=0.1))
    fake.default = Reply.answer(["after"])
    with LiveServer(service.settings) as live, live.client(timeout=30) as client:
        assert client.post(f"{API}/chat/s0", json={"message": "before"}).status_code == 200
        reader = live.reader("POST", f"{API}/chat/s1/stream", json={"message": "q"})
        reader.next_event(), reader.next_event()
        filler = fill(small_disk)
        end = reader.until_end()[-1]
        assert end["type"] == "error" and end["data"]["code"] == "storage_failed"
        assert end["data"]["partial_text"] == "".join(words) == chunk_text(reader.events)
        for session in ("s1", "s2"):  # the unstored answer's conversation, and a new one
            r = client.post(f"{API}/chat/{session}", json={"message": "during"})
            assert r.status_code == 503 and r.json()["code"] == "storage_unavailable", r.text
        assert "disk is full" in r.json()["detail"]
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "disk is full" in ready.json()["detail"]
        assert client.get(f"{API}/context/conversations/s0").status_code == 200  # reads go on
        filler.unlink()
        wait_for(lambda: answer_row(service)["status"] == "complete", 20)
        assert answer_row(service)["content"] == "".join(words)
        wait_for(lambda: client.get("/readyz").status_code == 200, 10)
        assert client.post(f"{API}/chat/s1", json={"message": "again"}).json()["response"] == "after"
    users = service.rows("SELECT session_id, content FROM messages WHERE role = 'user' ORDER BY id")
    assert users == [{"session_id": "s0", "content": "before"}, {"session_id": "s1", "content": "q"},
                     {"session_id": "s1", "content": "again"}]  # fmt: skip


# ── what the model sends that no column can hold ────────────────────────────────────


@pytest.mark.parametrize(
    ("usage", "kept"),
    [
        ("lots", None),
        ([1, 2, 3], None),
        ({"prompt_tokens": 2**40, "completion_tokens": -1, "total_tokens": "7"}, None),
        ({"prompt_tokens": 5, "completion_tokens": 2.5, "total_tokens": True}, {"prompt_tokens": 5}),
    ],
)
def test_usage_no_column_can_hold_is_dropped(client, service, fake, usage, kept):
    fake.push(Reply.of_events([chunk_event("fine", role="assistant"), chunk_event("", finish="stop"),
                               chunk_event(usage=usage), b"data: [DONE]\n\n"]))  # fmt: skip
    r = client.post(f"{API}/chat/s1", json={"message": "q"})
    assert r.status_code == 200 and r.json()["response"] == "fine"
    assert r.json().get("usage", None) == kept and ("usage" in r.json()) == (kept is not None)  # absent: none kept
    row = answer_row(service)
    assert row["status"] == "complete" and row["content"] == "fine"
    assert row["prompt_tokens"] == (kept or {}).get("prompt_tokens") and row["total_tokens"] is None
    assert client.post(f"{API}/chat/s1", json={"message": "next"}).status_code == 200  # not busy


def test_nul_and_lone_surrogates_from_the_model_become_replacement_characters(client, service, fake):
    fake.push(Reply.of_events([
        chunk_event("", role="assistant"),
        b'data: {"choices":[{"delta":{"content":"a\\u0000b "},"finish_reason":null,"index":0}]}\n\n',
        b'data: {"choices":[{"delta":{"reasoning_content":"r\\u0000","content":"x\\udc00y"},"index":0}]}\n\n',
        chunk_event("", finish="stop"),
        b"data: [DONE]\n\n",
    ]))  # fmt: skip
    events = client.post(f"{API}/chat/s1/stream", json={"message": "q"}).text
    assert "\\u0000" not in events and "\x00" not in events
    row = answer_row(service)
    assert row["status"] == "complete"
    assert row["content"] == "a\ufffdb x\ufffdy" and row["reasoning_content"] == "r\ufffd"
    messages = client.get(f"{API}/context/conversations/s1").json()["messages"]
    assert messages[1]["content"] == row["content"]


def test_an_answer_longer_than_the_limit_ends_with_length(make_service, fake):
    service = make_service(CHATSVC_MAX_ANSWER_CHARS="25")
    fake.push(Reply.answer(["0123456789"] * 50, pause=0.01))
    fake.default = Reply.answer(["short"])
    with service.client() as client:
        r = client.post(f"{API}/chat/s1", json={"message": "long"})
        assert r.status_code == 200 and r.json()["finish_reason"] == "length"
        assert r.json()["response"] == "0123456789" * 2 + "01234"
        assert answer_row(service)["content"] == r.json()["response"]
        assert client.post(f"{API}/chat/s1", json={"message": "next"}).json()["response"] == "short"


def test_a_reader_catching_up_copies_a_bounded_batch_at_a_time():
    async def run() -> list[int]:
        answer = chatsvc.Answer("", "s1", "m1", "qwen-plus")
        for i in range(1000):
            answer.add("chunk", f"{i} ")
        answer.done.set()
        return [batch.count(b"\n\n") async for batch in answer.events()]

    sizes = asyncio.run(run())
    assert sum(sizes) == 1000 and max(sizes) == chatsvc.BATCH_EVENTS


# ── crashes ──────────────────────────────────────────────────────────────────────────


def test_sigkill_in_a_pause_between_chunks_keeps_the_text_before_it(service, fake, tmp_path):
    """The text is saved on a clock: a long pause of the model leaves nothing unsaved."""
    fake.push(Reply.answer(["one ", "two ", "three "], stall_at=4, stall=60))  # then a minute's pause
    fake.default = Reply.answer(["fine"])
    env = {**service.env, "CHATSVC_CHECKPOINT_SECONDS": "0.2", "CHATSVC_HEARTBEAT_SECONDS": "0.2"}
    server = ServerProcess(env, tmp_path).start()
    with server.client() as client:
        reader = SSEReader(client, "POST", f"{API}/chat/s1/stream", json={"message": "q"})
        seen = [reader.next_event() for _ in range(4)]
        wait_for(lambda: answer_row(service)["content"] == "one two three ", 2)  # within the interval
        server.kill()
    assert answer_row(service)["status"] == "streaming"
    server = ServerProcess(env, tmp_path).start()
    try:
        with server.client() as client:
            # a reader resuming after the last event it saw gets the answer's end, whatever the checkpoint covered
            channel = SSEReader(server.client(), "GET", f"{API}/chat/s1/stream",
                                headers={"Last-Event-ID": seen[-1]["id"]})  # fmt: skip
            end = channel.until_end()[-1]
            assert end["type"] == "error" and end["data"]["code"] == "interrupted"
            assert end["data"]["partial_text"] == "one two three "
            channel.close()
            if service.is_sqlite:  # one process per file: interrupted at start, the next message is taken at once
                assert client.post(f"{API}/chat/s1", json={"message": "again"}).json()["response"] == "fine"
            else:  # another replica might be producing it: interrupted once its heartbeat is 3 intervals old
                wait_for(lambda: client.post(f"{API}/chat/s1", json={"message": "again"}).status_code == 200, 5)
            row = service.rows("SELECT status, content FROM messages WHERE role = 'assistant' ORDER BY id")[0]
            assert row == {"status": "interrupted", "content": "one two three "}
    finally:
        server.stop()


def test_a_second_process_on_one_sqlite_file_refuses_to_start(fake, tmp_path):
    service = Service(f"sqlite+aiosqlite:///{tmp_path / 'chatsvc.db'}", fake)  # PostgreSQL serves several
    first = ServerProcess(service.env, tmp_path).start()
    try:
        second = ServerProcess(service.env, tmp_path)
        env = {**os.environ, **service.env, "PORT": str(second.port), "PYTHONPATH": str(Path(__file__).parent.parent)}
        done = subprocess.run([sys.executable, "-c", "import sys, chatsvc; sys.exit(chatsvc.main())"], env=env,
                              capture_output=True, text=True, timeout=30)  # fmt: skip
        assert done.returncode == 2
        message = done.stderr.strip()
        assert message.count("\n") == 0 and "Another chatsvc process" in message and str(first.proc.pid) in message
        with first.client() as client:
            assert client.get("/readyz").status_code == 200
    finally:
        first.stop()


def test_an_answer_whose_row_is_still_being_written_is_not_taken_for_dead(postgres_database, fake):
    """PostgreSQL: the heartbeat vouches for an answer from the moment its row is claimed, before
    the transaction writing it commits. A beat that misses the row then must not call the answer
    taken: its word would reach the answer after it started and stop it for nothing (under load
    this left rows `interrupted` with no text)."""
    pg(postgres_database, EMPTY_POSTGRES)
    service = Service(postgres_database, fake, CHATSVC_HEARTBEAT_SECONDS="0.1")
    with LiveServer(service.settings) as live:
        relay = live.relay
        told: list[set] = []
        loop = next(iter(relay._tasks)).get_loop()
        relay.taken = lambda ids: told.append(set(ids))  # what the heartbeat tells the event loop
        then = "2026-01-01T00:00:00.000Z"
        service.rows("INSERT INTO conversations (owner, session_id, created_at, updated_at) VALUES ('', 's1', ?, ?)",
                     then, then)  # fmt: skip
        service.rows("INSERT INTO messages (id, owner, session_id, role, content, status, created_at, updated_at)"
                     " VALUES ('committed', '', 's1', 'assistant', '', 'streaming', ?, ?)", then, then)  # fmt: skip
        for claimed in ("committed", "not-committed-yet"):
            loop.call_soon_threadsafe(relay._claiming.add, claimed)
        # the beat ran, with both claimed ids: the committed row's heartbeat moved
        assert wait_for(lambda: service.rows("SELECT updated_at FROM messages")[0]["updated_at"] != then)
        time.sleep(0.5)  # and several beats more
        loop.call_soon_threadsafe(relay._claiming.clear)
    assert told == []


def test_the_heartbeats_word_stops_only_the_generation_it_names(fake, tmp_path):
    """What the heartbeat vouches for names each answer's generation (its row's `continued` count;
    None while its row is being claimed), and its word that a row was taken stops only the answer of
    that generation: one continued here since (another generation of the same row) goes on."""
    service = Service(f"sqlite+aiosqlite:///{tmp_path / 'chatsvc.db'}", fake)
    hold = threading.Event()
    fake.push(Reply.answer(["a ", "b "], hold=hold, hold_at=2))
    with LiveServer(service.settings) as live, live.client() as client:
        relay = live.relay
        loop = next(iter(relay._tasks)).get_loop()
        reader = SSEReader(client, "POST", "/api/v1/chat/s1/stream", json={"message": "q"})
        mid = reader.next_event()["data"]["message_id"]
        assert relay.vouched() == {mid: 0}
        loop.call_soon_threadsafe(relay._claiming.add, "being-claimed")
        assert wait_for(lambda: relay.vouched() == {mid: 0, "being-claimed": None})
        loop.call_soon_threadsafe(relay.taken, {mid: 1})  # another generation's row: not this answer's
        time.sleep(0.3)
        assert relay.registry.running(("", "s1")).phase in chatsvc.PRODUCING
        loop.call_soon_threadsafe(relay.taken, {mid: 0})
        wait_for(lambda: relay.registry.running(("", "s1")) is None or relay.registry.running(("", "s1")).done.is_set())
        hold.set()
        end = reader.until_end()[-1]
        reader.close()
    assert end["type"] == "error", end


HOLD_POSTGRES_ROW_LOCK = """
import asyncio, select, sys, asyncpg
async def main():
    conn = await asyncpg.connect(sys.argv[1])
    async with conn.transaction():
        await conn.execute("SELECT id FROM messages WHERE id = $1 FOR UPDATE", sys.argv[2])
        print("locked", flush=True)
        await asyncio.to_thread(select.select, [sys.stdin], [], [], 60)
asyncio.run(main())
"""


def test_a_locked_answer_row_never_holds_the_heartbeat_of_the_others(postgres_database, fake):
    """PostgreSQL: while another transaction holds one answer's row (as a checkpoint's batch or an
    end being written does), the heartbeat goes on beating this process's other answers (waiting
    for the lock held the beat past the three intervals another replica allows), and the locked
    answer is not taken for anyone's: both run to the end."""
    pg(postgres_database, EMPTY_POSTGRES)
    service = Service(postgres_database, fake, CHATSVC_HEARTBEAT_SECONDS="0.1", CHATSVC_CHECKPOINT_SECONDS="60")
    fake.push(*(Reply.answer([f"{sid}-{i} " for i in range(40)], pause=0.05) for sid in ("a", "b")))
    with LiveServer(service.settings) as live:
        readers = {sid: live.reader("POST", f"{API}/chat/{sid}/stream", json={"message": "go"}) for sid in "ab"}
        ids = {sid: reader.next_event()["data"]["message_id"] for sid, reader in readers.items()}

        def beat_of(sid: str) -> str:
            return service.rows("SELECT updated_at FROM messages WHERE id = ?", ids[sid])[0]["updated_at"]

        holder = subprocess.Popen([sys.executable, "-c", HOLD_POSTGRES_ROW_LOCK, service.url, ids["a"]],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == b"locked"
            beats = [beat_of("b")]
            for _ in range(4):  # beats of b while a's row is held: every 0.1 s, not held back by a's lock
                time.sleep(0.25)
                beats.append(beat_of("b"))
            assert len(set(beats)) == len(beats), beats
        finally:
            holder.stdin.close()
            holder.stdout.close()
            assert holder.wait(15) == 0
        ends = {sid: reader.until_end()[-1] for sid, reader in readers.items()}
    for sid in "ab":
        assert ends[sid]["type"] == "end", ends[sid]
        assert ends[sid]["data"]["full_text"] == "".join(f"{sid}-{i} " for i in range(40))
    rows = service.rows("SELECT status FROM messages WHERE role = 'assistant'")
    assert [r["status"] for r in rows] == ["complete", "complete"]


def test_an_answer_taken_for_dead_is_told_to_its_readers_and_the_verdict_stands(postgres_database, fake):
    """PostgreSQL (on SQLite one process serves the file): another replica stored this answer
    `interrupted` (its heartbeat looked stale): the producer learns it from its next heartbeat,
    stops, tells its readers, and never overwrites the verdict."""
    pg(postgres_database, EMPTY_POSTGRES)
    service = Service(postgres_database, fake, CHATSVC_HEARTBEAT_SECONDS="0.2", CHATSVC_CHECKPOINT_SECONDS="0.1")
    fake.push(Reply.answer([f"t{i} " for i in range(200)], pause=0.05))
    fake.default = Reply.answer(["fine"])
    with LiveServer(service.settings) as live, live.client() as client:
        reader = live.reader("POST", f"{API}/chat/s1/stream", json={"message": "q"})
        for _ in range(5):
            reader.next_event()
        service.rows("UPDATE messages SET status = 'interrupted', error_code = 'interrupted', content = 'verdict'"
                     " WHERE role = 'assistant'")  # fmt: skip
        started = time.monotonic()
        end = reader.until_end()[-1]
        assert time.monotonic() - started < 2
        assert end["type"] == "error" and end["data"]["code"] == "interrupted"
        assert end["data"]["partial_text"] == "verdict"  # what the database holds
        time.sleep(0.3)
        assert answer_row(service)["status"] == "interrupted" and answer_row(service)["content"] == "verdict"
        assert client.post(f"{API}/chat/s1", json={"message": "again"}).json()["response"] == "fine"
