"""The `chatsvc` command: --help, and --check / --check-upstream with their exit codes."""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import sys
import time

import pytest
from fake_dashscope import Reply
from procs import ROOT

import chatsvc as chatsvc_module


def chatsvc(*args: str, env: dict[str, str], cwd, timeout: float = 60) -> subprocess.CompletedProcess:
    # PORT=0 (any free port) unless a test names one: --check also checks the port, and 8000 may be taken here
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "PORT": "0", **env}
    full_env = {k: v for k, v in full_env.items() if v is not None}
    code = "import sys, chatsvc; sys.exit(chatsvc.main())"
    return subprocess.run([sys.executable, "-c", code, *args], env=full_env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once closed: connection refused


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
    try:
        log = read_log_until(server, "the API docs at")  # once it listens
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=30)
    assert (
        f"the playground at http://127.0.0.1:{port}/" in log and f"the API docs at http://127.0.0.1:{port}/docs" in log
    )
    assert "WARNING chatsvc DASHSCOPE_API_KEY is not set" in log


@pytest.mark.parametrize(
    "password, url",
    [
        # an unencoded '@' in the password (users paste these): the part after the first '@' was shown
        ("p@ssword9", "postgresql://chat:p@ssword9@127.0.0.1:{port}/chat"),
        # an unencoded '/' in the password: nothing was masked, and the URL parser's error quoted it
        ("hunter/22", "postgresql://chat:hunter/22@127.0.0.1:{port}/chat"),
        # libpq / asyncpg's documented ?password= query parameter: shown as is
        ("hunter23", "postgresql://chat@127.0.0.1:{port}/chat?password=hunter23"),
        ("hunter%2F24", "postgresql://chat@127.0.0.1:{port}/chat?sslmode=disable&PassWord=hunter%2F24"),
    ],
)
@pytest.mark.parametrize("check", [True, False])
def test_a_password_is_never_printed(tmp_path, password, url, check):
    url = url.format(port=closed_port())
    out = chatsvc(*(["--check"] if check else []), env={"DATABASE_URL": url, "DASHSCOPE_API_KEY": "sk-x"}, cwd=tmp_path)
    assert out.returncode == 1 and "DATABASE_URL=" in out.stderr and "Traceback" not in out.stderr, out.stderr
    decoded = password.replace("%2F", "/")
    secret_parts = {password, decoded} | {p for p in re.split("[@/%]", password) if len(p) >= 3}
    for part in secret_parts:
        assert part not in out.stderr + out.stdout, (part, out.stderr)


def test_masked_url():
    assert chatsvc_module.masked_url("postgresql://chat:p@ss/w?rd@db:5432/chat") == "postgresql://chat:***@db:5432/chat"
    assert chatsvc_module.masked_url("postgres://chat@db/chat?password=x%40y&sslmode=require") == (
        "postgres://chat@db/chat?password=***&sslmode=require"
    )
    assert chatsvc_module.masked_url("sqlite+aiosqlite:///data/a@b:c.db") == "sqlite+aiosqlite:///data/a@b:c.db"
    said = "ValueError: Port could not be cast to integer value as 'p'; p@ss/w?rd or p%40ss%2Fw%3Frd"
    url = "postgresql://chat:p%40ss%2Fw%3Frd@db/chat"
    assert (
        chatsvc_module.scrubbed(said, url) == "ValueError: Port could not be cast to integer value as 'p'; *** or ***"
    )


def test_check_names_a_port_in_use_as_the_contract_says(tmp_path):
    """CONTRACT.md / README: `chatsvc --check` names the same setup mistakes (a PORT in use) with exit 1."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {"HOST": "127.0.0.1", "PORT": str(port), "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/c.db"}
        out = chatsvc("--check", env={**env, "DASHSCOPE_API_KEY": "sk-x"}, cwd=tmp_path)
    refused(out, 1, f"PORT={port} on HOST='127.0.0.1' is already in use")


def test_check_beside_its_own_server_passes(service, tmp_path):
    """`docker exec chatsvc chatsvc --check`: the port is in use by the chatsvc that check runs beside."""
    port = closed_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), **service.env, "HOST": "127.0.0.1", "PORT": str(port)}
    server = subprocess.Popen([sys.executable, "-c", "import sys, chatsvc; sys.exit(chatsvc.main())"], env=env,
                              cwd=tmp_path, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        read_log_until(server, "the API docs at")
        out = chatsvc("--check", env={**service.env, "HOST": "127.0.0.1", "PORT": str(port)}, cwd=tmp_path)
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=30)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr


@pytest.mark.parametrize("port", ["70000", "65536", "-1", "99999999999999999999", "80a"])
def test_a_port_out_of_range_is_a_clear_configuration_error(tmp_path, port):
    """PORT=70000 was accepted (the server listened on 70000 % 65536 = 4464 while its log said 70000);
    PORT=-1 was blamed on HOST; a huge PORT was a traceback with exit 1."""
    env = {
        "HOST": "127.0.0.1",
        "PORT": port,
        "DATABASE_URL": "sqlite+aiosqlite:///:memory:",
        "DASHSCOPE_API_KEY": "sk-x",
    }
    for args in ((), ("--check",)):
        try:
            out = chatsvc(*args, env=env, cwd=tmp_path, timeout=20)
        except subprocess.TimeoutExpired as exc:  # it started
            pytest.fail(f"PORT={port} started a server: {exc.stderr}")
        refused(out, 2, f"bad configuration: PORT={port!r}", "0 to 65535")
        assert "HOST" not in out.stderr, out.stderr


def test_an_uppercase_scheme_is_sqlite_too(tmp_path):
    """URL schemes are case-insensitive (RFC 3986): database_url_problem took SQLITE+aiosqlite:// as SQLite,
    Database.is_sqlite (url.startswith('sqlite')) then took it for PostgreSQL."""
    for scheme in ("SQLITE+aiosqlite", "sqlite+aiosqlite", "SQLite"):
        url = f"{scheme}:///{tmp_path}/x.db"
        assert chatsvc_module.Database(url).is_sqlite and chatsvc_module.Database(url).dialect == "sqlite"
        out = chatsvc("--check", env={"DATABASE_URL": url, "DASHSCOPE_API_KEY": "sk-x"}, cwd=tmp_path)
        assert out.returncode == 0 and "OK" in out.stdout, out.stderr
    assert not chatsvc_module.Database("POSTGRESQL://u:p@h/d").is_sqlite


def read_log_until(server: subprocess.Popen, text: str, seconds: float = 60) -> str:
    # os.read, not readline: lines already in the pipe object's buffer are not seen by select
    log, deadline = b"", time.monotonic() + seconds
    while text.encode() not in log:
        assert time.monotonic() < deadline and server.poll() is None, log.decode()
        if select.select([server.stderr], [], [], 1)[0]:
            log += os.read(server.stderr.fileno(), 65536)
    return log.decode()


def test_port_zero_start_log_names_the_port_it_listens_on(tmp_path):
    """PORT=0 (any free port) started, but the start's log told a person to open http://127.0.0.1:0/."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HOST": "127.0.0.1", "PORT": "0",
           "DATABASE_URL": "sqlite+aiosqlite:///:memory:", "DASHSCOPE_API_KEY": "sk-x"}  # fmt: skip
    code = "import sys, chatsvc; sys.exit(chatsvc.main())"
    server = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    try:
        log = read_log_until(server, "the API docs at")
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=30)
    assert ":0/" not in log, log
    port = int(re.search(r"the playground at http://127\.0\.0\.1:(\d+)/,", log)[1])
    assert port and f"the API docs at http://127.0.0.1:{port}/docs" in log, log
    assert f"Uvicorn running on http://127.0.0.1:{port}" in log, log


def test_the_commands_app_sets_what_it_holds_aside_from_the_collector_and_a_tests_app_does_not(tmp_path):
    """create_app(own_process=True), as the chatsvc command makes it: once started, what the process
    holds is frozen out of the cyclic collector (gc.freeze), so a full collection walks only what the
    answers made since; an app made without it (as tests make many) freezes nothing."""
    code = (
        "import gc, sys, chatsvc\n"
        "from starlette.testclient import TestClient\n"
        "app = chatsvc.create_app(chatsvc.Settings.from_env(), own_process=sys.argv[1] == 'own')\n"
        "with TestClient(app) as client:\n"
        "    assert client.get('/healthz').status_code == 200\n"
        "    print(gc.get_freeze_count())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'gc.db'}"}
    frozen = {}
    for how in ("own", "test"):
        out = subprocess.run([sys.executable, "-c", code, how], env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        frozen[how] = int(out.stdout.split()[-1])
    assert frozen["test"] == 0 and frozen["own"] > 10_000, frozen
