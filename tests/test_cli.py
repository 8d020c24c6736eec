"""The `chatsvc` command: --help, and --check / --check-upstream with their exit codes."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time

import pytest
from fake_dashscope import Reply
from procs import ROOT


def chatsvc(*args: str, env: dict[str, str], cwd) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    full_env = {k: v for k, v in full_env.items() if v is not None}
    code = "import sys, chatsvc; sys.exit(chatsvc.main())"
    return subprocess.run([sys.executable, "-c", code, *args], env=full_env, cwd=cwd, capture_output=True,
                          text=True, timeout=60)  # fmt: skip


def test_help_lists_options_and_configuration(tmp_path):
    out = chatsvc("--help", env={}, cwd=tmp_path)
    assert out.returncode == 0
    for text in ("--check", "--check-upstream", "DASHSCOPE_API_KEY", "DATABASE_URL", "CHATSVC_SHUTDOWN_GRACE", "PORT"):
        assert text in out.stdout, text


def test_check_passes_with_a_key_and_a_database(service, tmp_path):
    out = chatsvc("--check", env=service.env, cwd=tmp_path)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr


def test_check_names_each_problem(tmp_path):
    env = {"DASHSCOPE_API_KEY": "", "DATABASE_URL": "sqlite+aiosqlite:////nonexistent-dir/x.db"}
    out = chatsvc("--check", env=env, cwd=tmp_path)
    assert out.returncode == 1
    assert "DASHSCOPE_API_KEY is not set" in out.stderr and "the folder /nonexistent-dir" in out.stderr
    assert "Traceback" not in out.stderr


def test_check_upstream_makes_one_small_call(service, fake, tmp_path):
    out = chatsvc("--check-upstream", env=service.env, cwd=tmp_path)
    assert out.returncode == 0 and "model service OK" in out.stdout, out.stderr
    assert fake.requests[-1].body["max_tokens"] == 1
    fake.push(Reply.error(401, "invalid_api_key", "Incorrect API key provided."))
    out = chatsvc("--check-upstream", env=service.env, cwd=tmp_path)
    assert out.returncode == 1 and "Incorrect API key provided" in out.stderr


def test_bad_configuration_value_is_a_clear_error(tmp_path):
    out = chatsvc("--check", env={"CHATSVC_UPSTREAM_RETRIES": "many"}, cwd=tmp_path)
    assert out.returncode == 2 and "CHATSVC_UPSTREAM_RETRIES" in out.stderr and "Traceback" not in out.stderr


# ── Setup mistakes: one line naming the setting, its value (no password), the cause and what to do ──


def refused(out: subprocess.CompletedProcess, code: int, *fragments: str) -> None:
    lines = out.stderr.strip().splitlines()
    assert out.returncode == code, out.stderr
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_a_postgresql_url_without_the_postgres_extra(tmp_path):
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "asyncpg.py").write_text("raise ImportError('No module named asyncpg')\n")  # as if not installed
    env = {"DATABASE_URL": "postgresql://chat:s3cret@db.example:5432/chat", "PYTHONPATH": f"{shadow}{os.pathsep}{ROOT}"}
    for args in ((), ("--check",)):
        out = chatsvc(*args, env=env, cwd=tmp_path)
        assert "s3cret" not in out.stderr, out.stderr
        assert "DATABASE_URL='postgresql://chat:***@db.example:5432/chat'" in out.stderr, out.stderr
        assert "pip install 'chatsvc[postgres]'" in out.stderr and "Traceback" not in out.stderr, out.stderr
    refused(chatsvc(env=env, cwd=tmp_path), 2, "asyncpg")


@pytest.mark.parametrize(
    "url, says",
    [
        ("mysql://root:hunter2@localhost/chat", "does not support 'mysql' databases"),
        ("chat.db", "is not a database URL"),
        ("", "is not a database URL"),
    ],
)
def test_a_database_url_chatsvc_cannot_use(tmp_path, url, says):
    out = chatsvc(env={"DATABASE_URL": url, "DASHSCOPE_API_KEY": "sk-x"}, cwd=tmp_path)
    refused(out, 2, "DATABASE_URL=", says, "sqlite+aiosqlite:///", "postgresql://")
    assert "hunter2" not in out.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_sqlite_file_in_a_folder_that_does_not_exist(tmp_path):
    url = f"sqlite+aiosqlite:///{tmp_path}/missing/chatsvc.db"
    refused(chatsvc(env={"DATABASE_URL": url}, cwd=tmp_path), 2, f"the folder {tmp_path}/missing", "mkdir -p")
    assert not (tmp_path / "missing").exists()


def test_a_data_folder_that_cannot_be_written(tmp_path):
    """Not root: a folder without write permission (the image's root-owned /data mounted from the
    host). Root writes anywhere it may: an immutable folder (chattr +i) stands for a read-only one."""
    data = tmp_path / "data"
    data.mkdir()
    if os.getuid() == 0:
        if subprocess.run(["chattr", "+i", str(data)], capture_output=True).returncode != 0:
            pytest.skip("root, and no chattr +i here: no folder root cannot write")
        says = (f"{data} cannot be written (a read-only file system or folder)", "make it writable")
    else:
        data.chmod(0o555)
        says = (f"{data} is not writable by this process (uid {os.getuid()})", f"chown {os.getuid()}:", "--user")
    try:
        env = {"DATABASE_URL": f"sqlite+aiosqlite:///{data}/chatsvc.db", "DASHSCOPE_API_KEY": "sk-x"}
        refused(chatsvc(env=env, cwd=tmp_path), 2, "DATABASE_URL=", *says)
        refused(chatsvc("--check", env=env, cwd=tmp_path), 1, "DATABASE_URL=", *says)
        assert list(data.iterdir()) == []
    finally:
        subprocess.run(["chattr", "-i", str(data)], capture_output=True)
        data.chmod(0o755)


def test_check_in_an_empty_folder_creates_no_database(tmp_path):
    out = chatsvc("--check", env={"DASHSCOPE_API_KEY": "sk-x", "DATABASE_URL": None}, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_port_in_use_is_refused_before_the_database_is_touched(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {"HOST": "127.0.0.1", "PORT": str(port), "DATABASE_URL": None, "DASHSCOPE_API_KEY": "sk-x"}
        out = chatsvc(env=env, cwd=tmp_path)
    refused(out, 2, f"PORT={port} on HOST='127.0.0.1' is already in use", "set PORT to a free port")
    assert "Application startup complete" not in out.stderr
    assert list(tmp_path.iterdir()) == []  # no schema steps run: no database file


def test_the_start_names_the_pages_and_warns_without_a_key(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HOST": "127.0.0.1", "PORT": str(port), "DASHSCOPE_API_KEY": ""}
    env.pop("DATABASE_URL", None)
    code = "import sys, chatsvc; sys.exit(chatsvc.main())"
    server = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    log = ""
    try:
        deadline = time.monotonic() + 60
        while "Application startup complete" not in log:
            assert time.monotonic() < deadline and server.poll() is None, log
            if select.select([server.stderr], [], [], 1)[0]:
                log += server.stderr.readline()
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=30)
    assert (
        f"the playground at http://127.0.0.1:{port}/" in log and f"the API docs at http://127.0.0.1:{port}/docs" in log
    )
    assert "WARNING chatsvc DASHSCOPE_API_KEY is not set" in log
