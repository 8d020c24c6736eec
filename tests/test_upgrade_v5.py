"""Databases of the release before usage accounting upgrade in place. tests/releases/v5.db was written
by release da4487b (schema version 5) through its own API (tests/releases/make_v5.py); v5.json is
what that API answered (each conversation's current branch, and its whole tree). On PostgreSQL the
same rows go into that release's schema (schema_v5.sql, its PostgreSQL statements). Today's chatsvc
adds schema step 6 (usage_calls, usage_owners, messages' reasoning and cached tokens and cost) in
place: every message and file stays as it was, no old answer is back-filled into the ledger, and the
new tables take calls, limits and reports at once."""

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
EXPECTED = json.loads((RELEASES / "v5.json").read_text())
ALICE = {"X-User-Id": "alice"}
USAGE_TABLES = ("usage_calls", "usage_owners")
NEW_MESSAGE_COLUMNS = ("reasoning_tokens", "cached_tokens", "cost_micros", "currency")
# each table of the release, in an order its keys allow, and the order its rows are compared in
OLD_TABLES = {
    "conversations": "owner, session_id",
    "messages": "id",  # by id: a parent before its children
    "files": "id",
    "file_chunks": "file_id, seq",
    "message_files": "message_id, position",
}


def v5_columns(table: str) -> list[str]:
    with sqlite3.connect(RELEASES / "v5.db") as db:
        return [r[1] for r in db.execute(f"SELECT * FROM pragma_table_info('{table}')") if r[1] != "search_id"]


def v5_rows(table: str, columns: list[str]) -> list[dict]:
    with sqlite3.connect(RELEASES / "v5.db") as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute(f"SELECT {', '.join(columns)} FROM {table} ORDER BY {OLD_TABLES[table]}")]


def v5_steps(monkeypatch) -> list[chatsvc.SchemaStep]:
    """The release's schema steps, read by today's parser (the file's format is the same)."""
    with monkeypatch.context() as m:
        m.setattr(chatsvc, "data_file", lambda *_: RELEASES / "schema_v5.sql")
        return chatsvc.schema_steps()


def v5_on_postgres(url: str, monkeypatch) -> None:
    """That release's schema on PostgreSQL, its versions recorded, holding v5.db's rows."""
    steps = v5_steps(monkeypatch)
    assert [s.version for s in steps] == [1, 2, 3, 4, 5]
    for step in steps:
        for statement in step.statements:
            if statement.dialect in (None, "postgresql"):
                pg(url, statement.sql)
    pg(
        url,
        "CREATE TABLE schema_versions (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL, release TEXT NOT NULL)",
    )
    for step in steps:
        pg(url, "INSERT INTO schema_versions VALUES ($1, '2026-12-05T00:00:00.000Z', '0.1.0')", step.version)
    for table in OLD_TABLES:
        columns = v5_columns(table)
        for row in v5_rows(table, columns):
            marks = ", ".join(f"${n}" for n in range(1, len(columns) + 1))
            pg(url, f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", *row.values())


@pytest.fixture
def v5_database(database, tmp_path, monkeypatch) -> str:
    """The test's database, as release da4487b left it."""
    if database.startswith("sqlite"):
        shutil.copyfile(RELEASES / "v5.db", tmp_path / "chatsvc.db")
    else:
        v5_on_postgres(database, monkeypatch)
    return database


def tables(service: Service) -> set[str]:
    if service.is_sqlite:
        return {r["name"] for r in service.rows("SELECT name FROM sqlite_master WHERE type = 'table'")}
    return {r["table_name"] for r in service.rows("SELECT table_name FROM information_schema.tables"
                                                  " WHERE table_schema = 'public'")}  # fmt: skip


def message_columns(service: Service) -> set[str]:
    if service.is_sqlite:
        return {r["name"] for r in service.rows("SELECT name FROM pragma_table_info('messages')")}
    return {r["column_name"] for r in service.rows("SELECT column_name FROM information_schema.columns"
                                                   " WHERE table_name = 'messages'")}  # fmt: skip


def test_the_file_is_what_the_release_wrote():
    with sqlite3.connect(RELEASES / "v5.db") as db:
        assert [r[0] for r in db.execute("SELECT version FROM schema_versions ORDER BY 1")] == [1, 2, 3, 4, 5]
        assert not {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")} & set(USAGE_TABLES)
        assert db.execute("SELECT COUNT(*) FROM messages WHERE status = 'streaming'").fetchone() == (1,)
        assert db.execute("SELECT COUNT(*) FROM messages WHERE tool_steps IS NOT NULL").fetchone() == (1,)
        assert db.execute("SELECT COUNT(*) FROM messages WHERE total_tokens IS NOT NULL").fetchone()[0] > 10
        assert db.execute("SELECT COUNT(*) FROM files WHERE status = 'ready'").fetchone() == (4,)
        assert db.execute("SELECT COUNT(DISTINCT message_id) FROM message_files").fetchone() == (2,)  # and its fork
    assert not set(NEW_MESSAGE_COLUMNS) & set(v5_columns("messages"))
    assert len(EXPECTED["alice/plain"]["tree"]) > len(EXPECTED["alice/plain"]["conversation"]["messages"])  # branches


def test_a_release_5_database_upgrades_in_place_and_takes_usage(v5_database, fake):
    service = Service(v5_database, fake, CHATSVC_USER_HEADER="X-User-Id", CHATSVC_VISION_MODEL="qwen3-vl-plus")
    before = {table: v5_rows(table, v5_columns(table)) for table in OLD_TABLES}
    with service.client() as client:
        store: chatsvc.Store = client.app.state.store
        versions = service.rows("SELECT version FROM schema_versions ORDER BY version")
        assert [r["version"] for r in versions] == [s.version for s in chatsvc.schema_steps()]
        assert len(versions) >= 6
        assert set(USAGE_TABLES) <= tables(service)
        assert set(NEW_MESSAGE_COLUMNS) <= message_columns(service)
        # no old answer is back-filled into the ledger: not even the one the start found cut
        for table in USAGE_TABLES:
            assert service.rows(f"SELECT COUNT(*) AS n FROM {table}") == [{"n": 0}], table
        assert service.rows(
            "SELECT COUNT(*) AS n FROM messages WHERE reasoning_tokens IS NOT NULL OR cached_tokens IS NOT NULL"
            " OR cost_micros IS NOT NULL OR currency IS NOT NULL"
        ) == [{"n": 0}]
        # every conversation reads back as the release answered, branches, tool calls and files and all
        for key, expected in EXPECTED.items():
            owner, sid = key.split("/")
            headers = {"X-User-Id": owner}
            assert client.get(f"{CONV}/{sid}", headers=headers).json() == expected["conversation"], key
            tree = client.get(f"{CONV}/{sid}/messages?tree=true&limit=500", headers=headers).json()
            assert tree == {"messages": expected["tree"], "next_cursor": None}, key
        # every row as it was, but the answer the crash cut, which is now `interrupted` with its text
        for table, rows in before.items():
            after = service.rows(f"SELECT {', '.join(rows[0])} FROM {table} ORDER BY {OLD_TABLES[table]}")
            if table == "messages":
                (cut,) = [r for r in rows if r["status"] == "streaming"]
                after_cut = next(r for r in after if r["id"] == cut["id"])
                assert after_cut["content"] == cut["content"] and cut["content"].startswith("cut cut")
                assert after_cut["status"] == "interrupted" and after_cut["last_seq"] == chatsvc.INTERRUPTED_SEQ
                after, rows = [r for r in after if r["id"] != cut["id"]], [r for r in rows if r["id"] != cut["id"]]
            assert after == rows, table

        # the ledger takes calls at once: an answer in an old conversation admitted, settled, reported
        def hold(purpose=chatsvc.Purpose.ANSWER, message_id=None):
            return chatsvc.Hold(chatsvc.new_message_id(), "alice", "plain", message_id or chatsvc.new_message_id(),
                                purpose, "qwen-plus", 100, 50)  # fmt: skip

        answer = hold()

        async def admit_and_settle():
            async with store.db.transaction():
                limits = await store.usage.admit(answer)
            async with store.db.transaction():
                await store.usage.settle(answer.call_id, chatsvc.Spent(chatsvc.Source.REPORTED, 90, 10, 100),
                                         "complete", True)  # fmt: skip
            return limits

        assert client.portal.call(admit_and_settle) == chatsvc.Limits()
        client.portal.call(store.usage.record, hold(chatsvc.Purpose.TITLE),
                           chatsvc.Spent(chatsvc.Source.REPORTED, 20, 5, 25), "complete")  # fmt: skip
        client.portal.call(store.usage.set_limits, "alice", {"tokens_per_day": 1000})
        standing = client.portal.call(store.usage.standing, "alice")
        assert standing["limits"]["tokens_per_day"] | {"resets_at": None} == {
            "limit": 1000, "source": "user", "used": 125, "reserved": 0, "remaining": 875, "resets_at": None,
        }  # fmt: skip
        totals, groups, _ = client.portal.call(store.usage.report, "alice", "2000-01-01", "2100-01-01", "purpose",
                                               10, None)  # fmt: skip
        assert (totals["calls"], totals["answers"], totals["total_tokens"]) == (2, 1, 125)
        assert [(g["key"], g["total_tokens"]) for g in groups] == [("answer", 100), ("title", 25)]
        # and an old conversation takes a turn over HTTP, an old file with it
        note = next(r for r in before["files"] if r["name"] == "note.txt" and r["owner"] == "alice")
        fake.push(Reply.answer(["new"]))
        r = client.post(f"{API}/chat/plain", json={"message": "and now?", "files": [note["id"]]}, headers=ALICE)
        assert r.status_code == 200 and r.json()["response"] == "new", r.text
        assert (
            client.get(f"{API}/files/{note['id']}/content", headers=ALICE).content == "a note: 北京 is north".encode()
        )
    # a second start finds the database current: nothing is applied again
    with Service(v5_database, fake, CHATSVC_USER_HEADER="X-User-Id").client():
        assert len(service.rows("SELECT version FROM schema_versions")) == len(chatsvc.schema_steps())


def test_step_6_fails_whole_and_leaves_a_release_5_database_as_it_was(v5_database, fake, monkeypatch):
    service = Service(v5_database, fake, CHATSVC_USER_HEADER="X-User-Id")
    real = chatsvc.schema_steps()
    failing = chatsvc.SchemaStatement("INSERT INTO nowhere VALUES (1)", None)
    broken = chatsvc.SchemaStep(6, "usage, failing", [*real[5].statements, failing])
    monkeypatch.setattr(chatsvc, "schema_steps", lambda: [*real[:5], broken])
    with pytest.raises(chatsvc.SchemaError, match=r"schema version 6 \(usage, failing\) failed.*\(version 5\)"):
        with service.client():
            pass
    assert not set(USAGE_TABLES) & tables(service)
    assert not set(NEW_MESSAGE_COLUMNS) & message_columns(service)
    monkeypatch.undo()
    with service.client() as client:
        assert client.get(f"{CONV}/plain", headers=ALICE).json() == EXPECTED["alice/plain"]["conversation"]
        assert set(USAGE_TABLES) <= tables(service)
