"""Databases of the release before summaries, continuations and web search upgrade in place.
tests/releases/v6.db was written by release 6bcfc33 (schema version 6) through its own API
(tests/releases/make_v6.py): branches, files, tool calls, a stopped answer, one a crash cut, a
30-turn conversation, the usage ledger (prices, an admin's limit); v6.json is what that API answered
(each conversation's current branch, and its whole tree). On PostgreSQL the same rows go into that
release's schema (schema_v6.sql, its PostgreSQL statements). Today's chatsvc adds schema step 7
(summaries; messages' continued, sources and searches; usage_calls' searches; conversations'
web_search) in place: every message, file and ledger row stays as it was, and every conversation
and message is presented as the release presented it.

Presentations: today's may carry fields the release had none of (a conversation's `summary` and
`web_search`, a message's `summarized`, `sources`, `searches`, `continued`). An old conversation has
no summary, no search and no continuation, so each of them, where presented, must hold its empty
value (null, false, 0 or absent); they are set aside, and the rest must equal the release's answer
exactly."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest
from fake_dashscope import Reply
from support import Service, pg, wait_for

import chatsvc

API = "/api/v1"
CONV = f"{API}/context/conversations"
RELEASES = Path(__file__).resolve().parent / "releases"
EXPECTED = json.loads((RELEASES / "v6.json").read_text())
ALICE = {"X-User-Id": "alice"}
NEW_TABLES = ("summaries",)
NEW_COLUMNS = {
    "messages": ("continued", "sources", "searches"),
    "usage_calls": ("searches",),
    "conversations": ("web_search",),
}
# fields today's presentations may add, with the values an old conversation may show in them
NEW_FIELDS = {"summary": (None,), "web_search": (None, False), "summarized": (False,), "sources": (None, []),
              "searches": (None, 0), "continued": (None, 0, False)}  # fmt: skip
# each table of the release, in an order its keys allow, and the order its rows are compared in
OLD_TABLES = {
    "conversations": "owner, session_id",
    "messages": "id",  # by id: a parent before its children
    "files": "id",
    "file_chunks": "file_id, seq",
    "message_files": "message_id, position",
    "usage_calls": "id",
    "usage_owners": "owner",
}


def v6_columns(table: str) -> list[str]:
    with sqlite3.connect(RELEASES / "v6.db") as db:
        return [r[1] for r in db.execute(f"SELECT * FROM pragma_table_info('{table}')") if r[1] != "search_id"]


def v6_rows(table: str, columns: list[str]) -> list[dict]:
    with sqlite3.connect(RELEASES / "v6.db") as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute(f"SELECT {', '.join(columns)} FROM {table} ORDER BY {OLD_TABLES[table]}")]


def v6_steps(monkeypatch) -> list[chatsvc.SchemaStep]:
    """The release's schema steps, read by today's parser (the file's format is the same)."""
    with monkeypatch.context() as m:
        m.setattr(chatsvc, "data_file", lambda *_: RELEASES / "schema_v6.sql")
        return chatsvc.schema_steps()


def v6_on_postgres(url: str, monkeypatch) -> None:
    """That release's schema on PostgreSQL, its versions recorded, holding v6.db's rows."""
    steps = v6_steps(monkeypatch)
    assert [s.version for s in steps] == [1, 2, 3, 4, 5, 6]
    for step in steps:
        for statement in step.statements:
            if statement.dialect in (None, "postgresql"):
                pg(url, statement.sql)
    pg(
        url,
        "CREATE TABLE schema_versions (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL, release TEXT NOT NULL)",
    )
    for step in steps:
        pg(url, "INSERT INTO schema_versions VALUES ($1, '2026-12-05T21:17:32.000Z', '0.1.0')", step.version)
    for table in OLD_TABLES:
        columns = v6_columns(table)
        for row in v6_rows(table, columns):
            marks = ", ".join(f"${n}" for n in range(1, len(columns) + 1))
            pg(url, f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", *row.values())


@pytest.fixture
def v6_database(database, tmp_path, monkeypatch) -> str:
    """The test's database, as release 6bcfc33 left it."""
    if database.startswith("sqlite"):
        shutil.copyfile(RELEASES / "v6.db", tmp_path / "chatsvc.db")
    else:
        v6_on_postgres(database, monkeypatch)
    return database


def tables(service: Service) -> set[str]:
    if service.is_sqlite:
        return {r["name"] for r in service.rows("SELECT name FROM sqlite_master WHERE type = 'table'")}
    return {r["table_name"] for r in service.rows("SELECT table_name FROM information_schema.tables"
                                                  " WHERE table_schema = 'public'")}  # fmt: skip


def columns(service: Service, table: str) -> set[str]:
    if service.is_sqlite:
        return {r["name"] for r in service.rows(f"SELECT name FROM pragma_table_info('{table}')")}
    return {r["column_name"] for r in service.rows("SELECT column_name FROM information_schema.columns"
                                                   " WHERE table_name = ?", table)}  # fmt: skip


def new_columns_absent(service: Service) -> bool:
    return not set(NEW_TABLES) & tables(service) and all(
        not set(cols) & columns(service, table) for table, cols in NEW_COLUMNS.items()
    )


def as_released(presented):
    """A presentation without the fields the release did not have where they hold their empty value."""
    if isinstance(presented, list):
        return [as_released(item) for item in presented]
    if not isinstance(presented, dict):
        return presented
    out = {}
    for key, value in presented.items():
        if key in NEW_FIELDS and value in NEW_FIELDS[key]:
            continue  # else kept, to differ from the release's answer
        out[key] = as_released(value)
    return out


def test_the_file_is_what_the_release_wrote():
    with sqlite3.connect(RELEASES / "v6.db") as db:
        assert [r[0] for r in db.execute("SELECT version FROM schema_versions ORDER BY 1")] == [1, 2, 3, 4, 5, 6]
        assert not {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")} & set(NEW_TABLES)
        assert db.execute("SELECT COUNT(*) FROM messages WHERE status = 'streaming'").fetchone() == (1,)
        assert db.execute("SELECT COUNT(*) FROM messages WHERE status = 'stopped'").fetchone() == (1,)
        assert db.execute("SELECT COUNT(*) FROM messages WHERE tool_steps IS NOT NULL").fetchone() == (1,)
        assert db.execute("SELECT COUNT(*) FROM messages WHERE session_id = 'long'").fetchone() == (60,)
        assert db.execute("SELECT COUNT(*) FROM files WHERE status = 'ready'").fetchone() == (4,)
        assert db.execute("SELECT COUNT(*) FROM usage_calls WHERE state = 'settled'").fetchone()[0] > 40
        assert db.execute("SELECT COUNT(*) FROM usage_calls WHERE cost_micros > 0").fetchone()[0] > 40
        assert db.execute("SELECT limit_tokens_per_day FROM usage_owners WHERE owner = 'bob'").fetchone() == (100000,)
    for table, cols in NEW_COLUMNS.items():
        assert not set(cols) & set(v6_columns(table)), table
    assert len(EXPECTED["alice/plain"]["tree"]) > len(EXPECTED["alice/plain"]["conversation"]["messages"])  # branches
    assert len(EXPECTED["alice/long"]["tree"]) == 60


def test_a_release_6_database_upgrades_in_place_and_summarises_its_long_conversation(v6_database, fake):
    service = Service(v6_database, fake, CHATSVC_USER_HEADER="X-User-Id", CHATSVC_VISION_MODEL="qwen3-vl-plus",
                      CHATSVC_SUMMARIES="on")  # fmt: skip
    before = {table: v6_rows(table, v6_columns(table)) for table in OLD_TABLES}
    with service.client() as client:
        versions = service.rows("SELECT version FROM schema_versions ORDER BY version")
        assert [r["version"] for r in versions] == [s.version for s in chatsvc.schema_steps()]
        assert len(versions) >= 7
        assert set(NEW_TABLES) <= tables(service)
        for table, cols in NEW_COLUMNS.items():
            assert set(cols) <= columns(service, table), table
        assert service.rows("SELECT COUNT(*) AS n FROM summaries") == [{"n": 0}]  # none made at the start
        # every conversation reads back as the release answered, branches, tool calls, files and all
        for key, expected in EXPECTED.items():
            owner, sid = key.split("/")
            headers = {"X-User-Id": owner}
            assert as_released(client.get(f"{CONV}/{sid}", headers=headers).json()) == expected["conversation"], key
            tree = client.get(f"{CONV}/{sid}/messages?tree=true&limit=500", headers=headers).json()
            assert as_released(tree) == {"messages": expected["tree"], "next_cursor": None}, key
        # every row as it was, but the answer the crash cut (now `interrupted` with its text) and its call
        for table, rows in before.items():
            after = service.rows(f"SELECT {', '.join(rows[0])} FROM {table} ORDER BY {OLD_TABLES[table]}")
            if table == "messages":
                (cut,) = [r for r in rows if r["status"] == "streaming"]
                after_cut = next(r for r in after if r["id"] == cut["id"])
                assert after_cut["content"] == cut["content"] and cut["content"].startswith("cut cut")
                assert after_cut["status"] == "interrupted" and after_cut["last_seq"] == chatsvc.INTERRUPTED_SEQ
                after, rows = [r for r in after if r["id"] != cut["id"]], [r for r in rows if r["id"] != cut["id"]]
            if table == "usage_calls":  # the cut answer's call, reserved, is settled at the start
                (reserved,) = [r for r in rows if r["state"] == "reserved"]
                (settled,) = [r for r in after if r["id"] == reserved["id"]]
                assert (settled["state"], settled["outcome"]) == ("settled", "interrupted")
                after, rows = [r for r in after if r is not settled], [r for r in rows if r is not reserved]
            if table == "usage_owners":  # ... its reservation given back, what it spent counted to its owner
                keep = ("owner", "day", "day_tokens", "month", "month_tokens", "limit_tokens_per_day")
                spent = settled["total_tokens"]
                assert spent > 0 and settled["owner"] == "alice"
                after = [{k: r[k] for k in keep} for r in after]
                rows = [{k: r[k] + (spent if k.endswith("tokens") and r["owner"] == "alice" else 0)
                         if k in ("day_tokens", "month_tokens") else r[k] for k in keep} for r in rows]  # fmt: skip
            assert after == rows, table
        assert service.rows("SELECT COUNT(*) AS n FROM messages WHERE continued <> 0 OR sources IS NOT NULL"
                            " OR searches IS NOT NULL") == [{"n": 0}]  # fmt: skip
        # the old long conversation takes a turn: the release's whole context (its newest 20 messages)
        # no longer fits, so its older part is summarised, and the next turn is sent the summary
        fake.push(Reply.answer(["Answer 30."]), Reply.answer(["The user gave numbers 0 to 203."]))
        r = client.post(f"{API}/chat/long", json={"message": "Turn 30."}, headers=ALICE)
        assert r.status_code == 200 and r.json()["response"] == "Answer 30.", r.text
        (summary,) = wait_for(lambda: service.rows("SELECT content, covered FROM summaries"))
        assert summary["content"] == "The user gave numbers 0 to 203."
        fake.push(Reply.answer(["Answer 31."]))
        r = client.post(f"{API}/chat/long", json={"message": "Turn 31."}, headers=ALICE)
        assert r.status_code == 200, r.text
        sent = fake.requests[-1].body["messages"]
        assert sent[0]["role"] == "system" and "The user gave numbers 0 to 203." in sent[0]["content"]
        conversation = client.get(f"{CONV}/long", headers=ALICE).json()
        assert conversation["summary"]["content"] == "The user gave numbers 0 to 203."
        marked = [bool(m.get("summarized")) for m in conversation["messages"]]  # its newest 50: the oldest covered
        assert any(marked) and marked == sorted(marked, reverse=True) and summary["covered"] >= marked.count(True)
        # an old file goes with a new turn
        note = next(r for r in before["files"] if r["name"] == "note.txt" and r["owner"] == "alice")
        fake.push(Reply.answer(["new"]))
        r = client.post(f"{API}/chat/plain", json={"message": "and now?", "files": [note["id"]]}, headers=ALICE)
        assert r.status_code == 200 and r.json()["response"] == "new", r.text
    # a second start finds the database current: nothing is applied again
    with Service(v6_database, fake, CHATSVC_USER_HEADER="X-User-Id").client():
        assert len(service.rows("SELECT version FROM schema_versions")) == len(chatsvc.schema_steps())


def test_step_7_fails_whole_and_leaves_a_release_6_database_as_it_was(v6_database, fake, monkeypatch):
    service = Service(v6_database, fake, CHATSVC_USER_HEADER="X-User-Id")
    real = chatsvc.schema_steps()
    failing = chatsvc.SchemaStatement("INSERT INTO nowhere VALUES (1)", None)
    broken = chatsvc.SchemaStep(7, "summaries, failing", [*real[6].statements, failing])
    monkeypatch.setattr(chatsvc, "schema_steps", lambda: [*real[:6], broken])
    with pytest.raises(chatsvc.SchemaError, match=r"schema version 7 \(summaries, failing\) failed.*\(version 6\)"):
        with service.client():
            pass
    assert new_columns_absent(service)
    assert [r["version"] for r in service.rows("SELECT version FROM schema_versions ORDER BY 1")] == [1, 2, 3, 4, 5, 6]
    for table in OLD_TABLES:
        rows = v6_rows(table, v6_columns(table))
        assert service.rows(f"SELECT {', '.join(rows[0])} FROM {table} ORDER BY {OLD_TABLES[table]}") == rows, table
    monkeypatch.undo()
    with service.client() as client:
        presented = client.get(f"{CONV}/plain", headers=ALICE).json()
        assert as_released(presented) == EXPECTED["alice/plain"]["conversation"]
        assert set(NEW_TABLES) <= tables(service)
