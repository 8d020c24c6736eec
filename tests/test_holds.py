"""Requests within the limits that would hold everyone else (issue 20): a large import is checked off
the event loop and written, on SQLite, in chunks other writes get in between (all or nothing, and
nothing left by a failure or a crash); a costly search is cut at its budget and never holds the
reads; a page of messages stops at a size in bytes. The bounds are lowered here, not the data raised."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

import chatsvc

API = "/api/v1"
CONV = f"{API}/context/conversations"
ME, OTHER = {"X-User": "me"}, {"X-User": "other"}


def conversation_file(messages: list[dict], **conversation) -> dict:
    return {"format": "chatsvc.conversation", "version": 1, "conversation": conversation, "messages": messages}


def message(n: int, parent: int | None, content: str = "", role: str | None = None, **more) -> dict:
    return {"id": f"m{n}", "parent_id": None if parent is None else f"m{parent}",
            "role": role or ("user", "assistant")[n % 2], "content": content or f"message {n}", "status": "complete",
            "created_at": "2026-01-01T00:00:00Z", **more}  # fmt: skip


def chain(count: int, content: str = "") -> dict:
    return conversation_file([message(n, n - 1 if n else None, content) for n in range(count)])


def in_thread(call) -> tuple[threading.Thread, dict]:
    """Run `call` on a thread of its own; its result (or exception) lands in the dict, with when it came."""
    out: dict = {}

    def run() -> None:
        try:
            out["result"] = call()
        except BaseException as exc:  # reported by the test that joins it
            out["error"] = exc
        out["at"] = time.monotonic()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def result(thread: threading.Thread, out: dict):
    thread.join(120)
    assert not thread.is_alive(), "the request did not end in 120 s"
    if "error" in out:
        raise out["error"]
    return out["result"]


def timed(call):
    started = time.monotonic()
    r = call()
    return r, time.monotonic() - started


@pytest.fixture
def users(make_service):
    service = make_service(CHATSVC_USER_HEADER="X-User")
    with service.client() as client:
        yield service, client


# ── an import at the limit ────────────────────────────────────────────────────────────


def test_healthz_answers_while_an_import_is_checked(users, monkeypatch):
    """The file is decoded and checked in a worker thread: the event loop serves meanwhile. (main: the
    check ran on the event loop, and /healthz waited for it: 10 s here.)"""
    _, client = users
    checking, checked = threading.Event(), threading.Event()
    check = chatsvc.parse_import

    def slow_check(settings, body):
        checking.set()
        checked.wait(10)  # until /healthz has answered
        return check(settings, body)

    monkeypatch.setattr(chatsvc, "parse_import", slow_check)
    importing = in_thread(lambda: client.post(f"{CONV}/import", json=chain(20), headers=ME))
    assert checking.wait(30)
    health, took = timed(lambda: client.get("/healthz"))
    checked.set()
    assert health.status_code == 200 and took < 5, took
    r = result(*importing)
    assert r.status_code == 201, r.text
    assert r.json()["message_count"] == 20


@pytest.mark.slow
@pytest.mark.parametrize("database", ["sqlite"], indirect=True)  # PostgreSQL's writers never wait for it
def test_another_users_chat_answers_while_a_large_import_is_written(users, fake, monkeypatch):
    """Each insert costs about 3 ms here (a trigger), so 3,000 messages take about 8 s to write: in
    chunks of 50, another user's chat gets in between. (main: one transaction; the chat waited for the
    whole import, past the contract's 5 s.)"""
    service, client = users
    monkeypatch.setattr(chatsvc, "COPY_CHUNK_MESSAGES", 50)
    service.rows(
        "CREATE TRIGGER slow_insert AFTER INSERT ON messages"
        " BEGIN SELECT length(replace(hex(randomblob(200000)), 'A', 'BB')); END"
    )
    writing = threading.Event()
    insert = chatsvc.Copies.insert_messages

    async def watched_insert(store, rows):
        writing.set()
        return await insert(store, rows)

    monkeypatch.setattr(chatsvc.Copies, "insert_messages", watched_insert)
    importing = in_thread(lambda: client.post(f"{CONV}/import?session_id=big", json=chain(3000), headers=ME))
    assert writing.wait(30)
    chat, took = timed(lambda: client.post(f"{API}/chat/mine", json={"message": "hi"}, headers=OTHER))
    assert chat.status_code == 200, chat.text
    assert took < 5, f"another user's chat waited {took:.1f} s for the import"
    assert client.get("/healthz").status_code == 200
    assert "at" not in importing[1], "the import ended before the chat: it did not run meanwhile"
    r = result(*importing)
    assert r.status_code == 201, r.text
    assert r.json()["message_count"] == 3000
    assert service.rows("SELECT COUNT(*) AS n FROM messages WHERE owner = 'me' AND session_id = 'big'")[0]["n"] == 3000
    assert service.rows("SELECT COUNT(*) AS n FROM conversations")[0]["n"] == 2  # nothing staged is left


def test_a_chunked_import_and_fork_keep_the_tree(users, monkeypatch):
    """An import and a fork larger than a chunk (7 messages here) are the same conversation as written
    in one go: the tree, the texts, what is out of the context, the current leaf."""
    service, client = users
    monkeypatch.setattr(chatsvc, "COPY_CHUNK_MESSAGES", 7)
    messages = [message(0, None, in_context=False), message(1, 0, in_context=False)]
    messages += [message(n, n - 1) for n in range(2, 30)]
    messages += [message(30, 11, "a branch"), message(31, 30, "its answer"), message(32, 31)]
    file = conversation_file(messages, title="chunked", current_message_id="m30")
    r = client.post(f"{CONV}/import?session_id=c", json=file, headers=ME)
    assert r.status_code == 201, r.text
    exported = client.get(f"{CONV}/c/export", headers=ME).json()
    new_id = {m["id"]: e["id"] for m, e in zip(messages, exported["messages"], strict=True)}
    assert [(e["content"], e["parent_id"], e["in_context"]) for e in exported["messages"]] == [
        (m["content"], m["parent_id"] and new_id[m["parent_id"]], m.get("in_context", True)) for m in messages
    ]
    assert exported["conversation"]["current_message_id"] == new_id["m32"]  # m30's newest leaf
    assert exported["conversation"]["title"] == "chunked"
    r = client.post(f"{CONV}/c/fork", json={"message_id": new_id["m29"], "session_id": "f"}, headers=ME)
    assert r.status_code == 201, r.text
    forked = client.get(f"{CONV}/f/export", headers=ME).json()["messages"]
    assert [(m["content"], m["in_context"]) for m in forked] == [
        (m["content"], m.get("in_context", True)) for m in messages[:30]
    ]
    assert [m["parent_id"] for m in forked] == [None] + [m["id"] for m in forked[:-1]]
    assert r.json()["current_message_id"] == forked[-1]["id"]
    others = service.rows("SELECT COUNT(*) AS n FROM messages WHERE owner != 'me'")[0]["n"]
    assert others == 0  # nothing staged is left


def test_an_import_that_fails_midway_leaves_nothing(users, monkeypatch):
    """The database refuses the 35th message (a trigger): the first chunks were written, and nothing of
    the import is visible or left. (main: one transaction, the same; this guards the chunks.)"""
    service, client = users
    monkeypatch.setattr(chatsvc, "COPY_CHUNK_MESSAGES", 10)
    if service.is_sqlite:
        service.rows("CREATE TRIGGER boom BEFORE INSERT ON messages WHEN new.content = 'boom'"
                     " BEGIN SELECT RAISE(ABORT, 'disk I/O error'); END")  # fmt: skip
    else:
        service.rows("CREATE FUNCTION boom() RETURNS trigger AS $$ BEGIN IF new.content = 'boom' THEN RAISE"
                     " EXCEPTION 'disk I/O error'; END IF; RETURN new; END $$ LANGUAGE plpgsql")  # fmt: skip
        service.rows("CREATE TRIGGER boom BEFORE INSERT ON messages FOR EACH ROW EXECUTE FUNCTION boom()")
    file = chain(50)
    file["messages"][35]["content"] = "boom"
    r = client.post(f"{CONV}/import?session_id=broken", json=file, headers=ME)
    assert r.status_code == 503, r.text
    assert r.json()["code"] == "storage_unavailable" and "disk I/O error" in r.json()["detail"]
    assert client.get(CONV, headers=ME).json()["conversations"] == []
    assert client.get(f"{CONV}/broken", headers=ME).status_code == 404
    assert service.rows("SELECT COUNT(*) AS n FROM messages")[0]["n"] == 0
    assert service.rows("SELECT COUNT(*) AS n FROM conversations")[0]["n"] == 0


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)  # PostgreSQL writes an import in one transaction
def test_what_a_crash_mid_import_left_is_deleted_at_the_next_start(users, monkeypatch):
    """An import staged when the process died (its rows under the hidden owner) is gone after a restart,
    children before parents, in chunks. (main: nothing deleted them.)"""
    service, client = users
    monkeypatch.setattr(chatsvc, "COPY_CHUNK_MESSAGES", 100)
    staged = chatsvc.STAGED_OWNER
    service.rows("INSERT INTO conversations (owner, session_id, created_at, updated_at) VALUES (?, 'x', 'now', 'now')",
                 staged)  # fmt: skip
    for n in range(250):
        service.rows(
            "INSERT INTO messages (id, parent_id, owner, session_id, role, content, status, created_at, updated_at)"
            " VALUES (?, ?, ?, 'x', 'user', 'left over', 'complete', 'now', 'now')",
            f"m{n:04}", f"m{n - 1:04}" if n else None, staged,
        )  # fmt: skip
    client.__exit__(None, None, None)
    with service.client() as again:
        assert again.get("/readyz").status_code == 200
    assert service.rows("SELECT COUNT(*) AS n FROM messages")[0]["n"] == 0
    assert service.rows("SELECT COUNT(*) AS n FROM conversations")[0]["n"] == 0
    assert service.rows("SELECT COUNT(*) AS n FROM messages_search")[0]["n"] == 0


# ── search ────────────────────────────────────────────────────────────────────────────


def test_a_costly_search_is_cut_at_its_budget_while_reads_answer(users, fake, monkeypatch):
    """200 characters repeating one trigram over 100 messages of 30,000 that repeat it cost seconds (on
    SQLite, FTS5's phrase match; on PostgreSQL, ILIKE's backtracking when the last letter differs); the
    search stops at its budget (0.5 s here) with a 422 that says what to do, and a read of a
    conversation answers meanwhile. (main: no budget, 200 after seconds; on SQLite the read waited
    behind it.)"""
    service, client = users
    assert client.post(f"{API}/chat/mine", json={"message": "hi"}, headers=OTHER).status_code == 200
    long = conversation_file([message(n, n - 1 if n else None, "a" * 30_000) for n in range(100)])
    assert client.post(f"{CONV}/import?session_id=long", json=long, headers=ME).status_code == 201
    monkeypatch.setattr(chatsvc, "SEARCH_SECONDS", 0.5)
    costly = "a" * 200 if service.is_sqlite else "a" * 199 + "b"
    searching = threading.Event()
    search = chatsvc.Search.conversations

    async def watched_search(store, *args):
        searching.set()
        return await search(store, *args)

    monkeypatch.setattr(chatsvc.Search, "conversations", watched_search)
    found = in_thread(lambda: client.get(CONV, params={"q": costly}, headers=ME))
    assert searching.wait(30)
    read = client.get(f"{CONV}/mine", headers=OTHER)
    assert read.status_code == 200
    assert "at" not in found[1], "the read answered only once the search had ended"
    r = result(*found)
    assert r.status_code == 422, r.text
    assert r.json() == {
        "detail": "This search took more than 0.5 s and was stopped: search for a longer or more particular text (a"
        " text that repeats a few letters is costly to look for in long messages).",
        "code": "search_too_costly",
    }
    faults = [line for line in client.get("/metrics").text.splitlines() if line.startswith("chatsvc_storage_faults")]
    assert not [line for line in faults if line.startswith("chatsvc_storage_faults_total{")], faults  # not a fault
    assert client.get(CONV, params={"q": "aaa"}, headers=ME).json()["conversations"][0]["session_id"] == "long"


def test_a_search_that_waits_a_whole_budget_for_its_turn_is_search_busy(make_service, monkeypatch):
    """SQLite runs searches one at a time on their own connection: one that waited SEARCH_SECONDS for
    the search held by another (its statement made to take 3 s here) is a 503 of its own, with
    Retry-After, not a fault of the database (GET /readyz stays ready)."""
    service = make_service(CHATSVC_USER_HEADER="X-User")
    if not service.is_sqlite:
        pytest.skip("PostgreSQL's searches run on the pool's connections: none waits for another")
    monkeypatch.setattr(chatsvc, "SEARCH_SECONDS", 1.0)
    holding = threading.Event()
    run = chatsvc.Database._sqlite

    async def slow_search(store, sql, values, role):
        if role == chatsvc.SEARCH and not holding.is_set():
            holding.set()
            await asyncio.sleep(3)  # the first search holds the search connection past the second's budget
        return await run(store, sql, values, role)

    monkeypatch.setattr(chatsvc.Database, "_sqlite", slow_search)
    with service.client() as client:
        first = in_thread(lambda: client.get(CONV, params={"q": "hello"}, headers=ME))
        try:
            assert holding.wait(30)
            second = client.get(CONV, params={"q": "world"}, headers=OTHER)
        finally:
            ended = result(*first)  # before the client closes, whatever happened
        assert ended.status_code == 422  # past its own budget: stopped
        assert second.status_code == 503, second.text
        assert second.json() == {"detail": "Other searches kept the search busy for 1 s; try again in a moment.",
                                 "code": "search_busy"}  # fmt: skip
        assert second.headers["retry-after"] == "2"
        assert client.get("/readyz").status_code == 200


# ── pages of messages ─────────────────────────────────────────────────────────────────


def pages(client, path: str, **params) -> list:
    """Every page of a listing, following next_cursor: (the response's bytes, its messages)."""
    found, cursor = [], None
    while True:
        r = client.get(path, params={**params, **({"cursor": cursor} if cursor else {})}, headers=ME)
        assert r.status_code == 200, r.text
        found.append((r.content, r.json()["messages"]))
        if not (cursor := r.json()["next_cursor"]):
            return found
        assert len(found) < 1000


def test_a_tree_page_with_many_siblings_stays_under_the_byte_bound(users, monkeypatch):
    """One question with 1,200 answers: a tree page carries each message's parent_id, not its 1,200
    siblings' ids, and stops at the byte bound (20,000 here); a message larger than it is a page of its
    own; paging lists every message once. (main: a 500-message page repeated 1,200 ids per message.)"""
    _, client = users
    monkeypatch.setattr(chatsvc, "MESSAGE_PAGE_BYTES", 20_000)
    messages = [message(0, None, "the question", "user")]
    messages += [message(n, 0, f"answer {n} " + "x" * 50, "assistant") for n in range(1, 1201)]
    messages[600]["content"] = "big " * 10_000
    assert client.post(f"{CONV}/import?session_id=s", json=conversation_file(messages), headers=ME).status_code == 201
    listed = pages(client, f"{CONV}/s/messages", tree="true", limit=500)
    for body, page in listed:
        assert len(body) <= 20_000 + 100 or len(page) == 1, (len(body), len(page))
        assert all("sibling_ids" not in m for m in page)
    assert any(len(page) == 1 and page[0]["content"] == "big " * 10_000 for _, page in listed)
    contents = [m["content"] for _, page in listed for m in page]
    assert contents == [m["content"] for m in messages]  # each once, oldest first
    parents = {m["parent_id"] for _, page in listed for m in page[1:]}
    assert len(parents) == 1  # the siblings of any answer: the messages with its parent_id


def test_a_branch_page_stays_under_the_byte_bound(users, monkeypatch):
    """The current branch's pages, newest first, stop at the byte bound as well, and together list the
    branch once; so do a conversation's newest messages. (main: 500 messages a page, whatever their
    size.)"""
    _, client = users
    monkeypatch.setattr(chatsvc, "MESSAGE_PAGE_BYTES", 20_000)
    file = chain(120, "y" * 1_000)
    assert client.post(f"{CONV}/import?session_id=b", json=file, headers=ME).status_code == 201
    listed = pages(client, f"{CONV}/b/messages", limit=500)
    assert len(listed) > 1
    for body, _ in listed:
        assert len(body) <= 20_000 + 100, len(body)
    ids = [m["id"] for _, page in reversed(listed) for m in page]
    assert len(ids) == len(set(ids)) == 120
    assert [m["parent_id"] for _, page in reversed(listed) for m in page] == [None, *ids[:-1]]
    # the conversation's own newest messages stop there too; .../messages?before= goes on from them
    conversation = client.get(f"{CONV}/b", params={"limit": 500}, headers=ME).json()
    assert [m["id"] for m in conversation["messages"]] == [m["id"] for m in listed[0][1]]
    assert conversation["message_count"] == 120
