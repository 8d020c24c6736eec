"""The conversation tree's walks on a PostgreSQL database whose statistics are stale: a new
database (never analyzed), filled by one large import, then the tree operations that walk a deep
path. Each step is timed through chatsvc's HTTP API (in process), on a throw-away database.

    python bench/tree_pg.py                       # 100,000 messages in one chain, 10,000 deleted
    python bench/tree_pg.py --messages 20000 --deleted 2000
    python bench/tree_pg.py --explain             # the server's log gets the plan of each slow statement

Steps: import the chain (POST .../import); delete the last `--deleted` messages (DELETE
.../messages/{id}); switch to the root (PATCH, a walk down the whole chain); fork the chain's leaf
(POST .../fork, a walk up and a copy of the whole chain); read the current branch's newest page; a
chat-sized step: delete a leaf. Each step is bounded by chatsvc's own statement timeout (30 s).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import asyncpg  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

import chatsvc  # noqa: E402

SERVER = os.environ.get("CHATSVC_TEST_POSTGRES", "postgresql://postgres@127.0.0.1/postgres")
API = "/api/v1"
CONV = f"{API}/context/conversations"


def chain(n: int) -> dict:
    """An export file of one conversation: `n` messages, each following the one before."""
    messages = []
    for i in range(n):
        messages.append({
            "id": f"m{i:07d}", "parent_id": f"m{i - 1:07d}" if i else None, "role": ("user", "assistant")[i % 2],
            "content": f"message {i}", "status": "complete", "created_at": "2026-01-01T00:00:00.000Z",
            "in_context": True,
        })  # fmt: skip
    return {"format": chatsvc.EXPORT_FORMAT, "version": chatsvc.EXPORT_VERSION,
            "conversation": {"session_id": "deep", "title": "deep", "current_message_id": messages[-1]["id"]},
            "messages": messages}  # fmt: skip


async def sql(url: str, statement: str) -> list:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch(statement)
    finally:
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--deleted", type=int, default=10_000)
    parser.add_argument("--explain", action="store_true", help="the server logs the plan of each statement over 0.5 s")
    args = parser.parse_args()
    name = f"chatsvc_bench_{uuid.uuid4().hex[:8]}"
    asyncio.run(sql(SERVER, f"CREATE DATABASE {name}"))
    url = SERVER.rsplit("/", 1)[0] + f"/{name}"
    if args.explain:  # auto_explain, in this database's sessions only
        for option in ("session_preload_libraries = 'auto_explain'", "auto_explain.log_min_duration = '500ms'",
                       "auto_explain.log_nested_statements = on"):  # fmt: skip
            asyncio.run(sql(SERVER, f"ALTER DATABASE {name} SET {option}"))
    try:
        run(url, args)
    finally:
        asyncio.run(sql(SERVER, f"DROP DATABASE {name} WITH (FORCE)"))


def run(url: str, args: argparse.Namespace) -> None:
    env = {"DATABASE_URL": url, "DASHSCOPE_API_KEY": "sk-bench", "CHATSVC_MAX_IMPORT_BYTES": str(1 << 30)}
    settings = chatsvc.Settings.from_env(env, env_file=None)
    body = chain(args.messages)

    def step(title: str, method: str, path: str, status: int, **kw) -> dict:
        started = time.perf_counter()
        r = client.request(method, path, **kw)
        took = time.perf_counter() - started
        print(f"{title:<58} {took:8.2f} s  ({r.status_code})", flush=True)
        if r.status_code != status:
            print(f"    {r.text[:300]}", flush=True)
        return r.json() if r.content else {}

    with TestClient(chatsvc.create_app(settings)) as client:
        stats = asyncio.run(sql(url, "SELECT reltuples FROM pg_class WHERE relname = 'messages'"))
        print(f"PostgreSQL, a new database (messages' reltuples: {stats[0]['reltuples']:.0f})")
        step(f"import a chain of {args.messages:,} messages", "POST", f"{CONV}/import", 201, json=body)
        root = client.get(f"{CONV}/deep/messages?tree=true&limit=1").json()["messages"][0]["id"]
        # the message at depth messages - deleted (ids grow along the chain)
        depth = args.messages - args.deleted
        cut = asyncio.run(sql(url, f"SELECT id FROM messages ORDER BY id OFFSET {depth} LIMIT 1"))[0]["id"]
        step(f"delete the last {args.deleted:,} messages (one branch)", "DELETE", f"{CONV}/deep/messages/{cut}", 200)
        remaining = args.messages - args.deleted
        step(f"switch to the root: a walk down {remaining:,} messages", "PATCH", f"{CONV}/deep", 200,
             json={"current_message_id": root})  # fmt: skip
        leaf = client.get(f"{CONV}/deep?limit=1").json()["messages"][-1]["id"]
        step(f"fork at the leaf: a copy of {remaining:,} messages", "POST", f"{CONV}/deep/fork", 201,
             json={"message_id": leaf, "session_id": "deep-fork"})  # fmt: skip
        step("read the current branch's newest 50 messages", "GET", f"{CONV}/deep", 200)
        step("delete one leaf", "DELETE", f"{CONV}/deep/messages/{leaf}", 200)
        fork_root = client.get(f"{CONV}/deep-fork/messages?tree=true&limit=1").json()["messages"][0]["id"]
        step(f"delete the fork's root: {remaining:,} messages", "DELETE", f"{CONV}/deep-fork/messages/{fork_root}", 200)
        stats = asyncio.run(
            sql(
                url,
                "SELECT reltuples, last_analyze, last_autoanalyze FROM pg_class c"
                " JOIN pg_stat_user_tables s ON s.relid = c.oid WHERE c.relname = 'messages'",
            )
        )
        print(f"messages' statistics at the end: {dict(stats[0])}")


if __name__ == "__main__":
    main()
