"""A real MCP server made with the `mcp` SDK, for the tool tests: run over streamable HTTP (uvicorn on
a port) or stdio, as a subprocess, the way tests/procs.py runs chatsvc.

    python tests/mcp_server.py http PORT [options]     streamable HTTP at http://127.0.0.1:PORT/mcp
    python tests/mcp_server.py stdio [options]         stdio (what an MCP client's "command" starts)

Options:
    --record FILE   append a line to FILE when a `hang` call starts (`start hang`) and when it is
                    cancelled (`cancelled hang`)
    --pages N       list the tools N to a page (a cursor for the rest); --many adds 25 tools t00..t24
    --legacy        HTTP: speak only the handshake-era protocol (a session, `mcp-session-id`), and
                    never answer the DELETE that ends a session
    --stubborn      ignore SIGTERM, and never answer anything (the handshake included); records `pid N`

Tools: echo(text), fail(reason) (an is_error result), hang(seconds) (until cancelled), big(n)
(n characters, 1 MB by default), whoami(header) (the value of a request header the call carried:
"absent" if none, "none" over stdio), nothing() (no parameters), cancelled_count() (how many calls
were cancelled so far), dirty() (a result with a NUL), `dotted.name` and a tool
with a 70-character name (naming), picture() (an image part), pid() (the server's process id),
misshapen() (a result unlike the output schema it declares).

From a test: `McpProcess.http(tmp_path)` / `McpProcess.http(tmp_path, "--legacy")` (a started
process; `.url`, `.entry()` for CHATSVC_MCP_SERVERS, `.kill()`, `.restart()`, `.stop()`,
`.records()`) and `stdio_entry(tmp_path, *options)` (a stdio entry; its record file is
`tmp_path / "stdio-record.txt"`). The fixtures `mcp_http` and `mcp_stdio` (import them from this
module into a test module as `mcp_http = mcp_server.mcp_http`) give the same, stopped after the
test. `wait_for_tools(client.app.state.toolbox)` waits, from a synchronous test, until the tools
are listed.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()


def build_server(record, pages, many):
    import anyio
    import mcp_types
    from mcp.server.mcpserver import Context, MCPServer
    from mcp.server.mcpserver.exceptions import ToolError

    cancelled = [0]

    def note(line: str) -> None:
        if record:
            with open(record, "a", encoding="utf-8") as f:
                f.write(line + "\n")

    class Server(MCPServer):
        async def _handle_list_tools(self, ctx, params):
            tools = await self.list_tools()
            for tool in tools:  # a tool whose results do not meet the output schema it declares
                if tool.name == "misshapen":
                    tool.output_schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
            if not pages:
                return mcp_types.ListToolsResult(tools=tools)
            start = int(params.cursor) if params is not None and params.cursor else 0
            more = start + pages < len(tools)
            return mcp_types.ListToolsResult(
                tools=tools[start : start + pages], next_cursor=str(start + pages) if more else None
            )

    mcp = Server("testtools")

    @mcp.tool()
    def echo(text: str) -> str:
        """Answer at once."""
        return f"echo: {text}"

    @mcp.tool()
    def fail(reason: str = "boom") -> str:
        """Always fails."""
        raise ToolError(f"failed: {reason}")

    @mcp.tool()
    async def hang(seconds: float = 3600) -> str:
        """Sleep, until cancelled."""
        note("start hang")
        try:
            await anyio.sleep(seconds)
        except anyio.get_cancelled_exc_class():
            cancelled[0] += 1
            note("cancelled hang")
            raise
        return "woke"

    @mcp.tool()
    def big(n: int = 1_000_000) -> str:
        """A long result."""
        return "x" * n

    @mcp.tool()
    def whoami(ctx: Context, header: str = "x-chatsvc-user") -> str:
        """The value of a header the call carried."""
        headers = ctx.headers
        return "none" if headers is None else (headers.get(header) or "absent")

    @mcp.tool()
    def nothing() -> str:
        """No parameters."""
        return "nothing to say"

    @mcp.tool()
    def cancelled_count() -> str:
        """How many calls were cancelled."""
        return str(cancelled[0])

    @mcp.tool()
    def dirty() -> str:
        """A result with a NUL."""
        return "a\x00b"

    @mcp.tool()
    def misshapen() -> str:
        """A result unlike its declared output schema (the client refuses it)."""
        return "not an object"

    @mcp.tool()
    def pid() -> str:
        """This server's process id."""
        return str(os.getpid())

    @mcp.tool(name="dotted.name")
    def dotted() -> str:
        return "dotted"

    @mcp.tool(name="long_" + "x" * 65)
    def long_name() -> str:
        return "long"

    @mcp.tool()
    def picture() -> mcp_types.ImageContent:
        """An image part."""
        return mcp_types.ImageContent(type="image", data="aGVsbG8=", mime_type="image/png")

    if many:
        for i in range(25):
            mcp.tool(name=f"t{i:02d}", description=f"filler {i}")(lambda i=i: f"t{i:02d}")
    return mcp


def legacy_only(app):
    """The ASGI app speaking only the handshake-era protocol (server/discover refused, so a client
    falls back to `initialize` and gets a session), and never answering a DELETE."""
    import anyio

    async def wrapped(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        if scope["method"] == "DELETE":
            await anyio.sleep_forever()
        if scope["method"] != "POST":
            return await app(scope, receive, send)
        chunks, more = [], True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        try:
            method = json.loads(body).get("method")
        except (ValueError, AttributeError):
            method = None
        if method == "server/discover":
            error = {"jsonrpc": "2.0", "id": json.loads(body).get("id"), "error": {"code": -32601, "message": "no"}}
            payload = json.dumps(error).encode()
            await send(
                {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]}
            )
            await send({"type": "http.response.body", "body": payload})
            return None
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await app(scope, replay, send)

    return wrapped


def main(argv: list[str]) -> None:
    transport, rest = argv[0], argv[1:]
    port = int(rest.pop(0)) if transport == "http" else None
    record = rest[rest.index("--record") + 1] if "--record" in rest else None
    pages = int(rest[rest.index("--pages") + 1]) if "--pages" in rest else None
    if "--stubborn" in rest:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if record:
            with open(record, "a", encoding="utf-8") as f:
                f.write(f"pid {os.getpid()}\n")
        while True:  # reads nothing, answers nothing
            time.sleep(3600)
    server = build_server(record, pages, "--many" in rest)
    if transport == "stdio":
        server.run()
        return
    import uvicorn

    app = server.streamable_http_app()
    if "--legacy" in rest:
        app = legacy_only(app)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# ── for tests ───────────────────────────────────────────────────────────────────────────


def stdio_entry(tmp_path: Path, *options: str, **extra: object) -> dict:
    """A CHATSVC_MCP_SERVERS entry that starts this server over stdio."""
    record = str(tmp_path / "stdio-record.txt")
    return {"command": sys.executable, "args": [str(HERE), "stdio", "--record", record, *options], **extra}


def wait_for_tools(toolbox, timeout: float = 20.0) -> None:
    """From synchronous test code (a TestClient's app: `client.app.state.toolbox`): wait until every
    configured server has listed its tools."""
    deadline = time.monotonic() + timeout
    while not all(s.listed.is_set() for s in toolbox.servers.values()):
        assert time.monotonic() < deadline, f"MCP servers not listed: {[s.error for s in toolbox.servers.values()]}"
        time.sleep(0.02)


class McpProcess:
    """This server over streamable HTTP in a subprocess, on a free port (kept across restarts)."""

    def __init__(self, tmp_path: Path, *options: str):
        from procs import free_port

        self.options, self.port = options, free_port()
        self.url = f"http://127.0.0.1:{self.port}/mcp"
        self.record = tmp_path / f"mcp-record-{self.port}.txt"
        self.log_path = tmp_path / f"mcp-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    @classmethod
    def http(cls, tmp_path: Path, *options: str) -> "McpProcess":
        return cls(tmp_path, *options).start()

    def entry(self, **extra: object) -> dict:
        return {"url": self.url, **extra}

    def start(self, wait: bool = True) -> "McpProcess":
        import httpx2 as httpx

        args = [sys.executable, str(HERE), "http", str(self.port), "--record", str(self.record), *self.options]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ})
        deadline = time.monotonic() + 20
        while wait:
            try:
                httpx.get(f"http://127.0.0.1:{self.port}/", timeout=1)
                return self
            except httpx.TransportError:
                pass
            assert self.proc.poll() is None, f"the MCP server exited: {self.log_path.read_text()}"
            assert time.monotonic() < deadline, "the MCP server did not start"
            time.sleep(0.05)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self) -> "McpProcess":
        self.kill()
        return self.start()

    def stop(self) -> None:
        self.kill()

    def records(self) -> list[str]:
        return self.record.read_text().splitlines() if self.record.exists() else []


if "pytest" in sys.modules:  # imported by a test module: its fixtures
    import pytest

    @pytest.fixture
    def mcp_http(tmp_path):
        """A started HTTP MCP server (McpProcess), killed after the test."""
        server = McpProcess.http(tmp_path)
        yield server
        server.stop()

    @pytest.fixture
    def mcp_stdio(tmp_path):
        """A stdio entry for CHATSVC_MCP_SERVERS (the process is chatsvc's to start and stop)."""
        return stdio_entry(tmp_path)


if __name__ == "__main__":
    main(sys.argv[1:])
