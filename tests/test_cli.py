"""The `chatsvc` command: --help, and --check / --check-upstream with their exit codes."""

from __future__ import annotations

import os
import subprocess
import sys

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
    assert "DASHSCOPE_API_KEY is not set" in out.stderr and "database at DATABASE_URL cannot be used" in out.stderr
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
