"""Databases of the release before files in messages upgrade in place. tests/releases/v4.db was
written by release 552503d (schema version 4) through its own API (tests/releases/make_v4.py); v4.json
is what that API answered (each conversation's current branch, and its whole tree). On PostgreSQL the
same rows go into that release's schema (schema_v4.sql, its PostgreSQL statements). Today's chatsvc
adds schema step 5 (files, file_chunks, message_files) in place, reads every conversation back as
that release did, with no files, and then stores a file and sends it in an old conversation."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
from pathlib import Path

import pytest
from fake_dashscope import Reply
from support import Service, pg

import chatsvc

API = "/api/v1"
CONV = f"{API}/context/conversations"
RELEASES = Path(__file__).resolve().parent / "releases"
EXPECTED = json.loads((RELEASES / "v4.json").read_text())
ALICE = {"X-User-Id": "alice"}
FILE_TABLES = ("files", "file_chunks", "message_files")


def v4_columns(table: str) -> list[str]:
    with sqlite3.connect(RELEASES / "v4.db") as db:
        return [r[1] for r in db.execute(f"SELECT * FROM pragma_table_info('{table}')") if r[1] != "search_id"]


def v4_rows(table: str, columns: list[str]) -> list[dict]:
    order = "id" if table == "messages" else "owner, session_id"
    with sqlite3.connect(RELEASES / "v4.db") as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute(f"SELECT {', '.join(columns)} FROM {table} ORDER BY {order}")]


def v4_steps(monkeypatch) -> list[chatsvc.SchemaStep]:
    """The release's schema steps, read by today's parser (the file's format is the same)."""
    with monkeypatch.context() as m:
        m.setattr(chatsvc, "data_file", lambda *_: RELEASES / "schema_v4.sql")
        return chatsvc.schema_steps()


def v4_on_postgres(url: str, monkeypatch) -> None:
    """That release's schema on PostgreSQL, its versions recorded, holding v4.db's rows."""
    steps = v4_steps(monkeypatch)
    assert [s.version for s in steps] == [1, 2, 3, 4]
    for step in steps:
        for statement in step.statements:
            if statement.dialect in (None, "postgresql"):
                pg(url, statement.sql)
    pg(
        url,
        "CREATE TABLE schema_versions (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL, release TEXT NOT NULL)",
    )
    for step in steps:
        pg(url, "INSERT INTO schema_versions VALUES ($1, '2026-12-04T00:00:00.000Z', '0.1.0')", step.version)
    for table in ("conversations", "messages"):  # messages by id: a parent before its children
        columns = v4_columns(table)
        for row in v4_rows(table, columns):
            marks = ", ".join(f"${n}" for n in range(1, len(columns) + 1))
            pg(url, f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", *row.values())


@pytest.fixture
def v4_database(database, tmp_path, monkeypatch) -> str:
    """The test's database, as release 552503d left it."""
    if database.startswith("sqlite"):
        shutil.copyfile(RELEASES / "v4.db", tmp_path / "chatsvc.db")
    else:
        v4_on_postgres(database, monkeypatch)
    return database


def tables(service: Service) -> set[str]:
    if service.is_sqlite:
        return {r["name"] for r in service.rows("SELECT name FROM sqlite_master WHERE type = 'table'")}
    return {r["table_name"] for r in service.rows("SELECT table_name FROM information_schema.tables"
                                                  " WHERE table_schema = 'public'")}  # fmt: skip


def test_the_file_is_what_the_release_wrote():
    with sqlite3.connect(RELEASES / "v4.db") as db:
        assert [r[0] for r in db.execute("SELECT version FROM schema_versions ORDER BY 1")] == [1, 2, 3, 4]
        assert not {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")} & set(FILE_TABLES)
        assert db.execute("SELECT COUNT(*) FROM messages WHERE status = 'streaming'").fetchone() == (1,)
        assert db.execute("SELECT COUNT(*) FROM messages WHERE tool_steps IS NOT NULL").fetchone() == (1,)
        assert db.execute("SELECT COUNT(*) FROM messages WHERE tool_results IS NOT NULL").fetchone() == (1,)
    assert len(EXPECTED["alice/plain"]["tree"]) > len(EXPECTED["alice/plain"]["conversation"]["messages"])  # branches


def test_a_release_4_database_upgrades_in_place_and_takes_files(v4_database, fake):
    service = Service(v4_database, fake, CHATSVC_USER_HEADER="X-User-Id")
    columns = v4_columns("messages")
    before = v4_rows("messages", columns)
    with service.client() as client:
        store: chatsvc.Store = client.app.state.store
        versions = service.rows("SELECT version FROM schema_versions ORDER BY version")
        assert [r["version"] for r in versions] == [s.version for s in chatsvc.schema_steps()]
        assert len(versions) >= 5
        assert set(FILE_TABLES) <= tables(service)
        for table in FILE_TABLES:
            assert service.rows(f"SELECT COUNT(*) AS n FROM {table}") == [{"n": 0}], table
        # every conversation reads back as the release answered, branches and tool calls and all
        for key, expected in EXPECTED.items():
            owner, sid = key.split("/")
            headers = {"X-User-Id": owner}
            assert client.get(f"{CONV}/{sid}", headers=headers).json() == expected["conversation"], key
            tree = client.get(f"{CONV}/{sid}/messages?tree=true&limit=500", headers=headers).json()
            assert tree == {"messages": expected["tree"], "next_cursor": None}, key
        # every row as it was, but the answer the crash cut, which is now `interrupted` with its text
        rows = service.rows(f"SELECT {', '.join(columns)} FROM messages ORDER BY id")
        (cut,) = [r for r in before if r["status"] == "streaming"]
        after_cut = next(r for r in rows if r["id"] == cut["id"])
        assert after_cut["content"] == cut["content"] and cut["content"].startswith("cut cut")
        assert after_cut["status"] == "interrupted" and after_cut["last_seq"] == chatsvc.INTERRUPTED_SEQ
        assert [r for r in rows if r["id"] != cut["id"]] == [r for r in before if r["id"] != cut["id"]]

        # a file stored, and sent in an old conversation after its current answer
        data = b"a note for the old conversation"
        facts = chatsvc.FileFacts("text/plain", "document", text=data.decode())

        async def store_file() -> chatsvc.FileRow:
            file_id = await store.files.begin("alice", "note.txt", 0)
            await store.files.write(file_id, 0, data)
            row, created = await store.files.finish(
                file_id, "alice", hashlib.sha256(data).hexdigest(), len(data), facts, 0
            )
            assert created
            return row

        row = client.portal.call(store_file)
        plain = client.get(f"{CONV}/plain", headers=ALICE).json()
        conversation, _ = client.portal.call(store.tree.chat_context, "alice", "plain", 1)
        uid = chatsvc.new_message_id(conversation["last_id"])
        aid = chatsvc.new_message_id(uid)
        turn = chatsvc.Turn("alice", "plain", aid, "qwen-plus", uid, "read this", True, plain["current_message_id"],
                            files=[row.id])  # fmt: skip
        client.portal.call(store.tree.begin_turn, turn)
        final = chatsvc.FinalState("complete", "Read.", None, "stop", None, None, None, 2)
        assert client.portal.call(store.answers.finish, aid, final)
        assert client.portal.call(store.files.of_messages, "alice", [uid, aid]) == {uid: [row]}
        assert client.portal.call(store.files.references, "alice", row.id) == 1
        branch = client.get(f"{CONV}/plain", headers=ALICE).json()["messages"]
        assert [m["content"] for m in branch] == [*(m["content"] for m in plain["messages"]), "read this", "Read."]
        # and the conversation takes a turn over HTTP after it
        fake.push(Reply.answer(["new"]))
        r = client.post(f"{API}/chat/plain", json={"message": "and now?"}, headers=ALICE)
        assert r.status_code == 200 and r.json()["response"] == "new", r.text
        assert client.get(f"{CONV}/plain", headers=ALICE).json()["messages"][-3]["content"] == "Read."
        # a fork of the old conversation carries the file; deleting both frees it
        r = client.post(f"{CONV}/plain/fork", json={"message_id": aid, "session_id": "f2"}, headers=ALICE)
        assert r.status_code == 201, r.text
        assert client.portal.call(store.files.references, "alice", row.id) == 2
        for sid in ("plain", "f2"):
            assert client.delete(f"{CONV}/{sid}", headers=ALICE).status_code == 204
        client.portal.call(store.files.remove, "alice", row.id)
        assert service.rows("SELECT COUNT(*) AS n FROM file_chunks") == [{"n": 0}]
    # a second start finds the database current: nothing is applied again
    with Service(v4_database, fake, CHATSVC_USER_HEADER="X-User-Id").client():
        assert len(service.rows("SELECT version FROM schema_versions")) == len(chatsvc.schema_steps())


def test_step_5_fails_whole_and_leaves_a_release_4_database_as_it_was(v4_database, fake, monkeypatch):
    service = Service(v4_database, fake, CHATSVC_USER_HEADER="X-User-Id")
    real = chatsvc.schema_steps()
    failing = chatsvc.SchemaStatement("INSERT INTO nowhere VALUES (1)", None)
    broken = chatsvc.SchemaStep(5, "files, failing", [*real[4].statements, failing])
    monkeypatch.setattr(chatsvc, "schema_steps", lambda: [*real[:4], broken])
    with pytest.raises(chatsvc.SchemaError, match=r"schema version 5 \(files, failing\) failed.*\(version 4\)"):
        with service.client():
            pass
    assert not set(FILE_TABLES) & tables(service)
    monkeypatch.undo()
    with service.client() as client:
        assert client.get(f"{CONV}/plain", headers=ALICE).json() == EXPECTED["alice/plain"]["conversation"]
        assert set(FILE_TABLES) <= tables(service)
