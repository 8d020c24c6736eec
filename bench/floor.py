"""The floor: the least a relay on chatsvc's own stack costs (bench/relay.py --floor).

uvicorn, Starlette, sse-starlette and httpx2, as chatsvc runs them, and nothing else: no database,
no turn, no event log, no middleware, no metrics. Its one route answers as chatsvc's
`POST /api/v1/chat/{session_id}/stream` does on the wire (a `start`, a `chunk` per piece of text,
an `end` with the full text, each event with an id), so bench/relay.py reads it with chatsvc's
reader. What chatsvc costs above it is what chatsvc itself adds: what its features, its stored
answers and its own code cost, apart from what the libraries the card chose cost anyway.

    python bench/floor.py PORT   # DASHSCOPE_BASE_URL: the upstream, as for chatsvc
"""

from __future__ import annotations

import json
import os
import sys
import uuid

import httpx2 as httpx
import uvicorn
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

BASE = os.environ["DASHSCOPE_BASE_URL"].rstrip("/")
HEADERS = {"Authorization": f"Bearer {os.environ.get('DASHSCOPE_API_KEY', 'sk-floor')}"}
CLIENT: httpx.AsyncClient | None = None


def event(answer: str, seq: int, kind: str, data: dict) -> dict:
    return {"id": f"{answer}:{seq}", "data": json.dumps({"type": kind, "data": data}, separators=(",", ":"))}


async def stream(request: Request) -> EventSourceResponse:
    global CLIENT
    if CLIENT is None:
        CLIENT = httpx.AsyncClient(timeout=httpx.Timeout(30.0), limits=httpx.Limits(max_connections=None))
    message = (await request.json())["message"]
    answer = uuid.uuid4().hex
    body = {"model": "qwen-plus", "stream": True, "messages": [{"role": "user", "content": message}]}

    async def events():
        yield event(answer, 0, "start", {"session_id": request.path_params["session_id"], "message_id": answer})
        text = []
        async with CLIENT.stream("POST", f"{BASE}/chat/completions", json=body, headers=HEADERS) as response:
            async for line in response.aiter_lines():
                if not line.startswith("data:") or line.endswith("[DONE]"):
                    continue
                for choice in json.loads(line[5:]).get("choices") or ():
                    if piece := (choice.get("delta") or {}).get("content"):
                        text.append(piece)
                        yield event(answer, len(text), "chunk", {"content": piece})
        yield event(answer, len(text) + 1, "end", {"full_text": "".join(text), "message_id": answer})

    return EventSourceResponse(events(), sep="\n")


async def healthz(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


app = Starlette(routes=[Route("/api/v1/chat/{session_id}/stream", stream, methods=["POST"]),
                        Route("/healthz", healthz)])  # fmt: skip

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
