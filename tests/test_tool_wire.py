"""Tool calls on the wire (issue 22, step 1; docs/design/tools.md 1.1, 1.2, 2.3, 2.13): the streams of
DashScope and of the other OpenAI-compatible servers, served by the fake over a real socket, read by
`stream_completion` as the relay reads them and gathered by a `ToolCallAccumulator`. Groundwork: the
relay does not offer tools yet, and a model that calls one unasked still ends as it did before."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass

import pytest
from fake_dashscope import DONE, Reply, chunk_event, finish_event, tool_call_event, transcript_events

import chatsvc
from chatsvc import Delta, ToolCall, ToolCallAccumulator

API = "/api/v1"


@dataclass
class Round:
    """One model round as chatsvc reads it: every delta, the calls gathered, the failure if any."""

    deltas: list[Delta]
    calls: list[ToolCall]
    error: chatsvc.UpstreamError | None

    @property
    def text(self) -> str:
        return "".join(d.content for d in self.deltas)

    @property
    def reasoning(self) -> str:
        return "".join(d.reasoning for d in self.deltas)

    @property
    def finish_reason(self) -> str | None:
        return next((d.finish_reason for d in reversed(self.deltas) if d.finish_reason), None)

    @property
    def entries(self) -> list[dict]:
        """The raw `tool_calls` entries, in the order they came."""
        return [e for d in self.deltas for e in d.tool_calls or ()]


def read_round(fake, reply: Reply) -> Round:
    """Serve `reply` and read it through stream_completion, feeding an accumulator as the relay will."""
    fake.push(reply)
    settings = chatsvc.Settings.from_env(
        {"DASHSCOPE_API_KEY": "sk-test-key", "DASHSCOPE_BASE_URL": fake.url, "CHATSVC_UPSTREAM_IDLE_TIMEOUT": "5"},
        env_file=None,
    )

    async def run() -> Round:
        deltas, accumulator, error = [], ToolCallAccumulator(), None
        async with chatsvc.new_upstream_client(settings) as client:
            payload = {
                "model": "qwen-plus",
                "messages": [{"role": "user", "content": "杭州天气怎么样"}],
                "stream": True,
            }
            try:
                async with contextlib.aclosing(chatsvc.stream_completion(client, settings, payload)) as stream:
                    async for delta in stream:
                        deltas.append(delta)
                        accumulator.feed(delta)
            except chatsvc.UpstreamError as exc:
                error = exc
        return Round(deltas, accumulator.calls(), error)

    return asyncio.run(run())


def expected(reply: Reply) -> list[ToolCall]:
    return [ToolCall(c["index"], c["id"], c["name"], c["arguments"]) for c in reply.calls]


def sent_entries(events: list[bytes]) -> list[dict]:
    """The `tool_calls` entries an event list carries, as JSON gives them."""
    entries = []
    for event in events:
        data = event.decode().removeprefix("data: ").strip()
        if data != "[DONE]":
            for choice in json.loads(data)["choices"]:
                entries += choice["delta"].get("tool_calls") or []
    return entries


# ── the DashScope transcripts, served as they are ─────────────────────────────────────


@pytest.mark.parametrize("shape", ["as-is", "split-crlf"])
def test_the_documented_dashscope_stream_is_one_call_to_get_current_weather(fake, shape):
    reply = Reply.transcript("stream_tool_calls.sse", split=shape != "as-is", crlf=shape != "as-is")
    got = read_round(fake, reply)
    assert got.error is None
    assert got.calls == [ToolCall(0, "call_0bdcc155f2534f65a05cb1", "get_current_weather", '{"location": "杭州市"}')]
    assert json.loads(got.calls[0].arguments) == {"location": "杭州市"}
    assert got.finish_reason == "tool_calls" and got.text == "" and got.reasoning == ""
    # the deltas carry the entries verbatim, nothing else: the chunk without them has tool_calls None
    assert [d.tool_calls for d in got.deltas] == [
        [{"index": 0, "id": "call_0bdcc155f2534f65a05cb1", "type": "function",
          "function": {"name": "get_current_weather", "arguments": '{"location":'}}],
        [{"function": {"arguments": ' "杭州市"}'}, "index": 0, "id": "", "type": "function"}],
        None,
    ]  # fmt: skip
    assert got.entries == sent_entries(transcript_events("stream_tool_calls.sse"))


def test_the_qwen_max_transcript_as_published_is_cut_short_with_its_call_gathered(fake):
    # the copy ends before its finish chunk: a stream without a finish_reason is cut short, as any
    got = read_round(fake, Reply.transcript("stream_tool_calls_empty_function.sse"))
    assert got.error is not None and got.error.detail == chatsvc.CUT_SHORT and got.error.retryable
    assert got.calls == [ToolCall(0, "call_deb0063d315441b18b50d8", "itsvse-get_current_time", "{}")]
    assert got.entries == sent_entries(transcript_events("stream_tool_calls_empty_function.sse"))


def test_the_qwen_max_transcript_with_a_finish_chunk_is_a_tool_round(fake):
    events = [*transcript_events("stream_tool_calls_empty_function.sse"), finish_event("tool_calls"), DONE]
    got = read_round(fake, Reply.of_events(events))
    assert got.error is None and got.finish_reason == "tool_calls"
    # `arguments: ""` first, the whole `{}` next, then `"function": {}`: nothing added, nothing joined
    assert got.calls == [ToolCall(0, "call_deb0063d315441b18b50d8", "itsvse-get_current_time", "{}")]


# ── the fake's tool rounds: DashScope's shapes, and the other servers' (design 1.2) ───

WEATHER = ("get_current_weather", {"location": "杭州市"})
TIME = ("get_current_time", {})
ORDERS = ("orders__find", {"customer": "alice", "status": ["open", "shipped"], "limit": 20})


@pytest.mark.parametrize(
    "options",
    [
        {},  # DashScope: `id: ""` on later deltas, calls interleaved by index
        {"parallel": "sequential"},
        {"id_style": "repeat"},  # SGLang, LMDeploy: the id on every delta
        {"id_style": "openai"},  # OpenAI: `id`, `type` and `name` null on later deltas
        {"split": 1},  # each call whole in its first delta
        {"split": 40},  # arguments a character or two at a time
        {"id_style": "ollama"},  # every call at index 0, whole, told apart by its id
        {"id_style": "ollama", "args_as_object": True, "finish": "stop"},  # LiteLLM's ollama_chat
        {"finish": "stop"},  # OpenAI, Gemini's compatibility layer, older vLLM
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "dashscope",
)
def test_parallel_calls_are_gathered_whatever_the_server(fake, options):
    reply = Reply.tool_calls([WEATHER, TIME, ORDERS], **options)
    got = read_round(fake, reply)
    assert got.error is None
    assert got.calls == expected(reply)
    assert [c.name for c in got.calls] == ["get_current_weather", "get_current_time", "orders__find"]
    assert [json.loads(c.arguments) for c in got.calls] == [WEATHER[1], TIME[1], ORDERS[1]]
    assert got.finish_reason == options.get("finish", "tool_calls") and got.text == ""
    # the stream had the shape asked for
    indexes = [e["index"] for e in got.entries]
    if options.get("id_style") == "ollama":
        assert indexes == [0, 0, 0]
    elif options.get("parallel") == "sequential":
        assert indexes == sorted(indexes) and len(indexes) > 3
    elif options.get("split") != 1:
        assert indexes[:6] == [0, 1, 2, 0, 1, 2]  # interleaved
    if options.get("args_as_object"):
        assert [e["function"]["arguments"] for e in got.entries] == [WEATHER[1], TIME[1], ORDERS[1]]
        assert got.calls[2].arguments == json.dumps(ORDERS[1], ensure_ascii=False)


def test_thinking_and_text_before_the_calls(fake):
    reply = Reply.tool_calls([WEATHER, TIME], reasoning=["Hmm, ", "the weather"], content=["Let me", " look."])
    got = read_round(fake, reply)
    assert got.error is None
    assert (got.reasoning, got.text, got.finish_reason) == ("Hmm, the weather", "Let me look.", "tool_calls")
    assert got.calls == expected(reply)
    first = next(i for i, d in enumerate(got.deltas) if d.tool_calls)
    assert all(not d.tool_calls for d in got.deltas[:first]) and not any(d.reasoning for d in got.deltas[first:])
    assert got.deltas[-1].usage is not None and got.deltas[-1].tool_calls is None  # the usage chunk


def test_a_round_that_ends_without_a_finish_reason_is_cut_short_with_its_calls_gathered(fake):
    reply = Reply.tool_calls([WEATHER], finish=None, usage=False)
    got = read_round(fake, reply)
    assert got.error is not None and got.error.detail == chatsvc.CUT_SHORT
    assert got.calls == expected(reply)


# ── shapes seen once somewhere, written out by hand ──────────────────────────────────


def call(index=None, id=None, name=None, arguments=None, **rest) -> dict:
    """A `tool_calls` entry with only the fields given (None: absent)."""
    function = {k: v for k, v in (("name", name), ("arguments", arguments)) if v is not None}
    entry = {"index": index, "id": id, "type": "function", "function": function, **rest}
    return {k: v for k, v in entry.items() if v is not None}


def round_of(*entries: list[dict], finish="tool_calls") -> Reply:
    events = [tool_call_event(e, delta={"content": None}) for e in entries]
    return Reply.of_events([*events, finish_event(finish), DONE])


def test_a_first_delta_without_arguments_and_a_trailing_null(fake):
    # qwen3-vl thinking (LobeHub's fixture): id and name first, arguments next without a name; a
    # trailing `"arguments": null` (reported on DashScope)
    got = read_round(
        fake,
        round_of(
            [call(0, "call_a", "get_current_weather")],
            [call(0, "", arguments='{"location": "杭州"}')],
            [call(0, "", arguments=None) | {"function": {"arguments": None}}],
        ),
    )
    assert got.calls == [ToolCall(0, "call_a", "get_current_weather", '{"location": "杭州"}')]


def test_a_name_sent_again_is_not_joined(fake):
    # llama.cpp before its fix sent the name on later deltas of a call
    got = read_round(
        fake,
        round_of(
            [call(0, "call_a", "get_time", "")],
            [call(0, "call_a", "get_time", '{"tz":')],
            [call(0, None, "get_time", ' "UTC"}')],
        ),
    )
    assert got.calls == [ToolCall(0, "call_a", "get_time", '{"tz": "UTC"}')]


def test_successive_calls_at_index_0_are_told_apart_by_their_ids(fake):
    # SGLang, LMDeploy: every call at index 0, its id repeated on each of its deltas
    got = read_round(
        fake,
        round_of(
            [call(0, "call_a", "add", "")],
            [call(0, "call_a", arguments='{"a": 3, ')],
            [call(0, "call_a", arguments='"b": 12}')],
            [call(0, "call_b", "multiply", '{"a": 11,')],
            [call(0, "call_b", arguments=' "b": 49}')],
        ),
    )
    assert got.calls == [
        ToolCall(0, "call_a", "add", '{"a": 3, "b": 12}'),
        ToolCall(1, "call_b", "multiply", '{"a": 11, "b": 49}'),
    ]


def test_an_id_that_comes_after_the_name_continues_the_call(fake):
    # the id on a later delta than the name: one call, not a nameless second one dropped
    got = read_round(
        fake,
        round_of(
            [call(0, None, "add", '{"a":')],
            [call(0, "call_x", arguments=" 1}")],
        ),
    )
    assert got.calls == [ToolCall(0, "call_x", "add", '{"a": 1}')]


def test_another_name_at_the_same_index_without_ids_is_another_call(fake):
    # two calls at index 0 and no ids: told apart by their names, never one call with both arguments
    got = read_round(
        fake,
        round_of(
            [call(0, None, "f", "{}")],
            [call(0, None, "g", '{"x": 1}')],
        ),
    )
    assert [(c.index, c.name, c.arguments) for c in got.calls] == [(0, "f", "{}"), (1, "g", '{"x": 1}')]
    assert all(c.id.startswith("call_") for c in got.calls) and got.calls[0].id != got.calls[1].id


def test_entries_without_an_index_continue_the_call_last_seen(fake):
    # Ollama before 0.4.7: no index; whole calls, each with its id
    got = read_round(
        fake,
        round_of(
            [call(None, "call_a", "get_time", "{}")],
            [call(None, "call_b", "get_weather", '{"city":')],
            [call(None, "", arguments=' "Paris"}')],
        ),
    )
    assert got.calls == [
        ToolCall(0, "call_a", "get_time", "{}"),
        ToolCall(1, "call_b", "get_weather", '{"city": "Paris"}'),
    ]


def test_several_entries_in_one_delta_and_calls_ordered_by_index(fake):
    got = read_round(
        fake,
        round_of(
            [call(1, "call_b", "second", '{"n":'), call(0, "call_a", "first", "{")],
            [call(0, "", arguments="}"), call(1, "", arguments=" 2}")],
        ),
    )
    assert got.calls == [ToolCall(0, "call_a", "first", "{}"), ToolCall(1, "call_b", "second", '{"n": 2}')]


def test_a_call_without_an_id_gets_one_and_a_call_without_a_name_is_dropped(fake, caplog):
    with caplog.at_level(logging.WARNING, "chatsvc"):
        got = read_round(
            fake,
            round_of([call(0, None, "get_time", "{}")], [call(1, "call_x", None, '{"orphan": true}')]),
        )
    [only] = got.calls
    assert (only.index, only.name, only.arguments) == (0, "get_time", "{}")
    assert only.id.startswith("call_") and len(only.id) == 29
    assert "1 tool call(s) without a name; dropped" in caplog.text


def test_arguments_are_not_parsed_and_unstorable_characters_are_replaced(fake):
    # not JSON, as a model may write: given as it came (the code that runs the call says so); a NUL
    # cannot be stored on PostgreSQL nor a lone surrogate sent as UTF-8, as in text
    reply = round_of([call(0, "call_a", "f", "{'not': json")], [call(0, "", arguments="@@}")])
    reply.pieces[1] = reply.pieces[1].replace(b"@@", b"\\u0000\\ud800")  # escaped, as JSON sends them
    got = read_round(fake, reply)
    assert got.calls == [ToolCall(0, "call_a", "f", "{'not': json\ufffd\ufffd}")]


def test_tool_calls_that_are_not_a_list_of_objects_are_dropped_and_logged(fake, caplog):
    with caplog.at_level(logging.WARNING, "chatsvc"):
        got = read_round(
            fake,
            round_of(
                [call(0, "call_a", "f", "{"), "junk", 7],
                {"index": 0, "function": {"arguments": "nope"}},  # an object, not a list
                [call(0, "", arguments="}")],
            ),
        )
    assert got.calls == [ToolCall(0, "call_a", "f", "{}")]
    assert [d.tool_calls for d in got.deltas][:3] == [[call(0, "call_a", "f", "{")], None, [call(0, "", arguments="}")]]
    assert "tool_calls entries that are not objects" in caplog.text and "tool_calls that are not a list" in caplog.text


# ── answers without tool calls: their deltas as before ───────────────────────────────


@pytest.mark.parametrize("name", ["stream_plain.sse", "stream_usage.sse", "stream_thinking.sse"])
def test_an_answer_without_tool_calls_reads_as_before(fake, name):
    got = read_round(fake, Reply.transcript(name))
    assert got.error is None and got.calls == []
    assert all(d.tool_calls is None for d in got.deltas)
    if name == "stream_usage.sse":
        assert got.deltas == [
            Delta(),
            *(Delta(content=c) for c in ["I am", " a", " large-scale", " language model from Alibaba",
                                         " Cloud, and my name is Qwen", "."]),
            Delta(finish_reason="stop"),
            Delta(usage={"prompt_tokens": 22, "completion_tokens": 17, "total_tokens": 39}),
        ]  # fmt: skip


def test_a_null_or_empty_tool_calls_in_a_text_chunk_is_nothing(fake):
    # LiteLLM's proxy writes `"tool_calls": null` in its chunks; some servers `[]`
    events = [
        chunk_event("Hi", role="assistant").replace(b'"content": "Hi"', b'"content": "Hi", "tool_calls": null'),
        chunk_event(" there").replace(b'"content": " there"', b'"content": " there", "tool_calls": []'),
        chunk_event("", finish="stop"),
        DONE,
    ]
    got = read_round(fake, Reply.of_events(events))
    assert got.deltas == [Delta(content="Hi"), Delta(content=" there"), Delta(finish_reason="stop")]
    assert got.calls == []


# ── through the service: tool calls nobody asked for end as before ───────────────────


def test_a_model_that_calls_tools_unasked_still_ends_with_an_empty_answer(service, client, fake):
    # the request offers no tools (none configured, none in the request): the relay runs no call
    # nobody offered, so no text and no reasoning → 502 upstream_error EMPTY_ANSWER, as before tools
    detail = chatsvc.EMPTY_ANSWER.format("tool_calls")
    fake.push(Reply.transcript("stream_tool_calls.sse"))
    r = client.post(f"{API}/chat/s1/stream", json={"message": "杭州天气怎么样"})
    assert r.status_code == 200
    [row] = service.rows("SELECT id, content, status, error_code, error_message FROM messages WHERE role = 'assistant'")
    error = {"message": detail, "code": "upstream_error", "message_id": row["id"], "partial_text": ""}
    data = json.dumps({"type": "error", "data": error}, ensure_ascii=False, separators=(",", ":"))
    assert r.content.decode().rstrip("\n").rsplit("\n\n", 1)[-1] == f"id: {row['id']}:1\ndata: {data}"
    assert row == {"id": row["id"], "content": "", "status": "failed", "error_code": "upstream_error",
                   "error_message": detail}  # fmt: skip
    fake.push(Reply.tool_calls([WEATHER, TIME]))
    r = client.post(f"{API}/chat/s2", json={"message": "杭州天气怎么样"})
    second = service.rows("SELECT id FROM messages WHERE role = 'assistant' AND id != ?", row["id"])[0]["id"]
    assert (r.status_code, r.json()) == (
        502,
        {"detail": detail, "code": "upstream_error", "message_id": second, "partial_text": ""},
    )
    assert len(fake.requests) == 2
    assert all(not {"tools", "tool_choice", "parallel_tool_calls"} & set(seen.body) for seen in fake.requests)
