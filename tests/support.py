"""Test support: a fake DashScope on a real port, and chatsvc instances on a temporary database.

Every test that makes a service runs twice: on a temporary SQLite file and on a throw-away
PostgreSQL database (on the server at CHATSVC_TEST_POSTGRES, default
postgresql://postgres@127.0.0.1/postgres). Without a reachable PostgreSQL the second run skips,
with the reason; under CI=true it fails instead.

Loaded as a pytest plugin (`-p support` in pyproject.toml), so every test file gets these fixtures."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import re
import sqlite3
import time
import uuid

import pytest
from fake_dashscope import FakeDashScope
from starlette.testclient import TestClient

import chatsvc


def wait_for(condition, timeout: float = 10.0):
    """Poll `condition` until it returns something true (and return that), or fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.005)
    raise AssertionError("condition not met in time")


@pytest.fixture(scope="session")
def fake_server():
    server = FakeDashScope().start()
    yield server
    server.stop()


@pytest.fixture
def fake(fake_server):
    fake_server.reset()
    yield fake_server
    fake_server.reset()


POSTGRES = os.environ.get("CHATSVC_TEST_POSTGRES", "postgresql://postgres@127.0.0.1/postgres")


def pg(url: str, sql: str, *args) -> list[dict]:
    """One statement on PostgreSQL, from synchronous test code."""

    async def run() -> list[dict]:
        import asyncpg

        conn = await asyncpg.connect(url, timeout=5)
        try:
            return [dict(r) for r in await conn.fetch(sql, *args)]
        finally:
            await conn.close()

    with concurrent.futures.ThreadPoolExecutor(1) as worker:  # a loop of its own, whatever this thread runs
        return worker.submit(lambda: asyncio.run(run())).result()


@pytest.fixture(scope="session")
def postgres_database():
    """A throw-away database for this run."""
    try:
        pg(POSTGRES, "SELECT 1")
    except Exception as exc:
        reason = f"no PostgreSQL at {POSTGRES} ({type(exc).__name__}: {exc}); set CHATSVC_TEST_POSTGRES"
        if os.environ.get("CI") == "true":
            pytest.fail(f"the PostgreSQL runs must not skip under CI=true: {reason}")
        pytest.skip(reason)
    name = f"chatsvc_test_{uuid.uuid4().hex[:12]}"
    pg(POSTGRES, f"CREATE DATABASE {name}")
    yield POSTGRES.rsplit("/", 1)[0] + f"/{name}"
    pg(POSTGRES, f"DROP DATABASE {name} WITH (FORCE)")


# Empties the run's PostgreSQL database for a test (what a CASCADE leaves, the functions and types, is
# made again by the schema's CREATE OR REPLACE and IF NOT EXISTS).
EMPTY_POSTGRES = (
    "DROP TABLE IF EXISTS summaries, usage_calls, usage_owners, message_files, file_chunks, files, messages,"
    " conversations, schema_versions CASCADE"
)


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path) -> str:
    """The DATABASE_URL of one test: a new SQLite file, or the run's PostgreSQL database emptied."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'chatsvc.db'}"
    url = request.getfixturevalue("postgres_database")
    pg(url, EMPTY_POSTGRES)
    return url


class Service:
    """One chatsvc configuration: its settings, its database, a way to run it."""

    def __init__(self, database: str, fake: FakeDashScope, **env: str):
        self.env = {
            "DASHSCOPE_API_KEY": "sk-test-key",
            "DASHSCOPE_BASE_URL": fake.url,
            "DATABASE_URL": database,
            "CHATSVC_UPSTREAM_RETRIES": "0",
            "CHATSVC_UPSTREAM_IDLE_TIMEOUT": "5",
            "CHATSVC_REPLAY_SECONDS": "5",
            "CHATSVC_SHUTDOWN_GRACE": "1",
            # the model's titles are one more upstream request after a conversation's first answer:
            # tests/test_titles.py asks for them; every other test counts the requests it makes
            "CHATSVC_TITLES": "first-line",
            # likewise a summary, once a branch outgrows the context: tests/test_summaries.py turns them on
            "CHATSVC_SUMMARIES": "off",
            **env,
        }
        self.env = {k: v for k, v in self.env.items() if v is not None}
        self.settings = chatsvc.Settings.from_env(self.env, env_file=None)
        self.url = self.settings.database_url
        self.is_sqlite = self.url.startswith("sqlite")

    def client(self) -> TestClient:
        return TestClient(chatsvc.create_app(self.settings), raise_server_exceptions=True)

    def rows(self, sql: str, *args) -> list[dict]:
        """Run one statement on the service's database (`?` placeholders), as another process would."""
        if self.is_sqlite:
            with sqlite3.connect(self.url.split("///", 1)[1]) as db:
                db.row_factory = sqlite3.Row
                return [dict(r) for r in db.execute(sql, args)]
        numbered = iter(range(1, len(args) + 1))
        return pg(self.url, re.sub(r"\?", lambda _: f"${next(numbered)}", sql), *args)

    def schema(self) -> list[dict]:
        """The tables, columns and indexes, to compare across restarts."""
        if self.is_sqlite:
            return self.rows("SELECT type, name, sql FROM sqlite_master ORDER BY name")
        return self.rows(
            "SELECT table_name AS name, column_name AS sql FROM information_schema.columns"
            " WHERE table_schema = 'public' UNION ALL SELECT indexname, indexdef FROM pg_indexes"
            " WHERE schemaname = 'public' ORDER BY 1, 2"
        )


@pytest.fixture
def make_service(database, fake):
    def make(**env: str) -> Service:
        return Service(database, fake, **env)

    return make


@pytest.fixture
def service(make_service):
    return make_service()


@pytest.fixture
def client(service):
    with service.client() as c:
        yield c


# ── every log line of the run, scanned for secrets at the end ─────────────────────────

SECRETS = ("sk-test-key", "s3cret", "tok-secret-123", "tok-do-not-log", "sk-do-not-log")


class _Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name} {record.getMessage()}")


_recorder = _Recorder()


def pytest_configure(config):
    logging.getLogger().addHandler(_recorder)
    for name in ("chatsvc", "uvicorn", "httpx", "databases", "sse_starlette"):
        logging.getLogger(name).setLevel(logging.INFO)


def pytest_sessionfinish(session, exitstatus):
    leaks = [line for line in _recorder.lines if any(secret in line for secret in SECRETS)]
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"log scan: {len(_recorder.lines)} log lines at INFO and above, {len(leaks)} with a secret")
    if leaks:
        for line in leaks[:20]:
            reporter.write_line(f"SECRET IN LOG: {line}", red=True)
        session.exitstatus = 1
