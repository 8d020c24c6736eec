"""What files cost (issue 23, design 2.15), measured on a real chatsvc process against the fake model.

    python bench/files.py                 # SQLite (a temporary file), a couple of minutes on 2 cores
    python bench/files.py --quick         # 5 MiB files and fewer turns, for a smoke run
    python bench/files.py --database postgresql://postgres@127.0.0.1/chatsvc_bench   # an empty database

Prints:
1. upload throughput: 1, 5 and 20 concurrent clients, each uploading its own 20 MiB JPEG (24 MP of
   grain, which compresses like the worst photo, padded with comments; random bytes would be refused:
   files are checked by their bytes), once as a raw body (`?name=`) and once as multipart/form-data;
   then 1 and 20 clients each uploading a 20 MiB text document (random words; the bench raises
   CHATSVC_MAX_DOCUMENT_CHARS to let it in: the default, 2,000,000, refuses it). MiB/s over the whole
   round, the slowest upload, and chatsvc's RSS meanwhile (sampled from /proc/<pid>/status every 10 ms:
   peak minus the idle RSS measured just before the round). The 20-client rows are the memory check:
   the target is a peak under 100 MiB above idle (not 20 x 20 MiB); each way of uploading starts a
   new chatsvc, warmed up, whose first round is that one (a round after others would find the heap
   they grew and hide its own growth). A last photo row sends 20 copies of a file already stored:
   streamed, hashed and written like the others but not examined (a dedup hit), which separates what
   the streaming costs from what examining costs. Every upload's answer is checked
   (201, its size and sha256); the files are deleted after each round, so the database does not grow
   from round to round.
2. the upload time of a 10-page text PDF and of a 40-megapixel JPEG (checks, extraction, the model
   copy: the 40 MP photo is scaled down once, at upload);
3. what a turn with that PDF and two images (the 40 MP photo's model copy and a small PNG) adds
   before the first chunk, against the same text turn: --turns of each, alternating, every turn in
   a new conversation (CHATSVC_MAX_CONTEXT_TOKENS=32000: the PDF's text is ~13,000 tokens); the fake
   answers at once, so the difference is chatsvc's (reading the files' text and model copies,
   building the image parts) plus sending the larger request to the fake.

Loopback only; every request has a deadline. The load generator is this process (asyncio, raw
HTTP/1.1 with the body written in 1 MiB pieces, so it holds one random buffer, not one per client).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import httpx2 as httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from fake_dashscope import FakeDashScope, Reply  # noqa: E402
from procs import ServerProcess  # noqa: E402

MiB = 1024 * 1024
USER = "X-User"
VISION = "qwen3-vl-plus"


# ── the load generator: one upload on its own connection, the body written piece by piece ──


async def upload(port: int, owner: str, name: str, prefix: bytes, data: bytes, multipart: bool) -> tuple[int, dict]:
    """POST /api/v1/files with `prefix + data` as the file (raw or multipart); (status, answer)."""
    body_pieces = [prefix, *(memoryview(data)[k : k + MiB] for k in range(0, len(data), MiB))]
    if multipart:
        boundary = "bench" + os.urandom(8).hex()
        head = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n").encode()  # fmt: skip
        body_pieces = [head, *body_pieces, f"\r\n--{boundary}--\r\n".encode()]
        path, media_type = "/api/v1/files", f"multipart/form-data; boundary={boundary}"
    else:
        path, media_type = f"/api/v1/files?name={name}", "application/octet-stream"
    length = sum(len(p) for p in body_pieces)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n{USER}: {owner}\r\n"
                f"Content-Type: {media_type}\r\nContent-Length: {length}\r\n\r\n")  # fmt: skip
        writer.write(head.encode())
        for piece in body_pieces:
            writer.write(piece)
            await writer.drain()
        raw = await reader.read()
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head.lower():
        body = dechunk(body)
    return int(head.split()[1]), json.loads(body or b"{}")


def dechunk(body: bytes) -> bytes:
    out, rest = [], body
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out.append(rest[:size])
        rest = rest[size + 2 :]
    return b"".join(out)


class RssSampler:
    """chatsvc's resident set size, read from /proc/<pid>/status every 10 ms on a thread."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            self._stop.wait(0.01)

    def __enter__(self) -> RssSampler:
        self.idle = self.rss()
        self.peak = self.idle
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
        self.peak = max(self.peak, self.rss())


async def upload_round(
    port: int, names: list[str], prefixes: list[bytes], data: bytes, multipart: bool, owner: str | None = None
) -> list:
    """One upload per prefix, all at once (each by its own owner, or all by `owner`): (seconds, status,
    answer) of each."""

    async def one(k: int) -> tuple[float, int, dict]:
        started = time.perf_counter()
        status, answer = await upload(port, owner or f"owner{k}", names[k], prefixes[k], data, multipart)
        return time.perf_counter() - started, status, answer

    return await asyncio.wait_for(asyncio.gather(*(one(k) for k in range(len(prefixes)))), 600)


class TextFiles:
    """Text documents: random lowercase words and lines (random bytes are refused, 415: files are
    checked by their bytes), each upload's first 16 bytes its own, so no two are the same file."""

    label, extension = "text", "txt"

    def __init__(self, size: int):
        alphabet = (b"abcdefghijklmnopqrstuvwxyz" * 10)[:253] + b"  \n"
        self.size, self.data = size, os.urandom(size - 16).translate(alphabet)

    def prefix(self) -> bytes:
        return os.urandom(8).hex().encode()


class PhotoFiles:
    """JPEG photos of 6000 x 4000 pixels of grain (24 MP, which compresses like the worst photo), padded
    to `size` with comment segments; each upload's comment right after the start marker is its own."""

    label, extension = "jpeg", "jpg"

    def __init__(self, size: int):
        from PIL import Image

        out = io.BytesIO()
        Image.merge("RGB", [Image.effect_noise((6000, 4000), 64) for _ in range(3)]).save(out, "JPEG", quality=88)
        jpeg = out.getvalue()
        padding = size - (len(jpeg) - 2) - len(self.prefix())  # (its start marker is in the prefix)
        assert padding >= 0, f"the photo is {len(jpeg)} bytes, more than {size}"
        comments = []
        while padding:
            take = min(padding, 65533 + 2)  # a segment: its marker (2 bytes), then a length that counts itself
            if 0 < padding - take < 4:  # (the last segment needs 4 bytes at least)
                take -= 4
            comments.append(b"\xff\xfe" + (take - 2).to_bytes(2, "big") + b" " * (take - 4))
            padding -= take
        self.size, self.data = size, b"".join(comments) + jpeg[2:]

    def prefix(self) -> bytes:
        return b"\xff\xd8\xff\xfe\x00\x12" + os.urandom(16)  # the start of the image, then a comment of 16 bytes


def fresh_server(env: dict[str, str], workdir: Path) -> ServerProcess:
    """chatsvc started anew and warmed up (one small image and one small text uploaded and deleted, so
    Pillow and the extraction worker are loaded): what it holds then is the idle RSS of a round."""
    server = ServerProcess(env, workdir).start()
    with httpx.Client(base_url=server.url, timeout=60, headers={USER: "warm"}) as client:
        for name, media_type, data in (("w.png", "image/png", small_png()), ("w.txt", "text/plain", b"warm up")):
            r = client.post("/api/v1/files", params={"name": name}, content=data, headers={"Content-Type": media_type})
            assert r.status_code == 201, r.text
            assert client.delete(f"/api/v1/files/{r.json()['id']}").status_code == 204
    return server


def throughput(env: dict[str, str], workdir: Path, files: TextFiles | PhotoFiles, rounds: tuple[int, ...]) -> list:
    """Each way of uploading on a chatsvc of its own, its first round (20 clients: the memory check) on
    a process no earlier round has grown (an allocator keeps what it once held, which would hide it)."""
    rows = []
    for multipart in (False, True):
        server = fresh_server(env, workdir)
        try:
            for clients in rounds:
                rows.append(upload_row(server, files, multipart, clients))
        finally:
            server.stop()
    return rows


def deduplicated_row(env: dict[str, str], workdir: Path, files: PhotoFiles) -> dict:
    """20 uploads at once of a photo their owner already stores: each is streamed, hashed and written
    like any upload, then found to be a copy (200, the same id) without being examined. What the
    streaming costs alone, on a new chatsvc."""
    server = fresh_server(env, workdir)
    try:
        prefix = files.prefix()
        first, _ = asyncio.run(upload_round(server.port, ["same.jpg"], [prefix], files.data, False, "same"))[0][1:]
        assert first == 201
        with RssSampler(server.proc.pid) as memory:
            started = time.perf_counter()
            results = asyncio.run(
                upload_round(server.port, ["same.jpg"] * 20, [prefix] * 20, files.data, False, "same")
            )
            wall = time.perf_counter() - started
    finally:
        server.stop()
    assert [status for _, status, _ in results] == [200] * 20, results
    grown = (memory.peak - memory.idle) / MiB
    print(f"  jpeg raw       20 x {files.size // MiB} MiB, all copies of a stored file (not examined):"
          f" {20 * files.size / MiB / wall:6.1f} MiB/s (round {wall:5.2f} s);"
          f" RSS idle {memory.idle / MiB:5.0f} MiB, peak - idle {grown:5.1f} MiB", flush=True)  # fmt: skip
    return dict(files="copies", kind="raw", clients=20, grown=grown)


def upload_row(server: ServerProcess, files: TextFiles | PhotoFiles, multipart: bool, clients: int) -> dict:
    size = files.size
    prefixes = [files.prefix() for _ in range(clients)]
    names = [f"f{k}.{files.extension}" for k in range(clients)]
    with RssSampler(server.proc.pid) as memory:
        started = time.perf_counter()
        results = asyncio.run(upload_round(server.port, names, prefixes, files.data, multipart))
        wall = time.perf_counter() - started
    for k, (_, status, answer) in enumerate(results):
        assert status == 201, (status, answer)
        assert answer["size"] == size, answer
        assert answer["sha256"] == hashlib.sha256(prefixes[k] + files.data).hexdigest(), answer
    with httpx.Client(base_url=server.url, timeout=60) as client:  # the next round starts from the same database
        for k, (_, _, answer) in enumerate(results):
            r = client.delete(f"/api/v1/files/{answer['id']}", headers={USER: f"owner{k}"})
            assert r.status_code == 204, r.text
    row = dict(files=files.label, kind="multipart" if multipart else "raw", clients=clients, wall=wall,
               slowest=max(t for t, _, _ in results), mib_s=clients * size / MiB / wall,
               idle=memory.idle / MiB, grown=(memory.peak - memory.idle) / MiB)  # fmt: skip
    print(f"  {files.label:4} {row['kind']:9} {clients:2} x {size // MiB} MiB: {row['mib_s']:6.1f} MiB/s"
          f" (round {wall:5.2f} s, slowest upload {row['slowest']:5.2f} s);"
          f" RSS idle {row['idle']:5.0f} MiB, peak - idle {row['grown']:5.1f} MiB", flush=True)  # fmt: skip
    return row


# ── the files of a turn ──


def text_pdf(pages: int) -> bytes:
    """A PDF of `pages` pages of text (Helvetica), written by hand with a correct xref table."""
    line = "The river rose past the old stone bridge and the town gathered on the hill to watch. "
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", None, b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    kids = []
    for page in range(pages):
        text = "".join(f"BT /F1 10 Tf 40 {760 - 14 * k} Td (Page {page + 1} line {k + 1}: {line[:70]}) Tj ET\n"
                       for k in range(50)).encode()  # fmt: skip
        stream = zlib.compress(text)
        objects.append(b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(stream) + stream + b"\nendstream")
        content = len(objects)
        objects.append(b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >>"
                       b" /Contents %d 0 R >>" % content)  # fmt: skip
        kids.append(len(objects))
    objects[1] = b"<< /Type /Pages /Kids [%s] /Count %d >>" % (b" ".join(b"%d 0 R" % k for k in kids), pages)
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def photo(width: int, height: int) -> bytes:
    """A photo-like JPEG: gradients and grain (compresses like a photo, not like a flat colour)."""
    from PIL import Image

    grain = Image.effect_noise((width // 4, height // 4), 40).resize((width, height))
    red = Image.linear_gradient("L").resize((width, height))
    blue = Image.radial_gradient("L").resize((width, height))
    out = io.BytesIO()
    Image.merge("RGB", (red, grain, blue)).save(out, "JPEG", quality=88)
    return out.getvalue()


def small_png() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (320, 240), (200, 40, 40)).save(out, "PNG")
    return out.getvalue()


def timed_upload(client: httpx.Client, name: str, media_type: str, data: bytes) -> tuple[dict, float]:
    started = time.perf_counter()
    r = client.post("/api/v1/files", params={"name": name}, content=data, headers={"Content-Type": media_type})
    took = time.perf_counter() - started
    assert r.status_code in (200, 201), r.text
    return r.json(), took


def first_chunk(client: httpx.Client, session_id: str, body: dict) -> float:
    """Seconds from sending a turn to its first `chunk` event (the answer read to its end)."""
    started, at = time.perf_counter(), None
    with client.stream("POST", f"/api/v1/chat/{session_id}/stream", json=body) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if at is None and line.startswith("data: ") and json.loads(line[6:])["type"] == "chunk":
                at = time.perf_counter() - started
    assert at is not None, "no chunk"
    return at


def turns(server: ServerProcess, fake: FakeDashScope, count: int) -> None:
    headers = {USER: "turns"}
    with httpx.Client(base_url=server.url, timeout=120, headers=headers) as client:
        pdf, jpeg = text_pdf(10), photo(7728, 5152)
        document, pdf_s = timed_upload(client, "report.pdf", "application/pdf", pdf)
        big, jpeg_s = timed_upload(client, "photo.jpg", "image/jpeg", jpeg)
        small, _ = timed_upload(client, "chart.png", "image/png", small_png())
        print(f"  10-page PDF ({len(pdf) / 1e3:.0f} kB, {document.get('text_chars')} characters): uploaded in"
              f" {pdf_s * 1e3:.0f} ms")  # fmt: skip
        print(f"  40 MP JPEG (7728x5152, {len(jpeg) / MiB:.1f} MiB): uploaded in {jpeg_s * 1e3:.0f} ms")
        files = [document["id"], big["id"], small["id"]]
        text = "What do the report and these two pictures say about the flood?"
        plain, with_files, sent = [], [], []
        for k in range(count + 2):  # the first pair warms up (connections, caches), not counted
            fake.requests.clear()
            t_plain = first_chunk(client, f"plain-{k}", {"message": text})
            t_files = first_chunk(client, f"files-{k}", {"message": text, "files": files})
            if k >= 2:
                plain.append(t_plain)
                with_files.append(t_files)
            sent.append(len(json.dumps(fake.requests[-1].body)))
        extra = [b - a for a, b in zip(plain, with_files, strict=True)]
        print(f"  {count} turns each, time to first chunk (median / p90):"
              f" text {statistics.median(plain) * 1e3:.1f} / {pct(plain, 0.9) * 1e3:.1f} ms,"
              f" PDF + 2 images {statistics.median(with_files) * 1e3:.1f} / {pct(with_files, 0.9) * 1e3:.1f} ms;"
              f" added: median {statistics.median(extra) * 1e3:.1f} ms (pairwise),"
              f" ratio {statistics.median(with_files) / statistics.median(plain):.2f};"
              f" the request to the model grew to {sent[-1] / 1e3:.0f} kB")  # fmt: skip


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database", metavar="URL", help="chatsvc's DATABASE_URL, e.g. an empty PostgreSQL database")
    parser.add_argument("--quick", action="store_true", help="5 MiB uploads and 10 turns, for a smoke run")
    parser.add_argument("--turns", type=int, default=None, help="turns of each kind in 3 (default 40; 10 with --quick)")
    args = parser.parse_args()
    size = (5 if args.quick else 20) * MiB
    count = args.turns or (10 if args.quick else 40)
    fake = FakeDashScope().start()
    fake.default = Reply.answer(["The ", "flood ", "came ", "on ", "Tuesday."])
    with tempfile.TemporaryDirectory() as tmp:
        database = args.database or f"sqlite+aiosqlite:///{tmp}/bench.db"
        env = {"DASHSCOPE_API_KEY": "sk-bench", "DASHSCOPE_BASE_URL": fake.url, "DATABASE_URL": database,
               "CHATSVC_USER_HEADER": USER, "CHATSVC_TITLES": "first-line", "LOG_LEVEL": "warning",
               "CHATSVC_VISION_MODEL": VISION, "CHATSVC_MAX_FILE_BYTES": str(max(size, 20 * MiB)),
               "CHATSVC_MAX_DOCUMENT_CHARS": str(max(size, 20 * MiB)),
               "CHATSVC_MAX_CONTEXT_TOKENS": "32000",  # the PDF's text (~13,000 tokens) fits
               "CHATSVC_MAX_STORAGE_BYTES_PER_USER": "0"}  # fmt: skip
        kind = "PostgreSQL" if database.startswith("postgres") else "SQLite"
        print(f"chatsvc on {kind}; {os.cpu_count()} cores")
        print("1. uploads")
        try:
            photos = PhotoFiles(size)
            rows = throughput(env, Path(tmp), photos, (20, 5, 1))
            rows.append(deduplicated_row(env, Path(tmp), photos))
            rows += throughput(env, Path(tmp), TextFiles(size), (20, 1))
            for label in ("jpeg", "copies", "text"):
                worst = max(r["grown"] for r in rows if r["clients"] == 20 and r["files"] == label)
                print(f"  memory with 20 uploads of {label} in flight: peak - idle at most {worst:.1f} MiB"
                      f" (target < 100 MiB): {'PASS' if worst < 100 else 'FAIL'}")  # fmt: skip
            print("2./3. a turn with a 10-page PDF and two images")
            server = ServerProcess(env, Path(tmp)).start()
            try:
                turns(server, fake, count)
            finally:
                server.stop()
        finally:
            fake.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
