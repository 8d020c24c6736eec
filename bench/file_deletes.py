"""How long deleting large files holds SQLite's one writer (issue 23, the store's fix 2).

    python bench/file_deletes.py                 # 40 files of 20 MiB, a 20 MiB discard and dedup finish
    python bench/file_deletes.py --files 10      # a quicker run

Through `chatsvc.Store` on a SQLite file in a temporary folder: stores --files files of --mib MiB,
makes them old and unreferenced, and runs the collector while another task writes a small row every
10 ms; prints the collector's wall time and the longest that small write waited (the write lock held
by one transaction). Then the same for `discard` of a staged --mib MiB upload and for a `finish`
that finds the same bytes already stored (its staged copy deleted).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]
import chatsvc  # noqa: E402

CHUNK = chatsvc.FILE_CHUNK_BYTES
FACTS = chatsvc.FileFacts("text/plain", "document", text="x")


async def staged(files: chatsvc.Files, data: bytes) -> str:
    file_id = await files.begin("", "big.bin", 0)
    for seq, start in enumerate(range(0, len(data), CHUNK)):
        await files.write(file_id, seq, data[start : start + CHUNK])
    return file_id


async def stored(files: chatsvc.Files, data: bytes) -> chatsvc.FileRow:
    file_id = await staged(files, data)
    row, _ = await files.finish(file_id, "", hashlib.sha256(data).hexdigest(), len(data), FACTS, 0)
    return row


async def measured(store: chatsvc.Store, work) -> tuple[float, float]:
    """(`work`'s wall time, the longest a one-row write waited meanwhile), in seconds."""
    await store.conversations.create("", "probe", None, None, None)
    done = asyncio.Event()
    longest = 0.0

    async def probe() -> None:
        nonlocal longest
        while not done.is_set():
            started = time.perf_counter()
            await store.conversations.update("", "probe", {"title": "t"})
            longest = max(longest, time.perf_counter() - started)
            await asyncio.sleep(0.01)

    prober = asyncio.ensure_future(probe())
    await asyncio.sleep(0.05)
    started = time.perf_counter()
    await work()
    wall = time.perf_counter() - started
    done.set()
    await prober
    return wall, longest


async def main(count: int, mib: int) -> None:
    size = mib * 1048576
    with tempfile.TemporaryDirectory() as folder:
        store = chatsvc.Store(f"sqlite:///{folder}/bench.db", exclusive=True)
        await store.open()
        try:
            for _ in range(count):
                await stored(store.files, os.urandom(size))
            await store.db.execute("UPDATE files SET last_used_at = '2000-01-01T00:00:00.000Z'")
            collected = 0

            async def collect() -> None:
                nonlocal collected
                collected = await store.files.collect(3600)

            wall, longest = await measured(store, collect)
            print(f"collect {collected} x {mib} MiB: {wall:.2f} s, longest wait of another write {longest:.3f} s")

            file_id = await staged(store.files, os.urandom(size))
            wall, longest = await measured(store, lambda: store.files.discard(file_id))
            print(f"discard {mib} MiB: {wall:.2f} s, longest wait of another write {longest:.3f} s")

            data = os.urandom(size)
            await stored(store.files, data)
            file_id = await staged(store.files, data)
            sha = hashlib.sha256(data).hexdigest()
            wall, longest = await measured(store, lambda: store.files.finish(file_id, "", sha, size, FACTS, 0))
            print(f"finish (dedup) {mib} MiB: {wall:.2f} s, longest wait of another write {longest:.3f} s")
            left = await store.db.fetch_one("SELECT COUNT(*) AS n FROM file_chunks")
            print(f"chunks left: {left['n']} (the one stored file's: {size // CHUNK})")
        finally:
            await store.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=40)
    parser.add_argument("--mib", type=int, default=20)
    args = parser.parse_args()
    asyncio.run(main(args.files, args.mib))
