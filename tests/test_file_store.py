"""The stored files (schema step 5) through the store's API (`Store.files`, `Tree.begin_turn`,
`Copies.fork`), on SQLite and PostgreSQL: chunked bytes, ranges, dedup, quotas, references and what
deletes them, the collector, forks."""

from __future__ import annotations

import asyncio
import hashlib
import os

import asyncpg
import pytest
from support import EMPTY_POSTGRES, Service, pg

import chatsvc

CHUNK = chatsvc.FILE_CHUNK_BYTES
DOCUMENT = chatsvc.FileFacts("text/plain", "document", text="hello world")
IMAGE = chatsvc.FileFacts(
    "image/png", "image", width=40, height=30, model_copy=b"\x89PNG small", model_media_type="image/png",
    model_width=28, model_height=28,
)  # fmt: skip


def run(client, fn, *args, **kwargs):
    """A store coroutine, run on the app's own loop."""
    return client.portal.call(lambda: fn(*args, **kwargs))


def files(client) -> chatsvc.Files:
    return client.app.state.store.files


def upload(client, data: bytes, owner: str = "", name: str = "a.txt", facts=DOCUMENT, quota: int = 0):
    """An upload as the handler makes it: staged, written a chunk at a time, then finished."""

    async def go():
        store = files(client)
        file_id = await store.begin(owner, name, quota)
        for seq, start in enumerate(range(0, len(data), CHUNK)):
            await store.write(file_id, seq, data[start : start + CHUNK])
        return await store.finish(file_id, owner, hashlib.sha256(data).hexdigest(), len(data), facts, quota)

    return client.portal.call(go)


def begin(client, sid, question="look", parent=None, file_ids=(), owner=""):
    """A turn as the relay begins it, with files; (question id, answer id)."""
    store = client.app.state.store
    conversation, _ = run(client, store.tree.chat_context, owner, sid, 1)
    uid = chatsvc.new_message_id(conversation["last_id"] if conversation else "")
    aid = chatsvc.new_message_id(uid)
    turn = chatsvc.Turn(owner, sid, aid, "qwen-plus", uid, question, True, parent, files=list(file_ids))
    run(client, store.tree.begin_turn, turn)
    final = chatsvc.FinalState("complete", "seen", None, "stop", None, None, None, 2)
    assert run(client, store.answers.finish, aid, final)
    return uid, aid


def test_chunked_bytes_read_back_and_ready_row(service, client):
    data = os.urandom(2 * CHUNK + CHUNK // 2)
    row, created = upload(client, data, name="big.bin")
    assert created
    assert (row.size, row.sha256, row.name, row.kind, row.text_chars) == (len(data), hashlib.sha256(data).hexdigest(),
                                                                         "big.bin", "document", 11)  # fmt: skip
    assert row.text_tokens == chatsvc.estimate_tokens("hello world")
    assert run(client, files(client).read, row.id) == data
    chunks = service.rows("SELECT seq, length(data) AS n FROM file_chunks WHERE file_id = ? ORDER BY seq", row.id)
    assert [(c["seq"], c["n"]) for c in chunks] == [(0, CHUNK), (1, CHUNK), (2, CHUNK // 2)]
    assert run(client, files(client).get, "", row.id) == row
    assert run(client, files(client).find, "", row.sha256) == row
    assert run(client, files(client).usage, "") == len(data)


def test_turn_carries_files_and_model_inputs(service, client):
    doc, _ = upload(client, b"some text", name="notes.txt")
    img, _ = upload(client, b"\x89PNG original bytes", name="p.png", facts=IMAGE)
    uid, aid = begin(client, "s", file_ids=[img.id, doc.id])
    rows = service.rows("SELECT message_id, position, file_id FROM message_files ORDER BY position")
    assert rows == [
        {"message_id": uid, "position": 0, "file_id": img.id},
        {"message_id": uid, "position": 1, "file_id": doc.id},
    ]
    assert run(client, files(client).of_messages, "", [uid, aid]) == {uid: [img, doc]}
    assert run(client, files(client).of_messages, "other", [uid]) == {}
    assert run(client, files(client).model_inputs, [img.id, doc.id]) == {
        img.id: (None, b"\x89PNG small", "image/png"),
        doc.id: ("hello world", None, None),
    }
    assert run(client, files(client).references, "", img.id) == 1


def read_range(client, file_id: str, start: int, end: int) -> list[bytes]:
    async def go():
        return [piece async for piece in files(client).content(file_id, start, end)]

    return client.portal.call(go)


def refused(client, fn, *args, **kwargs) -> chatsvc.FileRefused:
    """The refusal of a store coroutine (`client` None: of a function of this module's)."""
    with pytest.raises(chatsvc.FileRefused) as caught:
        run(client, fn, *args, **kwargs) if client is not None else fn(*args, **kwargs)
    return caught.value


def test_content_reads_only_the_chunks_a_range_covers(client):
    data = os.urandom(2 * CHUNK + CHUNK // 2)
    row, _ = upload(client, data)
    for start, end, pieces in [
        (0, 10, 1),
        (CHUNK - 5, CHUNK + 7, 2),  # across a chunk boundary: the end of one row, the start of the next
        (CHUNK, 2 * CHUNK, 1),
        (CHUNK - 1, 2 * CHUNK + 1, 3),
        (2 * CHUNK + 3, len(data), 1),
        (0, len(data), 3),
    ]:
        got = read_range(client, row.id, start, end)
        assert b"".join(got) == data[start:end]
        assert len(got) == pieces
    assert read_range(client, row.id, 5, 5) == []


def test_same_bytes_twice_are_one_file_per_owner(service, client):
    data = b"the same bytes"
    first, created = upload(client, data, name="one.txt")
    again, created_again = upload(client, data, name="two.txt")
    assert (created, created_again, again) == (True, False, first)
    other, other_created = upload(client, data, owner="bob")
    assert other_created and other.id != first.id and other.owner == "bob"
    assert service.rows("SELECT owner, name, status FROM files ORDER BY id") == [
        {"owner": "", "name": "one.txt", "status": "ready"},
        {"owner": "bob", "name": "a.txt", "status": "ready"},
    ]
    assert service.rows("SELECT COUNT(*) AS n FROM file_chunks") == [{"n": 2}]
    assert run(client, files(client).usage, "") == len(data)


def test_concurrent_finishes_of_the_same_bytes_end_with_one_row(service, client):
    data = os.urandom(CHUNK + 100)
    sha = hashlib.sha256(data).hexdigest()

    async def staged():
        file_id = await files(client).begin("", "x.bin", 0)
        await files(client).write(file_id, 0, data[:CHUNK])
        await files(client).write(file_id, 1, data[CHUNK:])
        return file_id

    async def both():
        ids = [await staged(), await staged()]
        return ids, await asyncio.gather(*(files(client).finish(i, "", sha, len(data), DOCUMENT, 0) for i in ids))

    ids, results = client.portal.call(both)
    (row_a, created_a), (row_b, created_b) = results
    assert row_a == row_b and sorted([created_a, created_b]) == [False, True] and row_a.id in ids
    assert service.rows("SELECT id, status FROM files") == [{"id": row_a.id, "status": "ready"}]
    assert service.rows("SELECT DISTINCT file_id FROM file_chunks") == [{"file_id": row_a.id}]


def test_quota_at_begin_and_at_finish(service, client):
    quota = 3 * CHUNK
    kept, _ = upload(client, os.urandom(2 * CHUNK + CHUNK // 2), quota=quota)
    refusal = refused(None, upload, client, os.urandom(CHUNK), quota=quota)  # 3.5 MiB would be stored
    assert (refusal.status, refusal.code) == (413, "storage_full")
    assert refusal.detail == "Your files use 2.5 MiB of 3 MiB (CHATSVC_MAX_STORAGE_BYTES_PER_USER)."
    assert service.rows("SELECT id FROM files") == [{"id": kept.id}]  # the staged one discarded, chunks too
    assert service.rows("SELECT DISTINCT file_id FROM file_chunks") == [{"file_id": kept.id}]
    upload(client, os.urandom(CHUNK // 2), quota=quota)  # exactly the quota
    refusal = refused(client, files(client).begin, "", "more.txt", quota)
    assert (refusal.status, refusal.code, refusal.detail) == (
        413,
        "storage_full",
        "Your files use 3 MiB of 3 MiB (CHATSVC_MAX_STORAGE_BYTES_PER_USER).",
    )
    assert run(client, files(client).begin, "bob", "his.txt", quota)  # another owner's quota is his own
    assert run(client, files(client).begin, "", "no limit.txt", 0)


def test_remove_unreferenced_referenced_and_another_owners(service, client):
    loose, _ = upload(client, os.urandom(CHUNK + 1))
    used, _ = upload(client, b"used")
    begin(client, "s", file_ids=[used.id])
    assert run(client, files(client).remove, "", loose.id) is None
    assert service.rows("SELECT id FROM files") == [{"id": used.id}]
    assert service.rows("SELECT DISTINCT file_id FROM file_chunks") == [{"file_id": used.id}]
    refusal = refused(client, files(client).remove, "", used.id)
    assert (refusal.status, refusal.code, refusal.detail) == (
        409,
        "file_in_use",
        f"File '{used.id}' is in 1 message(s); delete those messages or conversations first.",
    )
    for owner, file_id in (("bob", used.id), ("", loose.id), ("", "nope")):
        refusal = refused(client, files(client).remove, owner, file_id)
        assert (refusal.status, refusal.code, refusal.detail) == (404, "file_not_found", f"No file '{file_id}'.")
    assert refused(client, files(client).get, "bob", used.id).code == "file_not_found"
    assert run(client, files(client).references, "bob", used.id) == 0
    assert (
        run(client, files(client).of_messages, "bob", [r["id"] for r in service.rows("SELECT id FROM messages")]) == {}
    )


def test_references_go_with_their_messages(service, client):
    store = client.app.state.store
    a, _ = upload(client, b"a")
    b, _ = upload(client, b"b")
    c, _ = upload(client, b"c")
    _, first_answer = begin(client, "s", file_ids=[a.id])
    second, _ = begin(client, "s", parent=first_answer, file_ids=[b.id, a.id])
    begin(client, "t", file_ids=[c.id])
    begin(client, "p", file_ids=[b.id])
    assert run(client, files(client).references, "", a.id) == 2

    assert run(client, store.tree.delete_branch, "", "s", second) == 2  # the branch below its first answer
    assert run(client, files(client).references, "", a.id) == 1
    assert run(client, files(client).references, "", b.id) == 1  # conversation p's
    assert run(client, store.conversations.delete, "", "t")
    assert run(client, files(client).references, "", c.id) == 0
    assert run(client, store.tree.clear_context, "", "p", True)  # purge
    assert run(client, files(client).references, "", b.id) == 0
    assert run(client, store.conversations.delete, "", "s")
    assert service.rows("SELECT COUNT(*) AS n FROM message_files") == [{"n": 0}]
    for row in (a, b, c):
        run(client, files(client).remove, "", row.id)
    assert service.rows("SELECT COUNT(*) AS n FROM files") == [{"n": 0}]


def test_a_turn_naming_a_file_it_cannot_use_writes_nothing(service, client):
    mine, _ = upload(client, b"mine")
    his, _ = upload(client, b"his", owner="bob")
    staged = run(client, files(client).begin, "", "half.txt", 0)
    for bad in (his.id, staged, "absent"):
        with pytest.raises(chatsvc.FileRefused) as caught:
            begin(client, "s", file_ids=[mine.id, bad])
        assert (caught.value.status, caught.value.code, caught.value.detail) == (404, "file_not_found",
                                                                                 f"No file '{bad}'.")  # fmt: skip
    assert service.rows("SELECT COUNT(*) AS n FROM messages") == [{"n": 0}]
    assert service.rows("SELECT COUNT(*) AS n FROM conversations") == [{"n": 0}]
    assert service.rows("SELECT COUNT(*) AS n FROM message_files") == [{"n": 0}]


def test_a_turn_bumps_its_files_last_use(service, client):
    row, _ = upload(client, b"old")
    service.rows("UPDATE files SET last_used_at = '2020-01-01T00:00:00.000Z'")
    begin(client, "s", file_ids=[row.id])
    [used] = service.rows("SELECT last_used_at FROM files")
    assert used["last_used_at"] > "2026"


def test_collector_deletes_what_nothing_uses_once_old(service, client):
    upload(client, os.urandom(CHUNK + 5))  # old, nothing uses it
    old_used, _ = upload(client, b"used")
    young_loose, _ = upload(client, b"young")
    begin(client, "s", file_ids=[old_used.id])
    old_staged = run(client, files(client).begin, "", "crashed.bin", 0)
    run(client, files(client).write, old_staged, 0, b"half")
    young_staged = run(client, files(client).begin, "", "uploading.bin", 0)
    long_ago = chatsvc.utcnow(2 * 86400)
    service.rows("UPDATE files SET last_used_at = ?, created_at = ? WHERE id != ?", long_ago, long_ago, young_loose.id)
    service.rows("UPDATE files SET created_at = ? WHERE id = ?", chatsvc.utcnow(1800), young_staged)
    assert run(client, files(client).collect, 86400) == 2
    kept = {r["id"] for r in service.rows("SELECT id FROM files")}
    assert kept == {old_used.id, young_loose.id, young_staged}
    chunks = service.rows("SELECT DISTINCT file_id FROM file_chunks")
    assert {r["file_id"] for r in chunks} == {old_used.id, young_loose.id}
    assert run(client, files(client).collect, 86400) == 0
    assert run(client, files(client).collect, 0) == 1  # no retention: the young loose file goes too


def test_collector_works_in_batches(service, client):
    made = [upload(client, f"file {n}".encode())[0].id for n in range(5)]
    service.rows("UPDATE files SET last_used_at = ?", chatsvc.utcnow(10))
    assert run(client, files(client).collect, 5, limit=2) == 5
    assert service.rows("SELECT COUNT(*) AS n FROM files") == [{"n": 0}]
    assert made


def test_page_newest_first(client):
    made = [upload(client, f"file {n}".encode(), name=f"{n}.txt")[0] for n in range(4)]
    upload(client, b"his", owner="bob")
    run(client, files(client).begin, "", "staged.txt", 0)
    assert run(client, files(client).page, "", 3) == made[::-1][:3]
    assert run(client, files(client).page, "", 3, before=made[1].id) == [made[0]]


@pytest.mark.parametrize("chunk_messages", [1000, 1])  # 1: a copy in chunks (SQLite: staged, then moved)
def test_fork_carries_the_same_files(service, client, monkeypatch, chunk_messages):
    monkeypatch.setattr(chatsvc, "COPY_CHUNK_MESSAGES", chunk_messages)
    store = client.app.state.store
    a, _ = upload(client, b"a")
    b, _ = upload(client, b"b")
    _, first = begin(client, "s", file_ids=[a.id])
    _, second = begin(client, "s", parent=first, file_ids=[b.id, a.id])
    assert run(client, store.copies.fork, "", "s", second, "f", None)
    copies = service.rows(
        "SELECT m.id, m.content FROM messages m WHERE m.session_id = 'f' AND m.role = 'user' ORDER BY m.id"
    )
    assert len(copies) == 2
    found = run(client, files(client).of_messages, "", [m["id"] for m in copies])
    assert found == {copies[0]["id"]: [a], copies[1]["id"]: [b, a]}
    assert run(client, files(client).references, "", a.id) == 4
    assert service.rows("SELECT DISTINCT owner FROM message_files") == [{"owner": ""}]
    assert run(client, store.conversations.delete, "", "s")
    assert run(client, files(client).references, "", a.id) == 2


def test_import_file_dedups_and_counts_the_quota(service, client):
    data = os.urandom(2 * CHUNK + 3)
    imported = run(client, files(client).import_file, "", "photo.png", data, IMAGE)
    assert (imported.name, imported.kind, imported.size, imported.width) == ("photo.png", "image", len(data), 40)
    assert run(client, files(client).read, imported.id) == data
    assert run(client, files(client).import_file, "", "again.png", data, IMAGE) == imported
    refusal = refused(client, files(client).import_file, "", "more.png", os.urandom(CHUNK), IMAGE, quota=3 * CHUNK)
    assert refusal.code == "storage_full"
    assert service.rows("SELECT id FROM files") == [{"id": imported.id}]


# ── PostgreSQL: the races the constraints decide (SQLite's one writer has none of them) ─────


@pytest.fixture
def pg_client(postgres_database, fake):
    pg(postgres_database, EMPTY_POSTGRES)
    service = Service(postgres_database, fake)
    with service.client() as client:
        yield service, client


async def _blocked_behind(url: str, other) -> asyncio.Task:
    """`other()` started, once it waits for a lock another transaction holds (pg_stat_activity says so)."""
    task = asyncio.ensure_future(other())
    conn = await asyncpg.connect(url)
    try:
        waiting = (
            "SELECT COUNT(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
        )
        for _ in range(2000):  # the server's view of the wait, polled (10 s at most)
            if task.done() or await conn.fetchval(waiting):
                break
            await asyncio.sleep(0.005)
    finally:
        await conn.close()
    assert not task.done(), "it never waited for the other transaction: no race was run"
    return task


def test_postgres_a_finish_that_meets_the_unique_index_answers_the_winner(pg_client):
    service, client = pg_client
    data = b"raced bytes"
    sha = hashlib.sha256(data).hexdigest()
    staged = run(client, files(client).begin, "", "mine.txt", 0)
    now = chatsvc.utcnow()

    async def race():
        rival = await asyncpg.connect(service.url)
        try:
            async with rival.transaction():  # a ready row of these bytes, not yet committed (no owner lock)
                await rival.execute(
                    "INSERT INTO files (id, owner, sha256, name, media_type, kind, size, status, created_at,"
                    " last_used_at) VALUES ('winner', '', $1, 'w.txt', 'text/plain', 'document', $2, 'ready', $3, $3)",
                    sha, len(data), now,
                )  # fmt: skip
                task = await _blocked_behind(service.url, lambda: files(client).finish(staged, "", sha, len(data),
                                                                                       DOCUMENT, 0))  # fmt: skip
            return await task
        finally:
            await rival.close()

    row, created = client.portal.call(race)
    assert (row.id, row.name, created) == ("winner", "w.txt", False)
    assert service.rows("SELECT id FROM files") == [{"id": "winner"}]


def test_postgres_a_remove_that_meets_a_new_reference_is_refused(pg_client):
    service, client = pg_client
    row, _ = upload(client, b"wanted")
    uid, _ = begin(client, "s")

    async def race():
        sender = await asyncpg.connect(service.url)
        try:
            async with sender.transaction():  # a turn naming the file, not yet committed
                await sender.execute(
                    "INSERT INTO message_files (owner, message_id, position, file_id) VALUES ('', $1, 0, $2)",
                    uid, row.id,
                )  # fmt: skip
                task = await _blocked_behind(service.url, lambda: files(client).remove("", row.id))
            with pytest.raises(chatsvc.FileRefused) as caught:
                await task
            return caught.value
        finally:
            await sender.close()

    refusal = client.portal.call(race)
    assert (refusal.status, refusal.code) == (409, "file_in_use")
    assert refusal.detail == f"File '{row.id}' is in 1 message(s); delete those messages or conversations first."
    assert service.rows("SELECT COUNT(*) AS n FROM files") == [{"n": 1}]


def test_postgres_a_turn_that_meets_a_file_being_deleted_writes_nothing(pg_client):
    service, client = pg_client
    row, _ = upload(client, b"going")
    uid = chatsvc.new_message_id()
    turn = chatsvc.Turn("", "s", chatsvc.new_message_id(uid), "qwen-plus", uid, "look", True, None, files=[row.id])

    async def race():
        deleter = await asyncpg.connect(service.url)
        try:
            async with deleter.transaction():  # the file deleted, not yet committed
                await deleter.execute("DELETE FROM files WHERE id = $1", row.id)
                task = await _blocked_behind(service.url, lambda: client.app.state.store.tree.begin_turn(turn))
            with pytest.raises(chatsvc.FileRefused) as caught:
                await task
            return caught.value
        finally:
            await deleter.close()

    refusal = client.portal.call(race)
    assert (refusal.status, refusal.code, refusal.detail) == (404, "file_not_found", f"No file '{row.id}'.")
    for table in ("messages", "conversations", "message_files", "files"):
        assert service.rows(f"SELECT COUNT(*) AS n FROM {table}") == [{"n": 0}], table
