"""chatsvc: a chat-assistant backend that runs as a sidecar.

It keeps conversations in a database, builds the model context from history, calls
DashScope's OpenAI-compatible Chat Completions API (or any compatible server) and streams
answers over Server-Sent Events. The HTTP contract lives in CONTRACT.md.

The module reads top to bottom in the order data flows, one concept to a section, each headed
`# ── Name: what it is`:

    Configuration                the settings, read once from the environment
    Prices                       what the model service charges: the price table, and what a call costs
    Errors                       domain refusals, and the HTTP errors they become ({"detail", "code"})
    Metrics                      what an operator scrapes
    Rows                         the statuses, times and ids the stored rows carry
    Database                     connections and their roles, transactions, faults
    Schema                       schema.sql's steps, each applied once, in order
    Conversations                a user's conversations, their settings and titles
    Search                       conversations by the text they hold
    Message tree                 messages, their branches, and the turn a chat writes
    Copies                       forks and imports, written a chunk at a time
    Files                        the files owners upload: their bytes, dedup, quotas, references
    File contents                what a file is: sniffed by its bytes, checked, its text and model copy
    Examiner                     the worker processes files are read in, a slot at a time
    Answer rows                  an answer's row: checkpoints, heartbeat, final state
    Usage                        the ledger of upstream calls, the owners' windows and their limits
    Store                        the database and its rooms, opened and closed together
    Turns                        where a new message goes in the tree, and what the model is sent
    Context                      what the model sees
    Upstream                     the model service's streaming API, and its retries
    Tools                        the MCP servers, their tools, and the calls an answer makes
    Answers                      one answer: its phases, its event log, the SSE events and their ids
    Registry                     where readers find answers, and a channel reader's events
    Relay                        this process's answers, from admission to their end
    Titles                       a conversation's name, written by the model
    Summaries                    what a long branch said before the context's newest messages, by the model
    Bus                          the notifications between replicas (PostgreSQL LISTEN/NOTIFY)
    Replicas                     answers followed across processes on PostgreSQL, and the heartbeat
    HTTP: request parsing        a request's body, query and path, checked
    Conversation files           the JSON export, and an import read back field by field
    Markdown export              a conversation's current branch as a document a person reads
    HTTP: presenting rows        stored rows as the API shows them
    HTTP: conversation handlers  the routes under /api/v1/context/conversations
    HTTP: file handlers          the routes under /api/v1/files: upload, metadata, content, delete
    HTTP: usage handlers         the routes under /api/v1/usage and /api/v1/admin: reports, limits, resets
    HTTP: chat handlers          an answer started, streamed, followed by a channel and stopped
    HTTP: errors as responses    whatever a handler raises, as {"detail", "code"}
    Operations                   health, readiness, metrics and the OpenAPI document
    Pages                        the playground and the API docs
    Middleware                   the layers every request passes through
    App                          the routes, the layers, and the service's life from start to drain
    CLI                          the chatsvc command, and the server it runs
"""

from __future__ import annotations

import asyncio
import base64
import codecs
import contextlib
import contextvars
import csv
import errno
import fcntl
import functools
import gc
import hashlib
import hmac
import io
import itertools
import json
import logging
import math
import multiprocessing.connection
import os
import re
import signal
import sqlite3
import string
import subprocess
import sys
import threading
import time
import unicodedata
import uuid
import warnings
import zipfile
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from enum import Enum
from pathlib import Path
from typing import Any, NoReturn, TypeVar
from urllib.parse import quote, unquote_plus
from xml.parsers import expat

import anyio
import databases
import httpx2 as httpx
import prometheus_client
from databases import DatabaseURL
from PIL import GifImagePlugin, Image, JpegImagePlugin, PngImagePlugin, WebPImagePlugin
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.config import Config
from starlette.datastructures import CommaSeparatedStrings
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Match, Mount, Route
from starlette.staticfiles import StaticFiles

__version__ = "0.1.0"
log = logging.getLogger("chatsvc")


# ── Configuration ──────────────────────────────────────────────────────────────────────


def setting(env: str, default: Any, help: str, cast: Callable[[str], Any] | None = None, echo: bool = True) -> Any:
    """One setting, declared once: its variable, default and help. `Settings.from_env` reads it and
    `chatsvc --help` lists it from this declaration. `echo=False`: an error about it does not repeat
    its value (which may hold secrets)."""
    return field(default=default, metadata={"env": env, "help": help, "cast": cast, "echo": echo})


def _choice(value: str, choices: tuple[str, ...], name: str) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, not {value!r}")
    return value


def _csv(value: str) -> tuple[str, ...]:
    return tuple(s for s in CommaSeparatedStrings(value) if s)


MAX_LIMIT = 2**53 - 1  # the largest limit (tokens, answers; a cost's micros): a JSON number any client reads exactly
# The largest cost limit, in units of the currency: below 2**30 every amount of 6 places is a JSON number a
# client reads back as that amount (a double's step there is under a micro), and its micros fit MAX_LIMIT.
MAX_COST = 1_000_000_000


def _limit(value: str, kind: type) -> Any:
    """A limit's size: a whole number (or, for a cost, a decimal of at most 6 places) of at least 0,
    written in plain ASCII digits (no sign, exponent, `_` or other script's digits); 0 refuses every
    answer."""
    value = value.strip()
    if kind is int:
        if not re.fullmatch(r"[0-9]{1,16}", value) or int(value) > MAX_LIMIT:
            raise ValueError(f"must be a whole number from 0 to {MAX_LIMIT} (0 refuses every answer)")
        return int(value)
    # matched before Decimal reads it: Decimal also takes 1e999999999, 5_000, -0 and other scripts' digits
    if not re.fullmatch(r"[0-9]{1,10}(\.[0-9]{1,6})?", value) or Decimal(value) > MAX_COST:
        raise ValueError(
            f"must be an amount of at least 0 (at most {MAX_COST}) with at most 6 decimal places, in plain digits"
            " (such as 25 or 12.5; 0 refuses every answer)"
        )
    return Decimal(value)


def _flag(value: str) -> bool:
    if value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if value.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError("not 1/0, true/false, yes/no or on/off")


# The cast of each field type, unless its declaration names one.
_CASTS: dict[str, Callable[[str], Any]] = {
    "bool": _flag,
    "str": str,
    "str | None": lambda value: value or None,
    "int": int,
    "float": float,
    "tuple[str, ...]": _csv,
}


CONTINUE_STYLES = ("partial", "continue_final_message", "prefill", "off")  # CHATSVC_CONTINUE_STYLE


@dataclass(frozen=True)
class Settings:
    """Everything the service reads from its environment (or `.env`), read once at start."""

    dashscope_api_key: str | None = setting("DASHSCOPE_API_KEY", None, "the model service's key (required to chat)")
    dashscope_base_url: str = setting(
        "DASHSCOPE_BASE_URL",
        "https://dashscope.aliyuncs.com/compatible-mode/v1",
        "the OpenAI-compatible endpoint (any compatible server works)",
        cast=lambda v: v.rstrip("/"),
    )
    chat_model: str = setting("CHAT_MODEL", "qwen-plus", "the default model")
    system_prompt: str = setting("SYSTEM_PROMPT", "You are a helpful assistant.", "the default system prompt")
    database_url: str = setting("DATABASE_URL", "sqlite+aiosqlite:///./chatsvc.db", "SQLite file, or postgresql://…")
    api_token: str | None = setting("CHATSVC_API_TOKEN", None, "bearer token required on /api/")
    user_header: str | None = setting("CHATSVC_USER_HEADER", None, "header naming the user who owns conversations")
    cors_origins: tuple[str, ...] = setting("CHATSVC_CORS_ORIGINS", (), "browser origins allowed to call (a,b)")
    allowed_models: tuple[str, ...] = setting("CHATSVC_ALLOWED_MODELS", (), "further models clients may pick (a,b)")
    titles: str = setting(
        "CHATSVC_TITLES",
        "model",
        "model (the model titles a conversation after its first answer), first-line or off",
        cast=lambda v: _choice(v.lower(), ("model", "first-line", "off"), "CHATSVC_TITLES"),
    )
    title_model: str | None = setting("CHATSVC_TITLE_MODEL", None, "the model that writes titles (CHAT_MODEL if unset)")
    continue_style: str = setting(
        "CHATSVC_CONTINUE_STYLE",
        "partial",
        'how the model is asked to continue a stored answer ({"continue": id}): partial (DashScope\'s partial'
        " mode), continue_final_message (vLLM), prefill (llama.cpp, Ollama: a trailing assistant message) or off",
        cast=lambda v: _choice(v.lower(), CONTINUE_STYLES, "CHATSVC_CONTINUE_STYLE"),
    )
    max_import_bytes: int = setting("CHATSVC_MAX_IMPORT_BYTES", 64 * 1024 * 1024, "largest conversation to import")
    max_context_messages: int = setting("CHATSVC_MAX_CONTEXT_MESSAGES", 20, "history messages sent to the model")
    max_context_tokens: int | None = setting(
        "CHATSVC_MAX_CONTEXT_TOKENS",
        None,
        "estimated tokens sent to the model (6000 unless CHATSVC_CONTEXT_WINDOW is set; then at most the"
        " window's budget)",
        cast=lambda v: _int_between(v, 1, MAX_LIMIT),
    )
    context_window: ContextWindow | None = setting(  # noqa: RUF009 (a frozen dataclass)
        "CHATSVC_CONTEXT_WINDOW",
        None,
        "tokens of the model's real context window: N, or per model 'qwen-plus=131072,qwen-turbo*=1000000,8192'"
        " (a trailing * matches any rest; a bare N for the others); the context budget follows it",
        cast=lambda v: ContextWindow.parse(v),
    )
    summaries: str = setting(
        "CHATSVC_SUMMARIES",
        "on",
        "on (a branch that outgrows the context budget is summarised by the model, in the background) or off",
        cast=lambda v: _choice(v.lower(), ("on", "off"), "CHATSVC_SUMMARIES"),
    )
    summary_model: str | None = setting(
        "CHATSVC_SUMMARY_MODEL", None, "the model that writes summaries (unset: CHATSVC_TITLE_MODEL, else CHAT_MODEL)"
    )
    max_message_chars: int = setting("CHATSVC_MAX_MESSAGE_CHARS", 32000, "longest message a user may send")
    max_body_bytes: int = setting("CHATSVC_MAX_BODY_BYTES", 262144, "largest request body")
    max_answer_chars: int = setting(
        "CHATSVC_MAX_ANSWER_CHARS", 1_000_000, "longest answer (text + reasoning); past it it ends with 'length'"
    )
    upstream_connect_timeout: float = setting("CHATSVC_UPSTREAM_CONNECT_TIMEOUT", 10.0, "s to connect to the model")
    upstream_idle_timeout: float = setting("CHATSVC_UPSTREAM_IDLE_TIMEOUT", 60.0, "s the model may send nothing")
    upstream_total_timeout: float = setting("CHATSVC_UPSTREAM_TOTAL_TIMEOUT", 300.0, "s one answer may take")
    upstream_retries: int = setting("CHATSVC_UPSTREAM_RETRIES", 2, "retries before the first token (429/5xx)")
    replay_seconds: float = setting("CHATSVC_REPLAY_SECONDS", 30.0, "s a finished answer's events stay in memory")
    checkpoint_seconds: float = setting(
        "CHATSVC_CHECKPOINT_SECONDS", 1.0, "a running answer's new text is saved within this many s"
    )
    heartbeat_seconds: float = setting(
        "CHATSVC_HEARTBEAT_SECONDS", 5.0, "PostgreSQL: an answer whose process beat none for 3 of these is interrupted"
    )
    storage_timeout: float = setting(
        "CHATSVC_STORAGE_TIMEOUT", 10.0, "s an answer's final write is retried before readers get storage_failed"
    )
    read_timeout: float = setting(
        "CHATSVC_READ_TIMEOUT", 30.0, "s a request's headers, and then its body, may take to arrive (408)"
    )
    metrics: bool = setting("CHATSVC_METRICS", True, "serve Prometheus metrics at GET /metrics (no token needed)")
    docs: bool = setting("CHATSVC_DOCS", True, "serve the interactive API docs at GET /docs")
    playground: bool = setting("CHATSVC_PLAYGROUND", True, "serve the playground page at GET /")
    mcp_servers: tuple[McpServerConfig, ...] = setting(
        "CHATSVC_MCP_SERVERS",
        (),
        'MCP servers whose tools the model may call: a JSON file, or inline JSON ({"mcpServers": {...}})',
        cast=lambda v: parse_mcp_servers(v),
        echo=False,
    )
    max_tool_rounds: int = setting(
        "CHATSVC_MAX_TOOL_ROUNDS",
        8,
        "tool rounds in one answer (1-64)",
        cast=lambda v: _int_between(v, 1, 64),
    )
    tool_timeout: float = setting(
        "CHATSVC_TOOL_TIMEOUT", 30.0, "s one tool call may take", cast=lambda v: _positive(float(v))
    )
    max_tool_result_chars: int = setting(
        "CHATSVC_MAX_TOOL_RESULT_CHARS",
        20000,
        "a tool result longer than this is cut, with a note",
        cast=lambda v: _int_between(v, 100, 10_000_000),
    )
    max_file_bytes: int = setting(
        "CHATSVC_MAX_FILE_BYTES", 20 * 1024 * 1024, "largest file upload", cast=lambda v: _int_between(v, 1, 2**40)
    )
    max_storage_bytes_per_user: int = setting(
        "CHATSVC_MAX_STORAGE_BYTES_PER_USER",
        1024**3,
        "bytes of files one user may store (0: no limit)",
        cast=lambda v: _int_between(v, 0, 2**50),
    )
    max_files_per_message: int = setting(
        "CHATSVC_MAX_FILES_PER_MESSAGE", 10, "files one message may carry", cast=lambda v: _int_between(v, 1, 100)
    )
    max_context_images: int = setting(
        "CHATSVC_MAX_CONTEXT_IMAGES",
        4,
        "images of the history sent to the model again (newest first)",
        cast=lambda v: _int_between(v, 0, 100),
    )
    vision_model: str | None = setting(
        "CHATSVC_VISION_MODEL", None, "model for a turn whose context holds images, when the conversation's cannot see"
    )
    vision_models: tuple[str, ...] = setting(
        "CHATSVC_VISION_MODELS",
        ("qwen-vl-*", "qwen2.5-vl-*", "qwen3-vl-*", "qvq-*", "qwen3.5-*", "qwen3.6-*", "qwen-omni-*", "qwen3-omni-*"),
        "models that see images (a,b; a trailing * matches any rest)",
    )
    image_max_pixels: int = setting(
        "CHATSVC_IMAGE_MAX_PIXELS",
        1_003_520,
        "an image is scaled down to at most this many pixels before the model is sent it",
        cast=lambda v: _int_between(v, 784, 100_000_000),
    )
    max_image_pixels: int = setting(
        "CHATSVC_MAX_IMAGE_PIXELS",
        50_000_000,
        "largest image (in pixels) accepted at upload",
        cast=lambda v: _int_between(v, 784, 500_000_000),
    )
    max_document_pages: int = setting(
        "CHATSVC_MAX_DOCUMENT_PAGES", 500, "PDF pages read at upload", cast=lambda v: _int_between(v, 1, 100_000)
    )
    max_document_chars: int = setting(
        "CHATSVC_MAX_DOCUMENT_CHARS",
        2_000_000,
        "longest text a document may hold",
        cast=lambda v: _int_between(v, 1, 100_000_000),
    )
    extract_timeout: float = setting(
        "CHATSVC_EXTRACT_TIMEOUT", 20.0, "s one document's text extraction may take", cast=lambda v: _positive(float(v))
    )
    file_retention_hours: float = setting(
        "CHATSVC_FILE_RETENTION_HOURS",
        24.0,
        "hours an uploaded file no message uses is kept",
        cast=lambda v: _positive(float(v)),
    )
    prices: Prices | None = setting(  # noqa: RUF009 (a frozen dataclass)
        "CHATSVC_PRICES",
        None,
        "prices per million tokens, inline JSON or a file's path (CONTRACT.md, Usage); none: tokens only",
        cast=lambda v: Prices.parse(v),
    )
    admin_token: str | None = setting(
        "CHATSVC_ADMIN_TOKEN", None, "bearer token of the admin routes and of usage ?user=", echo=False
    )
    limit_tokens_per_day: int | None = setting(
        "CHATSVC_LIMIT_TOKENS_PER_DAY",
        None,
        "tokens an owner may spend per UTC day (none: no limit)",
        cast=lambda v: _limit(v, int),
    )
    limit_tokens_per_month: int | None = setting(
        "CHATSVC_LIMIT_TOKENS_PER_MONTH",
        None,
        "tokens an owner may spend per UTC month (none: no limit)",
        cast=lambda v: _limit(v, int),
    )
    limit_cost_per_month: Decimal | None = setting(  # noqa: RUF009 (Decimal is immutable)
        "CHATSVC_LIMIT_COST_PER_MONTH",
        None,
        "cost an owner may spend per UTC month, in CHATSVC_PRICES' currency (which must price every model)",
        cast=lambda v: _limit(v, Decimal),
    )
    limit_answers_per_minute: int | None = setting(
        "CHATSVC_LIMIT_ANSWERS_PER_MINUTE",
        None,
        "answers an owner may start per minute (a token bucket)",
        cast=lambda v: _limit(v, int),
    )
    limit_concurrent_answers: int | None = setting(
        "CHATSVC_LIMIT_CONCURRENT_ANSWERS",
        None,
        "answers an owner may have running at once",
        cast=lambda v: _limit(v, int),
    )
    reserve_output_tokens: int = setting(
        "CHATSVC_RESERVE_OUTPUT_TOKENS",
        4096,
        "output tokens an answer without max_tokens holds, and is sent as max_tokens, while a token or cost"
        " limit applies",
        cast=lambda v: _int_between(v, 1, 1_000_000),
    )
    web_search: str = setting(
        "CHATSVC_WEB_SEARCH",
        "off",
        "off, allowed (a request's or conversation's web_search turns DashScope's web search on) or always"
        " (every turn searches); each search costs money",
        cast=lambda v: _choice(v.lower(), WEB_SEARCH_MODES, "CHATSVC_WEB_SEARCH"),
    )
    dashscope_native_url: str | None = setting(
        "CHATSVC_DASHSCOPE_NATIVE_URL",
        None,
        "DashScope's native generation endpoint, which searched turns use (derived from a DASHSCOPE_BASE_URL"
        " ending in /compatible-mode/v1)",
        cast=lambda v: v.rstrip("/"),
    )
    ping_seconds: float = setting("CHATSVC_PING_SECONDS", 15.0, "s between keep-alive comments on streams")
    shutdown_grace: float = setting("CHATSVC_SHUTDOWN_GRACE", 8.0, "s running answers get after SIGTERM")
    host: str = setting("HOST", "0.0.0.0", "address to listen on")
    port: int = setting("PORT", 8000, "port to listen on (0 to 65535; 0: any free port)", cast=lambda v: _port(v))
    log_level: str = setting("LOG_LEVEL", "info", "debug, info, warning or error", cast=lambda v: v.lower())

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, env_file: str | None = ".env") -> Settings:
        """Read settings with Starlette's Config: the environment wins over `.env`."""
        if env_file is not None and not os.path.isfile(env_file):
            env_file = None  # a missing .env is normal, not worth Config's warning
        config = Config(env_file, environ=os.environ if environ is None else environ)
        values: dict[str, Any] = {}
        for f in fields(cls):
            env = f.metadata["env"]
            raw = config(env, default=None)
            if raw is None or (raw == "" and f.default is None):
                continue
            try:
                values[f.name] = (f.metadata["cast"] or _CASTS[f.type])(raw)
            except ValueError as exc:
                reason = str(exc) if f.metadata["cast"] else f"not a valid {f.type}"
                if reason.startswith(f"{env}: "):  # the cast's sentence names the setting (CHATSVC_PRICES)
                    raise ValueError(reason) from None
                shown = f"{env}={raw!r}" if f.metadata["echo"] else env
                raise ValueError(f"{shown}: {reason}.") from None
        settings = cls(**values)
        if settings.image_max_pixels > settings.max_image_pixels:
            raise ValueError("CHATSVC_IMAGE_MAX_PIXELS: must not be larger than CHATSVC_MAX_IMAGE_PIXELS.")
        if settings.limit_cost_per_month is not None and settings.prices is None:
            raise ValueError(
                "CHATSVC_LIMIT_COST_PER_MONTH: a cost limit needs prices to count costs with; set CHATSVC_PRICES."
            )
        if settings.limit_cost_per_month is not None and settings.unpriced_models():
            raise ValueError(
                f"CHATSVC_LIMIT_COST_PER_MONTH: a cost limit cannot hold for {settings.unpriced_models()}, which"
                " CHATSVC_PRICES has no price for (its calls would cost nothing against the limit); price each there"
                " (a pattern such as 'qwen-*' prices every model it matches), or stop calling it."
            )
        for env, token in (("CHATSVC_API_TOKEN", settings.api_token), ("CHATSVC_ADMIN_TOKEN", settings.admin_token)):
            if token is not None and token != token.strip():
                # a presented token is read without them (`Authorization: Bearer <token>`): it could never match
                raise ValueError(f"{env}: must not start or end with whitespace (a request's token is read without).")
        if settings.admin_token is not None and settings.admin_token == settings.api_token:
            raise ValueError(
                "CHATSVC_ADMIN_TOKEN: must differ from CHATSVC_API_TOKEN, which every client holds (with the same"
                " token every client could read everyone's usage and change their limits)."
            )
        if settings.web_search != "off" and settings.native_url is None:
            raise ValueError(
                f"CHATSVC_WEB_SEARCH={settings.web_search}: web search with sources uses DashScope's native endpoint,"
                " which cannot be derived from a DASHSCOPE_BASE_URL that does not end in /compatible-mode/v1; set"
                " CHATSVC_DASHSCOPE_NATIVE_URL (e.g. https://dashscope.aliyuncs.com/api/v1/services/aigc/text-generation"
                "/generation), or CHATSVC_WEB_SEARCH=off."
            )
        if settings.context_window is not None:
            windows = [(f" (for {name})" if name else "", tokens) for name, tokens in settings.context_window.models]
            if settings.context_window.default is not None:
                windows.append(("", settings.context_window.default))
            for named, tokens in windows:
                most = tokens - tokens // 16 - tokens // CONTEXT_ROOM_SHARE  # the largest allowance it takes
                if settings.reserve_output_tokens > most:
                    raise ValueError(
                        f"CHATSVC_CONTEXT_WINDOW: a window of {tokens} tokens{named} leaves less than 1/"
                        f"{CONTEXT_ROOM_SHARE} of it for the conversation once CHATSVC_RESERVE_OUTPUT_TOKENS"
                        f" ({settings.reserve_output_tokens}) are kept for the answer; set"
                        f" CHATSVC_RESERVE_OUTPUT_TOKENS to at most {most} (a quarter of the window is usual),"
                        " or check the window's size."
                    )
        if settings.vision_model and not settings.sees(settings.vision_model):
            raise ValueError(
                f"CHATSVC_VISION_MODEL={settings.vision_model!r}: not a model CHATSVC_VISION_MODELS names as seeing"
                " images; add it there."
            )
        return settings

    @classmethod
    def help(cls) -> str:
        """The configuration part of `chatsvc --help`."""
        lines = ["configuration (environment variables, or a .env file in the working directory):"]
        for f in fields(cls):
            default = ",".join(f.default) if isinstance(f.default, tuple) else f.default
            shown = "none" if default in (None, "") else f"{default:g}" if isinstance(default, float) else default
            lines.append(f"  {f.metadata['env']:<33} {f.metadata['help']} [{shown}]")
        return "\n".join(lines) + "\n"

    @property
    def models(self) -> tuple[str, ...]:
        return (self.chat_model, *self.allowed_models)

    def unpriced_models(self) -> str:
        """The models the service may call that CHATSVC_PRICES has no price for, each with the setting
        that names it ('qwen-turbo (CHATSVC_ALLOWED_MODELS), ...'; '' when every one has a price)."""
        called = [
            (self.chat_model, "CHAT_MODEL"),
            *((model, "CHATSVC_ALLOWED_MODELS") for model in self.allowed_models),
            *([(self.title_model, "CHATSVC_TITLE_MODEL")] if self.title_model and self.titles == "model" else []),
            *([(self.vision_model, "CHATSVC_VISION_MODEL")] if self.vision_model else []),
        ]
        unpriced: dict[str, list[str]] = {}
        for model, env in called:
            if self.prices is None or not self.prices.priced(model):
                envs = unpriced.setdefault(model, [])
                if env not in envs:  # a model CHATSVC_ALLOWED_MODELS names twice
                    envs.append(env)
        return ", ".join(f"{model} ({', '.join(envs)})" for model, envs in unpriced.items())

    def context_budget(self, model: str, output: int | None) -> int:
        """The context budget, in estimated tokens, of a request to `model` that may write `output`
        tokens (its max_tokens; None: CHATSVC_RESERVE_OUTPUT_TOKENS). Without CHATSVC_CONTEXT_WINDOW:
        CHATSVC_MAX_CONTEXT_TOKENS (6000 unset), as always. With it: the window less the output's
        allowance and a margin of 1/16 of the window for the estimator, and at most
        CHATSVC_MAX_CONTEXT_TOKENS when that is set too. At least 1 (a refusal then says why)."""
        window = self.context_window.of(model) if self.context_window is not None else None
        if window is None:
            return self.max_context_tokens or DEFAULT_CONTEXT_TOKENS
        room = self.window_room(window, output)
        if self.max_context_tokens is not None:
            room = min(room, self.max_context_tokens)
        return max(room, 1)

    def window_room(self, window: int, output: int | None) -> int:
        """What a window of `window` tokens leaves for the context (may be 0 or less): the window less
        the output's allowance and the estimator's margin (1/16 of the window)."""
        return window - (output or self.reserve_output_tokens) - window // 16

    @property
    def summarizer(self) -> str:
        """The model that writes summaries."""
        return self.summary_model or self.title_model or self.chat_model

    def sees(self, model: str) -> bool:
        """Whether `model` takes images (CHATSVC_VISION_MODELS; a pattern's trailing `*` matches any rest)."""
        return any(model.startswith(p[:-1]) if p.endswith("*") else model == p for p in self.vision_models)

    @property
    def native_url(self) -> str | None:
        """DashScope's native generation endpoint (searched turns): CHATSVC_DASHSCOPE_NATIVE_URL, else
        DASHSCOPE_BASE_URL's host with /api/v1/services/aigc/text-generation/generation in place of
        /compatible-mode/v1; None when neither says it."""
        if self.dashscope_native_url:
            return self.dashscope_native_url
        base = self.dashscope_base_url
        if base.endswith(COMPATIBLE_PATH):
            return base[: -len(COMPATIBLE_PATH)] + NATIVE_PATH
        return None

    @property
    def heartbeat_stale(self) -> float:
        """How old a heartbeat is when its process is taken for gone."""
        return HEARTBEAT_MISSES * self.heartbeat_seconds


HEARTBEAT_MISSES = 3
WEB_SEARCH_MODES = ("off", "allowed", "always")
COMPATIBLE_PATH = "/compatible-mode/v1"  # DashScope's OpenAI-compatible endpoint, under its host
NATIVE_PATH = "/api/v1/services/aigc/text-generation/generation"  # ... and its native one (searched turns)
DEFAULT_CONTEXT_TOKENS = 6000  # the context budget without CHATSVC_MAX_CONTEXT_TOKENS nor CHATSVC_CONTEXT_WINDOW
CONTEXT_ROOM_SHARE = 8  # a window must leave at least 1/8 of itself for the context after the output's allowance


@dataclass(frozen=True)
class ContextWindow:
    """CHATSVC_CONTEXT_WINDOW: the models' real context windows, in tokens: per model (a pattern's
    trailing `*` matches any rest; the first that matches counts), and for the others (None: unknown)."""

    models: tuple[tuple[str, int], ...] = ()
    default: int | None = None

    @classmethod
    def parse(cls, value: str) -> ContextWindow:
        models: list[tuple[str, int]] = []
        default = None
        for entry in _csv(value):
            name, equals, size = entry.rpartition("=")
            name = name.strip()
            try:
                tokens = int(size.strip())
            except ValueError:
                raise ValueError(f"{entry!r} is not a whole number of tokens nor model=tokens") from None
            if not 256 <= tokens <= 100_000_000:
                raise ValueError(f"{entry!r}: a context window must be between 256 and 100000000 tokens")
            if not equals:
                if default is not None:
                    raise ValueError("give one bare number (the window of the models not named), not two")
                default = tokens
            elif not name or "*" in name[:-1]:
                raise ValueError(f"{entry!r}: name a model, with at most a trailing * (qwen-turbo*=1000000)")
            else:
                models.append((name, tokens))
        if not models and default is None:
            raise ValueError("give a number of tokens, or model=tokens entries")
        return cls(tuple(models), default)

    def of(self, model: str) -> int | None:
        for pattern, tokens in self.models:
            if model.startswith(pattern[:-1]) if pattern.endswith("*") else model == pattern:
                return tokens
        return self.default


def _positive(value: float) -> float:
    if not value > 0 or math.isinf(value):
        raise ValueError("not a positive number of seconds")
    return value


def _port(value: str) -> int:
    """A TCP port: 0 to 65535 in plain digits (the socket layer would take 70000 as 70000 % 65536, and
    blame a negative one on the host)."""
    if not re.fullmatch(r"[0-9]{1,5}", value.strip()) or int(value) > 65535:
        raise ValueError("must be a port number from 0 to 65535 (0: any free port); set PORT to one")
    return int(value)


def _int_between(value: str, low: int, high: int) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ValueError("not a whole number") from None
    if not low <= number <= high:
        raise ValueError(f"must be between {low} and {high}")
    return number


@dataclass(frozen=True)
class McpServerConfig:
    """One entry of CHATSVC_MCP_SERVERS: a streamable-HTTP server (`url`) or a stdio one (`command`)."""

    name: str
    url: str | None = None
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)  # may hold tokens
    command: str | None = None
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] | None = field(default=None, repr=False)
    cwd: str | None = None
    owner_header: str | None = None  # send the conversation's owner in this header (HTTP only)
    timeout: float | None = None  # CHATSVC_TOOL_TIMEOUT for this server's calls
    tools: tuple[str, ...] | None = None  # offer only these of its tools


# Server names: the model sees `<server>__<tool>` (^[a-zA-Z0-9_-]{1,64}$); a name with no `__` that
# does not end with `_` makes the first `__` of an exposed name the end of the server's part, so two
# servers' tools can never be given the same exposed name.
_SERVER_NAME = re.compile(r"[a-zA-Z0-9_-]{1,24}")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110's token
_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_MCP_KEYS = {"url", "headers", "command", "args", "env", "cwd", "type", "transport", "disabled", "owner_header"}
_MCP_KEYS |= {"timeout", "tools"}
_HTTP_TYPES = ("http", "streamable-http", "streamable_http", "streamableHttp")


def parse_mcp_servers(value: str) -> tuple[McpServerConfig, ...]:
    """CHATSVC_MCP_SERVERS: inline JSON (it starts with `{`) or the path of a JSON file, shaped as
    other MCP clients write it: `{"mcpServers": {name: entry}}` or just `{name: entry}`. Each error is
    one sentence naming the server and the key; it never repeats a value (headers hold tokens)."""
    text = value.strip()
    if not text:
        return ()
    if text[0] not in "{[":
        try:
            text = Path(text).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            raise ValueError(f"not inline JSON (starting with '{{') and not a readable JSON file ({reason})") from None
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"not valid JSON (line {exc.lineno}, column {exc.colno})") from None  # type: ignore[attr-defined]
    if not isinstance(document, dict):
        raise ValueError("the JSON is not an object of servers")
    if "mcpServers" in document:
        document = document["mcpServers"]
        if not isinstance(document, dict):
            raise ValueError("mcpServers is not an object of servers")
    servers = []
    for name, entry in document.items():
        server = _mcp_server(name, entry)
        if server is None:
            log.info("MCP server %s is disabled in CHATSVC_MCP_SERVERS: skipped", name)
        else:
            servers.append(server)
    if servers:
        try:
            import mcp  # noqa: F401
        except ImportError:
            raise ValueError(
                "MCP servers are configured but the mcp package is not installed: pip install 'chatsvc[mcp]'"
            ) from None
    return tuple(servers)


def _mcp_server(name: str, entry: Any) -> McpServerConfig | None:
    where = f"server {name[:40]!r}"
    if not _SERVER_NAME.fullmatch(name) or "__" in name or name.endswith("_"):
        raise ValueError(
            f"the {where} has a name that is not 1-24 letters, digits, '_' or '-' without '__' and not ending in '_'"
        )
    if not isinstance(entry, dict):
        raise ValueError(f"the {where} is not an object")
    unknown = sorted(set(entry) - _MCP_KEYS)
    if unknown:
        raise ValueError(f"the {where} has an unknown key {unknown[0][:40]!r}")
    if entry.get("disabled") is True:
        return None
    if "disabled" in entry and entry["disabled"] is not False:
        raise ValueError(f"the {where} has a 'disabled' that is not true or false")
    url, command = entry.get("url"), entry.get("command")
    kind = entry.get("type", entry.get("transport"))
    if kind == "sse":
        raise ValueError(f"the {where} asks for the SSE transport, which is not supported; use streamable HTTP")
    if kind is not None and kind not in (*_HTTP_TYPES, "stdio"):
        raise ValueError(f"the {where} has a 'type' that is not http, streamable-http or stdio")
    if (url is None) == (command is None):
        raise ValueError(f"the {where} needs exactly one of 'url' (streamable HTTP) and 'command' (stdio)")
    if kind is not None and (kind == "stdio") != (command is not None):
        raise ValueError(f"the {where} has a 'type' that does not agree with its {'command' if command else 'url'}")
    timeout = entry.get("timeout")
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf
    ):
        raise ValueError(f"the {where} has a 'timeout' that is not a positive number of seconds")
    tools = entry.get("tools")
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, str) and t for t in tools)):
        raise ValueError(f"the {where} has a 'tools' that is not a list of tool names")
    common = {"name": name, "timeout": None if timeout is None else float(timeout)}
    common["tools"] = None if tools is None else tuple(tools)
    if url is not None:
        if not isinstance(url, str) or not re.match(r"https?://[^/?#\s]+", url):
            raise ValueError(f"the {where} has a 'url' that is not an http:// or https:// URL")
        for key in ("args", "env", "cwd"):
            if key in entry:
                raise ValueError(f"the {where} has a '{key}', which only a stdio server (with a 'command') takes")
        headers = _strings(entry.get("headers", {}), where, "headers")
        if not all(_HEADER_NAME.fullmatch(h) for h, _ in headers):
            raise ValueError(f"the {where} has a header name that is not a valid HTTP header name")
        owner = entry.get("owner_header")
        if owner is not None and (not isinstance(owner, str) or not _HEADER_NAME.fullmatch(owner)):
            raise ValueError(f"the {where} has an 'owner_header' that is not a valid HTTP header name")
        return McpServerConfig(url=url, headers=headers, owner_header=owner, **common)
    if not isinstance(command, str) or not command.strip():
        raise ValueError(f"the {where} has a 'command' that is not a non-empty string")
    for key in ("headers", "owner_header"):
        if key in entry:
            raise ValueError(f"the {where} has a '{key}', which only an HTTP server (with a 'url') takes")
    args = entry.get("args", [])
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise ValueError(f"the {where} has an 'args' that is not a list of strings")
    cwd = entry.get("cwd")
    if cwd is not None and (not isinstance(cwd, str) or not cwd):
        raise ValueError(f"the {where} has a 'cwd' that is not a directory path")
    env = _strings(entry["env"], where, "env") if "env" in entry else None
    return McpServerConfig(command=command, args=tuple(args), env=env, cwd=cwd, **common)


def _strings(value: Any, where: str, key: str) -> tuple[tuple[str, str], ...]:
    """An object of strings; `${VAR}` in a value is the environment's VAR (an unset one is an error)."""
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ValueError(f"the {where} has a '{key}' that is not an object of strings")

    def resolve(match: re.Match) -> str:
        if match[1] not in os.environ:
            raise ValueError(f"the {where} has a '{key}' value naming ${{{match[1]}}}, which is not set")
        return os.environ[match[1]]

    return tuple((k, _ENV_REFERENCE.sub(resolve, v)) for k, v in value.items())


# ── Prices: what the model service charges: the price table, and what a call costs ──────
# CHATSVC_PRICES, in one currency, per million tokens: each model's input, output, output while it
# thinks, and cached input, with tiers chosen by a call's input tokens (docs/design/usage.md, 1.2).
# Exact: Decimal arithmetic, and costs in whole millionths of the currency ("micros").

MICROS = 1_000_000  # micros in one unit of the currency
MAX_PRICE = 1_000_000  # per million tokens, at most: a call's cost in micros stays far inside a BIGINT


@dataclass(frozen=True)
class Rate:
    """A model's prices for calls in one tier, per million tokens."""

    input: Decimal
    output: Decimal
    output_thinking: Decimal  # a call that thought: all its output at this rate (unset: `output`)
    cached_input: Decimal  # prompt tokens the model service served from its cache (unset: `input`)
    above_input_tokens: int = 0  # the tier is for calls whose prompt has more tokens than this


@dataclass(frozen=True)
class Prices:
    """The price table: one currency, each model's tiers (lowest first). A model is named exactly,
    or by a pattern whose trailing `*` matches any rest (`qwen-plus*`); the exact name wins."""

    currency: str
    models: dict[str, tuple[Rate, ...]]

    @classmethod
    def parse(cls, value: str) -> Prices:
        """CHATSVC_PRICES: inline JSON (it starts with `{`) or a file's path. A mistake is a ValueError
        of one sentence naming what is wrong (CONTRACT.md, "Usage")."""
        text = value.strip()
        if not text.startswith("{"):
            try:
                text = Path(text).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
                raise ValueError(f"CHATSVC_PRICES: cannot read the file {value.strip()!r} ({reason}).") from None
        try:
            table = json.loads(text, parse_float=Decimal)
        except ValueError as exc:
            where = f" (line {exc.lineno}, column {exc.colno})" if isinstance(exc, json.JSONDecodeError) else ""
            raise ValueError(f"CHATSVC_PRICES: not valid JSON{where}.") from None
        _fields(table, "", ("currency", "models"), ("currency", "models"))
        currency = table["currency"]
        if not isinstance(currency, str) or not currency.strip() or len(currency) > 16:
            raise ValueError("CHATSVC_PRICES: currency must be a currency's code, such as CNY or USD.")
        models = table["models"]
        if not isinstance(models, dict):
            raise ValueError("CHATSVC_PRICES: models must be an object of model names and their prices.")
        rates: dict[str, tuple[Rate, ...]] = {}
        for name, entry in models.items():
            where = f"models.{name}"
            if not name or name == "*" or "*" in name[:-1]:
                raise ValueError(f"CHATSVC_PRICES: {where} must be a model's name, or a prefix ending in '*'.")
            _fields(entry, where, (*_RATE_FIELDS, "tiers"), ("input", "output"))
            tiers = [_rate(entry, where, 0)]
            listed = entry.get("tiers", [])
            if not isinstance(listed, list):
                raise ValueError(f"CHATSVC_PRICES: {where}.tiers must be a list of tiers.")
            for n, tier in enumerate(listed):
                at = f"{where}.tiers[{n}]"
                _fields(tier, at, ("above_input_tokens", *_RATE_FIELDS), ("above_input_tokens", "input", "output"))
                above = tier["above_input_tokens"]
                if type(above) is not int or above <= tiers[-1].above_input_tokens:
                    raise ValueError(
                        f"CHATSVC_PRICES: {at}.above_input_tokens must be a whole number above"
                        f" {tiers[-1].above_input_tokens} (tiers go from the fewest input tokens up)."
                    )
                tiers.append(_rate(tier, at, above))
            rates[name] = tuple(tiers)
        return cls(currency.strip(), rates)

    def priced(self, model: str) -> bool:
        """Whether the table has a price for `model` (by its name, or a pattern that matches it)."""
        return model in self.models or any(p.endswith("*") and model.startswith(p[:-1]) for p in self.models)

    def rate(self, model: str, prompt_tokens: int) -> Rate | None:
        """The rate of a call of `model` with this many prompt tokens; None: the model has no price."""
        tiers = self.models.get(model)
        if tiers is None:  # the longest pattern that matches
            patterns = [p for p in self.models if p.endswith("*") and model.startswith(p[:-1])]
            if not patterns:
                if model not in _UNPRICED:
                    _UNPRICED.add(model)
                    log.warning("model %s has no price in CHATSVC_PRICES: its calls' cost is unknown", model)
                return None
            tiers = self.models[max(patterns, key=len)]
        rate = tiers[0]
        for tier in tiers[1:]:  # all or nothing: the whole call at the tier its prompt reaches
            if prompt_tokens > tier.above_input_tokens:
                rate = tier
        return rate

    def cost(self, model: str, spent: Spent, thinking: bool) -> int | None:
        """What a call cost, in micros (rounded up to a whole micro); None: the model has no price.
        A call that thought (`thinking`: reasoning was received, or reasoning tokens reported) has all
        its output at the thinking rate; its cached prompt tokens at the cached rate, the rest of the
        prompt (cache creation included) at the input rate."""
        rate = self.rate(model, spent.prompt_tokens)
        if rate is None:
            return None
        cached = min(spent.cached_tokens or 0, spent.prompt_tokens)
        thought = thinking or bool(spent.reasoning_tokens)
        output = rate.output_thinking if thought else rate.output
        # a price per million tokens is the price in micros of one token
        micros = (spent.prompt_tokens - cached) * rate.input + cached * rate.cached_input
        return math.ceil(micros + spent.completion_tokens * output)

    def hold(self, model: str, prompt_tokens: int, output_tokens: int) -> int:
        """What a call about to be made holds against a cost limit, in micros (0: the model has no price).
        Its output at the higher of `output` and `output_thinking`: a hold errs high, and whether a call
        thinks is known only once it has (a model may think by default, or think only)."""
        rate = self.rate(model, prompt_tokens)
        if rate is None:
            return 0
        return math.ceil(prompt_tokens * rate.input + output_tokens * max(rate.output, rate.output_thinking))


_RATE_FIELDS = ("input", "output", "output_thinking", "cached_input")
_UNPRICED: set[str] = set()  # models whose missing price was logged


def _fields(value: Any, where: str, known: tuple[str, ...], required: tuple[str, ...]) -> None:
    """A price table's object: only `known` keys, and every `required` one."""
    shown = where or "the table"
    if not isinstance(value, dict):
        raise ValueError(f"CHATSVC_PRICES: {shown} must be an object.")
    for key in value:
        if key not in known:
            raise ValueError(
                f"CHATSVC_PRICES: {where + '.' if where else ''}{key} is not a field it takes ({', '.join(known)})."
            )
    for key in required:
        if key not in value:
            raise ValueError(f"CHATSVC_PRICES: {shown} needs {key}.")


def _price(entry: dict, where: str, key: str) -> Decimal:
    """A price per million tokens: a number, or a decimal in a string, of at least 0."""
    value = entry[key]
    try:
        price = Decimal(value.strip() if isinstance(value, str) else value) if type(value) is not bool else None
    except (ArithmeticError, ValueError, TypeError):
        price = None
    if price is None or not price.is_finite() or price < 0:
        raise ValueError(f"CHATSVC_PRICES: {where}.{key} must be a number of at least 0.")
    if price > MAX_PRICE:  # a call's cost must fit a BIGINT of micros
        raise ValueError(f"CHATSVC_PRICES: {where}.{key} must be at most {MAX_PRICE} (a price per million tokens).")
    return price


def _rate(entry: dict, where: str, above: int) -> Rate:
    prices = {key: _price(entry, where, key) for key in _RATE_FIELDS if key in entry}
    return Rate(
        prices["input"],
        prices["output"],
        prices.get("output_thinking", prices["output"]),
        prices.get("cached_input", prices["input"]),
        above,
    )


def money(micros: int) -> float:
    """A cost as the API shows it: units of the currency, a JSON number rounded to 6 places."""
    return round(micros / MICROS, 6)


@dataclass(frozen=True)
class Cost:
    """What something cost: micros of a currency."""

    micros: int
    currency: str

    def shown(self) -> dict:
        """As an event or a message carries it: `cost` (money) and `currency`."""
        return {"cost": money(self.micros), "currency": self.currency}


# ── Errors: domain refusals, and the HTTP errors they become ({"detail", "code"}) ──────
# The store, the context builder, the upstream client and the answers raise `Refusal`s: domain
# errors with a contract code and a sentence for a person. `api_error` maps them to HTTP here, in
# one place; every other `ApiError` the handlers and middleware answer is made by a function below.


class ApiError(Exception):
    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None, **extra: Any):
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers, self.extra = status, code, detail, headers, extra

    def response(self) -> JSONResponse:
        body = {"detail": self.detail, "code": self.code, **self.extra}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


class Refusal(Exception):
    """A domain error: what went wrong (`code`, `detail`) and, if trying again may help, when."""

    code = "error"

    def __init__(self, detail: str, code: str | None = None, retry_after: float | None = None):
        super().__init__(detail)
        self.detail, self.retry_after = detail, retry_after
        if code is not None:
            self.code = code


class NotFound(Refusal):
    code = "not_found"


class ConversationBusy(Refusal):
    code = "conversation_busy"


class ContextTooLong(Refusal):
    code = "context_too_long"


class StorageUnavailable(Refusal):
    """The database cannot take a write (or answer a read) now: locked, full, unreachable."""

    code = "storage_unavailable"

    def __init__(self, detail: str, retry_after: float = 2):
        super().__init__(detail, retry_after=retry_after)


class _GroupFault(StorageUnavailable):
    """Database.together: a write another body of the group left for later failed: the group is undone."""


class Deadlock(StorageUnavailable):
    """PostgreSQL cancelled this transaction to break a lock cycle with another one: nothing of it was
    written, and running it again is safe (see `Database.atomically`)."""


class StorageFailed(Refusal):
    """An answer's final state could not be stored in time: its readers are told, the write goes on."""

    code = "storage_failed"


class AnswerInterrupted(Refusal):
    code = "interrupted"


class SearchTooCostly(Refusal):
    """A search ran past its budget (SEARCH_SECONDS) and was stopped."""

    code = "search_too_costly"


class FileRefused(Refusal):
    """A file, or a message's files, refused: with its own HTTP status (400, 404, 409, 413, 415 or 422)
    and code (CONTRACT.md, "Files")."""

    def __init__(self, status: int, code: str, detail: str):
        super().__init__(detail, code)
        self.status = status


class OverLimit(Refusal):
    """A turn refused by one of its owner's limits (`limit`: a LIMIT_KINDS name): `quota_exceeded`
    (tokens or cost) or `rate_limited` (answers per minute, concurrent answers), 429 with Retry-After.
    `detail` says which limit, its size and when it resets; the body carries them as fields too."""

    status = 429

    def __init__(
        self, code: str, detail: str, limit: str, size: int | str, used: int | str, resets_at: str | None,
        retry_after: float,
    ):  # fmt: skip
        super().__init__(detail, code, retry_after)
        self.limit, self.size, self.used, self.resets_at = limit, size, used, resets_at


class NotContinuable(Refusal):
    """`continue` names an answer whose text cannot be continued (it is whole, empty, waits for tool
    results, or has replies)."""

    code = "not_continuable"


class SearchBusy(Refusal):
    """SQLite: other searches held the search connection for a whole budget: this one never started."""

    code = "search_busy"


# The HTTP status of each domain code; an UpstreamError carries its own (see upstream_error).
HTTP_STATUS = {
    "not_found": 404,
    "conversation_busy": 409,
    "not_continuable": 409,
    "context_too_long": 422,
    "search_too_costly": 422,
    "search_busy": 503,
    "storage_unavailable": 503,
    "storage_failed": 503,
    "interrupted": 503,
}


def api_error(exc: Refusal) -> ApiError:
    if isinstance(exc, OverLimit):
        return over_limit(exc)
    status = getattr(exc, "status", None) or HTTP_STATUS.get(exc.code, 500)
    headers = {"Retry-After": str(max(1, round(exc.retry_after)))} if exc.retry_after else None
    return ApiError(status, exc.code, exc.detail, headers=headers)


def over_limit(exc: OverLimit) -> ApiError:
    """429 with `Retry-After` (whole seconds to the limit's reset, rounded up, at least 1) and the limit's
    `limit`, `size`, `used` and `resets_at` as fields; a cost's size and use in the currency, not micros."""
    size, used = exc.size, exc.used
    if exc.limit == "cost_per_month":  # micros (an amount's text: taken as it says)
        size, used = (money(v) if isinstance(v, int) else round(float(Decimal(v)), 6) for v in (size, used))
    headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after or 0)))}
    return ApiError(
        429, exc.code, exc.detail, headers=headers, limit=exc.limit, size=size, used=used, resets_at=exc.resets_at
    )


def invalid(detail: str) -> ApiError:
    return ApiError(422, "invalid_request", detail)


def not_found(session_id: str) -> NotFound:
    return NotFound(f"No conversation with session_id '{session_id}'.")


def message_not_found(session_id: str, message_id: str) -> NotFound:
    return NotFound(f"Conversation '{session_id}' has no message '{message_id}'.")


def busy(session_id: str) -> ConversationBusy:
    return ConversationBusy(
        f"An answer is already being generated in conversation '{session_id}'. "
        "Wait for it to finish, or stop it with POST /api/v1/chat/{session_id}/stop."
    )


def not_stored_yet(session_id: str) -> StorageUnavailable:
    return StorageUnavailable(
        f"The last answer in conversation '{session_id}' is not stored yet (the database is failing); chatsvc"
        " keeps trying. Try again once GET /readyz answers 200."
    )


def unsupported_media_type(content_type: str | None) -> ApiError:
    given = f"'{content_type[:100]}'" if content_type else "none"
    return ApiError(
        415, "unsupported_media_type", f"The body must be JSON, sent as 'Content-Type: application/json' (got {given})."
    )


def request_timeout(seconds: float) -> ApiError:
    return ApiError(
        408, "request_timeout", f"The request body did not arrive within {seconds:g} s (CHATSVC_READ_TIMEOUT)."
    )


def cors_rejected(reason: str) -> ApiError:
    return ApiError(
        400,
        "cors_rejected",
        f"This browser request is not allowed ({reason}): its origin, method or headers are not in chatsvc's CORS"
        " settings (CHATSVC_CORS_ORIGINS).",
    )


def too_large(limit: int) -> ApiError:
    return ApiError(413, "payload_too_large", f"The request body is larger than {limit} bytes.")


def not_json(detail: str = "The request body is not valid JSON.") -> ApiError:
    return ApiError(400, "invalid_json", detail)


def client_disconnected() -> ApiError:
    return ApiError(400, "client_disconnected", "The connection closed before the body was complete.")


def unauthorized(detail: str, headers: dict[str, str] | None = None) -> ApiError:
    return ApiError(401, "unauthorized", detail, headers=headers)


def search_too_costly() -> SearchTooCostly:
    return SearchTooCostly(
        f"This search took more than {SEARCH_SECONDS:g} s and was stopped: search for a longer or more particular"
        " text (a text that repeats a few letters is costly to look for in long messages)."
    )


def conversation_exists(session_id: str) -> ApiError:
    return ApiError(409, "conversation_exists", f"A conversation with session_id '{session_id}' already exists.")


def not_configured() -> ApiError:
    return ApiError(503, "not_configured", "No model service is configured: set DASHSCOPE_API_KEY.")


def shutting_down() -> ApiError:
    return ApiError(
        503, "shutting_down", "chatsvc is shutting down; try again in a moment.", headers={"Retry-After": "1"}
    )


def no_route(path: str) -> ApiError:
    return ApiError(404, "not_found", f"There is no route {path}.")


def method_not_allowed(method: str, path: str, allowed: list[str]) -> ApiError:
    detail = f"{method} is not allowed on {path}; use {', '.join(allowed)}."
    return ApiError(405, "method_not_allowed", detail, headers={"Allow": ", ".join(allowed)})


def headers_too_large(limit: int) -> ApiError:
    return ApiError(431, "headers_too_large", f"The request headers are larger than {limit} bytes.")


def http_error(status: int, detail: str, headers: Any = None) -> ApiError:
    return ApiError(status, "http_error", detail, headers=headers)


def internal_error() -> ApiError:
    return ApiError(500, "internal_error", "Something went wrong inside chatsvc; the error is in its log.")


# ── Metrics: what an operator scrapes (GET /metrics) ───────────────────────────────────
# Each app has a registry of its own (several apps share a process in tests and benches). Labels are
# bounded by configuration and the contract (models, statuses, codes, route templates): never an id,
# a user or a text. Nothing here runs per relayed chunk.

GROUP_BUCKETS = (1, 2, 3, 4, 6, 8)  # chatsvc_db_group_bodies: a group holds at most GROUP_BODIES
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = prometheus_client.CollectorRegistry()
        c, h, g = prometheus_client.Counter, prometheus_client.Histogram, prometheus_client.Gauge
        # A table, one metric to a line or two (the formatter would spread each over five): `fmt: skip`.
        self.answers = c("chatsvc_answers", "Answers ended, by final status, error code (none) and model",
                         ["status", "code", "model"], registry=r)  # fmt: skip
        self.first_token = h("chatsvc_answer_first_token_seconds", "From an answer's start to its first token",
                             ["model"], buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.duration = h("chatsvc_answer_duration_seconds", "From an answer's start to its end", ["model"],
                          buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.tokens = c("chatsvc_tokens", "Tokens the model service counted, by model and kind (prompt, completion,"
                        " and of them reasoning and cached; title_ the same for titles)", ["model", "kind"],
                        registry=r)  # fmt: skip
        self.tokens_estimated = c(
            "chatsvc_tokens_estimated",
            "Tokens chatsvc estimated for answers the model service reported no usage for, by model and kind"
            " (prompt, completion)",
            ["model", "kind"],
            registry=r,
        )
        self.upstream = c("chatsvc_upstream_requests", "Calls to the model service, by purpose (answer, title) and"
                          " outcome (ok, or the error code)", ["purpose", "outcome"], registry=r)  # fmt: skip
        self.retries = c("chatsvc_upstream_retries", "Calls to the model service made again", ["purpose"], registry=r)
        self.rate_limited = c("chatsvc_upstream_rate_limited", "429 answers of the model service", registry=r)
        self.summaries = c("chatsvc_summaries", "Summaries asked of the model, by outcome (made, exists, failed,"
                           " over_limit, gone, unstored)", ["outcome"], registry=r)  # fmt: skip
        self.running = g("chatsvc_running_answers", "Answers this process is producing", registry=r)
        self.listeners = g("chatsvc_channel_listeners", "EventSource channels open (GET .../stream)", registry=r)
        self.streams = g("chatsvc_open_streams", "Event streams open (POST .../stream and channels)", registry=r)
        self.requests = c("chatsvc_http_requests", "HTTP requests, by route template, method and status",
                          ["route", "method", "status"], registry=r)  # fmt: skip
        self.latency = h("chatsvc_http_request_duration_seconds", "From a request to its response's status line"
                         " (for a stream: to its first byte)", ["route", "method"], buckets=LATENCY_BUCKETS,
                         registry=r)  # fmt: skip
        self.statements = h("chatsvc_db_statement_seconds", "Database statements, by connection role (read, write,"
                            " background, search)", ["role"], buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.group_commits = h("chatsvc_db_group_bodies", "SQLite: transactions stored together in one commit"
                               " (group commit), by how many each group ran", buckets=GROUP_BUCKETS,
                               registry=r)  # fmt: skip
        self.storage_faults = c("chatsvc_storage_faults", "Database failures, by kind (deadlock, locked, disk_full,"
                                " timeout, other)", ["kind"], registry=r)  # fmt: skip
        self.bus = c("chatsvc_bus_notifications", "PostgreSQL notifications between replicas, by event (sent,"
                     " received, unsent)", ["event"], registry=r)  # fmt: skip
        self.bus_gaps = c("chatsvc_bus_gaps", "Mirrored answers caught up from the store: a notification"
                          " missed, an event too long to notify, or joined mid-answer", registry=r)  # fmt: skip
        self.tool_calls = c("chatsvc_tool_calls", "Tool calls, by server and tool (configured and listed names;"
                            " client tools server=client, unknown names -) and outcome", ["server", "tool", "outcome"],
                            registry=r)  # fmt: skip
        self.tool_seconds = h("chatsvc_tool_call_seconds", "MCP tool calls' duration, by server and tool",
                              ["server", "tool"], buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.tool_rounds = h("chatsvc_tool_rounds", "Tool rounds per answer", buckets=tuple(range(9)),
                             registry=r)  # fmt: skip
        self.mcp_server_up = g("chatsvc_mcp_server_up", "1 while chatsvc holds a working connection to the MCP"
                               " server, else 0", ["server"], registry=r)  # fmt: skip
        self.file_uploads = c("chatsvc_file_uploads", "File uploads, by kind (image, document; unknown for a"
                              " refusal) and outcome (stored, deduplicated, or the refusal's code)",
                              ["kind", "outcome"], registry=r)  # fmt: skip
        self.file_upload_bytes = c("chatsvc_file_upload_bytes", "Bytes of files received by uploads (whatever their"
                                   " outcome)", registry=r)  # fmt: skip
        self.file_processing = h("chatsvc_file_processing_seconds", "A new file's examination at upload (sniff, checks,"
                                 " text extraction, model copy), by kind", ["kind"], buckets=LATENCY_BUCKETS,
                                 registry=r)  # fmt: skip
        self.files_collected = c("chatsvc_files_collected", "Files the collector deleted: unused past"
                                 " CHATSVC_FILE_RETENTION_HOURS, or uploads a crash left unfinished",
                                 registry=r)  # fmt: skip
        self.context_images = h("chatsvc_context_images", "Images in the context an answer's model is sent",
                                buckets=(0, 1, 2, 3, 4, 6, 8, 12, 16, 32, 64), registry=r)  # fmt: skip
        self.limit_refusals = c("chatsvc_limit_refusals", "Turns refused by an owner's limit, by limit"
                                " (tokens_per_day, tokens_per_month, cost_per_month, answers_per_minute,"
                                " concurrent_answers)", ["limit"], registry=r)  # fmt: skip
        self.cost = c("chatsvc_cost", "What upstream calls cost (CHATSVC_PRICES), by model and currency, in units of"
                      " the currency", ["model", "currency"], registry=r)  # fmt: skip
        self.vision_switches = c("chatsvc_vision_switches", "Answers sent to CHATSVC_VISION_MODEL because their"
                                 " context held images the conversation's model cannot see", registry=r)  # fmt: skip

    def upstream_call(self, purpose: str, error: Refusal | None) -> None:
        outcome = "ok" if error is None else error.code
        self.upstream.labels(purpose, outcome).inc()
        if error is not None and getattr(error, "status", None) == 429:
            self.rate_limited.inc()

    def usage(self, model: str, usage: dict | None, prefix: str = "", estimated: bool = False) -> None:
        """Tokens counted: prompt and completion, and of them reasoning and cached when reported."""
        counter = self.tokens_estimated if estimated else self.tokens
        for kind in ("prompt", "completion", "reasoning", "cached"):
            count = (usage or {}).get(f"{kind}_tokens")
            if isinstance(count, int) and count > 0:
                counter.labels(model, prefix + kind).inc(count)

    def spent(self, model: str, spent: Spent, prefix: str = "") -> None:
        """One upstream call's use (a Spent): its tokens (usage) and its cost."""
        counts = {f"{k}_tokens": getattr(spent, f"{k}_tokens") for k in ("prompt", "completion", "reasoning", "cached")}
        self.usage(model, counts, prefix, estimated=spent.source is Source.ESTIMATED)
        if spent.cost:
            self.cost.labels(model, spent.currency).inc(spent.cost / MICROS)

    def file_upload(self, kind: str | None, outcome: str) -> None:
        """An upload ended: `outcome` stored, deduplicated, or its refusal's code (kind None: not known)."""
        self.file_uploads.labels(kind or "unknown", outcome).inc()

    def exposition(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)


# ── Rows: the statuses, times and ids the stored rows carry ────────────────────────────

STREAMING, COMPLETE, STOPPED, INTERRUPTED, FAILED = "streaming", "complete", "stopped", "interrupted", "failed"


def utcnow(seconds_ago: float = 0.0) -> str:
    """RFC 3339 UTC with milliseconds: sorts as text, portable across databases."""
    moment = datetime.now(timezone.utc) - timedelta(seconds=seconds_ago)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def clock_us() -> int:
    """This process's wall clock, in microseconds since the epoch: where new ids start."""
    return time.time_ns() // 1000


_last_id_us = 0
_ID_TIME = re.compile(r"[0-9a-f]{14}")


def new_message_id(after: str = "") -> str:
    """A new message id: 14 hex digits of microseconds, then 10 random ones. It sorts after `after`
    (the largest id its conversation holds, read before: see Tree.chat_context) and after every id
    this process made, whatever this process's clock says, as a hybrid logical clock: replicas'
    clocks may disagree, and a message must still sort after everything its writer saw."""
    global _last_id_us
    floor = int(after[:14], 16) if _ID_TIME.match(after) else 0  # (an id this service made)
    _last_id_us = max(clock_us(), _last_id_us + 1, floor + 1)
    return f"{_last_id_us:014x}{os.urandom(5).hex()}"  # (uuid4's 16 random bytes, 40 bits used, cost 4 us)


# An answer's tool steps (messages.tool_steps) and a tool-results turn's results (messages.tool_results)
# are JSON text, written as json.dumps(..., ensure_ascii=False, separators=(",", ":")) writes it (see
# CONTRACT.md, "Tool calls in the store"). What no database stores, or no reader can be sent as UTF-8:
# NUL, escaped (`\u0000`, not after an escaping backslash) or not, and lone surrogates (which that
# json.dumps writes as they are).
_UNSTORABLE_JSON = re.compile(r"[\x00\ud800-\udfff]|(?<!\\)((?:\\\\)*)\\u0000")


def storable_json(text: str | None) -> str | None:
    """JSON text as it can be stored and read back: NUL and lone surrogates in it become U+FFFD."""
    if text is None:
        return None
    return _UNSTORABLE_JSON.sub(lambda m: (m[1] or "") + "\ufffd", text)


def pending_tool_calls(steps: list[dict]) -> list[dict]:
    """The calls an answer that ended with finish_reason "tool_calls" waits on the app for: the
    tool_call steps of its last round that are not a server tool's and have no result among the
    steps, as [{"id", "name", "arguments"}], in the order they were made."""
    calls = [step["data"] for step in steps if step.get("type") == "tool_call"]
    if not calls:
        return []
    last = max(call.get("round", 0) for call in calls)
    answered = {step["data"].get("id") for step in steps if step.get("type") == "tool_result"}
    return [
        {"id": call["id"], "name": call["name"], "arguments": call["arguments"]}
        for call in calls
        if call.get("round", 0) == last and "server" not in call and call["id"] not in answered
    ]


# ── Database: its connections and their roles, transactions and faults ─────────────────

SQLITE_BUSY_MS = 5000  # how long a statement waits for another process's write lock
PG_COMMAND_SECONDS = 30  # PostgreSQL: the longest a statement (a COMMIT too) runs before it fails
# SQLite: the most bodies one group commit runs (Database.together); the rest form the next group. Each
# body's caller waits for its group's COMMIT: at 200 turns arriving together, groups of 8 started half
# of the answers 0.15-0.5 s sooner than groups of any size (bench/relay.py --only c), and cost no throughput
GROUP_BODIES = 8
DEADLOCK_ATTEMPTS = 3  # a transaction PostgreSQL cancelled to break a deadlock runs again, up to this in all
T = TypeVar("T")

READ, WRITE, BACKGROUND, SEARCH = "read", "write", "background", "search"  # SQLite: which of the database's connections


class Later:
    """The rows of a statement sent later (Database.fetch_later): None until it has run."""

    __slots__ = ("rows",)

    def __init__(self) -> None:
        self.rows: list[dict] | None = None


_BEGIN = ("BEGIN IMMEDIATE", {})  # SQLite: a write transaction's first statement, sent with its second


@dataclass(eq=False)
class _Member:
    """A body waiting in a group (Database.together), and where its outcome goes."""

    body: Callable[[], Awaitable[Any]]
    future: asyncio.Future
    started: bool = False
    left: bool = False  # its caller was cancelled before it started


class _Batch(str):
    """SQLite: several statements sent to a connection's thread at once (Database.execute's `later`):
    `before`, [(sql, values[, Later])] in order (a Later gets its statement's rows), then `last` with
    the values it is executed with. Its own text is all of them: a connection other than
    _SQLiteConnection refuses it (several statements at once), so none can be skipped unseen."""

    before: list[tuple]
    last: str
    failed_at = -1  # the index in `before` of the statement that raised (set on the connection's thread)
    theirs = -1  # Database.together: the running body's SAVEPOINT in `before` (what comes before is others')

    @classmethod
    def of(cls, before: list[tuple], last: str) -> _Batch:
        batch = cls("; ".join([statement[0] for statement in before] + [last]))
        batch.before, batch.last = before, last
        return batch


class _SQLiteConnection(sqlite3.Connection):
    """Connection factory: PRAGMAs are per connection, so they are set where it is opened. It runs a
    _Batch's statements in order (aiosqlite passes a statement's text to it unchanged), the cursor
    of the last one returned."""

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        if isinstance(sql, _Batch):
            for n, (statement, values, *rows) in enumerate(sql.before):
                try:
                    cursor = super().execute(statement, values)
                    if rows:  # a Later: the statement's rows, read on this thread before the next statement
                        rows[0].rows = [dict(row) for row in cursor.fetchall()]
                except BaseException:
                    sql.failed_at = n
                    raise
            sql = sql.last
        return super().execute(sql, parameters)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # secure_delete=FAST: deleted content is zeroed where that costs no I/O (in pages written anyway),
        # not by writing every freed page again (a build with SECURE_DELETE on wrote each deleted file's
        # bytes once more, to the WAL and then the file). The trade-off: a deleted file's bytes may stay
        # in free pages of the database file until they are reused or VACUUM runs.
        pragmas = ("journal_mode=WAL", f"busy_timeout={SQLITE_BUSY_MS}", "foreign_keys=ON", "synchronous=NORMAL")
        for pragma in (*pragmas, "secure_delete=FAST"):
            self.execute(f"PRAGMA {pragma}")


def _violation(exc: BaseException) -> str | None:
    """'unique' / 'foreign_key' for a constraint violation from SQLite or PostgreSQL, else None."""
    text, kind = str(exc).lower(), type(exc).__name__
    if "unique" in text or "duplicate key" in text or kind == "UniqueViolationError":
        return "unique"
    if "foreign key" in text or kind == "ForeignKeyViolationError":
        return "foreign_key"
    return None


def fault_kind(exc: BaseException) -> str:
    """deadlock, locked, disk_full, timeout or other: the kind of a database failure (a metric's label)."""
    text = str(exc).lower()
    # PostgreSQL's deadlock message says which process each one is "blocked by": not a lock held elsewhere
    if getattr(exc, "sqlstate", None) == "40P01" or type(exc).__name__ == "DeadlockDetectedError":
        return "deadlock"
    if re.search(r"\blocked\b|\block timeout\b", text) or type(exc).__name__ == "LockNotAvailableError":
        return "locked"
    if "full" in text or "no space" in text or (isinstance(exc, OSError) and exc.errno == errno.ENOSPC):
        return "disk_full"
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return "timeout"
    return "other"


def storage_fault(exc: BaseException) -> str:
    """What a database failure means, as a sentence a person can act on."""
    kind = fault_kind(exc)
    if kind == "deadlock":
        return (
            "Two changes to this conversation waited for each other (a deadlock) and the database cancelled"
            " this one; nothing of it was stored: try again."
        )
    if kind == "locked":
        return (
            "The database is locked by another process (a backup, or an open sqlite3 shell?) and could not be"
            " written in time; try again in a moment."
        )
    if kind == "disk_full":
        return "The database's disk is full: free space on it, and chatsvc recovers by itself."
    if kind == "timeout":
        return "The database did not answer in time; try again in a moment."
    return f"The database cannot be used right now ({type(exc).__name__}: {str(exc)[:200]}); try again in a moment."


class SQLiteFileInUse(Exception):
    """Another process serves this SQLite file."""


@dataclass
class _HeldFile:
    lock: Any  # the open lock file
    holders: int = 0  # in this process


_held_files: dict[str, _HeldFile] = {}  # by real path


def hold_sqlite_file(database: str) -> Callable[[], None]:
    """Take the file's lock for this process (again, if it holds it already): one SQLite file serves
    one chatsvc process, which is what lets it interrupt every `streaming` answer at start. Returns
    the release. The lock is `flock` on `<database>.lock`, which the kernel drops with the process."""
    path = os.path.realpath(database)
    held = _held_files.get(path)
    if held is None:
        lock = open(path + ".lock", "a+")  # held for the process's life
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            pid = lock.read().strip() or "unknown"
            lock.close()
            raise SQLiteFileInUse(
                f"Another chatsvc process (pid {pid}) is already serving the SQLite database {path}; one SQLite"
                " file serves one process: stop the other one, or give this one another DATABASE_URL (use"
                " PostgreSQL to run several replicas)."
            ) from None
        lock.truncate(0)
        lock.write(str(os.getpid()))
        lock.flush()
        held = _held_files[path] = _HeldFile(lock)
    held.holders += 1

    def release() -> None:
        held.holders -= 1
        if held.holders == 0 and _held_files.get(path) is held:
            del _held_files[path]
            held.lock.close()

    return release


# PostgreSQL: the database server's clock, as the text utcnow() writes (`{}`: a timestamp expression).
# A `streaming` answer's heartbeat (its `updated_at`) is written by this clock alone, at every write
# (the new row, each checkpoint, each beat), and judged against it by every sweep: whether an answer's
# process is gone never depends on the replicas' clocks agreeing. (SQLite: one process, its clock.)
_PG_TIME = "to_char(({}) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')"
PG_NOW = _PG_TIME.format("clock_timestamp()")
PG_STALE = _PG_TIME.format("clock_timestamp() - make_interval(secs => :stale)")  # :stale seconds ago

# The database whose transaction this task is in (SQLite: its statements go to the write connection).
_in_transaction: contextvars.ContextVar[Any] = contextvars.ContextVar("in_transaction", default=None)


POOL_CLOSE_SECONDS = 1.0  # at shutdown, after the drain: the longest the pool waits for a connection still in use


class Database:
    """The database's connections and the statements the rooms run on them (`fetch_all`, `fetch_one`,
    `execute`). A write is one atomic statement, or several in `transaction()`, which on SQLite takes
    the write lock first (BEGIN IMMEDIATE: SQLite cannot upgrade a read lock to a write lock under
    concurrency, busy_timeout does not apply).

    A database failure (locked, full, unreachable) is raised as `StorageUnavailable`; `fault`
    says what the last write met, until a write succeeds again (GET /readyz shows it)."""

    def __init__(self, url: str, exclusive: bool = False, metrics: Metrics | None = None):
        self.url = url
        self.metrics = metrics or Metrics()
        self._statement_seconds = {
            role: self.metrics.statements.labels(role) for role in (READ, WRITE, BACKGROUND, SEARCH)
        }
        self.is_sqlite = DatabaseURL(url).dialect == "sqlite"  # as database_url_problem: its scheme lowercased
        self.dialect = "sqlite" if self.is_sqlite else "postgresql"
        self.exclusive = exclusive  # SQLite: this process serves the file (see hold_sqlite_file)
        if self.is_sqlite:
            options: dict[str, Any] = {"factory": _SQLiteConnection}
        else:  # a write that waits for a lock, or a statement the server never answers, fails in bounded time
            options = {"server_settings": {"lock_timeout": str(SQLITE_BUSY_MS)}, "command_timeout": PG_COMMAND_SECONDS}
        self._pool = databases.Database(url, **options)
        self._conns: list[Any] = []  # SQLite: the `databases` connections held open
        self._raw: dict[str, Any] = {}  # SQLite: READ / WRITE / BACKGROUND -> aiosqlite handle
        self._release: Callable[[], None] | None = None
        self._write_lock = asyncio.Lock()  # SQLite: a transaction holds the write connection
        # SQLite: the transaction's statements not sent yet (its BEGIN, `later` writes): with its next one
        self._later: list[tuple] = []  # SQLite: (sql, values[, Later]) to send with the next statement
        self._forming: list[_Member] | None = None  # SQLite: the group that bodies arriving now join (together)
        self._body_start: tuple | None = None  # SQLite: the running group body's SAVEPOINT, in _later until sent
        self._group_fault: _GroupFault | None = None  # SQLite: a fault beyond the running body, once met
        self._groups: set[asyncio.Task] = set()
        self._search_lock = asyncio.Lock()  # SQLite: one search at a time on the search connection
        self.fault: str | None = None

    @property
    def sqlite_path(self) -> str | None:
        database = DatabaseURL(self.url).database
        return database if self.is_sqlite and database and database != ":memory:" else None

    @property
    def heartbeat_now(self) -> str:
        """The SQL of "now" in an answer's heartbeat (`updated_at`): PostgreSQL's server clock, one
        for every replica (PG_NOW); SQLite: `:now`, this process's, the one process on the file."""
        return ":now" if self.is_sqlite else PG_NOW

    async def open(self, upgrade: bool = True) -> None:
        """Connect, and bring the schema up to date (`upgrade`), or only check that this release can
        (a database newer than it is a SchemaError either way)."""
        if self.exclusive and self.sqlite_path:
            self._release = hold_sqlite_file(self.sqlite_path)
        try:
            await self._pool.connect()
            if self.is_sqlite:
                await self._open_sqlite()
            await apply_schema(self, upgrade)
        except BaseException:
            await self.close()
            raise

    async def _open_sqlite(self) -> None:
        # Long-lived connections: `databases` otherwise opens a connection (and a thread) per task,
        # ~7 ms per chat instead of ~0.4 ms. Statements go to their aiosqlite handles directly: one
        # hop to the thread and no SQLAlchemy compile, about 4x cheaper a statement than `databases`'
        # query path (bench/store.py). Four of them, so that reads never wait behind a write that
        # waits for another process's lock (WAL lets them read meanwhile), request writes never wait
        # behind the background checkpoints, and reads never wait behind a costly search (bench/holds.py).
        # In memory there is one database per connection.
        roles = (READ, WRITE, BACKGROUND, SEARCH) if self.sqlite_path else (READ,)
        for role in roles:
            conn = await self.hold()
            self._conns.append(conn)
            self._raw[role] = conn.raw_connection
            self._raw[role].row_factory = sqlite3.Row
        for role in (WRITE, BACKGROUND, SEARCH):
            self._raw.setdefault(role, self._raw[READ])

    async def hold(self) -> Any:
        """A connection of the pool, held by its caller until `let_go` whatever task uses it: taken in a
        task of its own, since `databases` keys the connection it gives by the task that asks."""

        async def acquire() -> Any:
            conn = self._pool.connection()
            try:
                await conn.__aenter__()
            except Exception:
                await asyncio.sleep(0.1)  # aiosqlite's thread reports its stop on this loop: let it, before it closes
                raise
            return conn

        return await asyncio.create_task(acquire())

    @staticmethod
    async def let_go(conn: Any) -> None:
        """A held connection back to the pool, whatever state it is in (lost too): one never given back
        holds the pool's close at shutdown."""
        with contextlib.suppress(Exception):
            await conn.__aexit__(None, None, None)

    async def close(self) -> None:
        if self._groups:  # SQLite: groups still storing (together) end first, or are undone after 5 s
            _, late = await asyncio.wait(set(self._groups), timeout=5)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        # aiosqlite's threads are not daemons: a connection left open keeps the process alive.
        while self._conns:
            await self.let_go(self._conns.pop())
        self._raw = {}
        try:  # PostgreSQL's pool waits for its connections to come back; one that never does is closed
            await asyncio.wait_for(self._pool.disconnect(), POOL_CLOSE_SECONDS)
        except TimeoutError:  # (asyncpg closes the rest of the pool when its wait is cut short)
            log.warning("a database connection was still in use %g s into the shutdown: closed", POOL_CLOSE_SECONDS)
        except Exception:
            pass
        if self._release is not None:
            self._release()
            self._release = None

    def connection(self) -> Any:
        """PostgreSQL: this task's connection of the pool (`databases`'), as a context manager."""
        return self._pool.connection()

    @contextlib.asynccontextmanager
    async def transaction(self, schema: bool = False) -> AsyncIterator[None]:
        """Several statements as one: all or nothing. On SQLite every statement of the transaction
        goes to the write connection, which no other task's statement enters meanwhile. `schema`:
        PostgreSQL also takes the lock that makes replicas apply schema steps one at a time.
        Transactions do not nest.

        SQLite: its BEGIN goes with its first statement, and its `later` writes with the statement after
        them or its COMMIT, in one hop to the write connection's thread each (~60 µs of CPU a hop: a
        turn was 6 hops, now 2)."""
        if self.is_sqlite:
            async with self._write_lock, self._sqlite_transaction():
                yield
            return
        # A fault at BEGIN or COMMIT (a connection the server dropped) is a storage fault like any
        # statement's; a rollback that fails after the body raised gives way to the body's exception.
        stack = contextlib.AsyncExitStack()
        try:
            await stack.enter_async_context(self._pool.connection())
            await stack.enter_async_context(self._pool.transaction())
        except BaseException as exc:  # a cancellation too: the connection goes back to the pool, rolled back
            with contextlib.suppress(Exception):
                await stack.__aexit__(type(exc), exc, exc.__traceback__)
            if not isinstance(exc, Exception):
                raise
            self._failed(exc, WRITE)
        try:
            if schema:
                await self.execute("SELECT pg_advisory_xact_lock(7468372)")
            yield
        except BaseException:
            with contextlib.suppress(Exception):
                await stack.__aexit__(*sys.exc_info())
            raise
        try:
            await stack.aclose()
        except Refusal:
            raise
        except Exception as exc:
            self._failed(exc, WRITE)

    @contextlib.asynccontextmanager
    async def _sqlite_transaction(self) -> AsyncIterator[None]:
        """SQLite, with the write connection held: its BEGIN (sent with the first statement), then its
        COMMIT, or a ROLLBACK of whatever was sent if the body raises."""
        token = _in_transaction.set(self)
        self._later = [_BEGIN]
        try:
            try:
                yield
                await self.execute("COMMIT")
            except BaseException:
                self._later = []
                with contextlib.suppress(Exception):  # (none to roll back if its BEGIN was never sent)
                    await self._raw[WRITE].execute("ROLLBACK")
                raise
        finally:
            self._later = []
            _in_transaction.reset(token)

    async def atomically(self, body: Callable[[], Awaitable[T]]) -> T:
        """`body` as one transaction; run again when PostgreSQL cancelled it to break a deadlock (it
        wrote nothing, and its statements read afresh), up to DEADLOCK_ATTEMPTS times in all."""
        for attempt in range(1, DEADLOCK_ATTEMPTS + 1):
            try:
                async with self.transaction():
                    return await body()
            except Deadlock:
                if attempt == DEADLOCK_ATTEMPTS:
                    raise
                log.info("database deadlock: a transaction was cancelled, running it again (attempt %d)", attempt + 1)
                await asyncio.sleep(0.05 * attempt)  # the other transaction, which goes on, ends first
        raise AssertionError("unreachable")

    async def together(self, body: Callable[[], Awaitable[T]], again_on_deadlock: bool = False) -> T:
        """`body` as one transaction, all or nothing, as `transaction` runs it (`again_on_deadlock`:
        as `atomically` runs it, on PostgreSQL, where deadlocks happen). On SQLite, a body that finds the
        write connection free runs so, on its caller's task; those that then wait for the connection
        together share one transaction (group commit). They run one after another in their order of
        arrival, on the group's task, each inside a SAVEPOINT of its own: what one raises undoes its own
        writes only and is raised to its caller; the others are committed at once, and a COMMIT that
        fails fails them all. A body's statements
        travel with what the bodies before it left for later, in one hop, so 20 turns that arrive while
        another is stored cost 20 hops and one COMMIT, not 40 hops and 20 hand-offs of the connection,
        each a pass of the event loop. A fault that undoes more than one body's writes (one another
        body left for later fails; SQLite rolled the transaction back) fails the whole group, nothing
        of it kept. A caller cancelled before its body starts is left out; after, it waits for the
        group's outcome, then is cancelled (its writes may be kept, as those of a transaction whose
        COMMIT was sent are)."""
        if again_on_deadlock and not self.is_sqlite:
            return await self.atomically(body)
        if not self.is_sqlite or (self._forming is None and not self._write_lock.locked()):  # SQLite: alone
            async with self.transaction():
                return await body()
        member = _Member(body, asyncio.get_running_loop().create_future())
        if self._forming is None or len(self._forming) >= GROUP_BODIES:
            self._forming = []
            task = asyncio.get_running_loop().create_task(self._group(self._forming))
            self._groups.add(task)
            task.add_done_callback(self._groups.discard)
        self._forming.append(member)
        try:
            return await asyncio.shield(member.future)
        except asyncio.CancelledError:
            if not member.started:
                member.left = True
                raise
            with contextlib.suppress(Exception):
                await asyncio.shield(member.future)
            raise

    async def _group(self, group: list[_Member]) -> None:
        """The group's transaction (together), once it has the write connection: no body joins after."""
        try:
            async with self._write_lock:
                if self._forming is group:
                    self._forming = None
                await self._group_transaction(group)
        except BaseException as exc:  # cancelled (the service stops) or the transaction failed: all of it undone
            fault = exc if isinstance(exc, Exception) else StorageUnavailable("The service stopped; nothing was kept.")
            for member in group:
                if not member.future.done() and not member.left:
                    member.future.set_exception(fault)
            if not isinstance(exc, Exception):
                raise
        finally:
            if self._forming is group:  # (cancelled before it had the connection) no one joins it now
                self._forming = None

    async def _group_transaction(self, group: list[_Member]) -> None:
        kept: list[tuple[_Member, Any]] = []
        try:
            async with self._sqlite_transaction():
                await self._group_bodies(group, kept)
        finally:
            self._body_start, self._group_fault = None, None
        self.metrics.group_commits.observe(sum(member.started for member in group))
        for member, result in kept:
            member.future.set_result(result)

    async def _group_bodies(self, group: list[_Member], kept: list[tuple[_Member, Any]]) -> None:
        """Inside the group's transaction: each member's body in its SAVEPOINT, in order; those kept
        (and their results) added to `kept`."""
        for n, member in enumerate(group):
            if member.left:
                continue
            member.started = True
            self._body_start = (f"SAVEPOINT together_{n}", {})
            self._later.append(self._body_start)
            try:
                result = await member.body()
                if self._group_fault:  # it caught a fault beyond its own writes: still the group's
                    raise self._group_fault
            except Exception as exc:
                begun = not (self._later and self._later[0] is _BEGIN)
                if self._group_fault or (begun and not self._raw[WRITE].in_transaction):
                    raise  # not its own writes alone: the whole group's (SQLite rolled it all back)
                unsent = [i for i, item in enumerate(self._later) if item is self._body_start]
                if unsent:  # it sent nothing: what it left is dropped
                    del self._later[unsent[0] :]
                else:
                    self._later = [(f"ROLLBACK TO together_{n}", {}), (f"RELEASE together_{n}", {})]
                member.future.set_exception(exc)
                continue
            self._later.append((f"RELEASE together_{n}", {}))
            kept.append((member, result))
        self._body_start = None

    async def fetch_all(self, sql: str, values: dict[str, Any] | None = None, role: str = READ) -> list[dict]:
        """The statement's rows, on the connection of `role` (SQLite; PostgreSQL: the pool's)."""
        started = time.perf_counter()
        try:
            if self._raw:  # SQLite takes the same `:name` parameters natively
                rows = await self._sqlite(sql, values or {}, role)
            else:
                rows = await self._postgres(sql, values or {})
        except Exception as exc:
            self._failed(exc, role)
        finally:
            self._statement_seconds[role].observe(time.perf_counter() - started)
        if role != READ:
            self.fault = None
        return rows

    async def fetch_one(self, sql: str, values: dict[str, Any] | None = None, role: str = READ) -> dict | None:
        rows = await self.fetch_all(sql, values, role)
        return rows[0] if rows else None

    async def execute(
        self, sql: str, values: dict[str, Any] | None = None, role: str = WRITE, later: bool = False
    ) -> None:
        """A statement whose rows are not wanted. `later`: in a SQLite transaction, it is sent with the
        transaction's next statement, or its COMMIT, which raises its failure: for a write whose
        failure needs no handling of its own, or whose caller's try also holds the statement after it
        (a try around it alone would not see it)."""
        if later and self._raw and _in_transaction.get() is self:
            self._later.append((sql, values or {}))
            return
        await self.fetch_all(sql, values, role)

    async def fetch_later(self, sql: str, values: dict[str, Any]) -> Later:
        """A write whose rows are wanted, but not before the transaction's next statement: in a SQLite
        transaction it is sent with that statement (or the COMMIT), which raises its failure as
        execute's `later` does, and its Later has the rows once that statement returns; elsewhere it
        runs now (PostgreSQL: its row locks are taken where it stands)."""
        later = Later()
        if self._raw and _in_transaction.get() is self:
            self._later.append((sql, values, later))
        else:
            later.rows = await self.fetch_all(sql, values, WRITE)
        return later

    async def fetch_each(self, sql: str, each: list[tuple[dict[str, Any], Later]], role: str) -> None:
        """SQLite, outside a transaction: one statement run with each of the values in turn (each a
        transaction of its own, as executemany's), prepared once, all in one hop to the connection of
        `role`; each Later gets its statement's rows. A failure stops there and is raised: the Laters
        of the statements that ran have their rows, the others None."""
        if each:
            await self.fetch_all(_Batch.of([(sql, values, later) for values, later in each], "SELECT 1"), {}, role)

    async def execute_numbered(self, sql: str, *args: Any) -> None:
        """PostgreSQL: a write with numbered parameters ($1), on this task's asyncpg connection (in a
        transaction: the transaction's)."""
        await self.fetch_numbered(sql, *args)

    async def fetch_numbered(self, sql: str, *args: Any, role: str = WRITE) -> list[dict]:
        """PostgreSQL: a write's rows, with numbered parameters ($1: arrays too, for a statement whose
        text is the same whatever the number of rows), on this task's asyncpg connection (in a
        transaction: the transaction's)."""
        async with self._pool.connection() as conn:
            started = time.perf_counter()
            try:
                rows = [dict(row) for row in await conn.raw_connection.fetch(sql, *args)]
            except Exception as exc:
                self._failed(exc, role)
            finally:
                self._statement_seconds[role].observe(time.perf_counter() - started)
        self.fault = None
        return rows

    @contextlib.asynccontextmanager
    async def _sqlite_connection(self, role: str) -> AsyncIterator[Any]:
        """The SQLite handle a statement of `role` runs on: this task's transaction's, or the write
        connection outside another task's transaction (when `role` shares it), or its own."""
        if _in_transaction.get() is self:
            yield self._raw[WRITE]
        elif self._raw[role] is self._raw[WRITE]:
            async with self._write_lock:
                yield self._raw[WRITE]
        else:
            yield self._raw[role]

    async def _sqlite(self, sql: str, values: dict[str, Any], role: str) -> list[dict]:
        async with self._sqlite_connection(role) as conn:
            sql = self._with_later(sql)
            try:
                return [dict(row) for row in await conn.execute_fetchall(sql, values)]
            except Exception as exc:
                failed = sql.before[sql.failed_at] if isinstance(sql, _Batch) and sql.failed_at >= 0 else None
                if failed is not None and failed is not _BEGIN and sql.failed_at <= sql.theirs:  # not the body's
                    self.metrics.storage_faults.labels(fault_kind(exc)).inc()
                    self._group_fault = _GroupFault(
                        "A turn stored together with this one could not be written; nothing of either was kept."
                        " Try again in a moment."
                    )
                    raise self._group_fault from exc
                raise

    def _with_later(self, sql: str) -> str:
        """`sql`, carrying this task's transaction's statements not sent yet (a _Batch), if it has any."""
        if self._later and _in_transaction.get() is self:
            batch = _Batch.of(self._later, sql)
            if self._body_start is not None:  # in a group (together)
                batch.theirs = next((n for n, item in enumerate(self._later) if item is self._body_start), -1)
            sql, self._later = batch, []
        return sql

    async def _postgres(self, sql: str, values: dict[str, Any]) -> list[dict]:
        """PostgreSQL: the statement on this task's connection (in a transaction: the transaction's),
        its `:name` parameters numbered once per statement text (_numbered) and its values passed to
        asyncpg as they are. That is what `databases` sends too, after compiling the text with
        SQLAlchemy on every call, which cost more than the round trip (bench/relay.py --database);
        a value of another type than these (which SQLAlchemy would convert) still goes that way."""
        numbered, names = _numbered(sql)
        if all(type(values.get(name, _MISSING)) in _PLAIN_VALUES for name in names):
            async with self._pool.connection() as conn:
                return [dict(row) for row in await conn.raw_connection.fetch(numbered, *(values[n] for n in names))]
        values = {name: values[name] for name in names if name in values}  # text() refuses a value it does not name
        return [dict(row._mapping) for row in await self._pool.fetch_all(sql, values)]

    def _failed(self, exc: Exception, role: str) -> NoReturn:
        if isinstance(exc, _GroupFault):  # counted where its cause was met
            raise exc
        # a violation, or a statement PostgreSQL stopped at its own statement_timeout (only a search has
        # one: its budget), says nothing of the database's health: raised as it is, not counted
        if _violation(exc) or type(exc).__name__ == "QueryCanceledError":
            raise exc
        kind = fault_kind(exc)
        self.metrics.storage_faults.labels(kind).inc()
        detail = storage_fault(exc)
        if kind == "deadlock":  # says nothing of the database's health (GET /readyz)
            raise Deadlock(detail, retry_after=1) from exc
        if role != READ:
            self.fault = detail
        raise StorageUnavailable(detail) from exc

    async def fetch_search(self, sql: str, values: dict[str, Any]) -> list[dict]:
        """A search's statement, stopped once it has run SEARCH_SECONDS (SearchTooCostly). SQLite: on a
        connection of its own (reads never wait behind it), one search at a time, each waiting at most
        SEARCH_SECONDS for its turn (then SearchBusy); PostgreSQL: `statement_timeout`."""
        if not self._raw:
            try:
                async with self._pool.connection(), self._pool.transaction():
                    await self.execute(f"SET LOCAL statement_timeout = {round(SEARCH_SECONDS * 1000)}", role=READ)
                    return await self.fetch_all(sql, values)
            except Exception as exc:
                if type(exc).__name__ == "QueryCanceledError":  # its budget (not a storage fault: _failed)
                    raise search_too_costly() from None
                raise
        try:
            await asyncio.wait_for(self._search_lock.acquire(), SEARCH_SECONDS)
        except asyncio.TimeoutError:
            raise SearchBusy(
                f"Other searches kept the search busy for {SEARCH_SECONDS:g} s; try again in a moment.", retry_after=2
            ) from None
        try:
            started = time.perf_counter()
            query = asyncio.ensure_future(self._sqlite(sql, values, SEARCH))  # not fetch_all: a cut is not a fault
            try:
                done, _ = await asyncio.wait({query}, timeout=SEARCH_SECONDS)
            except BaseException:  # cancelled: the statement must not outlive its turn either
                await self._stop_search(query)
                raise
            finally:
                self._statement_seconds[SEARCH].observe(time.perf_counter() - started)
            if not done:
                await self._stop_search(query)
                raise search_too_costly()
            if query.exception() is not None:
                self._failed(query.exception(), READ)  # a read: it sets no write fault
            return query.result()
        finally:
            self._search_lock.release()

    async def _stop_search(self, query: asyncio.Future) -> None:
        """SQLite: the search statement's thread runs on: stop it (it fails 'interrupted') and wait for it."""
        await self._raw[SEARCH].interrupt()
        await asyncio.wait({query})
        if not query.cancelled():
            query.exception()  # retrieved: the budget's doing, not a fault to report

    async def ping(self) -> None:
        """The database answers a read, and, after a failed write, takes a write again."""
        await self.fetch_one("SELECT 1 AS ok")
        if self.fault is None:
            return
        if self.is_sqlite:  # rewrites one row as it is: that fails while the file is locked or its disk full
            await self.execute(
                "UPDATE conversations SET updated_at = updated_at WHERE session_id IN"
                " (SELECT session_id FROM conversations LIMIT 1)"
            )
        else:  # a row lock on the messages: it waits for (and fails on) a lock that keeps writers out
            await self.execute("SELECT id FROM messages LIMIT 1 FOR UPDATE")


_BIND = re.compile(r"(?<![:\w\\]):(\w+)(?!:)")  # a `:name` parameter as SQLAlchemy's text() reads one
_PLAIN_VALUES = frozenset({str, int, float, bool, bytes, type(None)})  # what SQLAlchemy passes on unchanged
_MISSING = object()


@functools.lru_cache(maxsize=1024)
def _numbered(sql: str) -> tuple[str, tuple[str, ...]]:
    """PostgreSQL: `sql` with its `:name` parameters as `$1`, `$2` ... (a name used twice, one number),
    and the names in that order."""
    names: dict[str, str] = {}
    numbered = _BIND.sub(lambda m: names.setdefault(m[1], f"${len(names) + 1}"), sql)
    return numbered, tuple(names)


def _id_batches(ids: list[str], size: int = 500, name: str = "id") -> Iterator[tuple[str, dict[str, str]]]:
    """`IN (...)` placeholders (:id0, :id1, ... or `name`'s) and their values, `size` ids at a time."""
    for start in range(0, len(ids), size):
        values = {f"{name}{n}": value for n, value in enumerate(ids[start : start + size], start)}
        yield ", ".join(":" + name for name in values), values


# ── Schema: schema.sql's steps, each applied once, in order ────────────────────────────


class _Rollback(Exception):
    """Leaves a transaction without its writes."""


class SchemaError(Exception):
    """The database's schema cannot be brought to this release's: it is newer (a downgrade), or a
    step failed (and was rolled back)."""


@dataclass
class SchemaStatement:
    sql: str
    dialect: str | None  # "sqlite" or "postgresql" only; None: both


@dataclass
class SchemaStep:
    version: int
    title: str
    statements: list[SchemaStatement]


SCHEMA_STEP = re.compile(r"-- step ([0-9]+): (.*)")
SCHEMA_DIALECT = re.compile(r"-- (sqlite|postgresql) only")


def data_file(in_checkout: str, in_wheel: str) -> Path:
    """A file (or folder) shipped with the module: at its checkout path, or where the wheel
    installs it (next to chatsvc.py, with a chatsvc_ prefix; see pyproject.toml)."""
    here = Path(__file__).resolve().parent
    for path in (here / in_wheel, here / in_checkout):
        if path.exists():
            return path
    raise FileNotFoundError(f"{in_checkout} not found next to {__file__}")


def schema_steps() -> list[SchemaStep]:
    """schema.sql's steps, in order: each starts at a `-- step N: title` line. A statement ends with
    the line that ends with ';'; a line `-- sqlite only` (`-- postgresql only`) before it keeps it
    to that database."""
    steps: list[SchemaStep] = []
    statement: list[str] = []
    dialect = None
    for line in data_file("schema.sql", "chatsvc_schema.sql").read_text(encoding="utf-8").splitlines():
        if match := SCHEMA_STEP.fullmatch(line):
            steps.append(SchemaStep(int(match[1]), match[2], []))
            assert steps[-1].version == len(steps), f"schema.sql: step {match[1]} is out of order"
        elif match := SCHEMA_DIALECT.fullmatch(line):
            dialect = match[1]
        elif steps and line.strip() and not line.strip().startswith("--"):
            statement.append(line)
            if line.rstrip().endswith(";"):
                steps[-1].statements.append(SchemaStatement("\n".join(statement).rstrip().rstrip(";"), dialect))
                statement, dialect = [], None
    assert not statement, "schema.sql: its last statement has no ';'"
    return steps


async def apply_schema(db: Database, upgrade: bool = True) -> None:
    """Apply, in order, one transaction each, the schema steps this database has not had
    (schema.sql). Under a lock: replicas that start together on an old database upgrade it once.
    Without `upgrade`, nothing is written (the transaction is rolled back)."""
    steps = schema_steps()
    while await _schema_step(db, steps, upgrade):
        pass


async def _schema_step(db: Database, steps: list[SchemaStep], upgrade: bool) -> bool:
    """Apply the next step this database has not had; False if there is none (or not `upgrade`)."""
    try:
        async with db.transaction(schema=True):
            step = await _next_step(db, steps, upgrade)
    except _Rollback:
        return False
    log.info("database schema: step %d applied (%s)", step.version, step.title)
    return True


async def _next_step(db: Database, steps: list[SchemaStep], upgrade: bool) -> SchemaStep:
    await db.execute(
        "CREATE TABLE IF NOT EXISTS schema_versions (version INTEGER PRIMARY KEY,"
        " applied_at TEXT NOT NULL, release TEXT NOT NULL)"
    )
    row = await db.fetch_one("SELECT MAX(version) AS version FROM schema_versions", role=WRITE)
    version = (row and row["version"]) or 0
    if version > len(steps):
        raise SchemaError(
            f"The database at DATABASE_URL has schema version {version}, newer than this chatsvc"
            f" ({__version__}, schema version {len(steps)}) knows: run the chatsvc release that"
            " upgraded it (or a newer one), or restore a backup made before that upgrade."
        )
    if version == len(steps) or not upgrade:
        raise _Rollback  # nothing to write: the version table too stays as it was
    step = steps[version]
    try:
        for statement in step.statements:
            if statement.dialect in (None, db.dialect):
                await db.execute(statement.sql)
    except Exception as exc:
        reason = exc.detail if isinstance(exc, StorageUnavailable) else f"{type(exc).__name__}: {exc}"
        raise SchemaError(
            f"Upgrading the database to schema version {step.version} ({step.title}) failed, and"
            f" left it as it was (version {version}): {reason}"
        ) from exc
    await db.execute(
        "INSERT INTO schema_versions (version, applied_at, release) VALUES (:v, :now, :release)",
        {"v": step.version, "now": utcnow(), "release": __version__},
    )
    return step


# ── Conversations: a user's conversations, their settings and titles ───────────────────

_CONVERSATION_COLUMNS = """
       c.session_id, c.title, c.system_prompt, c.model, c.context_start, c.current_message_id,
       c.title_prompt_tokens, c.title_completion_tokens, c.title_total_tokens, c.created_at, c.updated_at,
       c.web_search,
       (SELECT COUNT(*) FROM messages m
         WHERE m.owner = c.owner AND m.session_id = c.session_id) AS message_count,
       (SELECT COUNT(*) FROM messages m
         WHERE m.owner = c.owner AND m.session_id = c.session_id AND m.id > c.context_start) AS context_message_count,
       EXISTS (SELECT 1 FROM messages m
                WHERE m.owner = c.owner AND m.session_id = c.session_id AND m.status = 'streaming') AS generating"""
_CONVERSATION_SQL = f"SELECT {_CONVERSATION_COLUMNS}\n  FROM conversations c\n WHERE c.owner = :owner"
_PAGE_AFTER = " AND (c.updated_at < :u OR (c.updated_at = :u AND c.session_id < :s))"
_NEWEST_FIRST = " ORDER BY c.updated_at DESC, c.session_id DESC LIMIT :limit"


def files_unreferenced(messages: str) -> str:
    """The statement that bumps `last_used_at` (`:now`) of the files the messages `messages` selects
    carry, run before they are deleted: design 2.3, a file a deletion leaves unreferenced lives another
    retention period (someone who deleted a message by mistake can still send its file again)."""
    return (
        "UPDATE files SET last_used_at = :now WHERE id IN"
        f" (SELECT mf.file_id FROM message_files mf WHERE mf.message_id IN ({messages}))"
    )


class Conversations:
    """Conversations' rows: their settings and titles, with their messages' counts. Every query is
    scoped to an owner (CHATSVC_USER_HEADER's value, '' without it)."""

    def __init__(self, db: Database, usage: Usage):
        self.db, self.usage = db, usage

    async def get(self, owner: str, session_id: str) -> dict | None:
        row = await self.db.fetch_one(
            _CONVERSATION_SQL + " AND c.session_id = :sid", {"owner": owner, "sid": session_id}
        )
        return row

    async def page(self, owner: str, limit: int, after: tuple[str, str] | None) -> list[dict]:
        """The owner's conversations, newest first: `limit` of them after the cursor `after`."""
        where, values = "", {"owner": owner, "limit": limit}
        if after:
            where = _PAGE_AFTER
            values.update(u=after[0], s=after[1])
        return await self.db.fetch_all(_CONVERSATION_SQL + where + _NEWEST_FIRST, values)

    async def create(
        self, owner: str, session_id: str, title: str | None, system_prompt: str | None, model: str | None
    ) -> bool:
        row = await self.db.fetch_one(
            "INSERT INTO conversations (owner, session_id, title, title_source, system_prompt, model, created_at,"
            " updated_at) VALUES (:owner, :sid, :title, :source, :prompt, :model, :now, :now)"
            " ON CONFLICT (owner, session_id) DO NOTHING RETURNING session_id",
            {
                "owner": owner,
                "sid": session_id,
                "title": title,
                "source": "client" if title is not None else None,
                "prompt": system_prompt,
                "model": model,
                "now": utcnow(),
            },
            role=WRITE,
        )
        return row is not None

    async def update(self, owner: str, session_id: str, changes: dict[str, Any]) -> bool:
        sets = ", ".join(f"{column} = :{column}" for column in changes)  # columns come from a fixed list
        row = await self.db.fetch_one(
            f"UPDATE conversations SET {sets}, updated_at = :now"
            " WHERE owner = :owner AND session_id = :sid RETURNING session_id",
            {**changes, "owner": owner, "sid": session_id, "now": utcnow()},
            role=WRITE,
        )
        return row is not None

    async def set_model_title(
        self, owner: str, session_id: str, answer_id: str, title: str | None, usage: dict | None
    ) -> bool:
        """The model's title of answer `answer_id` (None: it gave none, its cost is kept), unless a
        client has set one since or that answer is gone: deleted, purged, or its conversation deleted
        (and maybe made again under the same id, which holds other messages: ids are never reused).
        A title is text derived from messages, and never outlives them."""
        usage = usage or {}
        row = await self.db.fetch_one(
            "UPDATE conversations SET title = COALESCE(:title, title), title_source = CASE WHEN :title IS NULL"
            " THEN title_source ELSE 'model' END, title_prompt_tokens = :prompt, title_completion_tokens = :completion,"
            " title_total_tokens = :total WHERE owner = :owner AND session_id = :sid AND title_source = 'first_line'"
            " AND EXISTS (SELECT 1 FROM messages WHERE id = :mid AND owner = :owner AND session_id = :sid)"
            " RETURNING session_id",
            {
                "owner": owner,
                "sid": session_id,
                "mid": answer_id,
                "title": title,
                "prompt": usage.get("prompt_tokens"),
                "completion": usage.get("completion_tokens"),
                "total": usage.get("total_tokens"),
            },
            role=WRITE,
        )
        return row is not None

    async def delete(self, owner: str, session_id: str) -> bool:
        """Delete the conversation and its messages; the files they carried get another retention
        period (`files_unreferenced`), bumped under the conversation's lock, before the cascade. An
        answer still `streaming` in it (another replica's, or one its process lost) has its calls still
        reserved settled first, as the sweep settles them (Usage.settle_swept; its row locked first, as
        its own final write locks it): no reservation outlives its answer."""
        values = {"owner": owner, "sid": session_id, "now": utcnow()}
        swept: list[tuple[str, str, Spent]] = []

        async def delete() -> bool:
            if await self.lock(owner, session_id) is None:
                return False
            running = await self.db.fetch_all(
                "SELECT id, content, reasoning_content, tool_steps FROM messages WHERE owner = :owner"
                " AND session_id = :sid AND status = 'streaming'" + ("" if self.db.is_sqlite else " FOR UPDATE"),
                values,
                role=WRITE,
            )
            swept[:] = await self.usage.settle_swept(running) if running else []
            await self.db.execute(
                files_unreferenced("SELECT id FROM messages WHERE owner = :owner AND session_id = :sid"), values
            )
            row = await self.db.fetch_one(
                "DELETE FROM conversations WHERE owner = :owner AND session_id = :sid RETURNING session_id",
                values,
                role=WRITE,
            )
            return row is not None

        deleted = await self.db.atomically(delete)
        for _, model, spent in swept:
            self.db.metrics.spent(model, spent)
        return deleted

    async def lock(self, owner: str, session_id: str) -> dict | None:
        """Inside a transaction: the conversation's row (None if there is none), locked until the
        transaction ends. Every write that changes a conversation's tree takes this lock first, so
        they take their locks in one order (no deadlock) and each reads the tree as the one before
        it left it (PostgreSQL, READ COMMITTED: each later statement reads what was committed
        before it started). SQLite: its write transactions already run one at a time."""
        return await self.db.fetch_one(
            "SELECT current_message_id, context_start FROM conversations WHERE owner = :owner AND session_id = :sid"
            + ("" if self.db.is_sqlite else " FOR UPDATE"),
            {"owner": owner, "sid": session_id},
            role=WRITE,
        )


# ── Search: conversations by the text they hold ────────────────────────────────────────


def like_pattern(text: str) -> str:
    """A LIKE pattern matching `text` anywhere, every character of it literal (ESCAPE '\\')."""
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


SEARCH_MIN_INDEXED = 3  # SQLite's trigram index finds substrings of 3 characters or more
SEARCH_SECONDS = 2.0  # a search runs at most this long (then 422 search_too_costly); bench/holds.py


class Search:
    """The owner's conversations that hold a text, and the texts of the messages that hold it. A
    message holds what it says (`content`) and the results of its tools: a server tool's result (a
    tool_result step's `content`; errors are not searched) and the app's results (`tool_results`)."""

    def __init__(self, db: Database):
        self.db = db

    async def conversations(self, owner: str, query: str, limit: int, after: tuple[str, str] | None) -> list[dict]:
        """The owner's conversations whose title or a message (not `streaming`) contains `query`, as
        text, newest first; `match_id` is the first message that contains it (None if only the title
        does), `title_match` whether the title does. SQLite: the trigram indexes (messages_search,
        messages_tool_search) for 3 characters or more, a scan of the owner's messages below;
        PostgreSQL: ILIKE, which pg_trgm's indexes serve (the tool results': chatsvc_tool_text)."""
        values: dict[str, Any] = {"owner": owner, "limit": limit, "q": query, "pattern": like_pattern(query)}
        if not self.db.is_sqlite:
            found = "content ILIKE :pattern ESCAPE '\\'"
            tools = "chatsvc_tool_text(tool_steps, tool_results) ILIKE :pattern ESCAPE '\\'"
            title = "c.title ILIKE :pattern ESCAPE '\\'"
        else:
            found, title = "instr(lower(content), lower(:q)) > 0", "instr(lower(c.title), lower(:q)) > 0"
            tools = (
                "(EXISTS (SELECT 1 FROM json_each(tool_steps) WHERE json_extract(value, '$.type') = 'tool_result'"
                " AND instr(lower(substr(json_extract(value, '$.data.content'), 1, 20000)), lower(:q)) > 0)"
                " OR EXISTS (SELECT 1 FROM json_each(tool_results)"
                " WHERE instr(lower(substr(json_extract(value, '$.content'), 1, 20000)), lower(:q)) > 0))"
            )
        if self.db.is_sqlite and len(query) >= SEARCH_MIN_INDEXED:
            values["phrase"] = '"' + query.replace('"', '""') + '"'  # an FTS5 string: every character literal
            # CROSS JOIN: the indexes first (SQLite would walk the owner's messages, a MATCH each)
            hits = (
                "SELECT m.session_id, MIN(m.id) AS match_id FROM"
                " (SELECT rowid FROM messages_search WHERE messages_search MATCH :phrase"
                " UNION SELECT rowid FROM messages_tool_search WHERE messages_tool_search MATCH :phrase) s"
                " CROSS JOIN messages m ON m.search_id = s.rowid WHERE m.owner = :owner GROUP BY m.session_id"
            )
        else:
            # two arms, so that PostgreSQL can use each one's index (the tool results' is partial)
            hits = (
                "SELECT session_id, MIN(id) AS match_id FROM"
                f" (SELECT session_id, id FROM messages WHERE owner = :owner AND status != 'streaming' AND {found}"
                " UNION ALL SELECT session_id, id FROM messages WHERE owner = :owner AND status != 'streaming'"
                f" AND (tool_steps IS NOT NULL OR tool_results IS NOT NULL) AND {tools}) found GROUP BY session_id"
            )
        where = f" AND (h.match_id IS NOT NULL OR {title})"
        if after:
            where += _PAGE_AFTER
            values.update(u=after[0], s=after[1])
        # MATERIALIZED: found once, not once a conversation (SQLite would run the MATCH per row)
        return await self.db.fetch_search(
            f"WITH hits AS MATERIALIZED ({hits}) SELECT {_CONVERSATION_COLUMNS}, h.match_id, ({title}) AS title_match"
            " FROM conversations c LEFT JOIN hits h ON h.session_id = c.session_id"
            f" WHERE c.owner = :owner{where}{_NEWEST_FIRST}",
            values,
        )

    async def texts(self, message_ids: list[str], query: str) -> dict[str, str]:
        """Of each of these messages, by id, the text that holds `query` (any case): its content, else
        the first of its tools' results that does (where a search's snippets come from); its content
        if none does."""
        found: dict[str, str] = {}
        for names, ids in _id_batches(message_ids):
            for row in await self.db.fetch_all(
                f"SELECT id, content, tool_steps, tool_results FROM messages WHERE id IN ({names})", ids
            ):
                found[row["id"]] = next((text for text in _searched_texts(row) if holds(text, query)), row["content"])
        return found


def holds(text: str, query: str) -> bool:
    """Whether `text` contains `query`, in any case (as a snippet finds it)."""
    return query.lower() in text.lower() or query in text


def _searched_texts(row: dict) -> Iterator[str]:
    """A message's texts that search finds, in order: its content, its server tools' results, the
    app's results."""
    yield row["content"]
    for step in json.loads(row["tool_steps"] or "[]"):
        if step.get("type") == "tool_result" and isinstance(step["data"].get("content"), str):
            yield step["data"]["content"]
    for result in json.loads(row["tool_results"] or "[]"):
        if isinstance(result.get("content"), str):
            yield result["content"]


# ── Message tree: a conversation's messages, its branches and the turn a chat writes ───

MESSAGE_PAGE_BYTES = 1_048_576  # GET .../messages: a page's messages stop at this size (at least one)

_MESSAGE_COLUMNS = (
    "id, parent_id, role, content, reasoning_content, status, model, finish_reason, error_code,"
    " error_message, prompt_tokens, completion_tokens, total_tokens, last_seq, created_at, tool_steps, tool_results,"
    " reasoning_tokens, cached_tokens, cost_micros, currency, sources, searches, continued"
)
_MESSAGE_COLUMN_NAMES = tuple(_MESSAGE_COLUMNS.split(", "))
_M_COLUMNS = ", ".join("m." + name for name in _MESSAGE_COLUMN_NAMES)
# A message's text in characters, its tool steps and results included (a page's read stops at a size:
# see MESSAGE_PAGE_BYTES)
_TEXT_CHARS = (
    "length(content) + COALESCE(length(reasoning_content), 0) + COALESCE(length(tool_steps), 0)"
    " + COALESCE(length(tool_results), 0)"
)
_M_TEXT_CHARS = (
    "length(m.content) + COALESCE(length(m.reasoning_content), 0) + COALESCE(length(m.tool_steps), 0)"
    " + COALESCE(length(m.tool_results), 0)"
)


def _running_chars(rows: str, order: str) -> str:
    """`rows` (id, chars) with the characters before each in `order` (before_chars) and their count."""
    return (
        f"(SELECT id, {order} AS place, SUM(chars) OVER (ORDER BY {order} ROWS UNBOUNDED PRECEDING) - chars"
        f" AS before_chars, COUNT(*) OVER () AS candidates FROM {rows})"
    )


# The leaf a branch switch lands on: from message :mid (the newest root when :mid is NULL) down,
# taking the newest child at each step. Ids grow along every path, whatever the writers' clocks
# (new_message_id), so the leaf is the largest.
_NEWEST_LEAF = """WITH RECURSIVE down (id) AS (
    SELECT id FROM messages WHERE owner = :owner AND session_id = :sid AND id = COALESCE(:mid,
        (SELECT MAX(r.id) FROM messages r WHERE r.owner = :owner AND r.session_id = :sid AND r.parent_id IS NULL))
    UNION ALL
    SELECT (SELECT MAX(c.id) FROM messages c WHERE c.parent_id = down.id) FROM down WHERE down.id IS NOT NULL)
"""

# A message and everything below it (id, parent_id, status), in no particular order. Each step finds
# the children of one message through messages_by_parent, whatever the table's statistics say:
# PostgreSQL plans a LATERAL subquery behind OFFSET 0 on its own, for one parent (as a join, stale
# statistics made every step a hash join over the whole table: a 10,000-deep branch took minutes).
# SQLite has no LATERAL; it walks each step as a nested loop over the index anyway.
_SUBTREE = {
    "sqlite": """WITH RECURSIVE sub (id, parent_id, status) AS (
    SELECT id, parent_id, status FROM messages WHERE id = :mid AND owner = :owner AND session_id = :sid
    UNION ALL
    SELECT m.id, m.parent_id, m.status FROM messages m JOIN sub ON m.parent_id = sub.id)
""",
    "postgresql": """WITH RECURSIVE sub (id, parent_id, status) AS (
    SELECT id, parent_id, status FROM messages WHERE id = :mid AND owner = :owner AND session_id = :sid
    UNION ALL
    SELECT c.id, c.parent_id, c.status FROM sub CROSS JOIN LATERAL
        (SELECT m.id, m.parent_id, m.status FROM messages m WHERE m.parent_id = sub.id OFFSET 0) c)
""",
}


def row_usage(row: dict, details: bool = False) -> dict | None:
    """A message's usage as reported: its three counts (an export's), and with `details` its
    reasoning_tokens and cached_tokens when reported (as the API shows it); None: none reported."""
    if row["total_tokens"] is None and row["prompt_tokens"] is None:
        return None
    usage = {k: row[k] for k in USAGE_FIELDS}
    if details:
        usage.update((k, row[k]) for k in ("reasoning_tokens", "cached_tokens") if row.get(k) is not None)
    return usage


def row_cost(row: dict) -> Cost | None:
    """What an answer's calls cost, as stored (None: no prices when it ended, or its model had none)."""
    return Cost(row["cost_micros"], row["currency"]) if row.get("cost_micros") is not None else None


@dataclass
class Turn:
    """What a chat writes before the model is called: the answer's row (`streaming`) and, unless it
    regenerates an answer, the user message it answers."""

    owner: str
    session_id: str
    answer_id: str
    model: str
    question_id: str  # the user message the answer answers (the answer's parent)
    question: str  # its text ('' for a tool-results turn)
    new_question: bool  # False for a regeneration: that user message exists
    parent_id: str | None  # a new user message's parent (None: a first message)
    title: str | None = None  # the conversation's title if it has none yet (CHATSVC_TITLES=off: None)
    # a tool-results turn: the JSON text of its [{"tool_call_id", "content"}], stored on the new user
    # row (whose `question` is then ''); None for a turn with a message
    tool_results: str | None = None
    files: list[str] = field(default_factory=list)  # the new user message's file ids, in order
    hold: Hold | None = None  # the answer's first model call, admitted against its owner's limits in begin_turn
    search: dict | None = None  # its web search's options (None: it does not search): WebSearch.of_turn


class Tree:
    """A conversation's messages: its branches read a page at a time, the turn a chat writes, and the
    writes that change the tree. Such a write takes the conversation's row first, then messages
    (`Conversations.lock`; `begin_turn`'s upsert, `clear_context`'s update and `Conversations.delete`
    do it with their first statement): one lock order, so two such writes never deadlock, and each
    reads the tree the one before it left."""

    def __init__(self, db: Database, conversations: Conversations, usage: Usage):
        self.db, self.conversations, self.usage = db, conversations, usage

    async def chat_context(
        self,
        owner: str,
        session_id: str,
        limit: int,
        start: str | None = None,
        current: bool = True,
        summaries: bool = False,
    ) -> tuple[dict | None, list[dict]]:
        """What a chat needs, in one read: the conversation's settings (None if it is new), with
        `last_id`, the largest id it holds (its context start included: the new turn's ids go above
        it), and the path that leads to the new message, newest first: from the current leaf
        (`current`), or from message `start` (None: the new message is a first one), up to `limit`
        messages since the context start. It reads only that path, so its cost does not grow with the
        conversation's size or the path's depth (bench/relay.py, scenario f). Each message of the path:
        id, role, content, status, finish_reason, tool_steps and tool_results (JSON text or None), and
        has_files: whether it carries files (read with Files.of_messages only then). `summaries`: each
        also has `summary`, the text of the summary that ends at it (None: none does), and
        `summary_first`, the first message that summary covers."""
        summary = (
            ", s.content AS summary, s.first_id AS summary_first, s.covered AS summary_covered" if summaries else ""
        )  # only when summaries are on: the query is as it always was otherwise
        joined = " LEFT JOIN summaries s ON s.message_id = p.id" if summaries else ""
        rows = await self.db.fetch_all(
            "WITH RECURSIVE path (id, parent_id, role, content, status, finish_reason, tool_steps, tool_results,"
            " depth, context_start) AS ("
            " SELECT m.id, m.parent_id, m.role, m.content, m.status, m.finish_reason, m.tool_steps, m.tool_results,"
            " 1, c.context_start FROM conversations c"
            " JOIN messages m ON m.id = CASE WHEN :current THEN c.current_message_id ELSE :start END"
            " WHERE c.owner = :owner AND c.session_id = :sid AND m.owner = :owner AND m.session_id = :sid"
            " AND m.id > c.context_start"
            " UNION ALL SELECT m.id, m.parent_id, m.role, m.content, m.status, m.finish_reason, m.tool_steps,"
            " m.tool_results, p.depth + 1, p.context_start"
            " FROM path p JOIN messages m ON m.id = p.parent_id WHERE p.depth < :limit AND m.id > p.context_start)"
            " SELECT c.system_prompt, c.model, c.title, c.current_message_id, c.context_start, c.web_search,"
            " (SELECT MAX(x.id) FROM messages x WHERE x.owner = :owner AND x.session_id = :sid) AS last_id,"
            " p.id, p.role, p.content, p.status, p.finish_reason, p.tool_steps, p.tool_results,"
            f" EXISTS (SELECT 1 FROM message_files f WHERE f.message_id = p.id) AS has_files{summary}"
            f" FROM conversations c LEFT JOIN path p ON 1 = 1{joined} WHERE c.owner = :owner AND c.session_id = :sid"
            " ORDER BY p.depth",
            {"owner": owner, "sid": session_id, "limit": limit, "start": start, "current": current},
        )
        if not rows:
            return None, []
        conversation = rows[0]
        conversation["last_id"] = max(conversation["last_id"] or "", conversation["context_start"])
        return conversation, [row for row in rows if row["role"] is not None]

    async def branch(
        self, owner: str, session_id: str, limit: int, before: str | None = None, chars: int = 2**62
    ) -> list[dict]:
        """The current branch's newest `limit` messages, newest first: from the current leaf up, or
        from the parent of message `before` (a page further up); only those with fewer than `chars`
        characters of text (content and reasoning) before them in that order. Each row's `candidates`:
        how many of the `limit` there were before that cut."""
        scope = "owner = :owner AND session_id = :sid"
        if before is None:
            anchor = f"(SELECT current_message_id FROM conversations WHERE {scope})"
        else:
            anchor = f"(SELECT parent_id FROM messages WHERE id = :before AND {scope})"
        return await self.db.fetch_all(
            f"WITH RECURSIVE path (id, parent_id, chars, depth) AS (SELECT id, parent_id, {_TEXT_CHARS}, 1"
            f" FROM messages WHERE id = {anchor} AND {scope} UNION ALL SELECT m.id, m.parent_id,"
            f" {_M_TEXT_CHARS}, p.depth + 1 FROM path p JOIN messages m ON m.id = p.parent_id WHERE p.depth < :limit)"
            f" SELECT {_M_COLUMNS}, t.candidates FROM {_running_chars('path', 'depth')} t"
            " JOIN messages m ON m.id = t.id WHERE t.before_chars < :chars ORDER BY t.place",
            {"owner": owner, "sid": session_id, "limit": limit, "before": before, "chars": chars},
        )

    async def messages(
        self,
        owner: str,
        session_id: str,
        limit: int,
        after: str | None = None,
        before: str | None = None,
        chars: int = 2**62,
    ) -> list[dict]:
        """Every message of the conversation, oldest first (after message id `after`, and before
        `before`, if given), at most `limit`, cut as `branch` cuts them (`chars`, `candidates`)."""
        where = " AND id < :before" if before is not None else ""
        return await self.db.fetch_all(
            f"WITH page AS (SELECT id, {_TEXT_CHARS} AS chars FROM messages WHERE owner = :owner"
            f" AND session_id = :sid AND id > :after{where} ORDER BY id LIMIT :limit)"
            f" SELECT {_M_COLUMNS}, t.candidates FROM {_running_chars('page', 'id')} t JOIN messages m ON m.id = t.id"
            " WHERE t.before_chars < :chars ORDER BY m.id",
            {"owner": owner, "sid": session_id, "limit": limit, "after": after or "", "before": before, "chars": chars},
        )

    async def siblings(self, owner: str, session_id: str, parents: set[str | None]) -> dict[str | None, list[str]]:
        """The children of each of these messages (None: the conversation's first messages), oldest first."""
        found: dict[str | None, list[str]] = {}
        scope = {"owner": owner, "sid": session_id}
        # by parent alone: a message's children are in its conversation, and these parents were read from
        # it (with the conversation in the WHERE, SQLite walks the conversation's index instead)
        for names, ids in _id_batches(sorted(p for p in parents if p is not None)):
            for row in await self.db.fetch_all(
                f"SELECT parent_id, id FROM messages WHERE parent_id IN ({names}) ORDER BY id", ids
            ):
                found.setdefault(row["parent_id"], []).append(row["id"])
        if None in parents:
            rows = await self.db.fetch_all(
                "SELECT id FROM messages WHERE owner = :owner AND session_id = :sid AND parent_id IS NULL ORDER BY id",
                scope,
            )
            found[None] = [row["id"] for row in rows]
        return found

    async def message(self, owner: str, session_id: str, message_id: str) -> dict | None:
        row = await self.db.fetch_one(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE id = :id AND owner = :owner AND session_id = :sid",
            {"id": message_id, "owner": owner, "sid": session_id},
        )
        return row

    async def message_and_parent(self, owner: str, session_id: str, message_id: str) -> dict | None:
        """A message's role, status and parent, with its parent's text and parent (what a
        regeneration or an edit starts from)."""
        return await self.db.fetch_one(
            "SELECT m.id, m.role, m.status, m.parent_id, q.content AS parent_content, q.parent_id AS grandparent_id,"
            " q.tool_results AS parent_tool_results FROM messages m LEFT JOIN messages q ON q.id = m.parent_id"
            " WHERE m.id = :id AND m.owner = :owner AND m.session_id = :sid",
            {"id": message_id, "owner": owner, "sid": session_id},
        )

    async def begin_turn(self, turn: Turn) -> Limits | None:
        """Store the user's message (unless the turn regenerates an answer) with its files, and claim
        the conversation's answer slot with the answer's row, which becomes the current leaf; then, with
        `turn.hold`, admit the answer's first model call against its owner's limits (Usage.admit, last:
        a refusal, OverLimit, rolls the whole turn back). All or nothing. The owner's effective limits
        (None: no hold).

        The partial unique index over `streaming` answers makes a second concurrent turn fail
        here, before anything of it is stored. On SQLite, turns that arrive while another is stored
        are stored together (Database.together), each all or nothing as alone."""
        # PostgreSQL: the pool's connection first, so that the new row's heartbeat is when it is written
        return await self.db.together(lambda: self._turn(turn))

    async def _turn(self, turn: Turn) -> Limits | None:
        """begin_turn's transaction."""
        values = {
            "owner": turn.owner,
            "sid": turn.session_id,
            "now": utcnow(),
            "aid": turn.answer_id,
            "uid": turn.question_id,
            "text": turn.question,
            "parent": turn.parent_id,
            "model": turn.model,
            "results": storable_json(turn.tool_results),
        }
        await self.db.execute(
            "INSERT INTO conversations (owner, session_id, title, title_source, current_message_id, created_at,"
            " updated_at) VALUES (:owner, :sid, :title, :source, :aid, :now, :now)"
            " ON CONFLICT (owner, session_id) DO UPDATE SET updated_at = excluded.updated_at,"
            " title = COALESCE(conversations.title, excluded.title), title_source = CASE WHEN"
            " conversations.title IS NULL THEN excluded.title_source ELSE conversations.title_source END,"
            " current_message_id = excluded.current_message_id",
            {**values, "title": turn.title, "source": "first_line" if turn.title else None},
            later=True,  # with the messages' INSERT: its failure is a storage fault, not a violation
        )
        rows = f"(:aid, :uid, :owner, :sid, 'assistant', '', 'streaming', :model, :now, {self.db.heartbeat_now}, NULL)"
        if turn.new_question:
            rows = f"(:uid, :parent, :owner, :sid, 'user', :text, 'complete', NULL, :now, :now, :results), {rows}"
        stamped = time.monotonic()  # the answer's heartbeat, written now, is seen once this commits
        # SQLite: the messages go with the admission's first statement (one hop less), which raises
        # their violation: the admission's own statements raise none (usage_owners' INSERT does
        # nothing on a conflict; neither table has a foreign key: one would need its own try here)
        with_admission = turn.hold is not None and not (turn.new_question and turn.files)
        try:
            await self.db.execute(
                "INSERT INTO messages (id, parent_id, owner, session_id, role, content, status, model,"
                f" created_at, updated_at, tool_results) VALUES {rows}",
                values,
                later=with_admission,
            )
            limits = await self.usage.admit(turn.hold) if with_admission else None
        except Exception as exc:
            kind = _violation(exc)
            if kind == "unique":
                raise busy(turn.session_id) from None
            if kind == "foreign_key":  # the message it follows was deleted meanwhile
                raise message_not_found(turn.session_id, turn.parent_id or turn.question_id) from None
            raise
        if not with_admission:
            if turn.new_question and turn.files:
                await self._attach_files(turn)
            limits = await self.usage.admit(turn.hold) if turn.hold is not None else None
        beat_in_time(self.db, stamped)
        return limits

    async def begin_continuation(self, cont: Continuation) -> Limits | None:
        """The answer `cont` continues goes back to `streaming` (its text as it is, `continued` + 1,
        `last_seq` past every event id it had: its continuation's events come after; its token counts
        unknown until its final write sums the parts', so that a crash leaves none) and becomes the
        current leaf, if it is still as it was read (its status and last event, no replies); then, with
        `cont.hold`, its model call is admitted (Usage.admit). All or nothing, as begin_turn: a refusal
        leaves the answer as it was. Another answer of the conversation `streaming`, or a concurrent
        continuation of this one: ConversationBusy. On SQLite, stored together with the turns and
        continuations that arrive meanwhile (Database.together), as begin_turn."""
        return await self.db.together(lambda: self._continuation(cont))

    async def _continuation(self, cont: Continuation) -> Limits | None:
        """begin_continuation's transaction."""
        values = {
            "owner": cont.owner,
            "sid": cont.session_id,
            "id": cont.answer_id,
            "status": cont.status,
            "old_seq": cont.old_seq,
            "seq": cont.base + 1,  # the row holds what the continuation's `start` says
            "model": cont.model,
            "now": utcnow(),
        }
        if await self.conversations.lock(cont.owner, cont.session_id) is None:
            raise message_not_found(cont.session_id, cont.answer_id)
        stamped = time.monotonic()
        try:
            row = await self.db.fetch_one(
                "UPDATE messages SET status = 'streaming', continued = continued + 1, last_seq = :seq,"
                " finish_reason = NULL, error_code = NULL, error_message = NULL, model = :model,"
                " prompt_tokens = NULL, completion_tokens = NULL, total_tokens = NULL, reasoning_tokens = NULL,"
                " cached_tokens = NULL,"  # not known until its last write sums the parts (a crash: never)
                f" updated_at = {self.db.heartbeat_now} WHERE id = :id AND owner = :owner AND session_id = :sid"
                " AND status = :status AND COALESCE(last_seq, -1) = :old_seq"
                " AND NOT EXISTS (SELECT 1 FROM messages c WHERE c.parent_id = :id) RETURNING id, continued",
                values,
                role=WRITE,
            )
        except Exception as exc:
            if _violation(exc) == "unique":
                raise busy(cont.session_id) from None
            raise
        if row is None:  # continued, replied to or deleted since it was read
            raise ConversationBusy(
                f"Answer '{cont.answer_id}' changed while it was being continued (another request continued it,"
                " or wrote after it); reload the conversation and try again."
            )
        cont.generation = row["continued"]
        await self.db.execute(
            "UPDATE conversations SET current_message_id = :id, updated_at = :now"
            " WHERE owner = :owner AND session_id = :sid",
            values,
            later=True,
        )
        limits = await self.usage.admit(cont.hold) if cont.hold is not None else None
        beat_in_time(self.db, stamped)
        return limits

    async def _attach_files(self, turn: Turn) -> None:
        """Inside begin_turn's transaction: the new user message's files (`message_files`), each the
        owner's and ready, and their `last_used_at` bumped (the collector's clock). A file deleted or
        hidden for deletion since the turn's checks: `file_not_found`, and the transaction writes nothing.

        The bump comes first: on PostgreSQL it locks the files' rows, so a deletion (collector, remove)
        that hid one meanwhile is waited for and seen (its status re-checked), and one that comes after
        waits for this turn or passes the file by."""
        ids = list(dict.fromkeys(turn.files))
        values: dict[str, Any] = {"owner": turn.owner, "uid": turn.question_id, "now": utcnow()}
        values.update((f"f{n}", file_id) for n, file_id in enumerate(ids))
        names = ", ".join(f":f{n}" for n in range(len(ids)))
        place = " ".join(f"WHEN :f{n} THEN {n}" for n in range(len(ids)))
        bumped = await self.db.fetch_all(
            f"UPDATE files SET last_used_at = :now WHERE id IN ({names}) AND owner = :owner AND status = 'ready'"
            " RETURNING id",
            values,
            role=WRITE,
        )
        if len(bumped) != len(ids):
            found = {row["id"] for row in bumped}
            raise file_not_found(next(file_id for file_id in ids if file_id not in found))
        try:
            rows = await self.db.fetch_all(
                "INSERT INTO message_files (owner, message_id, position, file_id)"
                f" SELECT CAST(:owner AS TEXT), CAST(:uid AS TEXT), CASE f.id {place} END, f.id FROM files f"
                f" WHERE f.id IN ({names}) AND f.owner = :owner AND f.status = 'ready' RETURNING file_id",
                values,
                role=WRITE,
            )
        except Exception as exc:
            if _violation(exc) != "foreign_key":
                raise
            rows = []  # a file deleted by a transaction that ended while this one waited for its row
        attached = {row["file_id"] for row in rows}
        missing = [file_id for file_id in ids if file_id not in attached]
        if missing:
            raise file_not_found(missing[0])

    async def switch_branch(self, owner: str, session_id: str, message_id: str) -> bool:
        """The branch through this message becomes the current one, down to its newest leaf."""

        async def switch() -> bool:
            if await self.conversations.lock(owner, session_id) is None:
                return False
            row = await self.db.fetch_one(  # after the lock: a branch deleted meanwhile is gone from what it reads
                _NEWEST_LEAF + "UPDATE conversations SET current_message_id = (SELECT MAX(id) FROM down),"
                " updated_at = :now WHERE owner = :owner AND session_id = :sid AND EXISTS (SELECT 1 FROM down)"
                " RETURNING session_id",
                {"owner": owner, "sid": session_id, "mid": message_id, "now": utcnow()},
                role=WRITE,
            )
            return row is not None

        return await self.db.atomically(switch)

    async def delete_branch(self, owner: str, session_id: str, message_id: str) -> int:
        """Delete this message and everything below it; returns how many. A current leaf among them
        moves to the message's parent, down to that one's newest leaf. Refused while an answer below
        it is `streaming`: the check and the delete read the same tree (under the conversation's
        lock, which a new answer's `begin_turn` takes too)."""
        values = {"owner": owner, "sid": session_id, "mid": message_id, "now": utcnow()}

        async def delete() -> int:
            conversation = await self.conversations.lock(owner, session_id)
            subtree = _SUBTREE[self.db.dialect]
            rows = await self.db.fetch_all(subtree + "SELECT id, parent_id, status FROM sub", values, role=WRITE)
            if conversation is None or not rows:
                raise message_not_found(session_id, message_id)
            if any(row["status"] == STREAMING for row in rows):
                raise ConversationBusy(
                    f"An answer below message '{message_id}' is still being written: stop it first"
                    f" (POST /api/v1/chat/{session_id}/stop), then delete."
                )
            await self.db.execute(subtree + files_unreferenced("SELECT id FROM sub"), values)
            try:
                await self.db.execute(subtree + "DELETE FROM messages WHERE id IN (SELECT id FROM sub)", values)
            except Exception as exc:
                if _violation(exc) != "foreign_key":
                    raise
                raise ConversationBusy(  # a message below it written meanwhile, by a writer without the lock
                    f"Conversation '{session_id}' changed while its message '{message_id}' was being deleted;"
                    " try again."
                ) from None
            deleted = {row["id"]: row["parent_id"] for row in rows}  # the rows come in no particular order
            if conversation["current_message_id"] in deleted:
                await self.db.execute(
                    _NEWEST_LEAF + "UPDATE conversations SET current_message_id = (SELECT MAX(id) FROM down),"
                    " updated_at = :now WHERE owner = :owner AND session_id = :sid",
                    {**values, "mid": deleted[message_id]},
                )
            else:
                await self.db.execute(
                    "UPDATE conversations SET updated_at = :now WHERE owner = :owner AND session_id = :sid", values
                )
            return len(rows)

        return await self.db.atomically(delete)

    async def clear_context(self, owner: str, session_id: str, purge: bool) -> bool:
        """Everything up to now leaves the model's context; `purge` deletes it instead of hiding it,
        except a running answer, which becomes a first message (its question is gone).

        The context's new start is the largest id the conversation holds, not a time: no clock can put
        it below a message written before or above one written after (their ids go above it). It is
        read after the conversation's lock (PostgreSQL: a turn committed while the clear waited for it
        is in that largest id, so a purge takes it too)."""
        values = {"owner": owner, "sid": session_id, "now": utcnow()}
        where = "owner = :owner AND session_id = :sid"

        async def clear() -> bool:
            if await self.conversations.lock(owner, session_id) is None:
                return False
            row = await self.db.fetch_one(
                "UPDATE conversations SET context_start = COALESCE((SELECT MAX(m.id) FROM messages m"
                " WHERE m.owner = :owner AND m.session_id = :sid AND m.id > conversations.context_start),"
                f" context_start), updated_at = :now WHERE {where} RETURNING context_start",
                values,
                role=WRITE,
            )
            if row:  # the summaries before the new start are of no context any more
                await self.db.execute(
                    f"DELETE FROM summaries WHERE {where} AND message_id <= :start",
                    {**values, "start": row["context_start"]},
                )
            if row and purge:
                values["marker"] = row["context_start"]
                await self.db.execute(
                    f"UPDATE messages SET parent_id = NULL WHERE {where} AND status = 'streaming'", values
                )
                purged = f"SELECT id FROM messages WHERE {where} AND id <= :marker AND status != 'streaming'"
                await self.db.execute(files_unreferenced(purged), values)
                await self.db.execute(
                    f"DELETE FROM messages WHERE {where} AND id <= :marker AND status != 'streaming'", values
                )
                await self.db.execute(
                    "UPDATE conversations SET current_message_id = (SELECT MAX(m.id) FROM messages m"
                    f" WHERE m.owner = :owner AND m.session_id = :sid) WHERE {where}",
                    values,
                )
            return row is not None

        return await self.db.atomically(clear)


# ── Copies: forks and imports, written a chunk at a time ───────────────────────────────

# SQLite has one writer: an import or a fork larger than this is written this much a transaction
# (other writes get in between), under an owner no request can have (the user header refuses control
# characters), then moved into place in one more transaction (Copies._copy). bench/holds.py.
COPY_CHUNK_MESSAGES = 1000
COPY_CHUNK_CHARS = 1_000_000
STAGED_OWNER = "\x01staged"

_INTEGER_COLUMNS = frozenset(
    {"prompt_tokens", "completion_tokens", "total_tokens", "reasoning_tokens", "cached_tokens", "searches", "continued"}
)
_BIGINT_COLUMNS = frozenset({"cost_micros", "last_seq"})  # last_seq: a continued answer's ids go past 2**31
_TOOL_COLUMNS = ("tool_steps", "tool_results")  # JSON text, counted with the text


def _copy_chunks(rows: list[dict]) -> Iterator[list[dict]]:
    """`rows` in order, at most COPY_CHUNK_MESSAGES messages and COPY_CHUNK_CHARS characters of text
    (tool steps and results included) a chunk (a single longer message is a chunk of its own)."""
    chunk: list[dict] = []
    chars = 0
    for row in rows:
        size = len(row["content"]) + sum(len(row[name] or "") for name in ("reasoning_content", *_TOOL_COLUMNS))
        if chunk and (len(chunk) == COPY_CHUNK_MESSAGES or chars + size > COPY_CHUNK_CHARS):
            yield chunk
            chunk, chars = [], 0
        chunk.append(row)
        chars += size
    if chunk:
        yield chunk


class _CopyPlan:
    """A copy's new ids and its conversation row's values (`Copies._copy`)."""

    def __init__(self, conversation: dict, messages: list[dict], outside: set[str], current: str | None):
        newest_child = {row["parent_id"]: row["id"] for row in messages}  # new ids grow in the file's order
        leaf = current
        while leaf in newest_child:
            leaf = newest_child[leaf]
        self.conversation, self.outside, self.leaf = conversation, outside, leaf
        self.new_ids: dict[str, str] = {}
        self.now = utcnow()

    def rows(self, chunk: list[dict], owner: str, session_id: str) -> list[dict]:
        """The chunk's copies under their new ids, made a chunk at a time (100,000 take seconds)."""
        self.new_ids.update((row["id"], new_message_id()) for row in chunk)
        scope = {"owner": owner, "session_id": session_id, "updated_at": self.now}
        new_ids = self.new_ids
        return [{**row, **scope, "id": new_ids[row["id"]], "parent_id": new_ids.get(row["parent_id"])} for row in chunk]

    def head(self, start: str = "", leaf: str | None = None) -> dict:
        """The conversation row's values."""
        return {**self.conversation, "start": start, "leaf": leaf, "now": self.now}

    def placed_head(self) -> dict:
        """The conversation row's values once every message has its new id."""
        return self.head(max((self.new_ids[mid] for mid in self.outside), default=""), self.new_ids.get(self.leaf))


class Copies:
    """New conversations holding copies of messages: a fork of a path, an imported file."""

    def __init__(self, db: Database, files: Files):
        self.db, self.files = db, files

    async def fork(self, owner: str, session_id: str, message_id: str, new_session_id: str, title: str | None) -> bool:
        """A new conversation holding copies of the path from the root to this message (new ids; the
        same texts, tool steps and results, usage, statuses and times; what was out of the context
        stays out). False if `new_session_id` exists."""
        scope = {"owner": owner, "sid": session_id}
        source = await self.db.fetch_one(
            "SELECT title, system_prompt, model, context_start FROM conversations"
            " WHERE owner = :owner AND session_id = :sid",
            scope,
        )
        path = await self._path(owner, session_id, message_id) if source is not None else []
        if source is None or not path:
            raise message_not_found(session_id, message_id)
        if path[-1]["status"] == STREAMING:
            raise ConversationBusy(
                f"Answer '{message_id}' is still being written: fork it once it has ended (or stop it)."
            )
        outside = {row["id"] for row in path if row["id"] <= source["context_start"]}
        carried = await self._files_of(owner, [row["id"] for row in path])
        path = [{**row, "files": carried[row["id"]]} if row["id"] in carried else row for row in path]
        conversation = {
            "title": title if title is not None else source["title"],
            "title_source": None,
            "system_prompt": source["system_prompt"],
            "model": source["model"],
        }
        try:
            return await self._copy(owner, new_session_id, conversation, path, outside, message_id) is not None
        except Exception as exc:  # the path was read outside the copy's transaction
            if _violation(exc) != "foreign_key":
                raise
            raise message_not_found(session_id, message_id) from None  # a file of it went with its message

    async def _path(self, owner: str, session_id: str, message_id: str) -> list[dict]:
        """The messages from the root down to this one (none if it is not in the conversation), read
        COPY_CHUNK_MESSAGES a statement from the message up, so that no read holds a connection long. A
        message of it deleted meanwhile (its whole subtree goes with it) leaves none."""
        path: list[dict] = []
        mid: str | None = message_id
        while mid is not None:
            rows = await self.db.fetch_all(
                "WITH RECURSIVE path AS (SELECT *, 1 AS depth FROM messages"
                " WHERE id = :mid AND owner = :owner AND session_id = :sid"
                " UNION ALL SELECT m.*, p.depth + 1 FROM path p JOIN messages m ON m.id = p.parent_id"
                " WHERE p.depth < :n) SELECT * FROM path ORDER BY depth",
                {"owner": owner, "sid": session_id, "mid": mid, "n": COPY_CHUNK_MESSAGES},
            )
            if not rows:
                return []
            path += rows
            mid = rows[-1]["parent_id"]
        return path[::-1]

    async def _files_of(self, owner: str, message_ids: list[str]) -> dict[str, list[str]]:
        """The ids of the files each of these messages carries, in order (messages without files absent)."""
        carried = await self.files.of_messages(owner, message_ids)
        return {message_id: [row.id for row in rows] for message_id, rows in carried.items()}

    async def import_file(
        self, owner: str, session_id: str, file: ImportedConversation, another: bool = False
    ) -> str | None:
        """A new conversation holding the file's messages, with new ids and the same tree, under
        `session_id` (a new id if that is taken and `another`); its id, or None if it is taken. All or
        nothing."""
        conversation = {
            "title": file.title,
            "title_source": "client" if file.title is not None else None,
            "system_prompt": file.system_prompt,
            "model": file.model,
            "web_search": file.web_search,
        }
        outside = {row["id"] for row in file.messages if not row["in_context"]}
        current = file.current_message_id or (file.messages[-1]["id"] if file.messages else None)
        return await self._copy(owner, session_id, conversation, file.messages, outside, current, another)

    async def _copy(
        self,
        owner: str,
        session_id: str,
        conversation: dict,
        messages: list[dict],
        outside: set[str],
        current: str | None,
        another: bool = False,
    ) -> str | None:
        """A new conversation (`conversation`'s title, title_source, system_prompt and model) holding
        copies of `messages` (parents first) under new ids, the same tree, each carrying the files its
        `files` names (the owner's file ids, in order; none if absent); those in `outside` stay out of
        the context, and the current leaf is `current`'s newest leaf. Returns its session id: `session_id`,
        or if that is taken and `another` a new one; None if it is taken. All or nothing.

        SQLite has one writer: more than COPY_CHUNK_MESSAGES messages (or COPY_CHUNK_CHARS characters)
        are written in transactions of at most that many, under a hidden owner no request reads
        (STAGED_OWNER), then moved into place in one more, so that other writes get in between. What a
        failure leaves is deleted then; what a crash leaves, at the next start (`drop_staged`)."""
        plan = _CopyPlan(conversation, messages, outside, current)
        chunks = list(_copy_chunks(messages))
        if len(chunks) == 1:
            rows = plan.rows(messages, owner, session_id)
            async with self.db.transaction():
                session_id = await self._create(owner, session_id, plan.placed_head(), another)
                if session_id is not None:
                    await self.insert_messages([{**row, "session_id": session_id} for row in rows])
                    await self.insert_message_files(owner, rows)
            return session_id
        if not self.db.is_sqlite or not chunks:
            return await self._copy_at_once(owner, session_id, plan, chunks, another)
        if not another and await self.db.fetch_one(
            "SELECT 1 AS taken FROM conversations WHERE owner = :owner AND session_id = :sid",
            {"owner": owner, "sid": session_id},
        ):  # taken now: not worth staging the whole copy to find it out at the end (the end checks again)
            return None
        return await self._copy_staged(owner, session_id, plan, chunks, messages, another)

    async def _copy_at_once(
        self, owner: str, session_id: str, plan: _CopyPlan, chunks: list[list[dict]], another: bool
    ) -> str | None:
        """`_copy` in one transaction, its ids made a chunk at a time all the same."""
        async with self.db.transaction():
            session_id = await self._create(owner, session_id, plan.head(), another)
            if session_id is None:
                return None
            for chunk in chunks:
                rows = plan.rows(chunk, owner, session_id)
                await self.insert_messages(rows)
                await self.insert_message_files(owner, rows)
            await self.db.execute(
                "UPDATE conversations SET context_start = :start, current_message_id = :leaf"
                " WHERE owner = :owner AND session_id = :sid",
                {**plan.placed_head(), "owner": owner, "sid": session_id},
            )
        return session_id

    async def _copy_staged(
        self,
        owner: str,
        session_id: str,
        plan: _CopyPlan,
        chunks: list[list[dict]],
        messages: list[dict],
        another: bool,
    ) -> str | None:
        """`_copy` on SQLite, a transaction a chunk under STAGED_OWNER, then moved into place in one more."""
        staged = {"staged": STAGED_OWNER, "staged_sid": str(uuid.uuid4())}
        placed = False
        try:
            await self._create(STAGED_OWNER, staged["staged_sid"], plan.head())
            for chunk in chunks:
                rows = plan.rows(chunk, STAGED_OWNER, staged["staged_sid"])
                async with self.db.transaction():
                    await self.insert_messages(rows)
                    await self.insert_message_files(owner, rows)  # the owner's already: no request reads them
            async with self.db.transaction():
                session_id = await self._create(owner, session_id, plan.placed_head(), another)
                if session_id is None:
                    return None
                await self.db.execute(
                    "UPDATE messages SET owner = :owner, session_id = :sid"
                    " WHERE owner = :staged AND session_id = :staged_sid",
                    {**staged, "owner": owner, "sid": session_id},
                )
                moved = await self.db.fetch_one("SELECT changes() AS n", role=WRITE)
                if not moved or moved["n"] != len(messages):  # only another store on the file could have dropped them
                    raise StorageUnavailable(
                        f"The import was changed while it was written ({moved and moved['n']} of {len(messages)}"
                        " messages left); try again."
                    )
                await self.db.execute(
                    "DELETE FROM conversations WHERE owner = :staged AND session_id = :staged_sid", staged
                )
            placed = True
            return session_id
        finally:
            if not placed:
                await self.drop_staged(staged["staged_sid"])

    async def _create(self, owner: str, session_id: str, head: dict, another: bool = False) -> str | None:
        """The conversation row of a copy (`_copy`): its session id, None if that is taken (unless `another`)."""
        while True:
            created = await self.db.fetch_one(
                "INSERT INTO conversations (owner, session_id, title, title_source, system_prompt, model,"
                " context_start, current_message_id, created_at, updated_at, web_search)"
                " VALUES (:owner, :sid, :title, :title_source, :system_prompt, :model, :start, :leaf, :now, :now,"
                " :web_search) ON CONFLICT (owner, session_id) DO NOTHING RETURNING session_id",
                {"web_search": None, **head, "owner": owner, "sid": session_id},
                role=WRITE,
            )
            if created is not None:
                return session_id
            if not another:
                return None
            session_id = str(uuid.uuid4())

    async def drop_staged(self, session_id: str | None = None) -> None:
        """SQLite: delete a copy staged by `_copy` that was not moved into place (None: every one, what
        a crash left), COPY_CHUNK_MESSAGES messages a statement, children first. A failure is logged:
        the next start deletes what is left."""
        try:
            if session_id is None:
                staged = await self.db.fetch_all(
                    "SELECT session_id FROM conversations WHERE owner = :staged", {"staged": STAGED_OWNER}, role=WRITE
                )
                for row in staged:
                    await self.drop_staged(row["session_id"])
                return
            values = {"staged": STAGED_OWNER, "sid": session_id, "n": COPY_CHUNK_MESSAGES}
            while await self.db.fetch_one(
                "SELECT 1 AS one FROM messages WHERE owner = :staged AND session_id = :sid LIMIT 1", values, role=WRITE
            ):
                await self.db.execute(
                    "DELETE FROM messages WHERE id IN (SELECT id FROM messages"
                    " WHERE owner = :staged AND session_id = :sid ORDER BY id DESC LIMIT :n)",
                    values,
                )
            await self.db.execute("DELETE FROM conversations WHERE owner = :staged AND session_id = :sid", values)
        except Refusal as exc:
            log.warning("a staged copy (%s) is left for the next start to delete: %s", session_id or "all", exc.detail)

    async def insert_messages(self, rows: list[dict]) -> None:
        """Write these messages as they are (parents before children), 100 rows a statement (PostgreSQL:
        one array per column, COPY_CHUNK_MESSAGES rows a statement, see _insert_columns)."""
        names = (*_MESSAGE_COLUMN_NAMES, "owner", "session_id", "updated_at")
        if not self.db.is_sqlite:
            await self._insert_columns(names, rows)
            return
        for start in range(0, len(rows), 100):
            values: dict[str, Any] = {}
            tuples = []
            for n, row in enumerate(rows[start : start + 100]):
                values.update({f"{name}_{n}": row.get(name) for name in names})  # an import's: no cost
                tuples.append("(" + ", ".join(f":{name}_{n}" for name in names) + ")")
            await self.db.execute(f"INSERT INTO messages ({', '.join(names)}) VALUES {', '.join(tuples)}", values)

    async def insert_message_files(self, owner: str, rows: list[dict]) -> None:
        """Inside a transaction: the references of these written messages to their files (each row's
        `files`, if any), in order, 300 a statement; the files' `last_used_at` bumped first, which on
        PostgreSQL locks their rows as `Tree.begin_turn` does (a deletion meanwhile is waited for, and
        seen). A file that is not the owner's ready file any more (read before the transaction, deleted
        since): `file_not_found`."""
        references = [(row["id"], n, file_id) for row in rows for n, file_id in enumerate(row.get("files") or ())]
        wanted = sorted({file_id for _, _, file_id in references})
        for names, ids in _id_batches(wanted):
            bumped = await self.db.fetch_all(
                f"UPDATE files SET last_used_at = :now WHERE id IN ({names}) AND owner = :owner AND status = 'ready'"
                " RETURNING id",
                {**ids, "owner": owner, "now": utcnow()},
                role=WRITE,
            )
            if len(bumped) != len(ids):
                found = {row["id"] for row in bumped}
                raise file_not_found(next(file_id for file_id in ids.values() if file_id not in found))
        for start in range(0, len(references), 300):
            values: dict[str, Any] = {"owner": owner}
            tuples = []
            for n, (message_id, position, file_id) in enumerate(references[start : start + 300]):
                values.update({f"m{n}": message_id, f"p{n}": position, f"f{n}": file_id})
                tuples.append(f"(:owner, :m{n}, :p{n}, :f{n})")
            await self.db.execute(
                f"INSERT INTO message_files (owner, message_id, position, file_id) VALUES {', '.join(tuples)}", values
            )

    async def _insert_columns(self, names: tuple[str, ...], rows: list[dict]) -> None:
        """PostgreSQL, inside a transaction: the rows as one array per column, COPY_CHUNK_MESSAGES rows
        (a copy's chunk) a statement, on the transaction's own asyncpg connection. (As `databases` statements of 100
        rows, building each statement's 1,800 parameters took ~0.15 s of Python: an import of
        100,000 messages took minutes.)"""
        arrays = ", ".join(
            f"${n}::{'integer' if name in _INTEGER_COLUMNS else 'bigint' if name in _BIGINT_COLUMNS else 'text'}[]"
            for n, name in enumerate(names, 1)
        )
        sql = f"INSERT INTO messages ({', '.join(names)}) SELECT * FROM unnest({arrays})"
        for start in range(0, len(rows), COPY_CHUNK_MESSAGES):
            chunk = rows[start : start + COPY_CHUNK_MESSAGES]
            await self.db.execute_numbered(sql, *([row.get(name) for row in chunk] for name in names))


# ── Files: the files owners upload: their bytes, dedup, quotas, references ─────────────
# A file's bytes are `file_chunks` rows of FILE_CHUNK_BYTES, written one short statement each while
# the upload streams in (no transaction is held across an upload: SQLite's one writer serves others
# between chunks), under an 'uploading' row that `finish` makes 'ready' or discards. What a request
# names is looked up within its owner's files: another owner's id behaves as absent (no cross-owner
# dedup either: it would tell one owner, by timing and quota, that someone else stores these bytes);
# `read`, `content` and `model_inputs` take ids their caller has already found so.

FILE_CHUNK_BYTES = 1024 * 1024  # file_chunks rows: each this long but a file's last
STAGED_FILE_SECONDS = 3600  # an 'uploading' row this old is a crashed upload: the collector deletes it
# A file being deleted is first hidden (one short transaction): made 'uploading' with this created_at, so
# that no read, send or finish sees it and any collector takes it for a crashed upload; its chunks are
# then deleted DELETE_PIECE_BYTES a statement, and its row last (`Files._purge`). SQLite has one writer:
# the chunks of 40 files of 20 MiB deleted in one transaction held it 24 s (bench/file_deletes.py).
HIDDEN_AT = "1970-01-01T00:00:00.000Z"
DELETE_PIECE_BYTES = 8 * 1048576
_COLLECTOR_LOCK = 7468373  # PostgreSQL: the advisory lock one replica's collector holds at a time


def _file_columns(alias: str = "") -> str:
    """What a FileRow is read from (`alias`: the files table's in the statement): never the bytes,
    the text or the model copy (only the text's length, stored with it: length(text) would read it)."""
    t = f"{alias}." if alias else ""
    names = ("id", "owner", "sha256", "name", "media_type", "kind", "size", "created_at", "width", "height", "pages")
    rest = ("text_tokens", "text_note", "model_width", "model_height")
    return ", ".join((*(t + n for n in names), f"{t}text_chars", *(t + n for n in rest)))


_FILE_COLUMNS = _file_columns()
# what finish writes of a file's FileFacts (and the estimate of its text's tokens)
_FACT_COLUMNS = ("media_type", "kind", "width", "height", "pages", "text", "text_chars", "text_tokens", "text_note")
_FACT_COLUMNS += ("model_copy", "model_media_type", "model_width", "model_height")
_FACT_SETS = ", ".join(f"{name} = :{name}" for name in _FACT_COLUMNS)


@dataclass(frozen=True)
class FileRow:
    """A stored file's metadata (a `files` row without its bytes, text and model copy)."""

    id: str
    owner: str
    sha256: str
    name: str
    media_type: str
    kind: str  # "image" or "document"
    size: int
    created_at: str
    width: int | None = None  # images
    height: int | None = None
    pages: int | None = None  # PDFs
    text_chars: int | None = None  # documents: length of the extracted text
    text_tokens: int | None = None  # documents: estimate_tokens of that text (what it costs in a context)
    text_note: str | None = None  # "no_text": a document with no text (a scanned PDF)
    model_width: int | None = None  # images: the copy the model is sent
    model_height: int | None = None


_FILE_ROW_FIELDS = tuple(f.name for f in fields(FileRow))


def _file_row(row: dict) -> FileRow:
    return FileRow(**{name: row[name] for name in _FILE_ROW_FIELDS})


def file_not_found(file_id: str) -> FileRefused:
    return FileRefused(404, "file_not_found", f"No file '{file_id}'.")


def _mib(size: int) -> str:
    return f"{size / 1048576:,.1f}".removesuffix(".0")


def storage_full(used: int, quota: int) -> FileRefused:
    detail = f"Your files use {_mib(used)} MiB of {_mib(quota)} MiB (CHATSVC_MAX_STORAGE_BYTES_PER_USER)."
    return FileRefused(413, "storage_full", detail)


def file_in_use(file_id: str, messages: int) -> FileRefused:
    return FileRefused(
        409,
        "file_in_use",
        f"File '{file_id}' is in {messages} message(s); delete those messages or conversations first.",
    )


class Files:
    """The owners' files: staged while their bytes stream in, then ready (deduplicated by owner and
    sha256, counted against the owner's quota), read whole or by range, referenced by messages
    (`message_files`, written by `Tree.begin_turn`), and collected once nothing references them."""

    def __init__(self, db: Database):
        self.db = db

    async def _owner_lock(self, owner: str) -> None:
        """Inside a transaction on PostgreSQL: the owner's files are counted and made ready one
        transaction at a time (an owner without a conversation has no row to lock). SQLite: its write
        transactions already run one at a time."""
        if not self.db.is_sqlite:
            await self.db.execute("SELECT pg_advisory_xact_lock(hashtext('files:' || :owner))", {"owner": owner})

    async def usage(self, owner: str, role: str = READ, besides: str = "") -> int:
        """The bytes the owner stores (staged uploads counted at the size they have been given), but
        file `besides`'s."""
        row = await self.db.fetch_one(
            "SELECT CAST(COALESCE(SUM(size), 0) AS BIGINT) AS used FROM files WHERE owner = :owner AND id != :besides",
            {"owner": owner, "besides": besides},
            role=role,
        )
        return int(row["used"]) if row else 0

    async def begin(self, owner: str, name: str, quota: int) -> str:
        """A new 'uploading' row for an upload about to stream in; its id. Refused at once if the owner's
        files already fill `quota` (0: no limit)."""
        if quota:
            used = await self.usage(owner)
            if used >= quota:
                raise storage_full(used, quota)
        file_id, now = new_message_id(), utcnow()
        await self.db.execute(
            "INSERT INTO files (id, owner, sha256, name, media_type, kind, size, status, created_at, last_used_at)"
            " VALUES (:id, :owner, '', :name, '', 'document', 0, 'uploading', :now, :now)",
            {"id": file_id, "owner": owner, "name": name, "now": now},
        )
        return file_id

    async def write(self, file_id: str, seq: int, data: bytes) -> None:
        """One chunk of a staged file, one statement of its own."""
        await self.db.execute(
            "INSERT INTO file_chunks (file_id, seq, data) VALUES (:id, :seq, :data)",
            {"id": file_id, "seq": seq, "data": data},
        )

    async def read(self, file_id: str, size: int | None = None) -> bytearray:
        """All of a file's bytes (what the examiner reads, once, under its slot), read a chunk at a time
        into one buffer (of `size` bytes, if the caller knows it): reading the rows at once, then joining
        them, held the file three times."""
        data = bytearray(size or 0)
        at = 0
        for seq in itertools.count():
            row = await self.db.fetch_one(
                "SELECT data FROM file_chunks WHERE file_id = :id AND seq = :seq", {"id": file_id, "seq": seq}
            )
            if row is None:
                del data[at:]
                return data
            chunk = row["data"]
            data[at : at + len(chunk)] = chunk
            at += len(chunk)

    async def discard(self, file_id: str) -> None:
        """A staged upload and its chunks, gone (hidden, then deleted a piece at a time: `_purge`); a file
        already ready stays."""
        hidden = await self.db.fetch_one(
            "UPDATE files SET created_at = :hidden WHERE id = :id AND status = 'uploading' RETURNING id",
            {"id": file_id, "hidden": HIDDEN_AT},
            role=WRITE,
        )
        if hidden is not None:
            await self._purge([file_id])

    async def _purge(self, file_ids: Iterable[str]) -> int:
        """Delete these hidden files (staged rows no one reads): their chunks DELETE_PIECE_BYTES a
        statement, each its own transaction, so that no write waits behind a large file's deletion;
        then their rows. How many rows it deleted. What a failure leaves, the collector deletes."""
        rows = max(1, DELETE_PIECE_BYTES // FILE_CHUNK_BYTES)
        deleted = 0
        for file_id in file_ids:
            values = {"id": file_id, "n": rows}
            while True:
                piece = await self.db.fetch_all(
                    "DELETE FROM file_chunks WHERE file_id = :id AND seq IN"
                    " (SELECT seq FROM file_chunks WHERE file_id = :id ORDER BY seq LIMIT :n) RETURNING seq",
                    values,
                    role=WRITE,
                )
                if len(piece) < rows:
                    break
            try:
                gone = await self.db.fetch_one(
                    "DELETE FROM files WHERE id = :id AND status = 'uploading' RETURNING id", values, role=WRITE
                )
            except Exception as exc:
                if _violation(exc) != "foreign_key":
                    raise
                log.error("file %s: a message was written naming it while it was deleted", file_id)
                continue
            deleted += gone is not None
        return deleted

    async def find(self, owner: str, sha256: str) -> FileRow | None:
        """The owner's ready file with these bytes, if it has one, its `last_used_at` bumped: it is being
        handed out again (an upload of the same bytes, an import), and the collector must not take it
        meanwhile (a collector that locked it first has hidden it: None)."""
        row = await self.db.fetch_one(
            f"UPDATE files SET last_used_at = :now WHERE owner = :owner AND sha256 = :sha AND status = 'ready'"
            f" RETURNING {_FILE_COLUMNS}",
            {"owner": owner, "sha": sha256, "now": utcnow()},
            role=WRITE,
        )
        return _file_row(row) if row else None

    async def finish(
        self, file_id: str, owner: str, sha256: str, size: int, facts: FileFacts, quota: int
    ) -> tuple[FileRow, bool]:
        """The staged upload made ready with what the examiner found, in one transaction: (its row,
        True); or, when the owner already has these bytes, that file (its `last_used_at` bumped, the
        staged one discarded) and False. Refused (the staged one discarded) when it would take the
        owner's files past `quota` (0: no limit). Of two finishes of the same bytes at once, one makes
        its row ready and the other answers it (the owner's lock; files_dedup if that was missed)."""
        text = facts.text if facts.kind == "document" else None
        values = {
            "id": file_id,
            "owner": owner,
            "sha": sha256,
            "size": size,
            "now": utcnow(),
            "staged_cutoff": utcnow(STAGED_FILE_SECONDS),
            "media_type": facts.media_type,
            "kind": facts.kind,
            "width": facts.width,
            "height": facts.height,
            "pages": facts.pages,
            "text": facts.text,
            "text_chars": None if text is None else len(text),
            "text_tokens": None if text is None else document_tokens(text),
            "text_note": facts.text_note,
            "model_copy": facts.model_copy,
            "model_media_type": facts.model_media_type,
            "model_width": facts.model_width,
            "model_height": facts.model_height,
        }

        async def ready() -> tuple[FileRow, bool]:
            await self._owner_lock(owner)
            existing = await self.find(owner, sha256)
            if existing is not None:  # the staged copy is deleted after this transaction (`discard`)
                return existing, False
            if quota:
                used = await self.usage(owner, role=WRITE, besides=file_id)
                if used + size > quota:
                    raise storage_full(used, quota)
            made = await self.db.fetch_one(
                f"UPDATE files SET sha256 = :sha, size = :size, status = 'ready', last_used_at = :now, {_FACT_SETS}"
                f" WHERE id = :id AND owner = :owner AND status = 'uploading' AND created_at >= :staged_cutoff"
                f" RETURNING {_FILE_COLUMNS}",
                values,
                role=WRITE,
            )
            if made is None:  # the collector took (or will take) it for a crashed upload: staged over an hour
                raise FileRefused(
                    400, "bad_upload", "The upload took over an hour and was discarded; upload the file again."
                )
            return _file_row(made), True

        try:
            row, created = await self.db.atomically(ready)
        except FileRefused:
            await self.discard(file_id)
            raise
        except Exception as exc:
            if _violation(exc) != "unique":
                raise
        else:
            if not created:
                await self.discard(file_id)
            return row, created
        # another finish of the same bytes, which took no lock (not one of ours), made its row ready first
        await self.discard(file_id)
        winner = await self.find(owner, sha256)
        if winner is None:  # ... and it was deleted since
            raise file_not_found(file_id)
        return winner, False

    async def import_file(
        self, owner: str, name: str, data: bytes, facts: FileFacts, *, quota: int
    ) -> tuple[FileRow, bool]:
        """A file an import brings, stored as an upload is: (the owner's file with these bytes if it has
        one (an import of one's own export reuses its files), False), else (a new one, True), counted
        against `quota` (0: no limit; required, so that no caller forgets it) and written in chunks.
        Called outside a transaction (it runs its own)."""
        sha256 = hashlib.sha256(data).hexdigest()
        existing = await self.find(owner, sha256)
        if existing is not None:
            return existing, False
        file_id = await self.begin(owner, name, quota)
        try:
            for seq, start in enumerate(range(0, len(data), FILE_CHUNK_BYTES)):
                await self.write(file_id, seq, data[start : start + FILE_CHUNK_BYTES])
            return await self.finish(file_id, owner, sha256, len(data), facts, quota)
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.discard(file_id))
            raise

    async def get(self, owner: str, file_id: str) -> FileRow:
        """The owner's ready file; `file_not_found` for any other id."""
        row = await self.db.fetch_one(
            f"SELECT {_FILE_COLUMNS} FROM files WHERE id = :id AND owner = :owner AND status = 'ready'",
            {"id": file_id, "owner": owner},
        )
        if row is None:
            raise file_not_found(file_id)
        return _file_row(row)

    async def page(self, owner: str, limit: int, before: str | None = None) -> list[FileRow]:
        """The owner's ready files, newest first, at most `limit`, those older than file `before` if given."""
        where = " AND id < :before" if before is not None else ""
        rows = await self.db.fetch_all(
            f"SELECT {_FILE_COLUMNS} FROM files WHERE owner = :owner AND status = 'ready'{where}"
            " ORDER BY id DESC LIMIT :limit",
            {"owner": owner, "before": before, "limit": limit},
        )
        return [_file_row(row) for row in rows]

    async def content(self, file_id: str, start: int, end: int) -> AsyncIterator[bytes]:
        """Bytes [start, end) of a ready file, one chunk row read at a time: only the rows the range
        covers, the first and the last cut by the database (`substr`), so a range costs what it
        sends. A file deleted meanwhile: `file_not_found`, after what was sent."""
        for seq in range(start // FILE_CHUNK_BYTES, (end - 1) // FILE_CHUNK_BYTES + 1 if end > start else 0):
            offset = seq * FILE_CHUNK_BYTES
            first, last = max(start - offset, 0), min(end - offset, FILE_CHUNK_BYTES)
            row = await self.db.fetch_one(
                "SELECT substr(c.data, :first, :n) AS data FROM file_chunks c JOIN files f ON f.id = c.file_id"
                " WHERE c.file_id = :id AND c.seq = :seq AND f.status = 'ready'",
                {"id": file_id, "seq": seq, "first": first + 1, "n": last - first},
            )
            if row is None:
                raise file_not_found(file_id)
            yield bytes(row["data"])

    async def references(self, owner: str, file_id: str) -> int:
        """How many messages carry the owner's file."""
        row = await self.db.fetch_one(
            "SELECT COUNT(DISTINCT message_id) AS n FROM message_files WHERE owner = :owner AND file_id = :id",
            {"owner": owner, "id": file_id},
        )
        return int(row["n"]) if row else 0

    async def remove(self, owner: str, file_id: str) -> None:
        """Delete the owner's file and its bytes; refused while a message carries it (`file_in_use`: a
        deleted file must not change what an old message showed). A message written meanwhile that
        names it loses the race to the foreign key, either way round."""
        values = {"owner": owner, "id": file_id}

        async def hide() -> None:
            # PostgreSQL: FOR UPDATE waits for a turn that names it (its reference locks the row), so the
            # count below sees that turn's reference; a turn after it finds the file hidden
            if not await self.db.fetch_one(
                "SELECT id FROM files WHERE id = :id AND owner = :owner AND status = 'ready'"
                + ("" if self.db.is_sqlite else " FOR UPDATE"),
                values,
                role=WRITE,
            ):
                raise file_not_found(file_id)
            using = await self.db.fetch_one(
                "SELECT COUNT(DISTINCT message_id) AS n FROM message_files WHERE file_id = :id", values, role=WRITE
            )
            if using and using["n"]:
                raise file_in_use(file_id, int(using["n"]))
            gone = await self.db.fetch_one(
                "UPDATE files SET status = 'uploading', created_at = :hidden"
                " WHERE id = :id AND owner = :owner AND status = 'ready' RETURNING id",
                {**values, "hidden": HIDDEN_AT},
                role=WRITE,
            )
            if gone is None:
                raise file_not_found(file_id)

        await self.db.atomically(hide)
        await self._purge([file_id])

    async def collect(self, retention_seconds: float, limit: int = 100) -> int:
        """Delete the ready files no message references whose `last_used_at` is more than
        `retention_seconds` old, and uploads staged over STAGED_FILE_SECONDS (a crash's, or files hidden
        for deletion), `limit` at a time until none is left; how many. Each batch is hidden in one short
        transaction, then deleted a piece at a time (`_purge`). PostgreSQL: one replica hides at a time
        (the others find the lock taken and delete nothing)."""
        values = {
            "cutoff": utcnow(retention_seconds),
            "staged_cutoff": utcnow(STAGED_FILE_SECONDS),
            "limit": limit,
            "hidden": HIDDEN_AT,
        }

        def condition(t: str) -> str:
            return (
                f"(({t}.status = 'ready' AND {t}.last_used_at < :cutoff AND NOT EXISTS"
                f" (SELECT 1 FROM message_files m WHERE m.file_id = {t}.id))"
                f" OR ({t}.status = 'uploading' AND {t}.created_at < :staged_cutoff))"
            )

        # PostgreSQL: a file a send, a find or a dedup finish is handing out holds its row lock (its
        # bump of last_used_at, its reference): SKIP LOCKED passes it by, and the outer WHERE, which
        # PostgreSQL checks again on a row changed since the statement began, passes by one bumped
        # meanwhile (a re-check of the subquery alone would not)
        lock = "" if self.db.is_sqlite else " FOR UPDATE OF f SKIP LOCKED"

        async def hide() -> list[str] | None:
            if not self.db.is_sqlite:
                got = await self.db.fetch_one(f"SELECT pg_try_advisory_xact_lock({_COLLECTOR_LOCK}) AS got", role=WRITE)
                if not got or not got["got"]:
                    return None
            rows = await self.db.fetch_all(
                f"UPDATE files SET status = 'uploading', created_at = :hidden WHERE id IN (SELECT f.id FROM files f"
                f" WHERE {condition('f')} LIMIT :limit{lock}) AND {condition('files')} RETURNING id",
                values,
                role=WRITE,
            )
            return [row["id"] for row in rows]

        collected = 0
        while True:
            hidden = await self.db.atomically(hide)
            if hidden is None:
                return collected
            collected += await self._purge(hidden)
            if len(hidden) < limit:
                return collected

    async def of_messages(self, owner: str, message_ids: Iterable[str]) -> dict[str, list[FileRow]]:
        """Each of these messages' files, in their order; messages without files are absent."""
        found: dict[str, list[FileRow]] = {}
        for names, ids in _id_batches(sorted(set(message_ids))):
            rows = await self.db.fetch_all(
                f"SELECT mf.message_id, {_file_columns('f')} FROM message_files mf JOIN files f ON f.id = mf.file_id"
                f" WHERE mf.owner = :owner AND mf.message_id IN ({names}) ORDER BY mf.message_id, mf.position",
                {**ids, "owner": owner},
            )
            for row in rows:
                found.setdefault(row["message_id"], []).append(_file_row(row))
        return found

    async def model_inputs(self, file_ids: Iterable[str]) -> dict[str, tuple[str | None, bytes | None, str | None]]:
        """What the model is sent of each of these files: (a document's text, an image's model copy,
        that copy's media type), computed at upload."""
        found: dict[str, tuple[str | None, bytes | None, str | None]] = {}
        for names, ids in _id_batches(sorted(set(file_ids))):
            rows = await self.db.fetch_all(
                f"SELECT id, text, model_copy, model_media_type FROM files WHERE id IN ({names})", ids
            )
            for row in rows:
                blob = row["model_copy"]
                found[row["id"]] = (row["text"], bytes(blob) if blob is not None else None, row["model_media_type"])
        return found


# ── File contents: what a file is: sniffed by its bytes, checked, its text and model copy ─


@dataclass(frozen=True)
class FileFacts:
    """What `examine` found a file to be: what the store keeps of it besides its bytes."""

    media_type: str
    kind: str  # "image" or "document"
    width: int | None = None
    height: int | None = None
    pages: int | None = None
    text: str | None = None  # documents
    text_note: str | None = None  # "no_text"
    model_copy: bytes | None = field(default=None, repr=False)  # images: PNG or JPEG, scaled
    model_media_type: str | None = None
    model_width: int | None = None
    model_height: int | None = None


TEXT_PIECE_BYTES = 1024 * 1024  # a text is decoded this much at a time (each piece holds the GIL a few ms)
# A progressive JPEG is decoded once a scan: a photo has a few dozen, a hostile file a million (minutes). Inside
# a JPEG's entropy-coded data a 0xFF byte is followed by 0x00, so counting FF DA bytes overcounts only in metadata.
JPEG_MAX_SCANS = 1000
# Longer sides than this many times the shorter are refused: scaled to the model's pixels, such a strip keeps a
# side of one patch and the other past what JPEG can encode (65,500).
MAX_ASPECT = 200
# A small PNG or JPEG is sent to the model as it came, if its bytes are about its pixels: not a 64 by 64 PNG
# carrying 19 MiB in a private chunk, or a JPEG with 19 MiB after its end (re-encoded, they lose that).
KEPT_SLACK_BYTES = 64 * 1024
KEPT_MAX_BYTES = 2 * 1024 * 1024
# A DOCX is a zip: its members, and what its text part expands to, are bounded before anything is read.
DOCX_MAX_MEMBERS = 2000
DOCX_MAX_XML_BYTES = 64 * 1024 * 1024
# Its elements are counted and their nesting bounded as they are parsed: each costs a Python call (~1 µs), and
# 62 KB of zip can hold 16 million of them (15 s). A Word document of 2 million characters has about a million
# (runs, their properties, their text); Word nests tables and text boxes a few dozen deep.
DOCX_MAX_ELEMENTS = 3_000_000
DOCX_MAX_DEPTH = 256
DOCX = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
_WORD = "http://schemas.openxmlformats.org/wordprocessingml/2006/main "  # expat's "namespace local" names

ACCEPTED = (
    "send an image (PNG, JPEG, WebP, GIF), a PDF, a DOCX, or a UTF-8 text file (plain text, Markdown, CSV,"
    " JSON, source code)"
)
# The formats sniffed from their first bytes, their media types, and the Pillow reader that confirms them.
IMAGE_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}
_IMAGE_READERS = {
    "PNG": PngImagePlugin.PngImageFile,
    "JPEG": JpegImagePlugin.JpegImageFile,
    "WEBP": WebPImagePlugin.WebPImageFile,
    "GIF": GifImagePlugin.GifImageFile,
}
_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1")
# An SVG document's root element, <svg> or a prefixed <svg:svg>, found where `svg_root` stops skipping the prolog.
_SVG_ROOT = re.compile(r"<(?:[\w.-]+:)?svg(?![\w.:-])", re.I)
_SPACE = re.compile(r"[\s\ufeff]*")  # a second byte order mark too
_DOCTYPE_END = re.compile(r"\]\s*>")
TEXT_TYPES = {".md": "text/markdown", ".markdown": "text/markdown", ".csv": "text/csv", ".json": "application/json"}
# The characters a name loses, by Unicode category: controls (C0, C1, DEL), format characters (the bidirectional
# marks, embeddings, overrides and isolates, which make "photo\u202egnp.exe" show as "photoexe.png"; zero-width
# characters, the BOM, tags), line and paragraph separators, and lone surrogates (no database stores them).
_NAME_UNWANTED = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})
_EXIF_ORIENTATION = 0x0112
# What turns an image upright, by its EXIF orientation (2 to 8), as ImageOps.exif_transpose does.
_TURNS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

# Pillow warns, rather than raises, about what the checks below decide themselves (an image past its
# pixel limit: the readers are called without Image.open's check, and the size is checked here; a corrupt
# EXIF block: the orientation is then taken as normal). Its warnings are not for the service's log.
warnings.filterwarnings("ignore", module=r"PIL\.")


def clean_name(raw: str) -> str:
    """The name a file is stored and shown under: NFC, the last part of a path (after / or \\), without
    control characters, bidirectional overrides and leading dots (no hidden files, no "../"), at most 255
    bytes of UTF-8 (the limit of every file system a user may save it to), cut at a character and keeping
    a short extension (which says what a text file is). Every format character goes, the joiner inside an emoji
    sequence too (the emoji stay, side by side): one rule, no exceptions to get wrong."""
    name = re.split(r"[/\\]", unicodedata.normalize("NFC", raw))[-1]
    name = "".join(c for c in name if unicodedata.category(c) not in _NAME_UNWANTED)
    name = unicodedata.normalize("NFC", name).strip().lstrip(".").strip()  # a mark may now follow its letter
    if len(name.encode()) > 255:
        stem, dot, extension = name.rpartition(".")
        if not dot or len(extension.encode()) > 16:
            stem, extension = name, ""
        suffix = f".{extension}" if extension else ""
        stem = stem.encode()[: 255 - len(suffix.encode())].decode("utf-8", "ignore").rstrip()
        name = stem + suffix
    if not name:
        raise FileRefused(
            400,
            "bad_file_name",
            "The file name is empty once cleaned (paths, control characters and leading dots are removed);"
            " send a name such as report.pdf.",
        )
    return name


def image_tokens(width: int, height: int) -> int:
    """What an image of this size costs in a Qwen-VL context: one token per 28 by 28 pixels, each side
    rounded up, plus the vision start and end markers, at least 4. (Qwen3-VL counts 32 by 32 pixels: 28
    overestimates by about 30 %, the safe side of a budget.)"""
    return max(4, math.ceil(width / 28) * math.ceil(height / 28) + 2)


def model_size(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """The size of an image's copy for the model: itself if it has at most `max_pixels`, else scaled down
    to fit, each side rounded down to a multiple of 28 (the model's patch: what it is sent is exactly what
    it counts), at least 28, never larger than the image's own side."""
    if width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    w = min(width, max(28, int(width * scale) // 28 * 28))
    h = min(height, max(28, int(height * scale) // 28 * 28))
    if w * h > max_pixels:  # a side held at 28 (a strip): the other gives way
        if w >= h:
            w = min(w, max(28, max_pixels // h // 28 * 28))
        else:
            h = min(h, max(28, max_pixels // w // 28 * 28))
    return w, h


def storable_text(text: str) -> str:
    """Extracted text as every database stores it: NUL and lone surrogates become U+FFFD (storable_json's
    rule)."""
    return _UNSTORABLE.sub("\ufffd", text)


def empty_file(name: str) -> FileRefused:
    return FileRefused(422, "empty_file", f"{name} is empty (0 bytes); send a file with something in it.")


def unsupported(name: str) -> FileRefused:
    return FileRefused(415, "unsupported_file_type", f"{name} is not a type of file chatsvc accepts; {ACCEPTED}.")


def unreadable_document(detail: str) -> FileRefused:
    return FileRefused(422, "document_unreadable", detail)


def document_too_long(detail: str) -> FileRefused:
    return FileRefused(422, "document_too_long", detail)


def examine_text(max_chars: int, name: str, data: bytes) -> FileFacts:
    """`data` as a text document, if it is text (else 415 with what is accepted). Run in a thread of the
    service: the text is decoded a MiB at a time (each piece holds the GIL a few ms), the SVG check is linear.
    Everything else (images, PDF, DOCX, and whether a .json parses) is read in a worker process."""
    decoded = decoded_text(data, max_chars)
    if decoded is None:
        raise unsupported(name)
    text, chars = decoded
    if text is None:
        raise document_too_long(
            f"{name} holds {chars:,} characters; at most {max_chars:,} are kept (CHATSVC_MAX_DOCUMENT_CHARS):"
            " send a part of it."
        )
    return text_facts(name, text)


def is_heif(data: bytes) -> bool:
    return data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS


def sniff_image(data: bytes) -> str | None:
    """The image format `data` starts as (PNG, JPEG, WEBP or GIF), by its signature."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    return None


def image_facts(name: str, data: bytes, image_format: str, max_image_pixels: int, image_max_pixels: int) -> FileFacts:
    """An image, confirmed by Pillow's reader of its format (only its header is read), refused past
    CHATSVC_MAX_IMAGE_PIXELS before a pixel is decoded (a 1 MB PNG can claim 400 megapixels), then decoded:
    the first frame, turned as its EXIF orientation says, scaled for the model (`model_size`) and stored as
    the copy every turn sends. A small PNG or JPEG is sent as it came (unless it carries more bytes than
    its pixels need: KEPT_MAX_BYTES): scaling or re-encoding would only lose detail. A JPEG is decoded
    straight at a fraction of its size (`draft`: a 40-megapixel photo costs a quarter of a second, not a
    second). Run in the worker process (`Examiner`), under CHATSVC_EXTRACT_TIMEOUT: decoders hold the GIL
    (WebP) and cannot be stopped (a JPEG of a million scans)."""
    unreadable = FileRefused(
        422,
        "image_unreadable",
        f"{name} could not be read as a {image_format} image (truncated or corrupt); save it again and send that.",
    )
    too_large = FileRefused(
        422,
        "image_too_large",
        f"{name} has a frame larger than {max_image_pixels:,} pixels (CHATSVC_MAX_IMAGE_PIXELS); send a smaller image.",
    )
    out_of_memory = FileRefused(  # the worker's address space (WORKER_MEMORY_BYTES): a bomb past the checks
        422,
        "image_too_large",
        f"{name} needs more memory to decode than an image may use; send a smaller image.",
    )
    try:
        image = _IMAGE_READERS[image_format](io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):  # a GIF frame larger than its screen
        raise too_large from None
    except Exception:  # Pillow's readers raise SyntaxError, OSError, ValueError, struct.error… on what they refuse
        raise unreadable from None
    if image_format == "JPEG" and data.count(b"\xff\xda") > JPEG_MAX_SCANS:  # start-of-scan markers, an upper bound
        raise FileRefused(
            422,
            "image_unreadable",
            f"{name} is a JPEG of more than {JPEG_MAX_SCANS:,} scans (a photo has at most a few dozen); save it"
            " again and send that.",
        )
    with image:
        width, height = image.size
        if width * height > max_image_pixels:
            raise FileRefused(
                422,
                "image_too_large",
                f"{name} is {width:,} by {height:,} pixels ({width * height:,}); images of at most"
                f" {max_image_pixels:,} pixels are accepted (CHATSVC_MAX_IMAGE_PIXELS).",
            )
        if max(width, height) > MAX_ASPECT * min(width, height):
            raise FileRefused(
                422,
                "image_unreadable",
                f"{name} is {width:,} by {height:,} pixels: one side is more than {MAX_ASPECT} times the other;"
                f" images of at most {MAX_ASPECT}:1 are read (the model sees such a strip as a line): cut it into parts"
                " and send those.",
            )
        if image_format == "PNG":  # its EXIF may follow the pixels: getexif() would load them, swallowing an error
            try:
                image.load()
            except (Image.DecompressionBombError, Image.DecompressionBombWarning):
                raise too_large from None
            except MemoryError:
                raise out_of_memory from None
            except Exception:
                raise unreadable from None
        try:
            orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
        except Exception:  # a corrupt EXIF block: the pixels may still be fine
            orientation = 1
        if orientation not in range(2, 9):
            orientation = 1
        turned = orientation in (5, 6, 7, 8)  # the sides swap
        shown = (height, width) if turned else (width, height)
        target = model_size(*shown, image_max_pixels)
        keep = (
            target == shown
            and orientation == 1
            and len(data) <= min(width * height * 4 + KEPT_SLACK_BYTES, KEPT_MAX_BYTES)
            and (image_format == "PNG" or (image_format == "JPEG" and image.mode in ("RGB", "L")))
        )
        try:
            if image_format == "JPEG" and not keep:
                image.draft(image.mode, target[::-1] if turned else target)
            image.load()
            if keep:
                copy, copy_type = data, IMAGE_TYPES[image_format]
            else:
                copy, copy_type = model_copy(image, orientation, target)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise too_large from None
        except MemoryError:
            raise out_of_memory from None
        except Exception:  # "image file is truncated", a broken data stream…
            raise unreadable from None
    return FileFacts(
        media_type=IMAGE_TYPES[image_format],
        kind="image",
        width=shown[0],
        height=shown[1],
        model_copy=copy,
        model_media_type=copy_type,
        model_width=target[0],
        model_height=target[1],
    )


def model_copy(image: Image.Image, orientation: int, size: tuple[int, int]) -> tuple[bytes, str]:
    """A decoded image as the model is sent it: `size` once turned upright, in PNG if it has transparency or
    a palette (drawings, screenshots, where JPEG blurs edges) and else JPEG at quality 85 (photos). Scaled
    before it is turned, and converted only to change its mode: a 50-megapixel image is not copied whole
    (a 7000 by 7000 RGBA PNG peaked at 680 MiB with a convert to its own mode and a turn at full size)."""
    alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    drawn = alpha or image.mode in ("P", "1")
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):  # 16-bit grey: to 8 bits, not clipped to them
        image = image.convert("I").point(lambda value: value / 256).convert("L")
    mode = "RGBA" if alpha else "L" if image.mode in ("L", "1") else "RGB"
    if image.mode != mode:
        image = image.convert(mode)
    stored = size[::-1] if orientation in (5, 6, 7, 8) else size  # its sides before it is turned
    if image.size != stored:
        # Stretched to the multiples of 28 (by at most 27 pixels a side), as the service itself resizes.
        image = image.resize(stored, Image.Resampling.LANCZOS, reducing_gap=3.0)
    if orientation != 1:
        image = image.transpose(_TURNS[orientation])
    out = io.BytesIO()
    if drawn:
        image.save(out, "PNG")
        return out.getvalue(), "image/png"
    image.save(out, "JPEG", quality=85)
    return out.getvalue(), "image/jpeg"


def decoded_text(data: bytes, max_chars: int) -> tuple[str | None, int] | None:
    """`data` as text if it is text: UTF-8 (with or without a BOM), or UTF-16 with its BOM; never with a
    NUL (which text files do not hold and binary ones do). None if it is not; (None, its length) if it is
    longer than `max_chars` (counted as it is decoded: the pieces of a text too long are not joined, and
    decoding goes on only to tell text from binary). Decoded a MiB at a time: a decode holds the GIL, and
    20 MiB at once would hold the event loop's thread for tens of ms."""
    encoding = "utf-16" if data.startswith((b"\xff\xfe", b"\xfe\xff")) else "utf-8-sig"
    decoder = codecs.getincrementaldecoder(encoding)()
    view, pieces, chars = memoryview(data), [], 0
    try:
        for start in range(0, len(data), TEXT_PIECE_BYTES):
            end = start + TEXT_PIECE_BYTES
            piece = decoder.decode(view[start:end], final=end >= len(data))
            if "\x00" in piece:
                return None
            chars += len(piece)
            if chars <= max_chars:
                pieces.append(piece)
            else:
                pieces.clear()
    except UnicodeDecodeError:
        return None
    if chars > max_chars:
        return None, chars
    return "".join(pieces), chars


def text_facts(name: str, text: str) -> FileFacts:
    """A text document. Its media type comes from its name's extension (text/markdown, text/csv,
    application/json), else text/plain: source code, logs, and HTML too (served as plain text, it never
    runs). A .json is application/json only if it parses: the Examiner checks that in its worker process
    (`json_parses`). An SVG is XML text, but an image that can run scripts: refused."""
    if svg_root(text):
        raise FileRefused(415, "unsupported_file_type", "SVG images are not accepted; send PNG, JPEG, WebP or GIF.")
    if not text:  # a byte order mark and nothing else
        raise empty_file(name)
    media_type = TEXT_TYPES.get(os.path.splitext(name)[1].lower(), "text/plain")
    return FileFacts(media_type=media_type, kind="document", text=text)


def svg_root(text: str) -> bool:
    """Whether `text` is an SVG document: its prolog (white space, processing instructions such as
    <?xml?> and <?xml-stylesheet?>, comments, a DOCTYPE and its internal subset) skipped, however long, then
    an <svg> root, prefixed or not. Each step moves past what it finds with str.find: linear in the text."""
    at = 0
    while True:
        at = _SPACE.match(text, at).end()
        if text.startswith("<?", at):
            end, step = text.find("?>", at + 2), 2
        elif text.startswith("<!--", at):
            end, step = text.find("-->", at + 4), 3
        elif text[at : at + 9].upper() == "<!DOCTYPE":
            bracket, close = text.find("[", at), text.find(">", at)
            if 0 <= bracket < close or (close < 0 <= bracket):  # an internal subset: its "]" and ">" end it
                found = _DOCTYPE_END.search(text, bracket)
                end, step = (found.end(), 0) if found else (-1, 0)
            else:
                end, step = close, 1
        else:
            return _SVG_ROOT.match(text, at) is not None
        if end < 0:  # a prolog that never ends: not a document anything renders
            return False
        at = end + step


def json_parses(data: bytes) -> bool:
    """Whether `data` (UTF-8, or UTF-16 with its BOM) is JSON: run in the document worker, because
    json.loads holds the GIL throughout (a second for 20 MiB)."""
    try:
        json.loads(data)
    except (ValueError, RecursionError):  # a .json that is not JSON is still text
        return False
    return True


def docx_facts(name: str, data: bytes, max_chars: int) -> FileFacts:
    """A DOCX (a zip holding word/document.xml) and its text: the paragraphs of the body, one a line,
    read with the standard library (python-docx would add lxml for what one streaming parse does). The zip
    is bounded before its text part is read (members, declared and actual expanded size: a zip bomb stops
    at the bound), and a DTD is refused (Word never writes one; entities declared in it expand). Run in the
    worker process: expat's Python callbacks hold the GIL."""
    members = zip_members(data)
    if members is not None and members > DOCX_MAX_MEMBERS:
        raise unreadable_document(
            f"{name} holds {members:,} files, more than a Word document does (at most {DOCX_MAX_MEMBERS:,} are"
            " read); send a smaller document."
        )
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        if name.lower().endswith(".docx"):
            raise unreadable_document(
                f"{name} could not be read as a DOCX (it is damaged); save it again and send that."
            ) from None
        raise unsupported(name) from None
    with archive:
        try:
            part = archive.getinfo("word/document.xml")
        except KeyError:
            raise unsupported(name) from None
        if len(archive.infolist()) > DOCX_MAX_MEMBERS or part.file_size > DOCX_MAX_XML_BYTES:
            raise unreadable_document(
                f"{name} expands to more than a Word document does ({len(archive.infolist()):,} files, a text part"
                f" of {part.file_size:,} bytes; at most {DOCX_MAX_MEMBERS:,} files and {DOCX_MAX_XML_BYTES:,} bytes"
                " are read); send a smaller document."
            )
        paragraphs = _DocxText(name, max_chars)
        try:
            with archive.open(part) as member:
                expanded = 0
                while piece := member.read(1024 * 1024):
                    expanded += len(piece)
                    if expanded > DOCX_MAX_XML_BYTES:  # more than its header declared
                        raise unreadable_document(
                            f"{name}'s text part expands past {DOCX_MAX_XML_BYTES:,} bytes; send a smaller document."
                        )
                    paragraphs.parser.Parse(piece, False)
                paragraphs.parser.Parse(b"", True)
        except FileRefused:
            raise
        except Exception:  # BadZipFile (a CRC), expat.ExpatError, zlib.error, an encrypted or unknown compression
            raise unreadable_document(
                f"{name} could not be read as a DOCX (it is damaged); save it again and send that."
            ) from None
    return FileFacts(media_type=DOCX, kind="document", text=storable_text("\n".join(paragraphs.lines)))


def zip_members(data: bytes) -> int | None:
    """The number of files a zip declares in its end of central directory record (its zip64 record's if it
    has one), read before zipfile parses a directory entry (which takes ~0.7 µs each, 230,000 of them in a
    4 MiB zip); None without such a record (zipfile then says the zip is broken)."""
    at = data.rfind(b"PK\x05\x06", max(0, len(data) - 22 - 65535))  # after it, a comment of at most 64 KiB
    if at < 0 or len(data) < at + 22:
        return None
    count = int.from_bytes(data[at + 10 : at + 12], "little")
    if at >= 20 and data[at - 20 : at - 16] == b"PK\x06\x07":  # a zip64 locator: the record it points at counts
        record = int.from_bytes(data[at - 12 : at - 4], "little")
        if data[record : record + 4] == b"PK\x06\x06":
            count = int.from_bytes(data[record + 32 : record + 40], "little")
    return count


class _DocxText:
    """The handlers of one streaming parse of word/document.xml: the text runs (`w:t`, tabs and breaks)
    of each paragraph (`w:p`, a table cell's too); a paragraph inside another (a text box) is its own line."""

    def __init__(self, name: str, max_chars: int):
        self.name, self.max_chars, self.chars = name, max_chars, 0
        self.elements = self.depth = 0
        self.lines: list[str] = []
        self.open: list[list[str]] = []
        self.in_text = False
        self.parser = expat.ParserCreate(namespace_separator=" ")
        self.parser.StartDoctypeDeclHandler = self.doctype
        self.parser.StartElementHandler = self.start
        self.parser.EndElementHandler = self.end
        self.parser.CharacterDataHandler = self.data

    def doctype(self, *_: Any) -> None:
        raise unreadable_document(
            f"{self.name} holds a DTD (<!DOCTYPE>), which Word never writes; save it again from a word processor"
            " and send that."
        )

    def start(self, tag: str, _attributes: dict) -> None:
        self.elements += 1
        self.depth += 1
        if self.elements > DOCX_MAX_ELEMENTS or self.depth > DOCX_MAX_DEPTH:
            raise unreadable_document(
                f"{self.name} holds more XML elements than a Word document does (more than {DOCX_MAX_ELEMENTS:,},"
                f" or nested more than {DOCX_MAX_DEPTH} deep); save it again from a word processor and send that."
            )
        if tag == _WORD + "p":
            self.open.append([])
        elif tag == _WORD + "t":
            self.in_text = True
        elif tag in (_WORD + "tab", _WORD + "br", _WORD + "cr") and self.open:
            self.add("\t" if tag.endswith("tab") else "\n")

    def end(self, tag: str) -> None:
        self.depth -= 1
        if tag == _WORD + "t":
            self.in_text = False
        elif tag == _WORD + "p" and self.open:
            self.count(1 if self.lines else 0)  # the newline before it
            self.lines.append("".join(self.open.pop()))

    def data(self, text: str) -> None:
        if self.in_text and self.open:
            self.add(text)

    def add(self, text: str) -> None:
        self.count(len(text))
        self.open[-1].append(text)

    def count(self, chars: int) -> None:
        """The text so far, as long as it may be (the lines' text and the newlines between them)."""
        self.chars += chars
        if self.chars > self.max_chars:
            raise document_too_long(
                f"{self.name} holds more than {self.max_chars:,} characters; at most that many are kept"
                " (CHATSVC_MAX_DOCUMENT_CHARS): send a part of it."
            )


def pdf_text(name: str, data: bytes, max_pages: int, max_chars: int) -> tuple[str, int, str | None]:
    """A PDF's text, pages and note ("no_text": pages without any text, a scan), with pypdf; run in the
    document worker process (`Examiner`), under its deadline. Each page's text follows a line `[page N]`
    so the model can say where something is, and a person can check it; the page count is bounded before
    the pages are walked (a PDF may claim 100,000 pages), the text as it grows. pypdf's own limits (a
    flate bomb, a cyclic page tree, a broken cross-reference) end as document_unreadable."""
    import pypdf  # only the worker reads PDFs: the service itself does not import pypdf

    try:
        reader = pypdf.PdfReader(io.BytesIO(data), strict=False)
        if reader.is_encrypted and not reader.decrypt(""):
            raise unreadable_document(f"{name} is protected by a password; send a copy without one.")
        try:
            count = int(reader.root_object["/Pages"]["/Count"])  # what the PDF claims, before a page is read
        except Exception:
            count = 0
        if count <= max_pages:
            count = len(reader.pages)  # the page tree walked: the claim may lie
        if count > max_pages:
            raise document_too_long(
                f"{name} has {count:,} pages; at most {max_pages:,} are read (CHATSVC_MAX_DOCUMENT_PAGES):"
                " send a part of it."
            )
        parts: list[str] = []
        chars, any_text = 0, False
        for number, page in enumerate(reader.pages, 1):
            text = storable_text(page.extract_text() or "").strip()
            any_text = any_text or bool(text)
            parts.append(f"[page {number}]\n{text}")
            chars += len(parts[-1]) + 2
            if chars > max_chars:
                raise document_too_long(
                    f"{name} holds more than {max_chars:,} characters of text by page {number} of {count:,};"
                    f" at most {max_chars:,} are kept (CHATSVC_MAX_DOCUMENT_CHARS): send a part of it."
                )
    except FileRefused:
        raise
    except pypdf.errors.DependencyError:  # AES without the `cryptography` package (pypdf[crypto])
        raise unreadable_document(
            f"{name} is encrypted in a way this service cannot read (AES); print or save it to a PDF without"
            " protection and send that."
        ) from None
    except Exception:  # PdfReadError, LimitReachedError, PdfStreamError, RecursionError, KeyError…
        raise unreadable_document(
            f"{name} could not be read as a PDF (it is damaged, or a part of it expands past the reader's limits);"
            " print or save it to a new PDF and send that."
        ) from None
    if not any_text:
        return "", count, "no_text"
    return "\n\n".join(parts), count, None


# ── Examiner: the worker processes files are read in, a slot at a time ────────────────

# How many files are examined at once in one process. An examination holds the file's bytes (up to
# CHATSVC_MAX_FILE_BYTES) and, for an image, its decoded pixels (up to CHATSVC_MAX_IMAGE_PIXELS times 4 bytes):
# memory is bounded by these slots, not by the uploads in flight. Each slot uses one worker process at a time.
EXAMINATIONS = 2
# The address space a worker process may use: a 50-megapixel RGBA image and its copies fit (~0.7 GiB); a bomb
# that gets past the checks ends as a MemoryError in the worker (422), not in the service or the machine's OOM.
WORKER_MEMORY_BYTES = 1536 * 1024 * 1024
# In a job sent to a worker, the place of bytes sent after it as they are (no file name holds a NUL).
BYTES_FOLLOW = "\x00bytes follow"
# The document worker imports this module before it answers: that is not the document's time.
WORKER_START_SECONDS = 60.0


def document_worker(fd: int) -> None:
    """A worker process (named "document worker" in logs, as it was when it read only PDFs): it answers jobs
    `(task, *arguments)` (WORKER_TASKS: PDF, DOCX, images, JSON) on the connection `fd` with their outcome
    until the connection closes. A process, not a thread, because decoders hold the GIL (pypdf's pure-Python
    loops, expat's callbacks, WebP, json.loads) and cannot be stopped: a file that runs past
    CHATSVC_EXTRACT_TIMEOUT is ended by killing its process. Its address space is bounded (WORKER_MEMORY_BYTES)."""
    import resource  # (POSIX only, as the worker is)

    conn = multiprocessing.connection.Connection(fd)
    limit = resource.getrlimit(resource.RLIMIT_AS)[1]
    limit = WORKER_MEMORY_BYTES if limit == resource.RLIM_INFINITY else min(limit, WORKER_MEMORY_BYTES)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))  # a bomb past the checks: a MemoryError here, not the OOM
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C is for the service, which ends this
    logging.getLogger("pypdf").setLevel(logging.CRITICAL + 1)  # its warnings about damaged files are ours
    warnings.simplefilter("ignore")
    threading.Thread(target=_end_with_parent, args=(os.getppid(),), daemon=True).start()
    with contextlib.suppress(EOFError, OSError):  # the service closed the connection, or is gone
        conn.send("ready")
        while True:
            job = tuple(conn.recv_bytes() if part == BYTES_FOLLOW else part for part in conn.recv())
            try:
                outcome = ("ok", WORKER_TASKS[job[0]](*job[1:]))
            except FileRefused as exc:
                outcome = ("refused", exc.status, exc.code, exc.detail)
            except Exception as exc:  # MemoryError: this process is still fine, and the next file too
                outcome = ("failed", type(exc).__name__)
            conn.send(outcome)


def _end_with_parent(parent: int) -> None:
    """The worker's watch: a service killed outright (SIGKILL, a crash) cannot kill its worker, which may be in
    the middle of a PDF that never ends; it ends itself once its parent is gone."""
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(0)


WORKER_TASKS: dict[str, Callable[..., Any]] = {
    "pdf": pdf_text,
    "json": json_parses,
    "image": image_facts,
    "docx": docx_facts,
}


# The worker is a new interpreter that imports this module from the service's own path, and nothing else:
# not a fork (a copy of a running event loop and its threads), and not multiprocessing's spawn, which also
# runs the service's __main__ again (a console script, pytest, or stdin, which it cannot).
WORKER_CODE = (
    "import json, sys; sys.path[:] = json.loads(sys.argv[2]); import chatsvc; chatsvc.document_worker(int(sys.argv[1]))"
)


class _Worker:
    """One document worker process and the parent's end of its connection (a socket pair, pickled messages)."""

    def __init__(self) -> None:
        self.conn, child = multiprocessing.connection.Pipe()
        with child:
            fd = child.fileno()
            self.process = subprocess.Popen(
                [sys.executable, "-c", WORKER_CODE, str(fd), json.dumps(sys.path)],
                stdin=subprocess.DEVNULL,
                pass_fds=[fd],
            )

    def exchange(self, job: tuple) -> Any:
        """The job's outcome. A file's bytes go as they are, after the pickled job that names their place
        (BYTES_FOLLOW): pickling them would copy a file of up to CHATSVC_MAX_FILE_BYTES once more per slot."""
        data = [part for part in job if isinstance(part, (bytes, bytearray))]
        self.conn.send(tuple(BYTES_FOLLOW if isinstance(part, (bytes, bytearray)) else part for part in job))
        for part in data:
            self.conn.send_bytes(part)
        return self.conn.recv()

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """Killed, not asked: it may be in the middle of a PDF that never ends."""
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()

    def end(self) -> None:
        self.kill()
        self.process.wait()
        self.conn.close()


class Examiner:
    """What uploaded files are (`examine`), at most EXAMINATIONS at a time in this process. Text is decoded in a
    thread of the service; everything else (images, PDF, DOCX, and whether a .json parses) is read in a worker
    process, one per slot at most, started when first needed and killed when a file runs past
    CHATSVC_EXTRACT_TIMEOUT (the next file starts a new one). Decoders hold the GIL (WebP, expat, pypdf) and
    cannot be stopped (a JPEG of a million scans): in a process of their own, under an address-space limit
    (WORKER_MEMORY_BYTES), they neither hold the event loop nor a slot past the deadline, and a bomb past the
    checks ends there. One per app (app.state.examiner), closed with it."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._slots = asyncio.Semaphore(EXAMINATIONS)
        self._idle: list[_Worker] = []  # started, waiting for a file
        self._busy: set[_Worker] = set()

    async def examine(self, name: str, load: Callable[[], Awaitable[bytes]]) -> FileFacts:
        """The facts of the file `load()` gives, or FileRefused (design 2.4's codes). `load` is awaited in
        the slot: the bytes of the uploads waiting for one are not yet in memory. `name` (cleaned) is only
        for the refusals' details and a text's media type: the bytes decide what the file is (sniffed, never
        the type or the name a client declares)."""
        settings = self.settings
        async with self._slots:
            data = await load()
            if not data:
                raise empty_file(name)
            if data.startswith(b"%PDF-"):
                job = ("pdf", name, data, settings.max_document_pages, settings.max_document_chars)
                text, pages, note = await self._in_worker(name, "document", job)
                return FileFacts(media_type="application/pdf", kind="document", pages=pages, text=text, text_note=note)
            image_format = sniff_image(data)
            if image_format:
                job = ("image", name, data, image_format, settings.max_image_pixels, settings.image_max_pixels)
                return await self._in_worker(name, "image", job)
            if is_heif(data):
                raise FileRefused(
                    415,
                    "unsupported_file_type",
                    "HEIC/HEIF images are not supported yet; send the photo as JPEG or PNG.",
                )
            if data.startswith(b"PK\x03\x04"):
                return await self._in_worker(name, "document", ("docx", name, data, settings.max_document_chars))
            facts = await asyncio.to_thread(examine_text, settings.max_document_chars, name, data)
            if facts.media_type == "application/json" and not await self._in_worker(name, "document", ("json", data)):
                return FileFacts(media_type="text/plain", kind="document", text=facts.text)
            return facts

    async def _in_worker(self, name: str, kind: str, job: tuple) -> Any:
        """The outcome of `job` in a worker process of this slot, within CHATSVC_EXTRACT_TIMEOUT. `kind`
        ("image" or "document") is what a refusal says the file could not be read as."""
        timeout = self.settings.extract_timeout
        code, what = ("image_unreadable", "an image") if kind == "image" else ("document_unreadable", "a document")
        worker = await self._take()
        try:
            outcome = await asyncio.wait_for(asyncio.to_thread(worker.exchange, job), timeout)
        except asyncio.TimeoutError:
            await self._end(worker)  # (never the file's name in a log: design 2.11)
            log.warning("document worker killed: a %s ran past %g s (CHATSVC_EXTRACT_TIMEOUT)", job[0], timeout)
            reading = f"Reading {name}" if kind == "image" else f"Reading the text of {name}"
            raise FileRefused(
                422,
                code,
                f"{reading} took longer than {timeout:g} s (CHATSVC_EXTRACT_TIMEOUT), so it was stopped; send a"
                f" smaller or simpler {kind}, or a part of it."
                if kind == "document"
                else f"{reading} took longer than {timeout:g} s (CHATSVC_EXTRACT_TIMEOUT), so it was stopped; send"
                " a smaller or simpler image.",
            ) from None
        except (EOFError, OSError):  # the worker died: killed by the system (its memory?), or closed
            await self._end(worker)
            log.warning("document worker ended during a %s (killed by the system: out of memory?)", job[0])
            raise FileRefused(
                422, code, f"Reading {name} stopped unexpectedly; send a smaller or simpler {kind}."
            ) from None
        except BaseException:  # cancelled (the upload's client left): the worker may be busy for long
            await self._end(worker)
            raise
        self._busy.discard(worker)
        self._idle.append(worker)
        if outcome[0] == "refused":
            raise FileRefused(*outcome[1:])
        if outcome[0] == "failed":  # MemoryError (WORKER_MEMORY_BYTES), or what no check foresaw
            raise FileRefused(422, code, f"{name} could not be read as {what} ({outcome[1]}); send a smaller one.")
        return outcome[1]

    async def _take(self) -> _Worker:
        """An idle worker, or a new one: each slot uses one at a time, so there are at most EXAMINATIONS."""
        while self._idle:
            worker = self._idle.pop()
            if worker.alive():
                self._busy.add(worker)
                return worker
            await asyncio.to_thread(worker.end)
        worker = await asyncio.to_thread(_Worker)
        self._busy.add(worker)
        try:  # it imports this module first: not counted in a file's time
            await asyncio.wait_for(asyncio.to_thread(worker.conn.recv), WORKER_START_SECONDS)
        except (asyncio.TimeoutError, EOFError, OSError) as exc:
            await self._end(worker)
            raise RuntimeError(f"the document worker process did not start ({type(exc).__name__})") from exc
        except BaseException:
            await self._end(worker)
            raise
        log.info("document worker started (pid %d)", worker.process.pid)
        return worker

    async def _end(self, worker: _Worker) -> None:
        self._busy.discard(worker)
        worker.kill()  # at once, whatever happens to this task next
        await asyncio.to_thread(worker.end)

    async def close(self) -> None:
        """Ends the worker processes, and the files they are reading (their examinations end unreadable)."""
        workers, self._idle = [*self._idle, *self._busy], []
        for worker in workers:
            worker.kill()
        for worker in workers:
            await self._end(worker)


# ── Answer rows: a running answer's checkpoints and heartbeat, its final state ─────────

# Run by the heartbeat's own connection (asyncpg, numbered parameters): which of these answers are
# still `streaming` (as committed: the others were taken), and those not locked at this moment get
# the beat. It never waits for a row lock: a row locked now is being written (its checkpoint, which
# moves `updated_at` itself, or its end, or another process's verdict). Waiting would hold the beat
# past HEARTBEAT_MISSES intervals, and the checkpoint's batch, one transaction locking its rows in
# another order, made a cycle with it that PostgreSQL broke only after its deadlock_timeout (1 s).
# Each row is beaten only while it is its producer's: `streaming` with the generation it writes
# ($2, by position; NULL while its row is being claimed, not known yet: any).
_VOUCHED = (
    "FROM messages m JOIN unnest($1::text[], $2::int[]) AS own (id, generation) ON m.id = own.id"
    " WHERE m.status = 'streaming' AND (own.generation IS NULL OR m.continued = own.generation)"
)
HEARTBEAT_SQL = (
    f"WITH beat AS (UPDATE messages SET updated_at = {PG_NOW} WHERE id IN (SELECT m.id {_VOUCHED}"
    f" FOR UPDATE OF m SKIP LOCKED) RETURNING id) SELECT m.id {_VOUCHED}"
)

# A `streaming` row's heartbeat is written inside its turn's transaction and seen by the other processes
# only once that commits. PostgreSQL: a turn whose transaction still runs TURN_STORE_SECONDS after it
# wrote the heartbeat is rolled back (beat_in_time), and its COMMIT fails after PG_COMMAND_SECONDS; its
# process beats it within an interval of the commit. So a heartbeat older than dead_at_sight() by the
# server's clock belongs to a process gone, whenever a process reads it (Replicas.recover). A younger
# one is judged only on time its process could beat in: three intervals watched unchanged.
TURN_STORE_SECONDS = 10.0


def dead_at_sight(heartbeat_seconds: float) -> float:
    """The age past which a `streaming` answer's heartbeat cannot be a living process's (50 s by
    default): a turn's body, its COMMIT, its first beat, and an interval more for the event loop."""
    return TURN_STORE_SECONDS + PG_COMMAND_SECONDS + 2 * heartbeat_seconds


def beat_in_time(db: Database, stamped: float) -> None:
    """PostgreSQL, last in a turn's transaction that wrote an answer's heartbeat at `stamped`
    (time.monotonic()): StorageUnavailable, which rolls it back, once TURN_STORE_SECONDS have passed
    (a storage fault of the kind `timeout`)."""
    if not db.is_sqlite and time.monotonic() - stamped > TURN_STORE_SECONDS:
        db.metrics.storage_faults.labels("timeout").inc()
        raise StorageUnavailable(
            f"The database took more than {TURN_STORE_SECONDS:g} s to store this turn; nothing of it was kept."
            " Try again in a moment."
        )


# The id of the final event of an answer interrupted because its process was gone (`last_seq`): no
# event that process sent has it, so a reader that resumes after any of them is sent this end. A
# continued answer's: its checkpoint's seq plus this (its ids went on past its earlier parts').
INTERRUPTED_SEQ = 2**31 - 1
INTERRUPTED_DETAIL = "The service stopped before this answer was finished."


@dataclass
class Checkpoint:
    """A running answer's text so far: events 0 to seq - 1 of its log carry exactly this."""

    answer_id: str
    content: str
    reasoning: str | None
    seq: int
    # the JSON text of all its tool steps so far; None: unchanged since the last checkpoint (the
    # stored tool_steps stay as they are)
    steps: str | None = None
    sources: str | None = None  # its sources as JSON, once they came (None: none yet, or stored already)
    generation: int = 0  # its producer's: the row's `continued` while that producer writes it (Answer.generation)


@dataclass
class FinalState:
    """An answer's last write."""

    status: str
    content: str
    reasoning: str | None
    finish_reason: str | None
    usage: dict | None
    error_code: str | None
    error_message: str | None
    last_seq: int
    steps: str | None = None  # the JSON text of all its tool steps (None: it has none)
    call_id: str | None = None  # its last model call's usage_calls row, settled with this write
    spent: Spent | None = None  # ... with what that call used
    # the rounds before it whose rows are not known to be settled (a write between two rounds failed,
    # or went unconfirmed), each its row and what it used: settled with it (Usage.settle_answer)
    carried: list[tuple[str, Spent]] = field(default_factory=list)
    cost: Cost | None = None  # what all its calls cost (None: no prices, or its model has none)
    sources: str | None = None  # a searched answer's sources, as JSON (None: none came)
    searches: int | None = None  # ... and its searches, when reported
    generation: int = 0  # its producer's (Checkpoint.generation)


# AnswerRows.checkpoint: an answer's row (id, content, reasoning, seq, steps, sources, generation),
# written while it is its producer's; its steps and sources only when given (None: as they are).
_CHECKPOINT_SQLITE = (
    "UPDATE messages SET content = :content, reasoning_content = :reasoning, last_seq = :seq,"
    " tool_steps = COALESCE(:steps, tool_steps), sources = COALESCE(:sources, sources), updated_at = :now"
    " WHERE id = :id AND status = 'streaming' AND continued = :generation RETURNING id"
)
_CHECKPOINT_POSTGRES = (
    "WITH v AS (SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[], $6::text[],"
    " $7::int[]) AS r (v_id, v_content, v_reasoning, v_seq, v_steps, v_sources, v_generation))"
    " UPDATE messages SET content = v_content, reasoning_content = v_reasoning, last_seq = v_seq,"
    " tool_steps = COALESCE(v_steps, tool_steps), sources = COALESCE(v_sources, sources),"
    f" updated_at = {PG_NOW} FROM v WHERE id = v_id AND status = 'streaming' AND continued = v_generation RETURNING id"
)


class AnswerRows:
    """Answers' rows while they are written: which are `streaming`, their checkpoints, their final
    state, and the verdict on those whose process is gone.

    A row is written by one producer at a time, named by the row's `continued` count (its
    generation): the answer's own (0), then each continuation's. A producer's checkpoints, heartbeat
    and final write touch the row only while it is `streaming` with its generation: one that another
    process took for dead, whose answer was then continued, no longer writes over the continuation."""

    def __init__(self, db: Database, usage: Usage):
        self.db, self.usage = db, usage

    async def streaming_id(self, owner: str, session_id: str) -> str | None:
        """The conversation's `streaming` answer, if it has one."""
        row = await self.db.fetch_one(
            "SELECT id FROM messages WHERE owner = :owner AND session_id = :sid AND status = 'streaming'",
            {"owner": owner, "sid": session_id},
        )
        return row["id"] if row else None

    async def streaming(self, answer_ids: list[str]) -> set[str]:
        """Which of these answers are still `streaming`."""
        found: set[str] = set()
        for names, ids in _id_batches(answer_ids):
            rows = await self.db.fetch_all(
                f"SELECT id FROM messages WHERE status = 'streaming' AND id IN ({names})", ids
            )
            found.update(row["id"] for row in rows)
        return found

    def _stale(self, seconds: float) -> tuple[str, Any]:
        """The SQL of "a heartbeat more than `seconds` old", by the clock that wrote it (PostgreSQL: the
        server's), and the value of its `:stale`."""
        if self.db.is_sqlite:
            return "updated_at < :stale", utcnow(seconds)
        return f"updated_at < {PG_STALE}", float(seconds)

    async def heartbeats(self, old: float) -> dict[str, tuple[str, bool]]:
        """Every `streaming` answer's heartbeat (`updated_at`), by id, and whether it is more than `old`
        seconds old (_stale)."""
        stale, value = self._stale(old)
        rows = await self.db.fetch_all(
            f"SELECT id, updated_at, CASE WHEN {stale} THEN 1 ELSE 0 END AS old FROM messages"
            " WHERE status = 'streaming'",
            {"stale": value},
        )
        return {row["id"]: (row["updated_at"], bool(row["old"])) for row in rows}

    async def recover_interrupted(
        self, stale_after: float | None, own: list[str] = (), only: list[str] | None = None
    ) -> list[dict]:
        """Answers still `streaming` whose heartbeat (`updated_at`) is more than `stale_after` seconds
        old (all of them, for None), by the clock that wrote it (PostgreSQL: the server's): the process
        producing them is gone. They become `interrupted`, keeping their text, and their calls still
        reserved in the ledger are settled with an estimate from that text, in the same transaction
        (Usage.settle_swept): no reservation outlives its answer; with prices, each stored message gets
        what all its calls cost. This process's `own` answers are never among them, and with `only`,
        none but those. Each row: id, owner, session_id, content, reasoning_content, tool_steps, and
        `spent`: what its calls settled now used, [(model, Spent)], for the metrics (count_swept)."""
        where, values = "", {"now": utcnow(), "end_seq": INTERRUPTED_SEQ, "detail": INTERRUPTED_DETAIL}
        if stale_after is not None:
            stale, values["stale"] = self._stale(stale_after)
            where = f" AND {stale}"
        for names, ids in _id_batches(list(own), 100_000):
            where += f" AND id NOT IN ({names})"
            values.update(ids)
        if only is not None:  # a few (Replicas.recover's, 500 at a time)
            if not only:
                return []
            [(names, ids)] = _id_batches(list(only), len(only), "only")
            where += f" AND id IN ({names})"
            values.update(ids)

        async def sweep() -> list[dict]:
            rows = await self.db.fetch_all(
                "UPDATE messages SET status = 'interrupted', error_code = 'interrupted', error_message = :detail,"
                " last_seq = CASE WHEN continued > 0 THEN COALESCE(last_seq, 0) + :end_seq ELSE :end_seq END,"
                f" updated_at = {self.db.heartbeat_now} WHERE status = 'streaming'{where}"
                " RETURNING id, owner, session_id, content, reasoning_content, tool_steps",
                values,
                role=WRITE,
            )
            if not rows:
                return rows
            spent: dict[str, list[tuple[str, Spent]]] = {}
            for answer_id, model, used in await self.usage.settle_swept(rows):
                spent.setdefault(answer_id, []).append((model, used))
            await self._write_costs(await self.usage.costs([row["id"] for row in rows]))
            return [{**row, "spent": spent.get(row["id"], [])} for row in rows]

        return await self.db.atomically(sweep)

    async def _write_costs(self, costs: dict[str, Cost]) -> None:
        """Inside the sweep's transaction: each answer's cost on its message (500 a statement)."""
        items = list(costs.items())
        for start in range(0, len(items), 500):
            values: dict[str, Any] = {}
            rows = []
            for n, (answer_id, cost) in enumerate(items[start : start + 500]):
                values.update({f"i{n}": answer_id, f"c{n}": cost.micros, f"u{n}": cost.currency})
                rows.append(f"(CAST(:i{n} AS TEXT), CAST(:c{n} AS BIGINT), CAST(:u{n} AS TEXT))")
            await self.db.execute(
                f"WITH v (v_id, v_cost, v_currency) AS (VALUES {', '.join(rows)}) UPDATE messages SET"
                " cost_micros = v_cost, currency = v_currency FROM v WHERE id = v_id",
                values,
            )

    async def checkpoint(self, checkpoints: list[Checkpoint]) -> set[str]:
        """The running answers' texts so far, each row only while it is still its producer's
        (`streaming`, with its generation); the ids of the rows it wrote. SQLite: a statement for each
        answer, all in one hop to the background connection (prepared once: a single UPDATE ... FROM
        for them all cost 2 to 5 times more); PostgreSQL: one statement, whose text is the same for any
        number of answers (its rows are arrays), so it is prepared once too. A row's heartbeat is when
        it is written (PostgreSQL: the server's clock, as it writes the row)."""
        if not checkpoints:
            return set()
        rows = [(cp.answer_id, cp.content, cp.reasoning, cp.seq, storable_json(cp.steps), cp.sources, cp.generation)
                for cp in checkpoints]  # fmt: skip
        if self.db.is_sqlite:
            now, names = utcnow(), ("id", "content", "reasoning", "seq", "steps", "sources", "generation")
            each = [({**dict(zip(names, row, strict=True)), "now": now}, Later()) for row in rows]
            await self.db.fetch_each(_CHECKPOINT_SQLITE, each, BACKGROUND)
            return {row[0] for row, (_, later) in zip(rows, each, strict=True) if later.rows}
        columns = [list(column) for column in zip(*rows, strict=True)]
        written = await self.db.fetch_numbered(_CHECKPOINT_POSTGRES, *columns, role=BACKGROUND)
        return {row["id"] for row in written}

    async def finish(self, answer_id: str, final: FinalState) -> bool:
        """The answer's final state, written once, whatever ended it, and its calls still reserved
        settled in the ledger (`final.call_id` and `final.carried`: Usage.settle_answer), in one
        transaction. False if the answer is no longer `streaming` with `final.generation`: another
        process took it for dead and stored its verdict, which stands (and settled its calls), and the
        answer may have been continued since; or its conversation was deleted (which settled them too).
        Its own rounds are settled all the same, those still reserved (none, unless a round was reserved
        after that: they are its own to settle); the answer's other calls are then not its own."""
        usage = final.usage or {}
        update = (
            "UPDATE messages SET content = :content, reasoning_content = :reasoning, status = :status,"
            " finish_reason = :finish_reason, error_code = :error_code, error_message = :error_message,"
            " prompt_tokens = :prompt_tokens, completion_tokens = :completion_tokens, total_tokens = :total_tokens,"
            " reasoning_tokens = :reasoning_tokens, cached_tokens = :cached_tokens, cost_micros = :cost,"
            f" currency = :currency, last_seq = :last_seq, tool_steps = :steps, sources = COALESCE(:sources, sources),"
            f" searches = COALESCE(:searches, searches), updated_at = {self.db.heartbeat_now}"
            " WHERE id = :id AND status = 'streaming' AND continued = :generation RETURNING id"
        )
        values = {
            "content": final.content,
            "reasoning": final.reasoning,
            "status": final.status,
            "finish_reason": final.finish_reason,
            "error_code": final.error_code,
            "error_message": final.error_message,
            "prompt_tokens": usage.get("prompt_tokens"),
            "completion_tokens": usage.get("completion_tokens"),
            "total_tokens": usage.get("total_tokens"),
            "reasoning_tokens": usage.get("reasoning_tokens"),
            "cached_tokens": usage.get("cached_tokens"),
            "cost": final.cost.micros if final.cost else None,
            "currency": final.cost.currency if final.cost else None,
            "last_seq": final.last_seq,
            "steps": storable_json(final.steps),
            "sources": final.sources,
            "searches": final.searches,
            "now": utcnow(),
            "id": answer_id,
            "generation": final.generation,
        }

        async def write() -> Later:
            # SQLite: sent with the settlement's first statement (or the COMMIT), in its one hop
            written = await self.db.fetch_later(update, values)
            if final.call_id is not None and final.spent is not None:
                await self.usage.settle_answer(
                    {"id": answer_id, "content": final.content, "reasoning_content": final.reasoning,
                     "tool_steps": final.steps},
                    [*final.carried, (final.call_id, final.spent)],
                    final.status,
                    written,
                )  # fmt: skip
            return written

        written = await self.db.together(write, again_on_deadlock=True)  # SQLite: with the ends arriving with it
        assert written.rows is not None, "the COMMIT carries the final row at the latest"
        return bool(written.rows)

    async def get(self, answer_id: str) -> dict | None:
        """An answer by id alone: its producer reads back the verdict another process stored."""
        return await self.db.fetch_one(f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE id = :id", {"id": answer_id})


# ── Usage: the ledger of upstream calls, the owners' windows and their limits ──────────
# Every upstream call is a row of `usage_calls`: reserved before the call, in the transaction that
# admits it (for an answer: begin_turn's), and settled after it with what the model service reported
# or chatsvc's estimate. Each owner has one row of `usage_owners`: its day's and month's tokens and
# cost (UTC, by the database's clock), what its running calls hold, its running answers, its
# answers-per-minute bucket, and an admin's limits for it. A turn is admitted by one conditional
# UPDATE of that row, which checks every limit and takes the reservation at once: across replicas,
# at most one answer gets past a budget's edge (docs/design/usage.md, part 2).


class Purpose(str, Enum):
    """What an upstream call was for."""

    ANSWER = "answer"  # an answer's first model round
    TOOL_ROUND = "tool_round"  # each later round of an answer that called tools
    TITLE = "title"  # a conversation's title
    CONTINUATION = "continuation"  # a model round that continues an answer's stored text (partial mode)
    SUMMARY = "summary"  # a rolling summary of the part of a branch that no longer fits the context


class Source(str, Enum):
    """Where a settled call's numbers come from."""

    REPORTED = "reported"  # the model service's usage
    ESTIMATED = "estimated"  # chatsvc's estimate: the call ended before the model service reported any
    NONE = "none"  # the call failed before the model service took it: nothing was spent


LIMIT_KINDS = ("tokens_per_day", "tokens_per_month", "cost_per_month", "answers_per_minute", "concurrent_answers")


@dataclass(frozen=True)
class Limits:
    """An owner's limits, each None for no limit; `cost_per_month` in micros."""

    tokens_per_day: int | None = None
    tokens_per_month: int | None = None
    cost_per_month: int | None = None
    answers_per_minute: int | None = None
    concurrent_answers: int | None = None

    @classmethod
    def of(cls, settings: Settings) -> Limits:
        """The limits for everyone (CHATSVC_LIMIT_*)."""
        cost = settings.limit_cost_per_month
        return cls(
            settings.limit_tokens_per_day,
            settings.limit_tokens_per_month,
            None if cost is None else int(cost * MICROS),
            settings.limit_answers_per_minute,
            settings.limit_concurrent_answers,
        )

    @property
    def budgets(self) -> bool:
        """A token or cost limit applies: an answer must say how much it may write (max_tokens)."""
        return any(v is not None for v in (self.tokens_per_day, self.tokens_per_month, self.cost_per_month))


@dataclass
class Hold:
    """An upstream call about to be made, and what it holds against its owner's budgets while it runs."""

    call_id: str  # its usage_calls row (new_message_id())
    owner: str
    session_id: str
    message_id: str | None  # the answer it is a round of (None: a title)
    purpose: Purpose
    model: str
    prompt_tokens: int  # estimate_tokens of what it sends (images by their tiles)
    output_tokens: int  # what it may write: its max_tokens, else CHATSVC_RESERVE_OUTPUT_TOKENS
    cost: int = 0  # micros held against a cost limit (Prices.hold; 0 without prices)


@dataclass
class Spent:
    """What an upstream call used, as its row is settled: the model service's numbers (each one it
    did not send None), or chatsvc's estimate (prompt and completion only), and its cost."""

    source: Source
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    reasoning_tokens: int | None = None  # within completion_tokens
    cached_tokens: int | None = None  # within prompt_tokens
    cache_creation_tokens: int | None = None  # within prompt_tokens
    cost: int | None = None  # micros; None: no prices, or the model has none
    currency: str | None = None
    searches: int | None = None  # web searches, when reported (not priced: docs/CONTRACT.md, "Answers from the web")


# What each settled call adds to its owner's row: the ledger's columns, as the VALUES of a settlement
_SETTLED = (
    ("outcome", "TEXT"), ("source", "TEXT"), ("prompt_tokens", "BIGINT"), ("completion_tokens", "BIGINT"),
    ("total_tokens", "BIGINT"), ("reasoning_tokens", "BIGINT"), ("cached_tokens", "BIGINT"),
    ("cache_creation_tokens", "BIGINT"), ("cost_micros", "BIGINT"), ("currency", "TEXT"), ("searches", "INTEGER"),
)  # fmt: skip

# A report's groups: the key each groups the calls by (created_at is RFC 3339 UTC text: its first ten
# characters are the UTC day)
USAGE_GROUPS = {
    "day": "substr(created_at, 1, 10)",
    "model": "model",
    "conversation": "session_id",
    "purpose": "purpose",
    "user": "owner",
}
# a report's figures, in the order of its totals' and groups' keys (after a group's `key`)
USAGE_FIELDS_REPORTED = (
    "calls", "answers", "prompt_tokens", "completion_tokens", "reasoning_tokens", "cached_tokens", "total_tokens",
    "estimated_tokens", "cost",
)  # fmt: skip


def _sum(expression: str) -> str:
    return f"COALESCE(CAST(SUM({expression}) AS BIGINT), 0)"


# A report's sums: a reserved call (still running) counts as a call (and an answer), with no tokens
# yet (its prompt_tokens is the estimate it holds); cost NULL when no call of the group has one.
_REPORT_SUMS = (
    "COUNT(*) AS calls",
    _sum("CASE WHEN purpose = 'answer' THEN 1 ELSE 0 END") + " AS answers",
    _sum("CASE WHEN state = 'settled' THEN prompt_tokens END") + " AS prompt_tokens",
    _sum("completion_tokens") + " AS completion_tokens",
    _sum("reasoning_tokens") + " AS reasoning_tokens",
    _sum("cached_tokens") + " AS cached_tokens",
    _sum("total_tokens") + " AS total_tokens",
    _sum("CASE WHEN source = 'estimated' THEN total_tokens END") + " AS estimated_tokens",
    "CAST(SUM(cost_micros) AS BIGINT) AS cost",
)


def usage_moment(value: str) -> str:
    """A time (RFC 3339, or a date: its midnight; without an offset: UTC) as the ledger's created_at
    is written (utcnow's text), so that the two compare as text."""
    moment = datetime.fromisoformat(value.strip().replace("z", "Z"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _next_day(day: str) -> datetime:
    return datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=timezone.utc) + timedelta(days=1)


def _next_month(month: str) -> datetime:
    year, number = map(int, month.split("-"))
    return datetime(year + number // 12, number % 12 + 1, 1, tzinfo=timezone.utc)


def _rfc3339(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def amount(micros: int) -> str:
    """Micros as an exact amount of the currency, without trailing zeros: 10240000 -> '10.24'."""
    text = f"{Decimal(micros) / MICROS:f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def answer_output(content: str | None, reasoning: str | None, steps: str | None) -> str:
    """What the model wrote of a stored answer: its text, its reasoning and its tool calls' arguments
    (not the tools' results: those are what the service sent back)."""
    parts = [content or "", reasoning or ""]
    try:
        stored = json.loads(steps) if steps else []
    except ValueError:
        stored = []
    for step in stored if isinstance(stored, list) else []:
        data = step.get("data") if isinstance(step, dict) else None
        if step.get("type") == "tool_call" and isinstance(data, dict):
            parts.append(str(data.get("arguments") or ""))
    return "".join(parts)


ZERO_LIMIT_RETRY = 86400.0  # a refusal by a limit of 0 (no window frees it): Retry-After, a day
_ZERO_LIMITS = {  # a limit of 0, in a sentence
    "tokens_per_day": "0 tokens per day",
    "tokens_per_month": "0 tokens per month",
    "cost_per_month": "a cost of 0 per month",
    "answers_per_minute": "0 answers per minute",
    "concurrent_answers": "0 answers at once",
}


def _bucket_fill(bucket: float | None, bucket_at: float | None, now: float, size: int) -> float:
    """answers_per_minute's bucket now: what it held, refilled `size` per 60 s since, up to `size`."""
    if bucket is None:
        return float(size)
    return min(float(size), bucket + max(0.0, now - (bucket_at if bucket_at is not None else now)) * size / 60.0)


def _round_plan(rounds: list[tuple[str, Spent]], states: dict[str, str]) -> list[tuple[str, Spent]]:
    """An answer's rounds (each its row and what it used, in order) as the settlements of its rows
    still reserved (`states`: each row's state; a row absent is not there): a round whose row is not
    there goes with the row before it, or with none when that one is settled already (Usage.settle_rounds)."""
    plan: list[list] = []
    into: list | None = None  # the row the next round without one goes with
    for call_id, spent in rounds:
        state = states.get(call_id)
        if state is None:
            if into is not None:
                into[1] = added_spent(into[1], spent)
        elif state == "reserved":
            into = [call_id, spent]
            plan.append(into)
        else:
            into = None
    return [(call_id, spent) for call_id, spent in plan]


_CALL_COLUMNS = "id, message_id, state, model, prompt_tokens, completion_tokens"  # a call as _calls_of reads it


def _wrote(written: Later) -> bool:
    """Usage.settle_answer: whether the answer's final row was written (it was sent before the statement
    just run, or with it)."""
    assert written.rows is not None, "the final row is sent before the settlement's statements"
    return bool(written.rows)


class Usage:
    """The ledger and the owners' rows (`store.usage`). Admission and settlement run inside the
    transaction their caller holds (begin_turn's, an answer's final write, the sweep's), so a refused
    turn stores nothing and an ended answer is always accounted exactly once.

    Every window is read by the database's clock (PostgreSQL: the statement's time; SQLite: 'now',
    UTC, one value within a statement), never this process's: replicas whose clocks disagree still
    agree on the day, the month and the bucket. An owner row's window (its `day`, its `month`) is
    reset to the current one by the first statement that writes it after it changed."""

    def __init__(self, db: Database, limits: Limits | None = None, prices: Prices | None = None):
        self.db, self.limits, self.prices = db, limits or Limits(), prices
        if db.is_sqlite:
            self._today, self._month = "strftime('%Y-%m-%d', 'now')", "strftime('%Y-%m', 'now')"
            self._epoch = "((julianday('now') - 2440587.5) * 86400.0)"
            self._now = ":now"  # utcnow(): the one process on the file, whose clock 'now' is too
            self._max, self._min = "max", "min"
        else:
            clock = "statement_timestamp()"
            self._today = f"to_char({clock} AT TIME ZONE 'UTC', 'YYYY-MM-DD')"
            self._month = f"to_char({clock} AT TIME ZONE 'UTC', 'YYYY-MM')"
            self._epoch = f"CAST(EXTRACT(EPOCH FROM {clock}) AS DOUBLE PRECISION)"
            self._now = _PG_TIME.format(clock)
            self._max, self._min = "GREATEST", "LEAST"
        today, month = self._today, self._month
        # the owner row's windows as of now: a stale one reads 0
        self._window = {
            "day_tokens": f"CASE WHEN day = {today} THEN day_tokens ELSE 0 END",
            "day_reserved": f"CASE WHEN day = {today} THEN day_reserved ELSE 0 END",
            "month_tokens": f"CASE WHEN month = {month} THEN month_tokens ELSE 0 END",
            "month_reserved": f"CASE WHEN month = {month} THEN month_reserved ELSE 0 END",
            "month_cost": f"CASE WHEN month = {month} THEN month_cost ELSE 0 END",
            "month_reserved_cost": f"CASE WHEN month = {month} THEN month_reserved_cost ELSE 0 END",
        }
        apm = self._effective("answers_per_minute")
        self._fill = (
            f"{self._min}({apm}, COALESCE(bucket, {apm}) + {self._max}(0, {self._epoch} - COALESCE(bucket_at,"
            f" {self._epoch})) * {apm} / 60.0)"
        )
        self._admission = {(enforce, answer): self._admission_sql(enforce, answer) for enforce in (True, False)
                           for answer in (True, False)}  # fmt: skip

    # ── the SQL ──

    @staticmethod
    def _effective(kind: str) -> str:
        """The owner row's limit of this kind: its own (-1: none), else the global one (:g_<kind>, -1: none)."""
        return f"NULLIF(COALESCE(limit_{kind}, :g_{kind}), -1)"

    def _globals(self) -> dict[str, int]:
        return {f"g_{kind}": -1 if (size := getattr(self.limits, kind)) is None else size for kind in LIMIT_KINDS}

    def _admission_sql(self, enforce: bool, answer: bool) -> str:
        """One conditional UPDATE of the owner's row: its windows reset if they are stale, the call's
        reservation added, and for an answer a running answer and a token of the bucket taken, only
        if every limit holds (`enforce`); the row's day, month and effective limits back, or no row."""
        w, e = self._window, self._effective
        sets = [
            f"day = {self._today}",
            f"day_tokens = {w['day_tokens']}",
            f"day_reserved = {w['day_reserved']} + :tokens",
            f"month = {self._month}",
            f"month_tokens = {w['month_tokens']}",
            f"month_reserved = {w['month_reserved']} + :tokens",
            f"month_cost = {w['month_cost']}",
            f"month_reserved_cost = {w['month_reserved_cost']} + :cost",
        ]
        where = ["owner = :owner"]
        if enforce:
            where += [
                f"({e('tokens_per_day')} IS NULL OR {w['day_tokens']} + {w['day_reserved']} < {e('tokens_per_day')})",
                f"({e('tokens_per_month')} IS NULL OR {w['month_tokens']} + {w['month_reserved']}"
                f" < {e('tokens_per_month')})",
                f"({e('cost_per_month')} IS NULL OR {w['month_cost']} + {w['month_reserved_cost']}"
                f" < {e('cost_per_month')})",
            ]
        if enforce and answer:
            apm = e("answers_per_minute")
            sets += [
                "running = running + 1",
                f"bucket = CASE WHEN {apm} IS NULL THEN bucket ELSE {self._fill} - 1 END",
                f"bucket_at = CASE WHEN {apm} IS NULL THEN bucket_at"
                f" ELSE {self._max}(COALESCE(bucket_at, {self._epoch}), {self._epoch}) END",
            ]
            where += [
                f"({e('concurrent_answers')} IS NULL OR running < {e('concurrent_answers')})",
                f"({apm} IS NULL OR {self._fill} >= 1)",
            ]
        limits = ", ".join(f"{e(kind)} AS {kind}" for kind in LIMIT_KINDS)
        return f"UPDATE usage_owners SET {', '.join(sets)} WHERE {' AND '.join(where)} RETURNING day, month, {limits}"

    def _values(self, **values: Any) -> dict[str, Any]:
        return {**self._globals(), "now": utcnow(), **values}

    # ── admission ──

    async def admit(self, hold: Hold, enforce: bool = True) -> Limits:
        """Inside the caller's transaction: check the owner's limits (its own, else the global ones)
        and reserve the call's tokens and cost; the owner's effective limits. An answer (purpose
        ANSWER) also takes a running answer and a token of the bucket. `enforce=False` (a later
        round of an admitted answer): reserved, never refused. Refused: OverLimit, nothing written.

        One statement when the owner has a row and is admitted (docs/design/usage.md 1.4: a blocked
        UPDATE re-reads its WHERE on the row its winner left, so of racing admissions only those the
        budget still holds pass); a first admission inserts the row first, a refusal reads it again
        to say which limit."""
        answer = enforce and (hold.purpose is Purpose.ANSWER or hold.purpose is Purpose.CONTINUATION)
        values = self._values(
            owner=hold.owner, tokens=hold.prompt_tokens + hold.output_tokens, cost=hold.cost,
        )  # fmt: skip
        sql = self._admission[(enforce, answer)]
        row = await self.db.fetch_one(sql, values, role=WRITE)
        if row is None:
            created = await self.db.fetch_one(
                f"INSERT INTO usage_owners (owner, day, month) VALUES (:owner, {self._today}, {self._month})"
                " ON CONFLICT (owner) DO NOTHING RETURNING owner",
                values,
                role=WRITE,
            )
            if created is not None:
                row = await self.db.fetch_one(sql, values, role=WRITE)
        for _ in range(3):  # a refusal whose limit no longer refuses once read again: the row changed meanwhile
            if row is not None:
                break
            refusal = await self._refusal(hold.owner, answer)
            if refusal is not None:
                raise refusal
            row = await self.db.fetch_one(sql, values, role=WRITE)
        else:
            if row is None:
                raise StorageUnavailable("The owner's usage changed too often while this turn was admitted; try again.")
        await self.db.execute(
            "INSERT INTO usage_calls (id, owner, session_id, message_id, purpose, model, state, prompt_tokens,"
            " reserved_tokens, reserved_cost, day, month, created_at) VALUES (:id, :owner, :sid, :mid, :purpose,"
            f" :model, 'reserved', :prompt, :tokens, :cost, :day, :month, {self._now})",
            {
                **values,
                "id": hold.call_id,
                "sid": hold.session_id,
                "mid": hold.message_id,
                "purpose": hold.purpose.value,
                "model": hold.model,
                "prompt": hold.prompt_tokens,
                "day": row["day"],
                "month": row["month"],
            },
            later=True,  # with the transaction's COMMIT (SQLite)
        )
        return Limits(*(row[kind] for kind in LIMIT_KINDS))

    async def _refusal(self, owner: str, answer: bool) -> OverLimit | None:
        """The first of the owner's limits that refuses a turn now, as its OverLimit; None: none does."""
        w, e = self._window, self._effective
        row = await self.db.fetch_one(
            f"SELECT {self._today} AS today, {self._month} AS this_month, {self._epoch} AS now,"
            f" {w['day_tokens']} + {w['day_reserved']} AS day_used, {w['day_reserved']} AS day_held,"
            f" {w['month_tokens']} + {w['month_reserved']} AS month_used, {w['month_reserved']} AS month_held,"
            f" {w['month_cost']} + {w['month_reserved_cost']} AS cost_used,"
            f" {w['month_reserved_cost']} AS cost_held, running, bucket, bucket_at,"
            f" {', '.join(f'{e(kind)} AS {kind}, limit_{kind}' for kind in LIMIT_KINDS)}"
            " FROM usage_owners WHERE owner = :owner",
            self._values(owner=owner),
            role=WRITE,
        )
        if row is None:
            return None
        now = datetime.fromtimestamp(row["now"], timezone.utc)
        midnight, first = _next_day(row["today"]), _next_month(row["this_month"])
        budgets = (
            ("tokens_per_day", row["day_used"], row["day_held"], midnight, "today"),
            ("tokens_per_month", row["month_used"], row["month_held"], first, "this month"),
            ("cost_per_month", row["cost_used"], row["cost_held"], first, "this month"),
        )
        for kind, used, held, reset, window in budgets:
            size = row[kind]
            if size is None or used < size:
                continue
            if size == 0:  # no answer ever starts under it: until the window's reset, which changes nothing
                return self._zero(row, kind, used, _rfc3339(reset), max(1.0, (reset - now).total_seconds()))
            if kind == "cost_per_month":
                currency = f" {self.prices.currency}" if self.prices else ""
                amounts, shown_size, shown_used = f"{amount(used)} of your {amount(size)}{currency}", size, used
                held_text = f", {amount(held)}{currency} of it held by calls still running" if held else ""
                verb = "spent"
            else:
                amounts, shown_size, shown_used = f"{used:,} of your {size:,} tokens", size, used
                held_text = f", {held:,} of them held by calls still running" if held else ""
                verb = "used"
            resets_at = _rfc3339(reset)
            return OverLimit(
                "quota_exceeded",
                f"You have {verb} {amounts} for {window} (UTC){held_text}; the limit resets at {resets_at}.",
                kind,
                shown_size,
                shown_used,
                resets_at,
                max(0.0, (reset - now).total_seconds()),
            )
        if not answer:
            return None
        size = row["answers_per_minute"]
        if size is not None:
            fill = _bucket_fill(row["bucket"], row["bucket_at"], row["now"], size)
            if fill < 1:
                if size == 0:
                    return self._zero(row, "answers_per_minute", 0, None, ZERO_LIMIT_RETRY)
                wait = (1 - fill) * 60 / size
                resets_at = (now + timedelta(seconds=wait)).isoformat(timespec="milliseconds").replace("+00:00", "Z")
                return OverLimit(
                    "rate_limited",
                    f"You have started the {size:,} answers per minute your limit allows; the next one can start"
                    f" in {math.ceil(wait)} s ({resets_at}).",
                    "answers_per_minute",
                    size,
                    size - math.floor(fill),
                    resets_at,
                    wait,
                )
        size = row["concurrent_answers"]
        if size == 0:
            return self._zero(row, "concurrent_answers", row["running"], None, ZERO_LIMIT_RETRY)
        if size is not None and row["running"] >= size:
            return OverLimit(
                "rate_limited",
                f"You have {row['running']:,} answers running, and your limit is {size:,} at once; start this one"
                " when one of them ends.",
                "concurrent_answers",
                size,
                row["running"],
                None,
                1.0,
            )
        return None

    def _zero(self, row: dict, kind: str, used: int, resets_at: str | None, retry_after: float) -> OverLimit:
        """The refusal of a limit of 0: no answer can start under it, however long the client waits
        (Retry-After: `retry_after`, long); it names what sets the limit (an admin's for this owner,
        else the setting)."""
        where = (
            "an admin set it for you (PUT /api/v1/admin/users/{user}/limits)"
            if row[f"limit_{kind}"] is not None
            else f"CHATSVC_LIMIT_{kind.upper()} sets it for everyone (an admin can set another for you:"
            " PUT /api/v1/admin/users/{user}/limits)"
        )
        return OverLimit(
            "rate_limited" if kind in ("answers_per_minute", "concurrent_answers") else "quota_exceeded",
            f"Your limit is {_ZERO_LIMITS[kind]}: no answer can start under it, now or later; {where}.",
            kind,
            0,
            used,
            resets_at,
            retry_after,
        )

    # ── settlement ──

    async def settle(self, call_id: str, spent: Spent, outcome: str, ends_answer: bool) -> None:
        """Inside the caller's transaction: the call's row gets what it used, and its owner's row the
        tokens and cost instead of what the call held (in the windows it was reserved in).
        `ends_answer`: the answer ends with this call, and gives back its running answer. A call
        already settled (the sweep took its answer for dead) is left as it is."""
        await self._settle([(call_id, spent, outcome, ends_answer)])

    async def _settle(self, calls: list[tuple[str, Spent, str, bool]]) -> list[dict]:
        """Settle these calls (id, what it used, outcome, whether its answer ends), those still reserved,
        and their owners' rows; the rows settled (id, message_id, model)."""
        windows: dict[tuple[str, str, str], list[int]] = {}
        settled = await self._settle_calls(calls, windows)
        if windows:
            await self._add_to_owners(windows)
        return settled

    async def _settle_calls(
        self, calls: list[tuple[str, Spent, str, bool]], windows: dict[tuple[str, str, str], list[int]]
    ) -> list[dict]:
        """The calls' rows (id, what it used, outcome, whether its answer ends), those still reserved,
        settled (a statement per 500); what each owner's window gets is added to `windows` ([tokens,
        tokens held, cost, cost held, answers ended]) for _add_to_owners. The rows settled (id,
        message_id, model)."""
        settled: list[dict] = []
        for start in range(0, len(calls), 500):
            settled += await self._settle_batch(calls[start : start + 500], windows)
        return settled

    async def _settle_batch(
        self, calls: list[tuple[str, Spent, str, bool]], windows: dict[tuple[str, str, str], list[int]]
    ) -> list[dict]:
        if not calls:
            return []
        values: dict[str, Any] = {"now": utcnow()}
        rows = []
        for n, (call_id, spent, outcome, _) in enumerate(calls):
            row = {
                "id": call_id,
                "outcome": outcome,
                "source": spent.source.value,
                "prompt_tokens": spent.prompt_tokens,
                "completion_tokens": spent.completion_tokens,
                "total_tokens": spent.total_tokens,
                "reasoning_tokens": spent.reasoning_tokens,
                "cached_tokens": spent.cached_tokens,
                "cache_creation_tokens": spent.cache_creation_tokens,
                "cost_micros": spent.cost,
                "currency": spent.currency if spent.cost is not None else None,
                "searches": spent.searches,
            }
            values.update((f"{name}{n}", value) for name, value in row.items())
            columns = [("id", "TEXT"), *_SETTLED]
            rows.append("(" + ", ".join(f"CAST(:{name}{n} AS {kind})" for name, kind in columns) + ")")
        names = ", ".join(f"v_{name}" for name, _ in (("id", "TEXT"), *_SETTLED))
        settled = await self.db.fetch_all(
            f"WITH v ({names}) AS (VALUES {', '.join(rows)}) UPDATE usage_calls SET state = 'settled',"
            f" {', '.join(f'{name} = v_{name}' for name, _ in _SETTLED)}, settled_at = {self._now}"
            " FROM v WHERE id = v_id AND state = 'reserved'"
            " RETURNING id, message_id, model, owner, day, month, reserved_tokens, reserved_cost, total_tokens,"
            " cost_micros",
            values,
            role=WRITE,
        )
        ends = {call_id for call_id, _, _, end in calls if end}
        for row in settled:
            counts = windows.setdefault((row["owner"], row["day"], row["month"]), [0, 0, 0, 0, 0])
            for i, value in enumerate((row["total_tokens"], row["reserved_tokens"], row["cost_micros"],
                                       row["reserved_cost"], row["id"] in ends)):  # fmt: skip
                counts[i] += int(value or 0)
        return settled

    async def _add_to_owners(self, windows: dict[tuple[str, str, str], list[int]]) -> None:
        """Owners' rows, for calls settled in these windows (owner, day, month): [tokens, tokens held,
        cost, cost held, answers ended]. Tokens and cost count in a window only while it is still the
        row's; what was held there is given back (never below 0). PostgreSQL: several owners' rows
        are all locked first, in the order of their names (two sweeps never wait for each other in a
        cycle), then written 500 windows a statement."""
        owners = sorted({owner for owner, _, _ in windows})
        if len(owners) > 1 and not self.db.is_sqlite:
            for names, values in _id_batches(owners):  # batches in order: the locks are taken in one order
                await self.db.execute(
                    f"SELECT owner FROM usage_owners WHERE owner IN ({names}) ORDER BY owner FOR UPDATE", values
                )
        items = list(windows.items())
        for start in range(0, len(items), 500):
            await self._add_windows(items[start : start + 500])

    async def _add_windows(self, items: list[tuple[tuple[str, str, str], list[int]]]) -> None:
        if len(items) == 1:  # an answer's end: one owner's one window, a plain statement (SQLite built an
            return await self._add_window(*items[0])  # index over the VALUES for each subquery: 420 us, not 10)
        values: dict[str, Any] = {}
        rows = []
        for n, ((owner, day, month), counts) in enumerate(items):
            values.update({f"o{n}": owner, f"d{n}": day, f"m{n}": month})
            values.update((f"c{n}_{i}", count) for i, count in enumerate(counts))
            counts_sql = ", ".join(f"CAST(:c{n}_{i} AS BIGINT)" for i in range(len(counts)))
            rows.append(f"(CAST(:o{n} AS TEXT), CAST(:d{n} AS TEXT), CAST(:m{n} AS TEXT), {counts_sql})")

        def total(column: str, window: str = "") -> str:
            where = {"day": " AND v_day = usage_owners.day", "month": " AND v_month = usage_owners.month"}.get(
                window, ""
            )
            return (
                f"COALESCE((SELECT CAST(SUM({column}) AS BIGINT) FROM v WHERE v_owner = usage_owners.owner{where}), 0)"
            )

        big = self._max
        await self.db.execute(
            "WITH v (v_owner, v_day, v_month, v_tokens, v_held, v_cost, v_held_cost, v_ends) AS"
            f" (VALUES {', '.join(rows)}) UPDATE usage_owners SET"
            f" day_tokens = day_tokens + {total('v_tokens', 'day')},"
            f" day_reserved = {big}(day_reserved - {total('v_held', 'day')}, 0),"
            f" month_tokens = month_tokens + {total('v_tokens', 'month')},"
            f" month_reserved = {big}(month_reserved - {total('v_held', 'month')}, 0),"
            f" month_cost = month_cost + {total('v_cost', 'month')},"
            f" month_reserved_cost = {big}(month_reserved_cost - {total('v_held_cost', 'month')}, 0),"
            f" running = {big}(running - {total('v_ends')}, 0)"
            " WHERE owner IN (SELECT v_owner FROM v)",
            values,
            later=True,
        )

    async def _add_window(self, window: tuple[str, str, str], counts: list[int]) -> None:
        """_add_windows for one window, as the same sums (a window that is no longer the row's counts
        nothing; what was held is given back, never below 0)."""
        owner, day, month = window
        tokens, held, cost, held_cost, ends = (f"CAST(:c{i} AS BIGINT)" for i in range(5))

        def counted(column: str, amount: str) -> str:
            return f"CASE WHEN {column} = CAST(:{column} AS TEXT) THEN {amount} ELSE 0 END"

        big = self._max
        await self.db.execute(
            "UPDATE usage_owners SET"
            f" day_tokens = day_tokens + {counted('day', tokens)},"
            f" day_reserved = {big}(day_reserved - {counted('day', held)}, 0),"
            f" month_tokens = month_tokens + {counted('month', tokens)},"
            f" month_reserved = {big}(month_reserved - {counted('month', held)}, 0),"
            f" month_cost = month_cost + {counted('month', cost)},"
            f" month_reserved_cost = {big}(month_reserved_cost - {counted('month', held_cost)}, 0),"
            f" running = {big}(running - {ends}, 0) WHERE owner = :owner",
            {"owner": owner, "day": day, "month": month, **{f"c{i}": count for i, count in enumerate(counts)}},
            later=True,
        )

    async def next_round(
        self, call_id: str, spent: Spent, hold: Hold, carried: Iterable[tuple[str, Spent]] = ()
    ) -> None:
        """An answer's round ended and it calls the model again: the round settled, the next reserved
        (not refused), in one transaction of its own (not to be called inside another). `carried`: the
        rounds before it whose rows are not known to be settled (a write between two rounds failed, or
        its commit went unconfirmed), each its row and what it used, settled first (settle_rounds).
        Rows all found settled already (the sweep took the answer for dead) reserve no next round:
        nothing would settle it."""

        async def body() -> None:
            if await self.settle_rounds([*carried, (call_id, spent)], COMPLETE, ends_answer=False):
                await self.admit(hold, enforce=False)

        await self.db.atomically(body)

    async def settle_rounds(self, rounds: list[tuple[str, Spent]], outcome: str, ends_answer: bool) -> int:
        """Inside the caller's transaction: an answer's rounds, in order, each its row and what it used,
        those still reserved settled (the last with `outcome`, the others complete; `ends_answer`: the
        answer ends, and gives back its running answer); how many rows were settled. A round whose row is
        not there (its reservation was rolled back with a failed write between two rounds) is settled
        with the row before it; a row settled already (by the write between two rounds, committed
        though its caller saw it fail; or by the sweep) is left as it is, with the rounds after it whose
        row is not there (the sweep's estimate counted them)."""
        states: dict[str, str] = {}
        for names, ids in _id_batches(list(dict.fromkeys(call_id for call_id, _ in rounds))):
            rows = await self.db.fetch_all(f"SELECT id, state FROM usage_calls WHERE id IN ({names})", ids, role=WRITE)
            states.update((row["id"], row["state"]) for row in rows)
        plan = _round_plan(rounds, states)
        last = len(plan) - 1
        return len(await self._settle([(call_id, spent, outcome if n == last else COMPLETE, ends_answer and n == last)
                                       for n, (call_id, spent) in enumerate(plan)]))  # fmt: skip

    async def settle_answer(self, answer: dict, rounds: list[tuple[str, Spent]], outcome: str, written: Later) -> None:
        """Inside the answer's final write (whether or not its row was still there to write): every call
        of the answer still reserved is settled and its running answer given back. Its `rounds` as
        settle_rounds settles them (the last with `outcome`); any other call of it still reserved
        (none, unless its rounds were lost track of) as the sweep estimates an earlier round: its
        prompt's estimate. `answer`: id, content, reasoning_content, tool_steps, as it ends. A call
        settled already is left as it is: the sweep, or a deleted conversation, took the answer and
        settled its calls (their writes lock its row first, as this one's does).

        `written`: the answer's final row as this write wrote it (AnswerRows.finish, sent before). When it
        wrote nothing, the answer was taken by another process, and may have been continued since: its
        calls still reserved that its rounds do not name are the continuation's, and are left to it.

        An answer of one round (none carried), the common case, needs no read first: its row is settled
        as it stands (one no longer reserved is left), and its other calls still reserved are read in
        the statement before, sent with it (SQLite: the end's transaction is 2 hops, not 3)."""
        stored = bool(answer_output(answer.get("content"), answer.get("reasoning_content"), answer.get("tool_steps")))
        if len(rounds) == 1:
            [(call_id, spent)] = rounds
            others = await self.db.fetch_later(
                f"SELECT {_CALL_COLUMNS} FROM usage_calls WHERE message_id = :answer AND state = 'reserved'"
                " AND id != :call ORDER BY id",
                {"answer": answer["id"], "call": call_id},
            )
            windows: dict[tuple[str, str, str], list[int]] = {}
            ended = await self._settle_calls([(call_id, spent, outcome, True)], windows)
            assert others.rows is not None, "read in the settlement's hop, before it"
            rest = [(call["id"], self._swept_spent(call, 0, stored, False), outcome, not ended and n == 0)
                    for n, call in enumerate(others.rows if _wrote(written) else ())]  # fmt: skip
            if rest:  # (none, unless its rounds were lost track of)
                await self._settle_calls(rest, windows)
            if windows:
                await self._add_to_owners(windows)
            return
        calls = await self._calls_of([answer["id"]])
        plan = _round_plan(rounds, {call["id"]: call["state"] for call in calls})
        planned = {call_id for call_id, _ in plan}
        others = [call for call in calls if call["state"] == "reserved" and call["id"] not in planned]
        others = others if _wrote(written) else []
        settlements = [(call_id, spent, COMPLETE, False) for call_id, spent in plan]
        settlements += [(call["id"], self._swept_spent(call, 0, stored, False), outcome, False) for call in others]
        if settlements:  # the answer holds its running answer while any of its calls is reserved: given back once
            at = len(plan) - 1 if plan else 0
            call_id, spent, _, _ = settlements[at]
            settlements[at] = (call_id, spent, outcome, True)
            await self._settle(settlements)

    async def _calls_of(self, answer_ids: list[str]) -> list[dict]:
        """The answers' calls (id, message_id, state, model, prompt_tokens, completion_tokens), in id order."""
        calls: list[dict] = []
        for names, ids in _id_batches(answer_ids):
            calls += await self.db.fetch_all(
                f"SELECT {_CALL_COLUMNS} FROM usage_calls WHERE message_id IN ({names})",
                ids,
                role=WRITE,
            )
        return sorted(calls, key=lambda call: call["id"])

    def _swept_spent(self, call: dict, completion: int, stored: bool, thinking: bool) -> Spent:
        """A reserved call's estimate when its answer ended without its usage: the prompt it reserved
        (its estimate) and `completion`, `estimated`; `none` with 0 tokens if the answer stored nothing."""
        if stored:
            prompt = call["prompt_tokens"] or 0
            spent = Spent(Source.ESTIMATED, prompt, completion, prompt + completion)
        else:
            spent = Spent(Source.NONE)
        if self.prices is not None:
            spent.cost = self.prices.cost(call["model"], spent, thinking)
            spent.currency = self.prices.currency
        return spent

    async def settle_swept(self, answers: list[dict]) -> list[tuple[str, str, Spent]]:
        """Inside the sweep's transaction (or a conversation's deletion): the calls still reserved of
        these answers (rows with `id`, `content`, `reasoning_content`, and `tool_steps` if read), just
        stored as interrupted (or about to be deleted), settled with an estimate from their stored
        text; their running answers given back. What was settled, for the metrics: (answer id, model,
        what it used) a call.

        The estimate: the prompt the call reserved (its estimate, written at admission), and the
        answer's stored output (text, reasoning, tool calls' arguments: estimate_tokens, which errs
        high) less what its earlier rounds were counted; `estimated`. An answer that stored nothing:
        `none`, 0 tokens (the model sent nothing before the process was gone).

        The calls are read again until none of them is reserved: a producer still alive (its heartbeat
        late) may commit its next round meanwhile (PostgreSQL: its round settled and the next reserved
        at once; this read then waited for the first, and reads the second only in a later statement).
        The owners' rows are written last, all locked in one order first (_add_to_owners): every write
        of this transaction to a call comes before its owners', as in the answers' own writes."""
        by_id = {answer["id"]: answer for answer in answers}
        windows: dict[tuple[str, str, str], list[int]] = {}
        swept: list[tuple[str, str, Spent]] = []
        ended: set[str] = set()  # the answers whose running answer was given back
        for _ in range(100):
            earlier: dict[str, int] = {}
            reserved: dict[str, list[dict]] = {}
            for call in await self._calls_of(list(by_id)):
                if call["state"] == "settled":
                    earlier[call["message_id"]] = earlier.get(call["message_id"], 0) + (call["completion_tokens"] or 0)
                else:
                    reserved.setdefault(call["message_id"], []).append(call)
            if not reserved:
                break
            settlements, spent_of, ends = [], {}, set()
            for answer_id, rounds in reserved.items():
                answer = by_id[answer_id]
                output = answer_output(answer.get("content"), answer.get("reasoning_content"), answer.get("tool_steps"))
                stored = bool(output or answer.get("tool_steps"))
                completion = max(estimate_tokens(output) - earlier.get(answer_id, 0), 0) if output else 0
                thinking = bool(answer.get("reasoning_content"))
                for n, call in enumerate(rounds):  # one, unless a round was reserved twice
                    last = n == len(rounds) - 1
                    spent_of[call["id"]] = self._swept_spent(call, completion if last else 0, stored, thinking)
                    if n == 0 and answer_id not in ended:
                        ends.add(call["id"])
                    settlements.append((call["id"], spent_of[call["id"]], INTERRUPTED, call["id"] in ends))
            for row in await self._settle_calls(settlements, windows):
                swept.append((row["message_id"], row["model"], spent_of[row["id"]]))
                if row["id"] in ends:
                    ended.add(row["message_id"])
        else:
            log.error("the sweep found calls of %d answer(s) still reserved after 100 reads", len(by_id))
        if windows:
            await self._add_to_owners(windows)
        return swept

    async def costs(self, answer_ids: list[str]) -> dict[str, Cost]:
        """What each of these answers' calls cost together, of those whose every call is settled with
        a cost in one currency (none without prices)."""
        if self.prices is None:
            return {}
        costs: dict[str, Cost] = {}
        for names, ids in _id_batches(answer_ids):
            rows = await self.db.fetch_all(
                "SELECT message_id, CAST(SUM(cost_micros) AS BIGINT) AS cost, MIN(currency) AS currency,"
                " MAX(currency) AS other, COUNT(*) AS calls, COUNT(cost_micros) AS priced,"
                " SUM(CASE WHEN state = 'reserved' THEN 1 ELSE 0 END) AS running FROM usage_calls"
                f" WHERE message_id IN ({names}) GROUP BY message_id",
                ids,
                role=WRITE,
            )
            for row in rows:
                if row["calls"] == row["priced"] and not row["running"] and row["currency"] == row["other"]:
                    costs[row["message_id"]] = Cost(row["cost"], row["currency"])
        return costs

    async def record(self, hold: Hold, spent: Spent, outcome: str) -> None:
        """A call recorded once it is done (a title): its row, settled, and its owner's windows (its
        row made if it has none), in one transaction of its own (not to be called inside another). Never
        refused: reserved unenforced, then settled."""

        async def body() -> None:
            await self.admit(hold, enforce=False)
            await self._settle([(hold.call_id, spent, outcome, False)])

        await self.db.atomically(body)

    # ── an owner's limits and standing ──

    async def owner_limits(self, owner: str) -> dict:
        """An admin's limits for the owner, as PUT: a key absent is the global limit, null is none
        (`cost_per_month` in micros)."""
        row = await self.db.fetch_one(
            f"SELECT {', '.join(f'limit_{kind}' for kind in LIMIT_KINDS)} FROM usage_owners WHERE owner = :owner",
            {"owner": owner},
        )
        limits: dict[str, int | None] = {}
        for kind in LIMIT_KINDS:
            size = row and row[f"limit_{kind}"]
            if size is not None:
                limits[kind] = None if size < 0 else size
        return limits

    async def set_limits(self, owner: str, limits: dict) -> None:
        """Replace an admin's limits for the owner (the object as PUT, already checked: each key a
        LIMIT_KINDS name, each value a whole number >= 0, `cost_per_month` in micros, or None for no
        limit; a key absent: the global limit). One statement."""
        unknown = set(limits) - set(LIMIT_KINDS)
        if unknown:
            raise ValueError(f"not a limit: {', '.join(sorted(unknown))}")
        values = self._values(owner=owner)
        for kind in LIMIT_KINDS:
            values[kind] = (-1 if limits[kind] is None else int(limits[kind])) if kind in limits else None
        columns = ", ".join(f"limit_{kind}" for kind in LIMIT_KINDS)
        await self.db.execute(
            f"INSERT INTO usage_owners (owner, day, month, {columns}, limits_at) VALUES (:owner, {self._today},"
            f" {self._month}, {', '.join(f':{kind}' for kind in LIMIT_KINDS)}, {self._now})"
            f" ON CONFLICT (owner) DO UPDATE SET"
            f" {', '.join(f'limit_{kind} = excluded.limit_{kind}' for kind in LIMIT_KINDS)},"
            " limits_at = excluded.limits_at",
            values,
        )

    async def reset(self, owner: str, window: str) -> None:
        """An admin sets the owner's settled tokens and cost of this window ('day' or 'month') to 0;
        the ledger keeps every call, and what running calls hold stays held. One statement."""
        sets = {
            "day": f"day_tokens = 0, day_reset_at = {self._now}",
            "month": f"month_tokens = 0, month_cost = 0, month_reset_at = {self._now}",
        }
        if window not in sets:
            raise ValueError(f"not a window: {window!r}")
        await self.db.execute(f"UPDATE usage_owners SET {sets[window]} WHERE owner = :owner", self._values(owner=owner))

    async def standing(self, owner: str) -> dict:
        """Where the owner stands, by the database's clock: {"limits": {kind: {"limit", "source"
        ("user": its own, "global", or "none": no limit applies), "used", "reserved" (held by its
        running calls), "remaining" (None without a limit), "resets_at" (RFC 3339; None: no reset)}},
        "day", "month"}. Costs in micros. answers_per_minute: `used` the answers its bucket is short
        of full, `remaining` the answers that can start now, `resets_at` when it is full again;
        concurrent_answers: `used` the answers running."""
        columns = ", ".join(f"o.limit_{kind}" for kind in LIMIT_KINDS)
        row = await self.db.fetch_one(
            f"SELECT {self._today} AS today, {self._month} AS this_month, {self._epoch} AS now, o.day, o.day_tokens,"
            " o.day_reserved, o.month, o.month_tokens, o.month_reserved, o.month_cost, o.month_reserved_cost,"
            f" o.running, o.bucket, o.bucket_at, {columns} FROM (SELECT 1 AS one) AS clock"
            " LEFT JOIN usage_owners o ON o.owner = :owner",
            {"owner": owner},
        )
        assert row is not None
        today, month, now = row["today"], row["this_month"], row["now"]
        this_day, this_month = row["day"] == today, row["month"] == month
        midnight, first = _rfc3339(_next_day(today)), _rfc3339(_next_month(month))
        current = {
            "tokens_per_day": (row["day_tokens"] if this_day else 0, row["day_reserved"] if this_day else 0, midnight),
            "tokens_per_month": (
                row["month_tokens"] if this_month else 0, row["month_reserved"] if this_month else 0, first,
            ),
            "cost_per_month": (
                row["month_cost"] if this_month else 0, row["month_reserved_cost"] if this_month else 0, first,
            ),
        }  # fmt: skip
        limits = {}
        for kind in LIMIT_KINDS:
            own, everyone = row[f"limit_{kind}"], getattr(self.limits, kind)
            size = everyone if own is None else (None if own < 0 else own)
            source = "none" if size is None else ("global" if own is None else "user")
            if kind in current:
                used, reserved, resets_at = current[kind]
                remaining = None if size is None else max(size - used - reserved, 0)
            elif kind == "answers_per_minute":
                reserved, used, remaining, resets_at = 0, 0, None, None
                if size is not None:
                    fill = _bucket_fill(row["bucket"], row["bucket_at"], now, size)
                    used, remaining = size - math.floor(fill), math.floor(fill)
                    if fill < size:
                        full = datetime.fromtimestamp(now, timezone.utc) + timedelta(seconds=(size - fill) * 60 / size)
                        resets_at = full.isoformat(timespec="milliseconds").replace("+00:00", "Z")
            else:
                used, reserved, resets_at = row["running"] or 0, 0, None
                remaining = None if size is None else max(size - used, 0)
            limits[kind] = {
                "limit": size, "source": source, "used": used, "reserved": reserved, "remaining": remaining,
                "resets_at": resets_at,
            }  # fmt: skip
        return {"limits": limits, "day": today, "month": month}

    # ── reports ──

    async def report(
        self, owner: str | None, start: str, end: str, group_by: str, limit: int, cursor: str | None
    ) -> tuple[dict, list[dict], str | None]:
        """The calls of `owner` (None: everyone) created in [start, end) (RFC 3339 or dates, UTC):
        totals, one row per group (`group_by`: day, model, conversation, purpose, user, or none for
        totals alone) with its `key`, at most `limit` of them after the group `cursor` (the key of the
        last page's last group, as this returns it: the caller makes it opaque), keys ascending, and
        the next page's cursor (None: this is the last). Each: calls, answers, prompt, completion,
        reasoning, cached, total and estimated tokens, and cost (micros; None: no call has a cost).
        Settled and still reserved calls (a reserved call has no tokens yet). Index range reads:
        (owner, created_at), or (created_at) for everyone."""
        if group_by != "none" and group_by not in USAGE_GROUPS:
            raise ValueError(f"not a grouping: {group_by!r}")
        values: dict[str, Any] = {"owner": owner, "start": usage_moment(start), "end": usage_moment(end)}
        where = "created_at >= :start AND created_at < :end" + (" AND owner = :owner" if owner is not None else "")
        sums = ", ".join(_REPORT_SUMS)
        totals = await self.db.fetch_one(f"SELECT {sums} FROM usage_calls WHERE {where}", values)
        assert totals is not None
        if group_by == "none":
            return totals, [], None
        key = USAGE_GROUPS[group_by]
        page_where = where
        if cursor is not None:
            if group_by == "day":  # after that day: a bound of the index's range
                values["start"] = max(values["start"], cursor + "U")  # 'U' sorts after the day's 'T...'
            else:
                page_where += f" AND {key} > :cursor"
                values["cursor"] = cursor
        groups = await self.db.fetch_all(
            f"SELECT {key} AS key, {sums} FROM usage_calls WHERE {page_where} GROUP BY {key} ORDER BY {key}"
            " LIMIT :limit",
            {**values, "limit": limit + 1},
        )
        more = len(groups) > limit
        groups = groups[:limit]
        return totals, groups, groups[-1]["key"] if more else None


# ── Store: the database and its rooms, opened and closed together ──────────────────────


class Store:
    """What the rest of the module holds: the database (`db`) and the rooms that read and write it,
    `conversations`, `search`, `tree` (a conversation's messages), `copies` (forks and imports), `files`
    (the files owners upload), `answers` (answers' rows while they are written) and `summaries`."""

    def __init__(
        self,
        url: str,
        exclusive: bool = False,
        metrics: Metrics | None = None,
        limits: Limits | None = None,
        prices: Prices | None = None,
    ):
        self.db = Database(url, exclusive, metrics)
        self.usage = Usage(self.db, limits, prices)
        self.conversations = Conversations(self.db, self.usage)
        self.search = Search(self.db)
        self.tree = Tree(self.db, self.conversations, self.usage)
        self.files = Files(self.db)
        self.copies = Copies(self.db, self.files)
        self.answers = AnswerRows(self.db, self.usage)
        self.summaries = SummaryRows(self.db)

    async def open(self, upgrade: bool = True) -> None:
        """Connect, and bring the schema up to date (`upgrade`), or only check that this release can
        (a database newer than it is a SchemaError either way). SQLite, for the process that serves the
        file: the copies a crash left staged are deleted."""
        await self.db.open(upgrade)
        if upgrade and self.db.exclusive and self.db.is_sqlite:  # no other process writes this file
            try:
                await self.copies.drop_staged()
            except BaseException:
                await self.close()
                raise

    async def close(self) -> None:
        await self.db.close()


# ── Turns: where a new message goes in the tree, and what the model is sent ────────────
# A chat request names at most one place in the conversation's tree: after an answer (`parent_id`),
# beside a user message (`edit`), or a new answer to a stored question (`regenerate`); with none, the
# new message follows the current leaf. `plan_turn` turns that into a `Turn` and the model's messages.


@dataclass
class Offer:
    """The tools an answer may call: the MCP servers' (by the name the model sees) and the request's
    own (the app's, by name), and the request's tool_choice."""

    server: dict[str, ToolSpec]
    client: dict[str, dict]
    choice: Any = None

    def payload(self, last: bool) -> dict:
        """What a model round's request carries for them; the last round may call none (tools are still
        listed: the history names them)."""
        tools = [spec.payload() for spec in self.server.values()] + list(self.client.values())
        body: dict[str, Any] = {"tools": tools, "parallel_tool_calls": True}
        choice = "none" if last else self.choice
        if choice is not None:
            body["tool_choice"] = choice
        return body


def make_offer(toolbox: Toolbox, chat: ChatRequest) -> Offer | None:
    """The tools a chat request offers the model: the servers' (all, those it names, or none), and
    its own `tools`; None when there are none (the request to the model carries no `tools`)."""
    known = {spec.exposed: spec for spec in toolbox.specs()}
    if chat.server_tools is True:
        server = known
    elif chat.server_tools is False:
        server = {}
    else:
        unknown = [name for name in chat.server_tools if name not in known]
        if unknown:
            raise invalid(
                f"'server_tools' names {', '.join(repr(n) for n in unknown)}, which no MCP server offers"
                f" (offered: {', '.join(known) or 'none'})."
            )
        server = {name: known[name] for name in chat.server_tools}
    client = {entry["function"]["name"]: entry for entry in chat.tools or ()}
    clash = [name for name in client if name in known]
    if clash:
        raise invalid(f"'tools' names {', '.join(repr(n) for n in clash)}, which is an MCP server's tool here.")
    if not server and not client:
        if chat.tool_choice is not None and chat.tool_choice != "none":
            raise invalid("'tool_choice' needs tools to choose from: give 'tools', or leave it out.")
        return None
    choice = chat.tool_choice
    if (
        isinstance(choice, dict)
        and choice["function"]["name"] not in server
        and choice["function"]["name"] not in client
    ):
        raise invalid(f"'tool_choice' names '{choice['function']['name']}', which is not among the tools offered.")
    return Offer(server, client, choice)


def check_results(answer: dict, results: list[dict]) -> None:
    """The app's tool results must answer, each once, every call the answer ended waiting for."""
    if (
        answer["role"] != "assistant"
        or answer["status"] != COMPLETE
        or answer["finish_reason"] != TOOL_CALLS
        or not answer["tool_steps"]
    ):
        raise invalid(
            f"'tool_results' answer the calls of an answer that ended with finish_reason 'tool_calls';"
            f" '{answer['id']}' did not."
        )
    pending = [call["id"] for call in pending_tool_calls(json.loads(answer["tool_steps"]))]
    given = [result["tool_call_id"] for result in results]
    missing = [i for i in pending if i not in given]
    unknown = [i for i in given if i not in pending]
    twice = sorted({i for i in given if given.count(i) > 1})
    if missing or unknown or twice:
        said = []
        if missing:
            said.append(f"no result for {', '.join(missing)}")
        if unknown:
            said.append(f"{', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not a call it waits for")
        if twice:
            said.append(f"{', '.join(twice)} answered more than once")
        raise invalid(
            f"'tool_results' must answer each call of answer '{answer['id']}' once ({'; '.join(said)});"
            f" it waits for {', '.join(pending)}."
        )


async def plan_turn(
    store: Store, settings: Settings, key: tuple[str, str], chat: ChatRequest
) -> tuple[Turn, list[dict], bool]:
    """Where the new answer goes in the conversation's tree, the messages the model gets, and whether
    the turn goes to CHATSVC_VISION_MODEL because its context holds images its own model cannot see."""
    owner, session_id = key
    question, question_id, new_question = chat.message, "", True
    results = chat.tool_results  # a turn of the app's tool results, instead of a user message
    target_id = chat.parent_id or chat.edit or chat.regenerate
    start: str | None = None
    if target_id is not None:
        target = await store.tree.message_and_parent(owner, session_id, target_id)
        if target is None:
            raise message_not_found(session_id, target_id)
        field_name = "parent_id" if chat.parent_id else "edit" if chat.edit else "regenerate"
        role = "user" if chat.edit else "assistant"
        if target["role"] != role:
            hint = {
                "parent_id": "a user message is followed by its answers; to change it, send it with 'edit'",
                "edit": "to answer again, use 'regenerate'",
                "regenerate": "to send a user message again changed, use 'edit'",
            }[field_name]
            raise invalid(
                f"'{field_name}' must name {'an answer' if role == 'assistant' else 'a user message'};"
                f" '{target_id}' is {'an answer' if target['role'] == 'assistant' else 'a user message'}"
                f" ({hint})."
            )
        if chat.parent_id:
            start = target_id
        elif chat.edit:
            start = target["parent_id"]
        else:
            if target["parent_id"] is None:
                raise invalid(
                    f"Answer '{target_id}' answers no stored message (its question was purged), so it"
                    " cannot be regenerated."
                )
            question, question_id, new_question = target["parent_content"], target["parent_id"], False
            if target["parent_tool_results"] is not None:
                results = json.loads(target["parent_tool_results"])
            start = target["grandparent_id"]
    summarizing = settings.summaries == "on"
    conversation, history = await store.tree.chat_context(
        owner,
        session_id,
        2 * settings.max_context_messages + 2,
        start,
        current=target_id is None,
        summaries=summarizing,
    )
    if target_id is None:
        start = conversation and conversation["current_message_id"]
    if results is not None and new_question:  # the answer they follow must be the one waiting for them
        if not history or history[0]["id"] != start:
            raise invalid("'tool_results' answer the calls of an answer: this conversation has none to answer.")
        check_results(history[0], results)
    # above every id the conversation holds now (what the model is sent, the parent, the context's
    # start), whatever this process's clock says
    after = conversation["last_id"] if conversation else ""
    if new_question:
        question_id = new_message_id(after)
    model = chat.model or (conversation and conversation["model"]) or settings.chat_model
    system_prompt = (conversation and conversation["system_prompt"]) or settings.system_prompt
    new: str | list[dict]
    new_files: list[FileRow] = []
    if results is not None:
        new, question = results, ""
    else:
        assert question is not None
        new = question
        new_files = await turn_files(store, owner, chat.files if new_question else None, question_id)
    window = settings.context_window.of(model) if settings.context_window is not None else None
    asked = chat.options.get("max_tokens")
    if window is not None and asked is not None and settings.window_room(window, asked) < window // CONTEXT_ROOM_SHARE:
        raise ContextTooLong(
            f"'max_tokens' ({asked}) leaves too little of {model}'s context window ({window} tokens,"
            f" CHATSVC_CONTEXT_WINDOW) for the conversation: ask for at most"
            f" {window - window // 16 - window // CONTEXT_ROOM_SHARE} tokens."
        )
    summary = None
    if summarizing:  # the newest summary on the path stands for it and everything before
        history, summary = summarized_history(history)
    user_ids = [row["id"] for row in history if row["has_files"]]
    history_files = await store.files.of_messages(owner, user_ids) if user_ids else {}
    messages = build_context(
        system_prompt,
        history,
        new,
        settings.max_context_messages,
        settings.context_budget(model, chat.options.get("max_tokens")),
        history_files,
        new_files,
        settings.max_context_images,
        summary,
    )
    await attach_files(store.files, messages)
    seen = model
    if image_parts(messages) and not settings.sees(model):
        if settings.vision_model is None:
            raise FileRefused(
                422,
                "vision_model_needed",
                f"This conversation's context holds images and {model} cannot see them. Set CHATSVC_VISION_MODEL"
                ' (e.g. qwen3-vl-plus), or send "model" with a vision model.',
            )
        seen = settings.vision_model
    title = None
    if results is None and settings.titles != "off" and (conversation is None or conversation["title"] is None):
        said = question.strip() or ", ".join(row.name for row in new_files)  # a message of files only: their names
        title = (said.splitlines() or [""])[0][:TITLE_CHARS] or None
    turn = Turn(owner, session_id, new_message_id(after), seen, question_id, question, new_question, start, title)
    if results is not None and new_question:
        turn.tool_results = json.dumps(results, ensure_ascii=False, separators=(",", ":"))
    if new_question:
        turn.files = [row.id for row in new_files]
    turn.search = turn_search(settings, chat.web_search, conversation and conversation["web_search"])
    if turn.search is not None and image_parts(messages):  # the native endpoint takes text parts only
        raise ApiError(
            422,
            "web_search_unsupported",
            "This turn searches the web, and a searched turn goes to DashScope's native text-generation"
            " endpoint, which takes no images; this conversation's context holds images. "
            + (
                "Send the question in a conversation without images (CHATSVC_WEB_SEARCH=always searches every turn)."
                if settings.web_search == "always"
                else 'Send "web_search": false for this turn, or ask in a conversation without images.'
            ),
        )
    return turn, messages, seen != model


def turn_search(settings: Settings, asked: dict | bool | None, stored: str | None) -> dict | None:
    """The search options of a turn (None: it does not search): CHATSVC_WEB_SEARCH=off, never; else the
    request's `web_search` (false: none), else the conversation's, else, when `always`, the defaults."""
    if settings.web_search == "off" or asked is False:
        return None
    if isinstance(asked, dict):
        return asked
    if stored is not None:
        return json.loads(stored)
    return {} if settings.web_search == "always" else None


@dataclass
class Continuation:
    """A turn that continues a stored answer (`{"continue": id}`): the answer as it was read, which
    begin_continuation takes back to `streaming` if it is still so. Its new events come after every
    id the answer had (`base`: its `start`'s; the answer's last event, its earlier end, was `old_seq`)."""

    owner: str
    session_id: str
    answer_id: str
    model: str
    question_id: str | None  # the user message it answers
    status: str  # as it was: stopped, interrupted, failed or complete (length)
    old_seq: int  # its last_seq as read (-1: none stored)
    old_final: bytes  # its end as a reader got it (stored_final_event): what its id `old_seq` carried
    text: str
    reasoning: str | None
    steps: list[dict]
    usage: dict | None  # the earlier parts' usage (None: not known), to which the continuation's adds
    cost_micros: int | None
    currency: str | None
    hold: Hold | None = None
    sources: list[dict] | None = None  # an answer from the web's: kept, and said again by the whole's end
    generation: int = 0  # the row's `continued` once begin_continuation took it back: its producer's (AnswerRows)

    @property
    def base(self) -> int:
        return self.old_seq + 1


def not_continuable(row: dict) -> str | None:
    """Why this stored answer cannot be continued (None: it can): CONTRACT.md, "Continuing an answer"."""
    status, reason = row["status"], row["finish_reason"]
    if status == STREAMING:
        return None  # the conversation's answer slot says it (409 conversation_busy)
    if reason in (TOOL_CALLS, TOOL_ROUNDS):
        return "it waits for tool results (answer its calls with 'tool_results')"
    if status == COMPLETE and reason != "length":
        return "it is complete (only an answer cut at max_tokens, finish_reason 'length', goes on)"
    if not row["content"]:
        return "it has no text to continue (regenerate it instead)"
    if status not in (COMPLETE, STOPPED, INTERRUPTED, FAILED):
        return f"it is {status}"
    return None


async def plan_continuation(
    store: Store, settings: Settings, key: tuple[str, str], chat: ChatRequest
) -> tuple[Continuation, list[dict], bool]:
    """The answer a `continue` goes on with, and what the model is sent: the context of a regeneration
    of that answer (its question and the history before it), then its stored text as the last message,
    as CHATSVC_CONTINUE_STYLE asks (continue_payload). Refused: 404 when it is not an answer of the
    conversation, 409 not_continuable when its text cannot go on."""
    owner, session_id = key
    assert chat.continue_id is not None
    row = await store.tree.message(owner, session_id, chat.continue_id)
    if row is None or row["role"] != "assistant" or row["tool_results"] is not None:
        raise NotFound(f"Conversation '{session_id}' has no answer '{chat.continue_id}' ('continue' names an answer).")
    if row["status"] == STREAMING:
        raise busy(session_id)
    why = not_continuable(row)
    if why is None and len(row["content"]) + len(row["reasoning_content"] or "") >= settings.max_answer_chars:
        why = "it is as long as an answer may be (CHATSVC_MAX_ANSWER_CHARS)"
    if why is None and await store.tree.siblings(owner, session_id, {row["id"]}):
        why = "it has replies (continuing it would change the text later turns answered; regenerate or edit instead)"
    if why is not None:
        raise NotContinuable(f"Answer '{row['id']}' cannot be continued: {why}.")
    regeneration = ChatRequest(None, chat.model or row["model"], chat.options, regenerate=row["id"])
    turn, messages, switched = await plan_turn(store, settings, key, regeneration)
    cont = Continuation(
        owner,
        session_id,
        row["id"],
        turn.model,
        row["parent_id"],
        row["status"],
        -1 if row["last_seq"] is None else row["last_seq"],
        stored_final_event(row),
        row["content"],
        row["reasoning_content"],
        json.loads(row["tool_steps"]) if row["tool_steps"] else [],
        row_usage(row),
        row["cost_micros"],
        row["currency"],
        sources=stored_json(row.get("sources")),
    )
    return cont, messages, switched


def continue_payload(style: str, payload: dict, text: str) -> dict:
    """The model request that continues `text` (CHATSVC_CONTINUE_STYLE): `partial`, DashScope's partial
    mode (the text as the last message, an assistant's with `"partial": true`, and `enable_thinking`
    false, which it requires; the model service sends only what follows it); `continue_final_message`,
    vLLM's (the last message left open, no generation prompt); `prefill`, a trailing assistant message,
    which llama.cpp's server and Ollama continue. The request's own options (a given `enable_thinking`
    false among them) go as for any turn."""
    last: dict[str, Any] = {"role": "assistant", "content": text}
    if style == "partial":
        last["partial"] = True
    body = {**payload, "messages": [*payload["messages"], last]}
    if style == "partial":
        body["enable_thinking"] = False  # partial mode refuses thinking
    if style == "continue_final_message":
        body.update(continue_final_message=True, add_generation_prompt=False)
    return body


async def turn_files(store: Store, owner: str, file_ids: list[str] | None, question_id: str) -> list[FileRow]:
    """The files of the message a turn answers: those the request names (`file_ids`), each a ready file
    of the owner's with text if it is a document; or, for a regeneration (None), its question's."""
    if file_ids is None:
        return (await store.files.of_messages(owner, [question_id])).get(question_id, [])
    rows = [await store.files.get(owner, file_id) for file_id in file_ids]
    for row in rows:
        if row.kind == "document" and row.text_note == "no_text":
            raise FileRefused(
                422,
                "document_has_no_text",
                f"{row.name} has no text layer (a scanned PDF?); send its pages as images.",
            )
    return rows


# ── Context: what the model sees ───────────────────────────────────────────────────────


_WORD_BYTES = (string.ascii_letters + " ").encode()
_NON_ASCII_BYTES = bytes(range(128, 256))


def estimate_tokens(text: str) -> int:
    """A token count that errs high, for Qwen's tokenizer (bench/tokens.py measures it): ASCII letters
    and spaces four to a token, every other ASCII character (digit, punctuation, line end) one token,
    non-ASCII text one token per three UTF-8 bytes (a CJK character one, an emoji about 1.3), plus the
    chat template's five tokens of framing per message. Three passes in C over the text's bytes."""
    data = text.encode("utf-8", "surrogatepass")
    rest = data.translate(None, _WORD_BYTES)  # digits, punctuation, line ends and every non-ASCII byte
    symbols = len(rest.translate(None, _NON_ASCII_BYTES))
    return (len(data) - len(rest) + 3) // 4 + symbols + (len(rest) - symbols + 2) // 3 + 5


def history_arguments(arguments: str) -> str:
    """A call's arguments as the model is sent them back: what it wrote, when that is a JSON object
    (`""` is `{}`); else `{}` (servers that parse the history would refuse the request; the call's
    result told the model what was wrong)."""
    if not arguments.strip():
        return "{}"
    try:
        return arguments if isinstance(json.loads(arguments), dict) else "{}"
    except ValueError:
        return "{}"


def history_call(call: dict) -> dict:
    """A call, in an assistant message of the history."""
    return {
        "id": call["id"],
        "type": "function",
        "function": {"name": call["name"], "arguments": history_arguments(call["arguments"])},
    }


def tool_message(call_id: str, content: str | None, error: str | None) -> dict:
    """A call's result, as the model is sent it: its text, or its error said as one."""
    return {"role": "tool", "tool_call_id": call_id, "content": content if error is None else f"Error: {error}"}


def omitted(message: dict) -> dict:
    """A tool message whose result is left out to fit the context budget, with its length."""
    return {**message, "content": f"[result omitted to fit the context: {len(message['content'])} characters]"}


def answer_messages(row: dict, answered: dict[str, str]) -> list[dict]:
    """A stored answer as the model is sent it back: each tool round's text and calls, then each
    call's result in call order, then the rest of its text. `answered`: the app's results for its
    last round's calls (the turn that follows it), by call id. A call without a result is left out
    (the answer was stopped or cut during it, or the app never answered it)."""
    content = row["content"]
    if not row["tool_steps"]:
        return [{"role": "assistant", "content": content}]
    steps = json.loads(row["tool_steps"])
    results = {step["data"]["id"]: step["data"] for step in steps if step["type"] == "tool_result"}
    rounds: dict[int, list[dict]] = {}
    for step in steps:
        if step["type"] == "tool_call":
            rounds.setdefault(step["data"]["round"], []).append(step)
    messages: list[dict] = []
    at = 0
    for calls in rounds.values():
        kept = [step["data"] for step in calls if step["data"]["id"] in results or step["data"]["id"] in answered]
        if not kept:
            continue  # its text goes with the next text
        end = calls[0]["text"]
        messages.append(
            {"role": "assistant", "content": content[at:end], "tool_calls": [history_call(c) for c in kept]}
        )
        for call in kept:
            result = results.get(call["id"])
            if result is not None:
                messages.append(tool_message(call["id"], result.get("content"), result.get("error")))
            else:
                messages.append(tool_message(call["id"], answered[call["id"]], None))
        at = end
    if content[at:] or not messages:
        messages.append({"role": "assistant", "content": content[at:]})
    return messages


# A user message's files in its turn of the context (docs/design/files.md 2.7): documents become text
# before its own, images image parts of their model copies (read only for the messages the context keeps).

IMAGE_PART_TOKENS = 1282  # an image part whose size is not known here: DashScope's default cap (1,280) + 2 markers
_DOCUMENT_CLOSE = re.compile("</document", re.I)


def attribute(value: str) -> str:
    """`value` inside a double-quoted XML attribute."""
    return value.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;").replace(">", "&gt;")


def document_open(row: FileRow) -> str:
    pages = f' pages="{row.pages}"' if row.pages is not None else ""
    return f'<document name="{attribute(row.name)}" type="{attribute(row.media_type)}"{pages}>'


def document_text(row: FileRow, text: str) -> str:
    """A document as the model reads it: its text between delimiters that name it. A `</document>` in
    the text is written `</document\u200b>`, so a document cannot close its own delimiter and pass
    what follows for the user's words."""
    inside = _DOCUMENT_CLOSE.sub(lambda match: match.group() + "\u200b", text)
    return f"{document_open(row)}\n{inside}\n</document>"


def document_tokens(text: str) -> int:
    """A document's text's estimated tokens as `document_text` writes it: each escape adds a U+200B
    (three UTF-8 bytes: at most one token of estimate_tokens)."""
    return estimate_tokens(text) + len(_DOCUMENT_CLOSE.findall(text))


def document_cost(row: FileRow) -> int:
    """A document's tokens in the context: its text's (estimated once, at upload) and its delimiters'."""
    return (row.text_tokens or 0) + estimate_tokens(document_open(row) + "\n\n</document>\n\n") - 5


def image_not_shown(row: FileRow) -> str:
    return f"[image: {row.name}, not shown again]"


@dataclass
class FilesTurn:
    """A user message of the context that carries files, before their texts and model copies are read
    (`attach_files` makes it the message's `content`): its text, and each file with whether it is shown
    (an image past CHATSVC_MAX_CONTEXT_IMAGES is not: a line names it instead)."""

    text: str
    files: list[tuple[FileRow, bool]]

    def cost(self) -> int:
        said = [image_not_shown(row) for row, shown in self.files if row.kind == "image" and not shown]
        cost = estimate_tokens("\n\n".join([*said, self.text]))
        for row, shown in self.files:
            if row.kind == "document":
                cost += document_cost(row)
            elif shown:
                cost += image_tokens(row.model_width or 1, row.model_height or 1)
        return cost

    def content(self, inputs: dict[str, tuple[str | None, bytes | None, str | None]]) -> str | list[dict]:
        """The message's `content`: a string (its documents, then its text) unless an image is shown;
        then a list of one `image_url` part per shown image, in order, and a `text` part."""
        texts, images = [], []
        for row, shown in self.files:
            text, copy, media_type = inputs.get(row.id, (None, None, None))
            if row.kind == "document":
                texts.append(document_text(row, text or ""))
            elif shown and copy:
                url = f"data:{media_type};base64,{base64.b64encode(copy).decode()}"
                images.append({"type": "image_url", "image_url": {"url": url}})
            else:
                texts.append(image_not_shown(row))
        text = "\n\n".join([*texts, self.text] if self.text else texts)
        if not images:
            return text
        return [*images, {"type": "text", "text": text}] if text else images


def files_turn(text: str, files: list[FileRow], images_left: int) -> tuple[FilesTurn, int]:
    """A message's files in the context, its images shown while `images_left` allows; and what is left."""
    shown = []
    for row in files:
        show = row.kind == "image" and images_left > 0
        images_left -= show
        shown.append((row, show))
    return FilesTurn(text, shown), images_left


async def attach_files(files: Files, messages: list[dict]) -> None:
    """The context's messages with files get their content: documents' texts and shown images' model
    copies read in one call, for these messages only (never the whole history's bytes)."""
    turns = [m["content"] for m in messages if isinstance(m["content"], FilesTurn)]
    wanted = [row.id for turn in turns for row, shown in turn.files if row.kind == "document" or shown]
    inputs = await files.model_inputs(dict.fromkeys(wanted)) if wanted else {}
    for message in messages:
        if isinstance(message["content"], FilesTurn):
            message["content"] = message["content"].content(inputs)


def image_parts(messages: list[dict]) -> int:
    """How many images these messages show the model."""
    return sum(part["type"] == "image_url" for m in messages if isinstance(m["content"], list) for part in m["content"])


def content_tokens(content: str | list[dict] | FilesTurn | None) -> int:
    """A message content's estimated tokens: its text, its parts, or its files (FilesTurn.cost)."""
    if isinstance(content, FilesTurn):
        return content.cost()
    if isinstance(content, list):
        return sum(estimate_tokens(part["text"]) if part["type"] == "text" else IMAGE_PART_TOKENS for part in content)
    return estimate_tokens(content or "")


def message_cost(messages: list[dict]) -> int:
    cost = 0
    for message in messages:
        cost += content_tokens(message["content"])
        for call in message.get("tool_calls", ()):
            cost += estimate_tokens(call["function"]["name"] + call["function"]["arguments"])
    return cost


def summarized_history(history_newest_first: list[dict]) -> tuple[list[dict], str | None]:
    """A path's messages after its newest summary, and that summary's text (None: the path has none)."""
    for at, row in enumerate(history_newest_first):
        if row.get("summary") is not None:
            return history_newest_first[:at], row["summary"]
    return history_newest_first, None


SUMMARY_OPEN = "<summary of the earlier conversation>"
SUMMARY_CLOSE = "</summary of the earlier conversation>"


def with_summary(system_prompt: str, summary: str | None) -> str:
    """The system prompt with the summary of what the context no longer holds after it, as a
    delimited section (one system message: some chat templates refuse a second one)."""
    if summary is None:
        return system_prompt
    inside = summary.replace(SUMMARY_CLOSE, SUMMARY_CLOSE.replace("</", "<\\/"))
    return f"{system_prompt}\n\n{SUMMARY_OPEN}\n{inside}\n{SUMMARY_CLOSE}"


def build_context(
    system_prompt: str,
    history_newest_first: list[dict],
    new: str | list[dict],
    max_messages: int,
    max_tokens: int,
    files: dict[str, list[FileRow]] | None = None,
    new_files: Collection[FileRow] = (),
    max_images: int = 0,
    summary: str | None = None,
) -> list[dict]:
    """System prompt, then the newest usable history within both budgets (in order), then the new
    turn: the user's message, or the app's tool results (`new`: [{"tool_call_id", "content"}], sent
    after the calls they answer, in call order). Failed turns and empty answers are left out, with
    the turn that led to them. A stored answer's tool rounds are sent as the model made them;
    walking back from the newest, results that do not fit are omitted (with their length) before
    older messages are left out.

    Files: `files` holds the history's user messages' files (by message id), `new_files` the new
    message's. A user message with files has a FilesTurn as its content (attach_files reads what it
    shows); its documents always go with it, its images while `max_images` allows, counted from the
    new message back (the new message's always: more than `max_images` in it is a refusal). The new
    message is never cut: if it does not fit alone, the turn is refused.

    `summary`: the text of the summary that stands for the history before `history_newest_first`,
    sent inside the system message (with_summary)."""
    system_prompt = with_summary(system_prompt, summary)
    results_turn = not isinstance(new, str)
    files = files or {}
    if isinstance(new, str):
        images = sum(row.kind == "image" for row in new_files)
        if images > max_images:
            raise FileRefused(
                422,
                "too_many_images",
                f"This message carries {images} images and at most {max_images} are sent to the model"
                " (CHATSVC_MAX_CONTEXT_IMAGES); send fewer at once.",
            )
        if new_files:
            turn, images_left = files_turn(new, list(new_files), max_images)
            new_messages: list[dict] = [{"role": "user", "content": turn}]
        else:
            new_messages, images_left = [{"role": "user", "content": new}], max_images
    else:
        new_messages, images_left = [tool_message(r["tool_call_id"], r["content"], None) for r in new], max_images
    system_cost, new_cost = estimate_tokens(system_prompt), message_cost(new_messages)
    if system_cost >= max_tokens:
        raise ContextTooLong(
            f"The conversation's system prompt (about {system_cost} tokens) leaves no room in the"
            f" context budget ({max_tokens} tokens, CHATSVC_MAX_CONTEXT_TOKENS). Shorten the system prompt."
        )
    budget = max_tokens - system_cost - new_cost
    documents = [row for row in new_files if row.kind == "document"]
    if budget < 0 and documents:
        largest = max(documents, key=document_cost)
        raise FileRefused(
            422,
            "document_too_large",
            f"{largest.name} is about {document_cost(largest):,} tokens; with your message this turn needs"
            f" {system_cost + new_cost:,} and at most {max_tokens:,} fit (CHATSVC_MAX_CONTEXT_TOKENS). Send a"
            " smaller document or a part of it.",
        )
    if budget < 0:
        raise ContextTooLong(
            f"The message is too long for the model's context budget ({max_tokens} tokens, about "
            f"{new_cost} needed for the message alone). Shorten it."
        )
    usable = usable_history(history_newest_first)
    fresh = {r["tool_call_id"]: r["content"] for r in new} if not isinstance(new, str) else {}
    answered = fresh  # the app's results for the calls of the next older answer
    picked: list[list[dict]] = []
    for row in usable:
        if len(picked) >= max_messages:
            break
        if row["role"] == "assistant":
            messages, answered = answer_messages(row, answered), {}
        elif row["tool_results"]:  # sent with the answer whose calls they answer (in call order)
            answered = {r["tool_call_id"]: r["content"] for r in json.loads(row["tool_results"])}
            picked.append([])
            continue
        elif files.get(row["id"]):
            turn, left = files_turn(row["content"], files[row["id"]], images_left)
            messages, answered = [{"role": "user", "content": turn}], {}
        else:
            messages, answered = [{"role": "user", "content": row["content"]}], {}
        cost = message_cost([m for m in messages if m.get("tool_call_id") not in fresh])  # the new ones are counted
        if cost > budget and any(m["role"] == "tool" for m in messages):  # its results left out first
            messages = [omitted(m) if m["role"] == "tool" and m["tool_call_id"] not in fresh else m for m in messages]
            cost = message_cost([m for m in messages if m.get("tool_call_id") not in fresh])
        if cost > budget:
            break
        budget -= cost
        if isinstance(messages[0]["content"], FilesTurn):
            images_left = left
        picked.append(messages)
    flat = [message for messages in reversed(picked) for message in messages]
    while flat and flat[0]["role"] != "user":  # the model expects a user turn first
        flat.pop(0)
    if results_turn:
        sent_ids = {m["tool_call_id"] for m in flat if m["role"] == "tool"}
        if not fresh.keys() <= sent_ids:
            raise ContextTooLong(
                f"The tool results and the calls they answer do not fit the model's context budget ({max_tokens}"
                " tokens, CHATSVC_MAX_CONTEXT_TOKENS). Send shorter results."
            )
        return [{"role": "system", "content": system_prompt}, *flat]
    return [{"role": "system", "content": system_prompt}, *flat, *new_messages]


# ── Upstream: DashScope's OpenAI-compatible streaming API ──────────────────────────────


class UpstreamError(Refusal):
    """A failure of the model service, already mapped to the contract's status and code."""

    def __init__(self, status: int, code: str, detail: str, retryable: bool = False, retry_after: float | None = None):
        super().__init__(detail, code, retry_after)
        self.status, self.retryable = status, retryable


# The HTTP status DashScope gives each error code, for errors that arrive inside a stream.
_CODE_STATUS = {
    "invalid_parameter_error": 400,
    "data_inspection_failed": 400,
    "Arrearage": 400,
    "invalid_api_key": 401,
    "AccessDenied": 403,
    "Model.AccessDenied": 403,
    "AllocationQuota.FreeTierOnly": 403,
    "model_not_found": 404,
    "model_not_supported": 404,
    "limit_requests": 429,
    "limit_burst_rate": 429,
    "insufficient_quota": 429,
    "internal_error": 500,
    "ModelServingError": 503,
    "ModelUnavailable": 503,
}


# How OpenAI-compatible servers say that the conversation is longer than the model's context:
# an identifier (OpenAI's and llama-cpp-python's `code` context_length_exceeded, llama.cpp's `type`
# exceed_context_size_error), else, on a 400/413, the message: DashScope's "Range of input length
# should be [1, N]", vLLM's and OpenAI's "This model's maximum context length is N tokens",
# llama.cpp's "request (N tokens) exceeds the available context size (M tokens)", llama-cpp-python's
# "Requested tokens (N) exceed context window of M", LiteLLM's "litellm.ContextWindowExceededError".
_OVERFLOW_IDS = frozenset({"context_length_exceeded", "exceed_context_size_error"})
_OVERFLOW_SAID = re.compile(
    r"input length|context length|too long|exceeds? (?:the available )?context|context ?window ?exceeded", re.I
)


def context_overflow(status: int, error: dict) -> bool:
    """Whether a model service's error says the conversation does not fit the model's context."""
    if str(error.get("code")) in _OVERFLOW_IDS or str(error.get("type")) in _OVERFLOW_IDS:
        return True
    return status in (400, 413) and _OVERFLOW_SAID.search(str(error.get("message") or "")) is not None


def upstream_error(status: int, error: Any, retry_after: float | None = None) -> UpstreamError:
    """Map a DashScope error (HTTP status + `{"code", "message"}`) to the contract. Keyed on
    `code` and status; `type` only where a server names the overflow there (context_overflow)."""
    error = error if isinstance(error, dict) else {}
    code = str(error.get("code") or "")
    said = str(error.get("message") or "").strip() or f"HTTP {status}"
    where = f"The model service answered {status}" + (f" ({code})" if code else "") + f": {said}"
    if code == "data_inspection_failed":
        return UpstreamError(
            422, "content_filtered", "The model service's content moderation rejected this conversation. " + where
        )
    if context_overflow(status, error):
        return UpstreamError(
            422,
            "context_too_long",
            "The conversation is longer than the model's context: set CHATSVC_CONTEXT_WINDOW to the model's"
            " context size in tokens (or CHATSVC_MAX_CONTEXT_TOKENS below it, leaving room for the answer) so that"
            " fewer old messages are sent, or clear the conversation's context. " + where,
        )
    if status in (401, 403) or code == "Arrearage":  # key, permission or billing: retrying cannot help
        return UpstreamError(
            502, "upstream_auth", "The model service rejected the configured API key or account. " + where
        )
    if status == 429:
        if code == "insufficient_quota":
            return UpstreamError(429, "upstream_rate_limited", "The model service's quota is used up. " + where)
        return UpstreamError(
            429,
            "upstream_rate_limited",
            "The model service is throttling requests. " + where,
            retryable=True,
            retry_after=retry_after,
        )
    if status in (502, 503, 504) or code in ("ModelServingError", "ModelUnavailable"):
        return UpstreamError(
            503,
            "upstream_unavailable",
            "The model service is overloaded. " + where,
            retryable=True,
            retry_after=retry_after,
        )
    if status >= 500:
        return UpstreamError(
            502, "upstream_error", "The model service failed. " + where, retryable=True, retry_after=retry_after
        )
    return UpstreamError(502, "upstream_error", "The model service refused the request. " + where)


def _stream_error_status(code: Any) -> int:
    """The HTTP status an error sent inside a stream stands for: DashScope's by its code, llama.cpp's
    is the status itself (`"code": 400`), else 500."""
    if type(code) is int or (isinstance(code, str) and code.isascii() and code.isdigit()):  # not "²"
        return int(code) if 400 <= int(code) <= 599 else 500
    return _CODE_STATUS.get(str(code), 500)


def _retry_after(headers: httpx.Headers) -> float | None:
    try:
        return max(0.0, float(headers.get("retry-after", "")))
    except ValueError:
        return None  # an HTTP-date or garbage: fall back to our own backoff


class SSEDecoder:
    """Incremental text/event-stream decoder over raw bytes.

    Works on bytes, not `aiter_lines()`, because str.splitlines() also splits on U+2028 and
    friends, which may occur inside JSON text. Takes `\\r\\n`, `\\r` and `\\n` line ends,
    lines split across reads (also between `\\r` and `\\n`), comment lines, `data:` with or
    without a space, and several `data:` lines per event (joined with `\\n`). Other fields
    (`event`, `id`, `retry`) are ignored: DashScope sends none."""

    _LINE_END = re.compile(rb"\r\n|\r|\n")

    def __init__(self) -> None:
        self._tail = b""  # an unfinished line
        self._data: list[bytes] = []  # data lines of the event being read
        self._after_cr = False  # the last read ended in \r: a leading \n is its other half
        self.status = 200  # the last `:HTTP_STATUS/NNN` line (DashScope's native endpoint sends one per event)

    def feed(self, chunk: bytes) -> list[str]:
        if self._after_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        buf = self._tail + chunk
        self._after_cr = buf.endswith(b"\r")
        lines = buf.split(b"\n") if b"\r" not in buf else self._LINE_END.split(buf)
        self._tail = lines.pop()
        events: list[str] = []
        for line in lines:
            if not line:  # a blank line ends the event
                if self._data:
                    events.append(b"\n".join(self._data).decode("utf-8"))
                    self._data = []
            elif line.startswith(b"data:"):
                value = line[5:]
                self._data.append(value[1:] if value.startswith(b" ") else value)
            elif line.startswith(b":HTTP_STATUS/") and line[13:].isdigit():  # DashScope's native stream
                self.status = int(line[13:])
            # other comment lines (":...") and other fields are ignored
        return events


@dataclass
class Delta:
    """What one upstream chunk adds to the answer."""

    content: str = ""
    reasoning: str = ""
    finish_reason: str | None = None
    usage: dict | None = None
    tool_calls: list[dict] | None = None  # the raw `delta.tool_calls` entries, for a ToolCallAccumulator
    sources: list[dict] | None = None  # a searched turn's sources (native endpoint: its first frame)
    searches: int | None = None  # ... and the searches it made so far (usage.plugins.search.count)


def parse_chunk(data: str) -> Delta:
    try:
        obj = json.loads(data)
    except ValueError:
        raise UpstreamError(502, "upstream_error", "The model service sent a stream event that is not JSON.") from None
    if not isinstance(obj, dict):
        raise UpstreamError(502, "upstream_error", "The model service sent a stream event that is not an object.")
    if "error" in obj:  # an error in place of a chunk, mid-stream
        error = obj["error"] if isinstance(obj["error"], dict) else {"message": str(obj["error"])}
        raise upstream_error(_stream_error_status(error.get("code")), error)
    delta = Delta(usage=sane_usage(obj.get("usage")))
    for choice in obj.get("choices") or ():
        d = choice.get("delta") or {}
        delta.content += d.get("content") or ""
        delta.reasoning += d.get("reasoning_content") or ""
        delta.finish_reason = choice.get("finish_reason") or delta.finish_reason
        if calls := d.get("tool_calls"):  # absent (or null) from every chunk but a tool call's
            delta.tool_calls = _tool_call_entries(calls, delta.tool_calls)
    if (
        "\\u0000" in data or "\\ud" in data or "\\uD" in data
    ):  # an escaped NUL or lone surrogate: neither can be stored everywhere or sent as UTF-8
        delta.content = _UNSTORABLE.sub("\ufffd", delta.content)
        delta.reasoning = _UNSTORABLE.sub("\ufffd", delta.reasoning)
    return delta


def _tool_call_entries(entries: Any, held: list[dict] | None) -> list[dict] | None:
    """A delta's `tool_calls`, kept raw (added to those of the chunk's earlier choices): a list's
    objects; anything else is dropped and logged."""
    if not isinstance(entries, list):
        log.warning("the model service sent tool_calls that are not a list; dropped: %.200r", entries)
        return held
    kept = [e for e in entries if isinstance(e, dict)]
    if len(kept) < len(entries):
        log.warning("the model service sent tool_calls entries that are not objects; dropped: %.200r", entries)
    return (held or []) + kept or None


# NUL (PostgreSQL's text refuses it) and lone surrogates (json.loads joins valid pairs, so any left is
# alone; UTF-8 cannot hold one).
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
USAGE_FIELDS = ("prompt_tokens", "completion_tokens", "total_tokens")
# ... and what DashScope details (design 1.1): `completion_tokens_details.reasoning_tokens` (within
# completion_tokens), `prompt_tokens_details.cached_tokens` (within prompt_tokens; a top-level
# `cached_tokens` is taken too, as some servers send it) and `.cache_creation_input_tokens`
USAGE_DETAILS = ("reasoning_tokens", "cached_tokens", "cache_creation_tokens")
MAX_TOKENS_STORED = 2**31 - 1  # an INTEGER column on PostgreSQL


def sane_usage(usage: Any) -> dict | None:
    """The usage the model service reported, as one flat dict of the counts a database column can
    hold (USAGE_FIELDS, then USAGE_DETAILS when sent): a usage that is not an object, or a count that
    is not a non-negative integer, is dropped (and logged)."""
    if not usage:
        return None
    if not isinstance(usage, dict):
        log.warning("the model service sent a usage that is not an object; dropped: %.200r", usage)
        return None
    completion = usage.get("completion_tokens_details")
    prompt = usage.get("prompt_tokens_details")
    completion = completion if isinstance(completion, dict) else {}
    prompt = prompt if isinstance(prompt, dict) else {}
    found = {name: usage.get(name) for name in USAGE_FIELDS}
    found["reasoning_tokens"] = completion.get("reasoning_tokens")
    found["cached_tokens"] = prompt.get("cached_tokens", usage.get("cached_tokens"))
    found["cache_creation_tokens"] = prompt.get("cache_creation_input_tokens")
    kept = {}
    for name, value in found.items():
        if type(value) is int and 0 <= value <= MAX_TOKENS_STORED:
            kept[name] = value
        elif value is not None:
            log.warning("the model service sent usage %s=%.100r; dropped", name, value)
    return kept or None


@dataclass(frozen=True)
class ToolCall:
    """A function call the model made in one round: its place among the round's calls (0, 1, …), the
    model's id for it, the function's name, and its arguments as the text the model wrote (not parsed
    here: whether they are a JSON object is for the code that runs the call to find out)."""

    index: int
    id: str
    name: str
    arguments: str


@dataclass
class _GatheredCall:
    """A call being gathered from a round's deltas."""

    index: int  # the model's `index` (Ollama gives several calls the same one)
    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)


class ToolCallAccumulator:
    """The function calls of one model round, gathered from its deltas however the server cuts them
    (docs/design/tools.md 1.2). Entries are keyed by `index`; an entry without one continues the call
    last seen. A non-empty `id` unlike the call's own (once it has one), or a `name` unlike the call's
    own (once it has one), starts another call at that index (Ollama and SGLang give successive calls
    the same index); an equal, empty or absent `id` continues it (DashScope sends `""`, SGLang repeats
    it, and an id may come after the name). `name` is taken once, never joined (llama.cpp sent it again).
    `arguments` strings are joined; an object (LiteLLM's ollama_chat) is the whole arguments,
    serialised; `null` or absent adds nothing. Feed it every delta of one attempt at a round; the
    round called tools when `calls()` is not empty, whatever its finish_reason."""

    def __init__(self) -> None:
        self._calls: list[_GatheredCall] = []  # in order of arrival
        self._held: dict[int, _GatheredCall] = {}  # the call an entry with this index continues
        self._last: _GatheredCall | None = None

    def feed(self, delta: Delta) -> None:
        for entry in delta.tool_calls or ():
            self._take(entry)

    def _take(self, entry: dict) -> None:
        index = entry.get("index")
        if type(index) is not int:  # missing (Ollama before 0.4.7): the call last seen
            index = 0 if self._last is None else self._last.index
        function = entry.get("function")
        function = function if isinstance(function, dict) else {}
        call_id, name, arguments = entry.get("id"), function.get("name"), function.get("arguments")
        call_id = call_id if isinstance(call_id, str) else ""
        call = self._held.get(index)
        another_id = call_id and call is not None and call.id and call_id != call.id
        another_name = isinstance(name, str) and name and call is not None and call.name and name != call.name
        if call is None or another_id or another_name:
            call = self._held[index] = _GatheredCall(index)
            self._calls.append(call)
        self._last = call
        if call_id and not call.id:
            call.id = call_id
        if isinstance(name, str) and name and not call.name:
            call.name = name
        if isinstance(arguments, str):
            call.arguments.append(arguments)
        elif arguments is not None:  # an object: the whole arguments, not a piece of them
            call.arguments[:] = [json.dumps(arguments, ensure_ascii=False)]

    def text(self) -> str:
        """Every call's arguments gathered so far, as one text (what the model wrote of them: the
        estimate of a round that reported no usage counts them, as the sweep's does, answer_output)."""
        return "".join("".join(call.arguments) for call in self._calls)

    def calls(self) -> list[ToolCall]:
        """The round's calls that have a name, in index order (arrival order within an index). A call
        the server gave no id is given one (`call_` and 24 hex digits); NUL and lone surrogates are
        replaced, as in text."""
        named = sorted((c for c in self._calls if c.name), key=lambda c: c.index)  # stable: arrival kept
        if len(named) < len(self._calls):
            log.warning("the model service sent %d tool call(s) without a name; dropped", len(self._calls) - len(named))
        for call in named:
            call.id = call.id or f"call_{uuid.uuid4().hex[:24]}"
        return [
            ToolCall(place, *(_UNSTORABLE.sub("\ufffd", s) for s in (c.id, c.name, "".join(c.arguments))))
            for place, c in enumerate(named)
        ]


# The ends of a stream that are not an answer's end. A stream is whole once a finish_reason came;
# `[DONE]` alone is no proof (llama-cpp-python sends it when another request interrupts an answer).
CUT_SHORT = (
    "The model service ended the stream before the answer was complete (no finish_reason came); a server"
    " that runs one request at a time ends a running answer this way when another request arrives."
)
FILTERED_ANSWER = (
    "The model service's content moderation stopped this answer before it said anything (finish_reason content_filter)."
)
EMPTY_ANSWER = (
    "The model service ended the answer (finish_reason {}) without any text. A proxy such as LiteLLM does"
    " this when the conversation is longer than the model's context: set CHATSVC_MAX_CONTEXT_TOKENS below"
    " the model's context size, or clear the context."
)
EMPTY_RESPONSE = (
    "The model service answered 200 without a single event. A server does this when it fails before"
    " its first token, most often because the conversation is longer than its context (llama-cpp-python's"
    " n_ctx): set CHATSVC_MAX_CONTEXT_TOKENS below the model's context size, or clear the context."
)


async def stream_completion(
    client: httpx.AsyncClient, settings: Settings, payload: dict, search: dict | None = None
) -> AsyncIterator[Delta]:
    """One streaming Chat Completions call. Yields deltas; raises UpstreamError for every failure,
    a stream that ends without a finish_reason included. With `search` (a searched turn's options),
    the same call is made to DashScope's native endpoint (native_body), whose frames parse_native
    reads into the same deltas, its sources and search count with them."""
    # identity: the raw body is the event stream (no decoder layer per read; proxies may ignore it, see below)
    headers = {
        "Authorization": f"Bearer {settings.dashscope_api_key}",
        "Accept": "text/event-stream",
        "Accept-Encoding": "identity",
    }
    url, parse = settings.dashscope_base_url + "/chat/completions", parse_chunk
    if search is not None:
        url, payload = settings.native_url or "", native_body(payload, search)
        headers["X-DashScope-SSE"] = "enable"
    finished, events, done = False, 0, False
    try:
        async with client.stream("POST", url, json=payload, headers=headers) as response:
            if response.status_code != 200:
                body = await response.aread()
                try:  # `{"error": {...}}`; older vLLM sends the error object itself
                    error = json.loads(body)
                    error = error.get("error", error)
                except (ValueError, AttributeError):
                    error = {"message": body[:200].decode("utf-8", "replace")}
                if search is not None:
                    error = native_error(error)
                raise upstream_error(response.status_code, error, _retry_after(response.headers))
            decoder = SSEDecoder()
            if search is not None:
                parse = functools.partial(parse_native, decoder)
            chunks = response.aiter_bytes() if "content-encoding" in response.headers else response.aiter_raw()
            async for raw in chunks:
                for data in decoder.feed(raw):
                    if data == "[DONE]":
                        done = True
                        break
                    events += 1
                    delta = parse(data)
                    finished = finished or delta.finish_reason is not None
                    yield delta
                else:
                    continue
                # [DONE]: the body's end follows at once. Read it, so that the connection goes back
                # to the pool; leaving it unread costs a new TCP (and TLS) handshake per answer.
                with anyio.move_on_after(1):
                    async for _ in chunks:
                        pass
                break
    except httpx.ConnectTimeout:
        raise UpstreamError(
            504,
            "upstream_timeout",
            f"Could not connect to the model service within {settings.upstream_connect_timeout:g} s.",
            retryable=True,
        ) from None
    except httpx.ReadTimeout:
        raise UpstreamError(
            504,
            "upstream_timeout",
            f"The model service sent nothing for {settings.upstream_idle_timeout:g} s.",
            retryable=True,
        ) from None
    except (httpx.ConnectError, httpx.PoolTimeout) as exc:
        raise UpstreamError(
            503,
            "upstream_unavailable",
            f"The model service at {settings.dashscope_base_url} is unreachable ({exc}).",
            retryable=True,
        ) from None
    except httpx.TransportError as exc:
        detail = (
            f"The connection to the model service failed mid-answer ({type(exc).__name__})."
            if events
            else f"The model service closed the connection before answering ({type(exc).__name__})."
        )
        raise UpstreamError(502, "upstream_error", detail, retryable=True) from None
    if not events and not done:  # not worth a retry: the same request fails the same way
        raise UpstreamError(502, "upstream_error", EMPTY_RESPONSE)
    if not finished:  # [DONE] or the body's end without a finish_reason: the answer is cut off
        raise UpstreamError(502, "upstream_error", CUT_SHORT, retryable=True)


# DashScope's native endpoint (POST …/api/v1/services/aigc/text-generation/generation, header
# X-DashScope-SSE: enable), for searched turns only: the compatible endpoint returns no sources
# (docs/CONTRACT.md, "Answers from the web"). The request holds the messages under `input` and every
# option under `parameters`; each event is `id:N`, `event:result`, `:HTTP_STATUS/200` and `data:` one
# JSON object: `output.choices[0].message` (content, reasoning_content, tool_calls: incremental with
# incremental_output), `finish_reason` the string "null" until the last, `output.search_info
# .search_results` (index, title, url, site_name, icon) in the first, and `usage` as running totals
# (input_tokens, output_tokens, total_tokens, plugins.search.count). No [DONE]: the body ends. An error is
# `{"code", "message", "request_id"}` (the HTTP status, or mid-stream `:HTTP_STATUS/NNN`).
NATIVE_OPTIONS = (
    "temperature", "top_p", "max_tokens", "enable_thinking", "tools", "tool_choice", "parallel_tool_calls",
)  # fmt: skip
# DashScope's native error codes, as the compatible endpoint's that upstream_error keys on
_NATIVE_CODES = {"DataInspectionFailed": "data_inspection_failed", "data_inspection_failed": "data_inspection_failed"}
MAX_SOURCES = 20  # a searched answer's sources, at most (the rest are dropped)
SOURCE_CHARS = {"title": 300, "url": 2000, "site": 200}  # a source's title, url and site, at most
WEB_URL = re.compile(r"https?://[^\s/?#]", re.I | re.ASCII)  # a source's URL: http(s) with a host


def native_body(payload: dict, search: dict) -> dict:
    """A Chat Completions body as DashScope's native endpoint takes it: the same model and messages,
    the same options (NATIVE_OPTIONS), and the search (its sources always asked for)."""
    parameters: dict[str, Any] = {"result_format": "message", "incremental_output": True}
    parameters.update((name, payload[name]) for name in NATIVE_OPTIONS if name in payload)
    parameters["enable_search"] = True
    parameters["search_options"] = {"enable_source": True, **search}
    return {"model": payload["model"], "input": {"messages": payload["messages"]}, "parameters": parameters}


def parse_native(decoder: SSEDecoder, data: str) -> Delta:
    """One event of DashScope's native stream, as the delta parse_chunk would make of the same."""
    try:
        obj = json.loads(data)
    except ValueError:
        raise UpstreamError(502, "upstream_error", "The model service sent a stream event that is not JSON.") from None
    if not isinstance(obj, dict):
        raise UpstreamError(502, "upstream_error", "The model service sent a stream event that is not an object.")
    output = obj.get("output")
    if not isinstance(output, dict):  # an error in place of an event: {"code", "message", "request_id"}
        raise upstream_error(decoder.status if decoder.status >= 400 else 500, native_error(obj))
    usage = obj.get("usage") if isinstance(obj.get("usage"), dict) else {}
    delta = Delta(usage=sane_usage(native_usage(usage)))
    plugins = usage.get("plugins")
    search = plugins.get("search") if isinstance(plugins, dict) else None
    count = search.get("count") if isinstance(search, dict) else None
    if type(count) is int and 0 <= count <= MAX_TOKENS_STORED:
        delta.searches = count
    info = output.get("search_info")
    if isinstance(info, dict) and isinstance(info.get("search_results"), list):
        # [] (frames that carry none, or a search that found nothing) is no sources: the first list
        # with a usable source is the search's
        delta.sources = web_sources(info["search_results"]) or None
    for choice in output.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        m = choice.get("message") if isinstance(choice.get("message"), dict) else {}
        delta.content += m.get("content") if isinstance(m.get("content"), str) else ""
        delta.reasoning += m.get("reasoning_content") if isinstance(m.get("reasoning_content"), str) else ""
        finish = choice.get("finish_reason")
        if finish and finish != "null":  # "null", the string, until the last event
            delta.finish_reason = str(finish)
        if calls := m.get("tool_calls"):
            delta.tool_calls = _tool_call_entries(calls, delta.tool_calls)
    if "\\u0000" in data or "\\ud" in data or "\\uD" in data:
        delta.content = _UNSTORABLE.sub("\ufffd", delta.content)
        delta.reasoning = _UNSTORABLE.sub("\ufffd", delta.reasoning)
    return delta


def native_error(body: Any) -> dict:
    """A native error body as upstream_error takes one (the compatible endpoint's codes where they differ)."""
    error = body if isinstance(body, dict) else {}
    code = error.get("code")
    return {**error, "code": _NATIVE_CODES.get(str(code), code)}


def native_usage(usage: dict) -> dict:
    """A native usage's counts under the Chat Completions names sane_usage reads."""
    return {
        "prompt_tokens": usage.get("input_tokens"),
        "completion_tokens": usage.get("output_tokens"),
        "total_tokens": usage.get("total_tokens"),
        "completion_tokens_details": usage.get("output_tokens_details"),
        "prompt_tokens_details": usage.get("prompt_tokens_details"),
    }


def web_sources(results: list) -> list[dict]:
    """A search's results as the API shows them: `[{"index", "title", "url", "site"}]` (the icon is
    not kept: chatsvc never fetches it); an entry without an integer index or an http(s) URL is dropped
    (a `javascript:` or `data:` link would reach every client that renders `<a href>`)."""
    sources = []
    for entry in results[:MAX_SOURCES]:
        if not isinstance(entry, dict) or type(entry.get("index")) is not int or not isinstance(entry.get("url"), str):
            continue
        if not WEB_URL.match(entry["url"]):
            continue
        text = {name: entry.get(key) if isinstance(entry.get(key), str) else "" for name, key in
                (("title", "title"), ("url", "url"), ("site", "site_name"))}  # fmt: skip
        sources.append(
            {"index": entry["index"], **{k: _UNSTORABLE.sub("\ufffd", v[: SOURCE_CHARS[k]]) for k, v in text.items()}}
        )
    return sources


def backoff(attempt: int, retry_after: float | None = None) -> float:
    return retry_after if retry_after is not None else min(8.0, 0.5 * 2**attempt)


async def retried(
    settings: Settings,
    metrics: Metrics,
    purpose: str,
    call: Callable[[], Awaitable[None]],
    said: Callable[[], bool],
    on_retry: Callable[[], None] | None = None,
) -> None:
    """Make one upstream call (`call`, for an answer or a title: the metrics' `purpose`), retried
    with backoff (or the service's Retry-After) up to CHATSVC_UPSTREAM_RETRIES times when it fails
    in a way worth retrying, and only while nothing of it has reached anyone (`said()` is False)."""
    for attempt in range(settings.upstream_retries + 1):
        try:
            await call()
        except UpstreamError as exc:
            metrics.upstream_call(purpose, exc)
            if said() or not exc.retryable or attempt == settings.upstream_retries:
                raise
            if on_retry is not None:
                on_retry()
            metrics.retries.labels(purpose).inc()
            await asyncio.sleep(backoff(attempt, exc.retry_after))
        else:
            metrics.upstream_call(purpose, None)
            return


def new_upstream_client(settings: Settings) -> httpx.AsyncClient:
    """One shared client: connections are reused across answers, and bounded."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(settings.upstream_idle_timeout, connect=settings.upstream_connect_timeout),
        limits=httpx.Limits(max_connections=1000, max_keepalive_connections=100),
        trust_env=False,
    )


# ── Tools: the MCP servers, their tools, and the calls an answer makes ─────────────────
# One supervisor task per configured server holds its connection (the `mcp` SDK's `Client`, entered
# by that task alone: the SDK cancels the task that entered it when a connection breaks): it
# connects, lists the tools, publishes them, pings the idle connection, and reconnects after 1, 2,
# 4 ... 60 s when the connection is lost. A server that is down is logged and retried; it never
# delays the start. Answers call tools from their own tasks through `Toolbox.run`, which never
# raises. `mcp` is imported here only, and only when servers are configured (the `mcp` extra).

MCP_CONNECT_SECONDS = 30.0  # to connect and list the tools, else the attempt fails (and is retried)
# An idle connection is probed this often (its tools' first page listed: MCP's ping is gone from the
# protocol since 2026-07-28, and works only with the handshake-era one); a probe that fails is a loss.
MCP_PING_SECONDS = 15.0
MCP_PING_TIMEOUT = 10.0
MCP_RETRY_SECONDS = (1, 2, 4, 8, 16, 32, 60)
MCP_CLOSE_SECONDS = 2.0  # a session's DELETE at close, at most
MCP_STOP_SECONDS = 4.5  # stop() waits this long for connections to close (stdio: 2 s to exit, 2 s after SIGTERM)
MCP_LIST_PAGES = 100  # a server whose listing goes on longer is cut there
MCP_CONNECTION_CLOSED = -32000  # the SDK's MCPError code for a connection that is gone
TOOL_OUTCOMES = ("ok", "error", "timeout", "unavailable", "bad_arguments", "unknown_tool", "cancelled")

# (header, value) of the owner for the call this context makes: read by the HTTP client's request
# hook, which the SDK runs in the caller's context (the handshake, pings and DELETE carry none).
_tool_owner: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar("tool_owner", default=None)


@dataclass(frozen=True)
class ToolSpec:
    """A server tool as the model is offered it: `exposed` is `<server>__<tool>`, made to fit the
    model API's rule (^[a-zA-Z0-9_-]{1,64}$); events, steps and metrics name server and tool apart."""

    exposed: str
    server: str
    tool: str
    description: str
    parameters: dict

    def payload(self) -> dict:
        return {
            "type": "function",
            "function": {"name": self.exposed, "description": self.description, "parameters": self.parameters},
        }


@dataclass(frozen=True)
class ToolOutcome:
    """How one call went: `content` (ok) or `error` (the text the model sees), and why (TOOL_OUTCOMES)."""

    content: str | None
    error: str | None
    duration_ms: int
    outcome: str


def exposed_names(server: str, tools: Iterable[str]) -> dict[str, str]:
    """Each tool's exposed name, in listing order: `<server>__<tool>` with characters outside
    [a-zA-Z0-9_-] made `_`, cut to 64; a name taken by an earlier tool gets `_` + hex of the tool's
    SHA-1. Server names (no `__`, not ending in `_`) keep servers' names apart."""
    names: dict[str, str] = {}
    taken: set[str] = set()
    for tool in tools:
        base = f"{server}__{re.sub(r'[^a-zA-Z0-9_-]', '_', tool)}"
        name, digits = base[:64], 4
        while name in taken:
            suffix = "_" + hashlib.sha1(tool.encode("utf-8", "surrogatepass")).hexdigest()[:digits]
            name, digits = base[: 64 - len(suffix)] + suffix, digits + 2
        taken.add(name)
        names[tool] = name
    return names


def _object_schema(schema: Any) -> dict:
    """A tool's input schema as the model API takes it: an object schema, with `properties`; lone
    surrogates replaced (they cannot be sent as UTF-8: every answer offering the tool would fail)."""
    if not isinstance(schema, dict) or schema.get("type") != "object":
        return {"type": "object", "properties": {}}
    schema = json.loads(_UNSTORABLE.sub("\ufffd", json.dumps(schema, ensure_ascii=False)))
    return schema if "properties" in schema else {**schema, "properties": {}}


def tool_result_text(result: Any) -> str:
    """An MCP CallToolResult as text: text parts joined by newlines; an image or audio part as
    `[image image/png, N bytes]`; a resource link as its URI; an embedded resource as its text (or
    its URI); nothing but structured content: its JSON."""
    parts = []
    for part in result.content:
        kind = getattr(part, "type", None)
        if kind == "text":
            parts.append(part.text)
        elif kind in ("image", "audio"):
            size = len(part.data) * 3 // 4 - part.data[-2:].count("=")
            parts.append(f"[{kind} {part.mime_type}, {size} bytes]")
        elif kind == "resource_link":
            parts.append(str(part.uri))
        elif kind == "resource":
            text = getattr(part.resource, "text", None)
            parts.append(text if text is not None else f"[resource {part.resource.uri}]")
    if not parts and result.structured_content is not None:
        return json.dumps(result.structured_content, ensure_ascii=False)
    return "\n".join(parts)


RESULT_NOTE_CHARS = 100  # the note a cut result ends with, at most


def storable_result(text: str, limit: int) -> str:
    """A result or error as stored and sent: NUL and lone surrogates replaced, cut at `limit`."""
    text = _UNSTORABLE.sub("\ufffd", text)
    if len(text) > limit:
        text = f"{text[:limit]}\n[cut: the result had {len(text)} characters; the first {limit} are shown]"
    return text


_URL_USERINFO = re.compile(r"(\w+://)[^/\s@]*@")
_URL_QUERY = re.compile(r"(\w+://[^\s?#]*)[?#][^\s'\"]*")


def redact_urls(text: str) -> str:
    """An error's text without a URL's user info or query (either may hold a token)."""
    return _URL_QUERY.sub(r"\1?[redacted]", _URL_USERINFO.sub(r"\1", text))


def _describe(exc: BaseException) -> str:
    """An exception (or a group of them, from the SDK's task groups) in a short line, redacted."""
    while len(getattr(exc, "exceptions", ())) == 1:  # an exception group of one
        exc = exc.exceptions[0]  # type: ignore[attr-defined]
    text = str(exc)
    return redact_urls(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)[:300]


def _transport_failure(exc: BaseException) -> bool:
    """Whether a call failed because its connection did (the others: the tool's answer was not read)."""
    inner = getattr(exc, "exceptions", None)
    if inner is not None:  # an exception group, from the SDK's task groups
        return any(_transport_failure(e) for e in inner)
    return isinstance(
        exc, (OSError, httpx.TransportError, anyio.ClosedResourceError, anyio.BrokenResourceError, anyio.EndOfStream)
    )


class _Lost(Exception):
    """The connection to a server is gone (a failed call or ping): reconnect."""


class McpServer:
    """One configured server: its connection, held by its supervisor task, and its tools. The tools
    listed last stay offered while the server is down (a call gets an `unavailable` result)."""

    def __init__(self, config: McpServerConfig, settings: Settings, metrics: Metrics):
        self.config, self.name, self.metrics = config, config.name, metrics
        self.timeout = config.timeout or settings.tool_timeout
        self.result_chars = settings.max_tool_result_chars
        self.specs: list[ToolSpec] = []
        self.client: Any = None  # the mcp Client while the connection works
        self.error: str | None = None  # why the last attempt failed, for logs and `chatsvc --check`
        self.listed = asyncio.Event()  # set once the tools were listed (at least once)
        self.tried = asyncio.Event()  # set once the first attempt to connect has ended (either way)
        self.stopping = False
        self._wake = asyncio.Event()  # the connection is lost, or stop() was called
        self._scope: Any = None  # the anyio CancelScope around the connection
        self._renamed: set[str] = set()
        self.task: asyncio.Task | None = None
        metrics.mcp_server_up.labels(self.name).set(0)

    @property
    def up(self) -> bool:
        return self.client is not None

    def _transport(self) -> tuple[Any, httpx.AsyncClient | None]:
        """What the SDK's Client connects with, and the HTTP client to close after it (HTTP only)."""
        from mcp.client.stdio import StdioServerParameters
        from mcp.client.streamable_http import streamable_http_client

        c = self.config
        if c.command is not None:
            env = dict(c.env) if c.env is not None else None
            return StdioServerParameters(command=c.command, args=list(c.args), env=env, cwd=c.cwd), None

        async def on_request(request: httpx.Request) -> None:
            owner = _tool_owner.get()
            if owner is not None:  # the bytes the app sent (Starlette read them as latin-1; httpx writes str as UTF-8)
                name = owner[0].encode("latin-1")
                kept = [(k, v) for k, v in request.headers.raw if k.lower() != name.lower()]
                request.headers = httpx.Headers([*kept, (name, owner[1].encode("latin-1", "replace"))])
            if request.method == "DELETE":  # the session's end, at close: never hold the shutdown
                request.extensions["timeout"] = httpx.Timeout(MCP_CLOSE_SECONDS).as_dict()

        http = httpx.AsyncClient(
            headers=dict(c.headers),
            # A call's response may take the whole tool timeout: the read timeout must not end it first.
            timeout=httpx.Timeout(30, read=self.timeout + 30),
            event_hooks={"request": [on_request]},
            trust_env=False,
        )
        return streamable_http_client(c.url, http_client=http), http

    async def supervise(self) -> None:
        """Connect, serve, and reconnect after a loss, until stop(). The connection runs in a task of
        its own: whatever the SDK does to the task that entered the Client stays there."""
        failures = 0
        while not self.stopping:
            began = time.monotonic()
            connection = asyncio.create_task(self._connection(), name=f"mcp server {self.name}")
            try:
                await asyncio.wait({connection})
            except asyncio.CancelledError:  # stop() gave up waiting: end the connection too
                connection.cancel()
                raise
            if self.stopping:
                break
            exc = (asyncio.CancelledError() if connection.cancelled() else connection.exception()) or _Lost(
                "the connection ended"
            )
            self.error = _describe(exc)
            self.tried.set()
            if self.listed.is_set() and time.monotonic() - began > MCP_RETRY_SECONDS[-1]:
                failures = 0  # it worked for a while: start the backoff again
            delay = MCP_RETRY_SECONDS[min(failures, len(MCP_RETRY_SECONDS) - 1)]
            failures += 1
            log.warning("MCP server %s: %s; trying again in %g s", self.name, self.error, delay)
            self._wake.clear()  # (stop() sets `stopping` before it wakes this)
            if self.stopping:
                break
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    async def _connection(self) -> None:
        from mcp import Client
        from mcp.types import Implementation

        client_info = Implementation(name="chatsvc", version=__version__)
        target, http = self._transport()
        with anyio.CancelScope() as scope:
            self._scope = scope
            scope.deadline = anyio.current_time() + MCP_CONNECT_SECONDS
            try:
                async with Client(target, client_info=client_info, cache=None) as client:
                    self._publish(await self._list(client))
                    scope.deadline = math.inf
                    self.client, self.error = client, None
                    self.metrics.mcp_server_up.labels(self.name).set(1)
                    self.tried.set()
                    log.info("MCP server %s: connected, %d tool(s)", self.name, len(self.specs))
                    await self._watch(client)
            finally:
                self.client = None
                self.metrics.mcp_server_up.labels(self.name).set(0)
                if http is not None:
                    with anyio.CancelScope(shield=True):
                        await http.aclose()
        if scope.cancelled_caught and not self.stopping:
            raise TimeoutError(f"no connection and tool list within {MCP_CONNECT_SECONDS:g} s")

    async def _list(self, client: Any) -> list[Any]:
        tools, cursor = [], None
        for _ in range(MCP_LIST_PAGES):
            page = await client.list_tools(cursor=cursor)
            tools += page.tools
            if (cursor := page.next_cursor) is None:
                break
        else:
            log.warning(
                "MCP server %s lists more than %d pages of tools: the rest are left out", self.name, MCP_LIST_PAGES
            )
        return tools

    def _publish(self, tools: list[Any]) -> None:
        wanted = self.config.tools
        if wanted is not None:
            tools = [t for t in tools if t.name in wanted]
            missing = set(wanted) - {t.name for t in tools}
            if missing:
                log.warning("MCP server %s has no tool %s (its 'tools' in CHATSVC_MCP_SERVERS)", self.name, missing)
        names = exposed_names(self.name, [t.name for t in tools])
        for tool, exposed in names.items():
            if exposed != f"{self.name}__{tool}" and tool not in self._renamed:
                self._renamed.add(tool)
                log.info("MCP server %s: tool %r is offered to the model as %s", self.name, tool[:100], exposed)
        self.specs = [
            ToolSpec(
                names[t.name],
                self.name,
                t.name,
                _UNSTORABLE.sub("\ufffd", t.description or t.title or ""),
                _object_schema(t.input_schema),
            )
            for t in tools
        ]
        self.listed.set()

    async def _watch(self, client: Any) -> None:
        """Until stop() or a loss: an idle connection is probed (a server that died idle is noticed)."""
        while not self._wake.is_set():
            with anyio.move_on_after(MCP_PING_SECONDS):
                await self._wake.wait()
            if self._wake.is_set():
                break
            try:
                with anyio.fail_after(MCP_PING_TIMEOUT):
                    await client.list_tools(cache_mode="refresh")
            except Exception as exc:
                raise _Lost(f"a probe failed ({_describe(exc)})") from None
        if not self.stopping:
            raise _Lost("a call found the connection closed")

    def lose(self, client: Any) -> None:
        """A call found the connection of `client` gone: the supervisor reconnects (unless it has
        already: the call may have begun on an earlier connection)."""
        if client is not None and self.client is client:
            self.client = None
            self.metrics.mcp_server_up.labels(self.name).set(0)
            self._wake.set()

    def stop(self) -> None:
        self.stopping = True
        self._wake.set()
        if self.client is None and self._scope is not None:
            self._scope.cancel()  # connecting: a handshake may never answer

    async def call(self, spec: ToolSpec, arguments: str, owner: str) -> ToolOutcome:
        from mcp.shared.exceptions import MCPError

        started = time.perf_counter()

        def outcome(outcome: str, content: str | None = None, error: str | None = None) -> ToolOutcome:
            if content is not None:
                content = storable_result(content, self.result_chars)
            if error is not None:
                error = storable_result(error, self.result_chars)
            return ToolOutcome(content, error, round((time.perf_counter() - started) * 1000), outcome)

        try:
            args = json.loads(arguments) if arguments.strip() else {}
        except ValueError as exc:
            return outcome("bad_arguments", error=f"The arguments are not valid JSON ({exc}); send a JSON object.")
        if not isinstance(args, dict):
            return outcome("bad_arguments", error=f"The arguments are not a JSON object (got {type(args).__name__}).")
        client = self.client
        if client is None:
            return outcome("unavailable", error=f"The tool server '{self.name}' is not reachable now; try later.")
        token = _tool_owner.set((self.config.owner_header, owner) if self.config.owner_header and owner else None)
        try:
            with anyio.move_on_after(self.timeout) as deadline:
                result = await client.call_tool(spec.tool, args)
            if deadline.cancelled_caught:
                return outcome("timeout", error=f"The tool did not answer within {self.timeout:g} s; it was cancelled.")
        except MCPError as exc:
            if exc.code != MCP_CONNECTION_CLOSED:
                return outcome("error", error=f"The tool server answered with an error: {exc.message}")
            self.lose(client)
            return outcome("unavailable", error=f"The connection to the tool server '{self.name}' was lost.")
        except Exception as exc:
            if not _transport_failure(exc):  # e.g. a result unlike the tool's declared output schema
                log.warning(
                    "MCP server %s: the answer of %s could not be read (%s)", self.name, spec.tool, type(exc).__name__
                )
                return outcome("error", error=f"The tool's answer could not be read ({type(exc).__name__}).")
            log.warning("MCP server %s: call to %s failed: %s", self.name, spec.tool, _describe(exc))
            self.lose(client)
            return outcome("unavailable", error=f"The connection to the tool server '{self.name}' failed.")
        finally:
            _tool_owner.reset(token)
        text = tool_result_text(result)
        return outcome("error", error=text or "The tool failed.") if result.is_error else outcome("ok", content=text)


MAX_TOOL_LABELS = 200  # a server's tool names in the metrics, at most (the rest count as `other`)


class Toolbox:
    """All the configured MCP servers: their tools (`specs`, `find`) and the calls made to them
    (`run`). With no server configured it is empty and costs nothing."""

    def __init__(self, settings: Settings, metrics: Metrics):
        self.metrics = metrics
        self.servers = {c.name: McpServer(c, settings, metrics) for c in settings.mcp_servers}
        self._labelled: dict[str, set[str]] = {}  # the tool names each server's metrics are labelled with

    def start(self) -> None:
        """Spawn each server's supervisor; returns at once (a server down is retried, never waited for)."""
        for server in self.servers.values():
            if server.task is None:
                server.task = asyncio.create_task(server.supervise(), name=f"mcp supervisor {server.name}")

    async def stop(self) -> None:
        """Close every connection, bounded: a session's DELETE and a stdio server's exit get
        MCP_STOP_SECONDS; then the connections are cancelled, and then abandoned. Never raises."""
        try:
            tasks = {s.task for s in self.servers.values() if s.task is not None}
            for server in self.servers.values():
                server.stop()
            if not tasks:
                return
            _, pending = await asyncio.wait(tasks, timeout=MCP_STOP_SECONDS)
            for server in self.servers.values():
                if server.task in pending and server._scope is not None:
                    server._scope.cancel()  # anyio's cancel: the SDK's shielded stdio shutdown still runs
            if pending:
                _, pending = await asyncio.wait(pending, timeout=1)
            for task in pending:
                task.cancel()
            if pending:
                _, pending = await asyncio.wait(pending, timeout=0.5)
            for task in pending:
                log.warning("%s did not end at shutdown: left behind", task.get_name())
        except Exception:
            log.exception("closing the MCP servers failed")

    def specs(self, only: Collection[str] | None = None) -> list[ToolSpec]:
        """The server tools to offer, in configuration order; `only`: the exposed names to keep."""
        return [s for server in self.servers.values() for s in server.specs if only is None or s.exposed in only]

    def find(self, exposed: str) -> ToolSpec | None:
        server = self.servers.get(exposed.partition("__")[0])
        return next((s for s in server.specs if s.exposed == exposed), None) if server else None

    def count(self, server: str, tool: str, outcome: str) -> None:
        """A call the relay answered itself: a client tool (`client`, `-`) or an unknown name (`-`, `-`)."""
        self.metrics.tool_calls.labels(server, tool, outcome).inc()

    async def run(self, exposed: str, arguments: str, owner: str) -> ToolOutcome:
        """Run one call of the model's; never raises (a cancel is counted `cancelled`, then re-raised)."""
        spec = self.find(exposed)
        if spec is None:
            return self.unknown(exposed)
        started = time.perf_counter()
        try:
            result = await self.servers[spec.server].call(spec, arguments, owner)
        except asyncio.CancelledError:
            self._record(spec, "cancelled", started)
            raise
        except Exception as exc:  # a bug: the model still gets a result
            log.exception("tool call %s failed", exposed)
            result = ToolOutcome(None, f"The tool call failed inside chatsvc ({type(exc).__name__}).", 0, "error")
        self._record(spec, result.outcome, started)
        return result

    def unknown(self, exposed: str) -> ToolOutcome:
        """The result of a call to a name no offered tool has (counted `server="-", tool="-"`)."""
        self.count("-", "-", "unknown_tool")
        return ToolOutcome(None, storable_result(f"There is no tool named '{exposed[:100]}'.", 200), 0, "unknown_tool")

    def _record(self, spec: ToolSpec, outcome: str, started: float) -> None:
        # labels stay bounded when a server's tool list changes from one connection to the next
        labelled = self._labelled.setdefault(spec.server, set())
        if spec.tool not in labelled and len(labelled) < MAX_TOOL_LABELS:
            labelled.add(spec.tool)
        tool = spec.tool if spec.tool in labelled else "other"
        self.metrics.tool_calls.labels(spec.server, tool, outcome).inc()
        self.metrics.tool_seconds.labels(spec.server, tool).observe(time.perf_counter() - started)

    async def listed(self) -> None:
        """Until every server has listed its tools once (bound it with a timeout)."""
        for server in self.servers.values():
            await server.listed.wait()

    async def tried(self) -> None:
        """Until every server's first attempt to connect has ended, in success or failure."""
        for server in self.servers.values():
            await server.tried.wait()


# ── Answers: one answer's life, from the model to its readers and the store ────────────
# An answer belongs to the server, not to a connection. Its producer (a task) relays the model's
# deltas into the answer's event log at the model's pace and never waits for the database there;
# readers (the POST that started it, any number of channel listeners) follow the log from their
# own place. The text is saved on a clock by one checkpoint writer for all answers; the end goes
# to the readers only once the final state is stored (or, when the database fails for longer than
# CHATSVC_STORAGE_TIMEOUT, as `storage_failed` while the write goes on in the background).


def sse_event(event_id: str, payload: dict) -> bytes:
    """One SSE event, without an `event:` line (the seed client listens with onmessage)."""
    data = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"id: {event_id}\ndata: {data}\n\n".encode()


_json_string = json.encoder.encode_basestring  # what json.dumps(ensure_ascii=False) does to a str


def delta_event(event_id: str, type_: str, content: str) -> bytes:
    """sse_event(event_id, {"type": type_, "data": {"content": content}}), byte for byte, without
    json.dumps' dict walk: this is the one event per token."""
    return f'id: {event_id}\ndata: {{"type":"{type_}","data":{{"content":{_json_string(content)}}}}}\n\n'.encode()


def event_id(message_id: str, seq: int) -> str:
    """An event's id, `<message_id>:<seq>`: the answer it belongs to and its place in that answer's
    log. A reader sends it back as Last-Event-ID (parse_event_id)."""
    return f"{message_id}:{seq}"


def parse_event_id(value: str | None) -> tuple[str, int] | None:
    """The answer and place a Last-Event-ID names; None when it names none."""
    message_id, _, seq = (value or "").rpartition(":")
    return (message_id, int(seq)) if MESSAGE_ID.fullmatch(message_id) and ASCII_NUMBER.fullmatch(seq) else None


TOOL_CALLS = "tool_calls"  # the finish_reason of an answer that waits for the app's own tools
MAX_CALL_ID_CHARS = 200  # a call's id, at most (a longer one the model gives is replaced)
MAX_TOOL_NAME_CHARS = 1000  # a called name, at most (a longer one is cut: it names no tool anyway)
TOOL_ROUNDS = "tool_rounds"  # ... of one that still called tools after CHATSVC_MAX_TOOL_ROUNDS
DELTA_CHARS = 1000  # a delta event's text, at most: even all escaped, it fits a notification
BATCH_EVENTS = 64  # a reader catching up copies at most this many events per write
FINAL = ("end", "error")  # the event types that close an answer


def final_event(
    message_id: str,
    status: str,
    text: str,
    finish_reason: str | None,
    usage: dict | None,
    error: Refusal | None,
    tool_calls: list[dict] | None = None,
    cost: Cost | None = None,
    sources: list[dict] | None = None,
) -> tuple[str, dict]:
    """The `end` or `error` event that closes an answer (also rebuilt from a stored message). An
    answer that waits for the app's own tools (finish_reason `tool_calls`) lists their calls; its
    `usage` (shown_usage) when reported, its `cost` and `currency` when known (CHATSVC_PRICES)."""
    if error is None and status in (COMPLETE, STOPPED):
        # finish_reason as stored (a complete answer always has the model's); usage only when reported
        end = {"full_text": text, "message_id": message_id, "finish_reason": finish_reason}
        if finish_reason == TOOL_CALLS and tool_calls:
            end["tool_calls"] = tool_calls
        if usage is not None:
            end["usage"] = shown_usage(usage)
        if sources is not None:  # a searched answer's (docs/CONTRACT.md, "Answers from the web")
            end["sources"] = sources
        return "end", end if cost is None else {**end, **cost.shown()}
    return "error", {
        "message": error.detail if error else "The answer failed.",
        "code": error.code if error else "upstream_error",
        "message_id": message_id,
        "partial_text": text,
    }


def stored_error(row: dict) -> Refusal | None:
    if row["error_code"] is None:
        return None
    return Refusal(row["error_message"] or "The answer failed.", row["error_code"])


def stored_final_event(row: dict) -> bytes:
    """The final event of a stored answer, with the id of the last event its text covers."""
    calls = pending_tool_calls(json.loads(row["tool_steps"])) if row["tool_steps"] else None
    type_, data = final_event(
        row["id"], row["status"], row["content"], row["finish_reason"], row_usage(row, True), stored_error(row), calls,
        row_cost(row), stored_json(row.get("sources")),
    )  # fmt: skip
    return sse_event(event_id(row["id"], row["last_seq"]), {"type": type_, "data": data})


class Phase(Enum):
    """Where an answer is in its life. MOVES says which phase may follow which, and Answer.move
    refuses any other: a new phase (an answer running its tool calls between two model rounds) is
    one more member and its moves. What an answer ended as (its stored status) is data: Answer.status."""

    RUNNING = "running"  # this process's producer relays the model's deltas
    TOOLS = "tools"  # ... or runs the tool calls of a round, between two model rounds
    STOPPING = "stopping"  # its producer is cancelled (Answer.stopped_for says why) and ends it
    FINISHING = "finishing"  # its final state is being stored: cancelling now would lose it
    FOLLOWING = "following"  # another replica produces it; this one mirrors its events (Replicas)
    ENDED = "ended"  # its readers have its end (a mirror's: or it ended without one)


MOVES: dict[Phase, frozenset[Phase]] = {
    Phase.RUNNING: frozenset({Phase.TOOLS, Phase.STOPPING, Phase.FINISHING}),
    Phase.TOOLS: frozenset({Phase.RUNNING, Phase.STOPPING, Phase.FINISHING}),
    Phase.STOPPING: frozenset({Phase.FINISHING}),
    Phase.FINISHING: frozenset({Phase.ENDED}),
    Phase.FOLLOWING: frozenset({Phase.ENDED}),
    Phase.ENDED: frozenset(),
}
PRODUCING = frozenset({Phase.RUNNING, Phase.TOOLS, Phase.STOPPING, Phase.FINISHING})  # this process produces it
WRITING = frozenset({Phase.RUNNING, Phase.TOOLS, Phase.STOPPING})  # its log grows: the checkpoint writer saves it


class StopReason(Enum):
    """Why an answer's producer was cancelled."""

    STOPPED = "stopped"  # a client asked (POST .../stop)
    TIMEOUT = "timeout"  # CHATSVC_UPSTREAM_TOTAL_TIMEOUT passed
    INTERRUPTED = "interrupted"  # this process is shutting down
    TAKEN = "taken"  # another process took it for dead (its verdict is read back)


class EventLog(list):
    """A continued answer's event log: its events numbered from `first` (the ids before it are its
    earlier parts'), so that its length is the next event's seq, as an answer's log's is. Slices and
    indexes are by seq; an answer that is not continued has a plain list (nothing on its path)."""

    def __init__(self, first: int):
        super().__init__()
        self.first = first

    def __len__(self) -> int:
        return self.first + super().__len__()

    def __bool__(self) -> bool:
        return True

    def __getitem__(self, at: Any) -> Any:
        if isinstance(at, slice):
            start = max(0, (at.start or 0) - self.first)
            stop = None if at.stop is None else max(0, at.stop - self.first)
            return super().__getitem__(slice(start, stop))
        return super().__getitem__(at - self.first)


@dataclass(eq=False)
class Answer:
    """One answer: its event log, which its readers follow, and what it has said so far."""

    owner: str
    session_id: str
    message_id: str
    model: str
    parent_id: str | None = None  # the user message it answers
    title_question: str | None = None  # the question, when its end should title the conversation
    context: tuple[int, int, int] | None = None  # summaries on: its context's budget, estimated tokens, messages
    started: float = field(default_factory=time.monotonic)
    log: list[bytes] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    text_chars: int = 0
    reasoning_chars: int = 0
    phase: Phase = Phase.RUNNING
    status: str = STREAMING  # as stored: STREAMING until it ends, then how it ended
    finish_reason: str | None = None
    usage: dict | None = None  # as the model service reported it (sane_usage, rounds added); None: it reported none
    # What its model calls used (docs/design/usage.md 2.3): each is a row of the ledger, reserved before
    # the call; `call_id` is the running round's row (the one begin_turn reserved, then each
    # next_round's), `round` what the running round holds and has received, `used` what each ended
    # round used, and `carried` the ended rounds whose row is not known to be settled (the write
    # between two rounds failed, or its commit went unconfirmed), each its row and what it used: the
    # ledger settles them with the next write (Usage.settle_rounds: a row that is not there goes with
    # the one before it).
    call_id: str | None = None
    round: Round | None = None
    used: list[Spent] = field(default_factory=list)
    carried: list[tuple[str, Spent]] = field(default_factory=list)
    error: Refusal | None = None  # why it failed, or was not stored
    final: bytes | None = None  # its `end` or `error` event, once sent
    steps: list[dict] = field(default_factory=list)  # its tool_call and tool_result events, as stored
    pending_calls: list[dict] | None = None  # the app's own tools' calls it ended waiting for
    search: dict | None = None  # its web search's options (None: it does not search)
    sources: list[dict] | None = None  # the sources its search found (its `sources` event's)
    final_seq: int | None = None  # ... and that event's sequence number
    delivered: bool = False  # a channel listener has received it (the Registry's replay rule 3)
    # This process's own answers (a replica's mirror has none of these):
    task: asyncio.Task | None = None
    stopped_for: StopReason | None = None  # why the task was cancelled
    saved_seq: int = 0  # events the stored checkpoint covers
    saved_chars: tuple[int, int] = (0, 0)  # ... and the text and reasoning it holds, in characters
    saved_steps: int = 0  # steps the stored checkpoint holds
    saved_sources: bool = False  # the stored checkpoint holds its sources (a replica's catch-up re-sends them)
    rounds: int = 0  # model rounds that called tools
    calls: int = 0  # tool calls made
    tool_seconds: float = 0.0  # time spent running tool rounds
    offered: bool = False  # the model was offered tools
    images: int = 0  # images the model was shown
    files: int = 0  # files the new message carries
    vision_switch: bool = False  # CHATSVC_VISION_MODEL answers instead of the conversation's model
    reserve_sent: bool = False  # chatsvc sent max_tokens = CHATSVC_RESERVE_OUTPUT_TOKENS (a budget applies)
    retries: int = 0
    first_token_at: float | None = None
    request_id: str | None = None
    on_event: Callable[[Answer, bytes, bool], None] | None = None  # to the other replicas
    base: int = 0  # its `start`'s seq: past 0 for a continuation (whose log is an EventLog)
    continued: Continuation | None = None  # the stored answer it continues (its earlier parts)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def key(self) -> tuple[str, str]:
        return self.owner, self.session_id

    @property
    def generation(self) -> int:
        """Which producer of its row it is: the row's `continued` count while it writes it (AnswerRows)."""
        return self.continued.generation if self.continued is not None else 0

    @property
    def full_text(self) -> str:
        return "".join(self.text)

    @property
    def full_reasoning(self) -> str | None:
        return "".join(self.reasoning) or None

    def stored_steps(self) -> str | None:
        """Its steps as the store keeps them (None: it made no tool call)."""
        return json.dumps(self.steps, ensure_ascii=False, separators=(",", ":")) if self.steps else None

    def final_state(self, prices: Prices | None) -> FinalState:
        """What the store keeps of it once it ends: with its last round's row settled, and the rows of
        the rounds before it not known to be settled (each round accounted here, once). Its `usage`
        is kept only when every round that reached the model reported one (the ledger keeps each
        round's own): one round's usage is not the answer's."""
        error = self.error
        spent, carried = None, []
        if self.round is not None:
            spent = round_spent(self, prices)
            self.used.append(spent)
            carried, self.carried, self.round = self.carried, [], None
        if any(used.source is Source.ESTIMATED for used in self.used):
            self.usage = None
        if self.continued is not None and self.continued.usage is None:  # its earlier parts' is not known
            self.usage = None
        cost = answer_cost(self, prices)
        return FinalState(
            self.status,
            self.full_text,
            self.full_reasoning,
            self.finish_reason,
            self.usage,
            error.code if error else None,
            error.detail if error else None,
            last_seq=len(self.log),
            steps=self.stored_steps(),
            call_id=self.call_id if spent is not None else None,
            spent=spent,
            carried=carried,
            cost=cost,
            sources=json_column(self.sources),
            searches=self.searches,
            generation=self.generation,
        )

    @property
    def searches(self) -> int | None:
        """The web searches its rounds made, when any reported a count."""
        counts = [used.searches for used in self.used if used.searches is not None]
        return sum(counts) if counts else None

    def move(self, to: Phase) -> None:
        """Into phase `to`, which MOVES must allow from the answer's phase."""
        if to not in MOVES[self.phase]:
            raise RuntimeError(f"answer {self.message_id} cannot move from {self.phase.name} to {to.name}")
        self.phase = to

    def end(self) -> None:
        """Into ENDED, where its log grows no more: its readers finish what it holds (`done`)."""
        self.move(Phase.ENDED)
        self.done.set()

    def emit(self, type_: str, data: dict) -> None:
        self.append(sse_event(event_id(self.message_id, len(self.log)), {"type": type_, "data": data}), type_ in FINAL)

    def step(self, type_: str, data: dict) -> None:
        """A `tool_call` or `tool_result` event, kept as a step: where it is in the log and in the text."""
        self.steps.append(
            {
                "type": type_,
                "seq": len(self.log),
                "text": self.text_chars,
                "reasoning": self.reasoning_chars,
                "data": data,
            }
        )
        self.emit(type_, data)

    def add(self, type_: str, content: str) -> None:
        """New text (`chunk`) or reasoning, into the log. Long deltas go out in pieces, each small
        enough for one PostgreSQL notification, which says how much the answer carries up to it."""
        chunk = type_ == "chunk"
        (self.text if chunk else self.reasoning).append(content)
        for start in range(0, len(content), DELTA_CHARS):
            piece = content[start : start + DELTA_CHARS]
            if chunk:
                self.text_chars += len(piece)
            else:
                self.reasoning_chars += len(piece)
            self.append(delta_event(event_id(self.message_id, len(self.log)), type_, piece))

    def append(self, event: bytes, final: bool = False, seq: int | None = None) -> None:
        if final:
            self.final, self.final_seq = event, len(self.log) if seq is None else seq
        if self.on_event is not None:
            self.on_event(self, event, final)
        self.log.append(event)
        wake, self._wake = self._wake, asyncio.Event()
        wake.set()

    async def events(self, start: int = 0) -> AsyncIterator[bytes]:
        """The log from `start` on, live, as byte batches of at most BATCH_EVENTS events."""
        position = start if type(self.log) is list else max(start, self.log.first)  # an EventLog starts later
        while True:
            wake = self._wake
            if position < len(self.log):
                end = min(len(self.log), position + BATCH_EVENTS)
                batch = b"".join(self.log[position:end])
                position = end
                if batch:  # a caught-up mirror has empty places for events its catch-up event carries
                    yield batch
            elif self.done.is_set():
                return
            else:
                await wake.wait()

    def cancel(self, reason: StopReason) -> bool:
        """Stop producing it; True if this call is the one that did (only a RUNNING answer, or one
        running its tool calls, stops: the calls are cancelled with it)."""
        if self.phase is not Phase.RUNNING and self.phase is not Phase.TOOLS:
            return False
        self.stopped_for = reason
        self.move(Phase.STOPPING)
        self.task.cancel()  # a RUNNING answer's task is set when it starts
        return True


def sent_tokens(body: dict) -> int:
    """The estimate of what a model request sends (estimate_tokens, which errs high): its messages'
    contents (images by their tiles), the tool calls they carry, and the tools it offers."""
    tokens = 0
    for message in body["messages"]:
        tokens += content_tokens(message.get("content"))
        for call in message.get("tool_calls") or ():
            tokens += estimate_tokens(call["function"]["name"] + call["function"]["arguments"])
    if body.get("tools"):
        tokens += estimate_tokens(json.dumps(body["tools"], ensure_ascii=False))
    return tokens


@dataclass
class Round:
    """An answer's model round: its ledger row's hold (`hold.prompt_tokens`: the estimate of what it
    sends), and what its last attempt received (a retried call's earlier attempts are not counted:
    they relayed nothing, and the model service is not known to bill a call it failed)."""

    hold: Hold
    text_at: int = 0  # the answer's text pieces before it
    reasoning_at: int = 0  # ... and reasoning pieces
    chunks: bool = False  # the model service sent at least one chunk
    usage: dict | None = None  # what the model service reported for it (sane_usage)
    gathered: ToolCallAccumulator | None = None  # the tool calls it wrote
    searches: int | None = None  # the web searches it made, when reported (usage.plugins.search.count)

    def attempt(self, answer: Answer, gathered: ToolCallAccumulator) -> None:
        """A new attempt at the call starts: only the last one is counted."""
        self.text_at, self.reasoning_at = len(answer.text), len(answer.reasoning)
        self.chunks, self.usage, self.gathered, self.searches = False, None, gathered, None


def call_spent(hold: Hold, usage: dict | None, written: str | None, prices: Prices | None, thinking: bool) -> Spent:
    """What an upstream call used (docs/design/usage.md 2.8): what the model service reported (sane_usage);
    else, when it sent at least one chunk (`written`: all it wrote, text, reasoning and tool calls),
    chatsvc's estimate, which errs high: the prompt's estimate the hold made, and estimate_tokens of what
    it wrote; else nothing (it failed before answering). Priced by CHATSVC_PRICES (`thinking`: at the
    thinking rate)."""
    if usage is not None:
        prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
        details = (usage.get(name) for name in USAGE_DETAILS)
        used = Spent(Source.REPORTED, prompt, completion, usage.get("total_tokens", prompt + completion), *details)
    elif written is not None:
        completion = estimate_tokens(written)
        used = Spent(Source.ESTIMATED, hold.prompt_tokens, completion, hold.prompt_tokens + completion)
    else:
        used = Spent(Source.NONE)
    cost = prices.cost(hold.model, used, thinking) if prices is not None else None
    if cost is not None:
        used.cost, used.currency = cost, prices.currency
    return used


def round_spent(answer: Answer, prices: Prices | None) -> Spent:
    """What the answer's running round used (call_spent); a round that thought (reasoning came) is
    priced at the thinking rate."""
    r = answer.round
    assert r is not None
    reasoning = "".join(answer.reasoning[r.reasoning_at :])
    written = "".join(answer.text[r.text_at :]) + reasoning + (r.gathered.text() if r.gathered else "")
    used = call_spent(r.hold, r.usage, written if r.chunks else None, prices, thinking=bool(reasoning))
    used.searches = r.searches
    return used


def added_spent(one: Spent | None, other: Spent) -> Spent:
    """Two calls' use as one row's (a round whose row could not be settled, added to the next's):
    estimated if either was, each count summed, the cost known if both are."""
    if one is None:
        return other
    sources = {one.source, other.source}
    source = next(s for s in (Source.ESTIMATED, Source.REPORTED, Source.NONE) if s in sources)

    def add(a: int | None, b: int | None) -> int | None:
        return None if a is None and b is None else (a or 0) + (b or 0)

    both = one.cost is not None and other.cost is not None
    return Spent(
        source,
        one.prompt_tokens + other.prompt_tokens,
        one.completion_tokens + other.completion_tokens,
        one.total_tokens + other.total_tokens,
        add(one.reasoning_tokens, other.reasoning_tokens),
        add(one.cached_tokens, other.cached_tokens),
        add(one.cache_creation_tokens, other.cache_creation_tokens),
        one.cost + other.cost if both else None,
        one.currency if both else None,
        add(one.searches, other.searches),
    )


def answer_cost(answer: Answer, prices: Prices | None) -> Cost | None:
    """What the answer's ended rounds cost together; None without prices, or for a model without one."""
    if prices is None or not answer.used or any(spent.cost is None for spent in answer.used):
        return None
    micros = sum(spent.cost for spent in answer.used)
    if answer.continued is not None:  # with its earlier parts' (unknown: unknown)
        if answer.continued.cost_micros is None or answer.continued.currency != prices.currency:
            return None
        micros += answer.continued.cost_micros
    return Cost(micros, prices.currency)


def shown_usage(usage: dict | None) -> dict | None:
    """A usage as an answer's `end` event and reply show it: the counts the model service reported
    (sane_usage) but cache_creation_tokens, which the ledger alone keeps (a stored message has no column
    for it)."""
    if usage is None:
        return None
    return {k: v for k, v in usage.items() if k != "cache_creation_tokens"}


def record_answer(metrics: Metrics, answer: Answer) -> None:
    """An ended answer into the metrics and the log: one line an answer, with its cost."""
    error, m = answer.error, metrics
    m.answers.labels(answer.status, error.code if error else "none", answer.model).inc()
    m.duration.labels(answer.model).observe(time.monotonic() - answer.started)
    if answer.first_token_at is not None:
        m.first_token.labels(answer.model).observe(answer.first_token_at - answer.started)
    for used in answer.used:
        m.spent(answer.model, used)
    kind, usage = spent(answer)
    if answer.offered:
        m.tool_rounds.observe(answer.rounds)
    eq = "~=" if kind == "estimated" else "="
    ttft = f"{(answer.first_token_at - answer.started) * 1000:.1f}" if answer.first_token_at else "-"
    cost = "-" if any(used.cost is None for used in answer.used) else money(sum(u.cost for u in answer.used))
    log.info(
        "answer session=%s message=%s request_id=%s model=%s status=%s code=%s ttft_ms=%s duration_ms=%.1f"
        " usage=%s prompt_tokens%s%s completion_tokens%s%s cost=%s retries=%d rounds=%d calls=%d tool_ms=%.1f"
        " images=%d files=%d vision_switch=%d",
        answer.session_id,
        answer.message_id,
        answer.request_id or "-",
        answer.model,
        answer.status,
        error.code if error else "-",
        ttft,
        (time.monotonic() - answer.started) * 1000,
        kind,
        eq,
        usage.get("prompt_tokens", "-"),
        eq,
        usage.get("completion_tokens", "-"),
        cost,
        answer.retries,
        answer.rounds,
        answer.calls,
        answer.tool_seconds * 1000,
        answer.images,
        answer.files,
        answer.vision_switch,
    )


def count_swept(metrics: Metrics, row: dict) -> None:
    """An answer the sweep interrupted (AnswerRows.recover_interrupted's row): what its calls settled
    then used, into the metrics (its tokens as estimated, and their cost)."""
    for model, used in row.get("spent", ()):
        metrics.spent(model, used)


def added_usage(one: dict | None, other: dict | None) -> dict | None:
    """Two rounds' usage, as one (an answer's tool rounds are one answer): each count summed."""
    if one is None or other is None:
        return one or other
    return {k: one.get(k, 0) + other.get(k, 0) for k in USAGE_FIELDS + USAGE_DETAILS if k in one or k in other}


def spent(answer: Answer) -> tuple[str, dict]:
    """What an ended answer's rounds used, together: `reported` when the model service reported every
    round that reached it, `estimated` when chatsvc estimated any, else `none` (nothing reached it)."""
    sources = {used.source for used in answer.used}
    kind = Source.ESTIMATED if Source.ESTIMATED in sources else Source.REPORTED if Source.REPORTED in sources else None
    if kind is None:
        return "none", {}
    return kind.value, {
        "prompt_tokens": sum(used.prompt_tokens for used in answer.used),
        "completion_tokens": sum(used.completion_tokens for used in answer.used),
    }


# ── Registry: where readers find answers, and the events a channel reader is sent ──────
# The Registry holds every answer a reader may ask for, this process's and the other replicas'
# mirrors, and gives a channel reader its events by the contract's replay rules.


# How long a fresh listener waits for a new answer before replaying an unseen finished one: the
# seed client opens its EventSource and sends its POST together, so a new answer may be on its way.
REPLAY_WAIT = 0.5


class Registry:
    """The answers readers find, this process's and the other replicas' (mirrors, see Replicas)
    alike: the running one by conversation, and, for CHATSVC_REPLAY_SECONDS after they end, each
    by id and the newest by conversation. A channel reader's events come from here (`reader_events`),
    by the contract's replay rules."""

    def __init__(self, settings: Settings, store: Store):
        self.settings, self.store = settings, store
        self._running: dict[tuple[str, str], Answer] = {}  # conversations are keyed by (owner, session_id)
        self._recent: dict[str, Answer] = {}  # by message_id, running or finished
        self._latest: dict[tuple[str, str], Answer] = {}  # the newest kept
        self._waiters: dict[tuple[str, str], set[asyncio.Future]] = {}  # channel listeners waiting
        self.follow: Callable[[str, str, str], Answer] | None = None  # Replicas.follow, on PostgreSQL
        self.closed = False  # shut down: no answer is registered, channel streams end

    def register(self, answer: Answer) -> None:
        """A new answer, running (this process's, or a mirror of another replica's)."""
        self._running[answer.key] = self._recent[answer.message_id] = self._latest[answer.key] = answer
        for waiter in self._waiters.pop(answer.key, ()):
            if not waiter.done():
                waiter.set_result(None)

    def running(self, key: tuple[str, str]) -> Answer | None:
        """The conversation's running answer, if there is one."""
        return self._running.get(key)

    def running_answers(self) -> list[Answer]:
        return list(self._running.values())

    def find(self, message_id: str) -> Answer | None:
        """An answer by id: running, or ended less than CHATSVC_REPLAY_SECONDS ago."""
        return self._recent.get(message_id)

    def end(self, answer: Answer) -> None:
        """It ended: no longer its conversation's running answer (its log stays until forgotten)."""
        if self._running.get(answer.key) is answer:
            del self._running[answer.key]

    def forget_later(self, answer: Answer) -> None:
        """Its log stays for CHATSVC_REPLAY_SECONDS after it ends, for late and resuming readers."""
        asyncio.get_running_loop().call_later(self.settings.replay_seconds, self._forget, answer)

    def _forget(self, answer: Answer) -> None:
        if self._recent.get(answer.message_id) is answer:  # not a continuation of it that runs now
            del self._recent[answer.message_id]
        if self._latest.get(answer.key) is answer:
            del self._latest[answer.key]

    def close(self) -> None:
        """Shutting down: no answer is registered any more (see release)."""
        self.closed = True

    def release(self) -> None:
        """Shut down: channel listeners waiting for an answer stop waiting (their streams end)."""
        for waiters in self._waiters.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def next_after(self, key: tuple[str, str], previous: Answer | None) -> Answer | None:
        """Wait for an answer in this conversation newer than `previous` (None once shut down)."""
        while not self.closed:
            answer = self._latest.get(key)
            if (
                answer is not None
                and answer is not previous
                and (previous is None or answer.started >= previous.started)
            ):
                return answer
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.setdefault(key, set()).add(waiter)
            try:
                await waiter
            finally:
                waiters = self._waiters.get(key)
                if waiters is not None:
                    waiters.discard(waiter)
                    if not waiters:
                        del self._waiters[key]
        return None

    async def reader_events(self, key: tuple[str, str], resume: tuple[str, int] | None) -> AsyncIterator[bytes]:
        """A channel reader's events (CONTRACT.md, "GET .../stream"): after `resume`, the answer and
        place its Last-Event-ID names (else from now on), then every later answer, live, until the
        service shuts down."""
        previous = self._latest.get(key)  # by default nothing that exists now is replayed
        answer, position = None, 0
        if resume is not None:  # 1. after the last event the client saw
            message_id, seq = resume
            answer = self._recent.get(message_id)
            running = self._running.get(key)
            if answer is None and running is not None and running.message_id == message_id:
                answer = running  # the running one is never followed as another replica's (a mirror of itself)
            if answer is not None and answer.key == key:
                position = seq + 1
                if answer.done.is_set() and position >= len(answer.log) and seq != answer.final_seq and answer.final:
                    yield answer.final  # it saw more than this replica holds, but not the end
            else:
                answer = None
                row = await self.store.tree.message(*key, message_id)
                if row and row["status"] != STREAMING:
                    if seq != row["last_seq"]:  # its log is gone: send its end, unless that is what it saw last
                        yield stored_final_event(row)
                    if previous is not None and previous.message_id > message_id:
                        previous = None  # a newer answer than the one named: deliver it whole
                elif row and self.follow is not None:  # another replica's, unheard of here: follow it
                    answer, position = self.follow(*key, message_id), seq + 1
        elif key in self._running:  # 2. the running answer, from its start (a continuation's: its own)
            answer = self._running[key]
            position = answer.base
        elif (
            previous is not None
            and not previous.delivered
            and time.monotonic() - previous.started < (self.settings.replay_seconds)
        ):  # 3. a finished answer nobody on the channel has seen, unless a new one starts now
            try:
                answer = await asyncio.wait_for(self.next_after(key, previous), REPLAY_WAIT) or previous
            except asyncio.TimeoutError:
                answer = previous
            position = answer.base
        while True:  # 4. then every later answer, live
            if answer is None:
                answer = await self.next_after(key, previous)
                if answer is None:  # the service is shutting down: EventSource reconnects elsewhere
                    return
                position = answer.base  # a continuation: from its own `start`
            answer.delivered = True
            async for batch in answer.events(position):
                yield batch
            previous, answer = answer, None


# ── Relay: this process's answers, from admission to their end ─────────────────────────
# The Relay produces this process's answers (admit, run, checkpoint, finish, stop, shutdown) and
# registers each with the Registry.


class Relay:
    """This process's answers, from admission to their end: admit -> run -> checkpoint -> finish;
    then stop and shutdown. Each is registered with the Registry (`registry`), where readers find it.
    The heartbeat (Replicas) asks it which answers it vouches for (`own_ids`, `claiming`) and tells
    it which were `taken`."""

    def __init__(self, settings: Settings, store: Store, client: httpx.AsyncClient, toolbox: Toolbox | None = None):
        self.settings, self.store, self.client = settings, store, client
        self.metrics = store.db.metrics
        self.toolbox = toolbox if toolbox is not None else Toolbox(settings, self.metrics)
        self.registry = Registry(settings, store)
        self.metrics.running.set_function(
            lambda: sum(1 for a in self.registry.running_answers() if a.phase in PRODUCING)
        )
        self._unstored: dict[tuple[str, str], Answer] = {}  # final state not stored yet, the write retried
        self._claiming: set[str] = set()  # answers being written as `streaming`, not started yet
        self._tasks: set[asyncio.Task] = set()  # checkpoints, sweeps, retries: held until they end
        self._soon = asyncio.Event()  # a step to store: the checkpoint writer goes now, not on its clock
        self.replicas: Replicas | None = None if store.db.is_sqlite else Replicas(self)
        if self.replicas is not None:
            self.registry.follow = self.replicas.follow
        self.draining = False  # shutting down: no new answers
        self.summarizer = Summarizer(self)

    async def open(self) -> None:
        if self.replicas is None:  # SQLite: this process alone serves the file, so none is running
            for row in await self.store.answers.recover_interrupted(None):
                log.warning("answer %s was cut by the last stop: stored as interrupted", row["id"])
                count_swept(self.metrics, row)
        else:
            await self.replicas.open()
        self.spawn(self._checkpoints())

    def spawn(self, coro: Any) -> None:
        """Run `coro` as a task the relay holds until it ends, and cancels at shutdown."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ── admit

    def check_free(self, key: tuple[str, str]) -> None:
        """Refuse a new answer in a conversation whose answer runs here (another replica's: the
        database decides, in admit), or whose last answer is not stored yet."""
        if key in self._unstored:  # its last answer still holds the conversation's slot in the database
            raise not_stored_yet(key[1])
        running = self.registry.running(key)
        if running is not None and running.phase in PRODUCING:
            raise busy(key[1])

    async def admit(self, turn: Turn, payload: dict, offer: Offer | None = None) -> Answer:
        """Store the turn (its question, and its answer's row as `streaming`) with its first model
        call reserved against its owner's limits (OverLimit: refused, nothing stored), then start the
        answer. While a token or cost limit applies, a request without max_tokens is sent with
        CHATSVC_RESERVE_OUTPUT_TOKENS, what its reservation holds. The heartbeat vouches for the row
        from the moment it exists."""
        first = payload if offer is None else {**payload, **offer.payload(self.settings.max_tool_rounds < 1)}
        turn.hold = turn.hold or self.hold(turn.owner, turn.session_id, turn.answer_id, Purpose.ANSWER, first)
        self._claiming.add(turn.answer_id)
        try:
            reserve = await self._claim(lambda: self.store.tree.begin_turn(turn), payload)
            return self._start(turn, payload, offer, reserve)
        finally:
            self._claiming.discard(turn.answer_id)

    async def _claim(self, begin: Callable[[], Awaitable[Limits | None]], payload: dict) -> bool:
        """The conversation's answer slot taken by `begin` (a turn's or a continuation's transaction,
        which admits its model call); whether `payload` was given CHATSVC_RESERVE_OUTPUT_TOKENS as its
        max_tokens (a token or cost limit applies and it named none)."""
        try:
            limits = await begin()
        except ConversationBusy:  # with replicas: unless the answer holding it has lost its process just now
            if self.replicas is None or not await self.replicas.recover():
                raise
            limits = await begin()
        reserve = limits is not None and limits.budgets and payload.get("max_tokens") is None
        if reserve:
            payload["max_tokens"] = self.settings.reserve_output_tokens
        return reserve

    async def continue_answer(self, cont: Continuation, payload: dict) -> Answer:
        """Continue a stored answer (CONTRACT.md, "Continuing an answer"): its row goes back to
        `streaming` with its model call admitted as an answer's (Purpose.CONTINUATION; refused:
        nothing changes), then it runs as any answer, its text, reasoning, steps and usage starting
        from what is stored, its events numbered after every id it had."""
        cont.hold = self.hold(cont.owner, cont.session_id, cont.answer_id, Purpose.CONTINUATION, payload)
        self._claiming.add(cont.answer_id)
        try:
            reserve = await self._claim(lambda: self.store.tree.begin_continuation(cont), payload)
            answer = Answer(cont.owner, cont.session_id, cont.answer_id, cont.model, parent_id=cont.question_id)
            answer.log, answer.base, answer.continued = EventLog(max(cont.old_seq, 0)), cont.base, cont
            if cont.old_seq >= 0:  # its earlier end, at the id it had: a reader that missed it gets the text whole
                answer.log.append(cont.old_final)
            answer.text, answer.text_chars = [cont.text], len(cont.text)
            if cont.reasoning:
                answer.reasoning, answer.reasoning_chars = [cont.reasoning], len(cont.reasoning)
            answer.steps, answer.saved_steps, answer.usage = cont.steps, len(cont.steps), cont.usage
            answer.sources = cont.sources
            answer.reserve_sent = reserve
            answer.call_id, answer.round = cont.hold.call_id, Round(cont.hold)
            answer.task = asyncio.create_task(self._run(answer, payload, None), name=f"answer {answer.message_id}")
            if self.replicas is not None:
                answer.on_event = self.replicas.publish
            answer.emit(
                "start",
                {
                    "session_id": answer.session_id,
                    "message_id": answer.message_id,
                    "model": answer.model,
                    "parent_id": answer.parent_id,
                    "continues": {"message_id": answer.message_id, "chars": len(cont.text)},
                },
            )
            answer.saved_seq = len(answer.log)  # the row holds what `start` says
            answer.saved_chars = (len(cont.text), len(cont.reasoning or ""))
            self.registry.register(answer)
            return answer
        finally:
            self._claiming.discard(cont.answer_id)

    def hold(self, owner: str, session_id: str, message_id: str | None, purpose: Purpose, body: dict) -> Hold:
        """What a model call about to be made with request `body` holds (a new ledger row): the
        estimate of what it sends, what it may write (its max_tokens, else CHATSVC_RESERVE_OUTPUT_TOKENS)
        and their price (Prices.hold: the output at the higher of its rates, thinking or not)."""
        s, model = self.settings, body["model"]
        prompt, output = sent_tokens(body), body.get("max_tokens") or s.reserve_output_tokens
        cost = s.prices.hold(model, prompt, output) if s.prices is not None else 0
        return Hold(new_message_id(), owner, session_id, message_id, purpose, model, prompt, output, cost)

    def _start(self, turn: Turn, payload: dict, offer: Offer | None, reserve: bool = False) -> Answer:
        owner, session_id, message_id, model = turn.owner, turn.session_id, turn.answer_id, turn.model
        answer = Answer(owner, session_id, message_id, model, parent_id=turn.question_id, offered=offer is not None)
        answer.reserve_sent, answer.search = reserve, turn.search
        if turn.hold is not None:
            answer.call_id, answer.round = turn.hold.call_id, Round(turn.hold)
        if turn.title and self.settings.titles == "model":  # its first answer names the conversation
            answer.title_question = turn.question or turn.title  # text only: a message of files, their names
        answer.task = asyncio.create_task(self._run(answer, payload, offer), name=f"answer {message_id}")
        if self.replicas is not None:
            answer.on_event = self.replicas.publish
        answer.emit(
            "start", {"session_id": session_id, "message_id": message_id, "model": model, "parent_id": turn.question_id}
        )
        answer.saved_seq = len(answer.log)  # the row holds what `start` says
        self.registry.register(answer)
        return answer

    # ── run

    async def _run(self, answer: Answer, payload: dict, offer: Offer | None) -> None:
        """The answer, from the model's first delta to its stored end: one model round, or, with tools
        offered, rounds until the model answers in text (docs/CONTRACT.md, "Tools")."""
        s = self.settings
        messages = list(payload["messages"])  # grows by each tool round's calls and results
        try:
            for round_ in itertools.count(1):
                last = offer is None or round_ > s.max_tool_rounds
                body = payload if offer is None else {**payload, "messages": messages, **offer.payload(last)}
                if round_ > 1:
                    await self._next_round(answer, body)
                # a searched answer searches in its first round only (docs/CONTRACT.md, "Answers from the
                # web"): its sources are those its text cites; later rounds go to the compatible endpoint
                calls = await self._model_round(answer, body, answer.search if round_ == 1 else None)
                if not calls or offer is None:
                    break
                if last:  # the model called tools though told not to: kept, not run
                    self._calls(answer, calls, offer, round_)
                    answer.finish_reason = TOOL_ROUNDS
                    log.warning("answer %s still called tools after CHATSVC_MAX_TOOL_ROUNDS", answer.message_id)
                    break
                messages += await self._tool_round(answer, calls, offer, round_)
                if answer.pending_calls:
                    answer.finish_reason = TOOL_CALLS
                    break
            if not answer.text_chars and not answer.reasoning_chars and not answer.steps:  # an end, not an answer
                if answer.finish_reason == "content_filter":  # the model service's moderation
                    raise UpstreamError(422, "content_filtered", FILTERED_ANSWER)
                raise UpstreamError(502, "upstream_error", EMPTY_ANSWER.format(answer.finish_reason))
            answer.status = COMPLETE
        except UpstreamError as exc:
            answer.status, answer.error = FAILED, self._reserve_named(answer, exc)
        except asyncio.CancelledError:
            if answer.stopped_for is StopReason.TIMEOUT:
                answer.status = FAILED
                answer.error = UpstreamError(
                    504,
                    "upstream_timeout",
                    f"The model service did not finish the answer within {s.upstream_total_timeout:g} s.",
                )
            elif answer.stopped_for is StopReason.STOPPED:
                answer.status, answer.finish_reason = STOPPED, STOPPED
            else:  # shutting down, or taken for dead by another replica (its verdict is read back)
                answer.status = INTERRUPTED
                answer.error = AnswerInterrupted(INTERRUPTED_DETAIL)
        except Exception:
            log.exception("answer %s failed", answer.message_id)
            answer.status = FAILED
            answer.error = UpstreamError(502, "upstream_error", "The answer failed unexpectedly.")
        finally:
            if answer.finish_reason == TOOL_CALLS and answer.status != COMPLETE:  # the model's, for a round cut short
                answer.finish_reason = None
            if answer.phase is Phase.TOOLS:  # a fault between two rounds
                answer.move(Phase.RUNNING)
            answer.move(Phase.FINISHING)
            await asyncio.shield(self._finish(answer))

    def _reserve_named(self, answer: Answer, error: UpstreamError) -> UpstreamError:
        """The model service found the conversation too long for the model's context, and chatsvc sent
        the max_tokens it was asked for by no one (a token or cost limit's reserve): the refusal says so."""
        if error.code != "context_too_long" or not answer.reserve_sent:
            return error
        reserve = self.settings.reserve_output_tokens
        return UpstreamError(
            error.status,
            error.code,
            f"chatsvc sent max_tokens = {reserve:,} (CHATSVC_RESERVE_OUTPUT_TOKENS: a token or cost limit applies, and"
            " the request set none), and the model's context cannot hold it after the conversation: the context"
            " budget (CHATSVC_MAX_CONTEXT_TOKENS) plus CHATSVC_RESERVE_OUTPUT_TOKENS must fit the model's context"
            " (lower either; or send a smaller max_tokens). " + error.detail,
            error.retryable,
            error.retry_after,
        )

    async def _model_round(self, answer: Answer, body: dict, search: dict | None = None) -> list[ToolCall]:
        """One model call, relayed into the answer (retried while it has said nothing), under
        CHATSVC_UPSTREAM_TOTAL_TIMEOUT; the tools it called. A round cut at CHATSVC_MAX_ANSWER_CHARS
        called none. `search`: the round searches the web with these options (DashScope's native endpoint)."""
        s = self.settings
        calls: list[ToolCall] = []
        said_before = answer.text_chars + answer.reasoning_chars
        heard_sources = answer.sources is not None

        async def call() -> None:
            gathered, answer.usage = ToolCallAccumulator(), None  # a retried attempt's usage is not counted
            if answer.round is not None:
                answer.round.attempt(answer, gathered)
            async with contextlib.aclosing(stream_completion(self.client, s, body, search)) as deltas:
                async for delta in deltas:
                    if answer.round is not None:
                        answer.round.chunks = True
                    if search is not None:
                        self._searched(answer, delta)
                    if not self._relay(answer, delta):
                        return  # CHATSVC_MAX_ANSWER_CHARS: the upstream call is closed here, its calls dropped
                    gathered.feed(delta)
            calls[:] = gathered.calls()

        def said() -> bool:  # retried only while nothing of this round has reached a reader
            # a `sources` event counts: a new attempt searches again and its text may cite other pages
            return answer.text_chars + answer.reasoning_chars > said_before or (
                answer.sources is not None and not heard_sources
            )

        def counted() -> None:
            answer.retries += 1

        earlier, answer.usage = answer.usage, None  # the earlier rounds' usage; this round's is added to it
        deadline = asyncio.get_running_loop().call_later(s.upstream_total_timeout, answer.cancel, StopReason.TIMEOUT)
        try:
            await retried(s, self.metrics, "answer", call, said, counted)
        finally:
            deadline.cancel()
            if answer.round is not None:
                answer.round.usage = answer.usage
            answer.usage = added_usage(earlier, answer.usage)
        return calls

    async def _next_round(self, answer: Answer, body: dict) -> None:
        """Between two model rounds: the ended round's row settled with what it used and the next
        round's reserved (Usage.next_round, never refused). The write is seen to its end even when the
        answer is stopped meanwhile (then the stop goes on), so that the answer knows which row its
        end settles. A database failure loses nothing: the ended round and its row are carried, and
        settled by the next write, which finds out what the failed one did (Usage.settle_rounds: rolled
        back, the next round's row is not there, and its use goes with the ended round's row; committed
        though it seemed to fail, the ended round's row is settled and the next one's reserved)."""
        ended, prices = answer.round, self.settings.prices
        if ended is None:
            return
        used = round_spent(answer, prices)
        answer.used.append(used)
        hold = self.hold(answer.owner, answer.session_id, answer.message_id, Purpose.TOOL_ROUND, body)
        answer.round = Round(hold, len(answer.text), len(answer.reasoning))
        ended_id, carried = answer.call_id, answer.carried
        answer.call_id = hold.call_id  # its row, once the write commits (else the ledger finds it missing)
        written = asyncio.ensure_future(self.store.usage.next_round(ended_id, used, hold, carried))
        stopped: asyncio.CancelledError | None = None
        try:
            await asyncio.shield(written)
        except asyncio.CancelledError as exc:
            stopped = exc
            await asyncio.wait([written])
        except StorageUnavailable:
            pass
        fault = None if written.cancelled() else written.exception()
        if not written.cancelled() and fault is None:
            answer.carried = []
        else:
            if fault is not None and not isinstance(fault, StorageUnavailable):
                log.error("answer %s: the ledger failed between its rounds", answer.message_id, exc_info=fault)
            log.warning(
                "answer %s: its ended round will be settled with its next, the ledger could not be written now (%s)",
                answer.message_id,
                fault.detail if isinstance(fault, StorageUnavailable) else "see above",
            )
            answer.carried = [*carried, (ended_id, used)]
        if stopped is not None:
            raise stopped

    def _calls(self, answer: Answer, calls: list[ToolCall], offer: Offer, round_: int) -> list[dict]:
        """A round's calls into the log as `tool_call` events (ids made unique within the answer)."""
        taken = {step["data"]["id"] for step in answer.steps if step["type"] == "tool_call"}
        made = []
        for call in calls:
            # an id used before in this answer (servers number calls per response), or too long to be
            # answered (`tool_results`), is replaced; arguments past CHATSVC_MAX_ANSWER_CHARS are cut
            # (then they are not JSON: bad_arguments)
            fresh = call.id not in taken and len(call.id) <= MAX_CALL_ID_CHARS
            call_id = call.id if fresh else f"call_{uuid.uuid4().hex[:24]}"
            taken.add(call_id)
            name, arguments = call.name[:MAX_TOOL_NAME_CHARS], call.arguments[: self.settings.max_answer_chars]
            data = {"id": call_id, "name": name, "arguments": arguments, "round": round_}
            spec = offer.server.get(call.name)
            if spec is not None:
                data.update(server=spec.server, tool=spec.tool)
            answer.step("tool_call", data)
            made.append(data)
        answer.calls += len(made)
        self.checkpoint_soon()
        return made

    async def _tool_round(self, answer: Answer, calls: list[ToolCall], offer: Offer, round_: int) -> list[dict]:
        """Run a round's calls: the server's tools at once, each result into the log as it comes;
        the app's own tools are left to the app (the answer ends waiting for them). The messages
        that tell the model what it called and what came back."""
        started = time.monotonic()
        answer.rounds += 1
        answer.move(Phase.TOOLS)
        made = self._calls(answer, calls, offer, round_)
        ran = [data for data in made if data["name"] not in offer.client]
        results: dict[str, ToolOutcome] = {}

        async def run(data: dict) -> None:
            if data["name"] in offer.server:
                outcome = await self.toolbox.run(data["name"], data["arguments"], answer.owner)
            else:  # not offered to this answer (a server's tool its request left out, too)
                outcome = self.toolbox.unknown(data["name"])
            results[data["id"]] = outcome
            said = {"content": outcome.content} if outcome.error is None else {"error": outcome.error}
            answer.step(
                "tool_result",
                {"id": data["id"], **said, "duration_ms": outcome.duration_ms, "outcome": outcome.outcome},
            )
            self.checkpoint_soon()

        tasks = [asyncio.ensure_future(run(data)) for data in ran]
        try:
            await asyncio.gather(*tasks)
        finally:  # stopped, or shutting down: the calls still running are cancelled
            for task in tasks:
                task.cancel()
            answer.tool_seconds += time.monotonic() - started
        answer.pending_calls = [
            {"id": d["id"], "name": d["name"], "arguments": d["arguments"]} for d in made if d["name"] in offer.client
        ] or None
        for _ in answer.pending_calls or ():
            self.toolbox.count("client", "-", "sent")  # to the app, which runs it
        answer.move(Phase.RUNNING)
        round_text = self._round_text(answer, made)
        kept = [d for d in made if d["id"] in results]
        if not kept:
            return []
        history = [{"role": "assistant", "content": round_text, "tool_calls": [history_call(d) for d in kept]}]
        return history + [tool_message(d["id"], results[d["id"]].content, results[d["id"]].error) for d in kept]

    def _round_text(self, answer: Answer, made: list[dict]) -> str:
        """The text the model said in this round, before its calls."""
        first = next(step for step in answer.steps if step["type"] == "tool_call" and step["data"] is made[0])
        before = 0
        for step in answer.steps:
            if step is first:
                break
            if step["type"] == "tool_result" or step["type"] == "tool_call":
                before = step["text"]
        return answer.full_text[before : first["text"]]

    def _searched(self, answer: Answer, delta: Delta) -> None:
        """A searched round's delta: its sources, the first time they come, into the log as a `sources`
        event (before the text the delta carries); its search count so far into the round (at least 1
        once the sources came: a round stopped before its first usage searched all the same)."""
        if delta.sources is not None and answer.sources is None:
            answer.sources = delta.sources
            answer.emit("sources", {"sources": delta.sources})
        if answer.round is None:
            return
        if delta.searches is not None:
            answer.round.searches = delta.searches
        if answer.sources is not None and not answer.round.searches:  # it searched, though no count came (yet)
            answer.round.searches = 1

    def _relay(self, answer: Answer, delta: Delta) -> bool:
        """One delta into the answer's log; False once the answer is as long as it may be."""
        if answer.first_token_at is None and (delta.content or delta.reasoning):
            answer.first_token_at = time.monotonic()
        room = self.settings.max_answer_chars - answer.text_chars - answer.reasoning_chars
        if delta.reasoning:
            answer.add("reasoning", delta.reasoning[:room])
            room -= len(delta.reasoning)
        if delta.content and room > 0:
            answer.add("chunk", delta.content[:room])
            room -= len(delta.content)
        answer.finish_reason = delta.finish_reason or answer.finish_reason
        answer.usage = delta.usage or answer.usage
        if room <= 0 and (delta.content or delta.reasoning):
            log.warning("answer %s reached CHATSVC_MAX_ANSWER_CHARS; its upstream call is closed", answer.message_id)
            answer.finish_reason = "length"
            return False
        return True

    # ── checkpoint

    async def _checkpoints(self) -> None:
        """The one checkpoint writer: every CHATSVC_CHECKPOINT_SECONDS, the new text of every running
        answer in one write. A slow or failing database delays this, never the relay."""
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._soon.wait(), self.settings.checkpoint_seconds)
            self._soon.clear()
            due = [a for a in self.registry.running_answers() if a.phase in WRITING and len(a.log) > a.saved_seq]
            if not due:
                continue
            batch = [
                Checkpoint(
                    a.message_id,
                    a.full_text,
                    a.full_reasoning,
                    len(a.log),
                    steps=a.stored_steps() if len(a.steps) > a.saved_steps else None,
                    sources=json_column(a.sources) if not a.saved_sources else None,
                    generation=a.generation,
                )
                for a in due
            ]
            counts = [len(a.steps) for a in due]
            try:
                written = await self.store.answers.checkpoint(batch)
            except StorageUnavailable as exc:
                log.warning(
                    "checkpoint of %d answer(s) failed, tried again in %g s: %s",
                    len(batch),
                    self.settings.checkpoint_seconds,
                    exc.detail,
                )
                continue
            for answer, checkpoint, count in zip(due, batch, counts, strict=True):
                if answer.message_id not in written:  # no longer its producer's (taken, deleted): it stops soon
                    continue
                answer.saved_seq, answer.saved_steps = checkpoint.seq, count
                answer.saved_chars = (len(checkpoint.content), len(checkpoint.reasoning or ""))
                answer.saved_sources = answer.saved_sources or checkpoint.sources is not None

    def checkpoint_soon(self) -> None:
        """A step was made: the checkpoint writer stores it now (within one write, not one interval)."""
        self._soon.set()

    # ── finish

    async def _finish(self, answer: Answer) -> None:
        """Store the answer's final state, then tell the readers: a reload after `end` shows it."""
        final = answer.final_state(self.settings.prices)
        stored = await self._store_final(answer, final, self.settings.storage_timeout)
        if stored is False:  # another process took it for dead: its verdict stands, and is what readers get
            row = await self._verdict(answer)
            if row is not None and row["continued"] != answer.generation:  # and continued it since: its verdict
                row = {**row, "status": INTERRUPTED, "error_code": "interrupted", "error_message": INTERRUPTED_DETAIL,
                       "content": answer.full_text[: answer.saved_chars[0]],
                       "reasoning_content": (answer.full_reasoning or "")[: answer.saved_chars[1]]}  # fmt: skip
            if row is not None:
                answer.status, answer.error = row["status"], stored_error(row)
                answer.text, answer.reasoning = [row["content"]], [row["reasoning_content"] or ""]
                log.warning("answer %s was taken for dead by another process; its verdict stands", answer.message_id)
        elif stored is None:
            answer.error = StorageFailed(
                f"The answer could not be stored: {self.store.db.fault or 'the database failed.'} chatsvc keeps trying"
                " to store it; reload the conversation once GET /readyz answers 200."
            )
            self._unstored[answer.key] = answer
            self.spawn(self._store_later(answer, final))
        answer.emit(
            *final_event(
                answer.message_id,
                answer.status,
                answer.full_text,
                answer.finish_reason,
                answer.usage,
                answer.error,
                answer.pending_calls,
                final.cost,
                answer.sources,
            )
        )
        answer.end()
        self.registry.end(answer)
        record_answer(self.metrics, answer)
        if stored is not None:
            self.registry.forget_later(answer)
        if stored and answer.status == COMPLETE and answer.title_question is not None:
            self.spawn(write_title(self, answer))
        if stored and answer.context is not None and answer.status in (COMPLETE, STOPPED):
            self.summarizer.after(answer)

    async def _store_final(self, answer: Answer, final: FinalState, within: float | None) -> bool | None:
        """finish_answer, retried with backoff while the database fails; None once `within` s have
        passed (None: until it succeeds)."""
        deadline = None if within is None else time.monotonic() + within
        for attempt in itertools.count():
            try:
                return await self.store.answers.finish(answer.message_id, final)
            except StorageUnavailable as exc:
                left = math.inf if deadline is None else deadline - time.monotonic()
                if left <= 0:
                    return None
                if attempt == 0 or attempt % 10 == 0:
                    log.warning(
                        "could not store the end of answer %s yet (%s); retrying", answer.message_id, exc.detail
                    )
                await asyncio.sleep(min(backoff(attempt), 2.0, left))
        raise AssertionError("unreachable")

    async def _store_later(self, answer: Answer, final: FinalState) -> None:
        """The final write of an answer whose readers were told `storage_failed`, until it is stored
        or the process stops (then the next start, or another replica, stores it interrupted)."""
        await self._store_final(answer, final, None)
        log.info("answer %s is stored at last (status=%s)", answer.message_id, final.status)
        if self._unstored.get(answer.key) is answer:
            del self._unstored[answer.key]
        self.registry.forget_later(answer)

    async def _verdict(self, answer: Answer) -> dict | None:
        for attempt in range(5):
            try:
                return await self.store.answers.get(answer.message_id)
            except StorageUnavailable:
                await asyncio.sleep(backoff(attempt))
        return None

    # ── stop

    async def stop(self, key: tuple[str, str]) -> tuple[str | None, bool]:
        """Stop the conversation's running answer: (its message id, whether this call stopped it).
        Returns once it is stored and its readers got `end`."""
        answer = self.registry.running(key)
        if answer is None or answer.phase not in PRODUCING:  # another replica's answer, or none
            return await self.replicas.stop(key, answer) if self.replicas is not None else (None, False)
        stopped = answer.cancel(StopReason.STOPPED)
        await answer.done.wait()
        if isinstance(answer.error, StorageFailed):
            raise not_stored_yet(key[1])
        return answer.message_id, stopped and answer.status == STOPPED

    # ── shutdown

    async def shutdown(self, grace: float) -> None:
        """Refuse new answers, give running ones `grace` seconds, store the rest as interrupted
        (their readers get an `error` event), then end every channel stream."""
        self.draining = True
        own = [a for a in self.registry.running_answers() if a.phase in PRODUCING]
        if own:
            waiting = [asyncio.ensure_future(a.done.wait()) for a in own]
            if grace > 0:
                await asyncio.wait(waiting, timeout=grace)
            for answer in own:
                answer.cancel(StopReason.INTERRUPTED)
            await asyncio.gather(*waiting)
        self.registry.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.replicas is not None:
            await self.replicas.close()
        self.registry.release()

    @property
    def unstored(self) -> list[Answer]:
        """The answers that ended and whose end is not stored yet (the write is retried)."""
        return list(self._unstored.values())

    # ── what the heartbeat vouches for (Replicas)

    def own_ids(self) -> list[str]:
        """The answers this process vouches for: running, ended and not stored yet, or being claimed."""
        return list(self.vouched())

    def vouched(self) -> dict[str, int | None]:
        """own_ids, each with the generation of its row it writes (Answer.generation; None: being claimed)."""
        running = [a for a in self.registry.running_answers() if a.phase in PRODUCING]
        own: dict[str, int | None] = {a.message_id: a.generation for a in [*running, *self._unstored.values()]}
        return {**own, **dict.fromkeys(self._claiming)}

    def claiming(self) -> set[str]:
        """The answers whose `streaming` row is being written: it may not be committed yet."""
        return set(self._claiming)

    def taken(self, ids: dict[str, int | None]) -> None:
        """The heartbeat found these rows no longer `streaming` with these generations: another process
        took them for dead (an answer of another generation here since, a continuation, is not stopped)."""
        for answer in self.registry.running_answers():
            if ids.get(answer.message_id, -1) == answer.generation and answer.cancel(StopReason.TAKEN):
                log.warning("answer %s was taken for dead by another process; it stops here", answer.message_id)


# ── Titles: a conversation's name, written by the model ────────────────────────────────
# Once a conversation's first answer is stored `complete`, and unless a client has named it since,
# the model names it in the conversation's language (CHATSVC_TITLES=model). A background task of the
# relay: it never delays an answer or its `end`, and never holds the conversation's answer slot.

TITLE_PROMPT = (
    "Name this conversation. Reply with its title only: at most 8 words, in the language the user"
    " writes in, with no quotes, no Markdown and no punctuation at the end."
)
TITLE_CHARS = 60
_THINKING = re.compile(r"<think>.*?(?:</think>|$)", re.S | re.I)
_TITLE_LABEL = re.compile(r"^(?:title|标题|題目|标题是)\s*[:：]\s*", re.I)  # noqa: RUF001 (the full-width forms are the point)
_MARKDOWN = re.compile(r"^(?:#+|>|[-*+]|\d+[.)])\s+")  # a heading, quote or list item's marker
_EMPHASIS = re.compile(r"[*_`~]{1,3}")  # Markdown's emphasis, code and strike delimiters
# Control characters (C0, DEL, C1) read as a space; bidi controls (which reorder what follows them,
# even outside the title where it is shown) and invisible zero-width characters are dropped. The
# zero-width (non-)joiners stay: Persian, Indic scripts and emoji sequences need them.
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_INVISIBLE = re.compile("[\u061c\u200b\u200e\u200f\u202a-\u202e\u2060\u2066-\u2069\ufeff]")
_QUOTES = "\"'`“”‘’「」『』《》〈〉«»【】"  # noqa: RUF001 (the full-width forms are the point)
_END_PUNCTUATION = ".。!！?？:：;；,，、…·"  # noqa: RUF001 (the full-width forms are the point)


def clean_title(text: str) -> str | None:
    """The title in what the model wrote: its first line, without thinking, a label, Markdown,
    quotes or final punctuation, at most TITLE_CHARS characters; None if nothing is left."""
    text = _INVISIBLE.sub("", _THINKING.sub("", text))
    lines = [_CONTROLS.sub(" ", line).strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        return None
    title, previous = lines[0], None
    while title != previous:  # `**"Title".**` takes several rounds
        previous = title
        title = _MARKDOWN.sub("", _TITLE_LABEL.sub("", title)).strip()
        title = _EMPHASIS.sub(_emphasis_removed, title).strip()
        title = title.strip(_QUOTES + " ").rstrip(_END_PUNCTUATION + " ")
    return " ".join(title.split())[:TITLE_CHARS].rstrip() or None


def _emphasis_removed(match: re.Match) -> str:
    """A delimiter run goes where it wraps the title or a word (`**Title**`, `_x_`, `` `x` ``); it
    stays inside a word (`my_var`, `2*3`) and alone between spaces (`2 * 3`)."""
    text, start, end = match.string, match.start(), match.end()
    before, after = text[start - 1 : start], text[end : end + 1]
    inside = (before.isalnum() and after.isalnum()) or (before.isspace() and after.isspace())
    return match.group() if inside else ""


async def write_title(relay: Relay, answer: Answer) -> None:
    """Ask the model for the conversation's title and store it (and what it cost), through the same
    upstream client, retries and timeouts as an answer. A failure leaves the first-line title. The
    call is recorded in the ledger once done, however it ended (purpose title: reserved nothing,
    never refused): cut by a shutdown, it is `interrupted`, estimated from what it received."""
    s = relay.settings
    model = s.title_model or s.chat_model
    conversation = f"User: {(answer.title_question or '')[:2000]}\n\nAssistant: {answer.full_text[:2000]}"
    messages = [{"role": "system", "content": TITLE_PROMPT}, {"role": "user", "content": conversation}]
    payload = {
        "model": model,
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
        "enable_thinking": False,
        "max_tokens": 40,
    }
    text: list[str] = []
    usage, status, code, received = None, "ok", "-", False
    hold = relay.hold(answer.owner, answer.session_id, None, Purpose.TITLE, payload)

    async def call() -> None:
        nonlocal usage, received
        usage, received = None, False  # only the last attempt is counted
        async for delta in stream_completion(relay.client, s, payload):
            text.append(delta.content)
            usage, received = delta.usage or usage, True

    try:
        try:
            with anyio.fail_after(s.upstream_total_timeout):
                await retried(s, relay.metrics, "title", call, lambda: bool(text))
        except UpstreamError as exc:
            status, code = "failed", exc.code
        except TimeoutError:
            status, code = "failed", "upstream_timeout"
        except asyncio.CancelledError:  # the service stops: the call is recorded all the same (finally)
            status, code = "interrupted", "interrupted"
            raise
        title = clean_title("".join(text)) if status == "ok" else None
        if status == "ok" and title is None:
            status = "empty"
        try:
            key = (answer.owner, answer.session_id)
            if not await relay.store.conversations.set_model_title(*key, answer.message_id, title, usage):
                # a client named it meanwhile (kept), or the answer it was made from is gone (its text too)
                status = "kept" if await relay.store.tree.message(*key, answer.message_id) else "gone"
        except StorageUnavailable as exc:
            status, code = "unstored", "storage_unavailable"
            log.warning("title of session %s not stored: %s", answer.session_id, exc.detail)
    finally:  # however it ended, the call made is recorded, to its end (a shutdown cancels this task)
        outcome = {"failed": FAILED, "interrupted": INTERRUPTED}.get(status, COMPLETE)
        used = call_spent(hold, usage, "".join(text) if received else None, s.prices, thinking=False)
        recorded = asyncio.ensure_future(record_title(relay, answer, model, hold, used, outcome, status, code))
        try:
            await asyncio.shield(recorded)
        except asyncio.CancelledError:
            await asyncio.wait([recorded])
            raise


async def record_title(
    relay: Relay, answer: Answer, model: str, hold: Hold, used: Spent, outcome: str, status: str, code: str
) -> None:
    """A title call, done: into the ledger (never refused), the metrics and the log."""
    try:
        await relay.store.usage.record(hold, used, outcome)
    except StorageUnavailable as exc:
        log.warning("title of session %s not recorded in the ledger: %s", answer.session_id, exc.detail)
    except Exception:
        log.exception("title of session %s not recorded in the ledger", answer.session_id)
    relay.metrics.spent(model, used, "title_")
    log.info(
        "title session=%s message=%s model=%s status=%s code=%s usage=%s prompt_tokens=%s completion_tokens=%s cost=%s",
        answer.session_id,
        answer.message_id,
        model,
        status,
        code,
        used.source.value,
        used.prompt_tokens,
        used.completion_tokens,
        "-" if used.cost is None else money(used.cost),
    )


# ── Summaries: what a long branch said before the context's newest messages, written by the model
# Once an answer ends (complete or stopped) and its branch no longer fits the context's budget (its
# estimated tokens past SUMMARY_AT of the budget, or more messages than CHATSVC_MAX_CONTEXT_MESSAGES),
# the summary model (CHATSVC_SUMMARY_MODEL) is asked, in the background, for a summary of the part
# that falls out: the branch's newest summary (rolling) and the messages after it up to a cut chosen so
# that the newest part kept whole is at most SUMMARY_KEEP of the budget. The summary is stored attached
# to the newest message it covers (every branch through it shares it); build_context sends it inside
# the system message, then the newest messages after it that fit. A summary that fails, is refused or
# is over its owner's limit is not made: the context stays the newest messages that fit.

SUMMARY_PROMPT = (
    "You keep the memory of a conversation between a user and an assistant that can no longer see its"
    " older part. Summarise the conversation below (with the earlier summary, if one is given, which it"
    " continues) so that the assistant can go on from it: keep every fact, name, number, date, decision,"
    " preference, instruction and open question, and what each side said they would do. Write in the"
    " language the conversation is written in, as plain prose or short lists, without a preamble."
)
SUMMARY_AT = 0.8  # a branch whose next context would pass this share of the budget is summarised
SUMMARY_KEEP = 0.5  # the next context after a summary (it and the newest part kept whole): at most this share of
# the budget, and the part kept at most this share of CHATSVC_MAX_CONTEXT_MESSAGES
SUMMARY_SHARE = 4  # a summary is at most 1/4 of the budget (its max_tokens)


class SummaryRows:
    """The summaries table: a summary added once per message (the first one stored wins), the
    newest one on a branch, and what a context clear leaves out."""

    def __init__(self, db: Database):
        self.db = db

    async def add(
        self, key: tuple[str, str], message_id: str, first_id: str, content: str, covered: int, model: str
    ) -> bool | None:
        """Store a summary ending at `message_id`: True; False: one is there already (another replica's,
        kept); None: the message is gone, or a context clear left it out meanwhile (nothing stored)."""
        values = {
            "owner": key[0],
            "sid": key[1],
            "mid": message_id,
            "first": first_id,
            "content": content,
            "covered": covered,
            "tokens": estimate_tokens(content),
            "model": model,
            "now": utcnow(),
        }
        row = await self.db.fetch_one(
            "INSERT INTO summaries (message_id, owner, session_id, first_id, content, covered, tokens, model,"
            " created_at) SELECT m.id, m.owner, m.session_id, :first, :content, :covered, :tokens, :model, :now"
            " FROM messages m JOIN conversations c ON c.owner = m.owner AND c.session_id = m.session_id"
            " WHERE m.id = :mid AND m.owner = :owner AND m.session_id = :sid AND :first > c.context_start"
            " ON CONFLICT (message_id) DO NOTHING RETURNING message_id",
            values,
            role=WRITE,
        )
        if row is not None:
            return True
        there = await self.db.fetch_one("SELECT 1 AS x FROM summaries WHERE message_id = :mid", {"mid": message_id})
        return False if there is not None else None

    async def on_branch(self, owner: str, session_id: str, leaf: str | None, limit: int) -> dict | None:
        """The newest summary on the path from `leaf` up (at most `limit` messages up, after the
        context's start): message_id, first_id, covered, content, created_at; None: none."""
        if leaf is None:
            return None
        return await self.db.fetch_one(
            "WITH RECURSIVE path (id, parent_id, depth) AS ("
            " SELECT m.id, m.parent_id, 1 FROM messages m WHERE m.id = :leaf AND m.owner = :owner"
            " AND m.session_id = :sid"
            " UNION ALL SELECT m.id, m.parent_id, p.depth + 1 FROM path p JOIN messages m ON m.id = p.parent_id"
            " WHERE p.depth < :limit)"
            " SELECT s.message_id, s.first_id, s.covered, s.content, s.created_at FROM path p"
            " JOIN summaries s ON s.message_id = p.id JOIN conversations c ON c.owner = s.owner"
            " AND c.session_id = s.session_id WHERE s.message_id > c.context_start ORDER BY s.message_id DESC LIMIT 1",
            {"owner": owner, "sid": session_id, "leaf": leaf, "limit": limit},
        )


def usable_history(history_newest_first: list[dict]) -> list[dict]:
    """The messages of a path the model is sent: failed turns and empty answers are left out, with
    the turn that led to them."""
    usable: list[dict] = []  # newest first
    skip_question = False
    for row in history_newest_first:
        if row["role"] == "assistant" and (
            row["status"] in (FAILED, STREAMING) or not (row["content"] or row["tool_steps"])
        ):
            skip_question = True  # drop the answer and the turn that led to it
            continue
        if row["role"] == "user" and skip_question:
            skip_question = False
            continue
        usable.append(row)
    return usable


def is_question(row: dict) -> bool:
    """Whether a message of a path is a user's own (not the app's tool results)."""
    return row["role"] == "user" and not row["tool_results"]


def transcript_lines(row: dict, files: list[FileRow]) -> str:
    """A message as the summary model reads it: who said it, its text, its files' names, and its tool
    calls and results as text."""
    if row["role"] == "user":
        if row["tool_results"]:
            results = json.loads(row["tool_results"])
            return "\n".join(f"Tool result ({r['tool_call_id']}): {r['content']}" for r in results)
        named = f" [files: {', '.join(f.name for f in files)}]" if files else ""
        return f"User:{named} {row['content']}"
    lines = []
    for message in answer_messages(row, {}):
        if message["role"] == "tool":
            lines.append(f"Tool result ({message['tool_call_id']}): {message['content']}")
            continue
        if message["content"]:
            lines.append(f"Assistant: {message['content']}")
        for call in message.get("tool_calls", ()):
            function = call["function"]
            lines.append(f"Assistant called {function['name']}({function['arguments']}) as {call['id']}")
    return "\n".join(lines)


class Summarizer:
    """The relay's summaries: after an answer, whether its branch needs one, and the background task
    that writes it (one at a time per conversation in this process; across replicas the table's key
    keeps one)."""

    def __init__(self, relay: Relay):
        self.relay = relay
        self._busy: set[tuple[str, str]] = set()

    def needed(self, answer: Answer) -> bool:
        """Whether the answer's branch, with it, would not fit the next context."""
        assert answer.context is not None
        budget, cost, count = answer.context
        cost += estimate_tokens(answer.full_text)
        return cost > SUMMARY_AT * budget or count + 1 > self.relay.settings.max_context_messages

    def after(self, answer: Answer) -> None:
        """An answer has ended and is stored: its branch is summarised in the background if it needs it."""
        if answer.key in self._busy or not self.needed(answer):
            return
        self._busy.add(answer.key)
        self.relay.spawn(self._write(answer))

    async def _write(self, answer: Answer) -> None:
        try:
            outcome, cause = await self.write(answer)
        except StorageUnavailable as exc:
            outcome, cause = "unstored", exc.detail
        except Exception as exc:
            log.exception("summary of session %s failed", answer.session_id)
            outcome, cause = "failed", type(exc).__name__
        finally:
            self._busy.discard(answer.key)
        self.relay.metrics.summaries.labels(outcome).inc()
        if outcome in ("failed", "unstored"):
            log.warning("no summary of session %s at %s: %s", answer.session_id, answer.message_id, cause)
        elif outcome == "over_limit":
            log.info("no summary of session %s: %s", answer.session_id, cause)

    def plan(self, answer: Answer, rows: list[dict]) -> tuple[dict | None, list[dict], list[dict]] | None:
        """The branch's newest summary (None: none), the messages the new one covers after it (oldest
        first) and the usable ones among them; None when there is nothing to cut."""
        assert answer.context is not None
        budget, s = answer.context[0], self.relay.settings
        previous = next((row for row in rows if row.get("summary") is not None), None)
        after = rows[: rows.index(previous)] if previous is not None else rows
        usable = usable_history(after)
        # the next context holds the new summary too: counted at the size of the one it rolls (a first one
        # at half its bound), so that several turns fit before the branch passes SUMMARY_AT again
        summary_size = estimate_tokens(previous["summary"]) if previous is not None else budget // SUMMARY_SHARE // 2
        keep_tokens, keep_count, kept = SUMMARY_KEEP * budget - summary_size, SUMMARY_KEEP * s.max_context_messages, 0
        for row in usable:
            keep_tokens -= estimate_tokens(transcript_lines(row, []))
            if keep_tokens < 0 or kept + 1 > keep_count:
                break
            kept += 1
        while kept and (usable[kept - 1]["role"] != "user" or usable[kept - 1]["tool_results"]):
            kept -= 1  # the kept part starts with a user's message
        if usable and usable[0]["role"] == "assistant" and usable[0]["finish_reason"] in (TOOL_CALLS, TOOL_ROUNDS):
            # an answer waiting for the app's tool results stays, with the turn it answers: its results'
            # turn is sent after its calls (a tool message without them is refused by model servers)
            kept = max(kept, next((n + 1 for n, row in enumerate(usable) if is_question(row)), len(usable)))
        if kept == len(usable):
            return None
        end = usable[kept]["id"]  # the newest message the summary covers
        covered = [row for row in reversed(after) if row["id"] <= end]
        return previous, covered, [row for row in reversed(usable[kept:])]

    async def write(self, answer: Answer) -> tuple[str, str]:
        """Ask for the summary, record the call, store what it wrote; the outcome and its cause."""
        relay, s = self.relay, self.relay.settings
        assert answer.context is not None
        budget = answer.context[0]
        _, rows = await relay.store.tree.chat_context(
            answer.owner,
            answer.session_id,
            4 * s.max_context_messages + 4,
            answer.message_id,
            current=False,
            summaries=True,
        )
        planned = self.plan(answer, rows)
        if planned is None:
            return "gone", "nothing to summarise"
        previous, covered, usable = planned
        with_files = [row["id"] for row in usable if row["has_files"]]
        files = await relay.store.files.of_messages(answer.owner, with_files) if with_files else {}
        said = f"Earlier summary:\n{previous['summary']}\n\n" if previous is not None else ""
        model = s.summarizer
        # the request fits the summary model's own budget: what does not (summaries failed a while, or the
        # summary model's window is smaller) is left to the next summary, which rolls this one on
        room = s.context_budget(model, max(64, budget // SUMMARY_SHARE)) - estimate_tokens(SUMMARY_PROMPT + said) - 20
        lines: list[str] = []
        for row in usable:
            line = transcript_lines(row, files.get(row["id"], []))
            room -= estimate_tokens(line) + 1
            if room < 0:
                if not lines:  # one message larger than the room: its beginning
                    line = line[: max(0, len(line) * (estimate_tokens(line) + room) // estimate_tokens(line))]
                    lines.append(line + " [...]")
                break
            lines.append(line)
        while len(lines) > 1 and is_question(usable[len(lines) - 1]):
            lines.pop()  # it ends with an answer: the next context starts with a user's message
        if len(lines) < len(usable):
            covered = [row for row in covered if row["id"] <= usable[len(lines) - 1]["id"]]
        transcript = "\n\n".join(lines)
        payload = {
            "model": model,
            "messages": [
                {"role": "system", "content": SUMMARY_PROMPT},
                {"role": "user", "content": f"{said}Conversation:\n{transcript}"},
            ],
            "stream": True,
            "stream_options": {"include_usage": True},
            "enable_thinking": False,
            "max_tokens": max(64, budget // SUMMARY_SHARE),
        }
        hold = relay.hold(answer.owner, answer.session_id, None, Purpose.SUMMARY, payload)
        try:
            await relay.store.db.atomically(lambda: relay.store.usage.admit(hold))
        except OverLimit as exc:
            return "over_limit", exc.detail
        text: list[str] = []
        usage, received, outcome, cause = None, False, COMPLETE, ""

        async def call() -> None:
            nonlocal usage, received
            text.clear()
            usage, received = None, False  # only the last attempt is counted
            async for delta in stream_completion(relay.client, s, payload):
                text.append(delta.content)
                usage, received = delta.usage or usage, True

        try:
            try:
                with anyio.fail_after(s.upstream_total_timeout):
                    await retried(s, relay.metrics, "summary", call, lambda: bool(text))
            except UpstreamError as exc:
                outcome, cause = FAILED, f"{exc.code}: {exc.detail}"
            except TimeoutError:
                outcome, cause = FAILED, f"upstream_timeout: no summary within {s.upstream_total_timeout:g} s"
            except asyncio.CancelledError:
                outcome, cause = INTERRUPTED, "the service stopped"
                raise
        finally:
            used = call_spent(hold, usage, "".join(text) if received else None, s.prices, thinking=False)
            settled = asyncio.ensure_future(
                relay.store.db.atomically(lambda: relay.store.usage.settle(hold.call_id, used, outcome, False))
            )
            try:
                await asyncio.shield(settled)
            except asyncio.CancelledError:
                await asyncio.wait([settled])
                raise
            relay.metrics.spent(model, used, "summary_")
        if outcome != COMPLETE:
            return "failed", cause
        content = _THINKING.sub("", "".join(text)).strip()
        if not content:
            return "failed", "the summary model wrote nothing"
        first = previous["summary_first"] if previous is not None else covered[0]["id"]
        count = (previous["summary_covered"] if previous is not None else 0) + len(covered)
        key = (answer.owner, answer.session_id)
        stored = await relay.store.summaries.add(key, covered[-1]["id"], first, content, count, model)
        if stored is None:
            return "gone", "its messages were deleted or cleared meanwhile"
        return ("made" if stored else "exists"), ""


# ── Bus: the notifications between replicas (PostgreSQL LISTEN/NOTIFY) ─────────────────
# One channel carries every replica's answer events, final events and stop requests, each a
# Notification; a replica's Bus publishes its own and hands it the others'. On SQLite none of this runs.

CHANNEL = "chatsvc"
NOTIFY_BYTES = 7900  # PostgreSQL refuses notifications of 8000 bytes or more
SEP = "\x1f"  # between a notification's fields; JSON escapes it, session ids and owners cannot hold it


class Kind(str, Enum):
    EVENT = "e"  # one event of an answer
    FINAL = "f"  # an answer's final event
    ENDED = "x"  # an answer ended in the store without a final event (taken for dead): read it there
    STOP = "s"  # a request to stop the conversation's answer, to whichever replica produces it (event: its token)
    STOPPED = "t"  # the producer stopped its answer for the request whose token `event` carries


@dataclass
class Notification:
    """One message between replicas. `event` is the SSE event itself; empty when it was too long to
    notify (the receiver reads the store). `text_chars`/`reasoning_chars`: how much text and
    reasoning the answer carries up to and including this event."""

    origin: str
    kind: Kind
    owner: str
    session_id: str
    message_id: str = ""
    seq: int | None = None
    status: str = ""
    text_chars: int = 0
    reasoning_chars: int = 0
    event: str = ""

    def encode(self) -> str:
        fields_ = (
            self.origin,
            self.kind.value,
            self.owner,
            self.session_id,
            self.message_id,
            "" if self.seq is None else str(self.seq),
            self.status,
            str(self.text_chars),
            str(self.reasoning_chars),
        )
        note = SEP.join((*fields_, self.event))
        return note if len(note.encode()) <= NOTIFY_BYTES else SEP.join((*fields_, ""))

    @classmethod
    def decode(cls, note: str) -> Notification:
        parts = note.split(SEP, 9)
        origin, kind, owner, session_id, message_id, seq, status, text_chars, reasoning_chars, event = parts
        return cls(
            origin,
            Kind(kind),
            owner,
            session_id,
            message_id,
            int(seq) if seq else None,
            status,
            int(text_chars),
            int(reasoning_chars),
            event,
        )


class Bus:
    """This replica's end of the channel. One connection listens; one task publishes whatever is
    pending in one statement, so a burst of events costs one round trip."""

    def __init__(self, store: Store, on_notification: Callable[[Notification], None]):
        self.store, self.on_notification = store, on_notification
        self.origin = uuid.uuid4().hex[:12]
        self._pending: list[str] = []
        self._wake = asyncio.Event()
        self._connections: list[Any] = []  # [listening, publishing]
        self._task: asyncio.Task | None = None
        self._reconnecting: asyncio.Task | None = None

    async def open(self) -> None:
        self._connections = [await self.store.db.hold(), await self.store.db.hold()]  # the bus's alone
        await self._listen(self._connections[0])
        self._task = asyncio.create_task(self._publish_loop())

    async def _listen(self, conn: Any) -> None:
        raw = conn.raw_connection
        await raw.add_listener(CHANNEL, self._received)
        raw.add_termination_listener(self._listener_lost)

    def _listener_lost(self, raw: Any) -> None:
        if self._task is not None and not self._task.done():
            log.warning("the connection listening to the other replicas was lost; reconnecting")
            self._reconnecting = asyncio.create_task(self._reconnect(0))

    async def _reconnect(self, index: int) -> None:
        """A lost connection (a database restart, a failover) is replaced, once a second, until it is.
        What the listener missed meanwhile, mirrors take from the store (gaps, and the heartbeat)."""
        await self.store.db.let_go(self._connections[index])
        while True:
            conn = None
            try:
                conn = await self.store.db.hold()
                if index == 0:
                    await self._listen(conn)
                self._connections[index], conn = conn, None
                log.info("reconnected to the other replicas")
                return
            except Exception as exc:
                log.warning("cannot reach the database for the other replicas yet (%s)", type(exc).__name__)
            finally:  # one taken but not kept (it failed, or the bus closed) goes back, or the pool's close waits
                if conn is not None:
                    await self.store.db.let_go(conn)
            await asyncio.sleep(1)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._reconnecting is not None:
            self._reconnecting.cancel()
            await asyncio.gather(self._reconnecting, return_exceptions=True)
        if self._connections:
            with contextlib.suppress(Exception):
                self._connections[0].raw_connection.remove_termination_listener(self._listener_lost)
                await self._connections[0].raw_connection.remove_listener(CHANNEL, self._received)
        while self._connections:
            await self.store.db.let_go(self._connections.pop())

    def publish(self, note: Notification) -> None:
        self._pending.append(note.encode())
        self._wake.set()

    async def _publish_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._pending = self._pending, []
            for attempt in range(2):  # once more on a new connection if this one was lost
                try:
                    await self._connections[1].raw_connection.execute(
                        "SELECT pg_notify($1, note) FROM unnest($2::text[]) AS note", CHANNEL, batch
                    )
                    self.store.db.metrics.bus.labels("sent").inc(len(batch))
                    break
                except Exception as exc:  # else mirrors see the gap at the next event and catch up from the store
                    log.warning("could not publish %d event(s) to the other replicas (%s)", len(batch), exc)
                    if attempt == 0:
                        await self._reconnect(1)
                    else:
                        self.store.db.metrics.bus.labels("unsent").inc(len(batch))

    def _received(self, conn: Any, pid: int, channel: str, note: str) -> None:
        notification = Notification.decode(note)
        if notification.origin != self.origin:
            self.store.db.metrics.bus.labels("received").inc()
            self.on_notification(notification)


# ── Replicas: answers followed across processes on PostgreSQL, and the heartbeat ───────
# Each replica publishes its answers' events on one LISTEN/NOTIFY channel and keeps a mirror of the
# others' answers, registered with its Relay's Registry like its own, so the channel, Last-Event-ID and
# stop work on any replica. The Relay reaches this section through `open`, `close`, `publish`,
# `recover`, `stop` and `follow`; the heartbeat (a thread) vouches for its answers and finds the
# answers of processes that stopped. On SQLite there is one process, and none of this runs.


@dataclass(eq=False)
class Mirror(Answer):
    """Another replica's answer, as this replica follows it: the events it was told, filled from the
    stored checkpoint where it was not told (it joined late, or notifications were lost)."""

    phase: Phase = Phase.FOLLOWING
    pending: list[Notification] | None = None  # catching up from the store: the live tail meanwhile
    heard_at: float = 0.0  # when its last notification came


class Replicas:
    """This replica's part in a group on one PostgreSQL database: publishing its answers, mirroring
    the others', and stopping an answer wherever it runs."""

    def __init__(self, relay: Relay):
        self.relay, self.settings, self.store = relay, relay.settings, relay.store
        self.registry = relay.registry
        self.bus = Bus(relay.store, self._on_notification)
        self.heartbeat: Heartbeat | None = None
        self._stops: dict[str, asyncio.Future] = {}  # this replica's stop requests, by token
        # the other processes' `streaming` answers as this replica's last read saw them (recover):
        # each one's heartbeat, and since when (time.monotonic()) this replica has seen that one
        self._beats: dict[str, tuple[str, float]] = {}

    async def open(self) -> None:
        await self.bus.open()
        await self.recover()
        self.heartbeat = Heartbeat(self.relay, asyncio.get_running_loop())
        self.relay.spawn(self._sweep())

    async def close(self) -> None:
        if self.heartbeat is not None:
            await asyncio.to_thread(self.heartbeat.stop)
        for answer in self.registry.running_answers():  # mirrors: their listeners reconnect to another replica
            if answer.phase is Phase.FOLLOWING:
                answer.end()
        await self.bus.close()

    # ── the sweep: the heartbeat's part on the event loop

    async def _sweep(self) -> None:
        """Every heartbeat: answers whose process is gone (no heartbeat for HEARTBEAT_MISSES
        intervals) become interrupted, and mirrors whose answer ended unheard end from the store."""
        while True:
            await asyncio.sleep(self.settings.heartbeat_seconds)
            if self.heartbeat is not None:
                self.heartbeat.alive()
            try:
                await self.recover()
                await self.check_mirrors()
            except StorageUnavailable as exc:  # a database fault: said in its sentence, tried again next beat
                log.warning("heartbeat sweep failed: %s", exc.detail)
            except Exception:
                log.warning("heartbeat sweep failed", exc_info=True)

    async def recover(self) -> int:
        """Interrupt the answers whose process stopped beating; how many there were.

        An answer is taken for dead once this replica has itself seen its heartbeat unchanged for
        HEARTBEAT_MISSES intervals (by its own clock, between its reads) and the heartbeat is that old
        by the database's clock too. Not by the database's clock alone: a new row's heartbeat is
        written inside its turn's transaction, and the row is seen only once that commits, which under
        load comes seconds later (the turn waits on the event loop and the pool at each statement): it
        would be seen already stale, before its process could beat it once. So no process is judged
        on time it could not beat in; except that a heartbeat older than dead_at_sight() is dead
        whenever it is read (no turn commits that late: beat_in_time), so a replica that starts
        interrupts at once what a stop of every process left that long ago."""
        stale, own = self.settings.heartbeat_stale, self.relay.own_ids()
        beats = await self.store.answers.heartbeats(dead_at_sight(self.settings.heartbeat_seconds))
        now, mine = time.monotonic(), set(own)
        watched, due = {}, []
        for answer_id, (beat, dead) in beats.items():
            if answer_id not in mine:
                seen = self._beats.get(answer_id)
                watched[answer_id] = seen if seen is not None and seen[0] == beat else (beat, now)
                if dead or now - watched[answer_id][1] >= stale:
                    due.append(answer_id)
        self._beats = watched
        rows = []
        for start in range(0, len(due), 500):
            rows += await self.store.answers.recover_interrupted(stale, own, due[start : start + 500])
        for row in rows:
            log.warning("answer %s lost its process (no heartbeat): stored as interrupted", row["id"])
            count_swept(self.relay.metrics, row)
        if rows:
            self.ended(rows)
        return len(rows)

    def _note(self, kind: Kind, owner: str, session_id: str, message_id: str = "", **more: Any) -> Notification:
        return Notification(self.bus.origin, kind, owner, session_id, message_id, **more)

    # ── what this replica tells the others

    def publish(self, answer: Answer, event: bytes, final: bool) -> None:
        """An event of this replica's answer (called as it is appended: its seq is the log's length)."""
        self.bus.publish(
            self._note(
                Kind.FINAL if final else Kind.EVENT,
                answer.owner,
                answer.session_id,
                answer.message_id,
                seq=len(answer.log),
                status=answer.status if final else "",
                text_chars=answer.text_chars,
                reasoning_chars=answer.reasoning_chars,
                event=event.decode(),
            )
        )

    def ended(self, rows: list[dict]) -> None:
        """Answers this replica interrupted (their process is gone): every replica's mirror ends from
        the store, this one's too."""
        for row in rows:
            note = self._note(Kind.ENDED, row["owner"], row["session_id"], row["id"])
            self.bus.publish(note)
            self._on_notification(note)

    def _ask_to_stop(self, key: tuple[str, str]) -> asyncio.Future:
        """Ask whichever replica produces the conversation's answer to stop it; the future is set
        if this request is the one that stopped it (only one of several concurrent stops is)."""
        token = uuid.uuid4().hex
        won = self._stops[token] = asyncio.get_running_loop().create_future()
        won.add_done_callback(lambda _: self._stops.pop(token, None))
        self.bus.publish(self._note(Kind.STOP, *key, event=token))
        return won

    # ── what the others tell it

    def _on_notification(self, note: Notification) -> None:
        if note.kind is Kind.STOP:
            answer = self.registry.running((note.owner, note.session_id))
            if answer is not None and answer.cancel(StopReason.STOPPED):  # only this replica's own answer stops
                stopped = self._note(Kind.STOPPED, note.owner, note.session_id, answer.message_id, event=note.event)
                self.bus.publish(stopped)
            return
        if note.kind is Kind.STOPPED:
            won = self._stops.get(note.event)
            if won is not None and not won.done():
                won.set_result(True)
            return
        mirror = self.registry.find(note.message_id)
        if mirror is not None and mirror.done.is_set() and (note.seq or 0) > (mirror.final_seq or len(mirror.log)):
            mirror = None  # continued since it ended here: the continuation is followed anew
        if mirror is None:
            if self.registry.closed:
                return
            mirror = Mirror(note.owner, note.session_id, note.message_id, model="")
            if note.seq and note.event[:400].find('"continues":{') > 0:  # a continuation's start: its ids go on
                mirror.log, mirror.base = EventLog(note.seq), note.seq
            self.registry.register(mirror)
        if isinstance(mirror, Mirror) and mirror.phase is Phase.FOLLOWING:
            mirror.heard_at = time.monotonic()
            self._mirror(mirror, note)

    def _mirror(self, mirror: Mirror, note: Notification) -> None:
        if mirror.pending is not None:  # catching up: keep the tail
            mirror.pending.append(note)
        elif note.kind is Kind.ENDED:  # the store has its end
            self.relay.spawn(self._end_from_store(mirror))
        elif note.seq is not None and note.seq < len(mirror.log):
            pass  # had it
        elif note.seq == len(mirror.log) and note.event:
            mirror.text_chars, mirror.reasoning_chars = note.text_chars, note.reasoning_chars
            if mirror.sources is None and note.event.find('\ndata: {"type":"sources"', 0, 200) > 0:
                mirror.sources = []  # heard: a catch-up does not send them again
            mirror.append(note.event.encode(), final=note.kind is Kind.FINAL)
            if note.kind is Kind.FINAL:
                mirror.status = note.status
                self._end(mirror)
        else:  # a gap (joined mid-answer, or notifications lost) or an event too long to notify
            self.relay.metrics.bus_gaps.inc()
            mirror.pending = [note]
            self.relay.spawn(self._catch_up(mirror))

    def follow(self, owner: str, session_id: str, message_id: str) -> Mirror:
        """A mirror of an answer this replica has not heard of (a reader resumes it here), caught
        up from the store and then followed live."""
        mirror = Mirror(owner, session_id, message_id, model="", pending=[], heard_at=time.monotonic())
        self.registry.register(mirror)
        self.relay.spawn(self._catch_up(mirror))
        return mirror

    async def _catch_up(self, mirror: Mirror) -> None:
        """Fill a mirror's gap from the stored checkpoint, then go on with the live tail: the
        checkpoint says which events its text covers, so nothing is sent twice or left out."""
        assert mirror.pending is not None
        for _ in range(20):
            try:
                row = await self.store.tree.message(mirror.owner, mirror.session_id, mirror.message_id)
            except StorageUnavailable:
                await asyncio.sleep(self.settings.checkpoint_seconds)
                continue
            if row is None or row["status"] != STREAMING:
                mirror.pending = None
                await self._end_from_store(mirror, row)
                return
            covered = row["last_seq"] or 0
            tail = [note for note in mirror.pending if note.seq is not None]
            # a note without its event (too long to notify) needs a checkpoint that holds that event too
            if covered >= len(mirror.log) and (not tail or covered >= tail[0].seq + (not tail[0].event)):
                self._fill(mirror, row, covered)
                pending, mirror.pending = mirror.pending, None
                for note in pending:
                    self._mirror(mirror, note)
                return
            await asyncio.sleep(self.settings.checkpoint_seconds / 2)  # the next checkpoint will cover it
        log.warning("answer %s: no checkpoint covers the gap; its mirror ends here", mirror.message_id)
        mirror.pending = None
        await self._end_from_store(mirror)

    def _fill(self, mirror: Mirror, row: dict, covered: int) -> None:
        """Events len(log)..covered-1 as empty places plus one event with the text they carried. A
        continuation joined late (its `start` unheard): its log starts at that one event (an EventLog; its
        ids go on past its earlier parts', from 2**31 after an interrupted one), or just before the steps
        that end what the checkpoint covers; it has no `start` here (its base is not stored)."""
        if not mirror.log:
            mirror.model = row["model"] or ""
            mirror.parent_id = row["parent_id"]
            if row.get("continued"):
                first, steps = covered - 1, json.loads(row["tool_steps"]) if row["tool_steps"] else []
                for step in reversed(steps):  # the steps just before `covered`, each an event of its own
                    if step["seq"] == first:
                        first -= 1
                mirror.log, mirror.base = EventLog(max(first, 0)), max(first, 0)
        if not mirror.log:
            data = {
                "session_id": mirror.session_id,
                "message_id": mirror.message_id,
                "model": mirror.model,
                "parent_id": mirror.parent_id,
            }
            mirror.append(sse_event(event_id(mirror.message_id, 0), {"type": "start", "data": data}))
        if covered <= len(mirror.log):
            return
        content, reasoning = row["content"] or "", row["reasoning_content"] or ""
        # a searched answer's sources not heard (too long to notify, or joined after them): sent before
        # the text of the first event filled (a continuation's were sent by the answer it continues)
        sources = stored_json(row.get("sources")) if mirror.sources is None and not mirror.base else None
        if sources is not None:
            mirror.sources = sources
        steps = json.loads(row["tool_steps"]) if row["tool_steps"] else []
        for step in steps:  # the text said before each step, in one event just before it; then the step
            if len(mirror.log) <= step["seq"] < covered:
                at = step["seq"] - 1
                if self._fill_text(mirror, at, content[: step["text"]], reasoning[: step["reasoning"]], sources):
                    sources = None
                mirror.log.extend([b""] * (step["seq"] - len(mirror.log)))
                mirror.append(
                    sse_event(event_id(mirror.message_id, step["seq"]), {"type": step["type"], "data": step["data"]})
                )
        self._fill_text(mirror, covered - 1, content, reasoning, sources)

    @staticmethod
    def _fill_text(mirror: Mirror, seq: int, content: str, reasoning: str, sources: list | None = None) -> bool:
        """The text a mirror lacks up to event `seq`, as one event with that id (empty places before it),
        after a `sources` event with `sources`; False if the mirror has that event already."""
        if seq < len(mirror.log):
            return False
        last_id = event_id(mirror.message_id, seq)
        missing = b""
        if sources is not None:
            missing += sse_event(last_id, {"type": "sources", "data": {"sources": sources}})
        if reasoning[mirror.reasoning_chars :]:
            missing += delta_event(last_id, "reasoning", reasoning[mirror.reasoning_chars :])
        if content[mirror.text_chars :]:
            missing += delta_event(last_id, "chunk", content[mirror.text_chars :])
        mirror.text_chars, mirror.reasoning_chars = len(content), len(reasoning)
        mirror.log.extend([b""] * (seq - len(mirror.log)))
        mirror.append(missing)
        return True

    async def _end_from_store(self, mirror: Mirror, row: dict | None = None) -> None:
        if row is None:
            with contextlib.suppress(StorageUnavailable):
                row = await self.store.tree.message(mirror.owner, mirror.session_id, mirror.message_id)
        if row is not None and row["status"] != STREAMING and mirror.phase is Phase.FOLLOWING:
            mirror.status = row["status"]
            mirror.append(stored_final_event(row), final=True, seq=row["last_seq"])
        self._end(mirror)

    def _end(self, mirror: Mirror) -> None:
        if mirror.phase is not Phase.FOLLOWING:
            return
        if mirror.status == STREAMING:  # ended without a final event (its replica shut down)
            mirror.status = INTERRUPTED
        mirror.end()
        self.registry.end(mirror)
        self.registry.forget_later(mirror)

    async def check_mirrors(self) -> None:
        """A mirror whose answer has ended in the store, though its final event never came (a lost
        notification, a lost listening connection), ends from the store."""
        quiet = time.monotonic() - self.settings.heartbeat_seconds  # not while its events still arrive
        mirrors = {
            answer.message_id: answer
            for answer in self.registry.running_answers()
            if isinstance(answer, Mirror) and answer.pending is None and answer.heard_at < quiet
        }
        if mirrors:
            still = await self.store.answers.streaming(list(mirrors))
            for message_id, mirror in mirrors.items():
                if message_id not in still:
                    await self._end_from_store(mirror)

    # ── stop, wherever the answer runs

    async def stop(self, key: tuple[str, str], mirror: Answer | None) -> tuple[str | None, bool]:
        """Another replica's answer is asked to stop, and awaited for up to 10 s. One this replica
        has not heard of (it started before this replica did, and has sent nothing since): the
        database knows it."""
        if mirror is not None:
            won = self._ask_to_stop(key)
            try:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(mirror.done.wait()), 10)
                return mirror.message_id, won.done() and not won.cancelled() and mirror.status == STOPPED
            finally:
                won.cancel()
        await self.recover()  # one whose replica is gone is interrupted now, not asked
        answer_id = await self.store.answers.streaming_id(*key)
        if answer_id is None:
            return None, False
        won = self._ask_to_stop(key)
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                row = await self.store.tree.message(*key, answer_id)
                if row is None or row["status"] != STREAMING:
                    stopped = row is not None and row["status"] == STOPPED
                    return answer_id, won.done() and not won.cancelled() and stopped
            return answer_id, False
        finally:
            won.cancel()


class Heartbeat:
    """PostgreSQL: this process's answers are marked alive every CHATSVC_HEARTBEAT_SECONDS from a
    thread of its own, on a connection of its own, so the heartbeat never queues behind the work it
    vouches for (a busy event loop, a busy pool). It beats only while the event loop still turns.
    Rows it finds no longer `streaming` with their producer's generation were taken by another
    process (and may have been continued since): their producers are told."""

    def __init__(self, relay: Relay, loop: asyncio.AbstractEventLoop):
        self.relay, self.loop = relay, loop
        self.interval = relay.settings.heartbeat_seconds
        self.stalled_after = max(30.0, 2 * relay.settings.heartbeat_stale)  # a loop this late is hung
        self.loop_tick = time.monotonic()  # the event loop is alive (Replicas' sweep says so): the thread reads it
        self._stopping = threading.Event()
        self._conn: Any = None
        self._thread = threading.Thread(target=self._run, name="chatsvc-heartbeat", daemon=True)
        self._thread.start()

    def alive(self) -> None:
        """The event loop turns: beats may go on."""
        self.loop_tick = time.monotonic()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(10)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        try:
            while not self._stopping.wait(self.interval):
                loop.run_until_complete(self._beat())
            if self._conn is not None:
                loop.run_until_complete(self._conn.close())
        finally:
            loop.close()

    async def _beat(self) -> None:
        import asyncpg

        own = self.relay.vouched()
        ids = list(own)
        # Read after the ids: an answer no longer claiming here has its row committed before the UPDATE.
        claiming = self.relay.claiming()
        if not ids or time.monotonic() - self.loop_tick > self.stalled_after:
            return
        try:
            if self._conn is None or self._conn.is_closed():
                url = DatabaseURL(self.relay.store.db.url)
                self._conn = await asyncpg.connect(
                    host=url.hostname,
                    port=url.port,
                    user=url.username,
                    password=url.password,
                    database=url.database,
                    timeout=10,
                    command_timeout=max(1.0, self.relay.settings.heartbeat_stale),
                )
            rows = await self._conn.fetch(HEARTBEAT_SQL, ids, [own[i] for i in ids])
        except Exception as exc:
            log.warning("heartbeat failed (%s); trying again", type(exc).__name__)
            if self._conn is not None:
                self._conn.terminate()
                self._conn = None
            return
        # A claimed row may not be committed yet: missing, it is not taken (its answer starts after the commit,
        # and this beat's word would reach it then and stop it for nothing).
        beaten = {row["id"] for row in rows}
        taken = {i: own[i] for i in ids if i not in claiming and i not in beaten}
        if taken:
            self.loop.call_soon_threadsafe(self.relay.taken, taken)


# ── HTTP: request parsing: a request's body, query and path, checked ───────────────────

# "." and ".." are excluded: browsers and proxies normalise them out of URLs.
SESSION_ID = re.compile(r"(?!\.+$)[A-Za-z0-9._-]{1,128}")
_SESSION_ID_RULE = "1 to 128 characters of A-Z, a-z, 0-9, '.', '_' and '-' (not only dots)"
MAX_MAX_TOKENS = 2**31 - 1  # a request's max_tokens, at most (what models take; a hold stays a BIGINT)


MESSAGE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def check_session_id(value: Any) -> str:
    if not isinstance(value, str) or not SESSION_ID.fullmatch(value):
        raise invalid(f"session_id must be {_SESSION_ID_RULE}.")
    return value


ASCII_NUMBER = re.compile(r"[0-9]{1,18}")  # what int() takes from a header or query: ASCII only ("²" is a digit too)


def is_json(content_type: str | None) -> bool:
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    return media_type == "application/json" or (media_type.startswith("application/") and media_type.endswith("+json"))


async def read_json(
    request: Request, settings: Settings, optional: bool = False, limit: int | None = None, in_thread: bool = False
) -> dict:
    """The body as a JSON object: only as `application/json` (415: a cross-site form or `text/plain`
    POST must not run a chat), at most CHATSVC_MAX_BODY_BYTES (or `limit`; 413, counted, not trusted
    from headers), arriving within CHATSVC_READ_TIMEOUT (408). `in_thread`: decoded in a worker thread
    (a large body), not on the event loop."""
    limit = limit or settings.max_body_bytes
    declared = request.headers.get("content-length", "")
    if ASCII_NUMBER.fullmatch(declared) and int(declared) > limit:
        raise too_large(limit)
    body = bytearray()
    try:
        with anyio.fail_after(settings.read_timeout):
            async for piece in request.stream():
                body += piece
                if len(body) > limit:
                    raise too_large(limit)
    except ClientDisconnect:  # nobody is left to answer; not a server error
        raise client_disconnected() from None
    except TimeoutError:
        raise request_timeout(settings.read_timeout) from None
    if not body and optional:  # no body at all; whitespace is not JSON
        return {}
    if not is_json(request.headers.get("content-type")):
        raise unsupported_media_type(request.headers.get("content-type"))
    try:
        data = await anyio.to_thread.run_sync(json.loads, body) if in_thread else json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise not_json() from None
    except RecursionError:
        raise not_json("The request body is nested too deeply.") from None
    if not isinstance(data, dict):
        raise not_json("The request body must be a JSON object.")
    return data


def check_fields(body: dict, allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise invalid(f"Unknown field '{unknown[0]}'. Allowed fields: {', '.join(allowed)}.")


def storable(name: str, value: str, max_chars: int) -> str:
    """Text every database can store and every client can read back exactly."""
    if len(value) > max_chars:
        raise invalid(f"'{name}' is longer than {max_chars} characters.")
    if "\x00" in value:
        raise invalid(f"'{name}' must not contain NUL characters (U+0000).")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise invalid(f"'{name}' contains an unpaired surrogate (\\ud800-\\udfff): it is not valid Unicode.") from None
    return value


def optional_text(body: dict, name: str, max_chars: int) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise invalid(f"'{name}' must be a string or null.")
    return None if value is None else storable(name, value, max_chars)


def number(body: dict, name: str, low: float, high: float, low_open: bool, high_open: bool, rule: str):
    value = body.get(name)
    if value is None:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        raise invalid(f"'{name}' must be {rule}.")
    return value


def check_model(settings: Settings, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise invalid(f"'model' must be a string. Available: {', '.join(settings.models)}.")
    if value not in settings.models:
        raise invalid(
            f"Unknown model {json.dumps(value[:200], ensure_ascii=False)}. Available: {', '.join(settings.models)}."
        )
    return value


def query_int(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not re.fullmatch(r"[0-9]{1,9}", raw) or not low <= int(raw) <= high:
        raise invalid(f"'{name}' must be a whole number from {low} to {high}.")
    return int(raw)


def query_bool(request: Request, name: str) -> bool:
    value = request.query_params.get(name, "false").lower()
    if value not in ("true", "false", "1", "0"):
        raise invalid(f"'{name}' must be true or false.")
    return value in ("true", "1")


def query_message_id(request: Request, name: str) -> str | None:
    value = request.query_params.get(name) or None  # empty: absent
    if value is not None and not MESSAGE_ID.fullmatch(value):
        raise invalid(f"'{name}' is not a message id this service returned.")
    return value


def message_id_field(body: dict, name: str) -> str | None:
    value = body.get(name)
    if value is not None and not (isinstance(value, str) and MESSAGE_ID.fullmatch(value)):
        raise invalid(f"'{name}' must be the id of a message (a string this service returned), or null.")
    return value


# A page's cursor: written as a response's `next_cursor`, read back from the next request.
def encode_cursor(*parts: str) -> str:
    return base64.urlsafe_b64encode("\n".join(parts).encode()).decode().rstrip("=")


def decode_cursor(cursor: str, parts: int) -> list[str]:
    try:
        values = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode().split("\n")
    except (ValueError, UnicodeDecodeError):
        values = []
    if len(values) != parts or any("\x00" in value for value in values):  # PostgreSQL refuses NUL in text
        raise invalid("'cursor' is not a cursor this service returned.")
    return values


@dataclass
class ChatRequest:
    message: str | None  # None: a regeneration (the question is the stored one)
    model: str | None
    options: dict[str, Any]
    # where in the conversation's tree it goes (at most one; none: after the current leaf)
    parent_id: str | None = None  # the new message follows this answer
    edit: str | None = None  # the new message replaces this user message (becomes its sibling)
    regenerate: str | None = None  # a new answer to the question this answer answered
    # tools: the app's own (OpenAI function format), which MCP servers' tools are offered (True: all),
    # tool_choice as the model service takes it, and a turn of the app's results instead of a message
    tools: list[dict] | None = None
    server_tools: bool | list[str] = True
    tool_choice: Any = None
    tool_results: list[dict] | None = None
    files: list[str] = field(default_factory=list)  # the new message's files, by id, in order
    # its web search: absent (the conversation's setting decides), False (none), or the options (dict)
    web_search: dict | bool | None = None
    continue_id: str | None = None  # `continue`: the model goes on with this stored answer's text (a turn of its own)


CHAT_FIELDS = (
    "message",
    "files",
    "model",
    "temperature",
    "top_p",
    "max_tokens",
    "enable_thinking",
    "parent_id",
    "edit",
    "regenerate",
    "tools",
    "tool_choice",
    "server_tools",
    "tool_results",
    "web_search",
    "continue",
)
# what `continue` cannot go with: it is a turn of its own, on a stored answer
CONTINUE_EXCLUSIVE = (
    "message",
    "files",
    "parent_id",
    "edit",
    "regenerate",
    "tool_results",
    "tools",
    "tool_choice",
    "web_search",
)
MAX_CLIENT_TOOLS = 128  # a request's own tools, at most
FUNCTION_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # the model API's rule for a function's name
TOOL_SCHEMA_CHARS = 100_000  # a request's own tools' definitions, as JSON, at most


def parse_tools(body: dict) -> list[dict] | None:
    """The request's own tools, each `{"type": "function", "function": {"name", "description"?,
    "parameters"?}}`, passed to the model as given (nothing but these keys)."""
    tools = body.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list) or len(tools) > MAX_CLIENT_TOOLS:
        raise invalid(f"'tools' must be a list of at most {MAX_CLIENT_TOOLS} tools.")
    kept, names = [], set()
    for n, tool in enumerate(tools):
        where = f"'tools[{n}]'"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise invalid(f'{where} must be {{"type": "function", "function": {{"name", "parameters"}}}}.')
        function = tool["function"]
        name = function.get("name")
        if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name):
            raise invalid(f"{where}.function.name must be 1 to 64 letters, digits, '_' or '-' (the model API's rule).")
        if name in names:
            raise invalid(f"{where}.function.name '{name}' is given twice.")
        names.add(name)
        entry: dict[str, Any] = {"name": name}
        if function.get("description") is not None:
            if not isinstance(function["description"], str):
                raise invalid(f"{where}.function.description must be a string.")
            entry["description"] = storable(
                f"tools[{n}].function.description", function["description"], TOOL_SCHEMA_CHARS
            )
        if function.get("parameters") is not None:
            if not isinstance(function["parameters"], dict):
                raise invalid(f"{where}.function.parameters must be a JSON Schema object.")
            storable(f"tools[{n}].function.parameters", json.dumps(function["parameters"], ensure_ascii=False), 10**9)
            entry["parameters"] = function["parameters"]
        kept.append({"type": "function", "function": entry})
    if len(json.dumps(kept, ensure_ascii=False)) > TOOL_SCHEMA_CHARS:
        raise invalid(f"'tools' is longer than {TOOL_SCHEMA_CHARS} characters as JSON.")
    return kept


def parse_tool_choice(body: dict) -> Any:
    choice = body.get("tool_choice")
    if choice is None or (isinstance(choice, str) and choice in ("auto", "none", "required")):
        return choice
    function = choice.get("function") if isinstance(choice, dict) else None
    if isinstance(function, dict) and choice.get("type") == "function" and isinstance(function.get("name"), str):
        return {"type": "function", "function": {"name": function["name"]}}
    raise invalid(
        """'tool_choice' must be "auto", "none", "required" or {"type": "function", "function": {"name": ...}}."""
    )


def parse_server_tools(body: dict) -> bool | list[str]:
    value = body.get("server_tools", True)
    if isinstance(value, bool):
        return value
    if isinstance(value, list) and all(isinstance(name, str) for name in value):
        return list(dict.fromkeys(value))
    raise invalid("'server_tools' must be true (all the MCP servers' tools), false (none), or a list of their names.")


def parse_tool_results(settings: Settings, body: dict) -> list[dict] | None:
    """A turn of the app's tool results: `[{"tool_call_id", "content"}, ...]`, one per call."""
    results = body.get("tool_results")
    if results is None:
        return None
    if not isinstance(results, list) or not results or len(results) > MAX_CLIENT_TOOLS:
        raise invalid(f"'tool_results' must be a list of 1 to {MAX_CLIENT_TOOLS} results.")
    kept = []
    for n, result in enumerate(results):
        where = f"tool_results[{n}]"
        if not isinstance(result, dict) or set(result) - {"tool_call_id", "content"}:
            raise invalid(f'\'{where}\' must be {{"tool_call_id", "content"}}.')
        call_id, content = result.get("tool_call_id"), result.get("content")
        if not isinstance(call_id, str) or not call_id or len(call_id) > MAX_CALL_ID_CHARS:
            raise invalid(f"'{where}.tool_call_id' must be the id of a call (a string).")
        if not isinstance(content, str):
            raise invalid(f"'{where}.content' must be a string (the result's text; JSON as text).")
        storable(f"{where}.content", content, settings.max_message_chars)
        kept.append({"tool_call_id": storable(f"{where}.tool_call_id", call_id, MAX_CALL_ID_CHARS), "content": content})
    return kept


def parse_files(settings: Settings, body: dict) -> list[str]:
    """The new message's files: `["<file id>", ...]`, each once, at most CHATSVC_MAX_FILES_PER_MESSAGE
    (whose they are, and whether they are ready, is Turns' to check)."""
    files = body.get("files")
    if files is None:
        return []
    if not isinstance(files, list) or not all(isinstance(file_id, str) for file_id in files):
        raise invalid("'files' must be a list of file ids (strings POST /api/v1/files returned).")
    if len(files) > settings.max_files_per_message:
        raise FileRefused(
            422,
            "too_many_files",
            f"A message may carry at most {settings.max_files_per_message} files"
            f" (CHATSVC_MAX_FILES_PER_MESSAGE); this one names {len(files)}.",
        )
    for n, file_id in enumerate(files):
        if not MESSAGE_ID.fullmatch(file_id):
            raise invalid(f"'files[{n}]' is not a file id this service returned.")
    twice = next((file_id for n, file_id in enumerate(files) if file_id in files[:n]), None)
    if twice is not None:
        raise FileRefused(422, "duplicate_file", f"'files' names file '{twice}' twice; name each file once.")
    return files


def parse_chat(settings: Settings, body: dict) -> ChatRequest:
    check_fields(body, CHAT_FIELDS)
    if body.get("continue") is not None:
        return parse_continue(settings, body)
    places = {name: message_id_field(body, name) for name in ("parent_id", "edit", "regenerate")}
    if sum(value is not None for value in places.values()) > 1:
        raise invalid("At most one of 'parent_id', 'edit' and 'regenerate' may be given.")
    message = body.get("message")
    files = parse_files(settings, body)
    if files and (places["regenerate"] is not None or body.get("tool_results") is not None):
        raise invalid(
            "'files' go with a new message: leave them out of 'regenerate' (the answer uses its question's"
            " files) and 'tool_results'."
        )
    if files and message is None:
        message = ""  # a message of files only
    tool_results = parse_tool_results(settings, body)
    if tool_results is not None:
        if message is not None or places["regenerate"] is not None:
            raise invalid("'tool_results' is a turn of its own: leave 'message' and 'regenerate' out.")
    elif places["regenerate"] is not None:
        if message is not None:
            raise invalid(
                "'regenerate' answers the stored question again: leave 'message' out (to change the"
                " question, send it with 'edit')."
            )
    elif not isinstance(message, str):
        raise invalid("'message' is required and must be a string.")
    elif not message.strip() and not files:
        raise invalid("'message' must not be blank (unless it carries 'files').")
    else:
        storable("message", message, settings.max_message_chars)
    options = {
        "temperature": number(body, "temperature", 0, 2, False, True, "a number from 0 up to (not including) 2"),
        "top_p": number(body, "top_p", 0, 1, True, False, "a number above 0 and at most 1"),
        "max_tokens": body.get("max_tokens"),
        "enable_thinking": body.get("enable_thinking"),
    }
    max_tokens = options["max_tokens"]
    if isinstance(max_tokens, float) and max_tokens.is_integer():  # 100.0 is a whole number in JSON
        options["max_tokens"] = max_tokens = int(max_tokens)
    if max_tokens is not None and (type(max_tokens) is not int or not 1 <= max_tokens <= MAX_MAX_TOKENS):
        raise invalid(f"'max_tokens' must be a whole number from 1 to {MAX_MAX_TOKENS}.")
    if options["enable_thinking"] is not None and not isinstance(options["enable_thinking"], bool):
        raise invalid("'enable_thinking' must be true or false.")
    return ChatRequest(
        message,
        check_model(settings, body.get("model")),
        {k: v for k, v in options.items() if v is not None},
        **places,
        tools=parse_tools(body),
        server_tools=parse_server_tools(body),
        tool_choice=parse_tool_choice(body),
        tool_results=tool_results,
        files=files,
        web_search=parse_web_search(settings, body, "web_search"),
    )


# A request's or conversation's `web_search`: true (DashScope's defaults) or an object of these
# search_options (DashScope's names and values; enable_source is chatsvc's: always true).
SEARCH_STRATEGIES = ("turbo", "max", "agent", "agent_max")
SEARCH_FRESHNESS = (7, 30, 180, 365)
CITATION_FORMATS = ("[<number>]", "[ref_<number>]")
MAX_ASSIGNED_SITES = 25


def parse_web_search(settings: Settings, body: dict, name: str) -> dict | bool | None:
    """`web_search` as given: None (absent or null), False, or the search options (true: {}). Asking
    for a search while CHATSVC_WEB_SEARCH=off is 422 web_search_disabled; turning it off while it is
    `always` is 422 invalid_request."""
    value = body.get(name)
    if value is None:
        return None
    if value is False:
        if settings.web_search == "always":
            raise invalid(f"'{name}' cannot be false: CHATSVC_WEB_SEARCH=always makes every turn search the web.")
        return False
    if value is not True and not isinstance(value, dict):
        raise invalid(f"'{name}' must be true, false, or an object of search options ({', '.join(SEARCH_OPTIONS)}).")
    if settings.web_search == "off":
        raise ApiError(
            422,
            "web_search_disabled",
            f"'{name}' asks for a web search, which this service does not make: set CHATSVC_WEB_SEARCH=allowed"
            " (or always) to turn it on, or leave 'web_search' out.",
        )
    if value is True:
        return {}
    unknown = [key for key in value if key not in SEARCH_OPTIONS]
    if unknown:
        raise invalid(f"'{name}.{unknown[0][:40]}' is not a search option; use {', '.join(SEARCH_OPTIONS)}.")
    for key, check in SEARCH_OPTIONS.items():
        if key in value and not check(value[key]):
            raise invalid(f"'{name}.{key}' must be {SEARCH_RULES[key]}.")
    return dict(value)


SEARCH_OPTIONS: dict[str, Callable[[Any], bool]] = {
    "forced_search": lambda v: isinstance(v, bool),
    "search_strategy": lambda v: v in SEARCH_STRATEGIES,
    "freshness": lambda v: type(v) is int and v in SEARCH_FRESHNESS,
    "assigned_site_list": lambda v: (
        isinstance(v, list)
        and len(v) <= MAX_ASSIGNED_SITES
        and all(isinstance(site, str) and 0 < len(site) <= 253 for site in v)
    ),
    "enable_citation": lambda v: isinstance(v, bool),
    "citation_format": lambda v: v in CITATION_FORMATS,
}
SEARCH_RULES = {
    "forced_search": "true or false",
    "search_strategy": " or ".join(SEARCH_STRATEGIES),
    "freshness": "a number of days: 7, 30, 180 or 365",
    "assigned_site_list": f"a list of at most {MAX_ASSIGNED_SITES} site names (strings)",
    "enable_citation": "true or false",
    "citation_format": '"[<number>]" or "[ref_<number>]"',
}


def parse_continue(settings: Settings, body: dict) -> ChatRequest:
    """`{"continue": "<answer id>"}`: the model goes on with that answer's stored text (CONTRACT.md,
    "Continuing an answer"); model options as for any turn (thinking cannot be asked for: a model
    continues a text without it, and DashScope's partial mode refuses it)."""
    answer_id = message_id_field(body, "continue")
    given = [name for name in CONTINUE_EXCLUSIVE if body.get(name) is not None]
    if given:
        raise invalid(
            "'continue' goes on with a stored answer and is a turn of its own: leave out"
            f" {', '.join(repr(n) for n in given)}."
        )
    if settings.continue_style == "off":
        raise ApiError(
            422,
            "continue_unsupported",
            "This service does not continue answers (CHATSVC_CONTINUE_STYLE=off): set it to partial (DashScope),"
            " continue_final_message (vLLM) or prefill (llama.cpp, Ollama) to allow 'continue'.",
        )
    if body.get("enable_thinking") is True:
        raise invalid(
            "'enable_thinking' must be false or left out with 'continue': a model continues a text without"
            " thinking (DashScope's partial mode refuses thinking)."
        )
    chat = parse_chat(settings, {k: v for k, v in body.items() if k != "continue"} | {"message": "-"})
    chat.message, chat.continue_id = None, answer_id  # its own enable_thinking false is a model option, as for any turn
    return chat


# ── Conversation files: the JSON export, and an import read back field by field ────────
# GET .../export writes a conversation and every message of its tree as one JSON file, which POST
# .../import reads back into a new conversation. The import checks every field before anything is
# written: the first bad one is a 422 naming its path in the file (`messages[3].usage.total_tokens`).

EXPORT_FORMAT, EXPORT_VERSION = "chatsvc.conversation", 3
# Version 1: no tool fields (its messages have none). Version 2: each message's last_seq, tool_steps and
# tool_results. Version 3: the files the messages carry, their bytes in the file as base64 (top-level
# `files`, each keyed "f1", "f2", … in the order of first use) and each message's `files` (their keys).
# Written only when set, so a file without them is as before: an answer's `continued`, `sources` and
# `searches`, and the conversation's `web_search` (docs/CONTRACT.md, "Answers from the web").
# An older chatsvc refuses a newer file rather than lose what it cannot keep.
IMPORT_VERSIONS = (1, 2, 3)
IMPORT_MAX_MESSAGES = 100_000
IMPORTED_STATUSES = (COMPLETE, STOPPED, INTERRUPTED, FAILED, STREAMING)  # streaming: stored as interrupted
EXPORTED_WHILE_WRITTEN = "This answer was being written when it was exported; it holds what had been written by then."
RFC3339 = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)[Tt](\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?(?:([Zz])|([+-])(\d\d):(\d\d))", re.ASCII
)
# The fields of the file, of its conversation and of each of its messages, in the order they are written.
FILE_FIELDS = ("format", "version", "exported_at", "conversation", "messages", "files")
FILE_CONVERSATION_FIELDS = (
    "session_id",
    "title",
    "system_prompt",
    "model",
    "created_at",
    "updated_at",
    "current_message_id",
    "web_search",
)
FILE_MESSAGE_FIELDS = (
    "id",
    "parent_id",
    "role",
    "content",
    "reasoning_content",
    "status",
    "model",
    "finish_reason",
    "error",
    "usage",
    "created_at",
    "in_context",
    "last_seq",
    "tool_steps",
    "tool_results",
    "files",
    "continued",
    "sources",
    "searches",
)
FILE_ENTRY_FIELDS = ("key", "name", "media_type", "sha256", "size", "data")
SHA256_HEX = re.compile(r"[0-9a-f]{64}", re.ASCII)
TOOL_STEP_FIELDS = ("type", "seq", "text", "reasoning", "data")
TOOL_CALL_FIELDS = ("id", "name", "arguments", "round", "server", "tool")
TOOL_RESULT_FIELDS = ("id", "content", "error", "duration_ms", "outcome")
TOOL_OUTCOMES = ("ok", "error", "timeout", "unavailable", "bad_arguments", "unknown_tool")
TOOL_RESULT_ENTRY_FIELDS = ("tool_call_id", "content")


def stored_json(text: str | None) -> Any:
    """A tool column's JSON text as its value (None stays None)."""
    return None if text is None else json.loads(text)


def json_column(value: Any) -> str | None:
    """A tool column's value as the JSON text it is stored as (None stays None)."""
    return None if value is None else json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def exported_message(row: dict, context_start: str, files: list[str] | None = None) -> dict:
    """A message as the file holds it; `files`: the keys of the files it carries (none: no `files` field)."""
    message = {
        "id": row["id"],
        "parent_id": row["parent_id"],
        "role": row["role"],
        "content": row["content"],
        "reasoning_content": row["reasoning_content"],
        "status": row["status"],
        "model": row["model"],
        "finish_reason": row["finish_reason"],
        "error": {"code": row["error_code"], "message": row["error_message"]} if row["error_code"] else None,
        "usage": row_usage(row),
        "created_at": row["created_at"],
        "in_context": row["id"] > context_start,
        "last_seq": row["last_seq"],
        "tool_steps": stored_json(row["tool_steps"]),
        "tool_results": stored_json(row["tool_results"]),
    }
    if files:
        message["files"] = files
    if row.get("continued"):
        message["continued"] = row["continued"]
    if row.get("sources") is not None:  # an answer from the web's (docs/CONTRACT.md, "Answers from the web")
        message["sources"] = stored_json(row["sources"])
    if row.get("searches") is not None:
        message["searches"] = row["searches"]
    return message


@dataclass
class ExportedConversation:
    """The file of GET .../export, made to be streamed: everything but the files' bytes is encoded at
    once (as the export was before it had files), and each file's bytes are read a chunk row at a time
    and written into its `data` as base64, so that an export holds one chunk of a file in memory, not
    its files. Its size is known before the first byte (`size`): the files' sizes say their base64's."""

    head: bytes  # the JSON up to the files' entries: '{"format":…,"messages":[…],"files":['
    entries: list[tuple[bytes, FileRow]]  # each file's JSON up to its data ('{"key":"f1",…,"data":"'), its row

    @property
    def size(self) -> int:
        between = max(len(self.entries) - 1, 0)  # the commas
        return len(self.head) + sum(len(p) + 4 * -(-row.size // 3) + 2 for p, row in self.entries) + between + 2

    async def body(self, content: Callable[[str, int, int], AsyncIterator[bytes]]) -> AsyncIterator[bytes]:
        """The file's bytes; `content` reads a file's bytes a chunk at a time (`Files.content`)."""
        yield self.head
        for n, (prefix, row) in enumerate(self.entries):
            yield b"," + prefix if n else prefix
            held = b""  # fewer than 3 bytes: base64 is written 3 bytes (4 characters) at a time
            async for chunk in content(row.id, 0, row.size):
                held += chunk
                cut = len(held) - len(held) % 3
                if cut:
                    yield base64.b64encode(held[:cut])
                    held = held[cut:]
            yield base64.b64encode(held) + b'"}'
        yield b"]}"


def export_file(conversation: dict, messages: list[dict], files: dict[str, list[FileRow]]) -> ExportedConversation:
    """The file of GET .../export: the conversation, every message of its tree and the files they carry
    (`files`, each message's by its id), what POST .../import takes. A file carried by several messages
    is written once; the keys follow the order of first use, so that the same conversation exports
    the same keys. At the import limit it takes a second to encode: the handler runs it in a worker thread."""
    keys: dict[str, str] = {}  # file id -> key
    rows: list[FileRow] = []
    exported = []
    for message in messages:
        carried = files.get(message["id"], [])
        for row in carried:
            if row.id not in keys:
                keys[row.id] = f"f{len(keys) + 1}"
                rows.append(row)
        exported.append(exported_message(message, conversation["context_start"], [keys[r.id] for r in carried]))
    document = json_bytes(
        {
            "format": EXPORT_FORMAT,
            "version": EXPORT_VERSION,
            "exported_at": utcnow(),
            "conversation": {
                **{name: conversation[name] for name in FILE_CONVERSATION_FIELDS if name != "web_search"},
                **({"web_search": stored_json(conversation["web_search"])} if conversation.get("web_search") else {}),
            },
            "messages": exported,
            "files": [],
        }
    )
    assert document.endswith(b"[]}")
    entries = [
        (
            json_bytes(
                {
                    "key": keys[row.id],
                    "name": row.name,
                    "media_type": row.media_type,
                    "sha256": row.sha256,
                    "size": row.size,
                    "data": "",
                }
            )[:-2],  # up to and with the data's opening quote
            row,
        )
        for row in rows
    ]
    return ExportedConversation(document[:-2], entries)


@dataclass
class ImportedConversation:
    """A conversation file, checked: its messages' parents come before them."""

    session_id: str | None
    title: str | None
    system_prompt: str | None
    model: str | None
    current_message_id: str | None
    messages: list[dict]  # the messages' rows, with the file's ids; each row's "files": the keys it carries
    files: list[ImportedFile] = field(default_factory=list)
    web_search: str | None = None  # the conversation's search options, as JSON


@dataclass
class ImportedFile:
    """A file of a conversation file, its bytes decoded and their size and sha256 checked."""

    key: str
    name: str
    data: bytes = field(repr=False)
    sha256: str


def bad_field(path: str, what: str) -> NoReturn:
    raise invalid(f"{path}: {what}")


def field_text(value: Any, path: str, max_chars: int, optional: bool = True) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        bad_field(path, "must be a string" + (" or null." if optional else "."))
    try:
        return storable(path, value, max_chars)
    except ApiError as exc:
        bad_field(path, exc.detail.split("' ", 1)[-1])


def field_object(value: Any, path: str, allowed: tuple[str, ...]) -> dict:
    if not isinstance(value, dict):
        bad_field(path, "must be an object.")
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        bad_field(f"{path}.{unknown[0]}" if path else unknown[0], f"unknown field; allowed: {', '.join(allowed)}.")
    return value


def field_moment(value: Any, path: str, optional: bool = True) -> str | None:
    """An RFC 3339 date-time, as chatsvc writes it: UTC, milliseconds (so that it sorts as text)."""
    if value is None and optional:
        return None
    parts = RFC3339.fullmatch(value) if isinstance(value, str) else None
    try:
        if parts is None:
            raise ValueError
        year, month, day, hour, minute, second, fraction, _, sign, off_h, off_m = parts.groups()
        if int(off_m or 0) > 59:
            raise ValueError
        offset = timedelta(hours=int(off_h or 0), minutes=int(off_m or 0)) * (-1 if sign == "-" else 1)
        leap = timedelta(seconds=1) if second == "60" else timedelta()  # 23:59:60 is the next second
        at = (
            datetime(
                int(year),
                int(month),
                int(day),
                int(hour),
                int(minute),
                int(second) - leap.seconds,
                int((fraction or "").ljust(6, "0")[:6]),
                timezone(offset),
            )
            + leap
        )
        return at.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    except (ValueError, OverflowError):
        example = '"2026-11-24T10:00:00.123Z"' + (", or null." if optional else ".")
        bad_field(path, f"must be an RFC 3339 date-time such as {example}")


def parse_import(settings: Settings, body: dict) -> ImportedConversation:
    """A file of GET .../export, every field checked; the first bad one is a 422 naming its path."""
    field_object(body, "", FILE_FIELDS)
    version = body.get("version")
    if body.get("format") != EXPORT_FORMAT or version not in IMPORT_VERSIONS or type(version) is not int:
        bad_field(
            "format",
            f"this is not a chatsvc conversation file (format {EXPORT_FORMAT!r}, version"
            f" {', '.join(map(str, IMPORT_VERSIONS[:-1]))} or {IMPORT_VERSIONS[-1]}).",
        )
    if version < 3:
        field_object(body, "", FILE_FIELDS[: FILE_FIELDS.index("files")])
    files = imported_files(settings, body.get("files", []))
    conv = field_object(body.get("conversation"), "conversation", FILE_CONVERSATION_FIELDS)
    field_moment(body.get("exported_at"), "exported_at")
    for name in ("created_at", "updated_at"):  # the import's own times are its own
        field_moment(conv.get(name), f"conversation.{name}")
    session_id = conv.get("session_id")
    if session_id is not None and not (isinstance(session_id, str) and SESSION_ID.fullmatch(session_id)):
        bad_field("conversation.session_id", f"must be {_SESSION_ID_RULE}, or null.")
    model = field_text(conv.get("model"), "conversation.model", 200)
    if model is not None and model not in settings.models:
        bad_field("conversation.model", f"unknown model {json.dumps(model)}; available: {', '.join(settings.models)}.")
    messages = body.get("messages")
    if not isinstance(messages, list):
        bad_field("messages", "must be a list.")
    if len(messages) > IMPORT_MAX_MESSAGES:
        bad_field("messages", f"more than {IMPORT_MAX_MESSAGES} messages.")
    seen: dict[str, str] = {}  # the role of each message so far
    pending: dict[str, list[str]] = {}  # the calls each answer that ended "tool_calls" waits on
    fields = FILE_MESSAGE_FIELDS[: FILE_MESSAGE_FIELDS.index("last_seq")] if version == 1 else FILE_MESSAGE_FIELDS
    fields = fields[: fields.index("files")] if version == 2 else fields
    keys = {file.key: file for file in files}
    rows = [
        imported_message(settings, message, f"messages[{n}]", seen, pending, fields, keys)
        for n, message in enumerate(messages)
    ]
    carried = {key for row in rows for key in row["files"]}
    for n, file in enumerate(files):
        if file.key not in carried:
            bad_field(f"files[{n}].key", f"no message of the file carries {json.dumps(file.key)}.")
    current = conv.get("current_message_id")
    if current is not None and not (isinstance(current, str) and current in seen):
        bad_field("conversation.current_message_id", "must be null or the id of a message of the file.")
    return ImportedConversation(
        session_id,
        field_text(conv.get("title"), "conversation.title", 200),
        field_text(conv.get("system_prompt"), "conversation.system_prompt", settings.max_message_chars),
        model,
        current,
        rows,
        files,
        json_column(imported_web_search(conv.get("web_search"))),
    )


def imported_web_search(value: Any) -> dict | None:
    """A conversation's `web_search` (null or its search options), kept even while CHATSVC_WEB_SEARCH=off
    (then inactive, as a stored one is)."""
    if value is None:
        return None
    path = "conversation.web_search"
    field_object(value, path, tuple(SEARCH_OPTIONS))
    for key, check in SEARCH_OPTIONS.items():
        if key in value and not check(value[key]):
            bad_field(f"{path}.{key}", f"must be {SEARCH_RULES[key]}.")
    return dict(value)


SOURCE_FIELDS = ("index", "title", "url", "site")


def imported_sources(value: Any, path: str, role: str) -> list[dict] | None:
    """An answer's `sources` as the export writes them: at most MAX_SOURCES, each an index and its
    title, http(s) url and site, as web_sources keeps them."""
    if value is None:
        return None
    path = f"{path}.sources"
    if role != "assistant" or not isinstance(value, list) or not 0 < len(value) <= MAX_SOURCES:
        bad_field(path, f"must be absent, or an answer's list of 1 to {MAX_SOURCES} sources.")
    for n, source in enumerate(value):
        field_object(source, f"{path}[{n}]", SOURCE_FIELDS)
        if type(source.get("index")) is not int or not 0 <= source["index"] <= MAX_TOKENS_STORED:
            bad_field(f"{path}[{n}].index", "must be a whole number.")
        for name in ("title", "url", "site"):
            field_text(source.get(name), f"{path}[{n}].{name}", SOURCE_CHARS[name], optional=False)
        if not WEB_URL.match(source["url"]):
            bad_field(f"{path}[{n}].url", "must be an http:// or https:// URL.")
    return [{name: source[name] for name in SOURCE_FIELDS} for source in value]


# Files one import brings: each is examined and written in transactions of its own, and a thousand
# small ones took 3.8 s on SQLite.
MAX_IMPORT_FILES = 1000


def imported_files(settings: Settings, files: Any) -> list[ImportedFile]:
    """The file's `files`, each decoded and checked: a key of its own, a name, its base64 `data` of
    `size` bytes (at most CHATSVC_MAX_FILE_BYTES, as an upload) whose sha256 is `sha256`. What the bytes
    are is found out as for an upload (`Examiner`), not taken from `media_type`."""
    if not isinstance(files, list):
        bad_field("files", "must be a list.")
    if len(files) > MAX_IMPORT_FILES:
        bad_field("files", f"holds {len(files)} files; an import takes at most {MAX_IMPORT_FILES}.")
    checked: list[ImportedFile] = []
    keys: set[str] = set()
    hashes: dict[str, str] = {}  # the key of each file's bytes (an owner stores the same bytes once)
    for n, entry in enumerate(files):
        path = f"files[{n}]"
        field_object(entry, path, FILE_ENTRY_FIELDS)
        for name in FILE_ENTRY_FIELDS:
            if name not in entry:
                bad_field(f"{path}.{name}", "is required.")
        key = field_text(entry["key"], f"{path}.key", 64, optional=False)
        if not key:
            bad_field(f"{path}.key", "must not be empty.")
        if key in keys:
            bad_field(f"{path}.key", f"{json.dumps(key)} is the key of an earlier file.")
        keys.add(key)
        name = field_text(entry["name"], f"{path}.name", 1000, optional=False)
        field_text(entry["media_type"], f"{path}.media_type", 200, optional=False)
        sha256 = entry["sha256"]
        if not (isinstance(sha256, str) and SHA256_HEX.fullmatch(sha256)):
            bad_field(f"{path}.sha256", "must be the file's SHA-256, 64 lowercase hexadecimal digits.")
        size = field_count(entry["size"], f"{path}.size", 0, MAX_TOKENS_STORED)
        if size > settings.max_file_bytes:
            raise FileRefused(
                413,
                "file_too_large",
                f"{path}: file {json.dumps(key)} ({size:,} bytes) is larger than CHATSVC_MAX_FILE_BYTES"
                f" ({settings.max_file_bytes:,} bytes).",
            )
        data = entry["data"]
        if not isinstance(data, str) or len(data) != 4 * -(-size // 3):
            bad_field(f"{path}.data", f"must be the base64 of the file's {size:,} bytes (file {json.dumps(key)}).")
        try:
            decoded = base64.b64decode(data, validate=True)
        except ValueError:
            bad_field(f"{path}.data", f"is not valid base64 (file {json.dumps(key)}).")
        if len(decoded) != size:
            bad_field(
                f"{path}.size", f"is {size:,} but the data of file {json.dumps(key)} holds {len(decoded):,} bytes."
            )
        if hashlib.sha256(decoded).hexdigest() != sha256:
            bad_field(f"{path}.sha256", f"does not match the data of file {json.dumps(key)}: its bytes were changed.")
        if sha256 in hashes:
            bad_field(
                f"{path}.sha256", f"file {json.dumps(key)} has the same bytes as file {json.dumps(hashes[sha256])}."
            )
        hashes[sha256] = key
        checked.append(ImportedFile(key, name or "", decoded, sha256))
    return checked


def imported_message(
    settings: Settings,
    message: Any,
    path: str,
    seen: dict[str, str],
    pending: dict[str, list[str]] | None = None,
    fields: tuple[str, ...] = FILE_MESSAGE_FIELDS,
    files: dict[str, ImportedFile] | None = None,
) -> dict:
    """The row of the file's message at `path`, checked against the messages before it (`seen`, the
    role of each by its id; `pending`, the ids of the calls each answer that ended "tool_calls" waits
    on), which it then joins. `fields`: those the file's version has; `files`: the file's files by key."""
    pending = {} if pending is None else pending
    m = field_object(message, path, fields)
    message_id = field_text(m.get("id"), f"{path}.id", 128, optional=False)
    if not message_id:
        bad_field(f"{path}.id", "must not be empty.")
    if message_id in seen:
        bad_field(f"{path}.id", "is the id of an earlier message of the file.")
    parent_id = m.get("parent_id")
    if parent_id is not None and not (isinstance(parent_id, str) and parent_id in seen):
        bad_field(f"{path}.parent_id", "must be null or the id of an earlier message of the file.")
    role = m.get("role")
    if role not in ("user", "assistant"):
        bad_field(f"{path}.role", "must be 'user' or 'assistant'.")
    # The shapes chatsvc makes: an answer answers a user message (or nothing: its question was
    # purged while it was being written); a user message follows anything (an answer, or a user
    # message whose answers were deleted), or starts the conversation.
    if role == "assistant" and parent_id is not None and seen[parent_id] != "user":
        bad_field(f"{path}.parent_id", f"an answer must follow a user message; {json.dumps(parent_id)} is an answer.")
    status = m.get("status")
    if status not in IMPORTED_STATUSES or (status == STREAMING and role != "assistant"):
        bad_field(
            f"{path}.status",
            f"must be one of {', '.join(IMPORTED_STATUSES)} (streaming: an answer being"
            " written when it was exported, imported as interrupted).",
        )
    error = m.get("error")
    if error is not None:
        field_object(error, f"{path}.error", ("code", "message"))
        field_text(error.get("code"), f"{path}.error.code", 64, optional=False)
        field_text(error.get("message"), f"{path}.error.message", 2000)
    if status == STREAMING:  # what had been written of it when it was exported, ended there
        status, error = INTERRUPTED, {"code": INTERRUPTED, "message": EXPORTED_WHILE_WRITTEN}
    usage = imported_usage(m.get("usage"), f"{path}.usage")
    if not isinstance(m.get("in_context", True), bool):
        bad_field(f"{path}.in_context", "must be true or false.")
    last_seq = m.get("last_seq")
    if last_seq is not None and (type(last_seq) is not int or not 0 <= last_seq <= MAX_LIMIT):
        bad_field(f"{path}.last_seq", f"must be a whole number from 0 to {MAX_LIMIT}, or null.")
    continued = m.get("continued", 0)
    if type(continued) is not int or not 0 <= continued <= MAX_TOKENS_STORED or (continued and role != "assistant"):
        bad_field(f"{path}.continued", f"must be a whole number from 0 to {MAX_TOKENS_STORED} (0 for a user message).")
    searches = m.get("searches")
    if searches is not None and (
        type(searches) is not int or not 0 <= searches <= MAX_TOKENS_STORED or role != "assistant"
    ):
        bad_field(f"{path}.searches", f"must be absent, or an answer's whole number from 0 to {MAX_TOKENS_STORED}.")
    sources = imported_sources(m.get("sources"), path, role)
    content = field_text(m.get("content"), f"{path}.content", settings.max_answer_chars, optional=False)
    reasoning = field_text(m.get("reasoning_content"), f"{path}.reasoning_content", settings.max_answer_chars)
    steps = imported_steps(settings, m.get("tool_steps"), path, role, last_seq, content or "", reasoning or "")
    results = imported_results(settings, m.get("tool_results"), path, role, content, parent_id, pending)
    finish_reason = field_text(m.get("finish_reason"), f"{path}.finish_reason", 64)
    carried = imported_message_files(settings, m.get("files"), path, role, results, files or {})
    row = {
        "id": message_id,
        "parent_id": parent_id,
        "role": m["role"],
        "content": content,
        "reasoning_content": reasoning,
        "status": status,
        "model": field_text(m.get("model"), f"{path}.model", 200),
        "finish_reason": finish_reason,
        "error_code": error and error["code"],
        "error_message": error and error.get("message"),
        "prompt_tokens": usage.get("prompt_tokens"),
        "completion_tokens": usage.get("completion_tokens"),
        "total_tokens": usage.get("total_tokens"),
        "last_seq": last_seq,
        "created_at": field_moment(m.get("created_at"), f"{path}.created_at", optional=False),
        "in_context": m.get("in_context", True),
        "tool_steps": json_column(steps),
        "tool_results": json_column(results),
        "files": carried,
        "continued": continued,
        "sources": json_column(sources),
        "searches": searches,
    }
    seen[message_id] = role
    if role == "assistant" and finish_reason == "tool_calls":
        pending[message_id] = [call["id"] for call in pending_tool_calls(steps or [])]
    return row


def imported_message_files(
    settings: Settings, carried: Any, path: str, role: str, results: list[dict] | None, files: dict[str, ImportedFile]
) -> list[str]:
    """A message's `files`: keys of the file's files, each once, at most CHATSVC_MAX_FILES_PER_MESSAGE,
    on a user message that is not a tool-results turn (as a chat request takes them); [] for none."""
    if carried is None:
        return []
    path = f"{path}.files"
    if not isinstance(carried, list):
        bad_field(path, "must be a list of file keys, or absent.")
    if carried and (role != "user" or results is not None):
        bad_field(path, "must be absent: only a user message with a content (not a tool-results turn) carries files.")
    if len(carried) > settings.max_files_per_message:
        bad_field(path, f"more than {settings.max_files_per_message} files (CHATSVC_MAX_FILES_PER_MESSAGE).")
    for n, key in enumerate(carried):
        if not isinstance(key, str) or key not in files:
            bad_field(f"{path}[{n}]", f"{json.dumps(key)} is not the key of a file in the file's files.")
        if key in carried[:n]:
            bad_field(f"{path}[{n}]", f"{json.dumps(key)} is carried twice.")
    return carried


def field_count(value: Any, path: str, low: int, high: int, what: str = "") -> int:
    """A whole number from `low` to `high` (`what` says what bounds it, when that is not plain)."""
    if type(value) is not int or not low <= value <= high:
        bad_field(path, what or f"must be a whole number from {low} to {high}.")
    return value


def imported_steps(
    settings: Settings, steps: Any, path: str, role: str, last_seq: int | None, content: str, reasoning: str
) -> list[dict] | None:
    """A message's `tool_steps`, checked field by field: an answer's calls and results in event order,
    each within the answer's events (`seq` below its last_seq) and text (`text`, `reasoning`), a
    result answering an earlier call of the answer."""
    if steps is None:
        return None
    path = f"{path}.tool_steps"
    if not isinstance(steps, list):
        bad_field(path, "must be a list or null.")
    if role != "assistant":
        bad_field(path, "must be null: only an answer has tool steps.")
    if steps and last_seq is None:
        bad_field(f"{path[: -len('.tool_steps')]}.last_seq", "must be a whole number above each tool step's seq.")
    calls: set[str] = set()
    answered: set[str] = set()
    before = {"seq": -1, "text": 0, "reasoning": 0}
    for n, step in enumerate(steps):
        at = f"{path}[{n}]"
        field_object(step, at, TOOL_STEP_FIELDS)
        for name in TOOL_STEP_FIELDS:
            if name not in step:
                bad_field(f"{at}.{name}", "is required.")
        if step["type"] not in ("tool_call", "tool_result"):
            bad_field(f"{at}.type", "must be 'tool_call' or 'tool_result'.")
        assert last_seq is not None
        field_count(
            step["seq"],
            f"{at}.seq",
            before["seq"] + 1,
            last_seq - 1,
            f"must be a whole number above the seq of the step before it and below the message's"
            f" last_seq ({last_seq}).",
        )
        field_count(
            step["text"],
            f"{at}.text",
            before["text"],
            len(content),
            f"must be a whole number from the text of the step before it ({before['text']}) to the"
            f" length of the message's content ({len(content)}).",
        )
        field_count(
            step["reasoning"],
            f"{at}.reasoning",
            before["reasoning"],
            len(reasoning),
            f"must be a whole number from the reasoning of the step before it ({before['reasoning']}) to"
            f" the length of the message's reasoning_content ({len(reasoning)}).",
        )
        before = {name: step[name] for name in before}
        data, where = step["data"], f"{at}.data"
        field_object(data, where, TOOL_CALL_FIELDS if step["type"] == "tool_call" else TOOL_RESULT_FIELDS)
        call_id = field_text(data.get("id"), f"{where}.id", MAX_CALL_ID_CHARS, optional=False)
        if not call_id:
            bad_field(f"{where}.id", "must not be empty.")
        if step["type"] == "tool_call":
            if call_id in calls:
                bad_field(f"{where}.id", "is the id of an earlier call of this answer.")
            calls.add(call_id)
            if not field_text(data.get("name"), f"{where}.name", MAX_TOOL_NAME_CHARS, optional=False):
                bad_field(f"{where}.name", "must not be empty.")
            field_text(data.get("arguments"), f"{where}.arguments", settings.max_answer_chars, optional=False)
            field_count(data.get("round"), f"{where}.round", 1, MAX_TOKENS_STORED)
            if ("server" in data) != ("tool" in data):
                bad_field(f"{where}.{'tool' if 'server' in data else 'server'}", "must be given with the other.")
            for name in ("server", "tool"):
                if name in data and not field_text(data[name], f"{where}.{name}", MAX_TOOL_NAME_CHARS, optional=False):
                    bad_field(f"{where}.{name}", "must not be empty.")
            continue
        if call_id not in calls or call_id in answered:
            bad_field(f"{where}.id", "must be the id of an earlier call of this answer that has no result yet.")
        answered.add(call_id)
        if ("content" in data) == ("error" in data):
            bad_field(f"{where}.content", "a result has either a content or an error, a string.")
        name = "content" if "content" in data else "error"
        longest = max(settings.max_answer_chars, settings.max_tool_result_chars + RESULT_NOTE_CHARS)
        field_text(data[name], f"{where}.{name}", longest, optional=False)
        field_count(data.get("duration_ms"), f"{where}.duration_ms", 0, MAX_TOKENS_STORED)
        if data.get("outcome") not in TOOL_OUTCOMES:
            bad_field(f"{where}.outcome", f"must be one of {', '.join(TOOL_OUTCOMES)}.")
    return steps


def imported_results(
    settings: Settings,
    results: Any,
    path: str,
    role: str,
    content: str | None,
    parent_id: str | None,
    pending: dict[str, list[str]],
) -> list[dict] | None:
    """A tool-results turn's `tool_results`, checked: a user message with no content that answers each
    call its parent answer (which ended "tool_calls") waits on, once."""
    if results is None:
        return None
    path = f"{path}.tool_results"
    if not isinstance(results, list) or not results:
        bad_field(path, "must be a list of at least one result, or null.")
    if role != "user" or content != "":
        bad_field(path, "must be null but on a user message whose content is empty (a tool-results turn).")
    if parent_id not in pending:
        bad_field(path, 'must answer the calls of its parent, an answer that ended with finish_reason "tool_calls".')
    waiting = pending[parent_id]
    given: list[str] = []
    for n, entry in enumerate(results):
        at = f"{path}[{n}]"
        field_object(entry, at, TOOL_RESULT_ENTRY_FIELDS)
        call_id = field_text(entry.get("tool_call_id"), f"{at}.tool_call_id", 200, optional=False)
        if call_id not in waiting or call_id in given:
            bad_field(f"{at}.tool_call_id", "must be the id of a call its parent waits on, given once.")
        given.append(call_id)
        field_text(entry.get("content"), f"{at}.content", settings.max_answer_chars, optional=False)
    if len(given) != len(waiting):
        missing = next(call_id for call_id in waiting if call_id not in given)
        bad_field(path, f"must answer every call its parent waits on; {json.dumps(missing)} has no result.")
    return results


def imported_usage(usage: Any, path: str) -> dict:
    """A message's `usage`, checked ({} for none)."""
    if usage is None:
        return {}
    field_object(usage, path, USAGE_FIELDS)
    for name in USAGE_FIELDS:
        count = usage.get(name)
        if count is not None and (type(count) is not int or not 0 <= count <= MAX_TOKENS_STORED):
            bad_field(f"{path}.{name}", f"must be a whole number from 0 to {MAX_TOKENS_STORED}, or null.")
    return usage or {}


# ── Markdown export: a conversation's current branch as a document a person reads ──────
# The Markdown export's headings, `<details>` folds and status lines are chatsvc's alone. A message's
# own Markdown (lists, tables, emphasis, code) reads as written, but no text can add a heading (`#`,
# or a setext `===`/`---` under a line), run or close HTML (`<` is `&lt;` outside code), or leave a
# code fence open over what follows: each fence is written again by chatsvc, longer than any run of
# backticks inside, and closed. Titles, model names and errors are one line, every mark escaped.
_MD_LINE = re.compile(r"\r\n|\r|\n")  # CommonMark's line endings, no others
_MD_MARKS = re.compile(r"[\\`*_\[\]<>&#|~!]")
_MD_CONTAINERS = r"(?:[ \t]*(?:>|[-*+](?=[ \t])|\d{1,9}[.)](?=[ \t])))*[ \t]*"  # quotes and list items
_MD_HEADING = re.compile(rf"^({_MD_CONTAINERS})#")
_MD_QUOTED_FENCE = re.compile(rf"^({_MD_CONTAINERS})(`{{3,}}|~{{3,}})")
_MD_UNDERLINE = re.compile(r"^((?:[ \t]*>)*[ \t]*)[=-]")
_MD_UNDERLINE_LINE = re.compile(r"(?:[ \t]*>)*[ \t]*(?:=+|-+)[ \t]*")
_MD_FENCE = re.compile(r"([ \t]*)(`{3,}|~{3,})(.*)")
_MD_ENTITY = re.compile(r"&(?=#?[A-Za-z0-9]+;)")


def markdown_inline(text: str) -> str:
    """Text on one line of chatsvc's own (a heading, a status line), with no Markdown or HTML of its own."""
    return _MD_MARKS.sub(lambda mark: "\\" + mark.group(), " ".join(text.split()))


def markdown_block(text: str) -> list[str]:
    """A message's text as lines of the document: its Markdown, with nothing of the document's."""
    lines: list[str] = []
    fence: tuple[str, int, str] | None = None  # the open fence: its mark, its indent, its info string
    code: list[str] = []
    after_text = False  # the line before is text (a setext underline under it would make it a heading)
    spans = True  # no backtick run of this paragraph is left open: code spans can be told on this line

    def close_fence() -> None:
        assert fence is not None
        _, indent, info = fence
        longest = max((len(run) for line in code for run in re.findall(r"`+", line)), default=0)
        bar, margin = "`" * max(3, longest + 1), " " * min(indent, 3)
        lines.append(f"{margin}{bar}{info}")
        for line in code:  # as CommonMark reads it: the opening fence's indent off each line
            line = line[min(indent, len(line) - len(line.lstrip(" "))) :]
            lines.append(margin + line if line.strip() else "")
        lines.append(margin + bar)

    for line in _MD_LINE.split(text):
        if fence is not None:
            close = re.fullmatch(r"[ \t]*(`{3,}|~{3,})[ \t]*", line)
            if close and close[1][0] == fence[0][0] and len(close[1]) >= len(fence[0]):
                close_fence()
                fence, code, after_text = None, [], False
            else:
                code.append(line)
            continue
        opening = _MD_FENCE.fullmatch(line)
        if opening and not (opening[2][0] == "`" and "`" in opening[3]):
            info = re.sub(r"[^\w+#.-]", "", (opening[3].split() or [""])[0])  # its language: a name, no `|`
            fence, code = (opening[2], len(opening[1].expandtabs(4)), info), []
            continue
        if not line.strip():
            lines.append("")
            after_text, spans = False, True
            continue
        line = _MD_HEADING.sub(r"\1\\#", line)
        line = _MD_QUOTED_FENCE.sub(lambda m: m[1] + "".join("\\" + c for c in m[2]), line)
        if after_text and _MD_UNDERLINE_LINE.fullmatch(line):
            line = _MD_UNDERLINE.sub(lambda m: m[1] + "\\" + m[0][-1], line)
        line, spans = _markdown_html_escaped(line, spans)
        lines.append(line)
        after_text = True
    if fence is not None:  # never closed: closed here, not at the end of the document
        close_fence()
    return lines


def _markdown_html_escaped(line: str, spans: bool) -> tuple[str, bool]:
    """The line with `<` (and `&` of an entity) escaped outside its code spans; code spans are told
    only while certain (a span left open, a backslash before a backtick or a table's `|` ends that
    for the paragraph: then every `<` is escaped, inside spans too)."""
    if "|" in line:
        spans = False
    pieces = re.split(r"(`+)", line)  # odd places: backtick runs
    out, n = [], 0
    while n < len(pieces):
        piece = pieces[n]
        if n % 2 == 0:
            out.append(_MD_ENTITY.sub("&amp;", piece).replace("<", "&lt;"))
            n += 1
            continue
        close = next((k for k in range(n + 2, len(pieces), 2) if pieces[k] == piece), None)
        if spans and close is not None and not pieces[n - 1].endswith("\\"):
            out += pieces[n : close + 1]
            n = close + 1
        else:
            spans = False
            out.append(piece)
            n += 1
    return "".join(out), spans


def markdown_code(text: str, info: str = "") -> list[str]:
    """Text as a fenced code block, written as it is: the fence longer than any backtick run inside."""
    code = _MD_LINE.split(text)
    longest = max((len(run) for line in code for run in re.findall(r"`+", line)), default=0)
    bar = "`" * max(3, longest + 1)
    return [bar + info, *code, bar]


def markdown_summary(text: str) -> str:
    """Text on the one line of a `<summary>`: raw HTML there, so no tag or entity of its own."""
    return " ".join(text.split()).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def markdown_tool_call(call: dict, result: dict | None) -> list[str]:
    """One call of an answer, folded: its name and time, its arguments and its result (or error)."""
    if result is None:
        when = "answered by the app" if "server" not in call else "no result"
    elif result.get("outcome", "ok") == "ok":
        when = f"{result.get('duration_ms', 0)} ms"
    else:
        when = f"{result.get('outcome')}, {result.get('duration_ms', 0)} ms"
    lines = [f"<details><summary>Tool: {markdown_summary(call['name'])} ({markdown_summary(when)})</summary>", ""]
    lines += ["Arguments:", "", *markdown_code(call["arguments"], "json"), ""]
    if result is not None:
        name = "content" if "content" in result else "error"
        lines += ["Result:" if name == "content" else "Error:", "", *markdown_code(result[name]), ""]
    return [*lines, "</details>", ""]


def markdown_answer(row: dict) -> list[str]:
    """An answer's text, with its tool calls folded where they were made (after the text said before them)."""
    steps = json.loads(row["tool_steps"]) if row.get("tool_steps") else []
    results = {step["data"]["id"]: step["data"] for step in steps if step["type"] == "tool_result"}
    lines: list[str] = []
    said = 0
    for step in steps:
        if step["type"] != "tool_call":
            continue
        if step["text"] > said:
            lines += [*markdown_block(row["content"][said : step["text"]]), ""]
            said = step["text"]
        lines += markdown_tool_call(step["data"], results.get(step["data"]["id"]))
    if not steps or said < len(row["content"]):
        lines += [*markdown_block(row["content"][said:]), ""]
    return lines


def markdown_tool_results(row: dict, before: dict | None) -> list[str]:
    """A tool-results turn: each result folded, named by the call it answers (of the answer `before` it)."""
    steps = json.loads(before["tool_steps"]) if before and before.get("tool_steps") else []
    names = {step["data"]["id"]: step["data"]["name"] for step in steps if step["type"] == "tool_call"}
    lines: list[str] = []
    for entry in json.loads(row["tool_results"]):
        name = names.get(entry["tool_call_id"], entry["tool_call_id"])
        lines += [f"<details><summary>Result: {markdown_summary(name)}</summary>", ""]
        lines += [*markdown_code(entry["content"]), "", "</details>", ""]
    return lines


def markdown_attached(files: list[FileRow]) -> list[str]:
    """A message's files, as relative links by name (`files/<name>`: where a zip of the export would put them)."""
    links = [f"[{markdown_inline(row.name)}](files/{quote(row.name, safe='')})" for row in files]
    return [f"Attached: {' · '.join(links)}", ""] if links else []


def markdown_document(conversation: dict, branch: list[dict], files: dict[str, list[FileRow]] | None = None) -> str:
    """The current branch as a document a person reads; `files`: the files each message carries, by its id."""
    files = files or {}
    title = markdown_inline(conversation["title"] or conversation["session_id"])
    lines = [f"# {title}", "", f"*{len(branch)} messages, exported from chatsvc on {utcnow()[:10]}.*", ""]
    for n, row in enumerate(branch):
        if row.get("tool_results") is not None:
            lines += [f"## Tool results · {markdown_inline(row['created_at'][:16].replace('T', ' '))}", ""]
            lines += markdown_tool_results(row, branch[n - 1] if n else None)
            continue
        model = row["model"] and markdown_inline(row["model"])
        who = "User" if row["role"] == "user" else f"Assistant ({model})" if model else "Assistant"
        lines += [f"## {who} · {markdown_inline(row['created_at'][:16].replace('T', ' '))}", ""]
        if row["reasoning_content"]:
            lines += [
                "<details><summary>Reasoning</summary>",
                "",
                *markdown_block(row["reasoning_content"]),
                "",
                "</details>",
                "",
            ]
        lines += markdown_attached(files.get(row["id"], [])) if files else []
        lines += markdown_answer(row)
        if row["status"] not in (COMPLETE,):
            error = f": {row['error_message']}" if row["error_message"] else ""
            lines += [f"*({markdown_inline(row['status'] + error)})*", ""]
    return "\n".join(lines)


# ── HTTP: presenting rows: stored rows as the API shows them ───────────────────────────


def present_conversation(settings: Settings, row: dict) -> dict:
    # web_search only when set and in force: while CHATSVC_WEB_SEARCH=off a stored setting is inactive
    # (kept, shown again once search is allowed); a conversation without one is shown as before it existed
    search = stored_json(row["web_search"]) if settings.web_search != "off" else None
    return {
        "session_id": row["session_id"],
        "title": row["title"],
        "system_prompt": row["system_prompt"],
        "model": row["model"] or settings.chat_model,
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
        "current_message_id": row["current_message_id"],
        **({"web_search": search} if search is not None else {}),
        "title_usage": {name: row[f"title_{name}"] for name in USAGE_FIELDS}
        if row["title_total_tokens"] is not None or row["title_prompt_tokens"] is not None
        else None,
        "message_count": int(row["message_count"]),
        "context_message_count": int(row["context_message_count"]),
        "generating": bool(row["generating"]),
    }


def present_tools(row: dict) -> dict:
    """A message's tool fields as the API shows them: an answer's `steps` (each stored step's type and
    data) when it has any, and `tool_calls` (the calls it waits on the app for) when it ended so; a
    tool-results turn's `tool_results`."""
    if row.get("tool_results") is not None:
        return {"tool_results": json.loads(row["tool_results"])}
    steps = json.loads(row["tool_steps"]) if row.get("tool_steps") else []
    shown: dict[str, Any] = {}
    if steps:
        shown["steps"] = [{"type": step["type"], "data": step["data"]} for step in steps]
    if row["finish_reason"] == "tool_calls" and row["status"] == COMPLETE:
        shown["tool_calls"] = pending_tool_calls(steps)
    return shown


def present_file_ref(row: FileRow) -> dict:
    """A file as a message shows it: what a client needs to draw it (a thumbnail, a chip)."""
    shown = {"id": row.id, "name": row.name, "media_type": row.media_type, "size": row.size, "kind": row.kind}
    extra = {"width": row.width, "height": row.height, "pages": row.pages}
    return {**shown, **{name: value for name, value in extra.items() if value is not None}}


def present_message(
    row: dict,
    context_start: str,
    siblings: dict[str | None, list[str]] | None,
    files: dict[str, list[FileRow]] | None = None,
) -> dict:
    """A message as the API shows it; without `siblings` (a tree page), without `sibling_ids`. A
    tool-results turn (stored as a user message) is shown with role "tool". `files`: the files of the
    page's messages, by message id (a message without files shows no `files`, as before files were)."""
    usage = row_usage(row, details=True)
    cost = row_cost(row)
    carried = (files or {}).get(row["id"])
    return {
        "id": row["id"],
        "parent_id": row["parent_id"],
        **({"sibling_ids": siblings.get(row["parent_id"]) or [row["id"]]} if siblings is not None else {}),
        "role": "tool" if row.get("tool_results") is not None else row["role"],
        "content": row["content"],
        **({"files": [present_file_ref(f) for f in carried]} if carried else {}),
        "reasoning_content": row["reasoning_content"],
        **present_tools(row),
        "status": row["status"],
        "in_context": row["id"] > context_start,
        "model": row["model"],
        "finish_reason": row["finish_reason"],
        "error": {"code": row["error_code"], "message": row["error_message"]} if row["error_code"] else None,
        "usage": usage,
        **(cost.shown() if cost is not None else {}),
        **({"sources": json.loads(row["sources"])} if row.get("sources") is not None else {}),
        **({"searches": row["searches"]} if row.get("searches") is not None else {}),
        **({"continued": row["continued"]} if row.get("continued") else {}),
        "created_at": row["created_at"],
    }


def snippet(text: str, query: str, before: int = 30, after: int = 60) -> str:
    """A short excerpt of `text` around the first place that contains `query` (any case)."""
    folded = text.lower()
    at = folded.find(query.lower()) if len(folded) == len(text) else text.find(query)
    at = max(at, 0)
    start, end = max(0, at - before), min(len(text), at + len(query) + after)
    excerpt = " ".join(text[start:end].split())
    return ("…" if start > 0 else "") + excerpt + ("…" if end < len(text) else "")


def json_bytes(value: Any) -> bytes:
    """`value` as JSONResponse writes it."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


def page_parts(messages: Iterable[dict]) -> list[bytes]:
    """The JSON of each message, in the page's order (the newest first on a branch), until they reach
    MESSAGE_PAGE_BYTES; at least one."""
    parts: list[bytes] = []
    size = 0
    for message in messages:
        part = json_bytes(message)
        if parts and size + len(part) > MESSAGE_PAGE_BYTES:
            break
        parts.append(part)
        size += len(part)
    return parts


# ── HTTP: conversation handlers: the routes under /api/v1/context/conversations ────────
# Each handler checks its request, calls the store, and presents what it returns. What every
# handler starts with comes first: the app's state, whose conversation the request names.


def state(request: Request) -> Any:
    return request.app.state


def owner_of(request: Request) -> str:
    """Whose conversations this request sees: CHATSVC_USER_HEADER's value, set by the trusted host
    app or proxy in front of the sidecar ('' for everyone when that is not configured)."""
    header = state(request).settings.user_header
    if not header:
        return ""
    owner = request.headers.get(header, "").strip()
    if not owner:
        raise unauthorized(f"This service needs the {header} header to know whose conversations to use.")
    if len(owner) > 256:
        raise invalid(f"The {header} header is longer than 256 characters.")
    if any(ord(c) < 32 or ord(c) == 127 for c in owner):
        raise invalid(f"The {header} header must not hold control characters.")
    return owner


def conversation_key(request: Request) -> tuple[str, str]:
    """(owner, session_id) of the conversation a route's path names."""
    return owner_of(request), check_session_id(request.path_params["session_id"])


def message_key(request: Request) -> tuple[str, str, str]:
    """(owner, session_id, message_id) of the message a route's path names."""
    message_id = request.path_params["message_id"]
    owner, session_id = conversation_key(request)
    if not MESSAGE_ID.fullmatch(message_id):
        raise message_not_found(session_id, message_id[:200])
    return owner, session_id, message_id


def refuse_while_draining(request: Request) -> None:
    if state(request).relay.draining:
        raise shutting_down()


async def conversation_or_404(request: Request, key: tuple[str, str]) -> dict:
    row = await state(request).store.conversations.get(*key)
    if row is None:
        raise not_found(key[1])
    return row


async def present_messages(
    request: Request, key: tuple[str, str], rows: list[dict], context_start: str, siblings: bool = True
) -> list:
    """The messages as the API shows them, with their `sibling_ids` (unless not `siblings`: a tree page)
    and their files (read for the page's user messages in one call)."""
    store = state(request).store
    found = await store.tree.siblings(*key, {row["parent_id"] for row in rows}) if siblings else None
    user_ids = [row["id"] for row in rows if row["role"] == "user"]
    files = await store.files.of_messages(key[0], user_ids) if user_ids else {}
    return [present_message(row, context_start, found, files) for row in rows]


async def list_conversations(request: Request) -> Response:
    """The owner's conversations, newest first; with `q`, those whose title or any message contains
    it (as text: no character of it is an operator), each with where it matched."""
    st = state(request)
    owner = owner_of(request)
    limit = query_int(request, "limit", 50, 1, 200)
    cursor = request.query_params.get("cursor")
    after = tuple(decode_cursor(cursor, 2)) if cursor else None
    query = request.query_params.get("q")
    if query is None:
        rows = await st.store.conversations.page(owner, limit + 1, after)
    else:
        if not query.strip():
            raise invalid("'q' must not be blank.")
        rows = await st.store.search.conversations(owner, storable("q", query, 200), limit + 1, after)
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = encode_cursor(rows[-1]["updated_at"], rows[-1]["session_id"]) if more else None
    conversations = [present_conversation(st.settings, r) for r in rows]
    if query is not None:
        texts = await st.store.search.texts(
            [r["match_id"] for r in rows if r["match_id"] and not r["title_match"]], query
        )
        for body, row in zip(conversations, rows, strict=True):
            if row["title_match"] or row["match_id"] not in texts:
                body["match"] = {"field": "title"}
            else:
                body["match"] = {"message_id": row["match_id"], "snippet": snippet(texts[row["match_id"]], query)}
    return JSONResponse({"conversations": conversations, "next_cursor": next_cursor})


async def create_conversation(request: Request) -> Response:
    st = state(request)
    owner = owner_of(request)
    body = await read_json(request, st.settings, optional=True)
    check_fields(body, ("session_id", "title", "system_prompt", "model"))
    session_id = check_session_id(body["session_id"]) if body.get("session_id") is not None else str(uuid.uuid4())
    title = optional_text(body, "title", 200)
    prompt = optional_text(body, "system_prompt", st.settings.max_message_chars)
    model = check_model(st.settings, body.get("model"))
    if not await st.store.conversations.create(owner, session_id, title, prompt, model):
        raise conversation_exists(session_id)
    row = await conversation_or_404(request, (owner, session_id))
    return JSONResponse(present_conversation(st.settings, row), status_code=201)


async def get_conversation(request: Request) -> Response:
    st = state(request)
    key = conversation_key(request)
    limit = query_int(request, "limit", 50, 1, 500)
    row = await conversation_or_404(request, key)
    messages = await st.store.tree.branch(*key, limit, chars=MESSAGE_PAGE_BYTES)
    presented = await present_messages(request, key, messages, row["context_start"])
    summary = await branch_summary(request, key, row["current_message_id"], presented)
    parts = page_parts(presented)  # as a page ends
    shown = present_conversation(st.settings, row)
    if summary is not None:
        shown["summary"] = summary
    conversation = json_bytes(shown)
    body = conversation[:-1] + b',"messages":[' + b",".join(parts[::-1]) + b"]}"  # each message encoded once
    return Response(body, media_type="application/json")


async def branch_summary(
    request: Request, key: tuple[str, str], leaf: str | None, presented: list[dict]
) -> dict | None:
    """The current branch's newest summary as presented (None: none, or summaries are off); the
    presented messages of the branch it covers get `summarized: true`."""
    st = state(request)
    if st.settings.summaries != "on":
        return None
    row = await st.store.summaries.on_branch(*key, leaf, 4 * st.settings.max_context_messages + 4)
    if row is None:
        return None
    for message in presented:
        if row["first_id"] <= message["id"] <= row["message_id"]:
            message["summarized"] = True
    return {name: row[name] for name in ("message_id", "first_id", "covered", "content", "created_at")}


async def list_messages(request: Request) -> Response:
    """The current branch, newest page first (`before`, or the `cursor` of the last page), or with
    `tree=true` every message, oldest first (after `cursor`, and older than `before` if given), without
    `sibling_ids` (each message's `parent_id` says them). A page ends at `limit` messages or once they
    reach MESSAGE_PAGE_BYTES (at least one message): its size does not grow with the conversation's."""
    st = state(request)
    key = conversation_key(request)
    limit = query_int(request, "limit", 50, 1, 500)
    tree = query_bool(request, "tree")
    before, cursor = query_message_id(request, "before"), query_message_id(request, "cursor")
    row = await conversation_or_404(request, key)
    # the store reads no message whose text starts past the page's size (a character is a byte or more)
    if tree:
        rows = await st.store.tree.messages(*key, limit + 1, after=cursor, before=before, chars=MESSAGE_PAGE_BYTES)
    else:
        rows = await st.store.tree.branch(*key, limit + 1, before or cursor, chars=MESSAGE_PAGE_BYTES)
    presented = await present_messages(request, key, rows[:limit], row["context_start"], siblings=not tree)
    if not tree:
        await branch_summary(request, key, row["current_message_id"], presented)
    parts = page_parts(presented)
    more = bool(rows) and len(parts) < rows[0]["candidates"]
    next_cursor = json_bytes(rows[len(parts) - 1]["id"] if more else None)
    body = b'{"messages":[' + b",".join(parts if tree else parts[::-1]) + b'],"next_cursor":' + next_cursor + b"}"
    return Response(body, media_type="application/json")


async def update_conversation(request: Request) -> Response:
    st = state(request)
    key = conversation_key(request)
    body = await read_json(request, st.settings)
    check_fields(body, ("title", "system_prompt", "model", "current_message_id", "web_search"))
    changes: dict[str, Any] = {}
    if "web_search" in body:  # null or false: the conversation does not search (unless CHATSVC_WEB_SEARCH=always)
        search = parse_web_search(st.settings, body, "web_search")
        changes["web_search"] = json_column(search) if isinstance(search, dict) else None
    if "title" in body:
        changes["title"] = optional_text(body, "title", 200)
        changes["title_source"] = "client" if changes["title"] is not None else None
    if "system_prompt" in body:
        changes["system_prompt"] = optional_text(body, "system_prompt", st.settings.max_message_chars)
    if "model" in body:
        changes["model"] = check_model(st.settings, body["model"])
    current = body.get("current_message_id")
    if "current_message_id" in body and not (isinstance(current, str) and MESSAGE_ID.fullmatch(current)):
        raise invalid("'current_message_id' must be the id of a message of this conversation.")
    if current is not None and not await st.store.tree.switch_branch(*key, current):
        await conversation_or_404(request, key)
        raise message_not_found(key[1], current)
    if changes and not await st.store.conversations.update(*key, changes):
        raise not_found(key[1])
    row = await conversation_or_404(request, key)
    return JSONResponse(present_conversation(st.settings, row))


async def delete_message(request: Request) -> Response:
    """The message and everything below it; answers the conversation as it is then."""
    st = state(request)
    owner, session_id, message_id = message_key(request)
    await conversation_or_404(request, (owner, session_id))
    await st.store.tree.delete_branch(owner, session_id, message_id)
    row = await conversation_or_404(request, (owner, session_id))
    return JSONResponse(present_conversation(st.settings, row))


async def export_conversation(request: Request) -> Response:
    """The conversation and every message of its tree as JSON (what POST .../import takes), or with
    `format=markdown` its current branch as a document."""
    st = state(request)
    key = conversation_key(request)
    kind = request.query_params.get("format", "json")
    if kind not in ("json", "markdown"):
        raise invalid("'format' must be json or markdown.")
    row = await conversation_or_404(request, key)
    if kind == "markdown":
        branch = await st.store.tree.branch(*key, 2**31 - 1)
        files = await st.store.files.of_messages(key[0], [message["id"] for message in branch])
        return Response(
            markdown_document(row, branch[::-1], files),
            media_type="text/markdown; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="{key[1]}.md"'},
        )
    messages = await st.store.tree.messages(*key, 2**31 - 1)
    files = await st.store.files.of_messages(key[0], [message["id"] for message in messages])
    # a second at the import limit: in a worker thread, off the event loop; the files' bytes are then
    # streamed into it a chunk at a time (an export may be larger than CHATSVC_MAX_IMPORT_BYTES: its
    # Content-Length says how large it is)
    exported = await anyio.to_thread.run_sync(export_file, row, messages, files)
    return StreamingResponse(
        exported.body(st.store.files.content),
        media_type="application/json",
        headers={"Content-Length": str(exported.size)},
    )


async def import_conversation(request: Request) -> Response:
    """A new conversation of the caller from an export: every message copied with new ids and the
    same tree, and the files they carry stored as uploads are (examined, deduplicated, counted
    against the quota). `?session_id=` asks for an id (409 if taken); else the file's, or a new one if
    taken. A refused import leaves nothing: no conversation, and none of the files it stored."""
    st = state(request)
    owner = owner_of(request)
    asked = request.query_params.get("session_id")
    if asked is not None:
        check_session_id(asked)
    # a file at the limit takes seconds to check: in a worker thread, so that the event loop serves meanwhile
    body = await read_json(request, st.settings, limit=st.settings.max_import_bytes, in_thread=True)
    file = await anyio.to_thread.run_sync(parse_import, st.settings, body)
    del body  # the files' base64: their bytes are in `file` now
    wanted = asked or file.session_id or str(uuid.uuid4())
    stored: list[str] = []  # the files this import added (not those the owner had already)
    session_id = None
    try:
        ids = await import_files(st, owner, file.files, stored)
        for message in file.messages:
            message["files"] = [ids[key] for key in message["files"]]
        try:
            session_id = await st.store.copies.import_file(owner, wanted, file, another=asked is None)
        except Exception as exc:
            if not file.files or _violation(exc) != "foreign_key":
                raise
            raise StorageUnavailable("A file of the import was deleted while it was written; try again.") from None
    finally:
        if session_id is None:
            with anyio.CancelScope(shield=True):
                await forget_files(st, owner, stored)
    if session_id is None:
        raise conversation_exists(wanted)
    row = await conversation_or_404(request, (owner, session_id))
    return JSONResponse(present_conversation(st.settings, row), status_code=201)


async def import_files(st: Any, owner: str, files: list[ImportedFile], stored: list[str]) -> dict[str, str]:
    """An import's files, each examined as an upload is and stored as the owner's (the same bytes
    stored once: an import of one's own export reuses its files), all examined before any is stored;
    a refusal keeps its status and code and names the file. Each file's id by its key; the ids of the
    files it adds are appended to `stored` as they are added."""

    def named(n: int, exc: FileRefused) -> FileRefused:
        return FileRefused(exc.status, exc.code, f"files[{n}] ({json.dumps(files[n].key)}): {exc.detail}")

    examined: list[tuple[str, FileFacts]] = []
    for n, imported in enumerate(files):

        async def load(data: bytes = imported.data) -> bytes:
            return data

        try:
            name = clean_name(imported.name)
            examined.append((name, await st.examiner.examine(name, load)))
        except FileRefused as exc:
            raise named(n, exc) from None
    ids: dict[str, str] = {}
    for n, (imported, (name, facts)) in enumerate(zip(files, examined, strict=True)):
        try:
            quota = st.settings.max_storage_bytes_per_user
            row, created = await st.store.files.import_file(owner, name, imported.data, facts, quota=quota)
        except FileRefused as exc:
            raise named(n, exc) from None
        if created:  # (a file this owner had, or that an upload made meanwhile, is not the import's to remove)
            stored.append(row.id)
        ids[imported.key] = row.id
    return ids


async def forget_files(st: Any, owner: str, file_ids: list[str]) -> None:
    """The files a refused import stored, removed (one a message has used since stays; the collector
    removes what a crash left, once unused past CHATSVC_FILE_RETENTION_HOURS)."""
    for file_id in file_ids:
        try:
            await st.store.files.remove(owner, file_id)
        except Refusal as exc:
            log.warning("a file of a refused import is left for the collector: %s", exc.detail)


async def fork_conversation(request: Request) -> Response:
    st = state(request)
    key = conversation_key(request)
    body = await read_json(request, st.settings)
    check_fields(body, ("message_id", "session_id", "title"))
    message_id = body.get("message_id")
    if not (isinstance(message_id, str) and MESSAGE_ID.fullmatch(message_id)):
        raise invalid("'message_id' is required: the id of the message the new conversation ends with.")
    new_session_id = check_session_id(body["session_id"]) if body.get("session_id") is not None else str(uuid.uuid4())
    title = optional_text(body, "title", 200)
    await conversation_or_404(request, key)
    if not await st.store.copies.fork(*key, message_id, new_session_id, title):
        raise conversation_exists(new_session_id)
    row = await conversation_or_404(request, (key[0], new_session_id))
    return JSONResponse(present_conversation(st.settings, row), status_code=201)


async def delete_conversation(request: Request) -> Response:
    st = state(request)
    key = conversation_key(request)
    await st.relay.stop(key)  # its answer ends first, so nothing writes after the delete
    if not await st.store.conversations.delete(*key):
        raise not_found(key[1])
    return Response(status_code=204)


async def clear_context(request: Request) -> Response:
    st = state(request)
    key = conversation_key(request)
    if not await st.store.tree.clear_context(*key, query_bool(request, "purge")):
        raise not_found(key[1])
    row = await conversation_or_404(request, key)
    return JSONResponse(present_conversation(st.settings, row))


# ── HTTP: file handlers: the routes under /api/v1/files: upload, metadata, content, delete
# The upload is the one route whose body is not JSON and not read whole: its pieces are hashed, cut
# into FILE_CHUNK_BYTES rows and written as they arrive (memory per upload: one chunk and one piece),
# into a staged row that only `Files.finish` makes a file. Whatever ends an upload early (a refusal,
# an error, a disconnect, a cancellation) deletes what it staged.

UPLOAD_SECONDS = 600  # an upload's body may take this long in all (CHATSVC_READ_TIMEOUT applies between pieces)
MULTIPART_SLACK = 64 * 1024  # a multipart body may exceed CHATSVC_MAX_FILE_BYTES by this much (boundaries, headers)
UPLOAD_FIELD = b"file"  # the multipart part that holds the file
FILE_ID = re.compile(r"[0-9a-f]{24}")  # what new_message_id makes: another id names no file


def bad_upload(detail: str) -> FileRefused:
    return FileRefused(400, "bad_upload", detail)


def file_too_large(limit: int) -> FileRefused:
    shown = f"{limit // 2**20} MiB" if limit % 2**20 == 0 else f"{limit} bytes"
    return FileRefused(413, "file_too_large", f"The file is larger than CHATSVC_MAX_FILE_BYTES ({shown}).")


def upload_timeout(seconds: float) -> ApiError:
    return ApiError(
        408,
        "request_timeout",
        f"The upload sent nothing for {seconds:g} s (CHATSVC_READ_TIMEOUT), or took longer"
        f" than {UPLOAD_SECONDS} s in all.",
    )


class MultipartFile:
    """The `file` part of a multipart/form-data body, fed the body piece by piece (python_multipart's
    push parser: no temporary file, nothing held but the piece). `feed` returns the file's bytes that
    piece held; `filename` is the part's raw filename once its headers are read (None before). Other
    parts are skipped; a second `file` part, a part without a filename or a broken body is 400."""

    def __init__(self, boundary: bytes):
        self.filename: str | None = None
        self.ended = False
        self._data: list[bytes] = []
        self._header: list[bytes] = [b"", b""]  # the header being read: its name, its value
        self._headers: dict[bytes, bytes] = {}
        self._in_file = False
        self._error: str | None = None
        callbacks = {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda data, start, end: self._add(0, data[start:end]),
            "on_header_value": lambda data, start, end: self._add(1, data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_end": self._end,
        }
        self.parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]

    def feed(self, piece: bytes) -> list[bytes]:
        if self.ended:  # what follows the closing boundary (an epilogue) is ignored, as RFC 2046 says
            return []
        try:
            self.parser.write(piece)
        except FormParserError:
            raise bad_upload("The multipart/form-data body is malformed.") from None
        if self._error:
            raise bad_upload(self._error)
        data, self._data = self._data, []
        return data

    def finish(self) -> None:
        if not self.ended:
            raise bad_upload("The multipart/form-data body ends before its closing boundary.")
        if self.filename is None:
            raise bad_upload("The multipart/form-data body has no part named 'file' (the file to upload).")

    def _part_begin(self) -> None:
        self._headers, self._in_file = {}, False

    def _add(self, which: int, data: bytes) -> None:
        self._header[which] += data
        if len(self._header[which]) > 8192:
            self._error = "A multipart part's header is longer than 8 KiB."

    def _header_end(self) -> None:
        self._headers[self._header[0].strip().lower()] = self._header[1].strip()
        self._header = [b"", b""]

    def _headers_finished(self) -> None:
        kind, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        if kind != b"form-data" or options.get(b"name") != UPLOAD_FIELD:
            return
        if self.filename is not None:
            self._error = "The multipart/form-data body has two parts named 'file': upload one file at a time."
        elif b"filename" not in options:
            self._error = "The 'file' part has no filename (Content-Disposition: form-data; name=\"file\"; filename=…)."
        else:
            self.filename = options[b"filename"].decode("utf-8", "replace")
            self._in_file = True

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_file and not self._error:
            self._data.append(bytes(data[start:end]))

    def _end(self) -> None:
        self.ended = True


async def upload_pieces(request: Request, between: float) -> AsyncIterator[bytes]:
    """The request body as it arrives: each piece within `between` s of the last (CHATSVC_READ_TIMEOUT,
    so a large upload on a slow link is not cut), the whole within UPLOAD_SECONDS."""
    pieces = request.stream().__aiter__()
    deadline = time.monotonic() + UPLOAD_SECONDS
    while True:
        try:
            with anyio.fail_after(max(0.0, min(between, deadline - time.monotonic()))):
                piece = await pieces.__anext__()
        except StopAsyncIteration:
            return
        except ClientDisconnect:  # nobody is left to answer; not a server error
            raise client_disconnected() from None
        except TimeoutError:
            raise upload_timeout(between) from None
        if piece:
            yield piece


class Upload:
    """One upload's bytes on their way to a staged `files` row: hashed, counted against
    CHATSVC_MAX_FILE_BYTES, cut into FILE_CHUNK_BYTES rows and written one at a time."""

    def __init__(self, files: Files, file_id: str, limit: int):
        self.files, self.file_id, self.limit = files, file_id, limit
        self.hash = hashlib.sha256()
        self.size = 0
        self._buffer = bytearray()
        self._seq = 0

    async def add(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            raise file_too_large(self.limit)
        self.hash.update(data)
        self._buffer += data
        while len(self._buffer) >= FILE_CHUNK_BYTES:
            with memoryview(self._buffer) as view:
                chunk = bytes(view[:FILE_CHUNK_BYTES])  # one copy (a bytearray's slice is a copy already)
            del self._buffer[:FILE_CHUNK_BYTES]
            await self._write(chunk)

    async def close(self) -> str:
        """Writes the last chunk; the bytes' sha256 (hex)."""
        if self._buffer:
            await self._write(bytes(self._buffer))
            self._buffer.clear()
        return self.hash.hexdigest()

    async def _write(self, chunk: bytes) -> None:
        await self.files.write(self.file_id, self._seq, chunk)
        self._seq += 1


def present_file(row: FileRow) -> dict:
    """A file as the API shows it: its facts that are not null."""
    shown: dict[str, Any] = {
        "id": row.id,
        "name": row.name,
        "media_type": row.media_type,
        "size": row.size,
        "sha256": row.sha256,
        "kind": row.kind,
        "created_at": row.created_at,
    }
    optional = {"width": row.width, "height": row.height, "pages": row.pages, "text_chars": row.text_chars}
    shown.update({name: value for name, value in optional.items() if value is not None})
    if row.text_note is not None:
        shown["note"] = row.text_note
    return shown


def file_key(request: Request) -> tuple[str, str]:
    """(owner, file_id) of the file a route's path names (an id this service cannot have made: 404)."""
    owner, file_id = owner_of(request), request.path_params["file_id"]
    if not FILE_ID.fullmatch(file_id):
        raise file_not_found(file_id[:200])
    return owner, file_id


async def upload_file(request: Request) -> Response:
    """A new file of the caller: `multipart/form-data` with its part `file` (named by its filename), or
    the raw bytes with `?name=`. 201 with the file, or 200 with the caller's file of the same bytes."""
    metrics = state(request).store.db.metrics
    try:
        row, created = await receive_file(request)
    except (Refusal, ApiError) as exc:
        metrics.file_upload(None, exc.code)
        raise
    metrics.file_upload(row.kind, "stored" if created else "deduplicated")
    return JSONResponse(present_file(row), status_code=201 if created else 200)


async def receive_file(request: Request) -> tuple[FileRow, bool]:
    """The upload's file, and whether it is new (False: the caller's file of the same bytes)."""
    st = state(request)
    refuse_while_draining(request)
    owner = owner_of(request)
    settings, files, metrics = st.settings, st.store.files, st.store.db.metrics
    kind, options = _parse_content_type(request.headers.get("content-type"))
    multipart = None
    name: str | None = None
    if kind == "multipart/form-data":
        if not options.get(b"boundary"):
            raise bad_upload("The multipart/form-data Content-Type has no boundary.")
        if len(options[b"boundary"]) > 70:  # RFC 2046's limit (python_multipart refuses past 256)
            raise bad_upload("The multipart/form-data boundary is longer than 70 characters (RFC 2046).")
        multipart = MultipartFile(options[b"boundary"])
        limit = settings.max_file_bytes + MULTIPART_SLACK
    else:
        raw = request.query_params.get("name")
        if raw is None or not raw.strip():
            raise FileRefused(
                400, "bad_file_name", "A raw upload needs the file's name in ?name= (or send multipart/form-data)."
            )
        limit, name = settings.max_file_bytes, clean_name(raw)
    declared = request.headers.get("content-length", "")
    if ASCII_NUMBER.fullmatch(declared) and int(declared) > limit:
        raise file_too_large(settings.max_file_bytes)
    upload: Upload | None = None
    received = 0
    try:
        async for piece in upload_pieces(request, settings.read_timeout):
            refuse_while_draining(request)  # (the server would cut it at its shutdown, with no JSON answer)
            received += len(piece)
            if received > limit:
                raise file_too_large(settings.max_file_bytes)
            data = [piece] if multipart is None else multipart.feed(piece)
            if upload is None and (multipart is None or multipart.filename is not None):
                name = name or clean_name(multipart.filename or "")  # type: ignore[union-attr]
                upload = await _begin(files, owner, name, settings)
            for part in data:
                await upload.add(part)  # type: ignore[union-attr]
        if multipart is not None:
            multipart.finish()
        if upload is None:  # a raw upload of no bytes at all
            upload = await _begin(files, owner, name, settings)  # type: ignore[arg-type]
        sha256 = await upload.close()
        metrics.file_upload_bytes.inc(upload.size)
        existing = await files.find(owner, sha256)
        if existing is not None:
            await _discard(files, upload.file_id)
            return existing, False
        async with st.finishing:
            started = time.perf_counter()
            facts = await st.examiner.examine(name, functools.partial(files.read, upload.file_id, upload.size))
            metrics.file_processing.labels(facts.kind).observe(time.perf_counter() - started)
            quota = settings.max_storage_bytes_per_user
            return await files.finish(upload.file_id, owner, sha256, upload.size, facts, quota)
    except BaseException:
        if upload is not None:
            await _discard(files, upload.file_id)
        raise


def _parse_content_type(value: str | None) -> tuple[str, dict[bytes, bytes]]:
    kind, options = parse_options_header(value or "")
    return kind.decode("latin-1").lower(), options


async def _begin(files: Files, owner: str, name: str, settings: Settings) -> Upload:
    file_id = await files.begin(owner, name, settings.max_storage_bytes_per_user)
    return Upload(files, file_id, settings.max_file_bytes)


async def _discard(files: Files, file_id: str) -> None:
    """The staged row and its chunks deleted, even while the upload is being cancelled (a failure is
    logged: the collector deletes what is left of it within the hour)."""
    with anyio.CancelScope(shield=True):
        try:
            await files.discard(file_id)
        except Exception:
            log.exception("could not delete the staged upload %s; the collector will", file_id)


async def list_files(request: Request) -> Response:
    """The caller's files, newest first, a page at a time (`cursor`: the last page's `next_cursor`)."""
    st = state(request)
    owner = owner_of(request)
    limit = query_int(request, "limit", 50, 1, 200)
    cursor = request.query_params.get("cursor")
    before = decode_cursor(cursor, 1)[0] if cursor else None
    rows = await st.store.files.page(owner, limit + 1, before)
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = encode_cursor(rows[-1].id) if more else None
    return JSONResponse({"files": [present_file(row) for row in rows], "next_cursor": next_cursor})


async def get_file(request: Request) -> Response:
    """A file's metadata, and how many messages carry it (`references`: it cannot be deleted while > 0)."""
    files = state(request).store.files
    owner, file_id = file_key(request)
    row = await files.get(owner, file_id)
    return JSONResponse({**present_file(row), "references": await files.references(owner, file_id)})


async def delete_file(request: Request) -> Response:
    await state(request).store.files.remove(*file_key(request))
    return Response(status_code=204)


# /content's headers: the bytes never run (a sandboxed document with no sources, never framed), are
# taken for what their type says (nosniff: RequestID adds it to every response), read only by this
# origin's pages, and kept by the browser for good (an id's bytes never change).
CONTENT_POLICY = "default-src 'none'; sandbox; frame-ancestors 'none'"
CONTENT_HEADERS = {
    "Content-Security-Policy": CONTENT_POLICY,
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cache-Control": "private, max-age=31536000, immutable",
    "Accept-Ranges": "bytes",
}
SERVED_TEXT_TYPES = frozenset({"text/plain", "text/markdown", "text/csv"})  # other text/* is served as text/plain
_RANGE = re.compile(r"bytes=([0-9]*)-([0-9]*)")


def served_type(media_type: str) -> str:
    """The Content-Type a file is served with: text in UTF-8, and never a type a browser runs (HTML)."""
    if media_type.startswith("text/"):
        return f"{media_type if media_type in SERVED_TEXT_TYPES else 'text/plain'}; charset=utf-8"
    if media_type == "application/json":
        return "application/json; charset=utf-8"
    return media_type


def content_disposition(row: FileRow) -> str:
    """Inline for images, attachment for the rest; the name as RFC 6266 says (UTF-8 in `filename*`,
    an ASCII fallback without quotes, backslashes or control characters in `filename`)."""
    fallback = "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else "_" for c in row.name).strip() or "file"
    kind = "inline" if row.kind == "image" else "attachment"
    return f"{kind}; filename=\"{fallback}\"; filename*=UTF-8''{quote(row.name, safe='')}"


def byte_range(header: str | None, size: int) -> tuple[int, int] | bool | None:
    """The single range `Range` asks for, as [start, end); None: the whole file (no header, several
    ranges, or one malformed: RFC 9110 says to ignore it); False: none of it can be served (416)."""
    match = _RANGE.fullmatch((header or "").strip().replace(" ", ""))
    if match is None or match.group(1) == match.group(2) == "":
        return None
    # (a number of more than 19 digits is past any file: int() of thousands of digits is refused)
    first, last = ((str(2**63) if len(n) > 19 else n) for n in match.groups())
    if first == "":  # the last `last` bytes
        length = int(last)
        return (max(0, size - length), size) if length > 0 and size > 0 else False
    start = int(first)
    if last != "" and int(last) < start:
        return None
    if start >= size:
        return False
    return start, size if last == "" else min(int(last) + 1, size)


async def file_content(request: Request) -> Response:
    """The file's bytes, a chunk row at a time, with the headers that keep them inert (CONTENT_HEADERS);
    a single `Range` is 206 (only the chunks it covers are read), `If-None-Match` its ETag 304."""
    files = state(request).store.files
    owner, file_id = file_key(request)
    row = await files.get(owner, file_id)
    etag = f'"{row.sha256}"'
    headers = {**CONTENT_HEADERS, "ETag": etag}
    if_none_match = request.headers.get("if-none-match")
    if if_none_match is not None and (
        if_none_match.strip() == "*" or etag in (tag.strip().removeprefix("W/") for tag in if_none_match.split(","))
    ):
        return Response(status_code=304, headers=headers)
    wanted = byte_range(request.headers.get("range"), row.size)
    if_range = request.headers.get("if-range")
    if wanted is not None and if_range is not None and if_range.strip() != etag:
        wanted = None  # a range of other bytes than these: the whole file (RFC 9110, If-Range)
    if wanted is False:
        raise ApiError(
            416,
            "range_not_satisfiable",
            f"The file has {row.size} bytes: the range asked for ({request.headers.get('range', '')[:100]}) holds none"
            " of them.",
            headers={**headers, "Content-Range": f"bytes */{row.size}"},
        )
    headers.update({"Content-Type": served_type(row.media_type), "Content-Disposition": content_disposition(row)})
    status, (start, end) = (200, (0, row.size)) if wanted is None else (206, wanted)  # type: ignore[misc]
    if status == 206:
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{row.size}"
    headers["Content-Length"] = str(end - start)
    if request.method == "HEAD":
        return Response(status_code=status, headers=headers)
    return StreamingResponse(files.content(file_id, start, end), status_code=status, headers=headers)


# ── HTTP: usage handlers: the routes under /api/v1/usage and /api/v1/admin: reports, limits, resets
# What the ledger holds (Usage.report), as JSON or CSV; where the caller stands against its limits
# (Usage.standing); and an admin's routes: one owner's limits read and set, its window reset. Money is
# shown in the currency of CHATSVC_PRICES (micros / 1,000,000, 6 places). The admin routes and a report
# of another owner need CHATSVC_ADMIN_TOKEN as `Authorization: Bearer` (never ?access_token=: a URL is
# logged); without it configured the admin routes do not exist (404).

USAGE_MAX_DAYS = 366  # the longest range one report covers
USAGE_PAGE = 1000  # groups in one page of a report, at most (and by default)
WINDOWS = ("day", "month")
_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_RFC3339 = re.compile(
    r"([0-9]{4}-[0-9]{2}-[0-9]{2})[Tt ]([0-9]{2}:[0-9]{2}:[0-9]{2})(?:\.([0-9]{1,9}))?([Zz]|[+-][0-9]{2}:[0-9]{2})"
)
_CSV_FORMULA = ("=", "+", "-", "@", "\t", "\r")  # a cell starting with one is a formula to a spreadsheet


def admin_only(detail: str) -> ApiError:
    return ApiError(403, "admin_only", detail)


def carries_admin_token(request: Request) -> bool:
    """Whether the request carries CHATSVC_ADMIN_TOKEN as `Authorization: Bearer` (constant-time)."""
    token = state(request).settings.admin_token
    value = request.headers.get("authorization", "")
    if token is None or value[:7].lower() != "bearer ":
        return False
    return hmac.compare_digest(value[7:].encode("latin-1").strip(), token.encode())  # as TokenAuth reads it


def require_admin(request: Request, what: str | None = None) -> None:
    """An admin's request: CHATSVC_ADMIN_TOKEN configured (else an admin route does not exist: 404, and
    `what` of a user's route is 403 admin_only) and carried (else 401)."""
    if state(request).settings.admin_token is None:
        if what is None:
            raise no_route(request.url.path)
        raise admin_only(f"{what} needs the admin token, and this service has none (CHATSVC_ADMIN_TOKEN).")
    if not carries_admin_token(request):
        raise unauthorized(
            f"{what or 'This route'} needs 'Authorization: Bearer <admin token>' (CHATSVC_ADMIN_TOKEN).",
            headers={"WWW-Authenticate": 'Bearer realm="admin"'},
        )


def check_owner(value: str, name: str) -> str:
    """An owner named by an admin: what CHATSVC_USER_HEADER would carry ('' without one)."""
    if len(value) > 256:
        raise invalid(f"'{name}' is longer than 256 characters.")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise invalid(f"'{name}' must not hold control characters.")
    return value


def user_key(request: Request) -> str:
    """The owner an admin route's path names (`/admin/users/{user}/...`; '' is the one owner of a service
    without CHATSVC_USER_HEADER: `/admin/users//limits`)."""
    return check_owner(request.path_params["user"], "user")


def stamp(moment: datetime) -> str:
    """A time as the ledger stores its times (utcnow's format), rounded up to a whole millisecond: a call
    stored at t is in [from, to) exactly when t is in [stamp(from), stamp(to))."""
    moment = moment.astimezone(timezone.utc)
    if moment.microsecond % 1000:
        moment += timedelta(microseconds=1000 - moment.microsecond % 1000)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def query_time(request: Request, name: str) -> datetime | None:
    """`from`/`to` in UTC: a date (YYYY-MM-DD: its midnight) or an RFC 3339 time (to the microsecond,
    within the years 1 to 9999); None when absent."""
    raw = request.query_params.get(name) or None
    if raw is None:
        return None
    try:
        if _DAY.fullmatch(raw):
            return datetime.strptime(raw, "%Y-%m-%d").replace(tzinfo=timezone.utc)
        match = _RFC3339.fullmatch(raw)
        if match is not None:
            day, clock, fraction, offset = match.groups()
            offset = "+00:00" if offset in ("Z", "z") else offset
            moment = datetime.fromisoformat(f"{day}T{clock}.{(fraction or '0')[:6]:0<6}{offset}")
            return moment.astimezone(timezone.utc)
    except (ValueError, OverflowError):
        pass
    raise invalid(f"'{name}' must be a UTC date (2026-12-01) or an RFC 3339 time (2026-12-01T08:00:00Z).")


def month_of(moment: datetime) -> datetime:
    """The first instant of the UTC month `moment` is in."""
    return moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def usage_range(request: Request) -> tuple[str, str]:
    """The report's [from, to) as the ledger's times, at most USAGE_MAX_DAYS days. Neither given: the
    current UTC month (by this process's clock: a range to read, not a limit's window); `from` alone:
    to the end of the current month, or 366 days; `to` alone: from the first of its month."""
    start, end = query_time(request, "from"), query_time(request, "to")
    try:
        following = (month_of(datetime.now(timezone.utc)) + timedelta(days=32)).replace(day=1)
        if start is None:
            start = month_of(following - timedelta(days=1) if end is None else end - timedelta(microseconds=1))
        if end is None:
            end = min(start + timedelta(days=USAGE_MAX_DAYS), following) if start < following else following
        shown = stamp(start), stamp(end)
    except OverflowError:  # past the year 9999, or before the year 1
        raise invalid("'from' and 'to' must be within the years 1 to 9999.") from None
    if not start < end:
        raise invalid("'from' must be before 'to' ('to' is not included; alone, it is the next month's first).")
    if end - start > timedelta(days=USAGE_MAX_DAYS):
        raise invalid(f"A report covers at most {USAGE_MAX_DAYS} days: ask for a shorter range of 'from' to 'to'.")
    return shown


def wants_csv(request: Request) -> bool:
    """`format=csv`, or (without `format`) an Accept that names text/csv."""
    chosen = request.query_params.get("format")
    if chosen is not None:
        if chosen not in ("json", "csv"):
            raise invalid("'format' must be json or csv.")
        return chosen == "csv"
    accepted = (part.split(";", 1)[0].strip().lower() for part in request.headers.get("accept", "").split(","))
    return "text/csv" in accepted


def money_or_none(micros: int | None) -> float | None:
    return None if micros is None else money(micros)


def present_usage(row: Any) -> dict:
    """A report's totals or group as the API shows it: its cost as money (null without prices)."""
    shown = {name: row[name] for name in ("key", *USAGE_FIELDS_REPORTED) if name in row}
    return {**shown, "cost": money_or_none(row["cost"])}


def csv_cell(value: Any) -> Any:
    """A key as a spreadsheet takes it: text a spreadsheet would run as a formula gets a leading `'`."""
    if isinstance(value, str) and value.startswith(_CSV_FORMULA):
        return "'" + value
    return value


def csv_money(micros: int | None) -> str:
    """Money exactly, with 6 places (the JSON number's value)."""
    if micros is None:
        return ""
    return f"{micros // MICROS}.{micros % MICROS:06d}"


def csv_name(when: str) -> str:
    """A report's bound in its file's name: the day if it is a midnight, else the time without colons."""
    if when.endswith("T00:00:00.000Z"):
        return when[:10]
    return when.replace(":", "").replace("-", "").replace(".000Z", "Z")


def usage_cursor(request: Request, group_by: str) -> str | None:
    """The last key of the previous page (None: the first page). A cursor holds its grouping and the key,
    so that it is never empty, even after the owner '' (an empty `cursor=` is no cursor at all: a 422)."""
    cursor = request.query_params.get("cursor")
    if cursor is None:
        return None
    if cursor == "":
        raise invalid("'cursor' is empty: leave it out for the first page, or send the previous page's next_cursor.")
    grouping, key = decode_cursor(cursor, 2)
    if grouping != group_by:
        raise invalid(f"'cursor' is the cursor of another report (group_by={group_by} needs its own).")
    return key


async def usage_report(request: Request) -> Response:
    """GET /api/v1/usage: the calls in [from, to) of the caller, or (admin) of `user` or of everyone
    (group_by=user), with their totals and one row per group, a page at a time; JSON or CSV."""
    st = state(request)
    query = request.query_params
    group_by = query.get("group_by", "day")
    if group_by not in USAGE_GROUPS:  # (the Usage section's groupings)
        raise invalid(f"'group_by' must be one of {', '.join(USAGE_GROUPS)}.")
    as_csv = wants_csv(request)
    start, end = usage_range(request)
    limit = query_int(request, "limit", USAGE_PAGE, 1, USAGE_PAGE)
    after = usage_cursor(request, group_by)
    user = query.get("user")
    if group_by == "user":
        require_admin(request, "A report of every user (group_by=user)")
        if user is not None:
            raise invalid("'user' names one user: leave it out of group_by=user, which reports every user.")
        owner = None
    elif user is not None:
        require_admin(request, "A report of another user (?user=)")
        owner = check_owner(user, "user")
    else:
        owner = owner_of(request)
    totals, groups, last = await st.store.usage.report(owner, start, end, group_by, limit, after)
    next_cursor = None if last is None else encode_cursor(group_by, last)
    prices: Prices | None = st.settings.prices
    currency = prices.currency if prices is not None else None
    if as_csv:
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(("key", *USAGE_FIELDS_REPORTED, "currency"))
        for group in groups:
            cells = [group[column] for column in USAGE_FIELDS_REPORTED[:-1]]
            writer.writerow((csv_cell(group["key"]), *cells, csv_money(group.get("cost")), currency or ""))
        headers = {"Content-Disposition": f'attachment; filename="usage-{csv_name(start)}-{csv_name(end)}.csv"'}
        if next_cursor is not None:
            headers["X-Next-Cursor"] = next_cursor
        return Response(out.getvalue(), media_type="text/csv; charset=utf-8", headers=headers)
    return JSONResponse(
        {
            "from": start,
            "to": end,
            "group_by": group_by,
            "currency": currency,
            "totals": present_usage(totals),
            "groups": [present_usage(group) for group in groups],
            "next_cursor": next_cursor,
        }
    )


def present_standing(standing: dict, prices: Prices | None) -> dict:
    """Usage.standing as the API shows it: the cost limit's amounts as money, and the currency."""
    shown = json.loads(json.dumps(standing))  # a copy the presentation may change
    cost = shown.get("limits", {}).get("cost_per_month")
    if isinstance(cost, dict):
        for name in ("limit", "used", "reserved", "remaining"):
            if isinstance(cost.get(name), int):
                cost[name] = money(cost[name])
    shown["currency"] = prices.currency if prices is not None else None
    return shown


async def usage_limits(request: Request) -> Response:
    """GET /api/v1/usage/limits: where the caller stands against each of its limits."""
    st = state(request)
    owner = owner_of(request)
    return JSONResponse(present_standing(await st.store.usage.standing(owner), st.settings.prices))


def present_limits(owner: str, own: dict, settings: Settings) -> dict:
    """An owner's limits as the admin routes show them: the admin's (a key absent: the global limit; null:
    none) and the effective ones, the cost as money."""
    everyone = Limits.of(settings)
    effective = {kind: own[kind] if kind in own else getattr(everyone, kind) for kind in LIMIT_KINDS}
    shown = dict(own)
    if shown.get("cost_per_month") is not None:
        shown["cost_per_month"] = money(shown["cost_per_month"])
    effective["cost_per_month"] = money_or_none(effective["cost_per_month"])
    currency = settings.prices.currency if settings.prices is not None else None
    return {"user": owner, "limits": shown, "effective": effective, "currency": currency}


def parse_limits(body: dict) -> dict:
    """A PUT of an owner's limits: only LIMIT_KINDS, each null (no limit) or a whole number from 0
    (0 refuses every answer), the cost an amount with at most 6 places (kept in micros); absent: the
    global limit."""
    check_fields(body, LIMIT_KINDS)
    limits: dict[str, int | None] = {}
    for kind, value in body.items():
        if value is None:
            limits[kind] = None
            continue
        # an int stays an int (JSON's 1 followed by 400 zeros is one: as a float it overflows)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            number = None
        elif isinstance(value, int):
            number = value * MICROS if kind == "cost_per_month" else value
        elif not math.isfinite(value):
            number = None
        elif kind == "cost_per_month":
            micros = Decimal(repr(value)) * MICROS  # the number as written (repr: the shortest that reads back)
            number = int(micros) if micros == int(micros) else None
        else:
            number = int(value) if value.is_integer() else None
        if number is None or not 0 <= number <= (MAX_COST * MICROS if kind == "cost_per_month" else MAX_LIMIT):
            rule = (
                f"an amount from 0 to {MAX_COST} with at most 6 decimal places"
                if kind == "cost_per_month"
                else f"a whole number from 0 to {MAX_LIMIT}"
            )
            raise invalid(f"'{kind}' must be null (no limit) or {rule} (0 refuses every answer).")
        limits[kind] = number
    return limits


async def get_user_limits(request: Request) -> Response:
    """GET /api/v1/admin/users/{user}/limits (admin)."""
    require_admin(request)
    st = state(request)
    owner = user_key(request)
    return JSONResponse(present_limits(owner, await st.store.usage.owner_limits(owner), st.settings))


async def put_user_limits(request: Request) -> Response:
    """PUT /api/v1/admin/users/{user}/limits (admin): the owner's limits replaced; logged."""
    require_admin(request)
    st = state(request)
    s: Settings = st.settings
    owner = user_key(request)
    limits = parse_limits(await read_json(request, s))
    if limits.get("cost_per_month") is not None and s.prices is None:
        raise invalid("'cost_per_month' needs prices to count costs with, and this service has none (CHATSVC_PRICES).")
    if limits.get("cost_per_month") is not None and s.unpriced_models():
        raise invalid(
            f"'cost_per_month' cannot hold for {s.unpriced_models()}, which CHATSVC_PRICES has no price for (its"
            " calls would cost nothing against the limit)."
        )
    await st.store.usage.set_limits(owner, limits)
    log.info("admin limits owner=%s set=%s", json.dumps(owner), ",".join(sorted(limits)) or "-")
    return JSONResponse(present_limits(owner, await st.store.usage.owner_limits(owner), s))


async def reset_user_usage(request: Request) -> Response:
    """POST /api/v1/admin/users/{user}/usage/reset (admin): the owner's day or month counted from 0
    again (the ledger keeps every call); logged."""
    require_admin(request)
    st = state(request)
    owner = user_key(request)
    body = await read_json(request, st.settings)
    check_fields(body, ("window",))
    window = body.get("window")
    if window not in WINDOWS:
        raise invalid('\'window\' must be "day" or "month".')
    await st.store.usage.reset(owner, window)
    log.info("admin reset owner=%s window=%s", json.dumps(owner), window)
    standing = present_standing(await st.store.usage.standing(owner), st.settings.prices)
    return JSONResponse({"user": owner, "window": window, "standing": standing})


# ── HTTP: chat handlers: an answer started, streamed, followed by a channel and stopped ──


async def start_answer(request: Request) -> Answer:
    """Validate a chat request, store the user's message, and start the answer."""
    st = state(request)
    s: Settings = st.settings
    relay: Relay = st.relay
    key = conversation_key(request)
    refuse_while_draining(request)
    chat = parse_chat(s, await read_json(request, s))
    if not s.dashscope_api_key:
        raise not_configured()
    if chat.continue_id is not None:
        return await start_continuation(request, chat)
    offer = make_offer(relay.toolbox, chat)
    relay.check_free(key)
    turn, messages, switched = await plan_turn(st.store, s, key, chat)
    payload = {"model": turn.model, "messages": messages, "stream": True, "stream_options": {"include_usage": True}}
    try:
        answer = await relay.admit(turn, {**payload, **chat.options}, offer)
    except OverLimit as exc:  # counted once, here: the 429 itself is api_error's
        relay.metrics.limit_refusals.labels(exc.limit).inc()
        raise
    answer.request_id = request.scope.get("request_id")
    if s.summaries == "on":  # what the summarizer weighs once it ends
        budget = s.context_budget(turn.model, chat.options.get("max_tokens"))
        answer.context = (budget, message_cost(messages), len(messages) - 1)
    answer.images, answer.files, answer.vision_switch = image_parts(messages), len(turn.files), switched
    relay.metrics.context_images.observe(answer.images)
    if switched:
        relay.metrics.vision_switches.inc()
    return answer


async def start_continuation(request: Request, chat: ChatRequest) -> Answer:
    """`{"continue": id}`: the answer goes on from its stored text (CONTRACT.md, "Continuing an answer")."""
    st = state(request)
    s: Settings = st.settings
    relay: Relay = st.relay
    key = conversation_key(request)
    relay.check_free(key)
    cont, messages, switched = await plan_continuation(st.store, s, key, chat)
    payload = {"model": cont.model, "messages": messages, "stream": True, "stream_options": {"include_usage": True}}
    try:
        answer = await relay.continue_answer(
            cont, continue_payload(s.continue_style, {**payload, **chat.options}, cont.text)
        )
    except OverLimit as exc:
        relay.metrics.limit_refusals.labels(exc.limit).inc()
        raise
    answer.request_id = request.scope.get("request_id")
    answer.images, answer.vision_switch = image_parts(messages), switched
    return answer


async def chat(request: Request) -> Response:
    answer = await start_answer(request)
    await answer.done.wait()
    if answer.error is not None:
        error = api_error(answer.error)
        error.extra.update(message_id=answer.message_id, partial_text=answer.full_text)
        raise error
    reply = {
        "session_id": answer.session_id,
        "response": answer.full_text,
        "message_id": answer.message_id,
        "parent_id": answer.parent_id,
        "model": answer.model,
        "finish_reason": answer.finish_reason,
    }
    if answer.pending_calls:  # it waits for the app's own tools
        reply["tool_calls"] = answer.pending_calls
    if answer.steps:
        reply["steps"] = [{"type": step["type"], "data": step["data"]} for step in answer.steps]
    if answer.usage is not None:  # when reported
        reply["usage"] = shown_usage(answer.usage)
    if answer.sources is not None:  # a searched answer's
        reply["sources"] = answer.sources
    cost = answer_cost(answer, state(request).settings.prices)
    return JSONResponse(reply if cost is None else {**reply, **cost.shown()})


RETRY = b"retry: 1000\n\n"  # once per connection: EventSource reconnects after 1 s


class _EventStream(EventSourceResponse):
    # sse-starlette wraps every send in a cancel scope for its `send_timeout`, which we leave unset
    # (a stalled reader cannot slow an answer: readers follow its log); per event that scope cost
    # more than the send itself (bench/relay.py).
    async def _send_with_timeout(self, send: Any, message: Any) -> None:
        await send(message)

    gauges: tuple[prometheus_client.Gauge, ...] = ()  # what counts this stream while it is open

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        for gauge in self.gauges:
            gauge.inc()
        try:
            await super().__call__(scope, receive, send)
        finally:
            for gauge in self.gauges:
                gauge.dec()


def event_stream(request: Request, body: AsyncIterator[bytes], channel: bool = False) -> EventSourceResponse:
    """An SSE response: pings keep proxies from closing it, and nothing may buffer or compress it."""
    response = _EventStream(
        body,
        ping=state(request).settings.ping_seconds,
        sep="\n",
        ping_message_factory=lambda: ServerSentEvent(comment="ping", sep="\n"),
        headers={"Cache-Control": "no-store, no-transform"},
    )
    metrics = state(request).store.db.metrics
    response.gauges = (metrics.streams, metrics.listeners) if channel else (metrics.streams,)
    return response


async def chat_stream(request: Request) -> Response:
    answer = await start_answer(request)  # validation and busy errors are plain JSON, before the stream

    async def body() -> AsyncIterator[bytes]:
        yield RETRY
        async for batch in answer.events(answer.base):  # a continuation's: from its `start`
            yield batch

    return event_stream(request, body())


async def channel(request: Request) -> Response:
    """The conversation's event channel for EventSource (CONTRACT.md, "GET .../stream")."""
    st = state(request)
    key = conversation_key(request)
    refuse_while_draining(request)
    last = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
    return event_stream(request, channel_events(st.relay, key, parse_event_id(last)), channel=True)


async def channel_events(relay: Relay, key: tuple[str, str], resume: tuple[str, int] | None) -> AsyncIterator[bytes]:
    """The channel's body: the relay's events for this reader (Registry.reader_events), after `retry`."""
    yield RETRY
    async for batch in relay.registry.reader_events(key, resume):
        yield batch


async def stop_answer(request: Request) -> Response:
    st = state(request)
    key = conversation_key(request)
    message_id, stopped = await st.relay.stop(key)
    if message_id is None:
        await conversation_or_404(request, key)
    return JSONResponse({"session_id": key[1], "stopped": stopped, "message_id": message_id})


# ── HTTP: errors as responses: whatever a handler raises, as {"detail", "code"} ─────────


async def api_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return exc.response()


async def refusal_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Refusal)
    return api_error(exc).response()


async def http_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return no_route(request.url.path).response()
    if exc.status_code == 405:  # Allow lists the methods of every route on this path, not just the first
        # (matched from the app's root: inside a Mount, the scope's root_path is the mount's)
        scope = {**request.scope, "root_path": request.scope.get("app_root_path", request.scope.get("root_path", ""))}
        allowed = {
            m
            for r in request.app.routes
            if r.matches(scope)[0] != Match.NONE
            for m in getattr(r, "methods", None) or ("GET", "HEAD")  # a Mount: static files
        }
        return method_not_allowed(request.method, request.url.path, sorted(allowed)).response()
    return http_error(exc.status_code, str(exc.detail), exc.headers).response()


async def internal_error_handler(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return internal_error().response()


EXCEPTION_HANDLERS = {
    ApiError: api_error_handler,
    Refusal: refusal_handler,
    HTTPException: http_error_handler,
    Exception: internal_error_handler,
}


# ── Operations: health, readiness, metrics and the OpenAPI document ────────────────────
# For load balancers, Prometheus and API tools: no API token needed.


def openapi_document(settings: Settings) -> bytes:
    """docs/openapi.json as this configuration serves it: the models it accepts, this release's version,
    and the tokens it needs (`openapi_security`), so that /docs shows a lock only where one is needed."""
    doc = json.loads(data_file("docs/openapi.json", "chatsvc_openapi.json").read_bytes())
    doc["info"]["version"] = __version__
    schemas = doc["components"]["schemas"]
    for name in ("ChatRequest", "ConversationCreate", "ConversationPatch"):
        schemas[name]["properties"]["model"]["enum"] = [*settings.models, None]
    schemas["ConversationFile"]["properties"]["conversation"]["properties"]["model"]["enum"] = [*settings.models, None]
    if settings.web_search == "off":  # a request that asks is refused (web_search_disabled)
        for name in ("ChatRequest", "ConversationPatch"):
            schemas[name]["properties"]["web_search"]["enum"] = [False, None]
    openapi_security(doc, settings)
    return json.dumps(doc, ensure_ascii=False).encode()


# The admin routes' note when CHATSVC_ADMIN_TOKEN is not set (they answer 404 then: `require_admin`).
NO_ADMIN_TOKEN_NOTE = "**Not enabled here**: this service has no CHATSVC_ADMIN_TOKEN, so this route answers 404."


def openapi_security(doc: dict[str, Any], settings: Settings) -> None:
    """The security requirements the service enforces, in place of the file's "token optional" ones:
    without CHATSVC_API_TOKEN no /api/ operation needs a token (no scheme, no lock); with it, each
    needs the bearer token (the event channel also takes ?access_token=, for EventSource), and the
    operations outside /api/ none. The admin operations need CHATSVC_ADMIN_TOKEN where it is set;
    where not, they say they answer 404 (and need what any /api/ operation needs)."""
    schemes = doc["components"]["securitySchemes"]
    doc.pop("security", None)
    if settings.api_token:
        doc["security"] = [{"bearer": []}]
    else:
        schemes.pop("bearer"), schemes.pop("accessToken")
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            if not path.startswith("/api/"):
                if settings.api_token:
                    operation["security"] = []
            elif operation.get("security") == [{"adminToken": []}]:
                if settings.admin_token is None:
                    del operation["security"]
                    operation["description"] = f"{NO_ADMIN_TOKEN_NOTE} {operation.get('description', '')}".strip()
            elif settings.api_token and (method, path) == ("get", "/api/v1/chat/{session_id}/stream"):
                operation["security"] = [{"bearer": []}, {"accessToken": []}]
    if settings.admin_token is None:
        schemes.pop("adminToken")
    if not schemes:
        del doc["components"]["securitySchemes"]


async def openapi(request: Request) -> Response:
    return Response(state(request).openapi, media_type="application/json")


async def prometheus_metrics(request: Request) -> Response:
    """This process's metrics in Prometheus' text format (each replica serves its own)."""
    return Response(state(request).store.db.metrics.exposition(), media_type=prometheus_client.CONTENT_TYPE_LATEST)


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    st = state(request)
    if st.relay.draining:  # load balancers stop sending new work here
        body = {"status": "draining", "detail": "chatsvc is shutting down.", "code": "shutting_down"}
        return JSONResponse(body, status_code=503)
    try:
        await asyncio.wait_for(st.store.db.ping(), timeout=2)
        if st.relay.unstored:
            raise StorageUnavailable(
                f"{len(st.relay.unstored)} finished answer(s) are not stored yet: {st.store.db.fault or 'the database'}"
                " failed; chatsvc keeps trying."
            )
    except StorageUnavailable as exc:
        detail = exc.detail
    except asyncio.TimeoutError:
        detail = "The database did not answer within 2 s."
    else:
        return JSONResponse({"status": "ready"})
    body = {"status": "unavailable", "detail": detail, "code": "storage_unavailable"}
    return JSONResponse(body, status_code=503, headers={"Retry-After": "2"})


async def list_models(request: Request) -> Response:
    """The models a chat may name (CHAT_MODEL first, the default, then CHATSVC_ALLOWED_MODELS), and
    whether a model service key is configured (without one every chat answers 503 not_configured:
    the playground says so before a send), and CHATSVC_WEB_SEARCH (the playground offers a search
    only when a turn may ask for one). Nothing is read from the database or the model service."""
    settings = state(request).settings
    models = [{"id": model, "default": model == settings.chat_model} for model in dict.fromkeys(settings.models)]
    configured = bool(settings.dashscope_api_key)
    return JSONResponse(
        {"models": models, "default": settings.chat_model, "configured": configured, "web_search": settings.web_search}
    )


# ── Pages: the playground (/) and the API docs (/docs), for a person with a browser ────
# Static files only, served by chatsvc itself (a sidecar often has no internet): the playground
# from its folder (playground/, shipped in the wheel), Swagger UI from the swagger-ui-py package.
# No API token is needed to load them; the requests they make carry it.

# Every page response (the pages and their files) carries PAGE_HEADERS: a Content-Security-Policy
# allowing only what the pages use, from their own origin (no inline script or style, no other site,
# no framing: a page that cannot be framed cannot be clicked through), the same anti-framing for
# older browsers, and no Referer (the playground's address names a conversation). Every response,
# the API's too, says nosniff (RequestID adds it). Images may be blob: URLs: the playground shows a
# message's files from bytes it fetched with its token (an <img src> cannot carry it).
PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
    "font-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
PAGE_HEADERS = {"Content-Security-Policy": PAGE_POLICY, "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer"}

# Relative URLs, so that the page also works behind a proxy that serves chatsvc under a prefix.
DOCS_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>chatsvc API</title>
<link rel="stylesheet" href="docs/static/swagger-ui.css">
<link rel="icon" type="image/png" href="docs/static/favicon-32x32.png" sizes="32x32">
</head>
<body>
<main id="swagger-ui"></main>
<script src="docs/static/swagger-ui-bundle.js"></script>
<script src="docs/static/chatsvc-docs.js"></script>
</body>
</html>
"""

# The docs page's own script (served with Swagger UI's files, so that the policy needs no inline
# script). The API token is kept once, by the playground (its localStorage key): the docs page reads
# it from there and gives it to its Authorize dialog, which keeps what it is given for this page
# only (persistAuthorization off; the copy an earlier release had Swagger UI keep is removed).
DOCS_SCRIPT_NAME = "chatsvc-docs.js"
DOCS_SCRIPT = """'use strict';
window.ui = SwaggerUIBundle({
  url: 'openapi.json', dom_id: '#swagger-ui', deepLinking: true, persistAuthorization: false,
  displayRequestDuration: true, presets: [SwaggerUIBundle.presets.apis], layout: 'BaseLayout',
  onComplete: () => {
    const token = localStorage.getItem('chatsvc.playground.token');
    if (token) window.ui.preauthorizeApiKey('bearer', token);
  },
});
localStorage.removeItem('authorized');
"""

# Of Swagger UI's folder (editors, other bundles, source maps, an OAuth2 redirect page), only what
# DOCS_PAGE loads (and, next to them, DOCS_SCRIPT).
DOCS_FILES = frozenset({"swagger-ui.css", "swagger-ui-bundle.js", "favicon-32x32.png"})


class PageFiles(StaticFiles):
    """A page's files from its folder, with PAGE_HEADERS; with `only`, just those names (others 404)."""

    def __init__(self, directory: Path, only: frozenset[str] | None = None):
        super().__init__(directory=directory)
        self.only = only

    async def get_response(self, path: str, scope: Any) -> Response:
        if self.only is not None and path not in self.only:
            raise HTTPException(status_code=404)
        return await super().get_response(path, scope)

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers.update(PAGE_HEADERS)
        return response


def swagger_ui_assets() -> Path:
    """Swagger UI's files in the swagger-ui-py package, found without importing it (its handlers
    need Jinja; chatsvc only serves the files)."""
    import importlib.util

    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the swagger-ui-py package is not installed (pip install swagger-ui-py); or CHATSVC_DOCS=0")
    return Path(next(iter(spec.submodule_search_locations))) / "static"


async def docs_page(request: Request) -> Response:
    return HTMLResponse(DOCS_PAGE, headers=PAGE_HEADERS)


async def docs_script(request: Request) -> Response:
    return Response(DOCS_SCRIPT, media_type="text/javascript; charset=utf-8", headers=PAGE_HEADERS)


# The contract the document's description links to (relatively, so behind a prefix too): the
# served page cannot reach the repository, so chatsvc serves the file, as text (Markdown to read).
CONTRACT_NAME = "CONTRACT.md"


def page_routes(settings: Settings) -> list[Route | Mount]:
    """The pages this configuration serves (CHATSVC_PLAYGROUND, CHATSVC_DOCS); their files found once."""
    routes: list[Route | Mount] = []
    if settings.playground:
        files = PageFiles(data_file("playground", "chatsvc_playground"))

        async def playground_page(request: Request) -> Response:
            return await files.get_response("index.html", request.scope)

        routes += [Route("/", playground_page, methods=["GET"]), Mount("/playground", files)]
    if settings.docs:
        assets = [
            Route(f"/{DOCS_SCRIPT_NAME}", docs_script, methods=["GET"]),
            Mount("", PageFiles(swagger_ui_assets(), only=DOCS_FILES)),
        ]
        contract = data_file(f"docs/{CONTRACT_NAME}", "chatsvc_contract.md").read_bytes()

        async def contract_page(request: Request) -> Response:
            return Response(contract, media_type="text/plain; charset=utf-8", headers=PAGE_HEADERS)

        routes += [
            Route("/docs", docs_page, methods=["GET"]),
            Route(f"/docs/{CONTRACT_NAME}", contract_page, methods=["GET"]),
            Mount("/docs/static", routes=assets),
        ]
    return routes


# ── Middleware: the layers every request passes through on its way to a route ──────────


MAX_HEADER_BYTES = 65536


class HeaderLimit:
    """431 for requests whose headers total over 64 KiB (uvicorn's httptools parser sets no bound)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and sum(len(k) + len(v) for k, v in scope["headers"]) > MAX_HEADER_BYTES:
            return await headers_too_large(MAX_HEADER_BYTES).response()(scope, receive, send)
        await self.app(scope, receive, send)


_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")
_NOSNIFF = (b"x-content-type-options", b"nosniff")


class RequestID:
    """Echo the caller's X-Request-ID (or a new one) on the response, and keep it for the logs. Every
    response also says `X-Content-Type-Options: nosniff` (a browser takes each as its Content-Type
    says, never a JSON error as a page or a script): one header more where this layer adds one."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = next((v for k, v in scope["headers"] if k == b"x-request-id"), b"")
        request_id = given if _REQUEST_ID.fullmatch(given) else os.urandom(16).hex().encode()  # (a uuid4's cost 4 us)
        scope["request_id"] = request_id.decode()

        async def send_with_id(message: Any) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", request_id), _NOSNIFF]
            await send(message)

        await self.app(scope, receive, send_with_id)


class JSONCORSMiddleware(CORSMiddleware):
    """Starlette's CORS middleware, whose refused preflight is JSON {"detail", "code"} like every other error."""

    def preflight_response(self, request_headers: Any) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code == 200:
            return response
        refused = cors_rejected(bytes(response.body).decode("utf-8", "replace")).response()
        refused.headers.update(
            {k: v for k, v in response.headers.items() if k.lower() not in ("content-type", "content-length")}
        )
        return refused


class TokenAuth:
    """With CHATSVC_API_TOKEN set, every /api/ request must carry it, or CHATSVC_ADMIN_TOKEN (constant-time
    compares; the admin routes check for the admin token themselves: `admin_only`)."""

    def __init__(self, app: Any, token: str | None, admin_token: str | None = None):
        self.app, self.token = app, token.encode() if token else None
        self.admin_token = admin_token.encode() if admin_token else None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if (
            self.token
            and scope["type"] == "http"
            and scope["path"].startswith("/api/")
            and scope["method"] != "OPTIONS"
            and not self._authorized(scope)
        ):
            response = unauthorized(
                "This API needs 'Authorization: Bearer <token>' (or ?access_token=<token> for EventSource).",
                headers={"WWW-Authenticate": "Bearer"},
            ).response()
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope: Any) -> bool:
        assert self.token is not None
        for name, value in scope["headers"]:
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                return self._known(value[7:].strip())
        query = Request(scope).query_params.get("access_token")
        return query is not None and self._known(query.encode())

    def _known(self, given: bytes) -> bool:
        """The API token or the admin token (both compared, whichever it is: the time says neither)."""
        assert self.token is not None
        api = hmac.compare_digest(given, self.token)
        admin = self.admin_token is not None and hmac.compare_digest(given, self.admin_token)
        return api or admin


class RequestMetrics:
    """Counts every HTTP request by its route's template (`/playground/{path}` for any file of a mount,
    `unmatched` for a path no route has, so a scan of random paths adds no series), method and
    status, and times it to its status line."""

    METHODS = frozenset({"GET", "POST", "PATCH", "DELETE", "OPTIONS", "HEAD", "PUT"})

    def __init__(self, app: Any, metrics: Metrics, routes: list[Route | Mount]):
        self.app, self.metrics, self.routes = app, metrics, routes

    def route_of(self, scope: Any, arrived: dict) -> str:
        """The route the app's router chose (Starlette keeps it in the scope: not matched twice), if the
        request reached a Route of the app; else matched again as the request `arrived` (a Mount rewrites
        the scope's root_path for what it holds, and a Router inside it puts its own route there; a
        response before the router's, an error of a layer, has no route yet)."""
        route = scope.get("route")
        if type(route) is Route and scope.get("root_path", "") == arrived["root_path"]:
            return route.path_format
        partial = None  # as the router chooses: the first route of this path and method, else of this path
        for route in self.routes:
            match, _ = route.matches(arrived)
            if match is Match.FULL:
                return route.path_format
            if match is Match.PARTIAL and partial is None:
                partial = route.path_format
        return partial or "unmatched"

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        arrived = {
            "type": "http",
            "path": scope["path"],
            "root_path": scope.get("root_path", ""),
            "method": scope["method"],
        }
        method = scope["method"] if scope["method"] in self.METHODS else "other"

        async def counted(message: Any) -> None:
            if message["type"] == "http.response.start":
                route = self.route_of(scope, arrived)
                self.metrics.requests.labels(route, method, str(message["status"])).inc()
                self.metrics.latency.labels(route, method).observe(time.perf_counter() - started)
            await send(message)

        await self.app(scope, receive, counted)


def redact_query(text: str) -> str:
    """`text` with the value of every query parameter whose name decodes to `access_token` (as the
    app reads it: `access%5Ftoken`, `%61ccess_token`, ...) replaced by `[redacted]`; on the upload
    route, `name` too (a file's name is the user's, like their texts: never logged)."""
    if "?" not in text:
        return text
    head, _, query = text.partition("?")
    query, space, tail = query.partition(" ")
    secret = {"access_token", "name"} if head.rstrip("/").endswith("/api/v1/files") else {"access_token"}
    parts = query.split("&")
    for i, part in enumerate(parts):
        name, equals, _ = part.partition("=")
        if unquote_plus(name) in secret:
            parts[i] = f"{name}{equals}[redacted]"
    return f"{head}?{'&'.join(parts)}{space}{tail}"


def redact_access_tokens(record: logging.LogRecord) -> bool:
    """A logging filter: EventSource sends the API token in the query string; access logs must not show it."""
    if isinstance(record.args, tuple):
        record.args = tuple(redact_query(a) if isinstance(a, str) else a for a in record.args)
    return True


# ── App: the routes, the layers around them, and the service's life from start to drain


def drain_on_sigterm(relay: Relay, grace: float) -> None:
    """Under uvicorn (which handles SIGTERM in the main thread), a SIGTERM first drains: new
    answers are refused, running ones get `grace` seconds, the rest are stored as interrupted
    and their readers told so. Only then does the server's own handler start its shutdown,
    which closes what streams remain. A second SIGTERM shuts down at once."""
    if threading.current_thread() is not threading.main_thread():
        return
    server_handler = signal.getsignal(signal.SIGTERM)
    if not callable(server_handler):
        return
    loop = asyncio.get_running_loop()
    drains: list[asyncio.Task] = []  # a strong reference: the loop keeps only weak ones to tasks

    async def drain() -> None:
        log.info("SIGTERM: draining %d running answer(s) for up to %g s", len(relay.registry.running_answers()), grace)
        await relay.shutdown(grace)
        await asyncio.sleep(0.1)  # let the streams write their last events
        server_handler(signal.SIGTERM, None)

    def on_sigterm(sig: int, frame: Any) -> None:
        if relay.draining:
            server_handler(sig, frame)
        else:
            relay.draining = True
            loop.call_soon_threadsafe(lambda: drains.append(loop.create_task(drain())))

    signal.signal(signal.SIGTERM, on_sigterm)


FILE_COLLECT_SECONDS = 600.0  # how often the collector looks for files to delete (Files.collect)


async def collect_files(store: Store, settings: Settings, metrics: Metrics) -> None:
    """Every FILE_COLLECT_SECONDS, the files no message uses past CHATSVC_FILE_RETENTION_HOURS (and the
    uploads a crash left) deleted; an error is logged, and the next round tries again."""
    while True:
        await asyncio.sleep(FILE_COLLECT_SECONDS)
        try:
            deleted = await store.files.collect(settings.file_retention_hours * 3600)
        except Exception:
            log.exception("the file collector failed; it tries again in %g s", FILE_COLLECT_SECONDS)
            continue
        metrics.files_collected.inc(deleted)
        if deleted:
            log.info("file collector: %d file(s) deleted", deleted)


def app_lifespan(
    settings: Settings, metrics: Metrics, own_process: bool = False
) -> Callable[[Starlette], contextlib.AbstractAsyncContextManager[None]]:
    """The app's life: the store opened (its schema upgraded), the upstream client and the relay
    started; at shutdown the running answers drained (see drain_on_sigterm), then each closed in turn.
    `own_process`: once started, what the process holds for its life (its modules, the app) is set
    aside from the cyclic garbage collector (gc.freeze), whose every full collection walked all of it:
    25-45 ms in which no answer moved, 3-6 ms after (bench/relay.py --only bt). Not for an app a
    process makes many of (tests): what is frozen is never collected."""

    @contextlib.asynccontextmanager
    async def run(app: Starlette) -> AsyncIterator[None]:
        store = Store(
            settings.database_url, exclusive=True, metrics=metrics, limits=Limits.of(settings), prices=settings.prices
        )
        try:
            await store.open()
        except (SQLiteFileInUse, SchemaError) as exc:
            log.error("%s", exc)
            raise
        client = new_upstream_client(settings)
        app.state.settings, app.state.store = settings, store
        app.state.openapi = openapi_document(settings)
        app.state.toolbox = toolbox = Toolbox(settings, metrics)  # started below; never delays the start
        app.state.relay = relay = Relay(settings, store, client, toolbox)
        app.state.examiner = examiner = Examiner(settings)
        # uploads examined and stored at once: what an examination found (a document's text) waits in
        # memory for its write, so as many as the examiner's slots (bench/files.py measures the memory)
        app.state.finishing = asyncio.Semaphore(EXAMINATIONS)
        try:
            toolbox.start()
            await relay.open()
        except BaseException:
            try:
                await relay.shutdown(0)
                await toolbox.stop()
            finally:
                await examiner.close()
                await client.aclose()
                await store.close()
            raise
        drain_on_sigterm(relay, settings.shutdown_grace)
        logging.getLogger("uvicorn.access").addFilter(redact_access_tokens)
        collector = asyncio.create_task(collect_files(store, settings, metrics), name="chatsvc-file-collector")
        if own_process:
            gc.collect()
            gc.freeze()
        try:
            yield
        finally:
            collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await collector
            try:
                await relay.shutdown(settings.shutdown_grace)
            finally:
                try:
                    await toolbox.stop()  # bounded, never raises; the client and the store close all the same
                finally:
                    try:
                        await examiner.close()
                    finally:
                        await client.aclose()
                        await store.close()

    return run


def app_routes(settings: Settings) -> list[Route | Mount]:
    """Every route this configuration serves: the operations endpoints, the pages and the API."""
    api = "/api/v1"
    return [
        # the chat routes first: the router tries each route in turn (a regular expression each, 32
        # of them cost a chat 45 us), and no other route matches a path under /api/v1/chat/
        Route(f"{api}/chat/{{session_id}}", chat, methods=["POST"]),
        Route(f"{api}/chat/{{session_id}}/stream", chat_stream, methods=["POST"]),
        Route(f"{api}/chat/{{session_id}}/stream", channel, methods=["GET"]),
        Route(f"{api}/chat/{{session_id}}/stop", stop_answer, methods=["POST"]),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/openapi.json", openapi),
        *([Route("/metrics", prometheus_metrics, methods=["GET"])] if settings.metrics else []),
        *page_routes(settings),
        Route(f"{api}/models", list_models, methods=["GET"]),
        Route(f"{api}/context/conversations", list_conversations, methods=["GET"]),
        Route(f"{api}/context/conversations", create_conversation, methods=["POST"]),
        Route(f"{api}/context/conversations/import", import_conversation, methods=["POST"]),
        Route(f"{api}/context/conversations/{{session_id}}", get_conversation, methods=["GET"]),
        Route(f"{api}/context/conversations/{{session_id}}", update_conversation, methods=["PATCH"]),
        Route(f"{api}/context/conversations/{{session_id}}", delete_conversation, methods=["DELETE"]),
        Route(f"{api}/context/conversations/{{session_id}}/messages", list_messages, methods=["GET"]),
        Route(
            f"{api}/context/conversations/{{session_id}}/messages/{{message_id}}", delete_message, methods=["DELETE"]
        ),
        Route(f"{api}/context/conversations/{{session_id}}/fork", fork_conversation, methods=["POST"]),
        Route(f"{api}/context/conversations/{{session_id}}/export", export_conversation, methods=["GET"]),
        Route(f"{api}/context/conversations/{{session_id}}/context", clear_context, methods=["DELETE"]),
        Route(f"{api}/files", list_files, methods=["GET"]),
        Route(f"{api}/files", upload_file, methods=["POST"]),
        Route(f"{api}/files/{{file_id}}", get_file, methods=["GET"]),
        Route(f"{api}/files/{{file_id}}", delete_file, methods=["DELETE"]),
        Route(f"{api}/files/{{file_id}}/content", file_content, methods=["GET"]),
        Route(f"{api}/usage", usage_report, methods=["GET"]),
        Route(f"{api}/usage/limits", usage_limits, methods=["GET"]),
        # {user:path}: an owner may hold a '/'; '' (no CHATSVC_USER_HEADER) is /admin/users//limits
        Route(f"{api}/admin/users/{{user:path}}/limits", get_user_limits, methods=["GET"]),
        Route(f"{api}/admin/users/{{user:path}}/limits", put_user_limits, methods=["PUT"]),
        Route(f"{api}/admin/users/{{user:path}}/usage/reset", reset_user_usage, methods=["POST"]),
    ]


def app_middleware(settings: Settings, metrics: Metrics, routes: list[Route | Mount]) -> list[Middleware]:
    """The layers around the routes, outermost first."""
    # Only what is configured: each layer costs every request and every streamed event a call.
    cors = Middleware(
        JSONCORSMiddleware,
        allow_origins=list(settings.cors_origins),
        allow_methods=["GET", "POST", "PATCH", "PUT", "DELETE"],
        # Range and If-None-Match: a file's content read in parts, or revalidated; its headers read back
        allow_headers=["Authorization", "Content-Type", "Last-Event-ID", "X-Request-ID", "Range", "If-None-Match"],
        expose_headers=[
            "Retry-After",
            "X-Request-ID",
            "Content-Disposition",
            "Content-Range",
            "Content-Length",
            "Accept-Ranges",
            "ETag",
            "X-Next-Cursor",
        ],
        max_age=600,
    )
    return [
        Middleware(RequestID),  # outermost: every answer carries X-Request-ID, the CORS middleware's too
        *([Middleware(RequestMetrics, metrics=metrics, routes=routes)] if settings.metrics else []),
        *([cors] if settings.cors_origins else []),
        Middleware(HeaderLimit),
        *(
            [Middleware(TokenAuth, token=settings.api_token, admin_token=settings.admin_token)]
            if settings.api_token
            else []
        ),
    ]


def create_app(settings: Settings | None = None, own_process: bool = False) -> Starlette:
    """The service as an ASGI app. `own_process`: it is its process's one app, for the process's life
    (the chatsvc command): see app_lifespan."""
    settings = settings or Settings.from_env()
    metrics = Metrics()
    routes = app_routes(settings)
    app = Starlette(
        routes=routes,
        middleware=app_middleware(settings, metrics, routes),
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=app_lifespan(settings, metrics, own_process),
    )
    # A trailing slash is a 404 like any unknown path: Starlette's redirect would be built from the
    # request's Host header (and carry ?access_token= to whatever host that names).
    app.router.redirect_slashes = False
    return app


def __getattr__(name: str) -> Any:
    # `uvicorn chatsvc:app` builds the app on first access, so importing the module reads no settings.
    if name == "app":
        globals()["app"] = create_app()
        return globals()["app"]
    raise AttributeError(name)


# ── CLI: the chatsvc command, and the server it runs ───────────────────────────────────


_SECRET_QUERY = re.compile(r"([?&;][^=&#]*password=)([^&#]*)", re.IGNORECASE)  # password=, sslpassword=


def _split_userinfo(url: str) -> tuple[str, str, str]:
    """(scheme://, user info, the rest from its '@'): the user info runs to the LAST '@' (a password
    pasted with a raw '@', '/' or '?' in it still counts as one); a URL without an authority
    (sqlite:///path) has none."""
    scheme, sep, rest = url.partition("://")
    at = rest.rfind("@")
    if not sep or at < 0 or rest.startswith("/"):
        return scheme + sep, "", rest
    return scheme + sep, rest[:at], rest[at:]


def masked_url(url: str) -> str:
    """A URL as a message may show it: a password in it (its user info, or a `password=` /
    `sslpassword=` query value) replaced by ***."""
    start, userinfo, rest = _split_userinfo(_SECRET_QUERY.sub(r"\1***", url))
    if ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":***"
    return f"{start}{userinfo}{rest}"


def url_passwords(url: str) -> list[str]:
    """The password texts in a URL, raw and percent-decoded, with their pieces between the characters a
    URL parser splits at (its error may quote one; pieces under 3 characters are left), longest first."""
    _, userinfo, _ = _split_userinfo(_SECRET_QUERY.sub("", url))
    found = [m[2] for m in _SECRET_QUERY.finditer(url)] + ([userinfo.split(":", 1)[1]] if ":" in userinfo else [])
    texts = {t for raw in found for t in (raw, unquote_plus(raw)) if t}
    texts |= {piece for t in texts for piece in re.split(r"[/@:?#&%]", t) if len(piece) >= 3}
    return sorted(texts, key=len, reverse=True)


def scrubbed(text: str, url: str) -> str:
    """`text` (an error's words, which may quote the URL or part of it) without the URL's password."""
    for secret in url_passwords(url):
        text = text.replace(secret, "***")
    return text


SQLITE_URL_EXAMPLE = "sqlite+aiosqlite:///./chatsvc.db"
POSTGRES_URL_EXAMPLE = "postgresql://user:password@host:5432/chatsvc"


def database_url_problem(url: str) -> str | None:
    """What keeps DATABASE_URL from being used, before anything connects, as one sentence naming the
    setting, its value (its password masked), the cause and what to do; None when it looks usable.
    A SQLite file's folder is checked too: it must exist and be writable (the file, its -wal and
    -journal files and its .lock are made there)."""
    shown = f"DATABASE_URL={masked_url(url)!r}"
    parsed = DatabaseURL(url)
    if "://" not in url or not parsed.scheme:
        return (
            f"{shown} is not a database URL: set it to a SQLite file ({SQLITE_URL_EXAMPLE}) or a PostgreSQL"
            f" database ({POSTGRES_URL_EXAMPLE})."
        )
    if parsed.dialect not in ("sqlite", "postgresql", "postgres") or parsed.driver not in ("", "aiosqlite", "asyncpg"):
        return (
            f"{shown}: chatsvc does not support {parsed.scheme!r} databases, only SQLite ({SQLITE_URL_EXAMPLE})"
            f" and PostgreSQL ({POSTGRES_URL_EXAMPLE}): change DATABASE_URL."
        )
    if parsed.dialect != "sqlite":
        try:
            import asyncpg  # noqa: F401
        except ImportError:
            return (
                f"{shown} is a PostgreSQL database, but its driver (asyncpg) is not installed: install chatsvc"
                " with its postgres extra (pip install 'chatsvc[postgres]'), or use a SQLite DATABASE_URL."
            )
        return None
    database = parsed.database
    if not database or database == ":memory:":
        return None
    path = Path(database).absolute()
    folder = path.parent
    if not folder.is_dir():
        return (
            f"{shown}: the folder {folder} for its SQLite file does not exist: create it (mkdir -p {folder})"
            " or point DATABASE_URL at a file in a folder that does."
        )
    writable = os.access(folder, os.W_OK | os.X_OK) and (not path.exists() or os.access(path, os.R_OK | os.W_OK))
    if not writable:
        where = folder if not path.exists() or not os.access(folder, os.W_OK) else path
        if os.getuid() == 0:  # not a matter of owners: a read-only file system, or an immutable folder
            return (
                f"{shown}: {where} cannot be written (a read-only file system or folder), and SQLite writes the"
                " database and its journal there: make it writable, or point DATABASE_URL elsewhere."
            )
        return (
            f"{shown}: {where} is not writable by this process (uid {os.getuid()}), and SQLite writes the"
            f" database and its journal there: make it writable for uid {os.getuid()} (in a container,"
            f" `chown {os.getuid()}:{os.getgid()}` the host folder mounted there, or run the container"
            " with --user set to the folder's owner), or point DATABASE_URL elsewhere."
        )
    return None


def not_made_yet(url: str) -> bool:
    """A SQLite database whose file does not exist yet (the server makes it at its first start)."""
    path = Database(url).sqlite_path
    return bool(path) and not os.path.exists(path)


def port_problem(host: str, port: int) -> str | None:
    """The address the server is to listen on, tried before anything else starts: in use (another
    server), or not this machine's. A moment later another process may still take it; then uvicorn
    says so in its own words."""
    import socket

    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:  # PORT is a number from 0 to 65535 (Settings): this is HOST's
        return f"HOST={host!r} is not an address of this machine ({exc.strerror}): set HOST to 0.0.0.0 or 127.0.0.1."
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return (
                    f"PORT={port} on HOST={host!r} is already in use (another chatsvc or another server listens"
                    " there): stop that server, or set PORT to a free port."
                )
            return f"PORT={port} on HOST={host!r} cannot be listened on ({exc.strerror}): set HOST or PORT."
    return None


def local_base(settings: Settings, port: int) -> str:
    """http://host:port as a client on this machine reaches the server (0.0.0.0 / :: listen everywhere)."""
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


async def chatsvc_answers(settings: Settings) -> bool:
    """Whether a chatsvc answers at HOST / PORT (`chatsvc --check` beside its own server: `docker exec`)."""
    try:
        async with httpx.AsyncClient(timeout=2, trust_env=False) as client:
            reply = await client.get(f"{local_base(settings, settings.port)}/healthz")
        return reply.status_code == 200 and reply.json() == {"status": "ok"}
    except (httpx.HTTPError, ValueError, OSError):
        return False


def page_addresses(settings: Settings, port: int) -> list[str]:
    """Where a person opens the pages this configuration serves (for the start's log), on the port the
    server listens on (PORT, or the one PORT=0 gave it)."""
    base = local_base(settings, port)
    return [
        *([f"the playground at {base}/"] if settings.playground else []),
        *([f"the API docs at {base}/docs"] if settings.docs else []),
    ]


async def check(settings: Settings, upstream: bool) -> list[str]:
    """What keeps this configuration from working, as sentences; empty when all is well."""
    problems = []
    if not settings.dashscope_api_key:
        problems.append("DASHSCOPE_API_KEY is not set: chat requests would answer 503 not_configured.")
    # a PORT in use, as the start refuses it; unless a chatsvc answers there (the server this checks)
    if (problem := port_problem(settings.host, settings.port)) and not await chatsvc_answers(settings):
        problems.append(problem)
    if problem := database_url_problem(settings.database_url):
        problems.append(problem)
    elif not_made_yet(settings.database_url):
        pass  # nothing to open (and none made here): the server creates the file at its first start
    else:
        store = Store(settings.database_url)
        try:
            await asyncio.wait_for(store.open(upgrade=False), timeout=10)
            await store.db.ping()
        except Exception as exc:
            shown = masked_url(settings.database_url)
            said = scrubbed(f"{type(exc).__name__}: {exc}", settings.database_url)
            problems.append(f"The database at DATABASE_URL={shown!r} cannot be used: {said}")
        finally:
            with contextlib.suppress(Exception):
                await store.close()
    if settings.mcp_servers:
        problems += await check_tools(settings)
    if upstream and settings.dashscope_api_key:
        payload = {
            "model": settings.chat_model,
            "messages": [{"role": "user", "content": "ping"}],
            "stream": True,
            "max_tokens": 1,
            "stream_options": {"include_usage": True},
        }
        async with new_upstream_client(settings) as client:
            try:
                async for _ in stream_completion(client, settings, payload):
                    pass
            except UpstreamError as exc:
                problems.append(f"The model service at DASHSCOPE_BASE_URL did not answer a test call: {exc.detail}")
    return problems


async def check_tools(settings: Settings) -> list[str]:
    """Each MCP server connected to and its tools listed once (MCP_CONNECT_SECONDS at most)."""
    toolbox = Toolbox(settings, Metrics())
    toolbox.start()
    try:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(toolbox.tried(), MCP_CONNECT_SECONDS + 1)
        return [
            f"The MCP server '{s.name}' of CHATSVC_MCP_SERVERS could not be used: {s.error or 'no answer'}."
            for s in toolbox.servers.values()
            if not s.listed.is_set()
        ]
    finally:
        await toolbox.stop()


def main(argv: list[str] | None = None) -> int:
    """The `chatsvc` command: start the server (HOST / PORT / LOG_LEVEL), or check the configuration."""
    import argparse

    import uvicorn

    parser = argparse.ArgumentParser(
        prog="chatsvc",
        description=__doc__.strip().splitlines()[0],
        epilog=Settings.help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--check", action="store_true", help="check the configuration and the database (changing nothing), then exit"
    )
    parser.add_argument(
        "--check-upstream", action="store_true", help="also make one tiny model call with the key (costs a few tokens)"
    )
    parser.add_argument("--version", action="version", version=f"chatsvc {__version__}")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        settings = Settings.from_env()
    except (ValueError, KeyError) as exc:
        print(f"chatsvc: bad configuration: {exc}", file=sys.stderr)
        return 2
    if args.check or args.check_upstream:
        problems = asyncio.run(check(settings, upstream=args.check_upstream))
        for problem in problems:  # any sentence quoting an error: without the database's password
            print(f"chatsvc: {scrubbed(problem, settings.database_url)}", file=sys.stderr)
        if not problems:
            done = ["configuration", "database", *(["MCP servers"] if settings.mcp_servers else [])]
            checked = ", ".join(done) + (" and model service" if args.check_upstream else "")
            print(f"chatsvc: {checked} OK ({settings.dashscope_base_url}, model {settings.chat_model})")
        return 1 if problems else 0
    # Setup mistakes, each refused in one sentence before anything starts (exit 2: the configuration).
    for problem in (database_url_problem(settings.database_url), port_problem(settings.host, settings.port)):
        if problem:
            print(f"chatsvc: {problem}", file=sys.stderr)
            return 2
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(settings.log_level.upper())
    if not settings.dashscope_api_key:
        log.warning("DASHSCOPE_API_KEY is not set: chat requests answer 503 not_configured until it is set")
    raise_open_file_limit()
    # uvicorn re-raises SIGTERM/SIGINT once it has shut down; a no-op handler there makes a clean
    # shutdown exit 0, which is what container runtimes and supervisors expect.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    store = Store(settings.database_url)
    if store.db.sqlite_path:  # refused here in one sentence, before the server starts (the app takes it again)
        try:
            hold_sqlite_file(store.db.sqlite_path)
        except SQLiteFileInUse as exc:
            print(f"chatsvc: {scrubbed(str(exc), settings.database_url)}", file=sys.stderr)
            return 2
    try:  # a database this release cannot use is refused here in one sentence too; else it is upgraded now
        asyncio.run(open_and_close(store))
    except SchemaError as exc:
        print(f"chatsvc: {scrubbed(str(exc), settings.database_url)}", file=sys.stderr)
        return 2
    except Exception as exc:
        shown = masked_url(settings.database_url)
        said = scrubbed(f"{type(exc).__name__}: {exc}", settings.database_url)
        print(f"chatsvc: the database at DATABASE_URL={shown!r} cannot be used: {said}", file=sys.stderr)
        return 1
    config = uvicorn.Config(
        create_app(settings, own_process=True),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=5,  # after the drain (see drain_on_sigterm), what is left goes
        http=header_deadline(settings.read_timeout),
    )
    server = listening_server(config, settings)
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    return 0 if server.started else 3  # as uvicorn.run: 3, it did not start (uvicorn said why)


async def open_and_close(store: Store) -> None:
    try:
        await store.open()
    finally:
        await store.close()


def listening_server(config: Any, settings: Settings) -> Any:
    """uvicorn's server, which logs the pages' addresses once it listens: on the port it was given
    (PORT=0: any free one, which only then is known)."""
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            listeners = [sock for server in getattr(self, "servers", []) for sock in server.sockets or ()]
            if listeners and not self.should_exit:
                if addresses := page_addresses(settings, listeners[0].getsockname()[1]):
                    log.info("chatsvc %s: %s", __version__, ", ".join(addresses))

    return Server(config)


def header_deadline(seconds: float) -> Any:
    """uvicorn's HTTP protocol (httptools), with a deadline for a request's headers, which uvicorn
    does not set: a connection whose request has not finished its headers `seconds` after it began
    (or after the connection opened) is answered 408 and closed, so slow clients cannot hold the
    service's sockets. Between requests uvicorn's keep-alive timeout (5 s) applies."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    timeout = json.dumps(
        {
            "detail": f"The request headers did not arrive within {seconds:g} s (CHATSVC_READ_TIMEOUT).",
            "code": "request_timeout",
        }
    ).encode()
    expired = (
        b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(timeout), timeout)
    )

    class Protocol(HttpToolsProtocol):
        _deadline: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(seconds, self._expire)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self) -> None:
            if not self.transport.is_closing():
                self.transport.write(expired)
                self.transport.close()

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return Protocol


def raise_open_file_limit() -> None:
    """Every held stream costs two sockets (client and upstream): allow as many as the system does."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass


if __name__ == "__main__":
    sys.exit(main())
