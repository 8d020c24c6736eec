"""What one large request makes everyone else wait for (issue 20), measured on a real chatsvc process.

    python bench/holds.py                       # SQLite, an import at the limit (100,000 messages)
    python bench/holds.py --messages 20000      # a quicker run
    python bench/holds.py --database postgresql://postgres@127.0.0.1/chatsvc_bench

Runs `chatsvc` in a subprocess against the fake model server (tests/fake_dashscope.py) and prints:
1. an import of --messages messages (one chain, about 147 bytes a message: 14.7 MB at 100,000): its wall
   time, and the longest time another user's chat (POST, answer stored) and GET /healthz took meanwhile;
   then a fork of that whole path, with the same two waits;
2. two pathological searches (200 characters repeating one trigram: SQLite's FTS5 phrase match; the same
   ending in another letter: PostgreSQL's ILIKE) over --long messages of 30,000 characters that repeat
   it: each one's time and status, and the longest concurrent GET of a conversation;
3. a `?tree=true` page of a conversation with 10,000 siblings (one question, 10,000 answers): the first
   page's size and time, and the whole listing's pages, bytes and time.
Bounded to a couple of minutes at the default sizes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx2 as httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from fake_dashscope import FakeDashScope  # noqa: E402
from procs import ServerProcess  # noqa: E402

CONV = "/api/v1/context/conversations"
WORDS = "the weather in Hangzhou river mountain story model answer question temple morning coffee".split()


def conversation_file(messages: list[dict]) -> dict:
    return {"format": "chatsvc.conversation", "version": 1, "exported_at": None,
            "conversation": {"session_id": None, "title": "bench"}, "messages": messages}  # fmt: skip


def message(n: int, parent: str | None, content: str, role: str | None = None) -> dict:
    return {"id": f"m{n}", "parent_id": parent, "role": role or ("user", "assistant")[n % 2], "content": content,
            "status": "complete", "created_at": "2026-01-01T00:00:00Z"}  # fmt: skip


def chain(count: int) -> dict:
    return conversation_file([
        message(n, f"m{n - 1}" if n else None, " ".join(WORDS[(n + k) % len(WORDS)] for k in range(2)))
        for n in range(count)
    ])  # fmt: skip


class Watch:
    """Other clients, each in a loop on its own thread, recording the longest time a request took."""

    def __init__(self, server: ServerProcess, requests: dict[str, tuple[str, str, dict]]):
        self.server, self.requests = server, requests
        self.longest = dict.fromkeys(requests, 0.0)
        self.statuses: dict[str, set[int]] = {name: set() for name in requests}
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._loop, args=(name,), daemon=True) for name in requests]

    def _loop(self, name: str) -> None:
        method, path, kw = self.requests[name]
        with httpx.Client(base_url=self.server.url, timeout=120) as client:
            while not self.stop.is_set():
                started = time.perf_counter()
                status = client.request(method, path, **kw).status_code
                self.longest[name] = max(self.longest[name], time.perf_counter() - started)
                self.statuses[name].add(status)
                time.sleep(0.02)

    def __enter__(self) -> Watch:
        for thread in self.threads:
            thread.start()
        time.sleep(0.3)
        self.longest = dict.fromkeys(self.requests, 0.0)  # only what overlaps the measured request
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(120)

    def report(self) -> str:
        return ", ".join(f"{name} waited up to {self.longest[name]:.2f} s {sorted(self.statuses[name])}"
                         for name in self.requests)  # fmt: skip


def timed(client, method: str, path: str, **kw):
    started = time.perf_counter()
    r = client.request(method, path, **kw)
    return r, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database", default=None, help="a PostgreSQL URL (default: a temporary SQLite file)")
    parser.add_argument("--messages", type=int, default=100_000, help="the import's size (the limit: 100,000)")
    parser.add_argument("--long", type=int, default=60, help="long messages the pathological search walks")
    parser.add_argument("--siblings", type=int, default=10_000, help="siblings in the tree-page conversation")
    args = parser.parse_args()
    fake = FakeDashScope().start()
    with tempfile.TemporaryDirectory() as tmp:
        database = args.database or f"sqlite+aiosqlite:///{tmp}/bench.db"
        env = {"DASHSCOPE_API_KEY": "sk-bench", "DASHSCOPE_BASE_URL": fake.url, "DATABASE_URL": database,
               "CHATSVC_USER_HEADER": "X-User", "CHATSVC_TITLES": "off", "LOG_LEVEL": "warning"}  # fmt: skip
        server = ServerProcess(env, Path(tmp)).start()
        try:
            run(server, args)
        finally:
            server.stop()
            fake.stop()
    return 0


def run(server: ServerProcess, args: argparse.Namespace) -> None:
    me, other = {"X-User": "bench"}, {"X-User": "other"}
    others = {
        "another user's chat": ("POST", "/api/v1/chat/others", {"json": {"message": "hi"}, "headers": other}),
        "GET /healthz": ("GET", "/healthz", {}),
    }
    with httpx.Client(base_url=server.url, timeout=600) as client:
        assert client.post("/api/v1/chat/others", json={"message": "hi"}, headers=other).status_code == 200
        # 1. import at the limit, then a fork of its whole path
        body = json.dumps(chain(args.messages)).encode()
        with Watch(server, others) as watch:
            r, took = timed(client, "POST", f"{CONV}/import", content=body,
                            headers={**me, "Content-Type": "application/json"})  # fmt: skip
        assert r.status_code == 201, r.text
        print(f"import of {args.messages:,} messages ({len(body) / 1e6:.1f} MB): {r.status_code} in {took:.2f} s;"
              f" {watch.report()}")  # fmt: skip
        imported = r.json()
        with Watch(server, others) as watch:
            r, took = timed(client, "POST", f"{CONV}/{imported['session_id']}/fork", headers=me,
                            json={"message_id": imported["current_message_id"]})  # fmt: skip
        assert r.status_code == 201, r.text
        print(f"fork of its {args.messages:,}-message path: {r.status_code} in {took:.2f} s; {watch.report()}")

        # 2. the pathological search
        file = conversation_file([message(n, f"m{n - 1}" if n else None, "a" * 30_000) for n in range(args.long)])
        r = client.post(f"{CONV}/import?session_id=long", json=file, headers=me)
        assert r.status_code == 201, r.text
        reads = {"GET a conversation": ("GET", f"{CONV}/others", {"headers": other})}
        for name, query in (("a" * 200, "a" * 200), ("a" * 199 + "b", "a" * 199 + "b")):  # SQLite's; PostgreSQL's
            with Watch(server, reads) as watch:
                r, took = timed(client, "GET", CONV, params={"q": query}, headers=me)
            print(f"search of {name[:3]}...{name[-3:]} (200 characters) over {args.long} messages of 30,000:"
                  f" {r.status_code} in {took:.2f} s"
                  f" ({r.json().get('code', 'found ' + str(len(r.json().get('conversations', []))))});"
                  f" {watch.report()}")  # fmt: skip

        # 3. a tree page with many siblings
        file = conversation_file([message(0, None, "the question", "user")] + [
            message(n, "m0", f"answer {n}", "assistant") for n in range(1, args.siblings + 1)
        ])  # fmt: skip
        r = client.post(f"{CONV}/import?session_id=siblings", json=file, headers=me)
        assert r.status_code == 201, r.text
        r, took = timed(client, "GET", f"{CONV}/siblings/messages", params={"tree": "true", "limit": 500}, headers=me)
        print(f"tree page (limit 500) of {args.siblings:,} siblings: {len(r.content) / 1e6:.2f} MB,"
              f" {len(r.json()['messages'])} messages, in {took:.2f} s")  # fmt: skip
        pages, size, seen, cursor, started = 0, 0, set(), None, time.perf_counter()
        while True:
            params = {"tree": "true", "limit": 500, **({"cursor": cursor} if cursor else {})}
            r = client.get(f"{CONV}/siblings/messages", params=params, headers=me)
            pages, size = pages + 1, size + len(r.content)
            seen.update(m["id"] for m in r.json()["messages"])
            if not (cursor := r.json()["next_cursor"]):
                break
        print(f"  the whole listing: {pages} pages, {size / 1e6:.1f} MB, {len(seen):,} messages,"
              f" in {time.perf_counter() - started:.2f} s")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
