"""Test support: a fake DashScope on a real port, and chatsvc instances on a temporary SQLite file.

Loaded as a pytest plugin (`-p support` in pyproject.toml), so every test file gets these fixtures."""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path

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


class Service:
    """One chatsvc configuration: its settings, its database file, a way to run it."""

    def __init__(self, tmp_path: Path, fake: FakeDashScope, **env: str):
        self.db_path = tmp_path / "chatsvc.db"
        self.env = {
            "DASHSCOPE_API_KEY": "sk-test-key",
            "DASHSCOPE_BASE_URL": fake.url,
            "DATABASE_URL": f"sqlite+aiosqlite:///{self.db_path}",
            "CHATSVC_UPSTREAM_RETRIES": "0",
            "CHATSVC_UPSTREAM_IDLE_TIMEOUT": "5",
            "CHATSVC_REPLAY_SECONDS": "5",
            "CHATSVC_SHUTDOWN_GRACE": "1",
            **env,
        }
        self.env = {k: v for k, v in self.env.items() if v is not None}
        self.settings = chatsvc.Settings.from_env(self.env, env_file=None)

    def client(self) -> TestClient:
        return TestClient(chatsvc.create_app(self.settings), raise_server_exceptions=True)

    def rows(self, sql: str, *args) -> list[dict]:
        with sqlite3.connect(self.db_path) as db:
            db.row_factory = sqlite3.Row
            return [dict(r) for r in db.execute(sql, args)]


@pytest.fixture
def make_service(tmp_path, fake):
    def make(**env: str) -> Service:
        return Service(tmp_path, fake, **env)

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
