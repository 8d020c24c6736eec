"""Test support: a fake DashScope on a real port, and chatsvc instances on a temporary SQLite file.

Loaded as a pytest plugin (`-p support` in pyproject.toml), so every test file gets these fixtures."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from fake_dashscope import FakeDashScope
from starlette.testclient import TestClient

import chatsvc


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
