"""Cost of one SQLite statement through `databases`' query path against the same long-lived
connection's aiosqlite handle (what chatsvc's Database uses), one at a time and 500 in flight.

    python bench/store.py
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import chatsvc

N = 500


async def timed(label: str, make, concurrent: bool = False) -> None:
    started = time.perf_counter()
    if concurrent:
        await asyncio.gather(*(make() for _ in range(N)))
    else:
        for _ in range(N):
            await make()
    print(f"{label:<48} {(time.perf_counter() - started) / N * 1000:7.3f} ms/statement")


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = chatsvc.Store(f"sqlite+aiosqlite:///{tmp}/bench.db")
        await store.open()
        conn, raw = store.db._conns[0], store.db._raw[chatsvc.READ]  # the read connection, both ways
        sql = chatsvc._CONVERSATION_SQL + " AND c.session_id = :sid"
        values = {"owner": "", "sid": "c1"}
        await timed("databases connection.fetch_all, sequential", lambda: conn.fetch_all(sql, values))
        await timed("aiosqlite execute_fetchall, sequential", lambda: raw.execute_fetchall(sql, values))
        await timed("databases connection.fetch_all, 500 in flight", lambda: conn.fetch_all(sql, values), True)
        await timed("aiosqlite execute_fetchall, 500 in flight", lambda: raw.execute_fetchall(sql, values), True)
        await store.close()


if __name__ == "__main__":
    asyncio.run(main())
