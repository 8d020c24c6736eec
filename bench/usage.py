"""What the usage ledger costs with 1,000,000 recorded calls (issue 24): the query plans and timings of
the admission, the settlement, a user's standing and the usage reports, on SQLite and PostgreSQL.

    python bench/usage.py                       # both databases, 1,000,000 calls each (a few minutes)
    python bench/usage.py --rows 100000 --only sqlite
    python bench/usage.py --postgres postgresql://postgres@127.0.0.1/postgres

A scratch database is filled with `--rows` settled calls (PostgreSQL: COPY into a database of its own,
created on the `--postgres` server and dropped at the end; SQLite: executemany into a temporary file),
its schema made by chatsvc's own Store, the schema's indexes dropped during the load and made again
after it, then ANALYZEd. The owners are skewed as docs/design/usage.md 1.6 found: 747 owners, the
n-th heaviest with 1/n^2 of the calls (Zipf, s = 2: the heaviest has ~61 %, a runaway script; the
median a handful), spread over the 183 days up to now, so the current day and month hold calls, and
stored in the order of their times, as a ledger grows (PostgreSQL's plans for a range of time depend
on it: loaded owner by owner, a month of everyone's calls is a sequential scan).

Then chatsvc's real Usage room (`store.usage`, every limit set so that the admission checks them all,
with a price table) runs against it, for the heaviest owner and the median one: `admit` (in a
transaction, as begin_turn holds one) then `settle` (as an answer's final write), `standing`, and
`report` of the last 31 days for each group_by (and group_by=user over everyone). Each is timed
(median and worst of --repeat runs) and every statement it issued that reads or writes the ledger or
the owners' rows is EXPLAINed with its own parameters (PostgreSQL: EXPLAIN ANALYZE, inside a
transaction rolled back; SQLite: EXPLAIN QUERY PLAN). Exits 1 if any plan reads `usage_calls` whole
(`Seq Scan on usage_calls`, `SCAN usage_calls`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]
import chatsvc  # noqa: E402

OWNERS = 747
DAYS = 183
MODELS = (("qwen-plus", 0.7), ("qwen-flash", 0.2), ("qwen-max", 0.1))
PURPOSES = (("answer", 0.88), ("tool_round", 0.08), ("title", 0.04))
PRICES = {
    "currency": "CNY",
    "models": {
        "qwen-plus": {"input": 0.8, "output": 2, "output_thinking": 8, "cached_input": 0.2},
        "qwen-flash": {"input": 0.15, "output": 1.5, "cached_input": 0.03},
    },
}
GROUPS = ("day", "model", "conversation", "purpose")
WHOLE_LEDGER = re.compile(r"Seq Scan on usage_calls|\bSCAN usage_calls\b")
COLUMNS = ("id", "owner", "session_id", "message_id", "purpose", "model", "state", "outcome", "source",
           "prompt_tokens", "completion_tokens", "total_tokens", "reasoning_tokens", "cached_tokens",
           "cache_creation_tokens", "reserved_tokens", "reserved_cost", "cost_micros", "currency", "day", "month",
           "created_at", "settled_at")  # fmt: skip


def stamp(moment: datetime) -> str:
    """As chatsvc writes a time (utcnow): RFC 3339 UTC with milliseconds."""
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def owner_counts(rows: int) -> list[tuple[str, int]]:
    """(owner, calls), heaviest first: Zipf with s = 2 over OWNERS owners, summing to `rows`."""
    weights = [1 / n**2 for n in range(1, OWNERS + 1)]
    total = sum(weights)
    counts = [max(1, round(rows * w / total)) for w in weights]
    counts[0] += rows - sum(counts)
    return [(f"user-{n:04d}", c) for n, c in enumerate(counts)]


def pick(rng: random.Random, table: tuple[tuple[str, float], ...]) -> str:
    x, acc = rng.random(), 0.0
    for value, weight in table:
        acc += weight
        if x < acc:
            return value
    return table[-1][0]


def ledger_rows(rows: int, now: datetime, seed: int = 24):
    """The calls, as tuples in COLUMNS' order; ids grow with created_at, as new_message_id's do."""
    rng = random.Random(seed)
    start = now - timedelta(days=DAYS)
    span_us = int((now - start).total_seconds() * 1_000_000) - 1_000_000
    for owner, count in owner_counts(rows):
        conversations = max(1, count // 40)
        for _ in range(count):
            offset = rng.randrange(span_us)
            moment = start + timedelta(microseconds=offset)
            created = stamp(moment)
            purpose = pick(rng, PURPOSES)
            model = pick(rng, MODELS)
            source = "reported" if rng.random() < 0.97 else "estimated" if rng.random() < 0.7 else "none"
            prompt = 0 if source == "none" else rng.randrange(20, 6000)
            completion = 0 if source == "none" else rng.randrange(1, 1500)
            reasoning = rng.randrange(completion + 1) if model == "qwen-plus" and rng.random() < 0.2 else None
            cached = rng.randrange(prompt + 1) if source == "reported" and rng.random() < 0.3 else None
            cost = None if model == "qwen-max" else (prompt * 800_000 + completion * 2_000_000) // 1_000_000
            us = int(moment.timestamp() * 1_000_000)
            answer = None if purpose == "title" else f"{us:014x}{rng.getrandbits(40):010x}"
            yield (
                f"{us:014x}{rng.getrandbits(40):010x}", owner, f"s{rng.randrange(conversations)}", answer,
                purpose, model, "settled", rng.choice(("complete", "complete", "complete", "stopped", "failed")),
                source, prompt, completion, prompt + completion, reasoning, cached, None, 0, 0, cost,
                None if cost is None else "CNY", created[:10], created[:7], created, created,
            )  # fmt: skip


def owner_rows(rows: list[tuple], now: datetime) -> list[tuple]:
    """Each owner's row: its current day's and month's settled tokens and cost, nothing held."""
    day, month = stamp(now)[:10], stamp(now)[:7]
    tokens_day, tokens_month, cost_month = Counter(), Counter(), Counter()
    owners = set()
    for r in rows:
        owner, total, cost, row_day, row_month = r[1], r[11], r[17] or 0, r[19], r[20]
        owners.add(owner)
        if row_day == day:
            tokens_day[owner] += total
        if row_month == month:
            tokens_month[owner] += total
            cost_month[owner] += cost
    return [(o, day, tokens_day[o], month, tokens_month[o], cost_month[o]) for o in sorted(owners)]


OWNER_SQL = "INSERT INTO usage_owners (owner, day, day_tokens, month, month_tokens, month_cost) VALUES "


# ── the scratch databases ─────────────────────────────────────────────────────────────


async def make_schema(url: str) -> list[tuple[str, str]]:
    """The current schema, by chatsvc's Store; returns the ledger's indexes (name, definition)."""
    store = chatsvc.Store(url)
    await store.open()
    try:
        if store.db.is_sqlite:
            found = await store.db.fetch_all(
                "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'usage_calls'"
                " AND sql IS NOT NULL"
            )
            return [(r["name"], r["sql"]) for r in found]
        found = await store.db.fetch_all(
            "SELECT indexname AS name, indexdef AS sql FROM pg_indexes WHERE tablename = 'usage_calls'"
            " AND indexname <> 'usage_calls_pkey'"
        )
        return [(r["name"], r["sql"]) for r in found]
    finally:
        await store.close()


def fill_sqlite(path: str, rows: list[tuple], owners: list[tuple], indexes: list[tuple[str, str]]) -> None:
    with sqlite3.connect(path) as db:
        for name, _ in indexes:
            db.execute(f"DROP INDEX {name}")
        db.executemany(f"INSERT INTO usage_calls ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})", rows)
        db.executemany(OWNER_SQL + "(?, ?, ?, ?, ?, ?)", owners)
        for _, sql in indexes:
            db.execute(sql)
        db.execute("ANALYZE")


async def fill_postgres(url: str, rows: list[tuple], owners: list[tuple], indexes: list[tuple[str, str]]) -> None:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        for name, _ in indexes:
            await conn.execute(f"DROP INDEX {name}")
        await conn.copy_records_to_table("usage_calls", records=rows, columns=COLUMNS)
        await conn.executemany(OWNER_SQL + "($1, $2, $3, $4, $5, $6)", owners)
        for _, sql in indexes:
            await conn.execute(sql)
        await conn.execute("VACUUM ANALYZE usage_calls")
        await conn.execute("VACUUM ANALYZE usage_owners")
    finally:
        await conn.close()


def pg_admin(server: str, sql: str) -> None:
    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(server)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run())


# ── the real Usage room, its statements recorded ───────────────────────────────────────


class Recorder:
    """Every statement the store's database runs (Database.fetch_all, which fetch_one and execute go
    through, and the numbered ones), with its parameters, while `on`."""

    def __init__(self, db: chatsvc.Database):
        self.on, self.statements = False, []
        fetch_all, numbered = db.fetch_all, db.execute_numbered

        async def recorded_fetch_all(sql, values=None, role=chatsvc.READ):
            if self.on:
                self.statements.append((sql, dict(values or {}), False))
            return await fetch_all(sql, values, role)

        async def recorded_numbered(sql, *args):
            if self.on:
                self.statements.append((sql, args, True))
            return await numbered(sql, *args)

        db.fetch_all, db.execute_numbered = recorded_fetch_all, recorded_numbered


async def explain(db: chatsvc.Database, sql: str, values, numbered: bool) -> list[str]:
    """The statement's plan, run with its own parameters (PostgreSQL: EXPLAIN ANALYZE, its writes rolled
    back; an INSERT, which has run already and would now collide with itself, only EXPLAINed)."""
    if db.is_sqlite:
        rows = await db.fetch_all("EXPLAIN QUERY PLAN " + sql, values)
        return [r["detail"] for r in rows]
    how = "(COSTS OFF)" if sql.lstrip().upper().startswith("INSERT") else "(ANALYZE, COSTS OFF)"
    lines: list[str] = []
    try:
        async with db.transaction():
            if numbered:
                async with db.connection() as conn:
                    found = await conn.raw_connection.fetch(f"EXPLAIN {how} " + sql, *values)
            else:
                found = await db.fetch_all(f"EXPLAIN {how} " + sql, values)
            lines = [next(iter(dict(r).values())) for r in found]
            raise chatsvc._Rollback
    except chatsvc._Rollback:
        pass
    return lines


def touches_usage(sql: str) -> bool:
    return bool(re.search(r"\busage_(calls|owners)\b", sql))


class Bench:
    def __init__(self, url: str, repeat: int):
        limits = chatsvc.Limits(10**12, 10**12, 10**15, 10**9, 10**6)  # every limit, none ever reached
        self.store = chatsvc.Store(url, limits=limits, prices=chatsvc.Prices.parse(json.dumps(PRICES)))
        self.repeat = repeat
        self.recorder: Recorder | None = None
        self.table: list[tuple[str, str, str, float, float, str]] = []  # op, owner, rows, p50 ms, max ms, plan
        self.plans: dict[str, list[str]] = {}  # statement -> plan
        self.scans: list[str] = []

    async def open(self) -> None:
        await self.store.open()
        self.recorder = Recorder(self.store.db)

    async def close(self) -> None:
        await self.store.close()

    async def measure(self, op: str, owner: str, rows: str, call) -> None:
        """Time `call` (a coroutine function) `repeat` times; EXPLAIN the ledger statements of its first run."""
        times, statements = [], []
        for i in range(self.repeat):
            self.recorder.on, self.recorder.statements = i == 0, []
            started = time.perf_counter()
            await call()
            times.append(time.perf_counter() - started)
            self.recorder.on = False
            if i == 0:
                statements = [s for s in self.recorder.statements if touches_usage(s[0])]
        summaries = []
        for sql, values, numbered in statements:
            plan = await explain(self.store.db, sql, values, numbered)
            text = " ".join(sql.split())
            key = f"{op} [{owner}]: {text if len(text) <= 200 else text[:200] + ' …'}"
            self.plans[key] = plan
            summaries.append(summary(plan))
            if any(WHOLE_LEDGER.search(line) for line in plan):
                self.scans.append(key)
        self.table.append((op, owner, rows, statistics.median(times) * 1000, max(times) * 1000, " | ".join(summaries)))

    def hold(self, owner: str) -> chatsvc.Hold:
        call_id = chatsvc.new_message_id()
        prices = self.store.usage.prices
        return chatsvc.Hold(call_id, owner, "bench", chatsvc.new_message_id(), chatsvc.Purpose.ANSWER, "qwen-plus",
                            prompt_tokens=500, output_tokens=4096,
                            cost=prices.hold("qwen-plus", 500, 4096) if prices else 0)  # fmt: skip

    async def run(self, owners: dict[str, str], month: tuple[str, str], calls_in_month: dict[str, int]) -> None:
        usage, db = self.store.usage, self.store.db
        for label, owner in owners.items():
            held: list[chatsvc.Hold] = []

            async def admit(owner=owner, held=held) -> None:
                hold = self.hold(owner)
                async with db.transaction():
                    await usage.admit(hold)
                held.append(hold)

            async def settle(held=held) -> None:
                hold = held.pop()
                spent = chatsvc.Spent(chatsvc.Source.REPORTED, 480, 120, 600)
                spent.cost = usage.prices.cost("qwen-plus", spent, False) if usage.prices else None
                spent.currency = usage.prices.currency if usage.prices else None
                async with db.transaction():
                    await usage.settle(hold.call_id, spent, "complete", True)

            await self.measure("admit", label, "1 owner row", admit)
            await self.measure("settle", label, "1 call, 1 owner row", settle)  # each admission's call
            await self.measure("standing", label, "1 owner row", lambda owner=owner: usage.standing(owner))
            for group in GROUPS:
                report = lambda owner=owner, group=group: usage.report(owner, *month, group, 100, None)  # noqa: E731
                await self.measure(f"report {group}", label, f"{calls_in_month[owner]:,} calls", report)
        everyone = sum(calls_in_month.values())
        await self.measure("report user", "everyone", f"{everyone:,} calls",
                           lambda: usage.report(None, *month, "user", 100, None))  # fmt: skip


def summary(plan: list[str]) -> str:
    """The plan's reads of the ledger and the owners' rows, in a few words."""
    found = []
    for line in plan:
        text = line.strip().lstrip("->").strip()
        if "usage_" not in text:
            continue
        m = re.match(r"((?:Parallel )?(?:Index Only Scan|Index Scan|Bitmap Index Scan|Seq Scan|Bitmap Heap Scan)"
                     r"(?: using \w+)? on \w+|(?:Parallel )?(?:Index Only Scan|Index Scan|Bitmap Index Scan) on \w+)",
                     text)  # fmt: skip
        if m:
            found.append(m[1])
        elif text.startswith(("SEARCH", "SCAN")):
            found.append(text)
    return "; ".join(found) or "(no table access)"


async def bench(url: str, rows: list[tuple], owners: list[tuple], now: datetime, repeat: int) -> bool:
    """Fill the database, then measure; True when no plan read the ledger whole."""
    started = time.perf_counter()
    indexes = await make_schema(url)
    if url.startswith("sqlite"):
        await asyncio.to_thread(fill_sqlite, url.split("///", 1)[1], rows, owners, indexes)
    else:
        await fill_postgres(url, rows, owners, indexes)
    print(f"  {len(rows):,} calls and {len(owners):,} owners loaded, indexed and analyzed in"
          f" {time.perf_counter() - started:.1f} s", flush=True)  # fmt: skip
    per_owner = Counter(r[1] for r in rows)
    ranked = [o for o, _ in per_owner.most_common()]
    heavy, median = ranked[0], ranked[len(ranked) // 2]
    month = (stamp(now - timedelta(days=31)), stamp(now))  # a month of calls, whatever today's date
    in_month = Counter(r[1] for r in rows if month[0] <= r[21] < month[1])
    print(f"  heavy owner {heavy}: {per_owner[heavy]:,} calls, {in_month[heavy]:,} in the last 31 days", flush=True)
    print(f"  median owner {median}: {per_owner[median]:,} calls, {in_month[median]:,} in the last 31 days", flush=True)
    runner = Bench(url, repeat)
    await runner.open()
    try:
        await runner.run({"heavy": heavy, "median": median}, month, in_month)
    finally:
        await runner.close()
    print(f"\n  {'operation':<20} {'owner':<8} {'reads':<22} {'p50 ms':>9} {'max ms':>9}  plan")
    for op, owner, what, p50, worst, plan in runner.table:
        print(f"  {op:<20} {owner:<8} {what:<22} {p50:9.3f} {worst:9.3f}  {plan}")
    print("\n  plans:")
    for key, plan in runner.plans.items():
        print(f"  {key}")
        for line in plan:
            print(f"      {line}")
    for key in runner.scans:
        print(f"  READS THE WHOLE LEDGER: {key}")
    return not runner.scans


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="calls in the scratch ledger")
    parser.add_argument("--repeat", type=int, default=20, help="runs of each operation timed")
    parser.add_argument("--only", choices=("sqlite", "postgresql"), help="one database (default: both)")
    parser.add_argument("--postgres", default=os.environ.get("CHATSVC_TEST_POSTGRES",
                                                             "postgresql://postgres@127.0.0.1/postgres"),
                        help="a PostgreSQL server's URL: a scratch database is made on it, and dropped")  # fmt: skip
    args = parser.parse_args()
    now = datetime.now(timezone.utc)
    started = time.perf_counter()
    rows = sorted(ledger_rows(args.rows, now))  # stored in time order, as the ledger grows: ids start with their time
    owners = owner_rows(rows, now)
    print(f"{len(rows):,} calls of {len(owners)} owners made in {time.perf_counter() - started:.1f} s", flush=True)
    ok = True
    with tempfile.TemporaryDirectory(prefix="chatsvc-usage-") as workdir:
        if args.only in (None, "sqlite"):
            print("\nSQLite", sqlite3.sqlite_version)
            ok &= asyncio.run(bench(f"sqlite+aiosqlite:///{workdir}/usage.db", rows, owners, now, args.repeat))
        if args.only in (None, "postgresql"):
            name = f"chatsvc_usage_bench_{uuid.uuid4().hex[:8]}"
            pg_admin(args.postgres, f"CREATE DATABASE {name}")
            try:
                print(f"\nPostgreSQL (scratch database {name})")
                url = args.postgres.rsplit("/", 1)[0] + f"/{name}"
                ok &= asyncio.run(bench(url, rows, owners, now, args.repeat))
            finally:
                pg_admin(args.postgres, f"DROP DATABASE {name} WITH (FORCE)")
    print("\nno plan reads the whole ledger" if ok else "\nFAILED: a plan reads the whole ledger (above)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
