"""Smoke test of an installed chatsvc: run the given start command from the current directory
(not the checkout), then check /healthz, one chat against the fake DashScope, the pages (the
playground and the API docs, with their files), and a clean exit on SIGTERM. Used by .ci/run
after installing the built wheel into a fresh venv.

    python tests/smoke_installed.py chatsvc
    python tests/smoke_installed.py uvicorn chatsvc:app --port {port}
    python tests/smoke_installed.py --dockerfile Dockerfile

With --dockerfile, the command is the image's CMD, run with the image's ENV (its /data volume
mapped to ./data), and the image's HEALTHCHECK command must pass against it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
import urllib.request
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fake_dashscope import FakeDashScope


def request(url: str, body: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status, json.loads(r.read())


def tiny_png() -> bytes:
    """A 2 by 1 PNG, made without Pillow."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 2, 1, 8, 2, 0, 0, 0)  # 8-bit RGB
    pixels = zlib.compress(b"\x00" + b"\xff\x00\x00" * 2)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def dockerfile_instructions(path: str) -> dict[str, str]:
    """The last CMD, HEALTHCHECK and ENV instructions of a Dockerfile (line continuations joined)."""
    text = re.sub(r"\\\n\s*", " ", Path(path).read_text())
    found = {}
    for line in text.splitlines():
        word, _, rest = line.strip().partition(" ")
        if word in ("CMD", "HEALTHCHECK", "ENV"):
            found[word] = rest.strip()
    return found


def main(argv: list[str]) -> int:
    fake = FakeDashScope().start()
    port = 18000 + os.getpid() % 1000
    env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(port), "DASHSCOPE_API_KEY": "sk-smoke",
           "DASHSCOPE_BASE_URL": fake.url}  # fmt: skip
    env.pop("DATABASE_URL", None)  # the default: a SQLite file in the working directory
    database = Path("chatsvc.db")
    healthcheck = None
    if argv[0] == "--dockerfile":
        image = dockerfile_instructions(argv[1])
        command = json.loads(image["CMD"])
        healthcheck = json.loads(image["HEALTHCHECK"].split(" CMD ", 1)[1])
        for name, value in re.findall(r"(\w+)=(\S+)", image["ENV"]):
            if name not in ("HOST", "PORT"):  # loopback and a free port here
                env[name] = value.replace("/data/", f"{Path.cwd()}/data/")
        Path("data").mkdir(exist_ok=True)
        database = Path("data/chatsvc.db")
    else:
        command = argv
    command = [arg.replace("{port}", str(port)) for arg in command]
    server = subprocess.Popen(command, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                assert request(f"{base}/healthz") == (200, {"status": "ok"})
                break
            except OSError:
                assert server.poll() is None, f"{command} exited with {server.returncode}"
                assert time.monotonic() < deadline, "chatsvc did not answer /healthz within 20 s"
                time.sleep(0.2)
        status, body = request(f"{base}/api/v1/chat/smoke", {"message": "Who are you?"})
        assert status == 200 and body["response"].startswith("I am a large-scale language model"), body
        assert database.is_file(), f"the database is {database}"
        for path, holds in (("/", b"chat_client.js"), ("/playground/chat_client.js", b"class ChatClient"),
                            ("/playground/playground.js", b"ChatClient"), ("/docs", b"swagger-ui-bundle.js"),
                            ("/docs/static/swagger-ui-bundle.js", b"SwaggerUIBundle"),
                            ("/docs/static/chatsvc-docs.js", b"SwaggerUIBundle")):  # fmt: skip
            with urllib.request.urlopen(base + path, timeout=10) as r:
                assert r.status == 200 and holds in r.read(), path
        print("smoke: the playground and the API docs are served, with their files")
        upload = urllib.request.Request(f"{base}/api/v1/files?name=dot.png", data=tiny_png(), method="POST",
                                        headers={"Content-Type": "image/png"})  # fmt: skip
        with urllib.request.urlopen(upload, timeout=30) as r:  # read in a worker process of the installed module
            file = json.loads(r.read())
            assert r.status == 201 and (file["kind"], file["width"], file["height"]) == ("image", 2, 1), file
        print("smoke: an image upload was examined by the installed chatsvc's worker process")
        if healthcheck:
            subprocess.run(healthcheck, env=env, check=True, timeout=10)
            print(f"smoke: the image's HEALTHCHECK passed: {healthcheck[:2]}")
        print(f"smoke: {' '.join(command)} served /healthz and a chat from {os.getcwd()}")
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(20)
        fake.stop()
    # `chatsvc` exits 0 after a graceful shutdown; plain uvicorn re-raises the signal (-15).
    clean = code == 0 or (Path(command[0]).name != "chatsvc" and code == -signal.SIGTERM)
    assert clean, f"exit code {code} after SIGTERM"
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["chatsvc"]))
