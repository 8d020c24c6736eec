"""MCP servers (issue 22, step 2): the settings, the tools' names, the connections and their
supervisors, and `Toolbox.run`'s outcomes, against a real MCP server made with the SDK
(tests/mcp_server.py) over streamable HTTP and stdio. Direct calls: no answers run tools yet."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time

import mcp_server
import pytest
from mcp_server import McpProcess, stdio_entry
from procs import ROOT, free_port

import chatsvc

mcp_http = mcp_server.mcp_http  # a fixture: a started HTTP MCP server


def settings(servers: dict, **env: str) -> chatsvc.Settings:
    return chatsvc.Settings.from_env({"CHATSVC_MCP_SERVERS": json.dumps(servers), **env}, env_file=None)


def refused(value: str, **env: str) -> str:
    with pytest.raises(ValueError) as caught:
        chatsvc.Settings.from_env({"CHATSVC_MCP_SERVERS": value, **env}, env_file=None)
    return str(caught.value)


def metric(metrics: chatsvc.Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


async def started(servers: dict, timeout: float = 20, **env: str) -> chatsvc.Toolbox:
    """A started Toolbox whose servers have all listed their tools."""
    toolbox = chatsvc.Toolbox(settings(servers, **env), chatsvc.Metrics())
    toolbox.start()
    await asyncio.wait_for(toolbox.listed(), timeout)
    return toolbox


def records(path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


# ── settings ────────────────────────────────────────────────────────────────────────────


def test_the_settings_defaults_and_an_empty_toolbox():
    s = chatsvc.Settings.from_env({}, env_file=None)
    assert (s.mcp_servers, s.max_tool_rounds, s.tool_timeout, s.max_tool_result_chars) == ((), 8, 30.0, 20000)
    toolbox = chatsvc.Toolbox(s, chatsvc.Metrics())
    toolbox.start()  # nothing to start: no loop needed
    assert toolbox.specs() == [] and toolbox.find("a__b") is None
    asyncio.run(toolbox.stop())
    outcome = asyncio.run(toolbox.run("a__b", "{}", ""))
    assert outcome == chatsvc.ToolOutcome(None, "There is no tool named 'a__b'.", 0, "unknown_tool")


@pytest.mark.parametrize(
    ("variable", "value", "error"),
    [
        ("CHATSVC_MAX_TOOL_ROUNDS", "0", "CHATSVC_MAX_TOOL_ROUNDS='0': must be between 1 and 64."),
        ("CHATSVC_MAX_TOOL_ROUNDS", "65", "CHATSVC_MAX_TOOL_ROUNDS='65': must be between 1 and 64."),
        ("CHATSVC_MAX_TOOL_ROUNDS", "two", "CHATSVC_MAX_TOOL_ROUNDS='two': not a whole number."),
        ("CHATSVC_TOOL_TIMEOUT", "0", "CHATSVC_TOOL_TIMEOUT='0': not a positive number of seconds."),
        ("CHATSVC_TOOL_TIMEOUT", "inf", "CHATSVC_TOOL_TIMEOUT='inf': not a positive number of seconds."),
        ("CHATSVC_TOOL_TIMEOUT", "soon", "CHATSVC_TOOL_TIMEOUT='soon': could not convert string to float: 'soon'."),
        (
            "CHATSVC_MAX_TOOL_RESULT_CHARS",
            "99",
            "CHATSVC_MAX_TOOL_RESULT_CHARS='99': must be between 100 and 10000000.",
        ),
    ],
)
def test_the_tool_limits_are_checked(variable, value, error):
    with pytest.raises(ValueError) as caught:
        chatsvc.Settings.from_env({variable: value}, env_file=None)
    assert str(caught.value) == error


def test_the_tool_limits_are_read():
    s = chatsvc.Settings.from_env(
        {"CHATSVC_MAX_TOOL_ROUNDS": "3", "CHATSVC_TOOL_TIMEOUT": "2.5", "CHATSVC_MAX_TOOL_RESULT_CHARS": "500"},
        env_file=None,
    )
    assert (s.max_tool_rounds, s.tool_timeout, s.max_tool_result_chars) == (3, 2.5, 500)


E = "CHATSVC_MCP_SERVERS: "
SERVER_ERRORS = [
    ("[1]", "the JSON is not an object of servers"),
    ('{"a": ', "not valid JSON (line 1, column 6)"),
    ('{"mcpServers": []}', "mcpServers is not an object of servers"),
    ('{"a__b": {"url": "http://x"}}', "the server 'a__b' has a name that is not 1-24 letters, digits, '_' or '-'"
     " without '__' and not ending in '_'"),
    ('{"a_": {"url": "http://x"}}', "the server 'a_' has a name that is not 1-24 letters, digits, '_' or '-'"
     " without '__' and not ending in '_'"),
    ('{"a.b": {"url": "http://x"}}', "the server 'a.b' has a name that is not 1-24 letters, digits, '_' or '-'"
     " without '__' and not ending in '_'"),
    (json.dumps({"x" * 25: {"url": "http://x"}}), f"the server '{'x' * 25}' has a name that is not 1-24 letters,"
     " digits, '_' or '-' without '__' and not ending in '_'"),
    ('{"a": "http://x"}', "the server 'a' is not an object"),
    ('{"a": {"url": "http://x", "autoApprove": []}}', "the server 'a' has an unknown key 'autoApprove'"),
    ('{"a": {"url": "http://x", "disabled": "yes"}}', "the server 'a' has a 'disabled' that is not true or false"),
    ('{"a": {"url": "http://x/sse", "type": "sse"}}', "the server 'a' asks for the SSE transport, which is not"
     " supported; use streamable HTTP"),
    ('{"a": {"url": "http://x", "type": "websocket"}}', "the server 'a' has a 'type' that is not http,"
     " streamable-http or stdio"),
    ('{"a": {}}', "the server 'a' needs exactly one of 'url' (streamable HTTP) and 'command' (stdio)"),
    ('{"a": {"url": "http://x", "command": "x"}}', "the server 'a' needs exactly one of 'url' (streamable HTTP)"
     " and 'command' (stdio)"),
    ('{"a": {"url": "http://x", "type": "stdio"}}', "the server 'a' has a 'type' that does not agree with its url"),
    ('{"a": {"command": "x", "transport": "http"}}', "the server 'a' has a 'type' that does not agree with its"
     " command"),
    ('{"a": {"url": "ftp://x"}}', "the server 'a' has a 'url' that is not an http:// or https:// URL"),
    ('{"a": {"url": "http://x", "timeout": 0}}', "the server 'a' has a 'timeout' that is not a positive number of"
     " seconds"),
    ('{"a": {"url": "http://x", "timeout": true}}', "the server 'a' has a 'timeout' that is not a positive number"
     " of seconds"),
    ('{"a": {"url": "http://x", "tools": "echo"}}', "the server 'a' has a 'tools' that is not a list of tool names"),
    ('{"a": {"url": "http://x", "args": []}}', "the server 'a' has a 'args', which only a stdio server (with a"
     " 'command') takes"),
    ('{"a": {"url": "http://x", "headers": {"X": 1}}}', "the server 'a' has a 'headers' that is not an object of"
     " strings"),
    ('{"a": {"url": "http://x", "headers": {"X Y": "1"}}}', "the server 'a' has a header name that is not a valid"
     " HTTP header name"),
    ('{"a": {"url": "http://x", "owner_header": "X User"}}', "the server 'a' has an 'owner_header' that is not a"
     " valid HTTP header name"),
    ('{"a": {"command": ""}}', "the server 'a' has a 'command' that is not a non-empty string"),
    ('{"a": {"command": "x", "owner_header": "X-User"}}', "the server 'a' has a 'owner_header', which only an HTTP"
     " server (with a 'url') takes"),
    ('{"a": {"command": "x", "args": "-v"}}', "the server 'a' has an 'args' that is not a list of strings"),
    ('{"a": {"command": "x", "env": ["A=1"]}}', "the server 'a' has a 'env' that is not an object of strings"),
    ('{"a": {"command": "x", "cwd": 1}}', "the server 'a' has a 'cwd' that is not a directory path"),
    ('{"a": {"url": "http://x", "headers": {"Authorization": "Bearer ${CHATSVC_TEST_UNSET_VAR}"}}}',
     "the server 'a' has a 'headers' value naming ${CHATSVC_TEST_UNSET_VAR}, which is not set"),
]  # fmt: skip


@pytest.mark.parametrize(("value", "error"), SERVER_ERRORS)
def test_each_mistake_in_the_servers_is_one_sentence_naming_the_setting(value, error):
    assert refused(value) == E + error + "."


def test_a_refused_setting_never_repeats_its_value(tmp_path):
    value = '{"a": {"url": "http://x", "headers": {"Authorization": "Bearer tok-secret-123"}, "nope": 1}}'
    assert "tok-secret-123" not in refused(value)
    assert refused(str(tmp_path / "missing.json")) == (
        E + "not inline JSON (starting with '{') and not a readable JSON file (No such file or directory)."
    )


def test_the_shapes_other_clients_write_are_read(tmp_path, monkeypatch):
    monkeypatch.setenv("CHATSVC_TEST_TOKEN", "tok-secret-123")
    document = {
        "mcpServers": {
            "orders": {
                "type": "streamableHttp",
                "url": "https://orders.example/mcp",
                "headers": {"Authorization": "Bearer ${CHATSVC_TEST_TOKEN}"},
                "owner_header": "X-Chatsvc-User",
                "timeout": 5,
                "tools": ["find"],
            },
            "files": {"command": "npx", "args": ["-y", "server"], "env": {"ROOT": "/data"}, "cwd": "/tmp"},
            "off": {"url": "http://off", "disabled": True},
        }
    }
    path = tmp_path / "servers.json"
    path.write_text(json.dumps(document))
    for value in (str(path), json.dumps(document), json.dumps(document["mcpServers"])):
        orders, files = chatsvc.Settings.from_env({"CHATSVC_MCP_SERVERS": value}, env_file=None).mcp_servers
        assert orders == chatsvc.McpServerConfig(
            "orders",
            url="https://orders.example/mcp",
            headers=(("Authorization", "Bearer tok-secret-123"),),
            owner_header="X-Chatsvc-User",
            timeout=5.0,
            tools=("find",),
        )
        assert "tok-secret-123" not in repr(orders)  # the settings' repr may reach a log
        assert files == chatsvc.McpServerConfig(
            "files", command="npx", args=("-y", "server"), env=(("ROOT", "/data"),), cwd="/tmp"
        )
    assert chatsvc.Settings.from_env({"CHATSVC_MCP_SERVERS": "{}"}, env_file=None).mcp_servers == ()


def run_python(code: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )


WITHOUT_MCP = "import sys; sys.modules['mcp'] = None  # as if the extra were not installed\n"


def test_without_the_mcp_extra_configured_servers_are_a_setup_error(tmp_path):
    servers = json.dumps({"a": {"url": "http://127.0.0.1:9/mcp"}})
    done = run_python(
        WITHOUT_MCP + "import chatsvc; sys.exit(chatsvc.main(['--check']))",
        {"CHATSVC_MCP_SERVERS": servers, "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'x.db'}"},
    )
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == (
        "chatsvc: bad configuration: CHATSVC_MCP_SERVERS: MCP servers are configured but the mcp package is not"
        " installed: pip install 'chatsvc[mcp]'.\n"
    )


def test_without_the_mcp_extra_everything_else_runs(tmp_path, fake_server):
    code = WITHOUT_MCP + (
        "import chatsvc\n"
        "from starlette.testclient import TestClient\n"
        "app = chatsvc.create_app()\n"
        "with TestClient(app) as c:\n"
        "    assert c.get('/readyz').status_code == 200\n"
        "    assert app.state.toolbox.specs() == []\n"
        "    r = c.post('/api/v1/chat/s1', json={'message': 'hi'})\n"
        "    assert r.status_code == 200, r.text\n"
        "    assert r.json()['response'] == 'Hello!', r.text\n"
        "    assert 'chatsvc_mcp_server_up{' not in c.get('/metrics').text\n"
        "print('ok', 'mcp' in sys.modules and sys.modules['mcp'] is not None)\n"
    )
    fake_server.reset()
    from fake_dashscope import Reply

    fake_server.push(Reply.answer("Hello!"))
    env = {"DASHSCOPE_API_KEY": "sk-test-key", "DASHSCOPE_BASE_URL": fake_server.url, "CHATSVC_TITLES": "off"}
    done = run_python(code, {**env, "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'x.db'}"})
    assert done.stdout == "ok False\n", done.stderr
    fake_server.reset()


def test_no_servers_import_no_mcp():
    done = run_python("import sys, chatsvc, asyncio\n"
                      "t = chatsvc.Toolbox(chatsvc.Settings.from_env({}, env_file=None), chatsvc.Metrics())\n"
                      "t.start(); asyncio.run(t.stop())\n"
                      "print(sorted(m for m in sys.modules if m == 'mcp' or m.startswith('mcp.')))")  # fmt: skip
    assert done.stdout == "[]\n", done.stderr


# ── naming ──────────────────────────────────────────────────────────────────────────────


def test_exposed_names_are_sanitised_cut_and_kept_apart():
    import hashlib

    names = chatsvc.exposed_names("srv", ["echo", "dotted.name", "dotted_name", "a b/c", "x" * 80, "x" * 81, "é"])
    assert names["echo"] == "srv__echo"
    assert names["dotted.name"] == "srv__dotted_name"
    assert names["dotted_name"] == "srv__dotted_name_" + hashlib.sha1(b"dotted_name").hexdigest()[:4]  # the clash
    assert names["a b/c"] == "srv__a_b_c"
    assert names["x" * 80] == ("srv__" + "x" * 80)[:64]
    assert names["x" * 81] == ("srv__" + "x" * 80)[:59] + "_" + hashlib.sha1(b"x" * 81).hexdigest()[:4]
    assert names["é"] == "srv___"
    assert len(set(names.values())) == len(names)
    assert all(re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", n) for n in names.values())
    # a server's name never ends in "_" nor holds "__": two servers' tools cannot meet
    assert chatsvc.exposed_names("a", ["_c"])["_c"] == "a___c"
    assert "a_" not in {c.name for c in settings({"a": {"url": "http://x"}}).mcp_servers}


# ── connections, listing, calls ─────────────────────────────────────────────────────────


def test_listing_paginated_tools_and_naming_them(tmp_path, monkeypatch, caplog):
    async def main():
        toolbox = await started(
            {
                "pages": stdio_entry(tmp_path, "--pages", "4", "--many"),
                "only": stdio_entry(tmp_path, tools=["echo", "dotted.name", "nosuch"]),
            }
        )
        try:
            specs = toolbox.specs()
            paged = [s for s in specs if s.server == "pages"]
            assert len(paged) == 13 + 25  # 10 pages of 4
            assert [s.tool for s in paged][-25:] == [f"t{i:02d}" for i in range(25)]
            assert [(s.exposed, s.tool) for s in specs if s.server == "only"] == [
                ("only__echo", "echo"),
                ("only__dotted_name", "dotted.name"),
            ]
            long = next(s for s in paged if s.tool.startswith("long_"))
            assert long.exposed == ("pages__long_" + "x" * 65)[:64]
            assert toolbox.find(long.exposed) is long and toolbox.find("pages__nosuch") is None
            echo = toolbox.find("only__echo")
            assert echo.description == "Answer at once."
            assert echo.parameters["type"] == "object" and "text" in echo.parameters["properties"]
            assert echo.payload() == {
                "type": "function",
                "function": {"name": "only__echo", "description": "Answer at once.", "parameters": echo.parameters},
            }
            nothing = toolbox.find("pages__nothing")
            assert nothing.parameters == {"type": "object", "properties": {}, **nothing.parameters}
            assert [s.exposed for s in toolbox.specs(only={"only__echo", "pages__t03", "zz__x"})] == [
                "pages__t03",
                "only__echo",
            ]
            dotted = await toolbox.run("only__dotted_name", "", "")
            assert (dotted.content, dotted.outcome) == ("dotted", "ok")
            assert (await toolbox.run("pages__t24", "{}", "")).content == "t24"
        finally:
            await toolbox.stop()
        monkeypatch.setattr(chatsvc, "MCP_LIST_PAGES", 3)  # a listing that goes on and on is cut
        toolbox = await started({"pages": stdio_entry(tmp_path, "--pages", "4", "--many")})
        await toolbox.stop()
        assert len(toolbox.specs()) == 12
        assert "MCP server pages lists more than 3 pages of tools: the rest are left out" in caplog.messages

    asyncio.run(main())


@pytest.mark.parametrize("transport", ["http", "stdio"])
def test_every_outcome_of_a_call(transport, tmp_path):
    server = McpProcess.http(tmp_path) if transport == "http" else None
    # a 2 s timeout: every call but `hang` answers well within it, even on a busy machine
    entry = server.entry(timeout=2) if server else stdio_entry(tmp_path, timeout=2)
    record = server.record if server else tmp_path / "stdio-record.txt"

    async def main():
        toolbox = await started({"t": entry}, CHATSVC_MAX_TOOL_RESULT_CHARS="1000")
        m = toolbox.metrics
        try:
            ok = await toolbox.run("t__echo", '{"text": "hi"}', "alice")
            assert (ok.content, ok.error, ok.outcome) == ("echo: hi", None, "ok")
            assert 0 <= ok.duration_ms < 2000
            for empty in ("", "  \n"):  # no arguments at all mean {}
                assert (await toolbox.run("t__nothing", empty, "")).content == "nothing to say"
            fail = await toolbox.run("t__fail", '{"reason": "no stock"}', "")
            assert (fail.content, fail.error, fail.outcome) == (
                None,
                "Error executing tool fail: failed: no stock",
                "error",
            )
            invalid = await toolbox.run("t__echo", '{"text": ', "")
            assert invalid.outcome == "bad_arguments" and invalid.content is None
            assert invalid.error.startswith("The arguments are not valid JSON (Expecting value: line 1 column 10")
            listed = await toolbox.run("t__echo", '["hi"]', "")
            assert (listed.error, listed.outcome) == (
                "The arguments are not a JSON object (got list).",
                "bad_arguments",
            )
            schema = await toolbox.run("t__echo", '{"txt": "hi"}', "")
            assert schema.outcome == "error" and "text" in schema.error  # the server's own validation
            unknown = await toolbox.run("t__nosuch", "{}", "")
            assert (unknown.error, unknown.outcome) == ("There is no tool named 't__nosuch'.", "unknown_tool")
            big = await toolbox.run("t__big", "{}", "")
            assert big.content == "x" * 1000 + "\n[cut: the result had 1000000 characters; the first 1000 are shown]"
            dirty = await toolbox.run("t__dirty", "", "")
            assert dirty.content == "a\ufffdb"
            picture = await toolbox.run("t__picture", "", "")
            assert picture.content == "[image image/png, 5 bytes]"

            started_at = time.monotonic()
            timeout = await toolbox.run("t__hang", "{}", "")
            assert time.monotonic() - started_at < 6  # cut at its timeout, not the hour it would sleep
            assert (timeout.error, timeout.outcome) == (
                "The tool did not answer within 2 s; it was cancelled.",
                "timeout",
            )
            assert 2000 <= timeout.duration_ms < 6000
            for _ in range(100):  # the server saw the cancel
                if "cancelled hang" in records(record):
                    break
                await asyncio.sleep(0.02)
            assert records(record) == ["start hang", "cancelled hang"]
            assert (await toolbox.run("t__cancelled_count", "", "")).content == "1"

            # an answer stopped mid-call: the cancel goes through, counted `cancelled`
            call = asyncio.create_task(toolbox.run("t__hang", "{}", ""))
            for _ in range(200):
                if records(record).count("start hang") == 2:
                    break
                await asyncio.sleep(0.01)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            for _ in range(100):
                if records(record).count("cancelled hang") == 2:
                    break
                await asyncio.sleep(0.02)
            assert records(record).count("cancelled hang") == 2
            assert (await toolbox.run("t__echo", '{"text": "after"}', "")).content == "echo: after"

            counts = {
                outcome: metric(m, "chatsvc_tool_calls_total", server="t", tool=tool, outcome=outcome)
                for tool, outcome in [
                    ("echo", "ok"),
                    ("echo", "bad_arguments"),
                    ("echo", "error"),
                    ("fail", "error"),
                    ("hang", "timeout"),
                    ("hang", "cancelled"),
                ]
            }
            assert counts == {"ok": 2, "bad_arguments": 2, "error": 1, "timeout": 1, "cancelled": 1}
            assert metric(m, "chatsvc_tool_calls_total", server="-", tool="-", outcome="unknown_tool") == 1
            assert metric(m, "chatsvc_tool_call_seconds_count", server="t", tool="hang") == 2
            assert (
                metric(m, "chatsvc_tool_call_seconds_bucket", server="t", tool="hang", le="1.0") <= 1
            )  # not the timeout
            assert metric(m, "chatsvc_tool_call_seconds_bucket", server="t", tool="hang", le="10.0") == 2
            assert metric(m, "chatsvc_mcp_server_up", server="t") == 1
            toolbox.count("client", "-", "ok")
            assert metric(m, "chatsvc_tool_calls_total", server="client", tool="-", outcome="ok") == 1
        finally:
            await toolbox.stop()
        assert metric(m, "chatsvc_mcp_server_up", server="t") == 0

    try:
        asyncio.run(main())
    finally:
        if server:
            server.stop()


def test_the_owner_is_sent_as_a_header_over_http_only(tmp_path, mcp_http, monkeypatch):
    monkeypatch.setenv("CHATSVC_TEST_TOKEN", "tok-secret-123")

    async def main():
        toolbox = await started(
            {
                "owned": mcp_http.entry(owner_header="X-Chatsvc-User", headers={"X-Static": "${CHATSVC_TEST_TOKEN}"}),
                "plain": mcp_http.entry(),
                "local": stdio_entry(tmp_path),
            }
        )
        try:

            async def who(name: str, owner: str, header: str = "x-chatsvc-user") -> str:
                return (await toolbox.run(f"{name}__whoami", json.dumps({"header": header}), owner)).content

            assert await who("owned", "alice") == "alice"
            assert await who("owned", "") == "absent"  # CHATSVC_USER_HEADER unset: every owner is ''
            both = await asyncio.gather(who("owned", "bob"), who("owned", "carol"), who("plain", "dave"))
            assert both == ["bob", "carol", "absent"]  # each call its own owner; never a server not asked for it
            assert await who("owned", "alice", "x-static") == "tok-secret-123"
            assert await who("plain", "alice", "x-static") == "absent"
            assert await who("local", "alice") == "none"  # stdio carries no headers
        finally:
            await toolbox.stop()

    asyncio.run(main())


def test_a_server_not_connected_answers_unavailable(tmp_path):
    port = free_port()

    async def main():
        toolbox = chatsvc.Toolbox(settings({"gone": {"url": f"http://127.0.0.1:{port}/mcp"}}), chatsvc.Metrics())
        toolbox.start()
        try:
            await asyncio.wait_for(toolbox.tried(), 5)
            server = toolbox.servers["gone"]
            assert not server.up and server.error.startswith("ConnectError: ")
            assert toolbox.specs() == []  # never listed: nothing to offer, a call is an unknown tool
            assert (await toolbox.run("gone__echo", "{}", "")).outcome == "unknown_tool"
            spec = chatsvc.ToolSpec("gone__echo", "gone", "echo", "", {"type": "object", "properties": {}})
            server.specs = [spec]  # as if listed before it went away
            outcome = await toolbox.run("gone__echo", "{}", "")
            assert outcome == chatsvc.ToolOutcome(
                None, "The tool server 'gone' is not reachable now; try later.", 0, "unavailable"
            )
        finally:
            await toolbox.stop()

    asyncio.run(main())


@pytest.mark.slow
def test_a_server_killed_mid_call_is_unavailable_then_reconnected(tmp_path, mcp_http, monkeypatch):
    monkeypatch.setattr(chatsvc, "MCP_RETRY_SECONDS", (0.2,))

    async def main():
        toolbox = await started({"h": mcp_http.entry(), "s": stdio_entry(tmp_path)})
        m = toolbox.metrics
        try:
            for name, kill in [("h", mcp_http.kill), ("s", None)]:
                pid = int((await toolbox.run(f"{name}__pid", "", "")).content)
                call = asyncio.create_task(toolbox.run(f"{name}__hang", "{}", ""))
                await asyncio.sleep(0.3)
                (kill or (lambda pid=pid: os.kill(pid, signal.SIGKILL)))()
                outcome = await asyncio.wait_for(call, 5)
                assert (outcome.outcome, outcome.error) == (
                    "unavailable",
                    f"The connection to the tool server '{name}' was lost.",
                )
                assert metric(m, "chatsvc_mcp_server_up", server=name) == 0
                assert toolbox.find(f"{name}__echo") is not None  # still offered while it is down
                if name == "h":
                    mcp_http.start()
                for _ in range(200):  # reconnected (a stdio server is started again)
                    if toolbox.servers[name].up:
                        break
                    await asyncio.sleep(0.05)
                assert (await toolbox.run(f"{name}__echo", '{"text": "back"}', "")).content == "echo: back"
                assert int((await toolbox.run(f"{name}__pid", "", "")).content) != pid
                assert metric(m, "chatsvc_mcp_server_up", server=name) == 1
                assert metric(m, "chatsvc_tool_calls_total", server=name, tool="hang", outcome="unavailable") == 1
        finally:
            await toolbox.stop()

    asyncio.run(main())


@pytest.mark.slow
def test_a_server_that_dies_idle_is_noticed(tmp_path, mcp_http, monkeypatch):
    monkeypatch.setattr(chatsvc, "MCP_PING_SECONDS", 0.2)
    monkeypatch.setattr(chatsvc, "MCP_RETRY_SECONDS", (0.2,))

    async def main():
        toolbox = await started({"h": mcp_http.entry(), "s": stdio_entry(tmp_path)})
        m = toolbox.metrics
        try:
            assert metric(m, "chatsvc_mcp_server_up", server="h") == 1
            # a healthy idle connection outlives many probes: kept, never reconnected
            connections = {name: server.client for name, server in toolbox.servers.items()}
            await asyncio.sleep(1.5)
            assert {name: server.client for name, server in toolbox.servers.items()} == connections
            assert all(server.client is not None for server in toolbox.servers.values())
            mcp_http.kill()
            for _ in range(100):
                if metric(m, "chatsvc_mcp_server_up", server="h") == 0:
                    break
                await asyncio.sleep(0.02)
            assert metric(m, "chatsvc_mcp_server_up", server="h") == 0
            assert (await toolbox.run("h__echo", '{"text": "x"}', "")).outcome == "unavailable"
            mcp_http.start()
            for _ in range(200):
                if metric(m, "chatsvc_mcp_server_up", server="h") == 1:
                    break
                await asyncio.sleep(0.02)
            assert (await toolbox.run("h__echo", '{"text": "x"}', "")).content == "echo: x"
        finally:
            await toolbox.stop()

    asyncio.run(main())


@pytest.mark.slow
def test_a_session_server_works_and_its_hung_delete_does_not_hold_stop(tmp_path):
    server = McpProcess.http(tmp_path, "--legacy")

    async def main():
        toolbox = await started({"legacy": server.entry()})
        assert (await toolbox.run("legacy__echo", '{"text": "s"}', "")).content == "echo: s"
        began = time.monotonic()
        await toolbox.stop()
        assert chatsvc.MCP_CLOSE_SECONDS - 0.2 < time.monotonic() - began < chatsvc.MCP_CLOSE_SECONDS + 1
        assert not toolbox.servers["legacy"].up

    try:
        asyncio.run(main())
    finally:
        server.stop()


def test_the_app_starts_at_once_with_a_server_down_and_offers_its_tools_once_up(tmp_path, make_service, monkeypatch):
    monkeypatch.setattr(chatsvc, "MCP_RETRY_SECONDS", (0.2,))
    server = McpProcess(tmp_path)
    service = make_service(CHATSVC_MCP_SERVERS=json.dumps({"later": server.entry()}))
    began = time.monotonic()
    try:
        with service.client() as client:
            assert time.monotonic() - began < 5  # (the database opens; nothing waits for the MCP server)
            toolbox = client.app.state.toolbox
            assert client.get("/readyz").status_code == 200
            assert 'chatsvc_mcp_server_up{server="later"} 0.0' in client.get("/metrics").text
            assert toolbox.specs() == []
            server.start()
            mcp_server.wait_for_tools(toolbox, 10)
            assert toolbox.find("later__echo") is not None
            assert 'chatsvc_mcp_server_up{server="later"} 1.0' in client.get("/metrics").text
            assert client.get("/readyz").status_code == 200
    finally:
        server.stop()


@pytest.mark.slow
def test_stop_is_bounded_with_a_stdio_server_that_ignores_sigterm_and_never_answers(tmp_path, make_service):
    entry = stdio_entry(tmp_path, "--stubborn")
    service = make_service(CHATSVC_MCP_SERVERS=json.dumps({"stubborn": entry}))
    record = tmp_path / "stdio-record.txt"
    with service.client() as client:
        deadline = time.monotonic() + 10
        while not records(record) and time.monotonic() < deadline:
            time.sleep(0.05)
        pid = int(records(record)[0].split()[1])
        assert client.get("/readyz").status_code == 200
        began = time.monotonic()
    assert time.monotonic() - began < chatsvc.MCP_STOP_SECONDS + 1.5
    for _ in range(100):  # the SDK killed it (SIGKILL after SIGTERM)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        raise AssertionError("the stubborn stdio server outlived chatsvc's shutdown")
    service.rows("SELECT 1")  # the store was closed cleanly: the file is usable


def test_the_lifespan_closes_the_store_even_if_the_toolbox_fails_to_stop(make_service, monkeypatch):
    service = make_service()
    closed = []
    real_close = chatsvc.Store.close

    async def close(self):
        closed.append(True)
        await real_close(self)

    async def broken_stop(self):
        raise RuntimeError("stop failed")

    monkeypatch.setattr(chatsvc.Store, "close", close)
    monkeypatch.setattr(chatsvc.Toolbox, "stop", broken_stop)
    with pytest.raises(RuntimeError, match="stop failed"), service.client() as client:
        assert client.get("/readyz").status_code == 200
    assert closed == [True]


@pytest.mark.slow
def test_check_connects_to_each_server(tmp_path, mcp_http):
    down = f"http://127.0.0.1:{free_port()}/mcp?token=tok-secret-123"
    env = {"DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'x.db'}", "DASHSCOPE_API_KEY": "sk-test-key"}
    ok = run_python(
        "import sys, chatsvc; sys.exit(chatsvc.main(['--check']))",
        {**env, "CHATSVC_MCP_SERVERS": json.dumps({"up": mcp_http.entry(), "local": stdio_entry(tmp_path)})},
    )
    assert (ok.returncode, ok.stderr) == (0, "")
    assert ok.stdout.startswith("chatsvc: configuration, database, MCP servers OK")
    bad = run_python(
        "import sys, chatsvc; sys.exit(chatsvc.main(['--check']))",
        {**env, "CHATSVC_MCP_SERVERS": json.dumps({"up": mcp_http.entry(), "down": {"url": down}})},
    )
    assert bad.returncode == 1
    assert bad.stderr.splitlines()[-1] == (
        "chatsvc: The MCP server 'down' of CHATSVC_MCP_SERVERS could not be used: ConnectError: All connection"
        " attempts failed."
    ), bad.stderr
    assert "tok-secret-123" not in bad.stderr


def test_errors_are_redacted():
    assert chatsvc.redact_urls("GET https://u:p@h.example/mcp?token=abc&x=1 failed") == (
        "GET https://h.example/mcp?[redacted] failed"
    )
    assert chatsvc.redact_urls("no url here") == "no url here"
    assert chatsvc.storable_result("a\x00b\ud800c", 100) == "a\ufffdb\ufffdc"
    assert chatsvc.storable_result("abcdef", 3) == "abc\n[cut: the result had 6 characters; the first 3 are shown]"


@pytest.mark.slow
def test_the_chatsvc_command_exits_on_sigterm_and_takes_its_stdio_servers_along(tmp_path):
    from procs import ServerProcess

    servers = {"stubborn": stdio_entry(tmp_path, "--stubborn"), "fine": stdio_entry(tmp_path)}
    env = {
        "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'x.db'}",
        "CHATSVC_MCP_SERVERS": json.dumps(servers),
        "CHATSVC_SHUTDOWN_GRACE": "1",
    }
    server = ServerProcess(env, tmp_path).start()
    record = tmp_path / "stdio-record.txt"
    deadline = time.monotonic() + 20
    while "MCP server fine: connected" not in server.log() or not records(record):
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.05)
    pid = int(next(line for line in records(record) if line.startswith("pid ")).split()[1])
    began = time.monotonic()
    server.signal(signal.SIGTERM)
    assert server.wait(20) == 0
    assert time.monotonic() - began < 1 + chatsvc.MCP_STOP_SECONDS + 3, server.log()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
