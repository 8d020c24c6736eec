"""Faults, crashes, signals, hostile input and access control: nothing stored may be lost."""

from __future__ import annotations

import signal
import socket
import threading
import time

import pytest
from fake_dashscope import Reply
from live import LiveServer, SSEReader, parse_events
from procs import ServerProcess
from starlette.routing import Route
from support import wait_for

API = "/api/v1"


def by_message(answers: dict[str, Reply]):
    """A fake DashScope reply chosen by the user's last message."""
    return lambda seen: answers[seen.body["messages"][-1]["content"]]


# ── crash and restart ────────────────────────────────────────────────────────────────


@pytest.mark.slow
@pytest.mark.parametrize("kill_after_chunks", [0, 5, 30])
def test_sigkill_mid_answer_then_restart(service, fake, tmp_path, kill_after_chunks):
    words = [f"k{i} " for i in range(80)]
    fake.default = by_message({"count": Reply.answer(words, pause=0.03), "again": Reply.answer(["fine"])})
    env = {**service.env, "CHATSVC_CHECKPOINT_SECONDS": "0.1", "CHATSVC_HEARTBEAT_SECONDS": "0.2"}
    server = ServerProcess(env, tmp_path).start()
    with server.client() as client:
        reader = SSEReader(client, "POST", f"{API}/chat/s1/stream", json={"message": "count"})
        seen = [reader.next_event() for _ in range(kill_after_chunks + 1)]
        time.sleep(0.25)  # at least one checkpoint interval after the last chunk seen
        checkpointed = service.rows("SELECT content FROM messages WHERE role = 'assistant'")[0]["content"]
        server.kill()
    assert service.rows("SELECT status FROM messages WHERE role = 'assistant'") == [{"status": "streaming"}]

    server = ServerProcess(env, tmp_path).start()
    try:
        with server.client() as client:
            # interrupted once its heartbeat is 3 intervals old: at this start, or by the next heartbeat
            wait_for(lambda: client.get(f"{API}/context/conversations/s1").json()["generating"] is False, 5)
            conv = client.get(f"{API}/context/conversations/s1").json()
            user, answer = conv["messages"]
            assert user["content"] == "count" and user["status"] == "complete"
            assert answer["status"] == "interrupted" and answer["error"]["code"] == "interrupted"
            assert answer["content"].startswith(checkpointed) and "".join(words).startswith(answer["content"])
            seen_text = "".join(e["data"]["content"] for e in seen if e["type"] == "chunk")
            assert answer["content"].startswith(seen_text[: len(seen_text) - 3 * 4])  # all but the last ~0.1 s
            assert conv["generating"] is False
            r = client.post(f"{API}/chat/s1", json={"message": "again"})
            assert r.status_code == 200 and r.json()["response"] == "fine"
    finally:
        server.stop()


# ── graceful shutdown ────────────────────────────────────────────────────────────────


@pytest.mark.slow
def test_sigterm_drains_running_answers_then_exits_0(service, fake, tmp_path):
    fake.default = by_message({
        "short": Reply.answer(["a", "b", "c", "d"], pause=0.1),
        "long": Reply.answer(["long "] * 400, pause=0.02),
    })  # fmt: skip
    env = {**service.env, "CHATSVC_SHUTDOWN_GRACE": "1"}
    server = ServerProcess(env, tmp_path).start()
    clients = [server.client() for _ in range(4)]
    short = SSEReader(clients[0], "POST", f"{API}/chat/s-short/stream", json={"message": "short"})
    long = SSEReader(clients[1], "POST", f"{API}/chat/s-long/stream", json={"message": "long"})
    listener = SSEReader(clients[2], "GET", f"{API}/chat/s-long/stream")
    for reader in (short, long, listener):
        reader.next_event()
    server.signal(signal.SIGTERM)
    time.sleep(0.2)
    refused = clients[3].post(f"{API}/chat/s-new", json={"message": "hello"})
    assert refused.status_code == 503 and refused.json()["code"] == "shutting_down"
    assert clients[3].get("/readyz").status_code == 503

    assert short.until_end()[-1]["data"]["full_text"] == "abcd"
    long_end = long.until_end()[-1]
    assert long_end["type"] == "error" and long_end["data"]["code"] == "interrupted"
    assert listener.until_end()[-1] == long_end
    assert server.wait(15) == 0
    for c in clients:
        c.close()
    rows = {r["session_id"]: r for r in service.rows("SELECT * FROM messages WHERE role = 'assistant'")}
    assert rows["s-short"]["status"] == "complete" and rows["s-short"]["content"] == "abcd"
    assert rows["s-long"]["status"] == "interrupted"
    assert rows["s-long"]["content"] == long_end["data"]["partial_text"] != ""
    assert service.rows("SELECT COUNT(*) AS n FROM messages WHERE session_id = 's-new'")[0]["n"] == 0


# ── hostile input ────────────────────────────────────────────────────────────────────


@pytest.fixture
def live(service):
    with LiveServer(service.settings) as server:
        yield server


ODD_TEXTS = [
    "'; DROP TABLE messages; --",
    "Robert'); DELETE FROM conversations WHERE ('1'='1",
    "100% :name %(x)s %s {0} $1 ? \\x00",
    "ctrl \x01\x07\x08\x1b[31m\x7f tab\tcr\rlf\nnel\x85 end",
    "4-byte 😀🀄𝄞 and \u2028line\u2029para sep",
    "​ zero-width\ufeff bom \ufffd replacement",
]


@pytest.mark.parametrize("text", ODD_TEXTS)
def test_odd_text_round_trips_exactly(live, fake, text):
    fake.push(Reply.answer([text[:5], text[5:]]))
    with live.client() as client:
        events = parse_events(client.post(f"{API}/chat/s1/stream", json={"message": text}).content)
        assert "".join(e["data"]["content"] for e in events if e["type"] == "chunk") == text
        assert events[-1]["data"]["full_text"] == text
        user, answer = client.get(f"{API}/context/conversations/s1").json()["messages"]
        assert user["content"] == text and answer["content"] == text
    assert fake.requests[-1].body["messages"][-1]["content"] == text


def test_nul_characters_are_refused_clearly(live):
    with live.client() as client:
        r = client.post(f"{API}/chat/s1", json={"message": "a\x00b"})
        assert r.status_code == 422 and "NUL" in r.json()["detail"]


def test_huge_headers_are_refused_and_others_unharmed(live):
    def send_huge():
        with socket.create_connection(("127.0.0.1", live.port)) as s:
            s.settimeout(20)
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000_000 + b"\r\n\r\n")
            answers.append(s.recv(100))

    answers: list[bytes] = []
    thread = threading.Thread(target=send_huge)
    thread.start()
    with live.client() as client:
        while thread.is_alive():  # others are served while the huge request arrives
            assert client.get("/healthz").status_code == 200
        r = client.get("/healthz", headers={"X-Big": "b" * 70_000})
        assert r.status_code == 431 and r.json()["code"] == "headers_too_large"
    thread.join()
    assert answers[0].startswith(b"HTTP/1.1 431")


def test_slow_loris_does_not_hurt_other_clients(live, fake):
    fake.default = Reply.answer(["ok"])
    slow = []
    for i in range(100):
        s = socket.create_connection(("127.0.0.1", live.port))
        body_start = b'{"message": "'
        s.sendall(f"POST {API}/chat/slow{i} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: 1000\r\n\r\n".encode() + body_start)  # fmt: skip
        slow.append(s)
    try:
        with live.client(timeout=5) as client:
            for i in range(20):
                r = client.post(f"{API}/chat/fast{i}", json={"message": "hi"})
                assert r.status_code == 200 and r.json()["response"] == "ok"
                for s in slow[:10]:
                    s.sendall(b"x")  # keep dribbling
    finally:
        for s in slow:
            s.close()


# ── access ───────────────────────────────────────────────────────────────────────────


def api_routes(app):
    for route in app.routes:
        if isinstance(route, Route) and route.path.startswith("/api/"):
            for method in sorted(route.methods - {"HEAD"}):
                yield method, route.path.replace("{session_id}", "s1").replace("{user:path}", "alice")


def test_token_guards_every_api_route(make_service):
    service = make_service(CHATSVC_API_TOKEN="tok-secret-123")
    with LiveServer(service.settings) as live, live.client() as client:
        routes = list(api_routes(live.app))
        assert len(routes) == 26
        for method, path in routes:
            for auth in ({}, {"headers": {"Authorization": "Bearer nope"}}, {"params": {"access_token": "nope"}}):
                r = client.request(method, path, json={"message": "x"} if method == "POST" else None, **auth)
                assert r.status_code == 401 and r.json()["code"] == "unauthorized", (method, path, auth)
        # EventSource cannot send headers: the token rides in the query string
        reader = live.reader("GET", f"{API}/chat/s1/stream", params={"access_token": "tok-secret-123"})
        assert reader.response.status_code == 200
        ok = client.post(f"{API}/chat/s1", json={"message": "hi"}, headers={"Authorization": "Bearer tok-secret-123"})
        assert ok.status_code == 200
        assert reader.until_end()[-1]["type"] == "end"


def test_request_id_is_echoed_or_made(client):
    assert client.get("/healthz", headers={"X-Request-ID": "abc-123"}).headers["x-request-id"] == "abc-123"
    made = client.get("/healthz", headers={"X-Request-ID": "bad id\x01"}).headers["x-request-id"]
    assert made != "bad id\x01" and len(made) == 32
    r = client.post(f"{API}/chat/s1", json={}, headers={"X-Request-ID": "req-7"})
    assert r.status_code == 422 and r.headers["x-request-id"] == "req-7"


def test_logs_keep_secrets_and_texts_out(service, fake, tmp_path):
    secret_message, secret_answer = "my card number is 4111-1111-1111-1111", "the secret answer 8b0c"
    fake.default = by_message({
        secret_message: Reply.answer([secret_answer]),
        "fail": Reply.error(401, "invalid_api_key", "Incorrect API key provided."),
    })  # fmt: skip
    env = {**service.env, "CHATSVC_API_TOKEN": "tok-do-not-log", "DASHSCOPE_API_KEY": "sk-do-not-log",
           "LOG_LEVEL": "info"}  # fmt: skip
    server = ServerProcess(env, tmp_path).start()
    auth = {"Authorization": "Bearer tok-do-not-log", "X-Request-ID": "req-log-1"}
    with server.client(headers=auth) as client:
        assert client.post(f"{API}/chat/s1", json={"message": secret_message}).status_code == 200
        client.post(f"{API}/chat/s1/stream", json={"message": "fail"})
        client.post(f"{API}/chat/s1", json={"message": secret_message, "bad": 1})
        client.get(f"{API}/context/conversations/s1", params={"access_token": "tok-do-not-log"})
        # files: their names and texts are the user's too (raw, multipart, refused)
        stored = client.post(f"{API}/files", params={"name": "salary-review.txt"}, content=b"file text 9f3e\n")
        assert stored.status_code == 201
        multipart = client.post(f"{API}/files", files={"file": ("photo-of-alice.txt", b"more 9f3e\n", "text/plain")})
        assert multipart.status_code == 201
        assert client.post(f"{API}/files", params={"name": "refused-name.bin"}, content=b"\x00\x01").status_code == 415
    server.stop()
    log = server.log()
    secrets = ("tok-do-not-log", "sk-do-not-log", secret_message, secret_answer, "4111")
    for secret in (*secrets, "salary-review", "photo-of-alice", "refused-name", "9f3e"):
        assert secret not in log, secret
    answer_lines = [line for line in log.splitlines() if " answer session=s1 " in line]
    assert len(answer_lines) == 2
    assert "request_id=req-log-1" in answer_lines[0] and "status=complete" in answer_lines[0]
    for field in (
        "message=",
        "model=qwen-plus",
        "ttft_ms=",
        "duration_ms=",
        "prompt_tokens=10",
        "retries=0",
        "images=0 files=0 vision_switch=0",
    ):
        assert field in answer_lines[0], field
    assert "status=failed code=upstream_auth" in answer_lines[1]


# ── owners ───────────────────────────────────────────────────────────────────────────


def test_owners_see_only_their_own_conversations(make_service, fake):
    service = make_service(CHATSVC_USER_HEADER="X-User-Id")
    fake.default = lambda seen: Reply.answer([f"to {seen.body['messages'][-1]['content']}"])
    alice, bob = {"X-User-Id": "alice"}, {"X-User-Id": "bob"}
    with service.client() as client:
        r = client.get(f"{API}/context/conversations")
        assert r.status_code == 401 and "X-User-Id" in r.json()["detail"]
        assert client.post(f"{API}/chat/s1", json={"message": "alice"}, headers=alice).status_code == 200
        assert client.post(f"{API}/context/conversations", json={"session_id": "a2"}, headers=alice).status_code == 201
        assert client.get(f"{API}/context/conversations", headers=bob).json()["conversations"] == []
        for method, path in [("GET", "s1"), ("GET", "s1/messages"), ("PATCH", "s1"), ("DELETE", "s1/context"),
                             ("DELETE", "s1"), ("GET", "a2")]:  # fmt: skip
            r = client.request(method, f"{API}/context/conversations/{path}", headers=bob,
                               json={"title": "x"} if method == "PATCH" else None)  # fmt: skip
            assert r.status_code == 404, (method, path)
        assert client.post(f"{API}/chat/s1/stop", headers=bob).status_code == 404
        # bob's "s1" is his own conversation, with its own history
        assert client.post(f"{API}/chat/s1", json={"message": "bob"}, headers=bob).json()["response"] == "to bob"
        assert [m["role"] for m in fake.requests[-1].body["messages"]] == ["system", "user"]
        alice_s1 = client.get(f"{API}/context/conversations/s1", headers=alice).json()
        assert [m["content"] for m in alice_s1["messages"]] == ["alice", "to alice"]
        names = [
            c["session_id"] for c in client.get(f"{API}/context/conversations", headers=alice).json()["conversations"]
        ]
        assert sorted(names) == ["a2", "s1"]
    assert sorted(r["owner"] for r in service.rows("SELECT owner FROM conversations")) == ["alice", "alice", "bob"]


def test_owners_channels_are_separate(make_service, fake):
    service = make_service(CHATSVC_USER_HEADER="X-User-Id")
    fake.default = Reply.answer(["for alice"], pause=0.01)
    with LiveServer(service.settings) as live:
        bob = live.reader("GET", f"{API}/chat/s1/stream", headers={"X-User-Id": "bob"})
        alice = live.reader("GET", f"{API}/chat/s1/stream", headers={"X-User-Id": "alice"})
        wait_for(lambda: len(live.relay.registry._waiters.get(("alice", "s1"), ())) == 1)
        with live.client(headers={"X-User-Id": "alice"}) as client:
            client.post(f"{API}/chat/s1", json={"message": "hi"})
        assert alice.until_end()[-1]["data"]["full_text"] == "for alice"
        # bob's channel is still waiting for its first answer: it delivered nothing of alice's
        assert len(live.relay.registry._waiters.get(("bob", "s1"), ())) == 1
        assert bob.events == []
