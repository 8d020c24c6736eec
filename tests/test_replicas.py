"""Several replicas on one PostgreSQL database: two (or three) `chatsvc` processes on their own
ports, one throw-away database. They share conversations through the database and follow each
other's answers through LISTEN/NOTIFY. Without PostgreSQL these tests skip (not under CI=true)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time

import pytest
from fake_dashscope import Reply
from live import LiveServer, SSEReader
from procs import ServerProcess
from rawhttp import request, sse_events
from support import EMPTY_POSTGRES, Service, pg, wait_for

import chatsvc

API = "/api/v1"
pytestmark = pytest.mark.slow


def slow(n: int, pause: float = 0.05, prefix: str = "w") -> Reply:
    return Reply.answer([f"{prefix}{i} " for i in range(n)], pause=pause)


def start_together(*servers: ServerProcess) -> None:
    """Replicas usually start at the same moment (a deployment): so do these."""
    errors = []
    threads = [threading.Thread(target=lambda s=s: errors.append(None) if s.start() else None) for s in servers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(errors) == len(servers), "a replica did not start"


@pytest.fixture
def cluster(postgres_database, fake, tmp_path):
    pg(postgres_database, EMPTY_POSTGRES)
    service = Service(postgres_database, fake, CHATSVC_HEARTBEAT_SECONDS="0.3", CHATSVC_CHECKPOINT_SECONDS="0.1",
                      CHATSVC_UPSTREAM_IDLE_TIMEOUT="30")  # fmt: skip
    servers: list[ServerProcess] = []

    def replica() -> ServerProcess:
        servers.append(ServerProcess(service.env, tmp_path))
        return servers[-1]

    a, b = replica(), replica()
    start_together(a, b)
    yield service, a, b, replica
    exited = [server.stop() for server in servers]  # on SIGTERM, by itself: nothing it holds keeps it up
    for server in servers:
        assert "Traceback" not in server.log(), server.log()
    assert all(exited), [server.log()[-3000:] for server in servers]


def channel_listeners(server: ServerProcess) -> float:
    """The replica's open channel streams (GET .../stream), from its /metrics."""
    with server.client() as client:
        lines = client.get("/metrics").text.splitlines()
    return next(float(line.split()[1]) for line in lines if line.startswith("chatsvc_channel_listeners "))


def put_answer(service: Service, message_id: str, status: str, content: str, heartbeat: str, **columns) -> None:
    """Conversation s1 with one answer, `message_id`, written as another process would leave it."""
    now = chatsvc.utcnow()
    service.rows("INSERT INTO conversations (owner, session_id, created_at, updated_at) VALUES ('', 's1', ?, ?)",
                 now, now)  # fmt: skip
    names = "".join(f", {name}" for name in columns)
    service.rows(
        f"INSERT INTO messages (id, owner, session_id, role, content, status, created_at, updated_at{names})"
        f" VALUES (?, '', 's1', 'assistant', ?, ?, ?, ?{', ?' * len(columns)})",
        message_id, content, status, now, heartbeat, *columns.values(),
    )  # fmt: skip


def chunk_text(events) -> str:
    return "".join(e["data"]["content"] for e in events if e["type"] == "chunk")


def test_one_answer_at_a_time_across_replicas(cluster, fake):
    service, a, b, _ = cluster
    fake.push(slow(20))
    with a.client() as ca, b.client() as cb:
        reader = SSEReader(ca, "POST", f"{API}/chat/s1/stream", json={"message": "first"})
        assert reader.next_event()["type"] == "start"
        refused = cb.post(f"{API}/chat/s1", json={"message": "second"})
        assert refused.status_code == 409 and refused.json()["code"] == "conversation_busy"
        assert reader.until_end()[-1]["type"] == "end"
        assert cb.post(f"{API}/chat/s1", json={"message": "third"}).status_code == 200
    users = service.rows("SELECT content FROM messages WHERE role = 'user' ORDER BY id")
    assert [r["content"] for r in users] == ["first", "third"]


def test_channel_on_one_replica_follows_an_answer_started_on_the_other(cluster, fake):
    _, a, b, _ = cluster
    fake.push(slow(30, 0.02))
    listener = SSEReader(a.client(), "GET", f"{API}/chat/s1/stream")
    wait_for(lambda: channel_listeners(a) == 1, 30)  # listening before the answer starts
    poster = SSEReader(b.client(), "POST", f"{API}/chat/s1/stream", json={"message": "hi"})
    posted = poster.until_end()
    heard = listener.until_end()
    assert heard == posted  # the same ids, types and data, none missing, none twice
    assert [e["id"] for e in heard] == [f"{posted[0]['data']['message_id']}:{i}" for i in range(len(posted))]
    assert chunk_text(heard) == "".join(f"w{i} " for i in range(30)) == posted[-1]["data"]["full_text"]
    listener.close()
    poster.close()


def test_replicas_reconnect_when_the_database_drops_their_connections(cluster, fake):
    service, a, b, _ = cluster
    # what a database restart or failover does to every connection: here, to all of the replicas'
    assert len(pg(service.url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                               " WHERE datname = current_database() AND pid <> pg_backend_pid()")) >= 4  # fmt: skip
    wait_for(lambda: "reconnected to the other replicas" in a.log() and "reconnected" in b.log(), 10)
    fake.push(slow(10, 0.02))
    listener = SSEReader(a.client(), "GET", f"{API}/chat/s1/stream")
    wait_for(lambda: channel_listeners(a) == 1, 30)
    with b.client() as client:
        assert client.post(f"{API}/chat/s1", json={"message": "hi"}).status_code == 200
    assert chunk_text(listener.until_end()) == "".join(f"w{i} " for i in range(10))
    listener.close()


def test_late_listeners_and_last_event_id_on_either_replica(cluster, fake):
    _, a, b, _ = cluster
    fake.push(slow(40))
    poster = SSEReader(b.client(), "POST", f"{API}/chat/s1/stream", json={"message": "hi"})
    for _ in range(11):
        poster.next_event()
    late = SSEReader(a.client(), "GET", f"{API}/chat/s1/stream")  # after events were published: from the start
    first = SSEReader(a.client(), "GET", f"{API}/chat/s1/stream")
    seen = [first.next_event() for _ in range(6)]
    first.close()
    # resumed on the other replica, then back on this one: no gap, no duplicate
    middle = SSEReader(b.client(), "GET", f"{API}/chat/s1/stream", headers={"Last-Event-ID": seen[-1]["id"]})
    seen += [middle.next_event() for _ in range(10)]
    middle.close()
    rest = SSEReader(a.client(), "GET", f"{API}/chat/s1/stream", headers={"Last-Event-ID": seen[-1]["id"]})
    seen += rest.until_end()
    posted = poster.until_end()
    all_posted = poster.events
    assert seen == all_posted == late.until_end()
    assert chunk_text(seen) == posted[-1]["data"]["full_text"]
    for reader in (poster, late, rest):
        reader.close()


def test_replica_started_mid_answer_catches_up_from_the_checkpoint(cluster, fake):
    _, a, _, replica = cluster
    # the model goes quiet after 24 chunks until the new replica listens: a replica takes seconds to
    # start on a busy machine, and the answer must still be running when it joins
    resume = threading.Event()
    fake.push(Reply.answer([f"w{i} " for i in range(60)], pause=0.05, hold=resume, hold_at=25))
    try:
        poster = SSEReader(a.client(), "POST", f"{API}/chat/s1/stream", json={"message": "hi"})
        for _ in range(20):
            poster.next_event()
        c = replica().start()  # it never saw this answer's first events
        joining = SSEReader(c.client(), "GET", f"{API}/chat/s1/stream")
        wait_for(lambda: channel_listeners(c) >= 1, 30)
    finally:
        resume.set()
    joined = joining.until_end()
    posted = poster.until_end()
    full_text = posted[-1]["data"]["full_text"]
    assert joined[0]["type"] == "start" and joined[-1] == posted[-1]
    assert chunk_text(joined) == full_text  # the checkpoint's text, then the live tail: nothing twice or missing
    seqs = [int(e["id"].rsplit(":", 1)[1]) for e in joined]
    assert seqs == sorted(set(seqs))  # ids only go forward, so Last-Event-ID resumes cleanly
    joining.close()
    poster.close()


@pytest.mark.parametrize("stop_on", ["same", "other"])
def test_stop_sent_to_either_replica(cluster, fake, stop_on):
    service, a, b, _ = cluster
    fake.push(slow(200))
    poster = SSEReader(b.client(), "POST", f"{API}/chat/s1/stream", json={"message": "hi"})
    for _ in range(5):
        poster.next_event()
    with (a if stop_on == "other" else b).client() as client:
        r = client.post(f"{API}/chat/s1/stop")
    assert r.status_code == 200 and r.json()["stopped"] is True
    end = poster.until_end()[-1]
    assert end["type"] == "end" and end["data"]["finish_reason"] == "stopped"
    stored = service.rows("SELECT content, status FROM messages WHERE role = 'assistant'")
    assert stored == [{"content": chunk_text(poster.events), "status": "stopped"}]
    poster.close()


def test_stop_reaches_an_answer_the_replica_never_heard_of(cluster, fake):
    # started before this replica was, and silent since (the model is thinking): only the database knows it
    service, a, _, replica = cluster
    # silent until the stop is answered, however long the new replica takes to start (not for a fixed
    # time, which a busy machine outlasts: the answer would be complete before the stop)
    thinking = threading.Event()
    fake.push(Reply.answer(["a ", "b ", "c "], hold=thinking, hold_at=2))
    try:
        poster = SSEReader(a.client(), "POST", f"{API}/chat/s1/stream", json={"message": "hi"})
        start = poster.next_event()
        c = replica().start()
        with c.client() as client:
            r = client.post(f"{API}/chat/s1/stop")
    finally:
        thinking.set()
    assert r.json() == {"session_id": "s1", "stopped": True, "message_id": start["data"]["message_id"]}
    end = poster.until_end()[-1]
    assert end["type"] == "end" and end["data"]["finish_reason"] == "stopped"
    assert service.rows("SELECT status FROM messages WHERE role = 'assistant'") == [{"status": "stopped"}]
    poster.close()


def test_restarting_a_replica_never_interrupts_another_ones_answer(cluster, fake):
    service, a, b, replica = cluster
    fake.push(slow(40))
    poster = SSEReader(b.client(), "POST", f"{API}/chat/s1/stream", json={"message": "hi"})
    poster.next_event()
    a.stop()
    replica().start()  # a new replica starts (and recovers) while b's answer runs
    assert poster.until_end()[-1]["type"] == "end"
    assert service.rows("SELECT status FROM messages WHERE role = 'assistant'") == [{"status": "complete"}]
    poster.close()


def test_a_dead_replicas_answer_is_interrupted_by_the_others(cluster, fake):
    service, a, b, _ = cluster
    fake.push(slow(400), Reply.answer(["fine"]))
    poster = SSEReader(b.client(), "POST", f"{API}/chat/s1/stream", json={"message": "hi"})
    listener = SSEReader(a.client(), "GET", f"{API}/chat/s1/stream")
    for _ in range(5):
        poster.next_event()
    b.kill()  # SIGKILL: no drain, no last word
    started = time.monotonic()
    end = listener.until_end()[-1]  # a notices b's heartbeat is gone, and tells its listeners
    assert end["type"] == "error" and end["data"]["code"] == "interrupted"
    assert time.monotonic() - started < 3  # 3 heartbeats of 0.3 s, plus one to notice
    stored = service.rows("SELECT status, content FROM messages WHERE role = 'assistant'")[0]
    assert stored["status"] == "interrupted" and stored["content"] == end["data"]["partial_text"]
    with a.client() as client:
        assert client.post(f"{API}/chat/s1", json={"message": "again"}).json()["response"] == "fine"
    listener.close()


def test_load_across_two_replicas_loses_and_duplicates_nothing(cluster, fake):
    service, a, b, _ = cluster
    answers, chunks = 100, 20
    fake.default = lambda seen: Reply.answer([f"{seen.body['messages'][-1]['content']}.{i} " for i in range(chunks)],
                                             pause=0.02)  # fmt: skip
    heard: dict[str, str] = {}
    posted: dict[str, str] = {}

    async def text_of(port: int, method: str, path: str, body: dict | None, into: dict, sid: str) -> None:
        response = await request("127.0.0.1", port, method, path, body)
        try:  # closed on a failed assertion too: no socket left open for a later test's warning
            assert response.status == 200
            text = []
            async for event in sse_events(response):
                if event["type"] == "chunk":
                    text.append(event["data"]["content"])
                if event["type"] in ("end", "error"):
                    assert event["type"] == "end" and event["data"]["full_text"] == "".join(text), (sid, event)
                    into[sid] = "".join(text)
                    return
        finally:
            response.close()

    async def one(i: int) -> None:
        post_to, listen_on = (a, b) if i % 2 else (b, a)
        sid = f"load-{i}"
        listener = asyncio.ensure_future(text_of(listen_on.port, "GET", f"{API}/chat/{sid}/stream", None, heard, sid))
        await asyncio.sleep(0.3)  # the listener is on before the answer starts
        await text_of(post_to.port, "POST", f"{API}/chat/{sid}/stream", {"message": f"m{i}"}, posted, sid)
        await asyncio.wait_for(listener, 30)

    async def run() -> None:
        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(answers))), 90)

    started = time.monotonic()
    # The machine's other core is busy too (CI runs beside other work): no replica's heartbeat may
    # fall behind far enough for another to take a living answer for dead.
    burner = subprocess.Popen(
        [sys.executable, "-c", "import time\nend = time.time() + 120\nwhile time.time() < end: pass"]
    )
    try:
        asyncio.run(run())
    finally:
        burner.kill()
        burner.wait()
    print(f"replicas: {answers} answers of {chunks} chunks, each heard on the other replica, "
          f"in {time.monotonic() - started:.1f} s")  # fmt: skip
    expected = {f"load-{i}": "".join(f"m{i}.{n} " for n in range(chunks)) for i in range(answers)}
    assert posted == expected and heard == expected
    rows = service.rows("SELECT id, session_id, role, content, status FROM messages ORDER BY id")
    assert len(rows) == 2 * answers and len({r["id"] for r in rows}) == 2 * answers
    stored = {r["session_id"]: r["content"] for r in rows if r["role"] == "assistant" and r["status"] == "complete"}
    assert stored == expected
    assert wait_for(lambda: all(s.proc.poll() is None for s in (a, b)))


def test_an_answer_committed_late_is_judged_only_on_time_its_process_could_beat_in(postgres_database, fake):
    """A turn's row gets its heartbeat inside the turn's transaction and is seen only once that
    commits: under load (CI's), seconds later. A sweep judging by the database's clock alone took such
    an answer for dead before its process could beat it once (this run's load test, 1 in 4 under 3 CPU
    burners). A replica takes an answer only after watching its heartbeat go unchanged for three
    intervals itself."""
    pg(postgres_database, EMPTY_POSTGRES)
    service = Service(postgres_database, fake, CHATSVC_HEARTBEAT_SECONDS="1.5")  # 4.5 s without a beat: dead
    with LiveServer(service.settings):
        # what another replica's turn commits after its transaction and COMMIT took 15 s (under dead_at_sight)
        put_answer(service, "late", "streaming", "so far", chatsvc.utcnow(15))

        def beat() -> str:
            [row] = pg(postgres_database, f"UPDATE messages SET updated_at = {chatsvc.PG_NOW} WHERE id = 'late'"
                                          " AND status = 'streaming' RETURNING updated_at")  # fmt: skip
            return row["updated_at"]

        time.sleep(2.0)  # its process's first beat comes an interval after the commit (the sweeps ran meanwhile)
        last = beat()
        for _ in range(10):  # and it beats on, for longer than three intervals
            time.sleep(0.5)
            last = beat()
        # its process is gone now: within three intervals and two sweeps, it is interrupted
        assert wait_for(
            lambda: service.rows("SELECT status FROM messages WHERE id = 'late'")[0]["status"] != "streaming", 20
        )
        [row] = pg(
            postgres_database,
            "SELECT status, content, EXTRACT(EPOCH FROM CAST(updated_at AS TIMESTAMP)"
            " - CAST(CAST($1 AS TEXT) AS TIMESTAMP)) AS after FROM messages WHERE id = 'late'",
            last,
        )
    assert row["status"] == "interrupted" and row["content"] == "so far"
    assert row["after"] >= 4.5  # by the database's clock: never before three intervals without a beat


def test_a_turn_that_cannot_commit_in_time_keeps_nothing(postgres_database, fake, monkeypatch):
    """Why a heartbeat a minute old is dead when first seen: no turn commits its answer's row later
    than TURN_STORE_SECONDS after writing its heartbeat (and its COMMIT is bounded by 30 s). One that
    would is rolled back whole: 503, nothing stored, the conversation free; counted as a storage fault."""
    pg(postgres_database, EMPTY_POSTGRES)
    service = Service(postgres_database, fake)
    with service.client() as client:
        monkeypatch.setattr(chatsvc, "TURN_STORE_SECONDS", -1.0)  # every turn is late
        refused = client.post(f"{API}/chat/s1", json={"message": "hi"})
        assert refused.status_code == 503 and refused.json()["code"] == "storage_unavailable"
        assert "took more than -1 s to store this turn; nothing of it was kept" in refused.json()["detail"]
        assert service.rows("SELECT id FROM messages") == [] and service.rows("SELECT id FROM usage_calls") == []
        faults = client.get("/metrics").text
        assert 'chatsvc_storage_faults_total{kind="timeout"} 1.0' in faults
        monkeypatch.setattr(chatsvc, "TURN_STORE_SECONDS", 10.0)
        fake.push(Reply.answer(["fine"]))
        assert client.post(f"{API}/chat/s1", json={"message": "hi"}).json()["response"] == "fine"
    assert len(fake.requests) == 1  # the refused turn never reached the model


def test_a_mirror_whose_final_event_was_lost_ends_from_the_store(postgres_database, fake):
    """A notification can be lost (a publisher or a listening connection failing): the heartbeat
    then finds the answer ended in the store and ends its mirror, so no listener waits forever."""
    pg(postgres_database, EMPTY_POSTGRES)
    service = Service(postgres_database, fake, CHATSVC_HEARTBEAT_SECONDS="0.2")
    with LiveServer(service.settings) as live:
        relay = live.relay
        loop = next(iter(relay._tasks)).get_loop()
        put_answer(service, "m1", "complete", "all of it", chatsvc.utcnow(), finish_reason="stop", last_seq=2)
        listener = live.reader("GET", f"{API}/chat/s1/stream")
        wait_for(lambda: live.listeners("s1"))
        start = chatsvc.sse_event("m1:0", {"type": "start", "data": {"session_id": "s1", "message_id": "m1"}})
        # what another replica published: its start, and then nothing more
        note = chatsvc.Notification("another-replica", chatsvc.Kind.EVENT, "", "s1", "m1", seq=0, event=start.decode())
        loop.call_soon_threadsafe(relay.replicas._on_notification, note)
        events = listener.until_end()
    assert [e["type"] for e in events] == ["start", "end"]
    assert events[-1]["id"] == "m1:2" and events[-1]["data"]["full_text"] == "all of it"


def test_of_concurrent_stops_on_both_replicas_exactly_one_says_it_stopped(cluster, fake):
    service, a, b, _ = cluster
    fake.push(slow(400))
    poster = SSEReader(b.client(), "POST", f"{API}/chat/s1/stream", json={"message": "hi"})
    poster.next_event(), poster.next_event()
    replies, go = [], threading.Barrier(6)

    def stop(server: ServerProcess) -> None:
        with server.client() as client:
            go.wait()
            replies.append(client.post(f"{API}/chat/s1/stop").json())

    threads = [threading.Thread(target=stop, args=(server,)) for server in (a, b, a, b, a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert len(replies) == 6 and sum(r["stopped"] for r in replies) == 1, replies
    assert poster.until_end()[-1]["data"]["finish_reason"] == "stopped"
    assert service.rows("SELECT status FROM messages WHERE role = 'assistant'") == [{"status": "stopped"}]
    poster.close()


def test_a_regeneration_started_on_one_replica_is_followed_on_the_other(cluster, fake):
    service, a, b, _ = cluster
    with a.client() as ca, b.client() as cb:
        # The listener hears the first answer, and then waits for the next one. (Opened after it instead,
        # it would be offered that answer, unseen on the channel, unless the regeneration reached its
        # replica within REPLAY_WAIT: not always so on a busy machine.)
        listener = SSEReader(a.client(), "GET", f"{API}/chat/s1/stream")
        first = ca.post(f"{API}/chat/s1", json={"message": "q1"}).json()
        heard_first = listener.until_end()
        assert heard_first[0]["data"]["message_id"] == first["message_id"]
        assert heard_first[-1]["data"]["full_text"] == first["response"]
        fake.push(slow(30, 0.02))
        poster = SSEReader(b.client(), "POST", f"{API}/chat/s1/stream", json={"regenerate": first["message_id"]})
        start = poster.next_event()
        assert start["data"]["parent_id"] == first["parent_id"]
        refused = ca.post(f"{API}/chat/s1", json={"message": "x", "edit": first["parent_id"]})
        assert refused.status_code == 409 and refused.json()["code"] == "conversation_busy"
        posted = [start, *poster.until_end()]
        assert listener.until_end() == posted
        conv = cb.get(f"{API}/context/conversations/s1").json()
        assert conv == ca.get(f"{API}/context/conversations/s1").json()
        assert conv["current_message_id"] == start["data"]["message_id"]
        rows = service.rows("SELECT parent_id, status FROM messages WHERE role = 'assistant' ORDER BY id")
        assert rows == [{"parent_id": first["parent_id"], "status": "complete"}] * 2
        assert conv["messages"][-1]["sibling_ids"] == [first["message_id"], start["data"]["message_id"]]
        assert conv["messages"][-1]["content"] == chunk_text(posted)
    listener.close()
    poster.close()
