"""A minimal HTTP/1.1 client on asyncio streams, for load tests and benchmarks.

It does one request per connection, reads chunked or sized bodies, and hands out body bytes as
they arrive: far cheaper per chunk than a general client, so the load generator is not the
bottleneck it measures."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator


class Response:
    def __init__(self, status: int, headers: dict[str, str], reader: asyncio.StreamReader, writer):
        self.status, self.headers, self._reader, self._writer = status, headers, reader, writer

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives (transfer-encoding undone)."""
        reader = self._reader
        try:
            if self.headers.get("transfer-encoding") == "chunked":
                while True:
                    size = int((await reader.readline()).split(b";")[0], 16)
                    if size == 0:
                        await reader.readline()
                        return
                    data = await reader.readexactly(size + 2)
                    yield data[:-2]
            elif "content-length" in self.headers:
                yield await reader.readexactly(int(self.headers["content-length"]))
            else:
                while data := await reader.read(65536):
                    yield data
        finally:
            self.close()

    async def read(self) -> bytes:
        return b"".join([c async for c in self.chunks()])

    async def json(self):
        return json.loads(await self.read())

    def close(self) -> None:
        self._writer.close()


async def request(host: str, port: int, method: str, path: str, body=None, headers=None) -> Response:
    """Send a request (a dict body goes as JSON) and return once the response headers are read."""
    reader, writer = await asyncio.open_connection(host, port)
    data = b"" if body is None else json.dumps(body).encode() if not isinstance(body, bytes) else body
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: close", f"Content-Length: {len(data)}"]
    if body is not None:
        lines.append("Content-Type: application/json")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + data)
    status_line = await reader.readline()
    status = int(status_line.split()[1])
    response_headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        response_headers[name.strip().lower()] = value.strip()
    return Response(status, response_headers, reader, writer)


async def sse_events(response: Response) -> AsyncIterator[dict]:
    """The JSON payloads of an SSE body, as they arrive."""
    buffer = b""
    async for chunk in response.chunks():
        buffer += chunk
        *blocks, buffer = buffer.split(b"\n\n")
        for block in blocks:
            for line in block.split(b"\n"):
                if line.startswith(b"data: "):
                    yield json.loads(line[6:])
