"""Makes tests/releases/v6.db and v6.json: a database written by the release before summaries,
continuations and web search (schema version 6, commit 6bcfc33) through its own HTTP API, and what
that API answered for each conversation (its current branch, and every message with `?tree=true`).
The upgrade tests start today's chatsvc on a copy (SQLite), or on the same rows put into that
release's schema (PostgreSQL, schema_v6.sql), and compare.

Run from the checkout (needs git history): python tests/releases/make_v6.py
It is kept to say how the files were made; the tests use the committed files."""

from __future__ import annotations

import io
import json
import shutil
import signal
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path[:0] = [str(ROOT / "tests")]

from fake_dashscope import FakeDashScope, Reply  # noqa: E402
from procs import ServerProcess  # noqa: E402

RELEASE = "6bcfc33"
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
CONV = "/api/v1/context/conversations"


def png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(out, "PNG")
    return out.getvalue()


def main() -> None:
    work = Path(tempfile.mkdtemp())
    code = work / "code"
    code.mkdir()
    archive = subprocess.check_output(["git", "archive", RELEASE], cwd=ROOT)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(code, filter="data")
    fake = FakeDashScope().start()
    db = work / "v6.db"
    env = {"DASHSCOPE_API_KEY": "sk-test-key", "DASHSCOPE_BASE_URL": fake.url, "DATABASE_URL": f"sqlite:///{db}",
           "CHATSVC_UPSTREAM_RETRIES": "0", "CHATSVC_USER_HEADER": "X-User-Id", "CHATSVC_TITLES": "first-line",
           "CHATSVC_CHECKPOINT_SECONDS": "0.1", "CHATSVC_VISION_MODEL": "qwen3-vl-plus",
           "CHATSVC_ADMIN_TOKEN": "admin-v6", "CHATSVC_PRICES": json.dumps({"currency": "CNY", "models": {
               "qwen-plus": {"input": 0.8, "output": 2, "output_thinking": 8, "cached_input": 0.2},
               "qwen3-vl-plus": {"input": 1, "output": 10}}})}  # fmt: skip
    server = ServerProcess(env, work)
    import procs

    procs.ROOT = code  # the release's code, not today's
    server.start()
    alice, bob = {"X-User-Id": "alice"}, {"X-User-Id": "bob"}
    with server.client() as c:

        def chat(session, message=None, headers=alice, **body):
            if message is not None:
                body["message"] = message
            r = c.post(f"/api/v1/chat/{session}", json=body, headers=headers)
            assert r.status_code in (200, 422, 502), r.text
            return r.json()

        def upload(name: str, data: bytes, headers=alice) -> str:
            r = c.post(f"/api/v1/files?name={name}", content=data, headers=headers)
            assert r.status_code == 201, r.text
            return r.json()["id"]

        # a plain conversation, several turns, one of them thinking; a regeneration and an edit (branches)
        fake.push(Reply.answer(["Hello", ", I am Qwen."]), Reply.answer(["4"], reasoning=["2+2", " is 4"]))
        chat("plain", "Who are you?")
        second = chat("plain", "2+2?", enable_thinking=True)
        chat("plain", "And 3+3?")
        fake.push(Reply.answer(["Four."]))
        chat("plain", regenerate=second["message_id"])
        branch = c.get(f"{CONV}/plain", headers=alice).json()["messages"]
        fake.push(Reply.answer(["Six, edited."]))
        chat("plain", "3+3, then?", edit=branch[2]["id"])
        # Chinese, a system prompt and a client-set title
        r = c.post(CONV, headers=alice, json={"session_id": "zh", "system_prompt": "用中文回答。", "title": "我的标题"})
        assert r.status_code == 201, r.text
        fake.push(Reply.answer(["从前", "有座山"]))
        chat("zh", "讲个故事")
        # a failed answer, then a good one
        fake.push(Reply.error(500, "InternalError", "boom"))
        chat("failing", "first try")
        chat("failing", "second try")
        # files: a document and an image sent in a turn, one file never sent, bob's own
        note = upload("note.txt", "a note: 北京 is north".encode())
        picture = upload("red.png", png())
        upload("unused.txt", b"never sent")
        upload("bobs.txt", b"bob's file", headers=bob)
        fake.push(Reply.answer(["Read both."]))
        assert chat("files", "Look at these", files=[note, picture])["response"] == "Read both."
        # a fork carrying the files, and a purge
        files_branch = c.get(f"{CONV}/files", headers=alice).json()["messages"]
        r = c.post(f"{CONV}/files/fork", headers=alice, json={"message_id": files_branch[-1]["id"],
                                                             "session_id": "forked"})  # fmt: skip
        assert r.status_code == 201, r.text
        chat("purged", "gone soon")
        assert c.delete(f"{CONV}/purged/context?purge=true", headers=alice).status_code == 200
        chat("purged", "after the purge")
        # a stopped answer
        fake.push(Reply.answer(["slow "] * 200, pause=0.05))
        reader = subprocess.Popen(["curl", "-sN", "-X", "POST", "-H", "X-User-Id: alice", "-H",
                                   "Content-Type: application/json", "-d", '{"message": "stop me"}',
                                   f"{server.url}/api/v1/chat/stopped/stream"], stdout=subprocess.DEVNULL)  # fmt: skip
        time.sleep(0.5)
        assert c.post("/api/v1/chat/stopped/stop", headers=alice).json()["stopped"] is True
        reader.wait(10)
        # the app's own tool: an answer that called it (tool_steps), and the turn of its result (tool_results)
        call = Reply.tool_calls([("get_weather", {"city": "杭州"})], content=["Let me look. "])
        fake.push(call, Reply.answer(["Sunny."]))
        chat("tools", "Weather in Hangzhou?", tools=[WEATHER])
        results = [{"tool_call_id": call.calls[0]["id"], "content": "sunny, 25°C"}]
        assert chat("tools", tool_results=results, tools=[WEATHER])["response"] == "Sunny."
        # a long conversation: more turns than the release's context (20 messages) holds, each answer a ledger row
        for turn in range(30):
            fake.push(Reply.answer([f"Answer {turn}: ", "noted " * 20]))
            chat("long", f"Turn {turn}: remember the number {turn * 7}. " + "words " * 30)
        # a limit an admin set (a usage_owners row), and a refused turn over it
        r = c.put("/api/v1/admin/users/bob/limits", headers={"Authorization": "Bearer admin-v6"},
                  json={"tokens_per_day": 100000})  # fmt: skip
        assert r.status_code == 200, r.text
        # the same session id for another owner, and an empty conversation
        chat("plain", "bob's question", headers=bob)
        assert c.post(CONV, headers=bob, json={"session_id": "empty"}).status_code == 201
        expected = {}
        for owner, headers in (("alice", alice), ("bob", bob)):
            for conv in c.get(CONV, headers=headers).json()["conversations"]:
                sid = conv["session_id"]
                tree = c.get(f"{CONV}/{sid}/messages?tree=true&limit=500", headers=headers).json()
                expected[f"{owner}/{sid}"] = {
                    "conversation": c.get(f"{CONV}/{sid}", headers=headers).json(),
                    "tree": tree["messages"],
                }
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
        versions = [row[0] for row in conn.execute("SELECT version FROM schema_versions ORDER BY version")]
    assert versions == [1, 2, 3, 4, 5, 6], versions
    with sqlite3.connect(db) as conn:
        calls = conn.execute("SELECT COUNT(*) FROM usage_calls").fetchone()[0]
    assert calls > 30, calls
    shutil.copyfile(db, HERE / "v6.db")
    (HERE / "v6.json").write_text(json.dumps(expected, ensure_ascii=False, indent=1, sort_keys=True) + "\n")
    (HERE / "schema_v6.sql").write_bytes((code / "schema.sql").read_bytes())
    print(f"wrote {HERE / 'v6.db'}, v6.json ({len(expected)} conversations) and schema_v6.sql")


if __name__ == "__main__":
    main()
