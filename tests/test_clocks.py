"""Clocks: replicas whose clocks disagree write into one conversation, and every order that matters
holds. A message's id sorts after every id of its conversation that its writer could see (its parent,
the older turns, the context's start), whatever the writer's clock says: the tree is oldest first,
an export imports, a branch switch lands on the newest turn, clearing the context hides what came
before and nothing after.

The quick tests play the replicas in this process, one after the other: each has a clock of its own
(chatsvc.clock_us, shifted) and has made no id yet. The replica test runs two `chatsvc` processes on
one PostgreSQL database, one with its clock really 2 s behind and one 2 s ahead (libfaketime)."""

from __future__ import annotations

import glob
import os
import time

import pytest
from fake_dashscope import Reply
from procs import ServerProcess
from support import Service, pg

import chatsvc

API = "/api/v1"
CONV = f"{API}/context/conversations"
AHEAD, BEHIND = 1.0, -1.0  # seconds: README allows skew well within three heartbeats (5 s each by default)


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


def clock_off_by(offset: str) -> dict[str, str]:
    """The environment of a process whose wall clock runs `offset` off ("-2s"), through libfaketime;
    its monotonic clock (asyncio's loop, timeouts) stays true."""
    if not LIBFAKETIME:
        if os.environ.get("CI") == "true":
            pytest.fail("the clock test must run under CI=true: no libfaketime (apt-get install faketime)")
        pytest.skip("no libfaketime (apt-get install faketime)")
    return {"LD_PRELOAD": LIBFAKETIME[0], "FAKETIME": offset, "FAKETIME_DONT_FAKE_MONOTONIC": "1"}


@pytest.fixture
def skewed(postgres_database, fake, tmp_path):
    """Replicas `ahead` (clock 2 s fast) and `behind` (2 s slow), with the default heartbeat (5 s:
    the 4 s between them is within three beats, as README asks)."""
    pg(postgres_database, "DROP TABLE IF EXISTS messages, conversations, schema_versions CASCADE")
    service = Service(postgres_database, fake)
    ahead = ServerProcess({**service.env, **clock_off_by("+2s")}, tmp_path)
    behind = ServerProcess({**service.env, **clock_off_by("-2s")}, tmp_path)
    try:
        ahead.start()
        behind.start()
        yield service, ahead, behind
    finally:
        for server in (ahead, behind):
            server.stop()
    for server in (ahead, behind):
        assert "Traceback" not in server.log(), server.log()
        assert "lost its process" not in server.log(), server.log()


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
