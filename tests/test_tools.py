"""Answers that call tools (docs/CONTRACT.md, "Tools"): the app's own tools across two turns, and
the round loop that runs MCP servers' tools inside one answer, durable like any answer. The fake
DashScope streams tool calls as DashScope does; the MCP servers are real (tests/mcp_server.py)."""

from __future__ import annotations

import json

import pytest
from fake_dashscope import Reply
from live import LiveServer, parse_events

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
