"""Search over a large history, and what keeping its index costs a chat, measured in one run.

    python bench/search.py                 # SQLite (FTS5 trigram), 100,000 messages
    python bench/search.py --database postgresql://postgres@127.0.0.1/chatsvc_bench   # pg_trgm

Builds 100,000 messages of mixed Chinese and English in 1,000 conversations of one owner (and as
many of another owner, which no query may see), through chatsvc's own schema, then times
Search.conversations (the query and the snippets' read; no HTTP) for queries of every kind: p50 and p99
of --runs each. Then the cost of the index per chat: a turn's writes (begin_turn, then
finish_answer with a 300-character answer) with the index kept, and with it dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]
import chatsvc  # noqa: E402

WORDS = ("the weather in Hangzhou river mountain story model answer question temple morning coffee train "
         "planning budget report python database index search branch travel museum garden").split()  # fmt: skip
HANZI = "从前有座山山里有座庙庙里有个老和尚在给小和尚讲故事今天天气很好我们去西湖散步吧这个模型回答问题的速度很快"
QUERIES = {
    "Chinese, 2 characters (scan)": "故事",
    "Chinese, 3 characters": "老和尚",
    "Chinese, 4 characters, rare": "西湖散步",
    "English word, any case": "HANGZHOU",
    "English phrase": "coffee train",
    "1 character (scan)": "庙",
    "not found": "zebra crossing",
}


def sentence(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return "".join(rng.choice(HANZI) for _ in range(rng.randint(10, 60)))
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30)))


async def build(store: chatsvc.Store, messages: int, conversations: int) -> None:
    rng = random.Random(1)
    for owner in ("bench", "other"):
        for c in range(conversations):
            sid = f"c{c}"
            await store.conversations.create(owner, sid, None, None, None)
            rows, parent = [], None
            for n in range(messages // conversations):
                mid = chatsvc.new_message_id()
                rows.append({"id": mid, "parent_id": parent, "role": ("user", "assistant")[n % 2],
                             "content": sentence(rng), "reasoning_content": None, "status": "complete",
                             "model": None, "finish_reason": None, "error_code": None, "error_message": None,
                             "prompt_tokens": None, "completion_tokens": None, "total_tokens": None,
                             "last_seq": None, "created_at": chatsvc.utcnow(), "owner": owner, "session_id": sid,
                             "updated_at": chatsvc.utcnow()})  # fmt: skip
                parent = mid
            async with store.db.transaction():
                await store.copies.insert_messages(rows)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def chat_cost(store: chatsvc.Store, turns: int) -> float:
    """ms of a turn's writes, median."""
    times = []
    answer = "这个模型回答问题的速度很快 and the answer goes on " * 6
    for n in range(turns):
        turn = chatsvc.Turn("bench", f"turns-{n % 20}", chatsvc.new_message_id(), "qwen-plus",
                            chatsvc.new_message_id(), "a question about the weather", True, None, "t")  # fmt: skip
        started = time.perf_counter()
        await store.tree.begin_turn(turn)
        await store.answers.finish(turn.answer_id, chatsvc.FinalState("complete", answer, None, "stop", None, None,
                                                                     None, 3))  # fmt: skip
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


async def main(args: argparse.Namespace) -> None:
    url = args.database or f"sqlite+aiosqlite:///{tempfile.mkdtemp()}/search.db"
    store = chatsvc.Store(url)
    await store.open()
    try:
        if not store.db.is_sqlite:
            await store.db.execute("TRUNCATE messages, conversations CASCADE")
        started = time.perf_counter()
        await build(store, args.messages, args.conversations)
        took = time.perf_counter() - started
        print(f"built {args.messages:,} messages for each of 2 owners in {took:.1f} s ({url.split(':')[0]})")
        print(f"\nsearch latency over {args.messages:,} messages of the owner, {args.runs} runs each:")
        for title, q in QUERIES.items():
            times, found = [], 0
            for _ in range(args.runs):
                t0 = time.perf_counter()
                rows = await store.search.conversations("bench", q, 51, None)
                await store.search.texts([r["match_id"] for r in rows if r["match_id"]], q)
                times.append((time.perf_counter() - t0) * 1000)
                found = len(rows)
            print(f"  {title:<32} {q!r:<18} p50 {statistics.median(times):7.2f} ms  p99 {pct(times, 0.99):7.2f} ms"
                  f"  ({found} of the first page)")  # fmt: skip
        kept = await chat_cost(store, args.turns)
        if store.db.is_sqlite:
            for trigger in ("insert", "update", "delete"):
                await store.db.execute(f"DROP TRIGGER messages_search_{trigger}")
        else:
            await store.db.execute("DROP INDEX IF EXISTS messages_text_search")
        dropped = await chat_cost(store, args.turns)
        print(f"\na chat's writes, median of {args.turns}: {kept:.3f} ms with the index kept, {dropped:.3f} ms"
              f" without it: +{kept - dropped:.3f} ms a chat")  # fmt: skip
    finally:
        await store.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--conversations", type=int, default=1_000)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--turns", type=int, default=400)
    parser.add_argument("--database", metavar="URL", help="a PostgreSQL database to fill (emptied first)")
    asyncio.run(main(parser.parse_args()))
