"""Databases that upgrade in place. tests/releases/v1.db was written by the first release (schema
version 1, no version recorded) through its own API (tests/releases/make_v1.py); v1.json is what
that API answered. On PostgreSQL the same rows go into the first release's schema
(schema_v1.sql). Today's chatsvc upgrades either in place, reads every conversation back as the
first release did, and then takes regenerations and edits."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest
from fake_dashscope import Reply
from procs import ServerProcess
from support import EMPTY_POSTGRES, Service, pg
from test_cli import chatsvc as run_chatsvc

import chatsvc

API = "/api/v1"
RELEASES = Path(__file__).resolve().parent / "releases"
EXPECTED = json.loads((RELEASES / "v1.json").read_text())
NEW_FIELDS = {"parent_id", "sibling_ids", "current_message_id", "title_usage"}
OLD_COLUMNS = ("id", "owner", "session_id", "role", "content", "reasoning_content", "status", "model",
               "finish_reason", "error_code", "error_message", "prompt_tokens", "completion_tokens", "total_tokens",
               "last_seq", "created_at", "updated_at")  # fmt: skip
CONVERSATION_COLUMNS = ("owner", "session_id", "title", "system_prompt", "model", "context_start", "created_at",
                        "updated_at")  # fmt: skip


def v1_rows(table: str, columns: tuple[str, ...]) -> list[dict]:
    with sqlite3.connect(RELEASES / "v1.db") as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute(f"SELECT {', '.join(columns)} FROM {table} ORDER BY 1, 2")]


def v1_statements() -> list[str]:
    text = "\n".join(ln for ln in (RELEASES / "schema_v1.sql").read_text().splitlines() if not ln.startswith("--"))
    return [st for st in text.split(";") if st.strip()]


@pytest.fixture
def v1_database(database, tmp_path) -> str:
    """The test's database, as the first release left it."""
    if database.startswith("sqlite"):
        shutil.copyfile(RELEASES / "v1.db", tmp_path / "chatsvc.db")
        return database
    v1_on_postgres(database)
    return database


def v1_on_postgres(url: str) -> None:
    """The first release's schema, holding v1.db's rows."""
    for statement in v1_statements():
        pg(url, statement)
    for table, columns in (("conversations", CONVERSATION_COLUMNS), ("messages", OLD_COLUMNS)):
        for row in v1_rows(table, columns):
            marks = ", ".join(f"${n}" for n in range(1, len(columns) + 1))
            pg(url, f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", *row.values())


def message_columns(service: Service) -> list[str]:
    if service.is_sqlite:
        return [r["name"] for r in service.rows("SELECT name FROM pragma_table_info('messages')")]
    sql = "SELECT column_name FROM information_schema.columns WHERE table_name = 'messages'"
    return [r["column_name"] for r in service.rows(sql)]


def without_new_fields(value):
    if isinstance(value, dict):
        return {k: without_new_fields(v) for k, v in value.items() if k not in NEW_FIELDS}
    if isinstance(value, list):
        return [without_new_fields(v) for v in value]
    return value


def test_a_first_release_database_upgrades_in_place_and_reads_back_the_same(v1_database, fake, service_env):
    service = Service(v1_database, fake, **service_env)
    with service.client() as client:
        versions = service.rows("SELECT version FROM schema_versions ORDER BY version")
        assert [r["version"] for r in versions] == list(range(1, len(chatsvc.schema_steps()) + 1))
        for key, before in EXPECTED.items():
            owner, session_id = key.split("/")
            after = client.get(f"{API}/context/conversations/{session_id}", headers={"X-User-Id": owner}).json()
            assert without_new_fields(after) == before, key
            # each conversation's messages are one chain in their order, the newest the current leaf
            ids = [m["id"] for m in after["messages"]]
            assert [m["parent_id"] for m in after["messages"]] == [None, *ids[:-1]][: len(ids)], key
            assert all(m["sibling_ids"] == [m["id"]] for m in after["messages"]), key
            assert after["current_message_id"] == (ids[-1] if ids else None), key
        # every row as it was, but the answer the crash cut, which is now `interrupted` with its text
        rows = service.rows(f"SELECT {', '.join(OLD_COLUMNS)} FROM messages ORDER BY owner, session_id")
        old = v1_rows("messages", OLD_COLUMNS)
        (cut,) = [r for r in old if r["status"] == "streaming"]
        assert sorted(rows, key=lambda r: r["id"]) == sorted(
            [r for r in old if r is not cut] + [{**cut, "status": "interrupted", "error_code": "interrupted",
             "error_message": chatsvc.INTERRUPTED_DETAIL, "last_seq": chatsvc.INTERRUPTED_SEQ,
             "updated_at": next(x["updated_at"] for x in rows if x["id"] == cut["id"])}],
            key=lambda r: r["id"],
        )  # fmt: skip
        assert cut["content"].startswith("cut cut")
        conversations = service.rows(f"SELECT {', '.join(CONVERSATION_COLUMNS)} FROM conversations ORDER BY 1, 2")
        assert conversations == v1_rows("conversations", CONVERSATION_COLUMNS)
        # and the old history takes the new operations
        alice = {"X-User-Id": "alice"}
        plain = client.get(f"{API}/context/conversations/plain", headers=alice).json()["messages"]
        fake.push(Reply.answer(["regenerated"]))
        r = client.post(f"{API}/chat/plain", json={"regenerate": plain[-1]["id"]}, headers=alice)
        assert r.status_code == 200, r.text
        assert [m["content"] for m in fake.requests[-1].body["messages"][1:]] == [m["content"] for m in plain[:-1]]
        fake.push(Reply.answer(["edited"]))
        r = client.post(f"{API}/chat/plain", json={"message": "2+2, again?", "edit": plain[2]["id"]}, headers=alice)
        assert r.status_code == 200, r.text
        assert [m["content"] for m in fake.requests[-1].body["messages"][1:]] == ["Who are you?", "Hello, I am Qwen.",
                                                                                   "2+2, again?"]  # fmt: skip
        branch = client.get(f"{API}/context/conversations/plain", headers=alice).json()["messages"]
        assert [m["content"] for m in branch] == ["Who are you?", "Hello, I am Qwen.", "2+2, again?", "edited"]
        assert branch[2]["sibling_ids"] == [plain[2]["id"], branch[2]["id"]]
        # the old messages are found by search (the index was built by the upgrade)
        found = client.get(f"{API}/context/conversations", params={"q": "有座山"}, headers=alice).json()
        assert [(c["session_id"], c["match"]["snippet"]) for c in found["conversations"]] == [("zh", "从前有座山")]
        found = client.get(f"{API}/context/conversations", params={"q": "cut cut"}, headers=alice).json()
        assert [c["session_id"] for c in found["conversations"]] == ["crashed"]  # interrupted at the start: found
        found = client.get(f"{API}/context/conversations", params={"q": "question"}, headers={"X-User-Id": "bob"})
        assert [c["session_id"] for c in found.json()["conversations"]] == ["plain"]
    # a second start finds the database current: nothing is applied again
    with Service(v1_database, fake, **service_env).client():
        assert len(service.rows("SELECT version FROM schema_versions")) == len(chatsvc.schema_steps())


@pytest.fixture
def service_env():
    return {"CHATSVC_USER_HEADER": "X-User-Id"}


def test_a_failed_step_leaves_the_database_as_it_was(v1_database, fake, monkeypatch):
    service = Service(v1_database, fake, CHATSVC_USER_HEADER="X-User-Id")
    before = service.rows(f"SELECT {', '.join(OLD_COLUMNS)} FROM messages ORDER BY id")
    real = chatsvc.schema_steps()
    failing = chatsvc.SchemaStatement("INSERT INTO nowhere VALUES (1)", None)
    broken = chatsvc.SchemaStep(2, "a step that fails half-way", [*real[1].statements, failing])
    monkeypatch.setattr(chatsvc, "schema_steps", lambda: [real[0], broken, *real[2:]])
    with pytest.raises(chatsvc.SchemaError) as failed:
        with service.client():
            pass
    assert "schema version 2 (a step that fails half-way) failed, and left it as it was (version 1)" in str(
        failed.value
    )
    assert service.rows("SELECT version FROM schema_versions") == [{"version": 1}]
    assert service.rows(f"SELECT {', '.join(OLD_COLUMNS)} FROM messages ORDER BY id") == before
    columns = message_columns(service)
    assert "parent_id" not in columns  # the step's first statements were rolled back with it
    monkeypatch.undo()
    with service.client() as client:  # the real step then applies
        assert client.get(f"{API}/context/conversations/plain", headers={"X-User-Id": "alice"}).status_code == 200


def test_a_database_newer_than_the_code_is_refused_in_one_sentence(v1_database, fake, tmp_path):
    service = Service(v1_database, fake)
    with service.client():
        pass
    service.rows("INSERT INTO schema_versions (version, applied_at, release) VALUES (99, 'later', '9.0')")
    out = run_chatsvc(env={**service.env, "PORT": "1"}, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == (
        "chatsvc: The database at DATABASE_URL has schema version 99, newer than this chatsvc"
        f" ({chatsvc.__version__}, schema version {len(chatsvc.schema_steps())}) knows: run the chatsvc release"
        " that upgraded it (or a newer one), or restore a backup made before that upgrade."
    )
    with pytest.raises(chatsvc.SchemaError, match="schema version 99, newer"):
        with service.client():
            pass
    assert len(service.rows("SELECT * FROM messages")) == len(v1_rows("messages", OLD_COLUMNS))


@pytest.mark.slow
def test_replicas_starting_together_on_an_old_database_upgrade_it_once(postgres_database, fake, tmp_path):
    pg(postgres_database, EMPTY_POSTGRES)
    v1_on_postgres(postgres_database)
    service = Service(postgres_database, fake, CHATSVC_USER_HEADER="X-User-Id", LOG_LEVEL="info")
    from test_replicas import start_together

    servers = [ServerProcess(service.env, tmp_path) for _ in range(3)]
    try:
        start_together(*servers)
        logs = [server.log() for server in servers]
        for step in chatsvc.schema_steps():
            assert sum(f"step {step.version} applied" in text for text in logs) == 1, logs
        assert not any("Traceback" in text for text in logs), logs
        versions = service.rows("SELECT version FROM schema_versions ORDER BY version")
        assert versions == [{"version": n} for n in range(1, len(chatsvc.schema_steps()) + 1)]
        for server in servers:
            with server.client() as client:
                r = client.get(f"{API}/context/conversations/plain", headers={"X-User-Id": "alice"})
                assert without_new_fields(r.json()) == EXPECTED["alice/plain"]
        roots = service.rows("SELECT owner, session_id FROM messages WHERE parent_id IS NULL ORDER BY 1, 2")
        chains = {(r["owner"], r["session_id"]) for r in v1_rows("messages", OLD_COLUMNS)}
        assert [(r["owner"], r["session_id"]) for r in roots] == sorted(chains)  # one chain a conversation
    finally:
        for server in servers:
            server.stop()


def test_check_does_not_upgrade_and_names_a_database_too_new(v1_database, fake, tmp_path):
    service = Service(v1_database, fake)
    out = run_chatsvc("--check", env={**service.env, "PORT": "0"}, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    columns = message_columns(service)
    assert "parent_id" not in columns  # --check looks, the start upgrades
    with service.client():
        pass
    service.rows("INSERT INTO schema_versions (version, applied_at, release) VALUES (99, 'later', '9.0')")
    out = run_chatsvc("--check", env={**service.env, "PORT": "0"}, cwd=tmp_path)
    assert out.returncode == 1 and "schema version 99, newer than this chatsvc" in out.stderr, out.stderr
