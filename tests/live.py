"""chatsvc served by uvicorn on a real local port, and a small SSE reader for tests."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx2 as httpx
import uvicorn

import chatsvc


class LiveServer:
    """uvicorn in a background thread, on a free loopback port."""

    def __init__(self, settings: chatsvc.Settings):
        self.app = chatsvc.create_app(settings)
        # log_config=None: uvicorn's records reach the root logger, where the test run scans them for secrets
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=0, log_level="info", log_config=None, timeout_graceful_shutdown=2
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="chatsvc-live", daemon=True)
        self._readers: list[SSEReader] = []

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "chatsvc did not start"
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def reader(self, method: str, path: str, **kw) -> SSEReader:
        """An SSE reader on its own connection, closed when the server stops."""
        reader = SSEReader(self.client(), method, path, **kw)
        self._readers.append(reader)
        return reader

    def __exit__(self, *exc: object) -> None:
        for reader in self._readers:
            reader.close()
        self.server.should_exit = True
        self.thread.join(10)

    @property
    def relay(self) -> chatsvc.Relay:
        return self.app.state.relay

    def listeners(self, session_id: str) -> int:
        """Channel listeners currently waiting for the next answer of a conversation."""
        return len(self.relay.registry._waiters.get(("", session_id), ()))

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(**{"base_url": self.url, "timeout": 10, **kw})


class Event(dict):
    """One parsed SSE event: {"id", "type", "data"} (and the raw bytes it came in)."""


def parse_events(raw: bytes) -> list[Event]:
    events = []
    for block in raw.split(b"\n\n"):
        fields: dict[str, str] = {}
        for line in block.split(b"\n"):
            name, _, value = line.decode().partition(": ")
            if name in ("id", "data"):
                fields[name] = value
        if "data" in fields:
            payload = json.loads(fields["data"])
            events.append(Event(id=fields.get("id"), type=payload["type"], data=payload["data"]))
    return events


class SSEReader:
    """Reads an SSE response until an answer ends (`end`/`error`), keeping every byte seen."""

    def __init__(self, client: httpx.Client, method: str, path: str, **kw):
        self.client = client
        self._cm = client.stream(method, path, **kw)
        self.response = self._cm.__enter__()
        self._bytes = self.response.iter_raw()
        self.raw = b""
        self._buf = b""
        self._pending: list[Event] = []
        self.events: list[Event] = []

    def next_event(self) -> Event:
        while not self._pending:
            while b"\n\n" not in self._buf:
                chunk = next(self._bytes)
                self.raw += chunk
                self._buf += chunk
            block, self._buf = self._buf.split(b"\n\n", 1)
            self._pending += parse_events(block + b"\n\n")  # pings and retry lines parse to nothing
        self.events.append(self._pending.pop(0))
        return self.events[-1]

    def until_end(self) -> list[Event]:
        """Events up to and including the next `end` or `error`."""
        start = len(self.events)
        while True:
            event = self.next_event()
            if event["type"] in ("end", "error"):
                return self.events[start:]

    def close(self) -> None:
        self._cm.__exit__(None, None, None)
        self.client.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
