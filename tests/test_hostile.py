"""Hostile requests, as a hostile client would send them: every header, path and query parameter the
app reads takes any text, every body any JSON shape and depth, and the answer is a 4xx JSON
{"detail", "code"} with X-Request-ID (or a 2xx), never a 5xx, with the service healthy after. And the
edges that cross a boundary: CORS refusals, tokens in any spelling, redirects, non-JSON bodies,
concurrent stops, slow clients."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from datetime import datetime, timedelta
from urllib.parse import quote

import pytest
from fake_dashscope import Reply
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from live import LiveServer
from procs import ServerProcess
from support import wait_for

import chatsvc

API = "/api/v1"
# Derandomized: the same examples every run, so that CI stays deterministic (a new failure is found
# by raising max_examples locally, then kept as an explicit case).
HYPOTHESIS = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                      suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip

# Any text a URL or a header can carry (no lone surrogates: they have no UTF-8), long ones included.
any_text = st.one_of(
    st.text(st.characters(exclude_categories=("Cs",)), max_size=300),
    st.text("0123456789", min_size=1, max_size=6000),
    st.sampled_from(["²", "٣", "0" * 5000, "-1", " 1", "1e3", "\x00", "..", ".", "/", "%00", "a:b:c", "m:²"]),
)
header_text = st.one_of(
    st.binary(max_size=300).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"").strip(b" \t")),
    st.sampled_from([b"\xb2", "\u0663".encode(), b"9" * 5000, b"-1", b"m1:\xb2", b"\x00", b"application/json\x00"]),
)
any_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=50),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=20), inner, max_size=5),
    max_leaves=30,
)


def check(r) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:300])
    assert r.headers.get("x-request-id")
    if r.status_code >= 400:
        body = r.json()
        assert isinstance(body.get("detail"), str) and body["detail"] and isinstance(body.get("code"), str), body


def healthy(client) -> None:
    assert client.get("/healthz").status_code == 200
    r = client.post(f"{API}/chat/healthy-after", json={"message": "still there?"})
    assert r.status_code == 200, r.text


@HYPOTHESIS
@given(text=any_text, header=header_text)
def test_every_parameter_and_header_takes_any_text(client, fake, text, header):
    path = quote(text, safe="")
    headers = {"X-Request-ID": header, "Last-Event-ID": header, "Content-Type": "application/json"}
    requests = [
        ("GET", f"{API}/context/conversations", {"params": {"limit": text, "cursor": text}}),
        ("GET", f"{API}/context/conversations", {"params": {"q": text}}),
        ("GET", f"{API}/context/conversations/s1/export", {"params": {"format": text}}),
        ("POST", f"{API}/context/conversations/import", {"params": {"session_id": text}, "content": b"{}"}),
        ("GET", f"{API}/context/conversations/{path}", {"params": {"limit": text}}),
        ("GET", f"{API}/context/conversations/s1/messages", {"params": {"before": text, "limit": text}}),
        ("GET", f"{API}/context/conversations/s1/messages", {"params": {"cursor": text}}),
        ("GET", f"{API}/context/conversations/s1/messages", {"params": {"tree": text, "cursor": text}}),
        ("DELETE", f"{API}/context/conversations/s1/messages/{path}", {}),
        ("PATCH", f"{API}/context/conversations/s1", {"content": json.dumps({"current_message_id": text})}),
        ("POST", f"{API}/context/conversations/s1/fork", {"content": json.dumps({"message_id": text})}),
        ("POST", f"{API}/chat/s1", {"content": json.dumps({"message": "hi", "parent_id": text})}),
        ("POST", f"{API}/chat/s1", {"content": json.dumps({"regenerate": text})}),
        ("DELETE", f"{API}/context/conversations/s1/context", {"params": {"purge": text}}),
        ("PATCH", f"{API}/context/conversations/{path}", {"content": json.dumps({"title": text})}),
        ("POST", f"{API}/chat/{path}/stop", {}),
        ("POST", f"{API}/chat/s1", {"content": json.dumps({"message": "hi", "model": text})}),
        ("POST", f"{API}/context/conversations", {"content": json.dumps({"session_id": text, "title": text})}),
        ("DELETE", f"{API}/context/conversations/{path}", {}),
        ("GET", f"/{path}", {}),
    ]
    for method, url, kw in requests:
        check(client.request(method, url, headers=headers, **kw))
    check(client.post(f"{API}/chat/s1", content=b'{"message": "hi"}', headers={"Content-Type": header}))
    check(client.post(f"{API}/chat/s1/stream", content=b'{"message": "hi"}',
                      headers={"Content-Type": b"application/json", "Content-Length": header}))  # fmt: skip


@HYPOTHESIS
@given(body=any_json)
def test_every_body_takes_any_json(client, fake, body):
    fake.default = Reply.answer(["ok"])
    raw = json.dumps(body).encode()
    for method, url in [
        ("POST", f"{API}/chat/s1"),
        ("POST", f"{API}/chat/s1/stream"),
        ("POST", f"{API}/context/conversations"),
        ("PATCH", f"{API}/context/conversations/s1"),
        ("POST", f"{API}/context/conversations/s1/fork"),
        ("POST", f"{API}/context/conversations/import"),
    ]:
        check(client.request(method, url, content=raw, headers={"Content-Type": "application/json"}))
    healthy(client)


times = st.one_of(
    any_text,
    st.from_regex(r"\d{4}-\d\d-\d\d[Tt ]\d\d:\d\d:\d\d(\.\d{0,10})?([Zz]|[+-]\d\d:?\d\d)?", fullmatch=True),
    st.datetimes(timezones=st.timezones()).map(lambda t: t.isoformat()),
)


@HYPOTHESIS
@given(created_at=times, parent=st.sampled_from(["q", "a"]))
def test_an_imported_file_takes_any_time_and_parent_and_stores_only_what_chatsvc_makes(
    client, service, created_at, parent
):
    """A message's time is an RFC 3339 date-time, stored as chatsvc writes its own (UTC, milliseconds),
    or a 422 naming it; an answer follows a user message, or the file is a 422 naming that."""
    messages = [
        {"id": "q", "role": "user", "content": "hi", "status": "complete", "created_at": "2026-01-01T00:00:00Z"},
        {"id": "a", "parent_id": "q", "role": "assistant", "content": "yes", "status": "complete",
         "created_at": "2026-01-01T00:00:01Z"},
        {"id": "b", "parent_id": parent, "role": "assistant", "content": "an answer", "status": "complete",
         "created_at": created_at},
    ]  # fmt: skip
    doc = {"format": "chatsvc.conversation", "version": 1, "conversation": {}, "messages": messages}
    r = client.post(f"{API}/context/conversations/import", json=doc)
    check(r)
    if parent == "a":
        assert r.status_code == 422 and r.json()["detail"].startswith("messages[2].parent_id: an answer must follow")
    elif r.status_code == 422:
        assert r.json()["detail"].startswith("messages[2].created_at: must be an RFC 3339 date-time"), r.text
    else:
        assert r.status_code == 201, r.text
        stored = service.rows("SELECT created_at FROM messages WHERE content = 'an answer'")[-1]["created_at"]
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", stored), stored
        leap = created_at[17:19] == "60"  # 23:59:60 is stored as the next second
        written = created_at[:17] + "59" + created_at[19:] if leap else created_at
        moment = datetime.fromisoformat(written.upper().replace("Z", "+00:00")) + timedelta(seconds=leap)
        assert abs(datetime.fromisoformat(stored.replace("Z", "+00:00")) - moment) < timedelta(milliseconds=1)


markdown_text = st.lists(
    st.sampled_from(["#", "## x", "\n", "\n", "\r", "\r\n", " ", "   ", "    ", "\t", ">", "- ", "1. ", "* ", "+ ",
                     "`", "``", "```", "~~~", "````", "\\", "<", "</details>", "<script>", "<b>", "&", "&lt;", "===",
                     "---", "-", "=", "|", "a", "x y", "<!--", "<?", "<![CDATA[", "<http://a>", "<a@b.c>", "py"]),
    max_size=40,
).map("".join)  # fmt: skip


@settings(max_examples=1000, derandomize=True, database=None, deadline=None)
@given(text=markdown_text, title=markdown_text)
def test_no_text_adds_markdown_structure(text, title):
    """Whatever a message, its reasoning, a title, a model name or an error holds, the exported
    document's headings and folds are chatsvc's, no HTML of theirs runs, and no fence stays open."""
    from markdown_it import MarkdownIt

    def walk(tokens):
        for t in tokens:
            yield t
            yield from walk(t.children or [])

    row = {"role": "assistant", "model": title, "created_at": title, "reasoning_content": text, "content": text,
           "status": "failed", "error_message": title}  # fmt: skip
    user = row | {"role": "user", "reasoning_content": None, "status": "complete"}
    doc = chatsvc.markdown_document({"title": title, "session_id": "s"}, [user, row, user])
    tokens = list(walk(MarkdownIt("commonmark").enable("table").parse(doc)))
    headings = [t.tag for t in tokens if t.type == "heading_open"]
    assert headings == ["h1", "h2", "h2", "h2"], doc
    html = [t.content for t in tokens if t.type in ("html_block", "html_inline")]
    assert html == (["<details><summary>Reasoning</summary>\n", "</details>\n"] if text else []), doc


@pytest.mark.parametrize("depth", [1000, 5000, 100_000])
def test_deeply_nested_bodies_are_a_400(client, depth):
    for body in ("[" * depth + "]" * depth, '{"model": ' + "[" * depth + "]" * depth + "}"):
        r = client.post(f"{API}/chat/s1", content=body.encode(), headers={"Content-Type": "application/json"})
        check(r)
        assert r.status_code in (400, 413, 422), r.text
    healthy(client)


@settings(max_examples=500, derandomize=True, database=None)
@given(value=st.text() | st.from_regex(r"[A-Za-z0-9._:-]{1,20}:[0-9²٣]{1,30}", fullmatch=True))
def test_any_last_event_id_parses_or_is_ignored(value):
    parsed = chatsvc.parse_event_id(value)
    assert parsed is None or (chatsvc.MESSAGE_ID.fullmatch(parsed[0]) and 0 <= parsed[1] < 10**18)


@pytest.mark.parametrize("last_event_id", ["m1:²", "m1:" + "9" * 5000, "m1:-1", ":", "²", "m1:٣"])
def test_a_channel_with_any_last_event_id_is_a_fresh_listener(service, last_event_id):
    with LiveServer(service.settings) as live:
        for where in (
            {"headers": {"Last-Event-ID": last_event_id.encode()}},
            {"params": {"last_event_id": last_event_id}},
        ):
            with live.client() as client, client.stream("GET", f"{API}/chat/s1/stream", **where) as r:
                assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
                assert next(r.iter_raw()).startswith(b"retry: 1000")


# ── what crosses a boundary ──────────────────────────────────────────────────────────


def test_a_refused_cors_preflight_is_json_with_a_request_id(make_service):
    service = make_service(CHATSVC_CORS_ORIGINS="https://app.example")
    with service.client() as client:
        preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
        ok = client.options(f"{API}/chat/s1", headers={"Origin": "https://app.example", **preflight})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://app.example"
        for origin, method in (("https://evil.example", "POST"), ("https://app.example", "TRACE")):
            r = client.options(f"{API}/chat/s1", headers={**preflight, "Origin": origin,
                                                           "Access-Control-Request-Method": method})  # fmt: skip
            assert r.status_code == 400 and r.headers["content-type"] == "application/json"
            assert r.json()["code"] == "cors_rejected" and "CHATSVC_CORS_ORIGINS" in r.json()["detail"]
            assert r.headers["x-request-id"]


@pytest.mark.parametrize(
    "query",
    ["access_token={t}", "access%5Ftoken={t}", "%61ccess_token={t}", "ACCESS_TOKEN=x&access_token={t}",
     "a=1&access%5ftoken={t}&b=2", "access_token=x&access_token={t}"],
)  # fmt: skip
def test_the_token_in_any_spelling_the_app_accepts_is_redacted(query):
    token = "tok-do-not-log"
    line = f'127.0.0.1:1 - "GET /api/v1/chat/s1/stream?{query.format(t=token)} HTTP/1.1" 200'
    assert token not in chatsvc.redact_query(line)
    assert chatsvc.redact_query(line).endswith(' HTTP/1.1" 200')


def test_tokens_sent_in_every_spelling_never_reach_the_log(service, tmp_path):
    env = {**service.env, "CHATSVC_API_TOKEN": "tok-do-not-log", "LOG_LEVEL": "info"}
    server = ServerProcess(env, tmp_path).start()
    try:
        with server.client() as client:
            for name in ("access_token", "access%5Ftoken", "%61ccess_token", "access%5ftoken"):
                r = client.get(f"{API}/context/conversations?{name}=tok-do-not-log")
                assert r.status_code == 200, name  # each spelling authenticates...
    finally:
        server.stop()
    assert "tok-do-not-log" not in server.log()  # ...and none is written down
    assert server.log().count("[redacted]") == 4


def test_no_redirect_is_built_from_the_host_header(client):
    for path in (f"{API}/context/conversations/", f"{API}/chat/s1/stream/", "/healthz/"):
        r = client.get(path + "?access_token=abc", headers={"Host": "evil.example"}, follow_redirects=False)
        assert r.status_code == 404 and r.json()["code"] == "not_found" and "location" not in r.headers


@pytest.mark.parametrize(
    "content_type", [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"]
)
def test_a_json_route_takes_only_json(client, service, fake, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    for url in (f"{API}/chat/s1", f"{API}/chat/s1/stream", f"{API}/context/conversations"):
        r = client.post(url, content=b'{"message": "hi"}', headers=headers)
        assert r.status_code == 415 and r.json()["code"] == "unsupported_media_type", r.text
    assert fake.requests == [] and service.rows("SELECT id FROM messages") == []  # no chat ran
    r = client.post(f"{API}/chat/s1", content=b'{"message": "hi"}',
                    headers={"Content-Type": "application/json; charset=utf-8"})  # fmt: skip
    assert r.status_code == 200


def test_only_the_call_that_stopped_an_answer_says_so(service, fake):
    fake.push(Reply.answer(["w "] * 400, pause=0.02))
    with LiveServer(service.settings) as live:
        reader = live.reader("POST", f"{API}/chat/s1/stream", json={"message": "long"})
        reader.next_event(), reader.next_event()
        replies, go = [], threading.Barrier(8)

        def stop() -> None:
            with live.client() as client:
                go.wait()
                replies.append(client.post(f"{API}/chat/s1/stop").json())

        threads = [threading.Thread(target=stop) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert len(replies) == 8 and len({r["message_id"] for r in replies if r["message_id"]}) == 1
        assert sum(r["stopped"] for r in replies) == 1, replies
        assert reader.until_end()[-1]["data"]["finish_reason"] == "stopped"


# ── slow clients ─────────────────────────────────────────────────────────────────────


def test_a_body_that_never_finishes_is_a_408(make_service):
    service = make_service(CHATSVC_READ_TIMEOUT="1")
    with LiveServer(service.settings) as live, socket.create_connection(("127.0.0.1", live.port)) as s:
        s.settimeout(10)
        s.sendall(f"POST {API}/chat/s1 HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: 100\r\n\r\n{{\"message\": ".encode())  # fmt: skip
        started = time.monotonic()
        answer = s.recv(4096)
        assert 0.8 < time.monotonic() - started < 5
        assert answer.startswith(b"HTTP/1.1 408") and b'"code":"request_timeout"' in answer


def test_unfinished_headers_do_not_hold_sockets(service, tmp_path):
    server = ServerProcess({**service.env, "CHATSVC_READ_TIMEOUT": "1"}, tmp_path).start()
    try:
        fds = lambda: len(list((__import__("pathlib").Path(f"/proc/{server.proc.pid}/fd")).iterdir()))  # noqa: E731
        before = fds()
        slow = []
        for _ in range(300):
            s = socket.create_connection(("127.0.0.1", server.port))
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # and never the rest
            slow.append(s)
        wait_for(lambda: fds() >= before + 250, 5)
        for s in slow:
            s.settimeout(5)
            assert s.recv(100).startswith(b"HTTP/1.1 408")
        wait_for(lambda: fds() <= before + 5, 5)  # the server let go of them
        with server.client() as client:
            assert client.get("/readyz").status_code == 200
    finally:
        for s in slow:
            s.close()
        server.stop()
