"""Answers from the web (docs/CONTRACT.md, "Answers from the web"): CHATSVC_WEB_SEARCH, a request's
and a conversation's `web_search`, the call to DashScope's native endpoint (its body, byte for byte as
JSON), the `sources` event before the text, the stored sources and search counts, and its errors."""

from __future__ import annotations

import json
import threading

import pytest
from fake_dashscope import NATIVE_PATH, SEARCH_RESULTS, Reply, native_error, native_events, native_frame
from live import LiveServer, SSEReader, parse_events
from support import wait_for

import chatsvc

API = "/api/v1"
SOURCES = [
    {"index": 1, "title": "全年高温日数可能创新高,杭州何时能“熄火”?", "url": "https://baijiahao.baidu.com/s?id=1843390963791748953",
     "site": "百家号"},
    {"index": 2, "title": "杭州天气预报杭州2025年09月17日天气", "url": "https://tianqi.eastday.com/tianqi/hangzhou/20250917.html",
     "site": "eastday"},
]  # fmt: skip
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}


def searched(chunks=("Hot [1]", " today [ref_2]."), **kw) -> Reply:
    return Reply.of_events(native_events(list(chunks), **kw))


def test_off_refuses_a_request_or_conversation_that_asks(client, fake):
    r = client.post(f"{API}/chat/s1", json={"message": "hi", "web_search": True})
    assert r.status_code == 422 and r.json()["code"] == "web_search_disabled"
    assert "CHATSVC_WEB_SEARCH=allowed" in r.json()["detail"]
    client.post(f"{API}/context/conversations", json={"session_id": "s2"})
    r = client.patch(f"{API}/context/conversations/s2", json={"web_search": {"forced_search": True}})
    assert r.status_code == 422 and r.json()["code"] == "web_search_disabled"
    assert fake.requests == []
    r = client.post(f"{API}/chat/s1", json={"message": "hi", "web_search": False})  # asks for nothing
    assert r.status_code == 200 and "sources" not in r.json()
    assert fake.requests[0].path == "/compatible-mode/v1/chat/completions"


def test_a_searched_stream_sends_sources_before_the_text_and_stores_them(make_service, fake):
    service = make_service(CHATSVC_WEB_SEARCH="allowed")
    fake.push(searched())
    with service.client() as client:
        options = {"forced_search": True, "enable_citation": True, "citation_format": "[ref_<number>]"}
        r = client.post(
            f"{API}/chat/s1/stream", json={"message": "weather?", "web_search": options, "temperature": 0.5}
        )
        events = parse_events(r.content)
        assert [e["type"] for e in events] == ["start", "sources", "chunk", "chunk", "end"]
        mid = events[0]["data"]["message_id"]
        assert [e["id"] for e in events] == [f"{mid}:{n}" for n in range(5)]
        assert events[1]["data"] == {"sources": SOURCES}
        end = events[-1]["data"]
        assert end["full_text"] == "Hot [1] today [ref_2]."  # citation marks stay as the model wrote them
        assert end["sources"] == SOURCES
        assert end["usage"] == {"prompt_tokens": 2940, "completion_tokens": 2, "total_tokens": 2942}
        seen = fake.requests[0]
        assert seen.path == NATIVE_PATH
        assert seen.headers["x-dashscope-sse"] == "enable" and seen.headers["accept"] == "text/event-stream"
        assert seen.headers["authorization"] == "Bearer sk-test-key"
        assert seen.body == {
            "model": "qwen-plus",
            "input": {"messages": [SYSTEM, {"role": "user", "content": "weather?"}]},
            "parameters": {
                "result_format": "message",
                "incremental_output": True,
                "temperature": 0.5,
                "enable_search": True,
                "search_options": {"enable_source": True, **options},
            },
        }
        row = service.rows("SELECT sources, searches, status FROM messages WHERE id = ?", mid)[0]
        assert json.loads(row["sources"]) == SOURCES and row["searches"] == 1 and row["status"] == "complete"
        calls = service.rows("SELECT searches, prompt_tokens, purpose FROM usage_calls WHERE message_id = ?", mid)
        assert calls == [{"searches": 1, "prompt_tokens": 2940, "purpose": "answer"}]
        shown = client.get(f"{API}/context/conversations/s1").json()["messages"][-1]
        assert shown["sources"] == SOURCES and shown["searches"] == 1
        # the plain reply carries them too
        fake.push(searched(["Again."], searches=2))
        reply = client.post(f"{API}/chat/s1", json={"message": "more", "web_search": True}).json()
        assert reply["sources"] == SOURCES and reply["response"] == "Again."
        assert fake.requests[1].body["parameters"]["search_options"] == {"enable_source": True}


def test_a_turn_without_search_sends_the_same_body_as_before(make_service, fake):
    bodies = []
    for mode in ("off", "allowed"):
        service = make_service(CHATSVC_WEB_SEARCH=mode)
        fake.reset()
        with service.client() as client:
            r = client.post(f"{API}/chat/s{mode}/stream", json={"message": "hi", "max_tokens": 7})
            types = [e["type"] for e in parse_events(r.content)]
            assert types[0] == "start" and types[-1] == "end" and "sources" not in types
            assert all("sources" not in e["data"] for e in parse_events(r.content))
        assert fake.requests[0].path == "/compatible-mode/v1/chat/completions"
        bodies.append(fake.requests[0].body)
    assert (
        bodies[0]
        == bodies[1]
        == {
            "model": "qwen-plus",
            "messages": [SYSTEM, {"role": "user", "content": "hi"}],
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": 7,
        }
    )


def test_the_conversation_setting_and_the_request_that_overrides_it(make_service, fake):
    service = make_service(CHATSVC_WEB_SEARCH="allowed")
    with service.client() as client:
        client.post(f"{API}/context/conversations", json={"session_id": "s1"})
        r = client.patch(f"{API}/context/conversations/s1", json={"web_search": {"freshness": 7}})
        assert r.status_code == 200 and r.json()["web_search"] == {"freshness": 7}
        assert client.get(f"{API}/context/conversations/s1").json()["web_search"] == {"freshness": 7}
        fake.push(searched(), Reply.answer(["plain"]), searched(["x"]))
        assert client.post(f"{API}/chat/s1", json={"message": "a"}).json()["sources"] == SOURCES
        assert fake.requests[0].body["parameters"]["search_options"] == {"enable_source": True, "freshness": 7}
        plain = client.post(f"{API}/chat/s1", json={"message": "b", "web_search": False}).json()
        assert "sources" not in plain and fake.requests[1].path.endswith("/chat/completions")
        client.post(f"{API}/chat/s1", json={"message": "c", "web_search": {"search_strategy": "max"}})
        assert fake.requests[2].body["parameters"]["search_options"] == {
            "enable_source": True,
            "search_strategy": "max",
        }
        r = client.patch(f"{API}/context/conversations/s1", json={"web_search": None})
        assert "web_search" not in r.json()
        fake.push(Reply.answer(["plain"]))
        client.post(f"{API}/chat/s1", json={"message": "d"})
        assert fake.requests[3].path.endswith("/chat/completions")


@pytest.mark.parametrize(
    ("value", "named"),
    [
        ({"forced_search": "yes"}, "web_search.forced_search"),
        ({"search_strategy": "pro"}, "web_search.search_strategy"),
        ({"freshness": 8}, "web_search.freshness"),
        ({"assigned_site_list": ["a"] * 26}, "web_search.assigned_site_list"),
        ({"citation_format": "<1>"}, "web_search.citation_format"),
        ({"enable_source": False}, "web_search.enable_source"),
        ("yes", "'web_search'"),
    ],
)
def test_invalid_search_options_are_refused_by_name(make_service, fake, value, named):
    service = make_service(CHATSVC_WEB_SEARCH="allowed")
    with service.client() as client:
        r = client.post(f"{API}/chat/s1", json={"message": "hi", "web_search": value})
    assert r.status_code == 422 and r.json()["code"] == "invalid_request" and named in r.json()["detail"]
    assert fake.requests == []


def test_always_searches_every_turn(make_service, fake):
    service = make_service(CHATSVC_WEB_SEARCH="always")
    fake.push(searched(), searched())
    with service.client() as client:
        client.post(f"{API}/chat/s1", json={"message": "a"})
        client.post(f"{API}/chat/s1", json={"message": "b", "web_search": {"forced_search": True}})
        r = client.post(f"{API}/chat/s1", json={"message": "c", "web_search": False})
        assert r.status_code == 422 and "CHATSVC_WEB_SEARCH=always" in r.json()["detail"]
    assert [s.path for s in fake.requests] == [NATIVE_PATH, NATIVE_PATH]
    assert fake.requests[0].body["parameters"]["search_options"] == {"enable_source": True}
    assert fake.requests[1].body["parameters"]["search_options"] == {"enable_source": True, "forced_search": True}


def test_native_errors_map_to_the_same_refusals(make_service, fake):
    service = make_service(CHATSVC_WEB_SEARCH="allowed")
    fake.push(
        native_error(400, "InvalidParameter", "Range of input length should be [1, 6000]"),
        native_error(401, "InvalidApiKey", "Invalid API-key provided."),
        native_error(400, "DataInspectionFailed", "Input data may contain inappropriate content."),
        Reply.of_events(
            [
                *native_events(["part"], finish="null")[:2],
                native_frame(3, {"code": "InternalError", "message": "boom", "request_id": "r"}, status=500),
            ]
        ),
    )
    with service.client() as client:
        got = [client.post(f"{API}/chat/s1", json={"message": "hi", "web_search": True}) for _ in range(4)]
    assert [(r.status_code, r.json()["code"]) for r in got] == [
        (422, "context_too_long"),
        (502, "upstream_auth"),
        (422, "content_filtered"),
        (502, "upstream_error"),
    ]
    assert "Range of input length" in got[0].json()["detail"] and got[3].json()["partial_text"] == "part"
    row = service.rows("SELECT status, content, sources FROM messages WHERE role = 'assistant' ORDER BY id")[-1]
    assert row["status"] == "failed" and row["content"] == "part" and json.loads(row["sources"]) == SOURCES


def test_resume_replays_the_sources_and_a_stop_keeps_them(make_service, fake):
    service = make_service(CHATSVC_WEB_SEARCH="allowed")
    hold = threading.Event()
    fake.push(Reply.of_events(native_events(["one", " two", " three"]), hold=hold, hold_at=2))
    with LiveServer(service.settings) as live, live.client() as client:
        reader = SSEReader(client, "POST", f"{API}/chat/s1/stream", json={"message": "q", "web_search": True})
        start, sources, chunk = reader.next_event(), reader.next_event(), reader.next_event()
        assert (sources["type"], chunk["type"]) == ("sources", "chunk")
        again = live.reader("GET", f"{API}/chat/s1/stream", headers={"Last-Event-ID": start["id"]})
        assert again.next_event() == sources and again.next_event() == chunk
        with live.client() as other:
            assert other.post(f"{API}/chat/s1/stop").json()["stopped"] is True
        end = reader.until_end()[-1]
        assert end["type"] == "end" and end["data"]["finish_reason"] == "stopped"
        assert end["data"]["sources"] == SOURCES
        assert again.until_end()[-1] == end
        hold.set()
        reader.close(), again.close()
    mid = start["data"]["message_id"]
    row = service.rows("SELECT status, content, sources FROM messages WHERE id = ?", mid)[0]
    assert row["status"] == "stopped" and row["content"] == "one" and json.loads(row["sources"]) == SOURCES
    wait_for(lambda: service.rows("SELECT 1 FROM usage_calls WHERE message_id = ? AND state = 'settled'", mid))


def test_web_search_needs_a_native_endpoint_at_start(fake):
    env = {"DASHSCOPE_BASE_URL": "http://127.0.0.1:8080/v1", "CHATSVC_WEB_SEARCH": "allowed"}
    with pytest.raises(ValueError, match="CHATSVC_DASHSCOPE_NATIVE_URL") as caught:
        chatsvc.Settings.from_env(env, env_file=None)
    assert "CHATSVC_WEB_SEARCH=off" in str(caught.value)
    given = chatsvc.Settings.from_env({**env, "CHATSVC_DASHSCOPE_NATIVE_URL": "http://x/gen/"}, env_file=None)
    assert given.native_url == "http://x/gen"
    derived = chatsvc.Settings.from_env({"CHATSVC_WEB_SEARCH": "always"}, env_file=None)
    assert derived.native_url == "https://dashscope.aliyuncs.com/api/v1/services/aigc/text-generation/generation"
    assert chatsvc.Settings.from_env({"DASHSCOPE_BASE_URL": "http://127.0.0.1:8080/v1"}, env_file=None)  # off: fine


# ── fixes after review (each was a reviewer's reproduction)


def test_a_search_without_results_sends_no_sources_event(make_service, fake):
    """CONTRACT: "A search that returned no results sends no `sources` event": [] is no sources."""
    service = make_service(CHATSVC_WEB_SEARCH="allowed")
    fake.push(searched(["Plain."], results=[]))
    with service.client() as client:
        events = parse_events(client.post(f"{API}/chat/s1/stream", json={"message": "q", "web_search": True}).content)
        assert [e["type"] for e in events] == ["start", "chunk", "end"]
        assert "sources" not in events[-1]["data"]
        shown = client.get(f"{API}/context/conversations/s1").json()["messages"][-1]
    assert "sources" not in shown
    mid = events[0]["data"]["message_id"]
    assert service.rows("SELECT sources FROM messages WHERE id = ?", mid)[0]["sources"] is None


def test_an_empty_first_search_info_does_not_hide_later_results(make_service, fake):
    """DashScope sends `[]` on frames that carry none: the first NON-empty list is the search's."""
    service = make_service(CHATSVC_WEB_SEARCH="allowed")
    frames = native_events(["Hot [1]."], results=[])
    late = {
        "output": {
            "choices": [{"message": {"content": "", "role": "assistant"}, "finish_reason": "null"}],
            "search_info": {"search_results": SEARCH_RESULTS},
        },
        "usage": {},
        "request_id": "x",
    }
    fake.push(Reply.of_events([frames[0], native_frame(9, late), *frames[1:]]))
    with service.client() as client:
        events = parse_events(client.post(f"{API}/chat/s1/stream", json={"message": "q", "web_search": True}).content)
    assert [e["type"] for e in events] == ["start", "sources", "chunk", "end"]
    assert events[1]["data"] == {"sources": SOURCES} and events[-1]["data"]["sources"] == SOURCES


def test_a_call_that_sent_its_sources_is_not_retried(make_service, fake):
    """The first attempt sends its sources (no text yet) and the connection drops. A new attempt would
    search again and its text could cite other pages than those shown and stored: once the sources
    were sent, the call has said something and is not retried; the stored sources are those sent."""
    service = make_service(CHATSVC_WEB_SEARCH="allowed", CHATSVC_UPSTREAM_RETRIES="1")
    fake.push(Reply.of_events(native_events(["never"])[:1], cut=True), searched(["See [1]."]))
    with service.client() as client:
        events = parse_events(client.post(f"{API}/chat/s1/stream", json={"message": "q", "web_search": True}).content)
    assert len(fake.requests) == 1  # not retried
    assert [e["type"] for e in events] == ["start", "sources", "error"]
    assert events[1]["data"] == {"sources": SOURCES} and events[-1]["data"]["code"] == "upstream_error"
    mid = events[0]["data"]["message_id"]
    row = service.rows("SELECT sources, status FROM messages WHERE id = ?", mid)[0]
    assert json.loads(row["sources"]) == SOURCES and row["status"] == "failed"


def test_a_searched_answer_with_tool_rounds_searches_in_its_first_round_only(make_service, fake):
    """Round 1 searches (its sources shown) and calls a tool; round 2 goes to the compatible endpoint
    without a search, so its "[1]" cites round 1's sources and no second search is paid for."""
    service = make_service(CHATSVC_WEB_SEARCH="allowed")
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "nope", "arguments": "{}"}}
    usage = {"input_tokens": 100, "output_tokens": 5, "total_tokens": 105, "plugins": {"search": {"count": 1}}}
    calling = {
        "output": {
            "choices": [
                {"message": {"content": "", "role": "assistant", "tool_calls": [call]}, "finish_reason": "tool_calls"}
            ]
        },
        "usage": usage,
        "request_id": "x",
    }
    fake.push(Reply.of_events([native_events([])[0], native_frame(2, calling)]), Reply.answer(["Per [1]."]))
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    with service.client() as client:
        r = client.post(f"{API}/chat/s1", json={"message": "q", "web_search": True, "tools": tools})
        body = r.json()
    assert r.status_code == 200, body
    assert [q.path for q in fake.requests] == [NATIVE_PATH, "/compatible-mode/v1/chat/completions"]
    second = fake.requests[1].body
    assert "enable_search" not in second and "parameters" not in second and second["tools"] == tools
    assert second["messages"][-2]["tool_calls"][0]["id"] == "call_1" and second["messages"][-1]["role"] == "tool"
    assert body["response"] == "Per [1]." and body["sources"] == SOURCES
    row = service.rows("SELECT sources, searches FROM messages WHERE id = ?", body["message_id"])[0]
    assert json.loads(row["sources"]) == SOURCES and row["searches"] == 1


def test_a_stop_after_the_sources_counts_the_search(make_service, fake):
    """The search ran (its sources were shown and stored), then the answer was stopped before the first
    frame with a usage: the ledger and the message count that search."""
    service = make_service(CHATSVC_WEB_SEARCH="allowed")
    hold = threading.Event()
    fake.push(Reply.of_events(native_events(["one", " two"]), hold=hold, hold_at=1))
    try:
        with LiveServer(service.settings) as live, live.client() as client:
            reader = SSEReader(client, "POST", f"{API}/chat/s1/stream", json={"message": "q", "web_search": True})
            start, sources = reader.next_event(), reader.next_event()
            assert sources["type"] == "sources"
            with live.client() as other:
                assert other.post(f"{API}/chat/s1/stop").json()["stopped"] is True
            assert reader.until_end()[-1]["data"]["finish_reason"] == "stopped"
            reader.close()
    finally:
        hold.set()
    mid = start["data"]["message_id"]
    wait_for(lambda: service.rows("SELECT 1 FROM usage_calls WHERE message_id = ? AND state = 'settled'", mid))
    row = service.rows("SELECT sources, searches FROM messages WHERE id = ?", mid)[0]
    call = service.rows("SELECT searches FROM usage_calls WHERE message_id = ?", mid)[0]
    assert json.loads(row["sources"]) == SOURCES
    assert call["searches"] == 1 and row["searches"] == 1, (call, row)


def test_sources_are_limited_to_web_links(make_service, fake):
    """A source whose url is javascript:/data: (or no http(s) URL with a host) is dropped: an app that
    renders `<a href=url>` is not handed a script."""
    service = make_service(CHATSVC_WEB_SEARCH="allowed")
    bad = [
        {"index": 1, "title": "x", "url": "javascript:alert(document.cookie)", "site_name": "s"},
        {"index": 2, "title": "y", "url": "data:text/html,<script>alert(1)</script>", "site_name": "s"},
        {"index": 3, "title": "z", "url": "https:/no-host", "site_name": "s"},
        {"index": 4, "title": "Fine", "url": "HTTPS://ok.example/a", "site_name": "ok"},
    ]
    fake.push(searched(["x"], results=bad))
    with service.client() as client:
        r = client.post(f"{API}/chat/s1", json={"message": "q", "web_search": True}).json()
    assert r["sources"] == [{"index": 4, "title": "Fine", "url": "HTTPS://ok.example/a", "site": "ok"}]


def test_sources_are_bounded_and_stored_at_the_checkpoint(make_service, fake):
    """At most 20 sources, each title <= 300 characters, site <= 200, url <= 2000; the checkpoint
    stores them once they came (a replica that catches up from it sends them again), before the end."""
    service = make_service(CHATSVC_WEB_SEARCH="allowed", CHATSVC_CHECKPOINT_SECONDS="0.05")
    results = [
        {"index": i, "title": "标" * 400, "url": f"https://e.example/{'p' * 2100}", "site_name": "s" * 300}
        for i in range(1, 26)
    ]
    hold = threading.Event()
    fake.push(Reply.of_events(native_events(["one", " two"], results=results), hold=hold, hold_at=2))
    try:
        with LiveServer(service.settings) as live, live.client() as client:
            reader = SSEReader(client, "POST", f"{API}/chat/s1/stream", json={"message": "q", "web_search": True})
            start, sources = reader.next_event(), reader.next_event()
            mid = start["data"]["message_id"]
            shown = sources["data"]["sources"]
            assert [s["index"] for s in shown] == list(range(1, 21))
            assert all(len(s["title"]) == 300 and len(s["site"]) == 200 and len(s["url"]) == 2000 for s in shown)
            row = wait_for(
                lambda: service.rows("SELECT sources, status FROM messages WHERE id = ? AND sources IS NOT NULL", mid)
            )
            assert row[0]["status"] == "streaming" and json.loads(row[0]["sources"]) == shown
            hold.set()
            assert reader.until_end()[-1]["data"]["sources"] == shown
            reader.close()
    finally:
        hold.set()


@pytest.mark.slow
def test_a_mirror_hears_a_large_sources_event(postgres_database, fake, tmp_path):
    """Replicas: a reader on replica A follows an answer running on B. Its sources event (20 results
    with long URLs: > 7,900 bytes, too long for one NOTIFY) reaches A's reader through the checkpoint."""
    pytest.importorskip("asyncpg")
    from procs import ServerProcess
    from support import EMPTY_POSTGRES, Service, pg
    from test_replicas import channel_listeners, start_together

    pg(postgres_database, EMPTY_POSTGRES)
    service = Service(postgres_database, fake, CHATSVC_HEARTBEAT_SECONDS="0.3", CHATSVC_CHECKPOINT_SECONDS="0.1",
                      CHATSVC_UPSTREAM_IDLE_TIMEOUT="30", CHATSVC_WEB_SEARCH="allowed")  # fmt: skip
    a, b = ServerProcess(service.env, tmp_path), ServerProcess(service.env, tmp_path)
    start_together(a, b)
    try:
        results = [
            {"index": i, "title": f"页面标题 {i} " * 5, "url": f"https://example.com/{'p' * 300}/{i}", "site_name": "e"}
            for i in range(1, 21)
        ]
        fake.push(Reply.of_events(native_events([f"w{i} " for i in range(20)], results=results), pause=0.02))
        listener = SSEReader(a.client(), "GET", f"{API}/chat/s1/stream")
        wait_for(lambda: channel_listeners(a) == 1, 30)
        poster = SSEReader(b.client(), "POST", f"{API}/chat/s1/stream", json={"message": "q", "web_search": True})
        posted = poster.until_end()
        heard = listener.until_end()
        assert [e["type"] for e in posted][:2] == ["start", "sources"]
        assert len(json.dumps(posted[1]["data"], ensure_ascii=False).encode()) > 7900
        assert [e["type"] for e in heard][:2] == ["start", "sources"], [e["type"] for e in heard][:4]
        assert heard[1]["data"] == posted[1]["data"]
        assert "".join(e["data"]["content"] for e in heard if e["type"] == "chunk") == posted[-1]["data"]["full_text"]
        assert heard[-1] == posted[-1]
        listener.close(), poster.close()
    finally:
        a.stop(), b.stop()


def test_a_stored_setting_is_not_shown_while_search_is_off(make_service, fake):
    """CONTRACT: with `off` "a conversation's stored setting is ignored and not shown", and it comes
    back once search is allowed again."""
    on = make_service(CHATSVC_WEB_SEARCH="allowed")
    with on.client() as client:
        client.post(f"{API}/context/conversations", json={"session_id": "s1"})
        assert client.patch(f"{API}/context/conversations/s1", json={"web_search": {"freshness": 7}}).status_code == 200
    off = make_service(CHATSVC_WEB_SEARCH="off")
    fake.push(Reply.answer(["plain"]))
    with off.client() as client:
        assert "web_search" not in client.get(f"{API}/context/conversations/s1").json()
        listed = client.get(f"{API}/context/conversations").json()
        assert listed["conversations"] and all("web_search" not in c for c in listed["conversations"])
        client.post(f"{API}/chat/s1", json={"message": "a"})
    assert fake.requests[-1].path.endswith("/chat/completions")  # it did not search
    with make_service(CHATSVC_WEB_SEARCH="allowed").client() as client:
        assert client.get(f"{API}/context/conversations/s1").json()["web_search"] == {"freshness": 7}


def test_export_then_import_keeps_an_answers_sources_and_the_conversations_setting(make_service, fake):
    """GET .../export is what POST .../import takes: the answer's sources and searches and the
    conversation's web_search come back; a file without them (and a bad source) as before/refused."""
    service = make_service(CHATSVC_WEB_SEARCH="allowed")
    fake.push(searched(["Hot [1]."]))
    with service.client() as client:
        client.post(f"{API}/context/conversations", json={"session_id": "s1"})
        client.patch(f"{API}/context/conversations/s1", json={"web_search": {"freshness": 7}})
        client.post(f"{API}/chat/s1", json={"message": "q"})
        doc = client.get(f"{API}/context/conversations/s1/export").json()
        assert doc["version"] == 3 and doc["conversation"]["web_search"] == {"freshness": 7}
        assert doc["messages"][-1]["sources"] == SOURCES and doc["messages"][-1]["searches"] == 1
        assert "sources" not in doc["messages"][0] and "searches" not in doc["messages"][0]
        r = client.post(f"{API}/context/conversations/import", json=doc)
        assert r.status_code in (200, 201), r.json()
        copy = client.get(f"{API}/context/conversations/{r.json()['session_id']}").json()
        assert copy["web_search"] == {"freshness": 7}
        assert copy["messages"][-1]["sources"] == SOURCES and copy["messages"][-1]["searches"] == 1
        row = service.rows("SELECT sources, searches FROM messages WHERE session_id = ? AND role = 'assistant'",
                           r.json()["session_id"])[0]  # fmt: skip
        assert json.loads(row["sources"]) == SOURCES and row["searches"] == 1
        bad = json.loads(json.dumps(doc))
        bad["messages"][-1]["sources"][0]["url"] = "javascript:alert(1)"
        r = client.post(f"{API}/context/conversations/import", json=bad)
        assert r.status_code == 422 and "messages[1].sources[0].url" in r.json()["detail"], r.json()
        bad = json.loads(json.dumps(doc))
        bad["conversation"]["web_search"] = {"freshness": 8}
        r = client.post(f"{API}/context/conversations/import", json=bad)
        assert r.status_code == 422 and "conversation.web_search.freshness" in r.json()["detail"], r.json()
        plain = json.loads(json.dumps(doc))
        del plain["conversation"]["web_search"], plain["messages"][-1]["sources"], plain["messages"][-1]["searches"]
        r = client.post(f"{API}/context/conversations/import", json=plain)
        copy = client.get(f"{API}/context/conversations/{r.json()['session_id']}").json()
        assert "web_search" not in copy and "sources" not in copy["messages"][-1]


def test_a_searched_turn_with_images_in_its_context_is_refused_clearly(make_service, fake):
    """DashScope's native text-generation endpoint takes no image parts: a searched turn whose context
    holds images is 422 web_search_unsupported (nothing sent, nothing stored), not an upstream 400."""
    from test_file_context import image

    service = make_service(CHATSVC_WEB_SEARCH="allowed", CHATSVC_VISION_MODEL="qwen3-vl-plus")
    with service.client() as client:
        red = image(client, "red.png")
        r = client.post(f"{API}/chat/s1", json={"message": "What is it?", "files": [red], "web_search": True})
        assert r.status_code == 422 and r.json()["code"] == "web_search_unsupported", r.json()
        assert "images" in r.json()["detail"] and '"web_search": false' in r.json()["detail"]
        assert fake.requests == [] and service.rows("SELECT id FROM messages") == []
        fake.push(Reply.answer(["A red square."]))
        r = client.post(f"{API}/chat/s1", json={"message": "What is it?", "files": [red], "web_search": False})
        assert r.status_code == 200 and "sources" not in r.json()
        r = client.post(f"{API}/chat/s1", json={"message": "And now?", "web_search": True})  # the image is in context
        assert r.status_code == 422 and r.json()["code"] == "web_search_unsupported"
    assert [q.path for q in fake.requests] == ["/compatible-mode/v1/chat/completions"]
