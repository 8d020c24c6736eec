"""Checks against the running image (.ci/container builds it with podman): health and the image's own
HEALTHCHECK, a user that is not root, the database in the volume and still there after the container
is replaced, `chatsvc --check` inside, a plain `stop` (SIGTERM, default timeout) with an answer
streaming exits 0 with the answer stored, and a root-owned folder as /data refused in one sentence.

    PODMAN="podman --root /var/lib/containers/chatsvc-ci/overlay --runroot /run/containers/chatsvc-ci-overlay \\
        --storage-driver overlay --runtime runc" python3 tests/container_check.py IMAGE
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fake_dashscope import FakeDashScope, Reply

PODMAN = shlex.split(os.environ.get("PODMAN", "podman"))
LIMITS = ["--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096"]


def podman(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    out = subprocess.run([*PODMAN, *args], capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} exited {out.returncode}: {out.stderr.strip()}")
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(url: str, body: dict | None = None, method: str | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status, json.loads(r.read())


class Container:
    """One run of the image on the host's network (it reaches the fake upstream on 127.0.0.1)."""

    def __init__(self, image: str, volume: str, fake: FakeDashScope, name: str) -> None:
        self.port = free_port()
        self.name = name
        self.base = f"http://127.0.0.1:{self.port}"
        env = {"PORT": str(self.port), "DASHSCOPE_API_KEY": "sk-container", "DASHSCOPE_BASE_URL": fake.url}
        flags = [f"--env={k}={v}" for k, v in env.items()]
        podman("run", "-d", "--name", name, "--network", "host", *LIMITS, *flags, "-v", f"{volume}:/data", image)

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + 60
        while True:
            try:
                assert request(f"{self.base}/healthz") == (200, {"status": "ok"})
                return
            except OSError:
                state = podman("inspect", self.name, "--format", "{{.State.Status}}").stdout.strip()
                assert state == "running", f"the container is {state}: {podman('logs', self.name).stderr[-2000:]}"
                assert time.monotonic() < deadline, "no /healthz within 60 s"
                time.sleep(0.3)

    def remove(self) -> None:
        podman("rm", "-f", self.name, check=False)


def main(image: str) -> int:
    fake = FakeDashScope().start()
    volume = f"chatsvc-ci-{os.getpid()}"
    podman("volume", "create", volume)
    containers: list[Container] = []
    try:
        first = Container(image, volume, fake, f"{volume}-a")
        containers.append(first)
        first.wait_healthy()
        print("container: /healthz answers")
        inspected = json.loads(podman("image", "inspect", image).stdout)[0]  # podman: at the top; docker: in Config
        config = inspected.get("Healthcheck") or inspected["Config"].get("Healthcheck") or {}
        healthcheck = config.get("Test")
        assert healthcheck and healthcheck[0] == "CMD", (
            f"the image has no HEALTHCHECK (built --format docker?): {config}"
        )
        podman("exec", first.name, *healthcheck[1:])
        print(f"container: the HEALTHCHECK command passes: {' '.join(healthcheck[1:3])} …")
        uid = podman("exec", first.name, "id", "-u").stdout.strip()
        assert uid != "0", "the container runs as root"
        print(f"container: runs as uid {uid}")
        check = podman("exec", first.name, "chatsvc", "--check")
        assert "OK" in check.stdout, check
        print("container: chatsvc --check inside: " + check.stdout.strip())

        status, body = request(f"{first.base}/api/v1/chat/kept", {"message": "Who are you?"})
        assert status == 200 and body["response"], body
        listing = podman("exec", first.name, "ls", "/data").stdout.split()
        assert "chatsvc.db" in listing, listing

        # SIGTERM with an answer streaming that outlasts the grace (CHATSVC_SHUTDOWN_GRACE): a plain stop
        # (default timeout 10 s) still ends in exit 0, not SIGKILL (137), and the answer's text is stored.
        release = threading.Event()  # set only after the stop: the model never finishes in time
        fake.push(Reply.answer(["slow ", "but ", "whole"], hold=release, hold_at=2))
        streamed: list[bytes] = []

        def stream() -> None:
            req = urllib.request.Request(
                f"{first.base}/api/v1/chat/draining/stream",
                data=json.dumps({"message": "Take your time"}).encode(),
                headers={"Content-Type": "application/json"},
            )
            try:
                with urllib.request.urlopen(req, timeout=30) as r:
                    for line in r:
                        streamed.append(line)
            except OSError:
                pass

        reader = threading.Thread(target=stream)
        reader.start()
        deadline = time.monotonic() + 20
        while not any(b"slow" in line for line in streamed):
            assert time.monotonic() < deadline, f"no first chunk: {streamed}"
            time.sleep(0.05)
        started = time.monotonic()
        stop = podman("stop", first.name, timeout=30)  # no -t: the default timeout
        took = time.monotonic() - started
        release.set()
        reader.join(30)
        code = podman("inspect", first.name, "--format", "{{.State.ExitCode}}").stdout.strip()
        logs = podman("logs", first.name).stderr
        assert code == "0", f"podman stop: exit code {code} after {took:.1f} s ({stop.stderr}): {logs[-2000:]}"
        assert "SIGTERM: draining 1 running answer(s)" in logs, logs[-2000:]
        print(f"container: a plain stop with an answer streaming past the grace exited 0 in {took:.1f} s")
        first.remove()

        second = Container(image, volume, fake, f"{volume}-b")
        containers.append(second)
        second.wait_healthy()
        _, kept = request(f"{second.base}/api/v1/context/conversations/kept/messages")
        assert [m["role"] for m in kept["messages"]] == ["user", "assistant"], kept
        _, drained = request(f"{second.base}/api/v1/context/conversations/draining/messages")
        answer = drained["messages"][-1]
        assert answer["role"] == "assistant" and answer["content"] == "slow ", drained
        assert answer["status"] == "interrupted", drained
        print("container: a new container on the same volume reads both conversations, the drained answer's text")
        docs = podman(
            "exec",
            second.name,
            "python",
            "-c",
            "import chatsvc; print(*sorted(p.name for p in chatsvc.swagger_ui_assets().iterdir()));"
            " print(*sorted(chatsvc.DOCS_FILES | {'LICENSE'}))",
        )
        # The Dockerfile prunes Swagger UI's files with a list of its own (in the dependencies' stage,
        # before chatsvc is there): it must keep exactly chatsvc.DOCS_FILES and the LICENSE.
        kept, wanted = docs.stdout.splitlines()
        assert (
            kept.split() == wanted.split() == ["LICENSE", "favicon-32x32.png", "swagger-ui-bundle.js", "swagger-ui.css"]
        ), docs.stdout
        for path in (
            "/docs",
            "/docs/static/swagger-ui-bundle.js",
            "/docs/static/swagger-ui.css",
            "/docs/static/chatsvc-docs.js",
        ):
            with urllib.request.urlopen(second.base + path, timeout=10) as r:
                assert r.status == 200 and r.read(), path
        print("container: /docs served from Swagger UI's files, the only ones kept: " + kept)
        second.remove()

        # A host folder owned by root as /data: refused in one sentence, not a traceback.
        with tempfile.TemporaryDirectory() as folder:
            os.chmod(folder, 0o755)
            out = podman("run", "--rm", "--network", "host", *LIMITS, "-v", f"{folder}:/data", image, check=False)
            assert out.returncode == 2, out
            assert "chown 10001:10001" in out.stderr and "Traceback" not in out.stderr, out.stderr
            print("container: a root-owned /data: " + out.stderr.strip().splitlines()[-1])
    finally:
        for container in containers:
            container.remove()
        podman("volume", "rm", "-f", volume, check=False)
        fake.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
