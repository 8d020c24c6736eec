"""A fake DashScope (OpenAI-compatible mode) server for tests and benchmarks.

It speaks the real wire format (the transcripts in tests/dashscope/ are copied from Alibaba
Cloud's documentation) over a real socket, written with plain asyncio streams so that it can
misbehave at the byte level: error bodies, stalls, cut streams, CRLF, split lines, comments.
It runs on its own event loop in a background thread, so sync and async tests can share it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import itertools
import json
import re
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

TRANSCRIPTS = Path(__file__).resolve().parent / "dashscope"


def transcript_events(name: str) -> list[bytes]:
    """The `data:` events of a transcript file, each with its blank line."""
    text = (TRANSCRIPTS / name).read_bytes().replace(b"\r\n", b"\n")
    return [block.strip(b"\n") + b"\n\n" for block in text.split(b"\n\n") if block.strip()]


def chunk_event(content=None, *, reasoning=None, role=None, finish=None, usage=None, model="qwen-plus") -> bytes:
    """One chat.completion.chunk shaped like DashScope's."""
    if usage is not None and content is None and reasoning is None and finish is None:
        choices = []
    else:
        delta = {"content": content}
        if role:
            delta["role"] = role
        if reasoning is not None:
            delta["reasoning_content"] = reasoning
        choices = [{"delta": delta, "finish_reason": finish, "index": 0, "logprobs": None}]
    return _chunk(choices, usage, model)


def tool_call_event(entries: list[dict], *, delta: dict | None = None, role=None, model="qwen-plus") -> bytes:
    """One chunk carrying `delta.tool_calls` entries, after the delta's other fields `delta` and before
    its `role` (where stream_tool_calls.sse has them)."""
    d = {**(delta or {}), "tool_calls": entries, **({"role": role} if role else {})}
    return _chunk([{"delta": d, "finish_reason": None, "index": 0, "logprobs": None}], None, model)


def finish_event(finish: str, *, model="qwen-plus") -> bytes:
    """The chunk that ends a tool round on DashScope: an empty delta and the finish_reason."""
    return _chunk([{"finish_reason": finish, "delta": {}, "index": 0, "logprobs": None}], None, model)


def _chunk(choices: list[dict], usage: dict | None, model: str) -> bytes:
    obj = {
        "choices": choices,
        "object": "chat.completion.chunk",
        "usage": usage,
        "created": 1726132850,
        "system_fingerprint": None,
        "model": model,
        "id": "chatcmpl-fake",
    }
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"


def dashscope_usage(
    prompt: int,
    completion: int,
    *,
    reasoning: int | None = None,
    cached: int | None = None,
    cache_creation: int | None = None,
    top_level_cached: bool = False,
) -> dict:
    """A usage object as DashScope sends it (docs/design/usage.md 1.1): the three counts, then
    `completion_tokens_details` when `reasoning` is given (reasoning within completion, `text_tokens`
    the modality split), and `prompt_tokens_details` when `cached` or `cache_creation` is (both within
    prompt; an explicit cache's creation with its `cache_creation` object and `cache_type`).
    `top_level_cached`: `cached_tokens` at the top level instead, as one third-party parser says it may come."""
    usage: dict = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    if reasoning is not None:
        usage["completion_tokens_details"] = {"reasoning_tokens": reasoning, "text_tokens": completion}
    if top_level_cached:
        usage["cached_tokens"] = cached
    elif cached is not None or cache_creation is not None:
        details: dict = {"text_tokens": prompt, "cached_tokens": cached or 0}
        if cache_creation is not None:
            details.update(
                cache_creation_input_tokens=cache_creation,
                cache_creation={"ephemeral_5m_input_tokens": cache_creation},
                cache_type="ephemeral",
            )
        usage["prompt_tokens_details"] = details
    return usage


@dataclass
class Reply:
    """What the fake answers to one request."""

    status: int = 200
    pieces: list[bytes] = field(default_factory=list)  # body writes, one chunked-encoding chunk each
    headers: dict[str, str] = field(default_factory=dict)
    pause: float = 0.0  # seconds between pieces
    stall_headers: float = 0.0  # seconds to wait before the status line
    stall_at: int | None = None  # wait `stall` seconds before this piece
    stall: float = 0.0
    hold: threading.Event | None = None  # wait until the test sets it (at most a minute) before piece `hold_at`
    hold_at: int = 0
    cut: bool = False  # drop the connection after the pieces, without the final chunk
    stamp: bool = False  # write the send time (time.monotonic_ns()) in place of each piece's "@T"
    gzip: bool = False  # Content-Encoding: gzip whatever the request asked (as some proxies do)
    drop: bool = False  # close the connection after reading the request, before the status line
    calls: list[dict] = field(default_factory=list)  # Reply.tool_calls: {index, id, name, arguments} as gathered

    @classmethod
    def transcript(
        cls, name: str = "stream_usage.sse", *, crlf=False, split=False, comments=False, done=True, pause=0.0
    ) -> Reply:
        events = transcript_events(name)
        if not done:
            events = [e for e in events if e != DONE]
        return cls.of_events(events, crlf=crlf, split=split, comments=comments, pause=pause)

    @classmethod
    def answer(
        cls,
        chunks: list[str],
        *,
        reasoning: list[str] = (),
        finish="stop",
        usage: dict | None = None,
        pause=0.0,
        done=True,
        model="qwen-plus",
        **kw,
    ) -> Reply:
        events = [
            chunk_event(
                "" if not reasoning else None, role="assistant", reasoning="" if reasoning else None, model=model
            )
        ]
        events += [chunk_event(None, reasoning=r, model=model) for r in reasoning]
        events += [chunk_event(c, model=model) for c in chunks]
        if finish:
            events.append(chunk_event("", finish=finish, model=model))
        if usage is not False:
            usage = usage or {"prompt_tokens": 10, "completion_tokens": len(chunks), "total_tokens": 10 + len(chunks)}
            events.append(chunk_event(usage=usage, model=model))
        if done:
            events.append(DONE)
        return cls.of_events(events, pause=pause, **kw)

    @classmethod
    def tool_calls(
        cls,
        calls: list[tuple],
        *,
        content: list[str] = (),
        reasoning: list[str] = (),
        parallel="interleaved",
        split=3,
        finish="tool_calls",
        usage: dict | bool | None = None,
        id_style="dashscope",
        args_as_object=False,
        done=True,
        model="qwen-plus",
        **kw,
    ) -> Reply:
        """A round that calls tools, streamed as DashScope does (docs/design/tools.md 1.1, 2.13). `calls`:
        `(name, arguments)` or `(name, arguments, id)`, arguments a dict (sent as JSON text) or the raw
        text. Thinking (`reasoning`) and text (`content`) come first. Each call's first delta has its
        `id`, `type`, `function.name` and the first of `split` pieces of its arguments; later deltas
        have `type` and a piece, with `id` "" (DashScope), the same id again (`id_style="repeat"`,
        SGLang) or `id`, `type` and `name` null (`"openai"`). `parallel`: `"interleaved"` takes one
        delta of each call in turn, `"sequential"` one call after another. `id_style="ollama"`: each
        call whole in one delta, every one at `index` 0. `args_as_object`: the arguments as a JSON
        object, whole, in the first delta (LiteLLM's ollama_chat). Then the finish chunk (`delta: {}`,
        `finish_reason`; none when `finish` is None), the usage chunk (None: a default one; False:
        none) and `[DONE]`. The reply's `calls` are the calls as a client must gather them."""
        wanted = []
        for k, (name, arguments, *given) in enumerate(calls):
            text = json.dumps(arguments, ensure_ascii=False) if isinstance(arguments, dict) else arguments
            call_id = given[0] if given else f"call_{next(_CALL_IDS):022x}"
            wanted.append({"index": k, "id": call_id, "name": name, "arguments": text})
        events = [chunk_event(None, role="assistant", reasoning="", model=model)] if reasoning else []
        events += [chunk_event(None, reasoning=r, model=model) for r in reasoning]
        events += [chunk_event(c, role=None if events else "assistant", model=model) for c in content]
        objects = [a if isinstance(a, dict) else json.loads(a) for _, a, *_ in calls] if args_as_object else None
        per_call = [_call_deltas(c, split, id_style, objects and objects[c["index"]]) for c in wanted]
        if parallel == "interleaved":  # one delta of each call in turn
            deltas = [d for turn in itertools.zip_longest(*per_call) for d in turn if d is not None]
        else:
            deltas = [d for one in per_call for d in one]
        for i, (head, entry) in enumerate(deltas):
            events.append(tool_call_event([entry], delta=head, role="assistant" if i == 0 and not events else None))
        if finish:
            events.append(finish_event(finish, model=model))
        if usage is not False:
            usage = usage or {"prompt_tokens": 10, "completion_tokens": len(deltas), "total_tokens": 10 + len(deltas)}
            events.append(chunk_event(usage=usage, model=model))
        if done:
            events.append(DONE)
        reply = cls.of_events(events, **kw)
        if objects:
            for call, arguments in zip(wanted, objects, strict=True):
                call["arguments"] = json.dumps(arguments, ensure_ascii=False)
        reply.calls = wanted
        return reply

    @classmethod
    def of_events(cls, events: list[bytes], *, crlf=False, split=False, comments=False, pause=0.0, **kw) -> Reply:
        if comments:
            events = [b": keep-alive\n\n" + e if i % 2 else b":comment\n" + e for i, e in enumerate(events)]
        if crlf:
            events = [e.replace(b"\n", b"\r\n") for e in events]
        if split:  # cut every event at three awkward places, including between \r and \n
            pieces = []
            for e in events:
                cuts = sorted({1, len(e) // 2, len(e) - 1})
                pieces += [e[a:b] for a, b in zip([0, *cuts], [*cuts, len(e)], strict=True) if e[a:b]]
            return cls(pieces=pieces, pause=max(pause, 0.002), **kw)
        return cls(pieces=events, pause=pause, **kw)

    @classmethod
    def error(cls, status: int, code: str, message: str = "error", *, retry_after: str | None = None) -> Reply:
        body = json.dumps(
            {
                "error": {"message": message, "type": "invalid_request_error", "param": None, "code": code},
                "request_id": "fake-request",
            }
        ).encode()
        headers = {"Retry-After": retry_after} if retry_after is not None else {}
        return cls(status=status, pieces=[body], headers=headers)

    @classmethod
    def json(cls, status: int, body: dict) -> Reply:
        """Any JSON body, as a server other than DashScope shapes its errors."""
        return cls(status=status, pieces=[json.dumps(body).encode()])


# DashScope's native endpoint (POST /api/v1/services/aigc/text-generation/generation with
# X-DashScope-SSE: enable), in the shapes of its documented example (web search, incremental_output):
# `id:N`, `event:result`, `:HTTP_STATUS/200`, `data:` one object; the first with search_info and "",
# finish_reason the string "null" until the last, usage running totals, no [DONE].
NATIVE_PATH = "/api/v1/services/aigc/text-generation/generation"
SEARCH_RESULTS = [
    {"site_name": "百家号", "icon": "https://baijiahao.baidu.com/favicon.ico", "index": 1,
     "title": "全年高温日数可能创新高,杭州何时能“熄火”?", "url": "https://baijiahao.baidu.com/s?id=1843390963791748953"},
    {"site_name": "eastday", "icon": "https://img.alicdn.com/x.ico", "index": 2,
     "title": "杭州天气预报杭州2025年09月17日天气", "url": "https://tianqi.eastday.com/tianqi/hangzhou/20250917.html"},
]  # fmt: skip


def native_frame(n: int, body: dict, status: int = 200) -> bytes:
    data = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
    return f"id:{n}\nevent:result\n:HTTP_STATUS/{status}\ndata:{data}\n\n".encode()


def native_events(
    chunks: list[str], *, results=SEARCH_RESULTS, searches: int | None = 1, finish="stop", input_tokens=2940
) -> list[bytes]:
    """A searched answer's frames: the first carries the search results and no text; each chunk's
    usage is the running total; the last has the finish_reason."""
    plugins = {"plugins": {"search": {"count": searches}}} if searches is not None else {}

    def usage(out: int) -> dict:
        return {"total_tokens": input_tokens + out, "output_tokens": out, "input_tokens": input_tokens, **plugins}

    frames = []
    first = {"choices": [{"message": {"content": "", "role": "assistant"}, "finish_reason": "null"}]}
    if results is not None:
        first["search_info"] = {"search_results": results}
    frames.append({"output": first, "usage": {}, "request_id": "fake-native"})
    for k, chunk in enumerate(chunks, 1):
        last = k == len(chunks)
        choice = {"message": {"content": chunk, "role": "assistant"}, "finish_reason": finish if last else "null"}
        frames.append({"output": {"choices": [choice]}, "usage": usage(k), "request_id": "fake-native"})
    return [native_frame(n, body) for n, body in enumerate(frames, 1)]


def native_error(status: int, code: str, message: str) -> Reply:
    """A native error body: `{"code", "message", "request_id"}` with the HTTP status."""
    body = json.dumps({"code": code, "message": message, "request_id": "fake-native"}).encode()
    return Reply(status=status, pieces=[body])


_CALL_IDS = itertools.count(1)  # the fake's call ids, unique in a test run


def _call_deltas(call: dict, split: int, id_style: str, as_object: dict | None) -> list[tuple[dict, dict]]:
    """One call's deltas, each `(the delta's fields before tool_calls, the tool_calls entry)`."""
    index, text = (0 if id_style == "ollama" else call["index"]), call["arguments"]
    if as_object is not None or id_style == "ollama":
        pieces = [as_object if as_object is not None else text]
    else:
        step = max(1, -(-len(text) // split))
        pieces = [text[i : i + step] for i in range(0, len(text), step)] or [""]
    head = {"role": "assistant", "content": ""} if id_style == "ollama" else {"content": None}
    first = {
        "index": index,
        "id": call["id"],
        "type": "function",
        "function": {"name": call["name"], "arguments": pieces[0]},
    }
    deltas = [(head, first)]
    for piece in pieces[1:]:
        if id_style == "openai":
            entry = {"index": index, "id": None, "type": None, "function": {"name": None, "arguments": piece}}
        else:  # DashScope's key order (stream_tool_calls.sse)
            later_id = call["id"] if id_style == "repeat" else ""
            entry = {"function": {"arguments": piece}, "index": index, "id": later_id, "type": "function"}
        deltas.append(({}, entry))
    return deltas


# How the servers chatsvc meets say that a conversation is longer than the model's context, each as that
# server sends it: the messages and fields as their sources and their users' reports show them.
def overflow_replies(prompt: int = 11915, n_ctx: int = 2048) -> dict[str, Reply]:
    too_long = (
        f"This model's maximum context length is {n_ctx} tokens. However, you requested {prompt} tokens"
        f" ({prompt} in the messages, 0 in the completion). Please reduce the length of the messages or completion."
    )
    llama_cpp = {
        "code": 400,
        "message": f"request ({prompt} tokens) exceeds the available context size ({n_ctx} tokens), try increasing it",
        "type": "exceed_context_size_error",
        "n_prompt_tokens": prompt,
        "n_ctx": n_ctx,
    }
    openai = {
        "message": too_long,
        "type": "invalid_request_error",
        "param": "messages",
        "code": "context_length_exceeded",
    }
    litellm = {
        "message": f"litellm.ContextWindowExceededError: litellm.BadRequestError: OpenAIException - {too_long}",
        "type": None,
        "param": None,
        "code": "400",
    }
    return {
        # llama.cpp's llama-server: HTTP 400, the identifier in `type`, `code` the status
        "llama-server": Reply.json(400, {"error": llama_cpp}),
        # llama-server once a stream has begun: the same error as an event
        "llama-server-in-stream": Reply.of_events([b"data: " + json.dumps({"error": llama_cpp}).encode() + b"\n\n"]),
        # OpenAI, and llama-cpp-python when it fails before its stream: `code` context_length_exceeded
        "openai": Reply.json(400, {"error": openai}),
        # vLLM (before 0.10): the error object at the top level, `code` the status
        "vllm": Reply.json(
            400, {"object": "error", "message": too_long, "type": "BadRequestError", "param": None, "code": 400}
        ),
        # LiteLLM's proxy: its exception's name in the message, `code` a string
        "litellm": Reply.json(400, {"error": litellm}),
        # DashScope (Qwen): invalid_parameter_error with the accepted range of the input length
        "dashscope": Reply.error(400, "invalid_parameter_error", f"Range of input length should be [1, {n_ctx}]"),
    }


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: dict | None
    at: float


# The models that take images, as chatsvc's CHATSVC_VISION_MODELS default names them (a trailing * matches any rest).
VISION_MODELS = (
    "qwen-vl-*",
    "qwen2.5-vl-*",
    "qwen3-vl-*",
    "qvq-*",
    "qwen3.5-*",
    "qwen3.6-*",
    "qwen-omni-*",
    "qwen3-omni-*",
)
IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp", "image/gif")
MAX_IMAGE_BYTES = 10 * 1024 * 1024  # an image's decoded bytes, at most (reported for DashScope; not verified)
_DATA_URL = re.compile(r"data:([^;,]*);base64,(.*)", re.S)


def sees(model: str, patterns: tuple[str, ...] = VISION_MODELS) -> bool:
    return any(model.startswith(p[:-1]) if p.endswith("*") else model == p for p in patterns)


def decode_image_url(url: str) -> tuple[str, bytes]:
    """A data URL's media type and bytes; ValueError (with what DashScope-like servers would say) if
    it is not one chatsvc may send: another URL, a type not an image's, bad base64, over 10 MB."""
    match = _DATA_URL.fullmatch(url)
    if not match:
        raise ValueError("The image URL is not a base64 data: URL (the fake takes no other).")
    media_type, encoded = match.groups()
    if media_type not in IMAGE_TYPES:
        raise ValueError(f"The image's media type {media_type!r} is not one of {', '.join(IMAGE_TYPES)}.")
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("The image's base64 data is not valid.") from None
    if len(data) > MAX_IMAGE_BYTES:
        raise ValueError(f"The image is {len(data)} bytes, more than {MAX_IMAGE_BYTES}.")
    return media_type, data


def image_refusal(body: dict | None, vision_models: tuple[str, ...]) -> Reply | None:
    """The 400 a request with image parts gets when they break a rule the service enforces (so a
    chatsvc bug fails loudly), or when its model cannot see; None when nothing is wrong."""
    images = [
        part
        for message in (body or {}).get("messages") or ()
        if isinstance(message.get("content"), list)
        for part in message["content"]
        if part.get("type") == "image_url"
    ]
    if not images:
        return None
    for part in images:
        try:
            decode_image_url(part["image_url"]["url"])
        except (ValueError, KeyError, TypeError) as exc:
            return Reply.error(400, "invalid_parameter_error", str(exc))
    if not sees(body.get("model") or "", vision_models):
        # the code and body shape are DashScope's; the message is invented (the real one was not found)
        return Reply.error(400, "invalid_parameter_error", "The model does not support image input.")
    return None


def partial_refusal(body: dict) -> Reply | None:
    """DashScope's partial mode (help.aliyun.com/zh/model-studio/partial-mode): the prefix is the last
    message, an assistant's with `"partial": true`, and thinking is off ("思考模式不支持前缀续写"). A
    request that has `partial` otherwise is refused as DashScope refuses a bad parameter (400
    invalid_parameter_error; the messages are invented, the real ones were not found). The reply to a
    good one holds only what follows the prefix (the test's pushed reply)."""
    messages = body.get("messages") or []
    marked = [n for n, m in enumerate(messages) if isinstance(m, dict) and "partial" in m]
    if not marked:
        return None
    last = messages[-1]
    if marked != [len(messages) - 1] or last.get("role") != "assistant" or last.get("partial") is not True:
        return Reply.error(400, "invalid_parameter_error", "partial is only allowed on the last assistant message.")
    if not isinstance(last.get("content"), str) or not last["content"]:
        return Reply.error(400, "invalid_parameter_error", "The partial message's content must be a non-empty text.")
    if body.get("enable_thinking") is not False:
        return Reply.error(400, "invalid_parameter_error", "Partial mode does not support thinking mode.")
    return None


class FakeDashScope:
    def __init__(self) -> None:
        self.vision_models: tuple[str, ...] = VISION_MODELS  # a request with images to another model: 400
        # a model context window: a request whose text (about 4 characters a token) is longer is refused
        # with the `overflow_server`'s documented body (one of overflow_replies' names)
        self.window: int | None = None
        self.overflow_server = "dashscope"
        self.replies: deque[Reply] = deque()
        self.default: Reply | Callable[[Seen], Reply] = Reply.transcript("stream_usage.sse")  # or made per request
        self.requests: list[Seen] = []
        self.connections = 0  # TCP connections accepted
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(target=self.loop.run_forever, name="fake-dashscope", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/compatible-mode/v1"

    def start(self) -> FakeDashScope:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self.loop).result(5)
        return self

    def stop(self) -> None:
        async def close() -> None:
            assert self._server is not None
            self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()

    @staticmethod
    def parts(seen: Seen) -> list[list[dict]]:
        """The user messages of a request, each as its parts in order: a text part as sent (a string
        content is one text part), an image part decoded: `{"type": "image", "media_type", "size"
        (decoded bytes), "format" and "width", "height" (as Pillow reads them)}`."""
        from PIL import Image

        found = []
        for message in seen.body["messages"]:
            if message["role"] != "user":
                continue
            content = message["content"]
            if isinstance(content, str):
                found.append([{"type": "text", "text": content}])
                continue
            parts = []
            for part in content:
                if part["type"] != "image_url":
                    parts.append(part)
                    continue
                media_type, data = decode_image_url(part["image_url"]["url"])
                with Image.open(io.BytesIO(data)) as image:
                    width, height, form = image.width, image.height, image.format
                parts.append(
                    {
                        "type": "image",
                        "media_type": media_type,
                        "size": len(data),
                        "format": form,
                        "width": width,
                        "height": height,
                    }
                )
            found.append(parts)
        return found

    def reset(self) -> None:
        self.vision_models = VISION_MODELS
        self.window, self.overflow_server = None, "dashscope"
        self.replies.clear()
        self.requests.clear()
        self.connections = 0
        self.default = Reply.transcript("stream_usage.sse")

    def push(self, *replies: Reply) -> None:
        """Answer the next requests with these, in order; then with `default`."""
        self.replies.extend(replies)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, backlog=4096)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        self.connections += 1
        try:
            while True:
                request_line = await reader.readline()
                if not request_line:
                    return
                method, path, _ = request_line.decode().split(" ", 2)
                headers = {}
                while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = line.decode().partition(":")
                    headers[name.strip().lower()] = value.strip()
                raw = await reader.readexactly(int(headers.get("content-length", 0)))
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = None
                self.requests.append(Seen(method, path, headers, body, self.loop.time()))
                seen = self.requests[-1]
                reply = image_refusal(body, self.vision_models) if isinstance(body, dict) else None
                if reply is None and isinstance(body, dict):
                    reply = partial_refusal(body)
                if reply is None and self.window is not None and isinstance(body, dict):
                    tokens = len(json.dumps(body.get("messages"), ensure_ascii=False)) // 4
                    if tokens > self.window:
                        reply = overflow_replies(tokens, self.window)[self.overflow_server]
                if reply is None:  # a refused request takes none of the replies queued
                    reply = self.replies.popleft() if self.replies else self.default
                    reply = reply(seen) if callable(reply) else reply
                if not await self._answer(reply, writer):
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _answer(self, reply: Reply, writer: asyncio.StreamWriter) -> bool:
        """Write one reply; False when the connection must close."""
        if reply.stall_headers:
            await asyncio.sleep(reply.stall_headers)
        if reply.drop:
            writer.transport.abort()
            return False
        if reply.status != 200:
            body = b"".join(reply.pieces)
            head = [
                f"HTTP/1.1 {reply.status} Error",
                "Content-Type: application/json",
                f"Content-Length: {len(body)}",
                *(f"{k}: {v}" for k, v in reply.headers.items()),
            ]
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
            await writer.drain()
            return True
        head = [
            "HTTP/1.1 200 OK",
            "Content-Type: text/event-stream;charset=UTF-8",
            "Transfer-Encoding: chunked",
            *(["Content-Encoding: gzip"] if reply.gzip else []),
            *(f"{k}: {v}" for k, v in reply.headers.items()),
        ]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
        gzip = zlib.compressobj(wbits=31) if reply.gzip else None
        for i, piece in enumerate(reply.pieces):
            if reply.hold is not None and reply.hold_at == i:
                await writer.drain()
                await asyncio.to_thread(reply.hold.wait, 60)
            if reply.stall_at == i:
                await writer.drain()
                await asyncio.sleep(reply.stall)
            elif reply.pause and i:
                await asyncio.sleep(reply.pause)
            if reply.stamp:
                piece = piece.replace(b"@T", b"@%d" % time.monotonic_ns())
            if gzip:
                piece = gzip.compress(piece) + gzip.flush(zlib.Z_SYNC_FLUSH)
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            if reply.pause or reply.stall_at is not None:
                await writer.drain()
        if reply.cut:
            await writer.drain()
            writer.transport.abort()
            return False
        if gzip:
            tail = gzip.flush()
            writer.write(b"%x\r\n%s\r\n" % (len(tail), tail))
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True


BENCH = re.compile(r"bench (\d+) ([0-9.]+)( stamp)?")


def bench_reply(seen: Seen) -> Reply:
    """For benchmarks: the user's message "bench <chunks> <pause seconds> [stamp]" (its last line) sets the answer:
    chunks "t0 ", "t1 ", ... or, with "stamp", "t0@<send time in ns> ", ... A request that offers a
    tool named `<server>__echo` is first answered with a call to it (`{"text": "bench"}`), round after
    round while its messages hold fewer than 2 `tool` messages (bench/relay.py's scenario w)."""
    messages = seen.body["messages"]
    echo = [t["function"]["name"] for t in seen.body.get("tools") or () if t["function"]["name"].endswith("__echo")]
    if echo and sum(m["role"] == "tool" for m in messages) < 2:
        return Reply.tool_calls([(echo[0], {"text": "bench"})], usage={"total_tokens": 1})
    question = next(m["content"] for m in reversed(messages) if m["role"] == "user")
    if isinstance(question, list):  # a message with images: its text part
        question = next((part["text"] for part in question if part["type"] == "text"), "")
    order = BENCH.fullmatch(question.splitlines()[-1] if question else "")  # after the documents a message carries
    if order is None:  # not a bench's answer (a title, a summary): a short one
        return Reply.answer(["ok"], usage={"total_tokens": 1})
    chunks, pause, stamp = order.groups()
    form = "t{}@T " if stamp else "t{} "
    return Reply.answer([form.format(i) for i in range(int(chunks))], pause=float(pause), usage={"total_tokens": 1},
                        stamp=bool(stamp))  # fmt: skip


if __name__ == "__main__":  # python tests/fake_dashscope.py: a standalone fake on its own process
    server = FakeDashScope()
    server.default = bench_reply
    server.start()
    print(server.port, flush=True)
    try:
        while True:
            time.sleep(3600)
            server.requests.clear()
    except KeyboardInterrupt:
        server.stop()
