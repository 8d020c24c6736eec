"""Makes tests/releases/v1.db and v1.json: a database written by the first release (schema
version 1, commit 739ab2b) through its own HTTP API, and what that API answered for each
conversation. The upgrade tests start today's chatsvc on a copy and compare.

Run from the checkout (needs git history): python tests/releases/make_v1.py
It is kept to say how the files were made; the tests use the committed files."""

from __future__ import annotations

import json
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path[:0] = [str(ROOT / "tests")]

from fake_dashscope import FakeDashScope, Reply  # noqa: E402
from procs import ServerProcess  # noqa: E402

RELEASE = "739ab2b"


def main() -> None:
    work = Path(tempfile.mkdtemp())
    code = work / "code"
    (code / "docs").mkdir(parents=True)
    for name in ("chatsvc.py", "schema.sql", "docs/openapi.json"):
        (code / name).write_bytes(subprocess.check_output(["git", "show", f"{RELEASE}:{name}"], cwd=ROOT))
    fake = FakeDashScope().start()
    db = work / "v1.db"
    env = {"DASHSCOPE_API_KEY": "sk-test-key", "DASHSCOPE_BASE_URL": fake.url, "DATABASE_URL": f"sqlite:///{db}",
           "CHATSVC_UPSTREAM_RETRIES": "0", "CHATSVC_USER_HEADER": "X-User-Id",
           "CHATSVC_CHECKPOINT_SECONDS": "0.1"}  # fmt: skip
    server = ServerProcess(env, work)
    server.env["PYTHONPATH"] = str(code)
    import procs

    procs.ROOT = code  # the release's code, not today's
    server.start()
    alice, bob = {"X-User-Id": "alice"}, {"X-User-Id": "bob"}
    with server.client() as c:

        def chat(session, message, headers=alice, **body):
            r = c.post(f"/api/v1/chat/{session}", json={"message": message, **body}, headers=headers)
            assert r.status_code in (200, 422, 502), r.text

        # a plain conversation, several turns, one of them thinking
        fake.push(Reply.answer(["Hello", ", I am Qwen."]), Reply.answer(["4"], reasoning=["2+2", " is 4"]))
        chat("plain", "Who are you?")
        chat("plain", "2+2?", enable_thinking=True)
        chat("plain", "And 3+3?")
        # Chinese, a system prompt and a client-set title
        r = c.post("/api/v1/context/conversations", headers=alice,
                   json={"session_id": "zh", "system_prompt": "用中文回答。", "title": "我的标题"})  # fmt: skip
        assert r.status_code == 201, r.text
        fake.push(Reply.answer(["从前", "有座山"]))
        chat("zh", "讲个故事")
        chat("zh", "再讲一个 😀")
        # a failed answer, then a good one
        fake.push(Reply.error(500, "InternalError", "boom"))
        chat("failing", "first try")
        chat("failing", "second try")
        # a context clear (kept) and a purge
        chat("cleared", "before the clear")
        assert c.delete("/api/v1/context/conversations/cleared/context", headers=alice).status_code == 200
        chat("cleared", "after the clear")
        chat("purged", "gone soon")
        assert c.delete("/api/v1/context/conversations/purged/context?purge=true", headers=alice).status_code == 200
        chat("purged", "after the purge")
        # a stopped answer
        fake.push(Reply.answer(["slow "] * 200, pause=0.05))
        reader = subprocess.Popen(["curl", "-sN", "-X", "POST", "-H", "X-User-Id: alice", "-H",
                                   "Content-Type: application/json", "-d", '{"message": "stop me"}',
                                   f"{server.url}/api/v1/chat/stopped/stream"], stdout=subprocess.DEVNULL)  # fmt: skip
        time.sleep(0.5)
        assert c.post("/api/v1/chat/stopped/stop", headers=alice).json()["stopped"] is True
        reader.wait(10)
        # the same session id for another owner, and an empty conversation
        chat("plain", "bob's question", headers=bob)
        assert c.post("/api/v1/context/conversations", headers=bob, json={"session_id": "empty"}).status_code == 201
        expected = {}
        for owner, headers in (("alice", alice), ("bob", bob)):
            for conv in c.get("/api/v1/context/conversations", headers=headers).json()["conversations"]:
                sid = conv["session_id"]
                expected[f"{owner}/{sid}"] = c.get(f"/api/v1/context/conversations/{sid}", headers=headers).json()
        # an answer cut by a crash: its row is left `streaming`, with the text of its last checkpoint
        fake.push(Reply.answer(["cut "] * 400, pause=0.05))
        crash = subprocess.Popen(["curl", "-sN", "-X", "POST", "-H", "X-User-Id: alice", "-H",
                                  "Content-Type: application/json", "-d", '{"message": "crash here"}',
                                  f"{server.url}/api/v1/chat/crashed/stream"], stdout=subprocess.DEVNULL)  # fmt: skip
        time.sleep(1.0)
    server.signal(signal.SIGKILL)
    server.wait(10)
    crash.wait(10)
    fake.stop()
    with sqlite3.connect(db) as conn:  # the killed process's WAL into the file, as the next open would
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    shutil.copyfile(db, HERE / "v1.db")
    (HERE / "v1.json").write_text(json.dumps(expected, ensure_ascii=False, indent=1, sort_keys=True) + "\n")
    (HERE / "schema_v1.sql").write_bytes((code / "schema.sql").read_bytes())
    print(f"wrote {HERE / 'v1.db'}, v1.json ({len(expected)} conversations) and schema_v1.sql")


if __name__ == "__main__":
    main()
