"""The stored files (schema step 5) through the store's API (`Store.files`, `Tree.begin_turn`,
`Copies.fork`), on SQLite and PostgreSQL: chunked bytes, ranges, dedup, quotas, references and what
deletes them, the collector, forks."""

from __future__ import annotations

import hashlib
import os

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
