"""Clocks: replicas whose clocks disagree write into one conversation, and every order that matters
holds. A message's id sorts after every id of its conversation that its writer could see (its parent,
the older turns, the context's start), whatever the writer's clock says: the tree is oldest first,
an export imports, a branch switch lands on the newest turn, clearing the context hides what came
before and nothing after.

An answer's liveness holds too: on PostgreSQL its heartbeat is written and judged by the database
server's clock alone, so a replica whose clock is many heartbeats off keeps its answers, and one that
dies has its answer interrupted on time.

The quick tests play the replicas in this process, one after the other: each has a clock of its own
(chatsvc.clock_us, shifted) and has made no id yet. The replica tests run two `chatsvc` processes on
one PostgreSQL database, one with its clock really 2 s behind and one 2 s ahead (libfaketime)."""

from __future__ import annotations

import contextlib
import glob
import os
import time
from collections.abc import Iterator

import pytest
from fake_dashscope import Reply
from live import SSEReader
from procs import ServerProcess
from support import EMPTY_POSTGRES, Service, pg

import chatsvc

API = "/api/v1"
CONV = f"{API}/context/conversations"
AHEAD, BEHIND = 1.0, -1.0  # seconds


@pytest.fixture
def replica(monkeypatch):
    """play(offset): from now on, the service in this process is a replica whose clock is `offset` s
    off and which has made no id of its own yet (ids are strictly increasing within one process)."""

    def play(offset: float) -> None:
        monkeypatch.setattr(chatsvc, "clock_us", lambda: time.time_ns() // 1000 + int(offset * 1_000_000))
        monkeypatch.setattr(chatsvc, "_last_id_us", 0)

    return play


def say(client, fake, session_id: str, text: str, answer: str | None = None, **body) -> dict:
    """A turn: `text` (None: a regeneration), answered with `answer` (default: "re: " + text)."""
    fake.push(Reply.answer([answer or f"re: {text}"]))
    r = client.post(f"{API}/chat/{session_id}", json={"message": text, **body} if text is not None else body)
    assert r.status_code == 200, r.text
    return r.json()


def tree(client, session_id: str) -> list[dict]:
    r = client.get(f"{CONV}/{session_id}/messages", params={"tree": "true", "limit": 500})
    assert r.status_code == 200, r.text
    return r.json()["messages"]


def parents_first(messages: list[dict]) -> bool:
    seen: set[str] = set()
    for m in messages:
        if m["parent_id"] is not None and m["parent_id"] not in seen:
            return False
        seen.add(m["id"])
    return True


def test_turns_of_a_slow_clock_sort_after_those_of_a_fast_one(client, fake, replica):
    """Turns written alternately by a replica ahead and one behind: every id is above its parent's,
    the tree is in the order the turns were written, siblings oldest first, a switch to the root lands
    on the newest turn, and the export imports as the same tree."""
    replica(AHEAD)
    first = say(client, fake, "s", "first")
    replica(BEHIND)
    second = say(client, fake, "s", "second")  # follows `first` on the current branch
    replica(AHEAD)
    other = say(client, fake, "s", "other", parent_id=first["message_id"])  # a sibling of `second`
    replica(BEHIND)
    again = say(client, fake, "s", None, "re: other", regenerate=other["message_id"])  # a sibling of `other`'s answer
    assert again["parent_id"] == other["parent_id"]

    written = ["first", "re: first", "second", "re: second", "other", "re: other", "re: other"]
    messages = tree(client, "s")
    assert [m["content"] for m in messages] == written
    assert [m["id"] for m in messages][-1] == again["message_id"]
    assert parents_first(messages)
    for m in messages:
        assert m["parent_id"] is None or m["id"] > m["parent_id"]
    by_id = {m["id"]: m for m in messages}

    def siblings(message_id: str) -> list[str]:  # a tree page lists them in its order (it carries no sibling_ids)
        return [m["id"] for m in messages if m["parent_id"] == by_id[message_id]["parent_id"]]

    assert siblings(again["message_id"]) == [other["message_id"], again["message_id"]]
    assert by_id[second["parent_id"]]["content"] == "second"
    assert siblings(other["parent_id"]) == [second["parent_id"], other["parent_id"]]

    # a branch switch to the root lands on the newest turn: the regeneration written last
    root = messages[0]["id"]
    r = client.patch(f"{CONV}/s", json={"current_message_id": root})
    assert r.status_code == 200, r.text
    assert r.json()["current_message_id"] == again["message_id"]

    # chatsvc's own export is taken by its import, as the same tree
    exported = client.get(f"{CONV}/s/export").json()
    r = client.post(f"{CONV}/import", params={"session_id": "copy"}, json=exported)
    assert r.status_code == 201, r.text
    copied = tree(client, "copy")
    assert [m["content"] for m in copied] == written
    index = {m["id"]: n for n, m in enumerate(messages)}
    copied_index = {m["id"]: n for n, m in enumerate(copied)}
    assert [index.get(m["parent_id"]) for m in messages] == [copied_index.get(m["parent_id"]) for m in copied]


@pytest.mark.parametrize(
    "chat_clock, clear_clock", [(AHEAD, BEHIND), (BEHIND, AHEAD)], ids=["clear-behind", "clear-ahead"]
)
def test_clearing_the_context_hides_what_came_before_and_nothing_after(client, fake, replica, chat_clock, clear_clock):
    """One replica chats, another clears the context: the model never again gets what was said before
    the clear, and gets everything said after it."""
    replica(chat_clock)
    say(client, fake, "s", "old")
    replica(clear_clock)
    r = client.delete(f"{CONV}/s/context")
    assert r.status_code == 200, r.text
    assert r.json()["context_message_count"] == 0
    replica(chat_clock)
    say(client, fake, "s", "new")
    replica(clear_clock)
    say(client, fake, "s", "newer")

    sent = [m["content"] for m in fake.requests[-1].body["messages"] if m["role"] != "system"]
    assert sent == ["new", "re: new", "newer"]
    conversation = client.get(f"{CONV}/s").json()
    assert conversation["context_message_count"] == 4
    assert [(m["content"], m["in_context"]) for m in conversation["messages"]] == [
        ("old", False), ("re: old", False), ("new", True), ("re: new", True), ("newer", True), ("re: newer", True),
    ]  # fmt: skip


def test_a_purge_from_a_clock_behind_deletes_what_came_before(client, fake, replica):
    replica(AHEAD)
    say(client, fake, "s", "old")
    replica(BEHIND)
    r = client.delete(f"{CONV}/s/context", params={"purge": "true"})
    assert r.status_code == 200, r.text
    assert r.json()["message_count"] == 0
    replica(AHEAD)
    say(client, fake, "s", "new")
    assert [m["content"] for m in tree(client, "s")] == ["new", "re: new"]


# ── two real processes on one PostgreSQL database, their clocks 4 s apart ───────────────────────

LIBFAKETIME = sorted(glob.glob("/usr/lib/*/faketime/libfaketimeMT.so.1"))
HEARTBEAT = 0.5  # seconds, in the liveness tests


def clock_off_by(offset: str) -> dict[str, str]:
    """The environment of a process whose wall clock runs `offset` off ("-2s"), through libfaketime;
    its monotonic clock (asyncio's loop, timeouts) stays true."""
    if not LIBFAKETIME:
        if os.environ.get("CI") == "true":
            pytest.fail("the clock test must run under CI=true: no libfaketime (apt-get install faketime)")
        pytest.skip("no libfaketime (apt-get install faketime)")
    return {"LD_PRELOAD": LIBFAKETIME[0], "FAKETIME": offset, "FAKETIME_DONT_FAKE_MONOTONIC": "1"}


@contextlib.contextmanager
def replicas_apart(service: Service, tmp_path) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """Replicas `ahead` (clock 2 s fast) and `behind` (2 s slow) on one fresh PostgreSQL database."""
    pg(service.url, EMPTY_POSTGRES)
    ahead = ServerProcess({**service.env, **clock_off_by("+2s")}, tmp_path)
    behind = ServerProcess({**service.env, **clock_off_by("-2s")}, tmp_path)
    try:
        ahead.start()
        behind.start()
        yield ahead, behind
    finally:
        for server in (ahead, behind):
            server.stop()
    for server in (ahead, behind):
        assert "Traceback" not in server.log(), server.log()


@pytest.fixture
def skewed(postgres_database, fake, tmp_path):
    """With the default heartbeat (5 s)."""
    service = Service(postgres_database, fake)
    with replicas_apart(service, tmp_path) as (ahead, behind):
        yield service, ahead, behind
    for server in (ahead, behind):
        assert "lost its process" not in server.log(), server.log()


@pytest.fixture
def beating(postgres_database, fake, tmp_path):
    """Beating every HEARTBEAT s: the clocks are 8 heartbeats apart, and an answer is taken for dead
    after 3 without a beat (1.5 s: a replica of this busy machine stalls for up to ~0.9 s at times)."""
    service = Service(
        postgres_database,
        fake,
        CHATSVC_HEARTBEAT_SECONDS=str(HEARTBEAT),
        CHATSVC_CHECKPOINT_SECONDS="0.1",
        CHATSVC_UPSTREAM_IDLE_TIMEOUT="30",
    )
    with replicas_apart(service, tmp_path) as (ahead, behind):
        yield service, ahead, behind


@pytest.mark.slow
def test_replicas_whose_clocks_disagree_keep_every_order(skewed, fake):
    service, ahead, behind = skewed
    with ahead.client() as a, behind.client() as b:
        first = say(a, fake, "s", "first")
        second = say(b, fake, "s", "second")
        other = say(a, fake, "s", "other", parent_id=first["message_id"])
        again = say(b, fake, "s", None, "re: other", regenerate=other["message_id"])

        # the clocks really disagree: the later message has the earlier time
        times = {r["content"]: r["created_at"] for r in service.rows("SELECT content, created_at FROM messages")}
        assert times["second"] < times["first"], times

        written = ["first", "re: first", "second", "re: second", "other", "re: other", "re: other"]
        for client in (a, b):
            messages = tree(client, "s")
            assert [m["content"] for m in messages] == written
            assert messages[-1]["id"] == again["message_id"]
            assert parents_first(messages)
        assert second["parent_id"] > first["message_id"]

        r = b.patch(f"{CONV}/s", json={"current_message_id": messages[0]["id"]})
        assert r.status_code == 200, r.text
        assert r.json()["current_message_id"] == again["message_id"]

        r = a.post(f"{CONV}/import", params={"session_id": "copy"}, json=b.get(f"{CONV}/s/export").json())
        assert r.status_code == 201, r.text
        assert [m["content"] for m in tree(b, "copy")] == written

        # the replica ahead clears the context, the one behind goes on
        assert a.delete(f"{CONV}/s/context").json()["context_message_count"] == 0
        say(b, fake, "s", "new")
        say(b, fake, "s", "newer")
        sent = [m["content"] for m in fake.requests[-1].body["messages"] if m["role"] != "system"]
        assert sent == ["new", "re: new", "newer"]
        assert a.get(f"{CONV}/s").json()["context_message_count"] == 4
    statuses = service.rows("SELECT DISTINCT status FROM messages")
    assert statuses == [{"status": "complete"}]


def words(n: int, pause: float) -> Reply:
    return Reply.answer([f"w{i} " for i in range(n)], pause=pause)


@pytest.mark.slow
def test_an_answer_on_a_replica_behind_outlives_the_sweeps_of_one_ahead(beating, fake):
    """The replica behind streams an answer for 4 s while the one 4 s ahead sweeps for dead answers
    every heartbeat (8 sweeps): the answer completes, for its client and for a listener on the other
    replica, and no replica takes it for dead."""
    service, ahead, behind = beating
    fake.push(words(40, pause=0.1))
    poster = SSEReader(behind.client(), "POST", f"{API}/chat/s/stream", json={"message": "hi"})
    listener = SSEReader(ahead.client(), "GET", f"{API}/chat/s/stream")
    try:
        end = poster.until_end()[-1]
        assert end["type"] == "end", end
        assert end["data"]["full_text"] == "".join(f"w{i} " for i in range(40))
        assert listener.until_end()[-1] == end
    finally:
        poster.close()
        listener.close()
    stored = service.rows("SELECT status, content FROM messages WHERE role = 'assistant'")
    assert stored == [{"status": "complete", "content": end["data"]["full_text"]}]
    for server in (ahead, behind):
        assert "lost its process" not in server.log(), server.log()
        assert "taken for dead" not in server.log(), server.log()


@pytest.mark.slow
def test_a_dead_replica_ahead_has_its_answer_interrupted_on_time(beating, fake):
    """The replica 4 s ahead is killed mid-answer: the one behind interrupts its answer within three
    heartbeats (plus one to notice), as for replicas whose clocks agree (tests/test_replicas.py)."""
    service, ahead, behind = beating
    fake.push(words(400, pause=0.05), Reply.answer(["fine"]))
    poster = SSEReader(ahead.client(), "POST", f"{API}/chat/s/stream", json={"message": "hi"})
    listener = SSEReader(behind.client(), "GET", f"{API}/chat/s/stream")
    try:
        for _ in range(5):
            poster.next_event()
        ahead.kill()  # SIGKILL: no drain, no last word
        started = time.monotonic()
        end = listener.until_end()[-1]
        waited = time.monotonic() - started
        assert end["type"] == "error" and end["data"]["code"] == "interrupted", end
        # 3 heartbeats without a beat, one more for the sweep to notice, and 1.5 s for a busy machine
        assert waited < (chatsvc.HEARTBEAT_MISSES + 1) * HEARTBEAT + 1.5, f"interrupted after {waited:.1f} s"
    finally:
        poster.close()
        listener.close()
    stored = service.rows("SELECT status, content FROM messages WHERE role = 'assistant'")
    assert stored == [{"status": "interrupted", "content": end["data"]["partial_text"]}]
    assert "lost its process" in behind.log()
    with behind.client() as b:
        assert b.post(f"{API}/chat/s", json={"message": "again"}).json()["response"] == "fine"
