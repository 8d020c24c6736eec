"""Load: 500 concurrent streamed answers through one chatsvc process against the paced fake
DashScope, with conversation reads and writes alongside. Loopback only, bounded in count and time.

Checks: zero 5xx, zero `database is locked`, and every stored answer equal to what the fake sent,
with no message lost or duplicated."""

from __future__ import annotations

import asyncio
import random
import time

import pytest
from fake_dashscope import Reply
from procs import ServerProcess
from rawhttp import request, sse_events

ANSWERS = 500
CHUNKS = 20
API = "/api/v1"

pytestmark = pytest.mark.slow


def words(message: str) -> list[str]:
    return [f"{message}.{i} " for i in range(CHUNKS)]


def test_500_concurrent_answers_with_reads_and_writes(service, fake, tmp_path):
    def reply(seen):
        message = seen.body["messages"][-1]["content"]
        # every tenth answer is probed with a second message while it runs: it holds for 5 s mid-way,
        # so the probe meets it running however slowly the machine reads the `start` event
        hold = {"stall_at": 10, "stall": 5.0} if int(message[1:]) % 10 == 0 else {}
        return Reply.answer(words(message), pause=0.05, **hold)

    fake.default = reply
    env = {**service.env, "CHATSVC_CHECKPOINT_SECONDS": "0.2", "CHATSVC_UPSTREAM_IDLE_TIMEOUT": "30"}
    server = ServerProcess(env, tmp_path).start()
    statuses: list[int] = []  # of the chats
    side_statuses: list[int] = []  # of the conversation reads and writes alongside
    timing: list[float] = []
    texts: dict[str, str] = {}
    busy_seen = []

    async def answer(i: int) -> None:
        response = await request("127.0.0.1", server.port, "POST", f"{API}/chat/load-{i}/stream",
                                 {"message": f"m{i}"})  # fmt: skip
        statuses.append(response.status)
        async for event in sse_events(response):
            if event["type"] == "start" and i % 10 == 0:  # a second message while this one runs: 409
                second = await request("127.0.0.1", server.port, "POST", f"{API}/chat/load-{i}", {"message": "again"})
                statuses.append(second.status)
                busy_seen.append((await second.json())["code"])
            if event["type"] in ("end", "error"):
                texts[f"load-{i}"] = event["data"].get("full_text", event["data"].get("message"))

    async def reads_and_writes(worker: int, answers_done: asyncio.Event) -> None:
        n = 0
        while not answers_done.is_set():
            n += 1
            calls = [
                ("GET", f"{API}/context/conversations?limit=50", None),
                ("GET", f"{API}/context/conversations/load-{random.randrange(ANSWERS)}", None),
                ("POST", f"{API}/context/conversations", {"session_id": f"rw-{worker}-{n}", "title": "t"}),
                ("PATCH", f"{API}/context/conversations/rw-{worker}-{n}", {"title": f"t{n}"}),
                ("DELETE", f"{API}/context/conversations/rw-{worker}-{n}/context", None),
                ("GET", f"{API}/context/conversations/load-{random.randrange(ANSWERS)}/messages?limit=5", None),
            ]
            for method, path, body in calls:
                response = await request("127.0.0.1", server.port, method, path, body)
                side_statuses.append(response.status)
                if response.status == 404:  # only a conversation the answers have not created yet
                    assert method == "GET" and "/load-" in path
                await response.read()

    async def answers_then_done(done: asyncio.Event) -> None:
        started = time.monotonic()
        await asyncio.gather(*(answer(i) for i in range(ANSWERS)))
        timing.append(time.monotonic() - started)
        done.set()

    async def run() -> None:
        done = asyncio.Event()
        workers = [reads_and_writes(w, done) for w in range(10)]
        await asyncio.wait_for(asyncio.gather(answers_then_done(done), *workers), timeout=120)

    try:
        asyncio.run(run())
    finally:
        server.stop()
    log = server.log()
    assert "database is locked" not in log and "Traceback" not in log
    print(
        f"load: {ANSWERS} answers of {CHUNKS} chunks in {timing[0]:.1f} s, {len(side_statuses)} reads/writes alongside"
    )
    assert [s for s in statuses + side_statuses if s >= 500] == []
    assert statuses.count(200) == ANSWERS and statuses.count(409) == ANSWERS // 10
    assert busy_seen == ["conversation_busy"] * (ANSWERS // 10)
    assert len(side_statuses) >= 60 and set(side_statuses) <= {200, 201, 404}
    assert texts == {f"load-{i}": "".join(words(f"m{i}")) for i in range(ANSWERS)}

    stored = service.rows(
        "SELECT session_id, role, content, status FROM messages WHERE session_id LIKE 'load-%' ORDER BY id"
    )
    assert len(stored) == 2 * ANSWERS
    by_session: dict[str, list[dict]] = {}
    for row in stored:
        by_session.setdefault(row["session_id"], []).append(row)
    for i in range(ANSWERS):
        user, assistant = by_session[f"load-{i}"]
        assert (user["role"], user["content"], user["status"]) == ("user", f"m{i}", "complete")
        assert (assistant["role"], assistant["status"]) == ("assistant", "complete")
        assert assistant["content"] == "".join(words(f"m{i}"))
    assert len({r["id"] for r in service.rows("SELECT id FROM messages")}) == len(
        service.rows("SELECT id FROM messages")
    )
    assert len(fake.requests) == ANSWERS
