"""Databases of the release before tool calling upgrade in place. tests/releases/v3.db was written by
release e9f4a52 (schema version 3) through its own API (tests/releases/make_v3.py); v3.json is what
that API answered (each conversation's current branch, and its whole tree). On PostgreSQL the same
rows go into that release's schema (schema_v3.sql, its PostgreSQL statements). Today's chatsvc adds
schema step 4 (tool_steps, tool_results) in place, reads every conversation back as that release
did, with both new columns null, and then takes new turns."""

from __future__ import annotations

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
EXPECTED = json.loads((RELEASES / "v3.json").read_text())
ALICE = {"X-User-Id": "alice"}


def v3_columns(table: str) -> list[str]:
    with sqlite3.connect(RELEASES / "v3.db") as db:
        return [r[1] for r in db.execute(f"SELECT * FROM pragma_table_info('{table}')") if r[1] != "search_id"]


def v3_rows(table: str, columns: list[str]) -> list[dict]:
    with sqlite3.connect(RELEASES / "v3.db") as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute(f"SELECT {', '.join(columns)} FROM {table} ORDER BY id" if table ==
                "messages" else f"SELECT {', '.join(columns)} FROM {table} ORDER BY owner, session_id")]  # fmt: skip


def v3_steps(monkeypatch) -> list[chatsvc.SchemaStep]:
    """The release's schema steps, read by today's parser (the file's format is the same)."""
    with monkeypatch.context() as m:
        m.setattr(chatsvc, "data_file", lambda *_: RELEASES / "schema_v3.sql")
        return chatsvc.schema_steps()


def v3_on_postgres(url: str, monkeypatch) -> None:
    """That release's schema on PostgreSQL, its versions recorded, holding v3.db's rows."""
    steps = v3_steps(monkeypatch)
    assert [s.version for s in steps] == [1, 2, 3]
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
        columns = v3_columns(table)
        for row in v3_rows(table, columns):
            marks = ", ".join(f"${n}" for n in range(1, len(columns) + 1))
            pg(url, f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", *row.values())


@pytest.fixture
def v3_database(database, tmp_path, monkeypatch) -> str:
    """The test's database, as release e9f4a52 left it."""
    if database.startswith("sqlite"):
        shutil.copyfile(RELEASES / "v3.db", tmp_path / "chatsvc.db")
    else:
        v3_on_postgres(database, monkeypatch)
    return database


def message_columns(service: Service) -> list[str]:
    if service.is_sqlite:
        return [r["name"] for r in service.rows("SELECT name FROM pragma_table_info('messages')")]
    sql = "SELECT column_name FROM information_schema.columns WHERE table_name = 'messages'"
    return [r["column_name"] for r in service.rows(sql)]


def test_the_file_is_what_the_release_wrote():
    with sqlite3.connect(RELEASES / "v3.db") as db:
        assert [r[0] for r in db.execute("SELECT version FROM schema_versions ORDER BY 1")] == [1, 2, 3]
        assert "tool_steps" not in v3_columns("messages")
        assert db.execute("SELECT COUNT(*) FROM messages WHERE status = 'streaming'").fetchone() == (1,)
        assert db.execute("SELECT COUNT(*) FROM messages WHERE parent_id IS NOT NULL").fetchone()[0] > 20
    assert len(EXPECTED["alice/plain"]["tree"]) > len(EXPECTED["alice/plain"]["conversation"]["messages"])  # branches


def test_a_release_3_database_upgrades_in_place_and_reads_back_the_same(v3_database, fake):
    service = Service(v3_database, fake, CHATSVC_USER_HEADER="X-User-Id")
    old_columns = v3_columns("messages")
    before = v3_rows("messages", old_columns)
    with service.client() as client:
        versions = service.rows("SELECT version FROM schema_versions ORDER BY version")
        assert [r["version"] for r in versions] == [s.version for s in chatsvc.schema_steps()]
        assert len(versions) >= 4
        assert {"tool_steps", "tool_results"} <= set(message_columns(service))
        assert service.rows("SELECT COUNT(*) AS n FROM messages WHERE tool_steps IS NOT NULL"
                            " OR tool_results IS NOT NULL") == [{"n": 0}]  # fmt: skip
        # every conversation reads back as the release answered, branches and all, with no tool fields
        for key, expected in EXPECTED.items():
            owner, sid = key.split("/")
            headers = {"X-User-Id": owner}
            assert client.get(f"{CONV}/{sid}", headers=headers).json() == expected["conversation"], key
            tree = client.get(f"{CONV}/{sid}/messages?tree=true&limit=500", headers=headers).json()
            assert tree == {"messages": expected["tree"], "next_cursor": None}, key
        # every row as it was, but the answer the crash cut, which is now `interrupted` with its text
        rows = service.rows(f"SELECT {', '.join(old_columns)} FROM messages ORDER BY id")
        (cut,) = [r for r in before if r["status"] == "streaming"]
        after_cut = next(r for r in rows if r["id"] == cut["id"])
        assert after_cut["content"] == cut["content"] and cut["content"].startswith("cut cut")
        assert after_cut["status"] == "interrupted" and after_cut["last_seq"] == chatsvc.INTERRUPTED_SEQ
        assert [r for r in rows if r["id"] != cut["id"]] == [r for r in before if r["id"] != cut["id"]]
        # old messages are still found (the search index of step 3 survives the step)
        found = client.get(CONV, params={"q": "有座山"}, headers=ALICE).json()["conversations"]
        assert sorted(c["session_id"] for c in found) == ["imported", "zh"]
        # and the old history takes new turns: a message, a regeneration, an edit, a fork, an export
        plain = client.get(f"{CONV}/plain", headers=ALICE).json()["messages"]
        fake.push(Reply.answer(["new"]), Reply.answer(["again"]))
        r = client.post(f"{API}/chat/plain", json={"message": "and now?"}, headers=ALICE)
        assert r.status_code == 200 and r.json()["response"] == "new", r.text
        assert [m["content"] for m in fake.requests[-1].body["messages"][1:]] == [
            *(m["content"] for m in plain), "and now?"]  # fmt: skip
        r = client.post(f"{API}/chat/plain", json={"regenerate": r.json()["message_id"]}, headers=ALICE)
        assert r.status_code == 200 and r.json()["response"] == "again", r.text
        fake.push(Reply.answer(["edited"]))
        r = client.post(f"{API}/chat/zh", json={"message": "换一个", "edit": EXPECTED["alice/zh"]["tree"][2]["id"]},
                        headers=ALICE)  # fmt: skip
        assert r.status_code == 200, r.text
        branch = client.get(f"{CONV}/plain", headers=ALICE).json()["messages"]
        assert [m["content"] for m in branch] == [*(m["content"] for m in plain), "and now?", "again"]
        assert all("steps" not in m and "tool_calls" not in m and m["role"] != "tool" for m in branch)
        r = client.post(f"{CONV}/plain/fork", json={"message_id": branch[-1]["id"], "session_id": "f2"}, headers=ALICE)
        assert r.status_code == 201, r.text
        doc = client.get(f"{CONV}/crashed/export", headers=ALICE).json()
        assert doc["version"] == 3 and doc["files"] == []
        answer = doc["messages"][-1]
        assert answer["status"] == "interrupted" and answer["last_seq"] == chatsvc.INTERRUPTED_SEQ
        assert answer["tool_steps"] is None and answer["tool_results"] is None
        assert client.post(f"{CONV}/import", json=doc, headers=ALICE).status_code == 201
    # a second start finds the database current: nothing is applied again
    with Service(v3_database, fake, CHATSVC_USER_HEADER="X-User-Id").client():
        assert len(service.rows("SELECT version FROM schema_versions")) == len(chatsvc.schema_steps())


def test_step_4_fails_whole_and_leaves_a_release_3_database_as_it_was(v3_database, fake, monkeypatch):
    service = Service(v3_database, fake, CHATSVC_USER_HEADER="X-User-Id")
    real = chatsvc.schema_steps()
    failing = chatsvc.SchemaStatement("INSERT INTO nowhere VALUES (1)", None)
    broken = chatsvc.SchemaStep(4, "tool calls, failing", [*real[3].statements, failing])
    monkeypatch.setattr(chatsvc, "schema_steps", lambda: [*real[:3], broken])
    with pytest.raises(chatsvc.SchemaError, match=r"schema version 4 \(tool calls, failing\) failed.*\(version 3\)"):
        with service.client():
            pass
    assert "tool_steps" not in message_columns(service) and "tool_results" not in message_columns(service)
    monkeypatch.undo()
    with service.client() as client:
        assert client.get(f"{CONV}/plain", headers=ALICE).json() == EXPECTED["alice/plain"]["conversation"]
