"""Answers that call tools (docs/CONTRACT.md, "Tools"): the app's own tools across two turns, and
the round loop that runs MCP servers' tools inside one answer, durable like any answer. The fake
DashScope streams tool calls as DashScope does; the MCP servers are real (tests/mcp_server.py)."""

from __future__ import annotations

import json

import mcp_server
import pytest
from fake_dashscope import Reply
from live import LiveServer, SSEReader, parse_events
from mcp_server import McpProcess
from procs import ServerProcess
from support import EMPTY_POSTGRES, wait_for

API = "/api/v1"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
ORDERS = {"type": "function", "function": {"name": "find_order", "parameters": {"type": "object", "properties": {}}}}


def sent(fake, n=-1) -> dict:
    """The body of the n-th request the model service received."""
    return fake.requests[n].body


def steps_of(service, message_id) -> list[dict]:
    row = service.rows("SELECT tool_steps FROM messages WHERE id = ?", message_id)[0]
    return json.loads(row["tool_steps"]) if row["tool_steps"] else []


# ── the app's own tools: an answer that waits for them, and the turn that answers them ───────


def test_without_tools_the_request_to_the_model_has_no_tool_keys(client, fake):
    client.post(f"{API}/chat/s1", json={"message": "hi"})
    assert not {"tools", "tool_choice", "parallel_tool_calls"} & set(sent(fake))


def test_client_tool_call_ends_the_answer_and_its_results_are_the_next_turn(client, service, fake):
    call = Reply.tool_calls([("get_weather", {"city": "杭州"})], content=["Let me look. "])
    fake.push(call, Reply.answer(["It is ", "sunny."]))
    r = client.post(f"{API}/chat/s1", json={"message": "Weather in Hangzhou?", "tools": [WEATHER]})
    assert r.status_code == 200, r.text
    first = r.json()
    call_id = call.calls[0]["id"]
    assert first["finish_reason"] == "tool_calls"
    assert first["response"] == "Let me look. "
    assert first["tool_calls"] == [{"id": call_id, "name": "get_weather", "arguments": '{"city": "杭州"}'}]
    assert [s["type"] for s in first["steps"]] == ["tool_call"]
    body = sent(fake, 0)
    assert body["tools"] == [WEATHER] and body["parallel_tool_calls"] is True and "tool_choice" not in body
    row = service.rows("SELECT status, finish_reason, content FROM messages WHERE id = ?", first["message_id"])[0]
    assert row == {"status": "complete", "finish_reason": "tool_calls", "content": "Let me look. "}

    r = client.post(
        f"{API}/chat/s1",
        json={"tool_results": [{"tool_call_id": call_id, "content": "sunny, 25°C"}], "tools": [WEATHER]},
    )
    assert r.status_code == 200, r.text
    second = r.json()
    assert second["response"] == "It is sunny." and second["finish_reason"] == "stop"
    assert sent(fake)["messages"] == [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Weather in Hangzhou?"},
        {
            "role": "assistant",
            "content": "Let me look. ",
            "tool_calls": [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "杭州"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call_id, "content": "sunny, 25°C"},
    ]
    rows = service.rows("SELECT id, parent_id, role, content, tool_results FROM messages ORDER BY id")
    assert [r["role"] for r in rows] == ["user", "assistant", "user", "assistant"]
    results_row = rows[2]
    assert results_row["parent_id"] == first["message_id"] and results_row["content"] == ""
    assert json.loads(results_row["tool_results"]) == [{"tool_call_id": call_id, "content": "sunny, 25°C"}]
    assert second["parent_id"] == results_row["id"]

    page = client.get(f"{API}/context/conversations/s1/messages").json()["messages"]
    assert [m["role"] for m in page] == ["user", "assistant", "tool", "assistant"]
    assert page[1]["tool_calls"] == first["tool_calls"]
    assert page[2]["tool_results"] == [{"tool_call_id": call_id, "content": "sunny, 25°C"}]

    # the next question: the whole exchange is the model's history
    fake.push(Reply.answer(["ok"]))
    client.post(f"{API}/chat/s1", json={"message": "And tomorrow?"})
    assert [m["role"] for m in sent(fake)["messages"]] == ["system", "user", "assistant", "tool", "assistant", "user"]


def test_client_tools_across_two_streamed_turns_with_the_channel_open(make_service, fake):
    service = make_service(CHATSVC_REPLAY_SECONDS="600")
    call = Reply.tool_calls([("get_weather", {"city": "Paris"}), ("find_order", {})], parallel="interleaved")
    fake.push(call, Reply.answer(["Done."]))
    with LiveServer(service.settings) as live:
        channel = live.reader("GET", f"{API}/chat/s1/stream")
        with live.client() as client:
            r = client.post(f"{API}/chat/s1/stream", json={"message": "both", "tools": [WEATHER, ORDERS]})
            first = parse_events(r.content)
            assert [e["type"] for e in first] == ["start", "tool_call", "tool_call", "end"]
            end = first[-1]["data"]
            assert end["finish_reason"] == "tool_calls" and end["full_text"] == ""
            assert [c["name"] for c in end["tool_calls"]] == ["get_weather", "find_order"]
            assert first[1]["data"] == {
                "id": call.calls[0]["id"],
                "name": "get_weather",
                "arguments": '{"city": "Paris"}',
                "round": 1,
            }
            results = [{"tool_call_id": c["id"], "content": f"result {k}"} for k, c in enumerate(end["tool_calls"])]
            r = client.post(f"{API}/chat/s1/stream", json={"tool_results": results})
            second = parse_events(r.content)
            assert [e["type"] for e in second] == ["start", "chunk", "end"]
        assert channel.until_end() == first
        assert channel.until_end() == second
    tool_messages = [m for m in sent(fake)["messages"] if m["role"] == "tool"]
    assert tool_messages == [
        {"role": "tool", "tool_call_id": c["id"], "content": f"result {k}"} for k, c in enumerate(end["tool_calls"])
    ]


@pytest.mark.parametrize(
    "results, words",
    [
        ([], "1 to 128"),
        ([{"tool_call_id": "call_x", "content": "r"}], "not a call it waits for"),
        ([{"tool_call_id": "ID", "content": "r"}, {"tool_call_id": "ID", "content": "r"}], "more than once"),
        ([{"tool_call_id": "ID", "content": 5}], "must be a string"),
        ([{"tool_call_id": "ID", "content": "a\x00b"}], "NUL"),
        ([{"tool_call_id": "ID"}, {"tool_call_id": "ID2", "content": "r", "extra": 1}], "must be a string"),
    ],
)
def test_tool_results_that_do_not_answer_the_calls_are_422_and_store_nothing(client, service, fake, results, words):
    call = Reply.tool_calls([("get_weather", {"city": "Paris"}), ("find_order", {})])
    fake.push(call)
    client.post(f"{API}/chat/s1", json={"message": "both", "tools": [WEATHER, ORDERS]})
    before = service.rows("SELECT COUNT(*) AS n FROM messages")[0]["n"]
    results = json.loads(json.dumps(results).replace('"ID"', json.dumps(call.calls[0]["id"])))
    r = client.post(f"{API}/chat/s1", json={"tool_results": results})
    assert r.status_code == 422, r.text
    assert r.json()["code"] == "invalid_request" and words in r.json()["detail"], r.json()
    assert service.rows("SELECT COUNT(*) AS n FROM messages")[0]["n"] == before
    assert len(fake.requests) == 1


def test_tool_results_need_an_answer_waiting_for_them(client, fake):
    r = client.post(f"{API}/chat/s1", json={"tool_results": [{"tool_call_id": "call_1", "content": "x"}]})
    assert r.status_code == 422 and "has none to answer" in r.json()["detail"]
    client.post(f"{API}/chat/s1", json={"message": "hi"})
    r = client.post(f"{API}/chat/s1", json={"tool_results": [{"tool_call_id": "call_1", "content": "x"}]})
    assert r.status_code == 422 and "finish_reason 'tool_calls'" in r.json()["detail"]
    r = client.post(f"{API}/chat/s1", json={"message": "hi", "tool_results": [{"tool_call_id": "c", "content": "x"}]})
    assert r.status_code == 422 and "turn of its own" in r.json()["detail"]


@pytest.mark.parametrize(
    "body, words",
    [
        ({"tools": {"a": 1}}, "'tools' must be a list"),
        ({"tools": [{"type": "function", "function": {"name": "a.b"}}]}, "function.name must be 1 to 64"),
        ({"tools": [WEATHER, WEATHER]}, "given twice"),
        ({"tools": [{"type": "function", "function": {"name": "a", "parameters": []}}]}, "JSON Schema object"),
        ({"tools": [{"name": "a"}]}, "'tools[0]' must be"),
        ({"tool_choice": "auto"}, "needs tools to choose from"),
        ({"tool_choice": "sometimes", "tools": [WEATHER]}, "'tool_choice' must be"),
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": [WEATHER]}, "not among"),
        ({"server_tools": "yes"}, "'server_tools' must be true"),
        ({"server_tools": ["nope__x"]}, "which no MCP server offers"),
    ],
)
def test_bad_tools_are_422_before_anything_is_stored(client, service, fake, body, words):
    r = client.post(f"{API}/chat/s1", json={"message": "hi", **body})
    assert r.status_code == 422, r.text
    assert r.json()["code"] == "invalid_request" and words in r.json()["detail"], r.json()
    assert service.rows("SELECT COUNT(*) AS n FROM messages")[0]["n"] == 0
    assert fake.requests == []


def test_tool_choice_and_a_narrowed_offer_reach_the_model(client, fake):
    fake.push(Reply.answer(["no tool needed"]))
    choice = {"type": "function", "function": {"name": "find_order"}}
    r = client.post(f"{API}/chat/s1", json={"message": "hi", "tools": [WEATHER, ORDERS], "tool_choice": choice})
    assert r.status_code == 200
    assert sent(fake)["tool_choice"] == choice and [t["function"]["name"] for t in sent(fake)["tools"]] == [
        "get_weather",
        "find_order",
    ]


def test_an_unknown_tool_is_an_error_result_the_model_sees_and_the_answer_goes_on(client, service, fake):
    call = Reply.tool_calls([("launch_rockets", {"n": 3})])
    fake.push(call, Reply.answer(["I cannot do that."]))
    r = client.post(f"{API}/chat/s1", json={"message": "go", "tools": [WEATHER]})
    body = r.json()
    assert body["response"] == "I cannot do that." and body["finish_reason"] == "stop"
    result = body["steps"][1]["data"]
    assert result["outcome"] == "unknown_tool" and result["error"] == "There is no tool named 'launch_rockets'."
    assert sent(fake)["messages"][-1] == {
        "role": "tool",
        "tool_call_id": call.calls[0]["id"],
        "content": "Error: There is no tool named 'launch_rockets'.",
    }
    steps = steps_of(service, body["message_id"])
    assert [(s["type"], s["seq"]) for s in steps] == [("tool_call", 1), ("tool_result", 2)]


def test_regenerating_an_answer_to_tool_results_sends_the_results_again(client, service, fake):
    call = Reply.tool_calls([("get_weather", {"city": "Oslo"})])
    fake.push(call, Reply.answer(["cold"]), Reply.answer(["freezing"]))
    client.post(f"{API}/chat/s1", json={"message": "Oslo?", "tools": [WEATHER]})
    results = [{"tool_call_id": call.calls[0]["id"], "content": "-5°C"}]
    answer = client.post(f"{API}/chat/s1", json={"tool_results": results}).json()
    again = client.post(f"{API}/chat/s1", json={"regenerate": answer["message_id"]}).json()
    assert again["response"] == "freezing" and again["parent_id"] == answer["parent_id"]
    assert sent(fake, -1)["messages"] == sent(fake, -2)["messages"]


def test_a_new_question_instead_of_results_leaves_the_unanswered_calls_out(client, fake):
    fake.push(Reply.tool_calls([("get_weather", {"city": "Oslo"})], content=["Checking."]), Reply.answer(["ok"]))
    client.post(f"{API}/chat/s1", json={"message": "Oslo?", "tools": [WEATHER]})
    client.post(f"{API}/chat/s1", json={"message": "never mind"})
    assert sent(fake)["messages"][1:] == [
        {"role": "user", "content": "Oslo?"},
        {"role": "assistant", "content": "Checking."},
        {"role": "user", "content": "never mind"},
    ]


# ── MCP servers' tools: rounds inside one answer ───────────────────────────────────────────

mcp_http = mcp_server.mcp_http  # a fixture: a started HTTP MCP server


def tooled(make_service, server: McpProcess, entry: dict | None = None, **env: str):
    """A service offering the MCP server's tools as `t__<tool>`."""
    return make_service(CHATSVC_MCP_SERVERS=json.dumps({"t": entry or server.entry()}), **env)


def ready(client) -> None:
    wait_for(lambda: client.app.state.toolbox.find("t__echo") is not None, 20)


def echo(text: str, call_id: str | None = None) -> tuple:
    return ("t__echo", {"text": text}, *([call_id] if call_id else []))


def calls_in(events) -> list[str]:
    return [e["type"] for e in events if e["type"] in ("tool_call", "tool_result")]


def test_a_server_tool_round_inside_one_answer(make_service, fake, mcp_http):
    service = tooled(make_service, mcp_http)
    call = Reply.tool_calls([echo("hi")], content=["Asking. "])
    fake.push(call, Reply.answer(["The tool said ", "hi."]))
    with service.client() as client:
        ready(client)
        r = client.post(f"{API}/chat/s1", json={"message": "say hi"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["response"] == "Asking. The tool said hi." and body["finish_reason"] == "stop"
        assert "tool_calls" not in body
        call_id = call.calls[0]["id"]
        assert body["steps"] == [
            {
                "type": "tool_call",
                "data": {
                    "id": call_id,
                    "name": "t__echo",
                    "arguments": '{"text": "hi"}',
                    "round": 1,
                    "server": "t",
                    "tool": "echo",
                },
            },
            {
                "type": "tool_result",
                "data": {
                    "id": call_id,
                    "content": "echo: hi",
                    "duration_ms": body["steps"][1]["data"]["duration_ms"],
                    "outcome": "ok",
                },
            },
        ]
        first, second = sent(fake, 0), sent(fake, 1)
        offered = {t["function"]["name"]: t["function"] for t in first["tools"]}
        assert {"t__echo", "t__fail", "t__hang", "t__big", "t__nothing", "t__whoami"} <= set(offered)
        assert offered["t__echo"]["parameters"]["properties"]["text"]["type"] == "string"
        assert first["parallel_tool_calls"] is True and "tool_choice" not in first
        assert second["tools"] == first["tools"] and second["messages"][:2] == first["messages"]
        assert second["messages"][2:] == [
            {
                "role": "assistant",
                "content": "Asking. ",
                "tool_calls": [
                    {"id": call_id, "type": "function", "function": {"name": "t__echo", "arguments": '{"text": "hi"}'}}
                ],
            },
            {"role": "tool", "tool_call_id": call_id, "content": "echo: hi"},
        ]
        metrics = client.get("/metrics").text
        assert 'chatsvc_tool_calls_total{outcome="ok",server="t",tool="echo"} 1.0' in metrics
        assert "chatsvc_tool_rounds_count 1.0" in metrics
        # stored: one answer row with its steps; its next turn sends the rounds back as they were
        steps = steps_of(service, body["message_id"])
        assert [(s["type"], s["seq"], s["text"]) for s in steps] == [("tool_call", 2, 8), ("tool_result", 3, 8)]
        fake.push(Reply.answer(["ok"]))
        client.post(f"{API}/chat/s1", json={"message": "again?"})
        assert sent(fake)["messages"][2:5] == [
            *second["messages"][2:4],
            {"role": "assistant", "content": "The tool said hi."},
        ]


def test_three_rounds_parallel_calls_and_thinking_resume_at_every_event(make_service, fake, mcp_http):
    service = tooled(make_service, mcp_http, CHATSVC_REPLAY_SECONDS="600")
    rounds = [
        Reply.tool_calls([echo("a"), echo("b")], reasoning=["I need ", "two things."], parallel="interleaved"),
        Reply.tool_calls([("t__fail", {"reason": "no stock"}), ("t__echo", '{"text": ')], content=["Hmm. "]),
        Reply.tool_calls([("t__nothing", "")], reasoning=["once more"]),
        Reply.answer(["All ", "done."], reasoning=["fine"]),
    ]
    fake.push(*rounds)
    with LiveServer(service.settings) as live:
        wait_for(lambda: live.app.state.toolbox.find("t__echo") is not None, 20)
        with live.client() as client:
            full = parse_events(client.post(f"{API}/chat/s1/stream", json={"message": "go"}).content)
        types = [e["type"] for e in full]
        assert types[0] == "start" and types[-1] == "end"
        assert calls_in(full) == ["tool_call"] * 2 + ["tool_result"] * 2 + ["tool_call"] * 2 + ["tool_result"] * 2 + [
            "tool_call",
            "tool_result",
        ]
        results = {e["data"]["id"]: e["data"] for e in full if e["type"] == "tool_result"}
        ids = [c["id"] for r in rounds[:3] for c in r.calls]
        assert [results[i]["outcome"] for i in ids] == ["ok", "ok", "error", "bad_arguments", "ok"]
        assert results[ids[2]]["error"] == "Error executing tool fail: failed: no stock"
        end = full[-1]["data"]
        assert end["full_text"] == "Hmm. All done." and end["finish_reason"] == "stop"
        for k, seen in enumerate(full[:-1]):  # Last-Event-ID at every event: the rest, exactly
            reader = live.reader("GET", f"{API}/chat/s1/stream", headers={"Last-Event-ID": seen["id"]})
            assert reader.until_end() == full[k + 1 :], k
            reader.close()
    stored = service.rows(
        "SELECT content, reasoning_content, status, tool_steps FROM messages WHERE role = 'assistant'"
    )
    assert stored[0]["content"] == "Hmm. All done." and stored[0]["status"] == "complete"
    assert stored[0]["reasoning_content"] == "I need two things.once morefine"
    assert [s["data"] for s in json.loads(stored[0]["tool_steps"])] == [
        e["data"] for e in full if e["type"] in ("tool_call", "tool_result")
    ]
    last = sent(fake)["messages"]
    assert [m["role"] for m in last] == ["system", "user"] + ["assistant", "tool", "tool"] * 2 + ["assistant", "tool"]
    assert last[5]["tool_calls"][1]["function"]["arguments"] == "{}"  # not JSON: sent back as {}
    assert last[5]["content"] == "Hmm. "


def test_tool_limits_timeout_and_huge_results(make_service, fake, mcp_http):
    service = tooled(
        make_service,
        mcp_http,
        mcp_http.entry(timeout=2),
        CHATSVC_MAX_TOOL_RESULT_CHARS="100",
        CHATSVC_MAX_TOOL_ROUNDS="2",
    )
    fake.push(
        Reply.tool_calls([("t__hang", {}), ("t__big", {"n": 100_000})]),
        Reply.tool_calls([echo("x")]),
        Reply.tool_calls([echo("y")], content=["still "]),  # told tool_choice none: kept, not run
    )
    with service.client() as client:
        ready(client)
        body = client.post(f"{API}/chat/s1", json={"message": "go", "tool_choice": "auto"}).json()
    assert body["finish_reason"] == "tool_rounds" and body["response"] == "still "
    outcomes = [s["data"].get("outcome") for s in body["steps"] if s["type"] == "tool_result"]
    assert sorted(outcomes) == ["ok", "ok", "timeout"]  # (in the order they finished)
    results = {s["data"]["id"]: s["data"] for s in body["steps"] if s["type"] == "tool_result"}
    calls = [s["data"] for s in body["steps"] if s["type"] == "tool_call"]
    assert [c["name"] for c in calls] == ["t__hang", "t__big", "t__echo", "t__echo"]
    assert results[calls[0]["id"]]["outcome"] == "timeout"
    assert results[calls[1]["id"]]["content"].endswith(
        "[cut: the result had 100000 characters; the first 100 are shown]"
    )
    assert calls[3]["id"] not in results  # the call past the limit is not run
    assert [sent(fake, n).get("tool_choice") for n in range(3)] == ["auto", "auto", "none"]
    wait_for(lambda: "cancelled hang" in mcp_http.records(), 10)


def test_stop_during_a_tool_call_cancels_it_and_stores_the_steps_so_far(make_service, fake, mcp_http):
    service = tooled(make_service, mcp_http)
    call = Reply.tool_calls([echo("first")])
    fake.push(call, Reply.tool_calls([("t__hang", {"seconds": 60})], content=["then "]))
    with LiveServer(service.settings) as live:
        wait_for(lambda: live.app.state.toolbox.find("t__echo") is not None, 20)
        poster = live.reader("POST", f"{API}/chat/s1/stream", json={"message": "go"})
        while poster.next_event()["type"] != "tool_call" or poster.events[-1]["data"]["name"] != "t__hang":
            pass
        wait_for(lambda: "start hang" in mcp_http.records(), 10)
        with live.client() as client:
            busy = client.post(f"{API}/chat/s1", json={"message": "meanwhile"})
            assert busy.status_code == 409 and busy.json()["code"] == "conversation_busy"
            stopped = client.post(f"{API}/chat/s1/stop").json()
        assert stopped["stopped"] is True
        poster.until_end()
        events = poster.events
        assert events[-1]["type"] == "end" and events[-1]["data"]["finish_reason"] == "stopped"
        assert events[-1]["data"]["full_text"] == "then "
        assert calls_in(events) == ["tool_call", "tool_result", "tool_call"]
    wait_for(lambda: "cancelled hang" in mcp_http.records(), 10)
    row = service.rows("SELECT status, content, tool_steps FROM messages WHERE role = 'assistant'")[0]
    assert row["status"] == "stopped" and row["content"] == "then "
    assert [s["type"] for s in json.loads(row["tool_steps"])] == ["tool_call", "tool_result", "tool_call"]
    # the call without a result is left out of the next context
    fake.push(Reply.answer(["ok"]))
    with service.client() as client:
        client.post(f"{API}/chat/s1", json={"message": "next"})
    assert [m["role"] for m in sent(fake)["messages"]] == ["system", "user", "assistant", "tool", "assistant", "user"]
    assert sent(fake)["messages"][4] == {"role": "assistant", "content": "then "}


def test_server_tools_narrowed_or_none_and_mixed_with_the_apps_own(make_service, fake, mcp_http):
    service = tooled(make_service, mcp_http)
    with service.client() as client:
        ready(client)
        fake.push(Reply.answer(["a"]), Reply.answer(["b"]))
        client.post(f"{API}/chat/s1", json={"message": "none", "server_tools": False})
        assert "tools" not in sent(fake)
        client.post(f"{API}/chat/s2", json={"message": "one", "server_tools": ["t__echo"], "tools": [WEATHER]})
        assert [t["function"]["name"] for t in sent(fake)["tools"]] == ["t__echo", "get_weather"]
        r = client.post(
            f"{API}/chat/s3", json={"message": "x", "tools": [{**WEATHER, "function": {"name": "t__echo"}}]}
        )
        assert r.status_code == 422 and "MCP server's tool" in r.json()["detail"]
        # one round calling both kinds: the server's runs, then the answer waits for the app's
        both = Reply.tool_calls([echo("srv"), ("get_weather", {"city": "Rome"})])
        fake.push(both, Reply.answer(["Sunny in Rome."]))
        body = client.post(f"{API}/chat/s4", json={"message": "both", "tools": [WEATHER]}).json()
        assert body["finish_reason"] == "tool_calls"
        assert body["tool_calls"] == [
            {"id": both.calls[1]["id"], "name": "get_weather", "arguments": '{"city": "Rome"}'}
        ]
        assert calls_in(body["steps"]) == ["tool_call", "tool_call", "tool_result"]
        r = client.post(
            f"{API}/chat/s4", json={"tool_results": [{"tool_call_id": both.calls[1]["id"], "content": "sunny"}]}
        )
        assert r.status_code == 200, r.text
        assert r.json()["response"] == "Sunny in Rome."
        assert [m["role"] for m in sent(fake)["messages"]] == ["system", "user", "assistant", "tool", "tool"]
        assert [m["tool_call_id"] for m in sent(fake)["messages"][3:]] == [c["id"] for c in both.calls]
        # the app's call first: its result is sent first too (call order), the server's after it
        mixed = Reply.tool_calls([("get_weather", {"city": "Oslo"}), echo("srv")])
        fake.push(mixed, Reply.answer(["Cold."]))
        body = client.post(f"{API}/chat/s5", json={"message": "both", "tools": [WEATHER]}).json()
        results = [{"tool_call_id": mixed.calls[0]["id"], "content": "cold"}]
        assert client.post(f"{API}/chat/s5", json={"tool_results": results}).status_code == 200
        assert [(m["tool_call_id"], m["content"]) for m in sent(fake)["messages"][3:]] == [
            (mixed.calls[0]["id"], "cold"),
            (mixed.calls[1]["id"], "echo: srv"),
        ]


def test_the_owner_reaches_the_server_as_a_header(make_service, fake, mcp_http):
    entry = mcp_http.entry(owner_header="X-App-User")
    service = tooled(make_service, mcp_http, entry, CHATSVC_USER_HEADER="X-User")
    fake.push(Reply.tool_calls([("t__whoami", {"header": "x-app-user"})]), Reply.answer(["ok"]))
    with service.client() as client:
        ready(client)
        body = client.post(f"{API}/chat/s1", json={"message": "who"}, headers={"X-User": "alice"}).json()
    assert body["steps"][1]["data"]["content"] == "alice"


def test_regenerating_a_multi_round_answer_sends_the_question_not_the_old_steps(make_service, fake, mcp_http):
    service = tooled(make_service, mcp_http)
    fake.push(Reply.tool_calls([echo("1")]), Reply.tool_calls([echo("2")]), Reply.answer(["first"]))
    with service.client() as client:
        ready(client)
        answer = client.post(f"{API}/chat/s1", json={"message": "q"}).json()
        assert len(fake.requests) == 3
        fake.push(Reply.answer(["second"]))
        again = client.post(f"{API}/chat/s1", json={"regenerate": answer["message_id"]}).json()
    assert again["response"] == "second"
    assert sent(fake)["messages"] == sent(fake, 0)["messages"]


def test_old_tool_results_are_the_first_to_be_shortened(make_service, fake, mcp_http):
    service = tooled(make_service, mcp_http, CHATSVC_MAX_CONTEXT_TOKENS="550", CHATSVC_MAX_TOOL_RESULT_CHARS="1500")
    with service.client() as client:
        ready(client)
        for n in range(2):
            fake.push(Reply.tool_calls([("t__big", {"n": 1200})]), Reply.answer([f"answer {n}"]))
            client.post(f"{API}/chat/s1", json={"message": f"q{n}"})
        fake.push(Reply.answer(["ok"]))
        client.post(f"{API}/chat/s1", json={"message": "last"})
    messages = sent(fake)["messages"]
    tools = [m["content"] for m in messages if m["role"] == "tool"]
    assert [m["role"] for m in messages][:2] == ["system", "user"]
    assert tools[-1] == "x" * 1200  # the newest result whole
    assert tools[0] == "[result omitted to fit the context: 1200 characters]"  # an older one shortened


@pytest.mark.slow
def test_sigkill_during_a_tool_call_keeps_every_finished_step(service, fake, tmp_path):
    server_mcp = McpProcess.http(tmp_path)
    env = {
        **service.env,
        "CHATSVC_MCP_SERVERS": json.dumps({"t": server_mcp.entry()}),
        "CHATSVC_CHECKPOINT_SECONDS": "5",  # steps are stored at once, not on the checkpoint's clock
        "CHATSVC_HEARTBEAT_SECONDS": "0.2",
    }
    call = Reply.tool_calls([echo("done")], content=["Working. "])
    fake.push(call, Reply.tool_calls([("t__hang", {"seconds": 60})]))
    server = ServerProcess(env, tmp_path).start()
    try:
        with server.client() as client:
            wait_for(lambda: 'chatsvc_mcp_server_up{server="t"} 1.0' in client.get("/metrics").text, 20)
            reader = SSEReader(client, "POST", f"{API}/chat/s1/stream", json={"message": "go"})
            while not (reader.next_event()["type"] == "tool_call" and reader.events[-1]["data"]["name"] == "t__hang"):
                pass
            wait_for(lambda: "start hang" in server_mcp.records(), 10)
            wait_for(
                lambda: (
                    len(
                        json.loads(
                            service.rows("SELECT tool_steps FROM messages WHERE role = 'assistant'")[0]["tool_steps"]
                            or "[]"
                        )
                    )
                    == 3
                ),
                5,
            )
            server.kill()
        server = ServerProcess(env, tmp_path).start()
        with server.client() as client:
            wait_for(lambda: client.get(f"{API}/context/conversations/s1").json()["generating"] is False, 5)
            answer = client.get(f"{API}/context/conversations/s1").json()["messages"][1]
            assert answer["status"] == "interrupted" and answer["content"] == "Working. "
            assert [s["type"] for s in answer["steps"]] == ["tool_call", "tool_result", "tool_call"]
            assert answer["steps"][1]["data"]["content"] == "echo: done"
            fake.push(Reply.answer(["fine"]))
            assert client.post(f"{API}/chat/s1", json={"message": "again"}).json()["response"] == "fine"
        assert [m["role"] for m in sent(fake)["messages"]] == ["system", "user", "assistant", "tool", "user"]
    finally:
        server.stop()
        server_mcp.stop()


# ── replicas: an answer's tool rounds followed and stopped from another replica ──────────────


@pytest.fixture
def tool_cluster(postgres_database, fake, tmp_path, mcp_http):
    from support import Service, pg
    from test_replicas import start_together

    pg(postgres_database, EMPTY_POSTGRES)
    service = Service(
        postgres_database,
        fake,
        CHATSVC_HEARTBEAT_SECONDS="0.3",
        CHATSVC_CHECKPOINT_SECONDS="5",  # steps are stored at once: a late mirror catches up from them
        CHATSVC_UPSTREAM_IDLE_TIMEOUT="30",
        CHATSVC_MCP_SERVERS=json.dumps({"t": mcp_http.entry()}),
    )
    a, b = ServerProcess(service.env, tmp_path), ServerProcess(service.env, tmp_path)
    start_together(a, b)
    for server in (a, b):
        with server.client() as client:
            wait_for(lambda c=client: 'chatsvc_mcp_server_up{server="t"} 1.0' in c.get("/metrics").text, 20)
    yield service, a, b
    for server in (a, b):
        server.stop()
    for server in (a, b):
        assert "Traceback" not in server.log(), server.log()


@pytest.mark.slow
def test_a_replica_follows_a_tool_answer_joins_mid_tool_call_and_stops_it(tool_cluster, fake, mcp_http):
    service, a, b = tool_cluster
    # a result too long for one notification, text, then a call that hangs until stopped
    fake.push(
        Reply.tool_calls([("t__big", {"n": 20000})], content=["Reading. "]),
        Reply.tool_calls([("t__hang", {"seconds": 60})], content=["Waiting. "]),
    )
    early = SSEReader(b.client(), "GET", f"{API}/chat/s1/stream")
    from test_replicas import channel_listeners

    wait_for(lambda: channel_listeners(b) == 1, 30)
    poster = SSEReader(a.client(), "POST", f"{API}/chat/s1/stream", json={"message": "go"})
    while not (poster.next_event()["type"] == "tool_call" and poster.events[-1]["data"]["name"] == "t__hang"):
        pass
    wait_for(lambda: "start hang" in mcp_http.records(), 10)
    late = SSEReader(b.client(), "GET", f"{API}/chat/s1/stream")  # joins mid-tool-call: filled from the store
    first_id = poster.events[0]["id"]
    resumed = SSEReader(b.client(), "GET", f"{API}/chat/s1/stream", headers={"Last-Event-ID": first_id})
    seen_late = [late.next_event() for _ in range(len(poster.events))]
    with b.client() as client:
        r = client.post(f"{API}/chat/s1/stop")
    assert r.status_code == 200 and r.json()["stopped"] is True
    poster.until_end()
    posted = poster.events
    assert posted[-1]["type"] == "end" and posted[-1]["data"]["finish_reason"] == "stopped"
    assert early.until_end() == posted
    assert seen_late + late.until_end() == posted
    assert resumed.until_end() == posted[1:]
    big = next(e for e in posted if e["type"] == "tool_result")
    assert big["data"]["content"].startswith("x" * 19000)
    with b.client() as client:  # the result too long to notify: one catch-up from the store, not one per check
        assert "chatsvc_bus_gaps_total 1.0" in client.get("/metrics").text
    wait_for(lambda: "cancelled hang" in mcp_http.records(), 10)
    row = service.rows("SELECT status, content, tool_steps FROM messages WHERE role = 'assistant'")[0]
    assert row["status"] == "stopped" and row["content"] == "Reading. Waiting. "
    assert [s["type"] for s in json.loads(row["tool_steps"])] == ["tool_call", "tool_result", "tool_call"]
    for reader in (early, late, resumed, poster):
        reader.close()


def test_an_answer_failing_after_a_tool_round_waits_for_nothing(client, service, fake):
    # round 1 ends with finish_reason tool_calls; round 2 fails: the answer is failed, waiting for nothing
    fake.push(Reply.tool_calls([("nosuch", {})]), Reply.error(400, "invalid_parameter_error", "bad request"))
    r = client.post(f"{API}/chat/s2", json={"message": "go", "tools": [WEATHER]})
    assert r.status_code == 502 and r.json()["code"] == "upstream_error", r.text
    row = service.rows("SELECT status, finish_reason FROM messages WHERE session_id = 's2' AND role = 'assistant'")
    assert row == [{"status": "failed", "finish_reason": None}]
    page = client.get(f"{API}/context/conversations/s2/messages").json()["messages"]
    assert "tool_calls" not in page[1] and [s["type"] for s in page[1]["steps"]] == ["tool_call", "tool_result"]
    r = client.post(f"{API}/chat/s2", json={"tool_results": [{"tool_call_id": "x", "content": "y"}]})
    assert r.status_code == 422 and "did not" in r.json()["detail"]


def test_usage_is_the_sum_of_the_rounds(client, fake):
    one = {"prompt_tokens": 1000, "completion_tokens": 50, "total_tokens": 1050}
    two = {"prompt_tokens": 1100, "completion_tokens": 5, "total_tokens": 1105}
    fake.push(Reply.tool_calls([("nosuch", {})], usage=one), Reply.answer(["ok"], usage=two))
    body = client.post(f"{API}/chat/s1", json={"message": "go", "tools": [WEATHER]}).json()
    assert body["usage"] == {"prompt_tokens": 2100, "completion_tokens": 55, "total_tokens": 2155}
    page = client.get(f"{API}/context/conversations/s1/messages").json()["messages"]
    assert page[1]["usage"] == body["usage"]


def test_tools_whose_text_cannot_be_sent_are_422(client, service, fake):
    body = b'{"message": "hi", "tools": [{"type": "function", "function": {"name": "a", "description": "\\ud800"}}]}'
    r = client.post(f"{API}/chat/s1", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "unpaired surrogate" in r.json()["detail"], r.text
    body = (
        b'{"message": "hi", "tools": [{"type": "function", "function": {"name": "a", "parameters": {"x": "\\udfff"}}}]}'
    )
    r = client.post(f"{API}/chat/s1", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "tools[0].function.parameters" in r.json()["detail"], r.text
    assert service.rows("SELECT COUNT(*) AS n FROM messages")[0]["n"] == 0 and fake.requests == []


def test_a_result_unlike_its_schema_is_an_error_and_the_server_stays_up(make_service, fake, mcp_http):
    service = tooled(make_service, mcp_http)
    fake.push(Reply.tool_calls([("t__misshapen", {})]), Reply.tool_calls([echo("still")]), Reply.answer(["ok"]))
    with service.client() as client:
        ready(client)
        body = client.post(f"{API}/chat/s1", json={"message": "go"}).json()
        results = [s["data"] for s in body["steps"] if s["type"] == "tool_result"]
        assert results[0]["outcome"] == "error" and "could not be read" in results[0]["error"]
        assert (results[1]["outcome"], results[1]["content"]) == ("ok", "echo: still")  # the same connection
        assert 'chatsvc_mcp_server_up{server="t"} 1.0' in client.get("/metrics").text


def test_a_non_ascii_owner_reaches_the_server_as_the_same_bytes(make_service, fake, mcp_http):
    service = tooled(make_service, mcp_http, mcp_http.entry(owner_header="X-App-User"), CHATSVC_USER_HEADER="X-User")
    fake.push(Reply.tool_calls([("t__whoami", {"header": "x-app-user"})]), Reply.answer(["ok"]))
    with service.client() as client:
        ready(client)
        body = client.post(f"{API}/chat/s1", json={"message": "who"}, headers={"X-User": "josé".encode()}).json()
    assert body["steps"][1]["data"].get("content") == "josé".encode().decode("latin-1"), body["steps"]


def test_search_finds_a_result_by_its_first_20000_characters(make_service, fake):
    with make_service(CHATSVC_MAX_CONTEXT_TOKENS="100000").client() as client:
        search_results(client, fake)


def search_results(client, fake):
    fake.push(Reply.tool_calls([("get_weather", {"city": "Oslo"}), ("find_order", {})]), Reply.answer(["ok"]))
    body = client.post(f"{API}/chat/s1", json={"message": "go", "tools": [WEATHER, ORDERS]}).json()
    first, second = (c["id"] for c in body["tool_calls"])
    results = [
        {"tool_call_id": first, "content": "near qzvfound here"},
        {"tool_call_id": second, "content": "a" * 25_000 + " qzvfar beyond"},
    ]
    assert client.post(f"{API}/chat/s1", json={"tool_results": results}).status_code == 200

    def found(q: str) -> list[str]:
        return [
            c["session_id"] for c in client.get(f"{API}/context/conversations", params={"q": q}).json()["conversations"]
        ]

    assert found("qzvfound") == ["s1"]
    assert found("qzvfar") == []
