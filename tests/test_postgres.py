"""The same chatsvc.py and schema.sql on PostgreSQL (asyncpg through `databases`).

Uses the PostgreSQL at CHATSVC_TEST_POSTGRES (default postgresql://postgres@127.0.0.1/postgres) and
makes a throw-away database per test run. Without a reachable server the tests skip, except under
CI=true, where .ci/run starts the server and these tests must run.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid

import pytest
from fake_dashscope import Reply

import chatsvc

ADMIN_URL = os.environ.get("CHATSVC_TEST_POSTGRES", "postgresql://postgres@127.0.0.1/postgres")
API = "/api/v1"


def pg(url: str, sql: str, *args):
    async def run():
        import asyncpg

        conn = await asyncpg.connect(url, timeout=5)
        try:
            return [dict(r) for r in await conn.fetch(sql, *args)]
        finally:
            await conn.close()

    return asyncio.run(run())


@pytest.fixture(scope="module")
def pg_url():
    try:
        import asyncpg  # noqa: F401

        pg(ADMIN_URL, "SELECT 1")
    except Exception as exc:
        reason = f"no PostgreSQL at {ADMIN_URL} ({type(exc).__name__}: {exc})"
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL tests must run under CI=true: {reason}")
        pytest.skip(reason)
    name = f"chatsvc_test_{uuid.uuid4().hex[:12]}"
    pg(ADMIN_URL, f"CREATE DATABASE {name}")
    yield ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    pg(ADMIN_URL, f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture
def pg_service(make_service, pg_url):
    service = make_service(DATABASE_URL=pg_url)
    pg(pg_url, "DROP TABLE IF EXISTS messages, conversations")
    return service


def test_chat_and_conversations_on_postgres(pg_service, pg_url, fake):
    with pg_service.client() as client:
        r = client.post(f"{API}/chat/s1", json={"message": "100% :name 'quoted' 😀"})
        assert r.status_code == 200 and r.json()["usage"]["total_tokens"] == 39
        assert client.post(f"{API}/context/conversations", json={"session_id": "s1"}).status_code == 409
        conv = client.get(f"{API}/context/conversations/s1").json()
        assert conv["message_count"] == 2 and conv["generating"] is False
        assert conv["messages"][0]["content"] == "100% :name 'quoted' 😀"
        assert client.delete(f"{API}/context/conversations/s1/context").json()["context_message_count"] == 0
        page = client.get(f"{API}/context/conversations?limit=1").json()
        assert [c["session_id"] for c in page["conversations"]] == ["s1"] and page["next_cursor"] is None
        assert client.delete(f"{API}/context/conversations/s1").status_code == 204
    assert pg(pg_url, "SELECT COUNT(*) AS n FROM messages") == [{"n": 0}]


def test_upstream_failure_is_stored_on_postgres(pg_service, pg_url, fake):
    fake.push(Reply.error(401, "invalid_api_key", "Incorrect API key provided."))
    with pg_service.client() as client:
        assert client.post(f"{API}/chat/s1", json={"message": "hi"}).status_code == 502
    rows = pg(pg_url, "SELECT role, status, error_code FROM messages ORDER BY id")
    assert rows == [{"role": "user", "status": "complete", "error_code": None},
                    {"role": "assistant", "status": "failed", "error_code": "upstream_auth"}]  # fmt: skip


def test_one_answer_at_a_time_is_enforced_by_postgres(pg_service, pg_url, fake):
    fake.push(Reply.answer(["slow"] * 20, pause=0.05))
    with pg_service.client() as client:
        first = threading.Thread(target=lambda: client.post(f"{API}/chat/s1", json={"message": "one"}))
        first.start()
        deadline = time.monotonic() + 10
        while not pg(pg_url, "SELECT 1 FROM messages WHERE status = 'streaming'"):
            assert time.monotonic() < deadline, "the first answer never started"
        r = client.post(f"{API}/chat/s1", json={"message": "two"})
        assert r.status_code == 409 and r.json()["code"] == "conversation_busy"
        first.join(10)
    assert [r["content"] for r in pg(pg_url, "SELECT content FROM messages WHERE role = 'user'")] == ["one"]


def test_restart_on_postgres_is_idempotent_and_recovers(pg_service, pg_url, fake):
    with pg_service.client() as client:
        client.post(f"{API}/chat/s1", json={"message": "hi"})
    schema = pg(pg_url, "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1")
    pg(pg_url, "UPDATE messages SET status = 'streaming', content = 'half' WHERE role = 'assistant'")
    with pg_service.client() as client:
        answer = client.get(f"{API}/context/conversations/s1").json()["messages"][1]
        assert (answer["status"], answer["content"]) == ("interrupted", "half")
    assert pg(pg_url, "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1") == schema


def test_store_reports_postgres_ready(pg_url):
    async def ping():
        store = chatsvc.Store(pg_url)
        await store.open()
        try:
            await store.ping()
        finally:
            await store.close()

    asyncio.run(ping())
