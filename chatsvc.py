"""chatsvc: a chat-assistant backend that runs as a sidecar.

It keeps conversations in a database, builds the model context from history, calls
DashScope's OpenAI-compatible Chat Completions API (or any compatible server) and streams
answers over Server-Sent Events. The HTTP contract lives in CONTRACT.md.

The module reads top to bottom in the order data flows:
configuration -> store -> upstream client -> generations -> HTTP handlers -> app factory.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import os
import re
import signal
import sqlite3
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import anyio
import httpx2 as httpx
from databases import Database
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.config import Config
from starlette.datastructures import CommaSeparatedStrings
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Match, Route

__version__ = "0.1.0"
log = logging.getLogger("chatsvc")


# ── Configuration ──────────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class Settings:
    """Everything the service reads from its environment (or `.env`), read once at start."""

    dashscope_api_key: str | None = None
    dashscope_base_url: str = "https://dashscope.aliyuncs.com/compatible-mode/v1"
    chat_model: str = "qwen-plus"
    system_prompt: str = "You are a helpful assistant."
    database_url: str = "sqlite+aiosqlite:///./chatsvc.db"
    api_token: str | None = None
    user_header: str | None = None
    cors_origins: tuple[str, ...] = ()
    allowed_models: tuple[str, ...] = ()
    max_context_messages: int = 20
    max_context_tokens: int = 6000
    max_message_chars: int = 32000
    max_body_bytes: int = 262144
    upstream_connect_timeout: float = 10.0
    upstream_idle_timeout: float = 60.0
    upstream_total_timeout: float = 300.0
    upstream_retries: int = 2
    replay_seconds: float = 30.0
    checkpoint_seconds: float = 1.0
    heartbeat_seconds: float = 5.0
    ping_seconds: float = 15.0
    shutdown_grace: float = 10.0
    host: str = "0.0.0.0"
    port: int = 8000
    log_level: str = "info"

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, env_file: str | None = ".env") -> Settings:
        """Read settings with Starlette's Config: the environment wins over `.env`."""
        if env_file is not None and not os.path.isfile(env_file):
            env_file = None  # a missing .env is normal, not worth Config's warning
        c = Config(env_file, environ=os.environ if environ is None else environ)

        def csv(name: str) -> tuple[str, ...]:
            return tuple(s for s in c(name, cast=CommaSeparatedStrings, default="") if s)

        d = cls()
        return cls(
            dashscope_api_key=c("DASHSCOPE_API_KEY", default=None) or None,
            dashscope_base_url=c("DASHSCOPE_BASE_URL", default=d.dashscope_base_url).rstrip("/"),
            chat_model=c("CHAT_MODEL", default=d.chat_model),
            system_prompt=c("SYSTEM_PROMPT", default=d.system_prompt),
            database_url=c("DATABASE_URL", default=d.database_url),
            api_token=c("CHATSVC_API_TOKEN", default=None) or None,
            user_header=c("CHATSVC_USER_HEADER", default=None) or None,
            cors_origins=csv("CHATSVC_CORS_ORIGINS"),
            allowed_models=csv("CHATSVC_ALLOWED_MODELS"),
            max_context_messages=c("CHATSVC_MAX_CONTEXT_MESSAGES", cast=int, default=d.max_context_messages),
            max_context_tokens=c("CHATSVC_MAX_CONTEXT_TOKENS", cast=int, default=d.max_context_tokens),
            max_message_chars=c("CHATSVC_MAX_MESSAGE_CHARS", cast=int, default=d.max_message_chars),
            max_body_bytes=c("CHATSVC_MAX_BODY_BYTES", cast=int, default=d.max_body_bytes),
            upstream_connect_timeout=c(
                "CHATSVC_UPSTREAM_CONNECT_TIMEOUT", cast=float, default=d.upstream_connect_timeout
            ),
            upstream_idle_timeout=c("CHATSVC_UPSTREAM_IDLE_TIMEOUT", cast=float, default=d.upstream_idle_timeout),
            upstream_total_timeout=c("CHATSVC_UPSTREAM_TOTAL_TIMEOUT", cast=float, default=d.upstream_total_timeout),
            upstream_retries=c("CHATSVC_UPSTREAM_RETRIES", cast=int, default=d.upstream_retries),
            replay_seconds=c("CHATSVC_REPLAY_SECONDS", cast=float, default=d.replay_seconds),
            checkpoint_seconds=c("CHATSVC_CHECKPOINT_SECONDS", cast=float, default=d.checkpoint_seconds),
            heartbeat_seconds=c("CHATSVC_HEARTBEAT_SECONDS", cast=float, default=d.heartbeat_seconds),
            ping_seconds=c("CHATSVC_PING_SECONDS", cast=float, default=d.ping_seconds),
            shutdown_grace=c("CHATSVC_SHUTDOWN_GRACE", cast=float, default=d.shutdown_grace),
            host=c("HOST", default=d.host),
            port=c("PORT", cast=int, default=d.port),
            log_level=c("LOG_LEVEL", default=d.log_level).lower(),
        )

    @property
    def models(self) -> tuple[str, ...]:
        return (self.chat_model, *self.allowed_models)


# ── Errors (every non-2xx answer is {"detail", "code"}) ───────────────────────────────


class ApiError(Exception):
    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None, **extra: Any):
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers, self.extra = status, code, detail, headers, extra

    def response(self) -> JSONResponse:
        body = {"detail": self.detail, "code": self.code, **self.extra}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def invalid(detail: str) -> ApiError:
    return ApiError(422, "invalid_request", detail)


# ── Store: raw SQL through `databases` ─────────────────────────────────────────────────

STREAMING, COMPLETE, STOPPED, INTERRUPTED, FAILED = "streaming", "complete", "stopped", "interrupted", "failed"


def utcnow(seconds_ago: float = 0.0) -> str:
    """RFC 3339 UTC with milliseconds: sorts as text, portable across databases."""
    moment = datetime.now(timezone.utc) - timedelta(seconds=seconds_ago)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


_last_id_us = 0


def new_message_id() -> str:
    """A time-ordered id (microseconds, then randomness): sorting by id sorts by creation."""
    global _last_id_us
    _last_id_us = max(time.time_ns() // 1000, _last_id_us + 1)  # strictly increasing in-process
    return f"{_last_id_us:014x}{uuid.uuid4().hex[:10]}"


def data_file(in_checkout: str, in_wheel: str) -> Path:
    """A file shipped with the module: at its checkout path, or where the wheel installs it
    (next to chatsvc.py, with a chatsvc_ prefix; see pyproject.toml)."""
    here = Path(__file__).resolve().parent
    for path in (here / in_wheel, here / in_checkout):
        if path.is_file():
            return path
    raise FileNotFoundError(f"{in_checkout} not found next to {__file__}")


class _SQLiteConnection(sqlite3.Connection):
    """Connection factory: PRAGMAs are per connection, so they are set where it is opened."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for pragma in ("journal_mode=WAL", "busy_timeout=5000", "foreign_keys=ON", "synchronous=NORMAL"):
            self.execute(f"PRAGMA {pragma}")


def _violation(exc: BaseException) -> str | None:
    """'unique' / 'foreign_key' for a constraint violation from SQLite or PostgreSQL, else None."""
    text, kind = str(exc).lower(), type(exc).__name__
    if "unique" in text or "duplicate key" in text or kind == "UniqueViolationError":
        return "unique"
    if "foreign key" in text or kind == "ForeignKeyViolationError":
        return "foreign_key"
    return None


_CONVERSATION_SQL = """
SELECT c.session_id, c.title, c.system_prompt, c.model, c.context_start, c.created_at, c.updated_at,
       (SELECT COUNT(*) FROM messages m
         WHERE m.owner = c.owner AND m.session_id = c.session_id) AS message_count,
       (SELECT COUNT(*) FROM messages m
         WHERE m.owner = c.owner AND m.session_id = c.session_id AND m.id > c.context_start) AS context_message_count,
       EXISTS (SELECT 1 FROM messages m
                WHERE m.owner = c.owner AND m.session_id = c.session_id AND m.status = 'streaming') AS generating
  FROM conversations c
 WHERE c.owner = :owner"""

_MESSAGE_COLUMNS = (
    "id, role, content, reasoning_content, status, model, finish_reason, error_code, error_message,"
    " prompt_tokens, completion_tokens, total_tokens, last_seq, created_at"
)


class Store:
    """The conversation store. Every write is one atomic statement: SQLite cannot upgrade a read
    lock to a write lock under concurrency (busy_timeout does not apply), so no read-modify-write.
    Every query is scoped to an owner (CHATSVC_USER_HEADER's value, '' without it)."""

    def __init__(self, url: str):
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        options: dict[str, Any] = {"factory": _SQLiteConnection} if self.is_sqlite else {}
        self.db = Database(url, **options)
        self._conn: Any = None  # SQLite: the one long-lived `databases` connection
        self._raw: Any = None  # ... and its aiosqlite handle

    async def open(self) -> None:
        await self.db.connect()
        if self.is_sqlite:
            # One long-lived connection: `databases` otherwise opens a connection (and a thread)
            # per task, ~7 ms per chat instead of ~0.4 ms. Statements go to its aiosqlite handle
            # directly: one hop to its thread and no SQLAlchemy compile, about 4x cheaper a
            # statement than `databases`' query path, and 10x with hundreds in flight (which
            # `databases` serialises behind a lock). bench/store.py measures it.
            self._conn = self.db.connection()
            try:
                await self._conn.__aenter__()
            except Exception:
                self._conn = None
                await asyncio.sleep(0.1)  # aiosqlite's thread reports its stop on this loop: let it, before it closes
                raise
            self._raw = self._conn.raw_connection
            self._raw.row_factory = sqlite3.Row
        statements = []
        for statement in data_file("schema.sql", "chatsvc_schema.sql").read_text(encoding="utf-8").split(";"):
            lines = [ln for ln in statement.splitlines() if not ln.strip().startswith("--")]
            if "".join(lines).strip():
                statements.append("\n".join(lines))
        if self.is_sqlite:
            for statement in statements:
                await self._run(statement)
            return
        # Replicas start together: concurrent CREATE ... IF NOT EXISTS can still collide in
        # PostgreSQL's catalog, so one applies the schema at a time (a transaction-scoped lock).
        async with self.db.transaction():
            await self._run("SELECT pg_advisory_xact_lock(7468372)")
            for statement in statements:
                await self._run(statement)

    async def close(self) -> None:
        # aiosqlite's threads are not daemons: a connection left open keeps the process alive.
        if self._conn is not None:
            await self._conn.__aexit__(None, None, None)
            self._conn = self._raw = None
        await self.db.disconnect()

    async def _all(self, sql: str, values: dict[str, Any] | None = None) -> list[dict]:
        if self._raw is not None:  # SQLite takes the same `:name` parameters natively
            return [dict(row) for row in await self._raw.execute_fetchall(sql, values or {})]
        return [dict(row._mapping) for row in await self.db.fetch_all(sql, values)]

    async def _one(self, sql: str, values: dict[str, Any] | None = None) -> dict | None:
        rows = await self._all(sql, values)
        return rows[0] if rows else None

    async def _run(self, sql: str, values: dict[str, Any] | None = None) -> None:
        if self._raw is not None:
            await self._raw.execute_fetchall(sql, values or {})
        else:
            await self.db.execute(sql, values)

    async def ping(self) -> None:
        await self._one("SELECT 1 AS ok")

    async def recover_interrupted(self, stale_before: str) -> list[dict]:
        """Answers still `streaming` whose heartbeat (`updated_at`) is older than `stale_before`:
        the process producing them is gone. They become `interrupted`, keeping their text."""
        return await self._all(
            "UPDATE messages SET status = 'interrupted', error_code = 'interrupted',"
            " error_message = 'The service stopped before this answer was finished.', updated_at = :now"
            " WHERE status = 'streaming' AND updated_at < :stale RETURNING id, owner, session_id",
            {"now": utcnow(), "stale": stale_before},
        )

    async def streaming_answer(self, owner: str, session_id: str) -> str | None:
        row = await self._one(
            "SELECT id FROM messages WHERE owner = :owner AND session_id = :sid AND status = 'streaming'",
            {"owner": owner, "sid": session_id},
        )
        return row["id"] if row else None

    async def streaming(self, answer_ids: list[str]) -> set[str]:
        """Which of these answers are still `streaming`."""
        found: set[str] = set()
        for names, ids in _id_batches(answer_ids):
            rows = await self._all(f"SELECT id FROM messages WHERE status = 'streaming' AND id IN ({names})", ids)
            found.update(row["id"] for row in rows)
        return found

    async def heartbeat(self, answer_ids: list[str]) -> None:
        """This process is alive and still producing these answers."""
        for names, ids in _id_batches(answer_ids):
            await self._run(
                f"UPDATE messages SET updated_at = :now WHERE status = 'streaming' AND id IN ({names})",
                {**ids, "now": utcnow()},
            )

    # conversations

    async def conversation(self, owner: str, session_id: str) -> dict | None:
        row = await self._one(_CONVERSATION_SQL + " AND c.session_id = :sid", {"owner": owner, "sid": session_id})
        return row

    async def chat_context(self, owner: str, session_id: str, limit: int) -> tuple[dict | None, list[dict]]:
        """What a chat needs, in one read: the conversation's settings (None if it is new) and its
        newest `limit` messages since the context start, newest first. No counts, so its cost
        does not grow with history (bench/relay.py, scenario f)."""
        rows = await self._all(
            "SELECT c.system_prompt, c.model, m.role, m.content, m.status FROM conversations c"
            " LEFT JOIN messages m ON m.owner = c.owner AND m.session_id = c.session_id AND m.id > c.context_start"
            " WHERE c.owner = :owner AND c.session_id = :sid ORDER BY m.id DESC LIMIT :limit",
            {"owner": owner, "sid": session_id, "limit": limit},
        )
        return (rows[0] if rows else None), [row for row in rows if row["role"] is not None]

    async def conversations(self, owner: str, limit: int, after: tuple[str, str] | None) -> list[dict]:
        where, values = "", {"owner": owner, "limit": limit}
        if after:
            where = " AND (c.updated_at < :u OR (c.updated_at = :u AND c.session_id < :s))"
            values.update(u=after[0], s=after[1])
        rows = await self._all(
            _CONVERSATION_SQL + where + " ORDER BY c.updated_at DESC, c.session_id DESC LIMIT :limit", values
        )
        return rows

    async def create_conversation(
        self, owner: str, session_id: str, title: str | None, system_prompt: str | None, model: str | None
    ) -> bool:
        row = await self._one(
            "INSERT INTO conversations (owner, session_id, title, system_prompt, model, created_at, updated_at)"
            " VALUES (:owner, :sid, :title, :prompt, :model, :now, :now)"
            " ON CONFLICT (owner, session_id) DO NOTHING RETURNING session_id",
            {"owner": owner, "sid": session_id, "title": title, "prompt": system_prompt, "model": model,
             "now": utcnow()},
        )  # fmt: skip
        return row is not None

    async def update_conversation(self, owner: str, session_id: str, changes: dict[str, Any]) -> bool:
        sets = ", ".join(f"{column} = :{column}" for column in changes)  # columns come from a fixed list
        row = await self._one(
            f"UPDATE conversations SET {sets}, updated_at = :now"
            " WHERE owner = :owner AND session_id = :sid RETURNING session_id",
            {**changes, "owner": owner, "sid": session_id, "now": utcnow()},
        )
        return row is not None

    async def delete_conversation(self, owner: str, session_id: str) -> bool:
        row = await self._one(
            "DELETE FROM conversations WHERE owner = :owner AND session_id = :sid RETURNING session_id",
            {"owner": owner, "sid": session_id},
        )
        return row is not None

    async def clear_context(self, owner: str, session_id: str, purge: bool) -> bool:
        """Everything up to now leaves the model's context; `purge` deletes it instead of hiding it."""
        values = {"owner": owner, "sid": session_id, "marker": new_message_id()}
        row = await self._one(
            "UPDATE conversations SET context_start = :marker, updated_at = :now"
            " WHERE owner = :owner AND session_id = :sid RETURNING session_id",
            {**values, "now": utcnow()},
        )
        if row and purge:
            await self._run(
                "DELETE FROM messages WHERE owner = :owner AND session_id = :sid AND id <= :marker"
                " AND status != 'streaming'",
                values,
            )
        return row is not None

    # messages

    async def messages(self, owner: str, session_id: str, limit: int, before: str | None = None) -> list[dict]:
        """The newest `limit` messages (before a message id, if given), newest first."""
        values: dict[str, Any] = {"owner": owner, "sid": session_id, "limit": limit}
        where = ""
        if before is not None:
            where, values["before"] = " AND id < :before", before
        rows = await self._all(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE owner = :owner AND session_id = :sid{where}"
            " ORDER BY id DESC LIMIT :limit",
            values,
        )
        return rows

    async def message(self, owner: str, session_id: str, message_id: str) -> dict | None:
        row = await self._one(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE id = :id AND owner = :owner AND session_id = :sid",
            {"id": message_id, "owner": owner, "sid": session_id},
        )
        return row

    async def begin_turn(
        self, owner: str, session_id: str, user_id: str, text: str, answer_id: str, model: str
    ) -> None:
        """Store the user's message and claim the conversation's answer slot, in one statement.

        The partial unique index over `streaming` answers makes a second concurrent turn fail
        here, before anything of it is stored."""
        values = {"owner": owner, "sid": session_id, "now": utcnow()}
        await self._run(
            "INSERT INTO conversations (owner, session_id, title, created_at, updated_at)"
            " VALUES (:owner, :sid, :title, :now, :now)"
            " ON CONFLICT (owner, session_id) DO UPDATE SET updated_at = excluded.updated_at,"
            " title = COALESCE(conversations.title, excluded.title)",
            {**values, "title": text.strip().splitlines()[0][:60]},
        )
        try:
            await self._run(
                "INSERT INTO messages (id, owner, session_id, role, content, status, model, created_at, updated_at)"
                " VALUES (:uid, :owner, :sid, 'user', :text, 'complete', NULL, :now, :now),"
                " (:aid, :owner, :sid, 'assistant', '', 'streaming', :model, :now, :now)",
                {**values, "uid": user_id, "aid": answer_id, "text": text, "model": model},
            )
        except Exception as exc:
            kind = _violation(exc)
            if kind == "unique":
                raise busy(session_id) from None
            if kind == "foreign_key":  # deleted between the two statements
                raise not_found(session_id) from None
            raise

    async def checkpoint(self, answer_id: str, content: str, reasoning: str | None, seq: int) -> None:
        """The text so far: events 0 to seq - 1 of the answer's log carry exactly this."""
        await self._run(
            "UPDATE messages SET content = :c, reasoning_content = :r, last_seq = :seq, updated_at = :now"
            " WHERE id = :id AND status = 'streaming'",
            {"c": content, "r": reasoning, "seq": seq, "now": utcnow(), "id": answer_id},
        )

    async def finish_answer(self, answer_id: str, **fields: Any) -> None:
        """The answer's final state, written once, whatever ended it."""
        usage = fields.pop("usage", None) or {}
        values = {
            **fields,
            "prompt_tokens": usage.get("prompt_tokens"),
            "completion_tokens": usage.get("completion_tokens"),
            "total_tokens": usage.get("total_tokens"),
            "now": utcnow(),
            "id": answer_id,
        }
        await self._run(
            "UPDATE messages SET content = :content, reasoning_content = :reasoning_content, status = :status,"
            " finish_reason = :finish_reason, error_code = :error_code, error_message = :error_message,"
            " prompt_tokens = :prompt_tokens, completion_tokens = :completion_tokens,"
            " total_tokens = :total_tokens, last_seq = :last_seq, updated_at = :now WHERE id = :id",
            values,
        )


def _id_batches(ids: list[str]) -> Iterator[tuple[str, dict[str, str]]]:
    """`IN (...)` placeholders and their values, 500 ids at a time."""
    for start in range(0, len(ids), 500):
        values = {f"id{n}": value for n, value in enumerate(ids[start : start + 500])}
        yield ", ".join(":" + name for name in values), values


def busy(session_id: str) -> ApiError:
    return ApiError(
        409,
        "conversation_busy",
        f"An answer is already being generated in conversation '{session_id}'. "
        "Wait for it to finish, or stop it with POST /api/v1/chat/{session_id}/stop.",
    )


def not_found(session_id: str) -> ApiError:
    return ApiError(404, "not_found", f"No conversation with session_id '{session_id}'.")


# ── Context: what the model sees ───────────────────────────────────────────────────────


def estimate_tokens(text: str) -> int:
    """Conservative token estimate: a non-ASCII (e.g. CJK) character is about one token,
    ASCII text about four characters a token, plus a few tokens of per-message framing."""
    ascii_chars = len(text.encode("ascii", "ignore"))
    return (len(text) - ascii_chars) + (ascii_chars + 3) // 4 + 4


def build_context(
    system_prompt: str, history_newest_first: list[dict], message: str, max_messages: int, max_tokens: int
) -> list[dict[str, str]]:
    """System prompt, then the newest usable history within both budgets (in order), then the
    new message. Failed turns and empty answers are left out, with the question that led to them."""
    system_cost, message_cost = estimate_tokens(system_prompt), estimate_tokens(message)
    if system_cost >= max_tokens:
        raise ApiError(
            422,
            "context_too_long",
            f"The conversation's system prompt (about {system_cost} tokens) leaves no room in the"
            f" context budget ({max_tokens} tokens, CHATSVC_MAX_CONTEXT_TOKENS). Shorten the system prompt.",
        )
    budget = max_tokens - system_cost - message_cost
    if budget < 0:
        raise ApiError(
            422,
            "context_too_long",
            f"The message is too long for the model's context budget ({max_tokens} tokens, about "
            f"{message_cost} needed for the message alone). Shorten it.",
        )
    picked: list[dict[str, str]] = []
    skip_question = False
    for row in history_newest_first:
        if row["role"] == "assistant" and (row["status"] in (FAILED, STREAMING) or not row["content"]):
            skip_question = True  # drop the answer and the user message it answered
            continue
        if row["role"] == "user" and skip_question:
            skip_question = False
            continue
        if len(picked) >= max_messages:
            break
        cost = estimate_tokens(row["content"])
        if cost > budget:
            break
        budget -= cost
        picked.append({"role": row["role"], "content": row["content"]})
    picked.reverse()
    while picked and picked[0]["role"] != "user":  # the model expects a user turn first
        picked.pop(0)
    return [{"role": "system", "content": system_prompt}, *picked, {"role": "user", "content": message}]


# ── Upstream: DashScope's OpenAI-compatible streaming API ──────────────────────────────


class UpstreamError(Exception):
    """A failure of the model service, already mapped to the contract's status and code."""

    def __init__(self, status: int, code: str, detail: str, retryable: bool = False, retry_after: float | None = None):
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail
        self.retryable, self.retry_after = retryable, retry_after

    def api_error(self) -> ApiError:
        headers = {"Retry-After": str(max(1, round(self.retry_after)))} if self.retry_after else None
        return ApiError(self.status, self.code, self.detail, headers=headers)


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


def upstream_error(status: int, error: Any, retry_after: float | None = None) -> UpstreamError:
    """Map a DashScope error (HTTP status + `{"code", "message"}`) to the contract. Keyed on
    `code` and status, never on `type`."""
    error = error if isinstance(error, dict) else {}
    code = str(error.get("code") or "")
    said = str(error.get("message") or "").strip() or f"HTTP {status}"
    where = f"The model service answered {status}" + (f" ({code})" if code else "") + f": {said}"
    if code == "data_inspection_failed":
        return UpstreamError(
            422, "content_filtered", "The model service's content moderation rejected this conversation. " + where
        )
    if status == 400 and ("input length" in said or "context length" in said or "too long" in said):
        return UpstreamError(
            422, "context_too_long", "The conversation is longer than the model accepts; clear the context. " + where
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
            # comment lines (":...") and other fields are ignored
        return events


@dataclass
class Delta:
    """What one upstream chunk adds to the answer."""

    content: str = ""
    reasoning: str = ""
    finish_reason: str | None = None
    usage: dict | None = None


def parse_chunk(data: str) -> Delta:
    try:
        obj = json.loads(data)
    except ValueError:
        raise UpstreamError(502, "upstream_error", "The model service sent a stream event that is not JSON.") from None
    if not isinstance(obj, dict):
        raise UpstreamError(502, "upstream_error", "The model service sent a stream event that is not an object.")
    if "error" in obj:  # an error in place of a chunk, mid-stream
        error = obj["error"] if isinstance(obj["error"], dict) else {"message": str(obj["error"])}
        raise upstream_error(_CODE_STATUS.get(str(error.get("code")), 500), error)
    delta = Delta(usage=obj.get("usage") or None)
    for choice in obj.get("choices") or ():
        d = choice.get("delta") or {}
        delta.content += d.get("content") or ""
        delta.reasoning += d.get("reasoning_content") or ""
        delta.finish_reason = choice.get("finish_reason") or delta.finish_reason
    if "\\ud" in data or "\\uD" in data:  # an escaped surrogate: a lone one cannot be stored or sent as UTF-8
        delta.content = _LONE_SURROGATE.sub("\ufffd", delta.content)
        delta.reasoning = _LONE_SURROGATE.sub("\ufffd", delta.reasoning)
    return delta


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # json.loads joins valid pairs, so any left is alone


async def stream_completion(client: httpx.AsyncClient, settings: Settings, payload: dict) -> AsyncIterator[Delta]:
    """One streaming Chat Completions call. Yields deltas; raises UpstreamError for every failure."""
    # identity: the raw body is the event stream (no decoder layer per read; proxies may ignore it, see below)
    headers = {
        "Authorization": f"Bearer {settings.dashscope_api_key}",
        "Accept": "text/event-stream",
        "Accept-Encoding": "identity",
    }
    finished = False
    try:
        async with client.stream(
            "POST", settings.dashscope_base_url + "/chat/completions", json=payload, headers=headers
        ) as response:
            if response.status_code != 200:
                body = await response.aread()
                try:
                    error = json.loads(body).get("error")
                except (ValueError, AttributeError):
                    error = {"message": body[:200].decode("utf-8", "replace")}
                raise upstream_error(response.status_code, error, _retry_after(response.headers))
            decoder = SSEDecoder()
            chunks = response.aiter_bytes() if "content-encoding" in response.headers else response.aiter_raw()
            async for raw in chunks:
                events = decoder.feed(raw)
                for data in events:
                    if data == "[DONE]":
                        break
                    delta = parse_chunk(data)
                    finished = finished or delta.finish_reason is not None
                    yield delta
                else:
                    continue
                # [DONE]: the body's end follows at once. Read it, so that the connection goes back
                # to the pool; leaving it unread costs a new TCP (and TLS) handshake per answer.
                with anyio.move_on_after(1):
                    async for _ in chunks:
                        pass
                return
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
        raise UpstreamError(
            502,
            "upstream_error",
            f"The connection to the model service failed mid-answer ({type(exc).__name__}).",
            retryable=True,
        ) from None
    if not finished:  # closed without [DONE] and without a finish_reason: the answer is cut off
        raise UpstreamError(
            502, "upstream_error", "The model service closed the stream before the answer was complete.", retryable=True
        )


def new_upstream_client(settings: Settings) -> httpx.AsyncClient:
    """One shared client: connections are reused across answers, and bounded."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(settings.upstream_idle_timeout, connect=settings.upstream_connect_timeout),
        limits=httpx.Limits(max_connections=1000, max_keepalive_connections=100),
        trust_env=False,
    )


# ── Generations: the running answer, its event log, its readers ────────────────────────


def sse_event(event_id: str, payload: dict) -> bytes:
    """One SSE event, without an `event:` line (the seed client listens with onmessage)."""
    data = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"id: {event_id}\ndata: {data}\n\n".encode()


_json_string = json.encoder.encode_basestring  # what json.dumps(ensure_ascii=False) does to a str


def delta_event(event_id: str, type_: str, content: str) -> bytes:
    """sse_event(event_id, {"type": type_, "data": {"content": content}}), byte for byte, without
    json.dumps' dict walk: this is the one event per token."""
    return f'id: {event_id}\ndata: {{"type":"{type_}","data":{{"content":{_json_string(content)}}}}}\n\n'.encode()


FINAL = ("end", "error")
DELTA_CHARS = 1000  # a delta event's text, at most: even all escaped, it fits a notification


def backoff(attempt: int, retry_after: float | None) -> float:
    return retry_after if retry_after is not None else min(8.0, 0.5 * 2**attempt)


@dataclass
class Generation:
    """One answer being produced. It belongs to the server, not to a connection: readers
    (the POST that started it, any number of channel listeners) follow its event log from
    their own position and can never slow it down or make it lose events."""

    owner: str
    session_id: str
    message_id: str
    model: str
    started: float = field(default_factory=time.monotonic)
    log: list[bytes] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    status: str = STREAMING
    finish_reason: str | None = None
    usage: dict | None = None
    error: UpstreamError | None = None
    retries: int = 0
    delivered: bool = False  # a channel listener has received it (replay rule 3 of the contract)
    stop_reason: str | None = None  # why the task was cancelled: stopped / timeout / interrupted
    finishing: bool = False  # the final write has begun: cancelling now would lose it
    first_token_at: float | None = None
    request_id: str | None = None
    task: asyncio.Task | None = None  # None for a mirror of another replica's answer
    publish: Callable[[Generation, bytes, bool], None] | None = None  # to the other replicas
    pending: list[tuple[str, int, str]] | None = None  # a mirror catching up: the live tail meanwhile
    heard_at: float = 0.0  # a mirror: when its last notification came
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def remote(self) -> bool:
        return self.task is None

    @property
    def key(self) -> tuple[str, str]:
        return self.owner, self.session_id

    @property
    def full_text(self) -> str:
        return "".join(self.text)

    @property
    def full_reasoning(self) -> str | None:
        return "".join(self.reasoning) or None

    def emit(self, type_: str, data: dict) -> None:
        self.append(sse_event(f"{self.message_id}:{len(self.log)}", {"type": type_, "data": data}), type_ in FINAL)

    def emit_delta(self, type_: str, content: str) -> None:
        # Long deltas go out in pieces, each small enough for one PostgreSQL notification.
        for start in range(0, len(content), DELTA_CHARS):
            self.append(delta_event(f"{self.message_id}:{len(self.log)}", type_, content[start : start + DELTA_CHARS]))

    def append(self, event: bytes, final: bool = False) -> None:
        if self.publish is not None:
            self.publish(self, event, final)
        self.log.append(event)
        wake, self._wake = self._wake, asyncio.Event()
        wake.set()

    async def events(self, start: int = 0) -> AsyncIterator[bytes]:
        """The log from `start` on, live, as byte batches (everything already logged at once)."""
        position = start
        while True:
            wake = self._wake
            if position < len(self.log):
                end = len(self.log)
                batch = b"".join(self.log[position:end])
                position = end
                if batch:  # a caught-up mirror has empty places for events its catch-up event carries
                    yield batch
            elif self.done.is_set():
                return
            else:
                await wake.wait()

    def cancel(self, reason: str) -> None:
        if self.task is not None and not self.finishing and self.stop_reason is None:
            self.stop_reason = reason
            self.task.cancel()


# Replicas on one PostgreSQL database follow each other's answers through LISTEN/NOTIFY: each
# publishes its answers' events, and keeps a mirror (a Generation without a task) of the others',
# so the channel, Last-Event-ID and stop work on any replica. On SQLite there is one process.
CHANNEL = "chatsvc"
NOTIFY_BYTES = 7900  # PostgreSQL refuses notifications of 8000 bytes or more
SEP = "\x1f"  # between a notification's fields; JSON escapes it, session ids cannot hold it


class Bus:
    """This replica's end of the channel. One connection listens; one task publishes whatever is
    pending in one statement, so a burst of events costs one round trip. A notification is
    origin, kind, message id, seq, session id, event, owner; kinds: "e" an event, "f" an answer's
    final event, "s" a stop request. An empty event means "read it from the store" (too long, or
    the answer was interrupted by a replica that is gone)."""

    def __init__(self, store: Store, on_notification: Callable[..., None]):
        self.store, self.on_notification = store, on_notification
        self.origin = uuid.uuid4().hex[:12]
        self._pending: list[str] = []
        self._wake = asyncio.Event()
        self._connections: list[Any] = []  # [listening, publishing]
        self._task: asyncio.Task | None = None
        self._reconnecting: asyncio.Task | None = None

    async def open(self) -> None:
        self._connections = [await self._connect(), await self._connect()]  # held from `databases`' pool
        await self._listen()
        self._task = asyncio.create_task(self._publish_loop())

    async def _connect(self) -> Any:
        """A connection of the pool for the bus alone: `databases` gives each task its own."""

        async def acquire() -> Any:
            conn = self.store.db.connection()
            await conn.__aenter__()
            return conn

        return await asyncio.create_task(acquire())

    async def _listen(self) -> None:
        raw = self._connections[0].raw_connection
        await raw.add_listener(CHANNEL, self._received)
        raw.add_termination_listener(self._listener_lost)

    def _listener_lost(self, raw: Any) -> None:
        if self._task is not None and not self._task.done():
            log.warning("the connection listening to the other replicas was lost; reconnecting")
            self._reconnecting = asyncio.create_task(self._reconnect(0))

    async def _reconnect(self, index: int) -> None:
        """A lost connection (a database restart, a failover) is replaced, once a second, until it is.
        What the listener missed meanwhile, mirrors take from the store (gaps, and the heartbeat)."""
        with contextlib.suppress(Exception):
            await self._connections[index].__aexit__(None, None, None)
        while True:
            try:
                self._connections[index] = await self._connect()
                if index == 0:
                    await self._listen()
                log.info("reconnected to the other replicas")
                return
            except Exception as exc:
                log.warning("cannot reach the database for the other replicas yet (%s)", type(exc).__name__)
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
            with contextlib.suppress(Exception):
                await self._connections.pop().__aexit__(None, None, None)

    def publish(self, kind: str, message_id: str, seq: int | str, session_id: str, event: str, owner: str) -> None:
        note = SEP.join((self.origin, kind, message_id, str(seq), session_id, event, owner))
        if len(note.encode()) > NOTIFY_BYTES:
            note = SEP.join((self.origin, kind, message_id, str(seq), session_id, "", owner))
        self._pending.append(note)
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
                    break
                except Exception as exc:  # else mirrors see the gap at the next event and catch up from the store
                    log.warning("could not publish %d event(s) to the other replicas (%s)", len(batch), exc)
                    if attempt == 0:
                        await self._reconnect(1)

    def _received(self, conn: Any, pid: int, channel: str, note: str) -> None:
        origin, kind, message_id, seq, session_id, event, owner = note.split(SEP, 6)
        if origin != self.origin:
            self.on_notification(kind, message_id, int(seq) if seq else None, session_id, event, owner)


HEARTBEAT_MISSES = 3  # an answer whose heartbeat is this many intervals old has lost its process


class Generations:
    """This process's running answers (and, with replicas, mirrors of the others') and, for
    `replay_seconds` after they end, their logs."""

    def __init__(self, settings: Settings, store: Store, client: httpx.AsyncClient):
        self.settings, self.store, self.client = settings, store, client
        self.bus: Bus | None = None if store.is_sqlite else Bus(store, self._on_notification)
        self._tasks: set[asyncio.Task] = set()  # heartbeat, catch-ups: held until they end
        # Conversations are keyed by (owner, session_id).
        self.running: dict[tuple[str, str], Generation] = {}
        self.recent: dict[str, Generation] = {}  # by message_id, running or finished
        self.latest: dict[tuple[str, str], Generation] = {}  # the newest kept
        self._waiters: dict[tuple[str, str], set[asyncio.Future]] = {}  # channel listeners waiting
        self.draining = False  # shutting down: no new answers
        self.closed = False  # shut down: channel streams end

    async def open(self) -> None:
        if self.bus is not None:
            await self.bus.open()
        await self.recover()
        self._spawn(self._keep_alive())

    def start(self, owner: str, session_id: str, message_id: str, model: str, payload: dict) -> Generation:
        gen = Generation(owner, session_id, message_id, model)
        gen.task = asyncio.create_task(self._run(gen, payload), name=f"answer {message_id}")
        if self.bus is not None:
            gen.publish = self._publish
        gen.emit("start", {"session_id": session_id, "message_id": message_id, "model": model})
        self._register(gen)
        return gen

    def _register(self, gen: Generation) -> None:
        self.running[gen.key] = self.recent[gen.message_id] = self.latest[gen.key] = gen
        for waiter in self._waiters.pop(gen.key, ()):
            if not waiter.done():
                waiter.set_result(None)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ── heartbeat and recovery

    async def _keep_alive(self) -> None:
        """Every heartbeat: this process's answers are marked alive, and answers whose process is
        gone (no heartbeat for HEARTBEAT_MISSES intervals) become interrupted."""
        while True:
            await asyncio.sleep(self.settings.heartbeat_seconds)
            try:
                await self.recover()
                await self._check_mirrors()
            except Exception:
                log.warning("heartbeat failed", exc_info=True)

    async def _check_mirrors(self) -> None:
        """A mirror whose answer has ended in the store, though its final event never came (a lost
        notification, a lost listening connection), ends from the store."""
        quiet = time.monotonic() - self.settings.heartbeat_seconds  # not while its events still arrive
        mirrors = {
            gen.message_id: gen
            for gen in self.running.values()
            if gen.remote and gen.pending is None and gen.heard_at < quiet
        }
        if mirrors:
            still = await self.store.streaming(list(mirrors))
            for message_id, mirror in mirrors.items():
                if message_id not in still:
                    await self._end_from_store(mirror)

    async def recover(self) -> int:
        ids = [gen.message_id for gen in self.running.values() if not gen.remote]
        if ids:  # first our own, so that a late heartbeat never makes us interrupt them
            await self.store.heartbeat(ids)
        rows = await self.store.recover_interrupted(utcnow(HEARTBEAT_MISSES * self.settings.heartbeat_seconds))
        for row in rows:
            log.warning("answer %s lost its process (no heartbeat): stored as interrupted", row["id"])
            if self.bus is not None:  # the other replicas' mirrors end, and this one's, the same way
                self.bus.publish("f", row["id"], "", row["session_id"], "", row["owner"])
                self._on_notification("f", row["id"], None, row["session_id"], "", row["owner"])
        return len(rows)

    # ── mirrors of the other replicas' answers

    def _publish(self, gen: Generation, event: bytes, final: bool) -> None:
        assert self.bus is not None
        self.bus.publish("f" if final else "e", gen.message_id, len(gen.log), gen.session_id, event.decode(),
                         gen.owner)  # fmt: skip

    def _on_notification(self, kind: str, message_id: str, seq: int | None, session_id: str, event: str,
                         owner: str) -> None:  # fmt: skip
        if kind == "s":  # stop, sent to another replica
            gen = self.running.get((owner, session_id))
            if gen is not None and not gen.remote:
                gen.cancel(STOPPED)
            return
        mirror = self.recent.get(message_id)
        if mirror is None:
            if self.closed:
                return
            mirror = Generation(owner, session_id, message_id, model="")
            self._register(mirror)
        if mirror.remote and not mirror.done.is_set():
            mirror.heard_at = time.monotonic()
            self._mirror_event(mirror, kind, seq, event)

    def _mirror_event(self, mirror: Generation, kind: str, seq: int | None, event: str) -> None:
        if mirror.pending is not None:  # catching up: keep the tail
            mirror.pending.append((kind, -1 if seq is None else seq, event))
        elif seq is not None and seq < len(mirror.log):
            pass  # had it
        elif seq == len(mirror.log) and event:
            mirror.append(event.encode())
            if kind == "f":
                self._end_mirror(mirror)
        elif kind == "f" and seq is None:  # interrupted by a replica's recovery: the store has its end
            self._spawn(self._end_from_store(mirror))
        else:  # a gap (joined mid-answer, or notifications lost) or an event too long to notify
            mirror.pending = [(kind, -1 if seq is None else seq, event)]
            self._spawn(self._catch_up(mirror))

    async def _catch_up(self, mirror: Generation) -> None:
        """Fill a mirror's gap from the stored checkpoint, then go on with the live tail: the
        checkpoint says which events its text covers, so nothing is sent twice or left out."""
        assert mirror.pending is not None
        for _ in range(20):
            row = await self.store.message(mirror.owner, mirror.session_id, mirror.message_id)
            if row is None or row["status"] != STREAMING:
                mirror.pending = None
                await self._end_from_store(mirror, row)
                return
            covered = row["last_seq"] or 0
            tail = [item for item in mirror.pending if item[1] >= 0]
            if covered >= len(mirror.log) and (not tail or covered >= tail[0][1]):
                self._fill(mirror, row, covered)
                pending, mirror.pending = mirror.pending, None
                for kind, seq, event in pending:
                    self._mirror_event(mirror, kind, None if seq < 0 else seq, event)
                return
            await asyncio.sleep(self.settings.checkpoint_seconds / 2)  # the next checkpoint will cover it
        log.warning("answer %s: no checkpoint covers the gap; its mirror ends here", mirror.message_id)
        mirror.pending = None
        await self._end_from_store(mirror)

    def _fill(self, mirror: Generation, row: dict, covered: int) -> None:
        """Events len(log)..covered-1 as empty places plus one event with the text they carried."""
        if not mirror.log:
            mirror.model = row["model"] or ""
            data = {"session_id": mirror.session_id, "message_id": mirror.message_id, "model": mirror.model}
            mirror.append(sse_event(f"{mirror.message_id}:0", {"type": "start", "data": data}))
        if covered <= len(mirror.log):
            return
        had_text, had_reasoning = [], []
        for event in mirror.log:
            if b'"type":"chunk"' in event or b'"type":"reasoning"' in event:
                payload = json.loads(event[event.index(b"data: ") + 6 :])
                (had_text if payload["type"] == "chunk" else had_reasoning).append(payload["data"]["content"])
        event_id = f"{mirror.message_id}:{covered - 1}"
        missing = b""
        if reasoning := (row["reasoning_content"] or "")[len("".join(had_reasoning)) :]:
            missing += delta_event(event_id, "reasoning", reasoning)
        if text := (row["content"] or "")[len("".join(had_text)) :]:
            missing += delta_event(event_id, "chunk", text)
        mirror.log.extend([b""] * (covered - 1 - len(mirror.log)))
        mirror.append(missing)

    async def _end_from_store(self, mirror: Generation, row: dict | None = None) -> None:
        row = row or await self.store.message(mirror.owner, mirror.session_id, mirror.message_id)
        if row is not None and row["status"] != STREAMING and not mirror.done.is_set():
            mirror.append(stored_final_event(row))
        self._end_mirror(mirror)

    def _end_mirror(self, mirror: Generation) -> None:
        if mirror.done.is_set():
            return
        final = mirror.log[-1] if mirror.log else b""
        stopped = b'"finish_reason":"stopped"' in final
        mirror.status = STOPPED if stopped else COMPLETE if b'"type":"end"' in final else INTERRUPTED
        mirror.done.set()
        if self.running.get(mirror.key) is mirror:
            del self.running[mirror.key]
        asyncio.get_running_loop().call_later(self.settings.replay_seconds, self._forget, mirror)

    async def next_after(self, key: tuple[str, str], previous: Generation | None) -> Generation | None:
        """Wait for an answer in this conversation newer than `previous` (None once shut down)."""
        while not self.closed:
            gen = self.latest.get(key)
            if gen is not None and gen is not previous and (previous is None or gen.started >= previous.started):
                return gen
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

    async def stop(self, key: tuple[str, str]) -> tuple[str | None, bool]:
        """Stop the conversation's running answer: (its message id, whether this stopped it).
        Returns once it is stored and its readers got `end`. Another replica's answer is asked
        to stop, and awaited for up to 10 s."""
        gen = self.running.get(key)
        if gen is None:
            return await self._stop_elsewhere(key) if self.bus is not None else (None, False)
        if gen.remote:
            self._ask_to_stop(key)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(gen.done.wait()), 10)
        else:
            gen.cancel(STOPPED)
            await gen.done.wait()
        return gen.message_id, gen.status == STOPPED

    def _ask_to_stop(self, key: tuple[str, str]) -> None:
        assert self.bus is not None
        self.bus.publish("s", "", "", key[1], "", key[0])

    async def _stop_elsewhere(self, key: tuple[str, str]) -> tuple[str | None, bool]:
        """An answer this replica has not heard of (it started before this replica did, and has
        sent nothing since): the database knows it; its replica is asked to stop it."""
        await self.recover()  # one whose replica is gone is interrupted now, not asked
        answer_id = await self.store.streaming_answer(*key)
        if answer_id is None:
            return None, False
        self._ask_to_stop(key)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            row = await self.store.message(*key, answer_id)
            if row is None or row["status"] != STREAMING:
                return answer_id, row is not None and row["status"] == STOPPED
        return answer_id, False

    async def shutdown(self, grace: float) -> None:
        """Refuse new answers, give running ones `grace` seconds, store the rest as interrupted
        (their readers get an `error` event), then end every channel stream."""
        self.draining = True
        running = [asyncio.ensure_future(g.done.wait()) for g in self.running.values() if not g.remote]
        if running:
            await asyncio.wait(running, timeout=grace) if grace > 0 else None
            for gen in list(self.running.values()):
                if not gen.remote:
                    gen.cancel(INTERRUPTED)
            await asyncio.gather(*running)
        self.closed = True
        for task in list(self._tasks):
            task.cancel()
        for gen in list(self.running.values()):  # mirrors: their listeners reconnect to another replica
            gen.done.set()
        if self.bus is not None:
            await self.bus.close()
        for waiters in self._waiters.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def _run(self, gen: Generation, payload: dict) -> None:
        s = self.settings
        deadline = asyncio.get_running_loop().call_later(s.upstream_total_timeout, gen.cancel, "timeout")
        saved_at = time.monotonic()
        try:
            for attempt in range(s.upstream_retries + 1):
                try:
                    async for delta in stream_completion(self.client, s, payload):
                        if gen.first_token_at is None and (delta.content or delta.reasoning):
                            gen.first_token_at = time.monotonic()
                        if delta.reasoning:
                            gen.reasoning.append(delta.reasoning)
                            gen.emit_delta("reasoning", delta.reasoning)
                        if delta.content:
                            gen.text.append(delta.content)
                            gen.emit_delta("chunk", delta.content)
                        gen.finish_reason = delta.finish_reason or gen.finish_reason
                        gen.usage = delta.usage or gen.usage
                        now = time.monotonic()
                        if now - saved_at >= s.checkpoint_seconds:
                            saved_at = now
                            await self._checkpoint(gen)
                    break
                except UpstreamError as exc:
                    # Retry only while nothing has reached a reader.
                    if gen.text or gen.reasoning or not exc.retryable or attempt == s.upstream_retries:
                        raise
                    gen.retries += 1
                    await asyncio.sleep(backoff(attempt, exc.retry_after))
            gen.status = COMPLETE
        except UpstreamError as exc:
            gen.status, gen.error = FAILED, exc
        except asyncio.CancelledError:
            if gen.stop_reason == "timeout":
                gen.status, gen.error = (
                    FAILED,
                    UpstreamError(
                        504,
                        "upstream_timeout",
                        f"The model service did not finish the answer within {s.upstream_total_timeout:g} s.",
                    ),
                )
            elif gen.stop_reason == STOPPED:
                gen.status, gen.finish_reason = STOPPED, STOPPED
            else:
                gen.status = INTERRUPTED
                gen.error = UpstreamError(503, "interrupted", "The service stopped before this answer was finished.")
        except Exception:
            log.exception("answer %s failed", gen.message_id)
            gen.status, gen.error = FAILED, UpstreamError(502, "upstream_error", "The answer failed unexpectedly.")
        finally:
            deadline.cancel()
            gen.finishing = True
            await asyncio.shield(self._finish(gen))

    async def _checkpoint(self, gen: Generation) -> None:
        try:
            await self.store.checkpoint(gen.message_id, gen.full_text, gen.full_reasoning, len(gen.log))
        except Exception:  # a missed checkpoint must not end the answer; the final write follows
            log.warning("checkpoint of answer %s failed", gen.message_id, exc_info=True)

    async def _finish(self, gen: Generation) -> None:
        """Store the answer's final state, then tell the readers: a reload after `end` shows it."""
        error = gen.error
        last_seq = len(gen.log)
        try:
            await self.store.finish_answer(
                gen.message_id,
                content=gen.full_text,
                reasoning_content=gen.full_reasoning,
                status=gen.status,
                finish_reason=gen.finish_reason,
                usage=gen.usage,
                error_code=error.code if error else None,
                error_message=error.detail if error else None,
                last_seq=last_seq,
            )
        except Exception:
            log.exception("could not store the end of answer %s", gen.message_id)
        gen.emit(
            *final_event(
                gen.message_id,
                gen.status,
                gen.full_text,
                gen.finish_reason,
                gen.usage,
                error.code if error else None,
                error.detail if error else None,
            )
        )
        gen.done.set()
        if self.running.get(gen.key) is gen:
            del self.running[gen.key]
        usage = gen.usage or {}
        ttft = f"{(gen.first_token_at - gen.started) * 1000:.1f}" if gen.first_token_at else "-"
        log.info(
            "answer session=%s message=%s request_id=%s model=%s status=%s code=%s ttft_ms=%s duration_ms=%.1f"
            " prompt_tokens=%s completion_tokens=%s retries=%d",
            gen.session_id, gen.message_id, gen.request_id or "-", gen.model, gen.status,
            error.code if error else "-", ttft, (time.monotonic() - gen.started) * 1000,
            usage.get("prompt_tokens", "-"), usage.get("completion_tokens", "-"), gen.retries,
        )  # fmt: skip
        asyncio.get_running_loop().call_later(self.settings.replay_seconds, self._forget, gen)

    def _forget(self, gen: Generation) -> None:
        self.recent.pop(gen.message_id, None)
        if self.latest.get(gen.key) is gen:
            del self.latest[gen.key]


def final_event(
    message_id: str,
    status: str,
    text: str,
    finish_reason: str | None,
    usage: dict | None,
    error_code: str | None,
    error_message: str | None,
) -> tuple[str, dict]:
    """The `end` or `error` event that closes an answer (also rebuilt from a stored message)."""
    if status in (COMPLETE, STOPPED):
        return "end", {
            "full_text": text,
            "message_id": message_id,
            "finish_reason": finish_reason or ("stopped" if status == STOPPED else "stop"),
            "usage": usage,
        }
    return "error", {
        "message": error_message or "The answer failed.",
        "code": error_code or "upstream_error",
        "message_id": message_id,
        "partial_text": text,
    }


# ── HTTP: request parsing and validation ───────────────────────────────────────────────

# "." and ".." are excluded: browsers and proxies normalise them out of URLs.
SESSION_ID = re.compile(r"(?!\.+$)[A-Za-z0-9._-]{1,128}")
_SESSION_ID_RULE = "1 to 128 characters of A-Z, a-z, 0-9, '.', '_' and '-' (not only dots)"


def check_session_id(value: Any) -> str:
    if not isinstance(value, str) or not SESSION_ID.fullmatch(value):
        raise invalid(f"session_id must be {_SESSION_ID_RULE}.")
    return value


async def read_json(request: Request, limit: int, optional: bool = False) -> dict:
    """The body as a JSON object; 413 past `limit` bytes (counted, not trusted from headers)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    body = bytearray()
    try:
        async for piece in request.stream():
            body += piece
            if len(body) > limit:
                raise too_large(limit)
    except ClientDisconnect:  # nobody is left to answer; not a server error
        raise ApiError(400, "client_disconnected", "The connection closed before the body was complete.") from None
    if not body and optional:  # no body at all; whitespace is not JSON
        return {}
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "invalid_json", "The request body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_json", "The request body must be a JSON object.")
    return data


def too_large(limit: int) -> ApiError:
    return ApiError(413, "payload_too_large", f"The request body is larger than {limit} bytes.")


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
    if not isinstance(value, str) or value not in settings.models:
        raise invalid(
            f"Unknown model {json.dumps(value, ensure_ascii=False)}. Available: {', '.join(settings.models)}."
        )
    return value


def query_int(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not re.fullmatch(r"\d{1,9}", raw) or not low <= int(raw) <= high:
        raise invalid(f"'{name}' must be a whole number from {low} to {high}.")
    return int(raw)


@dataclass
class ChatRequest:
    message: str
    model: str | None
    options: dict[str, Any]


def parse_chat(settings: Settings, body: dict) -> ChatRequest:
    check_fields(body, ("message", "model", "temperature", "top_p", "max_tokens", "enable_thinking"))
    message = body.get("message")
    if not isinstance(message, str):
        raise invalid("'message' is required and must be a string.")
    if not message.strip():
        raise invalid("'message' must not be blank.")
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
    if max_tokens is not None and (type(max_tokens) is not int or max_tokens < 1):
        raise invalid("'max_tokens' must be a whole number of at least 1.")
    if options["enable_thinking"] is not None and not isinstance(options["enable_thinking"], bool):
        raise invalid("'enable_thinking' must be true or false.")
    return ChatRequest(
        message, check_model(settings, body.get("model")), {k: v for k, v in options.items() if v is not None}
    )


# ── HTTP: presenting rows ──────────────────────────────────────────────────────────────


def present_conversation(settings: Settings, row: dict) -> dict:
    return {
        "session_id": row["session_id"],
        "title": row["title"],
        "system_prompt": row["system_prompt"],
        "model": row["model"] or settings.chat_model,
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
        "message_count": int(row["message_count"]),
        "context_message_count": int(row["context_message_count"]),
        "generating": bool(row["generating"]),
    }


def row_usage(row: dict) -> dict | None:
    if row["total_tokens"] is None and row["prompt_tokens"] is None:
        return None
    return {k: row[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")}


def present_message(row: dict, context_start: str) -> dict:
    usage = row_usage(row)
    return {
        "id": row["id"],
        "role": row["role"],
        "content": row["content"],
        "reasoning_content": row["reasoning_content"],
        "status": row["status"],
        "in_context": row["id"] > context_start,
        "model": row["model"],
        "finish_reason": row["finish_reason"],
        "error": {"code": row["error_code"], "message": row["error_message"]} if row["error_code"] else None,
        "usage": usage,
        "created_at": row["created_at"],
    }


def encode_cursor(*parts: str) -> str:
    return base64.urlsafe_b64encode("\n".join(parts).encode()).decode().rstrip("=")


MESSAGE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def decode_cursor(cursor: str, parts: int) -> list[str]:
    try:
        values = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode().split("\n")
    except (ValueError, UnicodeDecodeError):
        values = []
    if len(values) != parts or any("\x00" in value for value in values):  # PostgreSQL refuses NUL in text
        raise invalid("'cursor' is not a cursor this service returned.")
    return values


# ── HTTP: handlers ─────────────────────────────────────────────────────────────────────


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
        raise ApiError(
            401, "unauthorized", f"This service needs the {header} header to know whose conversations to use."
        )
    if len(owner) > 256:
        raise invalid(f"The {header} header is longer than 256 characters.")
    return owner


def conversation_key(request: Request) -> tuple[str, str]:
    """(owner, session_id) of the conversation a route's path names."""
    return owner_of(request), check_session_id(request.path_params["session_id"])


def refuse_while_draining(request: Request) -> None:
    if state(request).generations.draining:
        raise ApiError(503, "shutting_down", "chatsvc is shutting down; try again in a moment.",
                       headers={"Retry-After": "1"})  # fmt: skip


def openapi_document(settings: Settings) -> bytes:
    """docs/openapi.json, with the models this configuration accepts filled in."""
    doc = json.loads(data_file("docs/openapi.json", "chatsvc_openapi.json").read_bytes())
    schemas = doc["components"]["schemas"]
    for name in ("ChatRequest", "ConversationCreate", "ConversationPatch"):
        schemas[name]["properties"]["model"]["enum"] = [*settings.models, None]
    return json.dumps(doc, ensure_ascii=False).encode()


async def openapi(request: Request) -> Response:
    return Response(state(request).openapi, media_type="application/json")


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    if state(request).generations.draining:  # load balancers stop sending new work here
        body = {"status": "draining", "detail": "chatsvc is shutting down.", "code": "shutting_down"}
        return JSONResponse(body, status_code=503)
    try:
        await asyncio.wait_for(state(request).store.ping(), timeout=2)
    except Exception as exc:
        detail = f"The database does not answer ({type(exc).__name__})."
        return JSONResponse(
            {"status": "unavailable", "detail": detail, "code": "database_unavailable"}, status_code=503
        )
    return JSONResponse({"status": "ready"})


async def conversation_or_404(request: Request, key: tuple[str, str]) -> dict:
    row = await state(request).store.conversation(*key)
    if row is None:
        raise not_found(key[1])
    return row


async def list_conversations(request: Request) -> Response:
    st = state(request)
    owner = owner_of(request)
    limit = query_int(request, "limit", 50, 1, 200)
    cursor = request.query_params.get("cursor")
    after = tuple(decode_cursor(cursor, 2)) if cursor else None
    rows = await st.store.conversations(owner, limit + 1, after)
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = encode_cursor(rows[-1]["updated_at"], rows[-1]["session_id"]) if more else None
    return JSONResponse(
        {"conversations": [present_conversation(st.settings, r) for r in rows], "next_cursor": next_cursor}
    )


async def create_conversation(request: Request) -> Response:
    st = state(request)
    owner = owner_of(request)
    body = await read_json(request, st.settings.max_body_bytes, optional=True)
    check_fields(body, ("session_id", "title", "system_prompt", "model"))
    session_id = check_session_id(body["session_id"]) if body.get("session_id") is not None else str(uuid.uuid4())
    title = optional_text(body, "title", 200)
    prompt = optional_text(body, "system_prompt", st.settings.max_message_chars)
    model = check_model(st.settings, body.get("model"))
    if not await st.store.create_conversation(owner, session_id, title, prompt, model):
        raise ApiError(409, "conversation_exists", f"A conversation with session_id '{session_id}' already exists.")
    row = await conversation_or_404(request, (owner, session_id))
    return JSONResponse(present_conversation(st.settings, row), status_code=201)


async def get_conversation(request: Request) -> Response:
    st = state(request)
    key = conversation_key(request)
    limit = query_int(request, "limit", 50, 1, 500)
    row = await conversation_or_404(request, key)
    messages = await st.store.messages(*key, limit)
    body = present_conversation(st.settings, row)
    body["messages"] = [present_message(m, row["context_start"]) for m in reversed(messages)]
    return JSONResponse(body)


async def list_messages(request: Request) -> Response:
    st = state(request)
    key = conversation_key(request)
    limit = query_int(request, "limit", 50, 1, 500)
    before = request.query_params.get("before") or request.query_params.get("cursor")
    if before is not None and not MESSAGE_ID.fullmatch(before):
        raise invalid("'before' is not a message id this service returned.")
    row = await conversation_or_404(request, key)
    rows = await st.store.messages(*key, limit + 1, before)
    more = len(rows) > limit
    rows = rows[:limit]
    messages = [present_message(m, row["context_start"]) for m in reversed(rows)]
    return JSONResponse({"messages": messages, "next_cursor": rows[-1]["id"] if more else None})


async def update_conversation(request: Request) -> Response:
    st = state(request)
    key = conversation_key(request)
    body = await read_json(request, st.settings.max_body_bytes)
    check_fields(body, ("title", "system_prompt", "model"))
    changes: dict[str, Any] = {}
    if "title" in body:
        changes["title"] = optional_text(body, "title", 200)
    if "system_prompt" in body:
        changes["system_prompt"] = optional_text(body, "system_prompt", st.settings.max_message_chars)
    if "model" in body:
        changes["model"] = check_model(st.settings, body["model"])
    if changes and not await st.store.update_conversation(*key, changes):
        raise not_found(key[1])
    row = await conversation_or_404(request, key)
    return JSONResponse(present_conversation(st.settings, row))


async def delete_conversation(request: Request) -> Response:
    st = state(request)
    key = conversation_key(request)
    await st.generations.stop(key)  # its answer ends first, so nothing writes after the delete
    if not await st.store.delete_conversation(*key):
        raise not_found(key[1])
    return Response(status_code=204)


async def clear_context(request: Request) -> Response:
    st = state(request)
    key = conversation_key(request)
    purge = request.query_params.get("purge", "false").lower()
    if purge not in ("true", "false", "1", "0"):
        raise invalid("'purge' must be true or false.")
    if not await st.store.clear_context(*key, purge in ("true", "1")):
        raise not_found(key[1])
    row = await conversation_or_404(request, key)
    return JSONResponse(present_conversation(st.settings, row))


async def start_answer(request: Request) -> Generation:
    """Validate a chat request, store the user's message, and start the answer."""
    st = state(request)
    s: Settings = st.settings
    owner, session_id = conversation_key(request)
    refuse_while_draining(request)
    chat = parse_chat(s, await read_json(request, s.max_body_bytes))
    if not s.dashscope_api_key:
        raise ApiError(503, "not_configured", "No model service is configured: set DASHSCOPE_API_KEY.")
    running = st.generations.running.get((owner, session_id))
    if running is not None and not running.remote:  # known here; another replica's, the database decides
        raise busy(session_id)
    conversation, history = await st.store.chat_context(owner, session_id, 2 * s.max_context_messages + 2)
    model = chat.model or (conversation and conversation["model"]) or s.chat_model
    system_prompt = (conversation and conversation["system_prompt"]) or s.system_prompt
    messages = build_context(system_prompt, history, chat.message, s.max_context_messages, s.max_context_tokens)
    user_id, answer_id = new_message_id(), new_message_id()
    try:
        await st.store.begin_turn(owner, session_id, user_id, chat.message, answer_id, model)
    except ApiError as exc:  # busy: unless the answer holding it has lost its process just now
        if exc.code != "conversation_busy" or not await st.generations.recover():
            raise
        await st.store.begin_turn(owner, session_id, user_id, chat.message, answer_id, model)
    payload = {"model": model, "messages": messages, "stream": True, "stream_options": {"include_usage": True}}
    gen = st.generations.start(owner, session_id, answer_id, model, {**payload, **chat.options})
    gen.request_id = request.scope.get("request_id")
    return gen


async def chat(request: Request) -> Response:
    gen = await start_answer(request)
    await gen.done.wait()
    if gen.status in (FAILED, INTERRUPTED) and gen.error is not None:
        error = gen.error.api_error()
        error.extra.update(message_id=gen.message_id, partial_text=gen.full_text)
        raise error
    return JSONResponse(
        {"session_id": gen.session_id, "response": gen.full_text, "message_id": gen.message_id, "model": gen.model,
         "finish_reason": gen.finish_reason, "usage": gen.usage}
    )  # fmt: skip


RETRY = b"retry: 1000\n\n"  # once per connection: EventSource reconnects after 1 s


class _EventStream(EventSourceResponse):
    # sse-starlette wraps every send in a cancel scope for its `send_timeout`, which we leave unset
    # (a stalled reader cannot slow an answer: readers follow its log); per event that scope cost
    # more than the send itself (bench/relay.py).
    async def _send_with_timeout(self, send: Any, message: Any) -> None:
        await send(message)


def event_stream(request: Request, body: AsyncIterator[bytes]) -> EventSourceResponse:
    """An SSE response: pings keep proxies from closing it, and nothing may buffer or compress it."""
    return _EventStream(
        body,
        ping=state(request).settings.ping_seconds,
        sep="\n",
        ping_message_factory=lambda: ServerSentEvent(comment="ping", sep="\n"),
        headers={"Cache-Control": "no-store, no-transform"},
    )


async def chat_stream(request: Request) -> Response:
    gen = await start_answer(request)  # validation and busy errors are plain JSON, before the stream

    async def body() -> AsyncIterator[bytes]:
        yield RETRY
        async for batch in gen.events():
            yield batch

    return event_stream(request, body())


def parse_event_id(value: str | None) -> tuple[str, int] | None:
    message_id, _, seq = (value or "").rpartition(":")
    return (message_id, int(seq)) if MESSAGE_ID.fullmatch(message_id) and seq.isdigit() else None


async def channel(request: Request) -> Response:
    """The conversation's event channel for EventSource (CONTRACT.md, "GET .../stream")."""
    st = state(request)
    key = conversation_key(request)
    refuse_while_draining(request)
    last = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
    return event_stream(request, channel_events(st.generations, st.store, key, parse_event_id(last)))


# How long a fresh listener waits for a new answer before replaying an unseen finished one: the
# seed client opens its EventSource and sends its POST together, so a new answer may be on its way.
REPLAY_WAIT = 0.5


async def channel_events(
    gens: Generations, store: Store, key: tuple[str, str], resume: tuple[str, int] | None
) -> AsyncIterator[bytes]:
    yield RETRY
    previous = gens.latest.get(key)  # by default nothing that exists now is replayed
    gen, position = None, 0
    if resume is not None:  # 1. after the last event the client saw
        message_id, seq = resume
        gen = gens.recent.get(message_id)
        if gen is not None and gen.key == key:
            position = seq + 1
        else:
            gen = None
            row = await store.message(*key, message_id)
            if row and row["status"] != STREAMING:
                if row["last_seq"] is not None and seq < row["last_seq"]:  # its log is gone: send its end
                    yield stored_final_event(row)
                if previous is not None and previous.message_id > message_id:
                    previous = None  # a newer answer than the one named: deliver it whole
    elif key in gens.running:  # 2. the running answer, from its start
        gen = gens.running[key]
    elif (
        previous is not None
        and not previous.delivered
        and time.monotonic() - previous.started < (gens.settings.replay_seconds)
    ):  # 3. a finished answer nobody on the channel has seen, unless a new one starts now
        try:
            gen = await asyncio.wait_for(gens.next_after(key, previous), REPLAY_WAIT) or previous
        except asyncio.TimeoutError:
            gen = previous
    while True:  # 4. then every later answer, live
        if gen is None:
            gen, position = await gens.next_after(key, previous), 0
            if gen is None:  # the service is shutting down: EventSource reconnects elsewhere
                return
        gen.delivered = True
        async for batch in gen.events(position):
            yield batch
        previous, gen = gen, None


def stored_final_event(row: dict) -> bytes:
    type_, data = final_event(
        row["id"], row["status"], row["content"], row["finish_reason"], row_usage(row), row["error_code"],
        row["error_message"],
    )  # fmt: skip
    return sse_event(f"{row['id']}:{row['last_seq']}", {"type": type_, "data": data})


async def stop_answer(request: Request) -> Response:
    st = state(request)
    key = conversation_key(request)
    message_id, stopped = await st.generations.stop(key)
    if message_id is None:
        await conversation_or_404(request, key)
    return JSONResponse({"session_id": key[1], "stopped": stopped, "message_id": message_id})


# ── App factory ────────────────────────────────────────────────────────────────────────


async def api_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return exc.response()


async def http_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return ApiError(404, "not_found", f"There is no route {request.url.path}.").response()
    if exc.status_code == 405:  # Allow lists the methods of every route on this path, not just the first
        allowed = {m for r in request.app.routes if r.matches(request.scope)[0] != Match.NONE for m in r.methods or ()}
        detail = f"{request.method} is not allowed on {request.url.path}; use {', '.join(sorted(allowed))}."
        return ApiError(405, "method_not_allowed", detail, headers={"Allow": ", ".join(sorted(allowed))}).response()
    return ApiError(exc.status_code, "http_error", str(exc.detail), headers=exc.headers).response()


async def internal_error_handler(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return ApiError(500, "internal_error", "Something went wrong inside chatsvc; the error is in its log.").response()


MAX_HEADER_BYTES = 65536


class HeaderLimit:
    """431 for requests whose headers total over 64 KiB (uvicorn's httptools parser sets no bound)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and sum(len(k) + len(v) for k, v in scope["headers"]) > MAX_HEADER_BYTES:
            detail = f"The request headers are larger than {MAX_HEADER_BYTES} bytes."
            return await ApiError(431, "headers_too_large", detail).response()(scope, receive, send)
        await self.app(scope, receive, send)


_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")


class RequestID:
    """Echo the caller's X-Request-ID (or a new one) on the response, and keep it for the logs."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = next((v for k, v in scope["headers"] if k == b"x-request-id"), b"")
        request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex.encode()
        scope["request_id"] = request_id.decode()

        async def send_with_id(message: Any) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", request_id)]
            await send(message)

        await self.app(scope, receive, send_with_id)


class TokenAuth:
    """With CHATSVC_API_TOKEN set, every /api/ request must carry it (constant-time compare)."""

    def __init__(self, app: Any, token: str | None):
        self.app, self.token = app, token.encode() if token else None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if (
            self.token
            and scope["type"] == "http"
            and scope["path"].startswith("/api/")
            and scope["method"] != "OPTIONS"
            and not self._authorized(scope)
        ):
            response = ApiError(
                401,
                "unauthorized",
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
                return hmac.compare_digest(value[7:].strip(), self.token)
        query = Request(scope).query_params.get("access_token")
        return query is not None and hmac.compare_digest(query.encode(), self.token)


_ACCESS_TOKEN_IN_URL = re.compile(r"(access_token=)[^&\s]*")


def redact_access_tokens(record: logging.LogRecord) -> bool:
    """A logging filter: EventSource sends the API token in the query string; access logs must not show it."""
    if isinstance(record.args, tuple):
        record.args = tuple(
            _ACCESS_TOKEN_IN_URL.sub(r"\1[redacted]", a) if isinstance(a, str) else a for a in record.args
        )
    return True


def drain_on_sigterm(gens: Generations, grace: float) -> None:
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
        log.info("SIGTERM: draining %d running answer(s) for up to %g s", len(gens.running), grace)
        await gens.shutdown(grace)
        await asyncio.sleep(0.1)  # let the streams write their last events
        server_handler(signal.SIGTERM, None)

    def on_sigterm(sig: int, frame: Any) -> None:
        if gens.draining:
            server_handler(sig, frame)
        else:
            gens.draining = True
            loop.call_soon_threadsafe(lambda: drains.append(loop.create_task(drain())))

    signal.signal(signal.SIGTERM, on_sigterm)


def create_app(settings: Settings | None = None) -> Starlette:
    settings = settings or Settings.from_env()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        store = Store(settings.database_url)
        await store.open()
        client = new_upstream_client(settings)
        app.state.settings, app.state.store = settings, store
        app.state.openapi = openapi_document(settings)
        app.state.generations = Generations(settings, store, client)
        await app.state.generations.open()
        drain_on_sigterm(app.state.generations, settings.shutdown_grace)
        logging.getLogger("uvicorn.access").addFilter(redact_access_tokens)
        try:
            yield
        finally:
            await app.state.generations.shutdown(settings.shutdown_grace)
            await client.aclose()
            await store.close()

    api = "/api/v1"
    routes = [
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/openapi.json", openapi),
        Route(f"{api}/context/conversations", list_conversations, methods=["GET"]),
        Route(f"{api}/context/conversations", create_conversation, methods=["POST"]),
        Route(f"{api}/context/conversations/{{session_id}}", get_conversation, methods=["GET"]),
        Route(f"{api}/context/conversations/{{session_id}}", update_conversation, methods=["PATCH"]),
        Route(f"{api}/context/conversations/{{session_id}}", delete_conversation, methods=["DELETE"]),
        Route(f"{api}/context/conversations/{{session_id}}/messages", list_messages, methods=["GET"]),
        Route(f"{api}/context/conversations/{{session_id}}/context", clear_context, methods=["DELETE"]),
        Route(f"{api}/chat/{{session_id}}", chat, methods=["POST"]),
        Route(f"{api}/chat/{{session_id}}/stream", chat_stream, methods=["POST"]),
        Route(f"{api}/chat/{{session_id}}/stream", channel, methods=["GET"]),
        Route(f"{api}/chat/{{session_id}}/stop", stop_answer, methods=["POST"]),
    ]
    # Only what is configured: each layer costs every request and every streamed event a call.
    cors = Middleware(
        CORSMiddleware,
        allow_origins=list(settings.cors_origins),
        allow_methods=["GET", "POST", "PATCH", "DELETE"],
        allow_headers=["Authorization", "Content-Type", "Last-Event-ID", "X-Request-ID"],
        expose_headers=["Retry-After", "X-Request-ID"],
        max_age=600,
    )
    middleware = [
        *([cors] if settings.cors_origins else []),
        Middleware(RequestID),
        Middleware(HeaderLimit),
        *([Middleware(TokenAuth, token=settings.api_token)] if settings.api_token else []),
    ]
    handlers = {ApiError: api_error_handler, HTTPException: http_error_handler, Exception: internal_error_handler}
    return Starlette(routes=routes, middleware=middleware, exception_handlers=handlers, lifespan=lifespan)


CONFIGURATION_HELP = """\
configuration (environment variables, or a .env file in the working directory):
  DASHSCOPE_API_KEY                 the model service key (required to chat)
  DASHSCOPE_BASE_URL                https://dashscope.aliyuncs.com/compatible-mode/v1 (any OpenAI-compatible URL)
  CHAT_MODEL, CHATSVC_ALLOWED_MODELS  qwen-plus; further models clients may pick (comma-separated)
  SYSTEM_PROMPT                     You are a helpful assistant.
  DATABASE_URL                      sqlite+aiosqlite:///./chatsvc.db (or postgresql://...)
  CHATSVC_API_TOKEN                 bearer token required on /api/ (none)
  CHATSVC_USER_HEADER               header naming the user who owns conversations (none)
  CHATSVC_CORS_ORIGINS              browser origins allowed to call (none)
  CHATSVC_MAX_CONTEXT_MESSAGES / _TOKENS   20 / 6000
  CHATSVC_MAX_MESSAGE_CHARS / CHATSVC_MAX_BODY_BYTES   32000 / 262144
  CHATSVC_UPSTREAM_CONNECT_TIMEOUT / _IDLE_TIMEOUT / _TOTAL_TIMEOUT   10 / 60 / 300 s
  CHATSVC_UPSTREAM_RETRIES          2
  CHATSVC_REPLAY_SECONDS / CHATSVC_CHECKPOINT_SECONDS / CHATSVC_PING_SECONDS   30 / 1 / 15
  CHATSVC_HEARTBEAT_SECONDS         5: an answer whose process sent none for 3 of these is interrupted
  CHATSVC_SHUTDOWN_GRACE            10 s for running answers after SIGTERM
  HOST / PORT / LOG_LEVEL           0.0.0.0 / 8000 / info
"""


async def check(settings: Settings, upstream: bool) -> list[str]:
    """What keeps this configuration from working, as sentences; empty when all is well."""
    problems = []
    if not settings.dashscope_api_key:
        problems.append("DASHSCOPE_API_KEY is not set: chat requests would answer 503 not_configured.")
    store = Store(settings.database_url)
    try:
        await asyncio.wait_for(store.open(), timeout=10)
        await store.ping()
    except Exception as exc:
        problems.append(f"The database at DATABASE_URL cannot be used: {type(exc).__name__}: {exc}")
    finally:
        with contextlib.suppress(Exception):
            await store.close()
    if upstream and settings.dashscope_api_key:
        payload = {"model": settings.chat_model, "messages": [{"role": "user", "content": "ping"}], "stream": True,
                   "max_tokens": 1, "stream_options": {"include_usage": True}}  # fmt: skip
        async with new_upstream_client(settings) as client:
            try:
                async for _ in stream_completion(client, settings, payload):
                    pass
            except UpstreamError as exc:
                problems.append(f"The model service at DASHSCOPE_BASE_URL did not answer a test call: {exc.detail}")
    return problems


def main(argv: list[str] | None = None) -> int:
    """The `chatsvc` command: start the server (HOST / PORT / LOG_LEVEL), or check the configuration."""
    import argparse

    import uvicorn

    parser = argparse.ArgumentParser(
        prog="chatsvc", description=__doc__.strip().splitlines()[0], epilog=CONFIGURATION_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--check", action="store_true", help="check the configuration and the database, then exit")
    parser.add_argument("--check-upstream", action="store_true",
                        help="also make one tiny model call with the key (costs a few tokens)")  # fmt: skip
    parser.add_argument("--version", action="version", version=f"chatsvc {__version__}")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        settings = Settings.from_env()
    except (ValueError, KeyError) as exc:
        print(f"chatsvc: bad configuration: {exc}", file=sys.stderr)
        return 2
    if args.check or args.check_upstream:
        problems = asyncio.run(check(settings, upstream=args.check_upstream))
        for problem in problems:
            print(f"chatsvc: {problem}", file=sys.stderr)
        if not problems:
            checked = "configuration, database" + (" and model service" if args.check_upstream else "")
            print(f"chatsvc: {checked} OK ({settings.dashscope_base_url}, model {settings.chat_model})")
        return 1 if problems else 0
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(settings.log_level.upper())
    raise_open_file_limit()
    # uvicorn re-raises SIGTERM/SIGINT once it has shut down; a no-op handler there makes a clean
    # shutdown exit 0, which is what container runtimes and supervisors expect.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    uvicorn.run(
        create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level,
        timeout_graceful_shutdown=5,  # after the drain (see drain_on_sigterm), what is left goes
    )  # fmt: skip
    return 0


def raise_open_file_limit() -> None:
    """Every held stream costs two sockets (client and upstream): allow as many as the system does."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass


def __getattr__(name: str) -> Any:
    # `uvicorn chatsvc:app` builds the app on first access, so importing the module reads no settings.
    if name == "app":
        globals()["app"] = create_app()
        return globals()["app"]
    raise AttributeError(name)


if __name__ == "__main__":
    sys.exit(main())
