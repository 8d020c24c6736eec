"""A continued answer's time to first chunk against a fresh answer's, in one sitting (issue 25).

    python bench/continue.py                      # SQLite, 200 pairs
    python bench/continue.py --database postgresql://...  # an empty PostgreSQL database
    python bench/continue.py --pairs 50 --history 40      # fewer pairs, a longer conversation

chatsvc (uvicorn in a thread of this process) in front of the fake DashScope (tests/fake_dashscope.py,
another thread). Each pair, in its own conversation with `--history` earlier turns: a fresh answer
(`{"message"}`) cut at max_tokens (`finish_reason` length), then its continuation (`{"continue"}`),
both through POST /api/v1/chat/{id}/stream; the time from sending the request to its first `chunk`
event. The fake answers at once, so the figures are chatsvc's own work (and the loopback) before a
first token: for a continuation, reading the answer, its context as a regeneration's, the replies
check, and begin_continuation's write. Reports p50 / p90 / mean of both and their difference.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fake_dashscope import FakeDashScope, Reply
from live import LiveServer

import chatsvc

API = "/api/v1"


def first_chunk(client, session_id: str, body: dict) -> tuple[float, str]:
    """Seconds from the request to its first `chunk` event; the answer's id."""
    started = time.perf_counter()
    took, message_id = None, None
    with client.stream("POST", f"{API}/chat/{session_id}/stream", json=body) as response:
        assert response.status_code == 200, response.read()
        buffer = b""
        for piece in response.iter_raw():
            buffer += piece
            if took is None and b'"type":"chunk"' in buffer:
                took = time.perf_counter() - started
            if message_id is None and b'"message_id":"' in buffer:
                message_id = buffer.split(b'"message_id":"', 1)[1].split(b'"', 1)[0].decode()
    assert took is not None and message_id is not None
    return took, message_id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--history", type=int, default=10, help="earlier turns in each conversation")
    parser.add_argument("--database", help="DATABASE_URL (default: a new SQLite file)")
    args = parser.parse_args()
    fake = FakeDashScope().start()
    fake.default = Reply.answer(["one ", "two ", "three"], finish="length")
    with tempfile.TemporaryDirectory() as tmp:
        env = {
            "DASHSCOPE_API_KEY": "sk-bench",
            "DASHSCOPE_BASE_URL": fake.url,
            "DATABASE_URL": args.database or f"sqlite+aiosqlite:///{tmp}/bench.db",
            "CHATSVC_TITLES": "off",
            "CHATSVC_UPSTREAM_RETRIES": "0",
        }
        settings = chatsvc.Settings.from_env(env, env_file=None)
        fresh, continued = [], []
        with LiveServer(settings) as live, live.client() as client:
            for n in range(args.pairs):
                sid = f"bench-{time.time_ns()}-{n}"
                for k in range(args.history):
                    assert client.post(f"{API}/chat/{sid}", json={"message": f"turn {k}"}).status_code == 200
                took, message_id = first_chunk(client, sid, {"message": "go on", "max_tokens": 3})
                fresh.append(took)
                took, _ = first_chunk(client, sid, {"continue": message_id})
                continued.append(took)
        fake.stop()

    def row(name: str, values: list[float]) -> str:
        q = statistics.quantiles(values, n=10)
        p50, mean = statistics.median(values) * 1000, statistics.mean(values) * 1000
        return f"{name:<12} p50 {p50:7.2f} ms  p90 {q[8] * 1000:7.2f} ms  mean {mean:7.2f} ms"

    print(
        f"time to first chunk, {args.pairs} pairs, {args.history} earlier turns, {settings.database_url.split(':')[0]}"
    )
    print(row("fresh", fresh))
    print(row("continued", continued))
    print(f"difference   p50 {(statistics.median(continued) - statistics.median(fresh)) * 1000:+7.2f} ms")


if __name__ == "__main__":
    main()
