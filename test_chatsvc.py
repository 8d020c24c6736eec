"""chatsvc's contract, made executable.

Every test talks to the service through HTTP (Starlette's TestClient) while the service talks to
a fake DashScope over a real socket; assertions are on what a user would check: status codes,
`detail`/`code`, the rows in the database, and what the model service received.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone

import pytest
from fake_dashscope import Reply, chunk_event
from support import wait_for

import chatsvc

API = "/api/v1"
USAGE_TEXT = "I am a large-scale language model from Alibaba Cloud, and my name is Qwen."
PLAIN_TEXT = "I am a large language model from Alibaba Cloud. My name is Qwen."


def answer_rows(service, session_id="s1"):
    return service.rows(
        "SELECT role, content, reasoning_content, status, error_code, finish_reason, total_tokens"
        " FROM messages WHERE session_id = ? ORDER BY id",
        session_id,
    )


# ── chat: the happy path ─────────────────────────────────────────────────────────────


def test_chat_answers_and_stores_both_messages(client, service, fake):
    r = client.post(f"{API}/chat/s1", json={"message": "Who are you?"})
    assert r.status_code == 200
    body = r.json()
    assert body["session_id"] == "s1"
    assert body["response"] == USAGE_TEXT
    assert body["model"] == "qwen-plus"
    assert body["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 22, "completion_tokens": 17, "total_tokens": 39}
    assert answer_rows(service) == [
        {"role": "user", "content": "Who are you?", "reasoning_content": None, "status": "complete",
         "error_code": None, "finish_reason": None, "total_tokens": None},
        {"role": "assistant", "content": USAGE_TEXT, "reasoning_content": None, "status": "complete",
         "error_code": None, "finish_reason": "stop", "total_tokens": 39},
    ]  # fmt: skip
    assert service.rows("SELECT id FROM messages WHERE role = 'assistant'")[0]["id"] == body["message_id"]
    conv = client.get(f"{API}/context/conversations/s1").json()
    assert conv["title"] == "Who are you?"
    assert conv["message_count"] == 2 and conv["generating"] is False


def test_upstream_request_is_streaming_with_usage_and_options(client, fake):
    r = client.post(
        f"{API}/chat/s1",
        json={"message": "hi", "temperature": 0.3, "top_p": 0.9, "max_tokens": 50, "enable_thinking": False},
    )
    assert r.status_code == 200
    (seen,) = fake.requests
    assert seen.method == "POST" and seen.path == "/compatible-mode/v1/chat/completions"
    assert seen.headers["authorization"] == "Bearer sk-test-key"
    assert seen.body == {
        "model": "qwen-plus",
        "messages": [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.3,
        "top_p": 0.9,
        "max_tokens": 50,
        "enable_thinking": False,
    }


def test_thinking_answer_stores_reasoning(client, service, fake):
    fake.push(Reply.answer(["The answer", " is 4."], reasoning=["Two plus", " two..."]))
    r = client.post(f"{API}/chat/s1", json={"message": "2+2?", "enable_thinking": True})
    assert r.json()["response"] == "The answer is 4."
    stored = answer_rows(service)[1]
    assert stored["content"] == "The answer is 4." and stored["reasoning_content"] == "Two plus two..."
    message = client.get(f"{API}/context/conversations/s1").json()["messages"][1]
    assert message["reasoning_content"] == "Two plus two..."


@pytest.mark.parametrize(
    "reply, text",
    [
        (Reply.transcript("stream_plain.sse"), PLAIN_TEXT),
        (Reply.transcript(crlf=True), USAGE_TEXT),
        (Reply.transcript(split=True), USAGE_TEXT),
        (Reply.transcript(split=True, crlf=True), USAGE_TEXT),
        (Reply.transcript(comments=True), USAGE_TEXT),
        (Reply.transcript("stream_plain.sse", done=False), PLAIN_TEXT),  # finish_reason came: complete
        (Reply.of_events([chunk_event("a"), b'data: {"choices":[]}\n\n', b'data:{"choices":[{"delta":{}}]}\n\n',
                          chunk_event("b", finish="stop"), b"data: [DONE]\n\n"]), "ab"),
    ],
    ids=["plain", "crlf", "split-lines", "split-crlf", "comments", "no-done-after-finish", "empty-choices"],
)  # fmt: skip
def test_stream_parser_takes_every_wire_variant(client, service, fake, reply, text):
    fake.push(reply)
    r = client.post(f"{API}/chat/s1", json={"message": "hi"})
    assert r.status_code == 200, r.text
    assert r.json()["response"] == text
    assert answer_rows(service)[1]["content"] == text


def test_unicode_line_separators_inside_json_survive(client, fake):
    tricky = "line\u2028sep\u2029para\x85nel\x1c😀 ok"
    fake.push(Reply.answer([tricky[:6], tricky[6:]], split=True))
    assert client.post(f"{API}/chat/s1", json={"message": "x"}).json()["response"] == tricky


def test_lone_surrogate_from_upstream_becomes_a_replacement_character(client, service, fake):
    # json.loads turns "\ud800" into a lone surrogate: it cannot be written as UTF-8 to a reader or the database
    events = [
        b'data: {"choices":[{"delta":{"content":"a\\ud800b"},"finish_reason":null,"index":0}]}\n\n',
        b'data: {"choices":[{"delta":{"content":" \\ud83d\\ude00"},"finish_reason":"stop","index":0}]}\n\n',
        b"data: [DONE]\n\n",
    ]
    fake.push(Reply.of_events(events))
    r = client.post(f"{API}/chat/s1", json={"message": "x"})
    assert r.status_code == 200, r.text
    assert r.json()["response"] == "a\ufffdb 😀"
    assert answer_rows(service)[1]["content"] == "a\ufffdb 😀"
    assert answer_rows(service)[1]["status"] == "complete"


def test_upstream_connection_is_reused_across_answers(client, fake):
    # Reading the body to its end after [DONE] returns the connection to the pool: against DashScope a
    # new connection per answer would mean a TLS handshake before every first token.
    for i in range(5):
        assert client.post(f"{API}/chat/s{i}", json={"message": "hi"}).status_code == 200
    assert fake.connections == 1
    assert fake.requests[0].headers["accept-encoding"] == "identity"


def test_gzip_from_upstream_is_decoded(client, fake):
    fake.push(Reply.answer(["Hello", ", world"], gzip=True))
    assert client.post(f"{API}/chat/s1", json={"message": "hi"}).json()["response"] == "Hello, world"


# ── upstream failures: mapped, stored, and the service stays healthy ─────────────────


FAILURES = [
    (Reply.error(401, "invalid_api_key", "Incorrect API key provided."), 502, "upstream_auth"),
    (Reply.error(403, "AccessDenied", "Access denied."), 502, "upstream_auth"),
    (Reply.error(400, "Arrearage", "Access denied, please make sure your account is in good standing."), 502,
     "upstream_auth"),
    (Reply.error(404, "model_not_found", "The model `qwen-plus` does not exist."), 502, "upstream_error"),
    (Reply.error(429, "limit_requests", "Requests rate limit exceeded.", retry_after="7"), 429,
     "upstream_rate_limited"),
    (Reply.error(429, "insufficient_quota", "You exceeded your current quota."), 429, "upstream_rate_limited"),
    (Reply.error(500, "internal_error", "An internal error has occured."), 502, "upstream_error"),
    (Reply.error(503, "ModelServingError", "Too many requests."), 503, "upstream_unavailable"),
    (Reply.error(400, "data_inspection_failed", "Input data may contain inappropriate content."), 422,
     "content_filtered"),
    (Reply.error(400, "invalid_parameter_error", "Range of input length should be [1, 129024]"), 422,
     "context_too_long"),
    (Reply.answer(["partial"], finish=None, usage=False, done=False), 502, "upstream_error"),  # cut, no [DONE]
    (Reply.answer(["partial"], finish=None, usage=False, done=False, cut=True), 502, "upstream_error"),
    (Reply.of_events([chunk_event("par"), b'data: {"error":{"code":"data_inspection_failed","message":"Output'
                      b' data may contain inappropriate content."}}\n\n']), 422, "content_filtered"),
    (Reply(status=200, pieces=[b"data: {not json\n\n"]), 502, "upstream_error"),
]  # fmt: skip


@pytest.mark.parametrize("reply, status, code", FAILURES, ids=[f"{s}-{c}-{i}" for i, (_, s, c) in enumerate(FAILURES)])
def test_upstream_failure_is_mapped_stored_and_recoverable(client, service, fake, reply, status, code):
    fake.push(reply)
    r = client.post(f"{API}/chat/s1", json={"message": "hello"})
    assert r.status_code == status, r.text
    body = r.json()
    assert body["code"] == code and body["detail"].strip()
    if code == "upstream_rate_limited" and "Retry-After" in reply.headers:
        assert r.headers["retry-after"] == "7"
    user, answer = answer_rows(service)
    assert user["content"] == "hello" and user["status"] == "complete"
    assert answer["status"] == "failed" and answer["error_code"] == code
    assert answer["content"] == body["partial_text"]
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.post(f"{API}/chat/s1", json={"message": "again"}).status_code == 200  # not left busy


def test_refused_connection_is_upstream_unavailable(make_service):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    service = make_service(DASHSCOPE_BASE_URL=f"http://127.0.0.1:{port}/v1")
    with service.client() as client:
        r = client.post(f"{API}/chat/s1", json={"message": "hello"})
        assert r.status_code == 503 and r.json()["code"] == "upstream_unavailable"
        assert answer_rows(service)[1]["status"] == "failed"


def test_stall_before_headers_is_a_timeout(make_service, fake):
    service = make_service(CHATSVC_UPSTREAM_IDLE_TIMEOUT="0.3")
    fake.push(Reply(stall_headers=1.0))
    with service.client() as client:
        r = client.post(f"{API}/chat/s1", json={"message": "hello"})
        assert r.status_code == 504 and r.json()["code"] == "upstream_timeout"
        assert answer_rows(service)[1]["error_code"] == "upstream_timeout"


def test_stall_mid_stream_keeps_partial_text(make_service, fake):
    service = make_service(CHATSVC_UPSTREAM_IDLE_TIMEOUT="0.3")
    fake.push(Reply.answer(["Once", " upon", " a time"], stall_at=3, stall=1.0))
    with service.client() as client:
        r = client.post(f"{API}/chat/s1", json={"message": "story"})
        assert r.status_code == 504 and r.json()["partial_text"] == "Once upon"
        assert answer_rows(service)[1]["content"] == "Once upon"


def test_total_timeout_ends_a_slow_answer(make_service, fake):
    service = make_service(CHATSVC_UPSTREAM_TOTAL_TIMEOUT="0.4")
    fake.push(Reply.answer(["tick"] * 50, pause=0.05))
    with service.client() as client:
        r = client.post(f"{API}/chat/s1", json={"message": "slow"})
        assert r.status_code == 504 and r.json()["code"] == "upstream_timeout"
        stored = answer_rows(service)[1]
        assert stored["status"] == "failed" and stored["content"].startswith("ticktick")


# ── retries: only before the first token ─────────────────────────────────────────────


def test_retries_transient_failures_before_the_first_token(make_service, fake):
    service = make_service(CHATSVC_UPSTREAM_RETRIES="2")
    fake.push(Reply.error(503, "ModelServingError", retry_after="0"), Reply.error(500, "internal_error",
              retry_after="0"))  # fmt: skip
    with service.client() as client:
        r = client.post(f"{API}/chat/s1", json={"message": "hi"})
        assert r.status_code == 200 and r.json()["response"] == USAGE_TEXT
    assert len(fake.requests) == 3


def test_retry_honours_retry_after(make_service, fake):
    service = make_service(CHATSVC_UPSTREAM_RETRIES="1")
    fake.push(Reply.error(429, "limit_requests", retry_after="1"))
    with service.client() as client:
        assert client.post(f"{API}/chat/s1", json={"message": "hi"}).status_code == 200
    first, second = fake.requests
    assert second.at - first.at >= 0.95


@pytest.mark.parametrize(
    "reply",
    [Reply.error(401, "invalid_api_key"), Reply.error(400, "Arrearage"), Reply.error(429, "insufficient_quota"),
     Reply.error(404, "model_not_found"), Reply.error(400, "invalid_parameter_error")],
    ids=["401", "arrearage", "quota", "404", "400"],
)  # fmt: skip
def test_never_retries_client_errors_or_billing(make_service, fake, reply):
    service = make_service(CHATSVC_UPSTREAM_RETRIES="2")
    fake.push(reply)
    with service.client() as client:
        assert client.post(f"{API}/chat/s1", json={"message": "hi"}).status_code >= 400
    assert len(fake.requests) == 1


def test_no_retry_after_tokens_reached_readers(make_service, fake):
    service = make_service(CHATSVC_UPSTREAM_RETRIES="2")
    fake.push(Reply.answer(["half an", " answer"], finish=None, usage=False, done=False, cut=True))
    with service.client() as client:
        r = client.post(f"{API}/chat/s1", json={"message": "hi"})
        assert r.status_code == 502 and r.json()["partial_text"] == "half an answer"
    assert len(fake.requests) == 1
    assert answer_rows(service)[1]["content"] == "half an answer"


# ── the answer row while it streams; one answer at a time ────────────────────────────


def run_in_thread(fn):
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("value", fn()))
    thread.start()
    return thread, result


def test_answer_is_checkpointed_while_streaming(make_service, fake):
    service = make_service(CHATSVC_CHECKPOINT_SECONDS="0.05")
    fake.push(Reply.answer([f"w{i} " for i in range(40)], pause=0.02))
    with service.client() as client:
        thread, result = run_in_thread(lambda: client.post(f"{API}/chat/s1", json={"message": "count"}))
        partial = wait_for(
            lambda: service.rows(
                "SELECT content FROM messages WHERE role = 'assistant' AND status = 'streaming' AND content != ''"
            )
        )
        full = "".join(f"w{i} " for i in range(40))
        assert full.startswith(partial[0]["content"])  # the text so far, before the answer ends
        assert client.get(f"{API}/context/conversations/s1").json()["generating"] is True
        thread.join(10)
        assert result["value"].status_code == 200
        assert answer_rows(service)[1]["content"] == "".join(f"w{i} " for i in range(40))  # fmt: skip


def test_second_chat_while_answering_is_409_and_stores_nothing(client, service, fake):
    fake.push(Reply.answer(["slow"] * 10, pause=0.05))
    thread, result = run_in_thread(lambda: client.post(f"{API}/chat/s1", json={"message": "first"}))
    wait_for(lambda: service.rows("SELECT 1 FROM messages WHERE status = 'streaming'"))
    r = client.post(f"{API}/chat/s1", json={"message": "second"})
    assert r.status_code == 409 and r.json()["code"] == "conversation_busy"
    assert "stop" in r.json()["detail"]
    thread.join(10)
    assert result["value"].status_code == 200
    assert [row["content"] for row in answer_rows(service) if row["role"] == "user"] == ["first"]


def test_busy_is_enforced_by_the_database(client, service, fake):
    """Another replica's running answer (a row with a fresh heartbeat, no task here) also makes chat 409."""
    client.post(f"{API}/context/conversations", json={"session_id": "s1"})
    service.rows(
        "INSERT INTO messages (id, owner, session_id, role, status, created_at, updated_at)"
        " VALUES ('zz', '', 's1', 'assistant', 'streaming', ?, ?)",
        chatsvc.utcnow(), chatsvc.utcnow(),
    )  # fmt: skip
    r = client.post(f"{API}/chat/s1", json={"message": "hi"})
    assert r.status_code == 409 and r.json()["code"] == "conversation_busy"
    # the user's message is stored before the model is called: refused, neither happened
    assert fake.requests == []
    assert service.rows("SELECT id, role, status FROM messages") == [
        {"id": "zz", "role": "assistant", "status": "streaming"}
    ]


def test_startup_interrupts_what_no_process_runs_and_schema_is_idempotent(service, fake):
    with service.client() as client:
        client.post(f"{API}/chat/s1", json={"message": "hi"})
        client.post(f"{API}/chat/s2", json={"message": "hi"})
    schema = service.schema()
    # What a crash mid-answer leaves behind (a heartbeat a minute old), and a fresh row: on
    # PostgreSQL another replica's running answer, left alone; on SQLite, where one process serves
    # the file, a crash just before this start, interrupted at once.
    stale = (datetime.now(timezone.utc) - timedelta(minutes=1)).isoformat(timespec="milliseconds")[:-6] + "Z"
    service.rows("UPDATE messages SET status = 'streaming', content = 'half', updated_at = ?"
                 " WHERE role = 'assistant' AND session_id = 's1'", stale)  # fmt: skip
    service.rows("UPDATE messages SET status = 'streaming', updated_at = ?"
                 " WHERE role = 'assistant' AND session_id = 's2'", chatsvc.utcnow())  # fmt: skip
    with service.client() as client:
        messages = client.get(f"{API}/context/conversations/s1").json()["messages"]
        assert messages[1]["status"] == "interrupted" and messages[1]["content"] == "half"
        assert messages[1]["error"]["code"] == "interrupted"
        assert client.post(f"{API}/chat/s1", json={"message": "again"}).status_code == 200
        fresh = client.get(f"{API}/context/conversations/s2").json()["messages"][1]
        assert fresh["status"] == ("interrupted" if service.is_sqlite else "streaming")
        if service.is_sqlite:  # the conversation takes a new message at once
            assert client.post(f"{API}/chat/s2", json={"message": "again"}).status_code == 200
    assert service.schema() == schema


# ── context: exactly what the model receives ─────────────────────────────────────────


def sent_messages(fake):
    return fake.requests[-1].body["messages"]


def chat_n(client, n, session="s1", prefix="q"):
    for i in range(n):
        assert client.post(f"{API}/chat/{session}", json={"message": f"{prefix}{i}"}).status_code == 200


def test_context_keeps_the_newest_messages_in_order(make_service, fake):
    service = make_service(CHATSVC_MAX_CONTEXT_MESSAGES="4")
    fake.default = Reply.answer(["ok"])
    with service.client() as client:
        chat_n(client, 5)
        client.post(f"{API}/chat/s1", json={"message": "last"})
    assert sent_messages(fake) == [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "q3"}, {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "q4"}, {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "last"},
    ]  # fmt: skip


def test_context_odd_limit_starts_with_a_user_message(make_service, fake):
    service = make_service(CHATSVC_MAX_CONTEXT_MESSAGES="3")
    fake.default = Reply.answer(["ok"])
    with service.client() as client:
        chat_n(client, 3)
        client.post(f"{API}/chat/s1", json={"message": "last"})
    roles = [m["role"] for m in sent_messages(fake)]
    assert roles == ["system", "user", "assistant", "user"]


def test_context_after_clear_and_with_conversation_prompt(client, fake):
    fake.default = Reply.answer(["ok"])
    client.post(f"{API}/context/conversations", json={"session_id": "s1", "system_prompt": "Speak like a pirate."})
    chat_n(client, 2)
    r = client.delete(f"{API}/context/conversations/s1/context")
    assert r.status_code == 200 and r.json()["context_message_count"] == 0 and r.json()["message_count"] == 4
    client.post(f"{API}/chat/s1", json={"message": "after"})
    assert sent_messages(fake) == [
        {"role": "system", "content": "Speak like a pirate."},
        {"role": "user", "content": "after"},
    ]
    messages = client.get(f"{API}/context/conversations/s1").json()["messages"]
    assert [m["in_context"] for m in messages] == [False] * 4 + [True] * 2
    client.post(f"{API}/chat/s1", json={"message": "next"})
    assert [m["content"] for m in sent_messages(fake)[1:]] == ["after", "ok", "next"]


def test_clear_with_purge_deletes_the_history(client, service, fake):
    chat_n(client, 2)
    r = client.delete(f"{API}/context/conversations/s1/context?purge=true")
    assert r.status_code == 200 and r.json()["message_count"] == 0
    assert service.rows("SELECT COUNT(*) AS n FROM messages")[0]["n"] == 0


def test_context_respects_the_token_budget_with_cjk(make_service, fake):
    # system prompt "You are a helpful assistant." ~ 11 tokens; each 100-character CJK message ~ 104
    service = make_service(CHATSVC_MAX_CONTEXT_TOKENS="400")
    fake.default = Reply.answer(["好" * 100])
    with service.client() as client:
        chat_n(client, 3, prefix="问" * 100)
        client.post(f"{API}/chat/s1", json={"message": "短"})
    sent = sent_messages(fake)
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "user"]
    assert sum(chatsvc.estimate_tokens(m["content"]) for m in sent) <= 400


def test_failed_turns_and_empty_answers_are_left_out(client, fake):
    fake.push(Reply.answer(["good"]), Reply.error(500, "internal_error"), Reply.answer([]), Reply.answer(["fine"]))
    for message in ("one", "two", "three", "four"):
        client.post(f"{API}/chat/s1", json={"message": message})
    client.post(f"{API}/chat/s1", json={"message": "five"})
    assert [m["content"] for m in sent_messages(fake)[1:]] == ["one", "good", "four", "fine", "five"]


def test_message_too_long_for_the_budget_is_422_and_stores_nothing(make_service, fake):
    service = make_service(CHATSVC_MAX_CONTEXT_TOKENS="50")
    with service.client() as client:
        r = client.post(f"{API}/chat/s1", json={"message": "字" * 60})
        assert r.status_code == 422 and r.json()["code"] == "context_too_long"
    assert service.rows("SELECT COUNT(*) AS n FROM messages")[0]["n"] == 0
    assert fake.requests == []


def test_token_estimate_counts_cjk_as_one_token_each():
    assert chatsvc.estimate_tokens("你好世界" * 25) >= 100
    assert chatsvc.estimate_tokens("a" * 400) >= 100


# ── bad input: a clear error and nothing stored ──────────────────────────────────────


@pytest.mark.parametrize(
    "kwargs, status, code, words",
    [
        ({"content": b"{not json"}, 400, "invalid_json", "not valid JSON"),
        ({"content": b"\xff\xfe"}, 400, "invalid_json", "not valid JSON"),
        ({"json": ["message"]}, 400, "invalid_json", "JSON object"),
        ({"json": {}}, 422, "invalid_request", "'message' is required"),
        ({"json": {"message": 5}}, 422, "invalid_request", "'message' is required and must be a string"),
        ({"json": {"message": "  \n "}}, 422, "invalid_request", "must not be blank"),
        ({"json": {"message": "x" * 101}}, 422, "invalid_request", "longer than 100 characters"),
        ({"json": {"message": "hi", "model": "gpt-4"}}, 422, "invalid_request", "Unknown model"),
        ({"json": {"message": "hi", "temperature": 2}}, 422, "invalid_request", "'temperature'"),
        ({"json": {"message": "hi", "temperature": "hot"}}, 422, "invalid_request", "'temperature'"),
        ({"json": {"message": "hi", "top_p": 0}}, 422, "invalid_request", "'top_p'"),
        ({"json": {"message": "hi", "max_tokens": True}}, 422, "invalid_request", "'max_tokens'"),
        ({"json": {"message": "hi", "max_tokens": 0}}, 422, "invalid_request", "'max_tokens'"),
        ({"json": {"message": "hi", "enable_thinking": "yes"}}, 422, "invalid_request", "'enable_thinking'"),
        ({"json": {"message": "hi", "mesage": "typo"}}, 422, "invalid_request", "Unknown field 'mesage'"),
        ({"content": b'{"message": "' + b"x" * 300 + b'"}'}, 413, "payload_too_large", "larger than 256 bytes"),
        ({"content": b'{"message": "\\ud800"}'}, 422, "invalid_request", "unpaired surrogate"),
        ({"json": {"message": "a\x00b"}}, 422, "invalid_request", "NUL"),
    ],
)
def test_bad_chat_input(make_service, fake, kwargs, status, code, words):
    service = make_service(CHATSVC_MAX_MESSAGE_CHARS="100", CHATSVC_MAX_BODY_BYTES="256")
    with service.client() as client:
        headers = {"Content-Type": "application/json"} if "content" in kwargs else None
        r = client.post(f"{API}/chat/s1", headers=headers, **kwargs)
        assert r.status_code == status
        assert r.json()["code"] == code and words in r.json()["detail"]
    assert service.rows("SELECT COUNT(*) AS n FROM messages")[0]["n"] == 0
    assert fake.requests == []


def test_oversized_body_without_content_length_is_413(make_service):
    service = make_service(CHATSVC_MAX_BODY_BYTES="256")
    with service.client() as client:
        body = iter([b'{"message": "', b"x" * 200, b"y" * 200, b'"}'])
        r = client.post(f"{API}/chat/s1", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["code"] == "payload_too_large"


@pytest.mark.parametrize("session_id", ["a b", "x" * 129, "semi;colon", "ü", "%2e%2e"])
def test_bad_session_id_is_422(client, session_id):
    r = client.post(f"{API}/chat/{session_id}", json={"message": "hi"})
    assert r.status_code == 422 and "session_id" in r.json()["detail"]
    r = client.post(f"{API}/context/conversations", json={"session_id": session_id})
    assert r.status_code == 422 and r.json()["code"] == "invalid_request"


def test_unknown_route_and_method_are_json(client):
    r = client.get("/api/v1/nothing")
    assert r.status_code == 404 and r.json()["code"] == "not_found"
    r = client.put(f"{API}/chat/s1", json={})
    assert r.status_code == 405 and r.json()["code"] == "method_not_allowed"


def test_not_configured_without_api_key(make_service):
    with make_service(DASHSCOPE_API_KEY=None).client() as client:
        r = client.post(f"{API}/chat/s1", json={"message": "hi"})
        assert r.status_code == 503 and r.json()["code"] == "not_configured"
        assert "DASHSCOPE_API_KEY" in r.json()["detail"]


def test_allowed_models(make_service, fake):
    service = make_service(CHATSVC_ALLOWED_MODELS="qwen-max, qwen-turbo")
    with service.client() as client:
        assert client.post(f"{API}/chat/s1", json={"message": "hi", "model": "qwen-max"}).json()["model"] == "qwen-max"
        assert fake.requests[-1].body["model"] == "qwen-max"
        client.patch(f"{API}/context/conversations/s1", json={"model": "qwen-turbo"})
        client.post(f"{API}/chat/s1", json={"message": "hi"})
        assert fake.requests[-1].body["model"] == "qwen-turbo"


# ── access: token and CORS ───────────────────────────────────────────────────────────


def test_api_token_is_required_on_api_routes(make_service):
    with make_service(CHATSVC_API_TOKEN="s3cret").client() as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
            r = client.get(f"{API}/context/conversations", headers=headers)
            assert r.status_code == 401 and r.json()["code"] == "unauthorized"
            assert r.headers["www-authenticate"] == "Bearer"
        assert client.get(f"{API}/context/conversations?access_token=wrong").status_code == 401
        assert client.get(f"{API}/context/conversations", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert client.get(f"{API}/context/conversations?access_token=s3cret").status_code == 200
        assert client.post(f"{API}/chat/s1", json={"message": "x"}).status_code == 401
        assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200


def test_cors_answers_only_configured_origins(make_service):
    with make_service(CHATSVC_CORS_ORIGINS="https://app.example").client() as client:
        ok = client.get(f"{API}/context/conversations", headers={"Origin": "https://app.example"})
        assert ok.headers["access-control-allow-origin"] == "https://app.example"
        other = client.get(f"{API}/context/conversations", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
        preflight = client.options(
            f"{API}/chat/s1",
            headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "content-type,authorization"},
        )  # fmt: skip
        assert preflight.status_code == 200


# ── conversations ────────────────────────────────────────────────────────────────────


def test_create_get_patch_delete_conversation(client, service):
    r = client.post(
        f"{API}/context/conversations", json={"session_id": "c1", "title": "Trip", "system_prompt": "Be brief."}
    )
    assert r.status_code == 201
    conv = r.json()
    assert conv["session_id"] == "c1" and conv["title"] == "Trip" and conv["system_prompt"] == "Be brief."
    assert conv["model"] == "qwen-plus" and conv["message_count"] == 0 and conv["generating"] is False
    assert conv["created_at"].endswith("Z")
    r = client.post(f"{API}/context/conversations", json={"session_id": "c1"})
    assert r.status_code == 409 and r.json()["code"] == "conversation_exists"
    r = client.patch(f"{API}/context/conversations/c1", json={"title": "Holiday", "system_prompt": None})
    assert r.status_code == 200 and r.json()["title"] == "Holiday" and r.json()["system_prompt"] is None
    assert client.patch(f"{API}/context/conversations/c1", json={"model": "nope"}).status_code == 422
    client.post(f"{API}/chat/c1", json={"message": "hi"})
    assert client.get(f"{API}/context/conversations/c1").json()["title"] == "Holiday"  # a set title stays
    assert client.delete(f"{API}/context/conversations/c1").status_code == 204
    assert service.rows("SELECT COUNT(*) AS n FROM messages")[0]["n"] == 0
    for method, path in [("get", "c1"), ("patch", "c1"), ("delete", "c1"), ("delete", "c1/context"),
                         ("get", "c1/messages")]:  # fmt: skip
        r = client.request(
            method.upper(), f"{API}/context/conversations/{path}", json={} if method == "patch" else None
        )
        assert r.status_code == 404 and r.json()["code"] == "not_found", (method, path)


def test_create_without_body_makes_a_random_id(client):
    a = client.post(f"{API}/context/conversations").json()["session_id"]
    b = client.post(f"{API}/context/conversations", json={}).json()["session_id"]
    assert a != b and len(a) == 36
    r = client.post(f"{API}/context/conversations", content=b"\t", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["code"] == "invalid_json"


def test_title_comes_from_the_first_line_cut_to_60(client):
    client.post(f"{API}/chat/s1", json={"message": "  " + "t" * 70 + "\nsecond line"})
    assert client.get(f"{API}/context/conversations/s1").json()["title"] == "t" * 60


def test_list_conversations_newest_first_with_cursor(client):
    for i in range(5):
        client.post(f"{API}/context/conversations", json={"session_id": f"c{i}"})
        time.sleep(0.002)
    client.patch(f"{API}/context/conversations/c1", json={"title": "touched"})
    page = client.get(f"{API}/context/conversations?limit=2").json()
    assert [c["session_id"] for c in page["conversations"]] == ["c1", "c4"]
    seen = [c["session_id"] for c in page["conversations"]]
    while page["next_cursor"]:
        page = client.get(f"{API}/context/conversations?limit=2&cursor={page['next_cursor']}").json()
        seen += [c["session_id"] for c in page["conversations"]]
    assert seen == ["c1", "c4", "c3", "c2", "c0"]
    nul_cursor = chatsvc.encode_cursor("2026-01-01T00:00:00.000Z", "a\x00b")  # PostgreSQL cannot take NUL in text
    for bad in ("limit=0", "limit=201", "limit=x", "cursor=garbage!", f"cursor={nul_cursor}"):
        r = client.get(f"{API}/context/conversations?{bad}")
        assert r.status_code == 422 and r.json()["code"] == "invalid_request", bad


def test_messages_are_paged_oldest_first(client, fake):
    fake.default = Reply.answer(["ok"])
    chat_n(client, 4)
    conv = client.get(f"{API}/context/conversations/s1?limit=3").json()
    assert [m["content"] for m in conv["messages"]] == ["ok", "q3", "ok"]
    page = client.get(f"{API}/context/conversations/s1/messages?limit=3").json()
    assert [m["content"] for m in page["messages"]] == ["ok", "q3", "ok"]
    older = client.get(f"{API}/context/conversations/s1/messages?limit=3&before={page['next_cursor']}").json()
    assert [m["content"] for m in older["messages"]] == ["q1", "ok", "q2"]
    oldest = client.get(f"{API}/context/conversations/s1/messages?limit=3&before={older['next_cursor']}").json()
    assert [m["content"] for m in oldest["messages"]] == ["q0", "ok"] and oldest["next_cursor"] is None
    for bad in ("%00", "a%00b", "x" * 200, "%C3%BB"):  # found by schemathesis on PostgreSQL: NUL was a 500
        r = client.get(f"{API}/context/conversations/s1/messages?before={bad}")
        assert r.status_code == 422 and "'before'" in r.json()["detail"], bad


def test_message_object_shape(client):
    client.post(f"{API}/chat/s1", json={"message": "hi"})
    user, answer = client.get(f"{API}/context/conversations/s1").json()["messages"]
    assert set(answer) == {"id", "parent_id", "sibling_ids", "role", "content", "reasoning_content", "status",
                           "in_context", "model", "finish_reason", "error", "usage", "created_at"}  # fmt: skip
    assert answer["usage"] == {"prompt_tokens": 22, "completion_tokens": 17, "total_tokens": 39}
    assert user["role"] == "user" and user["id"] < answer["id"]
    assert user["parent_id"] is None and answer["parent_id"] == user["id"]
    assert user["sibling_ids"] == [user["id"]] and answer["sibling_ids"] == [answer["id"]]


def test_sql_metacharacters_round_trip(client):
    nasty = "'; DROP TABLE messages; -- 100% \\ :name %(x)s \x01\x07 😀 \u2028"
    client.post(f"{API}/context/conversations", json={"session_id": "q", "title": nasty, "system_prompt": nasty})
    r = client.post(f"{API}/chat/q", json={"message": nasty})
    assert r.status_code == 200
    conv = client.get(f"{API}/context/conversations/q").json()
    assert conv["title"] == nasty and conv["system_prompt"] == nasty and conv["messages"][0]["content"] == nasty


def test_health_and_readiness(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200


# ── the SSE decoder on its own ───────────────────────────────────────────────────────


def test_sse_decoder_edge_cases():
    d = chatsvc.SSEDecoder()
    raw = b'data: {"a":1}\r\n\r\n: comment\n\ndata:{"b":\ndata: 2}\n\nevent: x\nid: 7\ndata: [DONE]\r\n\r\n'
    out = []
    for i in range(len(raw)):  # one byte at a time: every split position, including \r|\n
        out += d.feed(raw[i : i + 1])
    assert out == ['{"a":1}', '{"b":\n2}', "[DONE]"]
    d = chatsvc.SSEDecoder()
    assert d.feed("data: \u2028x\u2029\n\n".encode()) == ["\u2028x\u2029"]
    assert d.feed(b"data: unterminated") == []  # a partial event is not delivered
