"""Limits that hold across replicas (issue 24): many clients race for the last answer of a budget, the
last slot of the concurrent answers, the last tokens of the answers-per-minute bucket, on two real
`chatsvc` processes sharing one PostgreSQL database (and on one process with SQLite), and a replica
killed mid-answer gives its reservation back through the other replica's sweep.

Each race releases all its clients at once (connected first, then written together) and splits them
across the replicas; the assertions are on counts and stored rows, never on timings beyond generous
waits. Without PostgreSQL the PostgreSQL tests skip (not under CI=true)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field

import pytest
from fake_dashscope import Reply
from procs import ServerProcess
from rawhttp import Response, sse_events
from support import EMPTY_POSTGRES, Service, pg, wait_for

API = "/api/v1"
USER = "X-Chat-User"
ADMIN = "tok-admin-races"
RACERS = 50
# the fake's default reply (tests/dashscope/stream_usage.sse) reports these
REPORTED = {"prompt_tokens": 22, "completion_tokens": 17, "total_tokens": 39}
# the budget races: 1000 tokens a day, 39 spent before. The answer admitted spends the rest and more
# (the budget is then spent whether the race is over or not: a client that comes late, once that answer
# has ended, finds no room either), and while it runs it holds its prompt's estimate and 4096
LIMIT = 1000
LAST = {"prompt_tokens": 22, "completion_tokens": 1000, "total_tokens": 1022}


def last_answer() -> Reply:
    return Reply.answer(["the ", "last ", "answer"], usage=LAST)


pytestmark = pytest.mark.slow


# ── the race: clients connected first, then released together ──────────────────────────


@dataclass
class Outcome:
    """What one racing client got: the status, the refusal's body and Retry-After, or the answer's events."""

    session_id: str
    status: int = 0
    body: dict = field(default_factory=dict)
    retry_after: str | None = None
    events: list[dict] = field(default_factory=list)


async def _send(port: int, path: str, body: dict, headers: dict, go: asyncio.Event) -> Response:
    """A POST on a connection opened before `go`, written once it is set (rawhttp's request, split)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = json.dumps(body).encode()
    lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close", f"Content-Length: {len(data)}",
             "Content-Type: application/json", *(f"{k}: {v}" for k, v in headers.items())]  # fmt: skip
    await go.wait()
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + data)
    status = int((await reader.readline()).split()[1])
    response_headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        response_headers[name.strip().lower()] = value.strip()
    return Response(status, response_headers, reader, writer)


def race(servers: list[ServerProcess], owner: str, tag: str, answered=None, n: int = RACERS) -> list[Outcome]:
    """`n` clients of `owner` each start an answer in a conversation of its own (`tag`-i), on the
    servers in turn, all released at once. Once every client has its status, `answered()` runs (a
    held answer is let go there); then the admitted answers are read to their end."""
    outcomes = [Outcome(f"{tag}-{i}") for i in range(n)]

    async def client(i: int, go: asyncio.Event, statuses: asyncio.Queue) -> None:
        outcome, server = outcomes[i], servers[i % len(servers)]
        path = f"{API}/chat/{outcome.session_id}/stream"
        response = await _send(server.port, path, {"message": f"race {i}"}, {USER: owner}, go)
        outcome.status, outcome.retry_after = response.status, response.headers.get("retry-after")
        try:
            if response.status != 200:
                outcome.body = await response.json()
                statuses.put_nowait(i)
                return
            statuses.put_nowait(i)
            async for event in sse_events(response):
                outcome.events.append(event)
                if event["type"] in ("end", "error"):
                    return
        finally:
            response.close()

    async def run() -> None:
        go, statuses = asyncio.Event(), asyncio.Queue()
        tasks = [asyncio.ensure_future(client(i, go, statuses)) for i in range(n)]
        await asyncio.sleep(0.5)  # every connection open and waiting
        go.set()
        for _ in range(n):
            await asyncio.wait_for(statuses.get(), 60)
        if answered is not None:
            await asyncio.to_thread(answered)
        await asyncio.wait_for(asyncio.gather(*tasks), 60)

    asyncio.run(run())
    return outcomes


def admitted(outcomes: list[Outcome]) -> list[Outcome]:
    assert all(o.status in (200, 429) for o in outcomes), [(o.status, o.body) for o in outcomes if o.status != 200]
    return [o for o in outcomes if o.status == 200]


def check_refusals(outcomes: list[Outcome], code: str, limit: str, size) -> None:
    """Every refused client got `429 code` naming the limit and its size, with a Retry-After."""
    for o in outcomes:
        if o.status == 429:
            assert o.body["code"] == code and o.body["limit"] == limit, o.body
            assert o.body["size"] == size, o.body
            assert o.body["detail"] and "resets_at" in o.body, o.body
            # a running answer ends when it ends: the other limits say when they reset
            assert (o.body["resets_at"] is None) == (limit == "concurrent_answers"), o.body
            assert o.retry_after is not None and float(o.retry_after) > 0, o.retry_after


def ended(outcome: Outcome) -> dict:
    assert outcome.events[0]["type"] == "start" and outcome.events[-1]["type"] == "end", outcome.events[-1]
    return outcome.events[-1]["data"]


# ── the ledger and the owners' rows ─────────────────────────────────────────────────────


def owner_row(service: Service, owner: str) -> dict:
    rows = service.rows("SELECT * FROM usage_owners WHERE owner = ?", owner)
    assert len(rows) == 1, rows
    return rows[0]


def calls_of(service: Service, owner: str) -> list[dict]:
    return service.rows("SELECT * FROM usage_calls WHERE owner = ? ORDER BY id", owner)


def settled(service: Service, owner: str, calls: int) -> bool:
    """Every one of the owner's `calls` calls is settled, and nothing is held or running any more."""
    rows = calls_of(service, owner)
    if len(rows) != calls or any(r["state"] != "settled" for r in rows):
        return False
    row = owner_row(service, owner)
    return row["day_reserved"] == row["month_reserved"] == row["month_reserved_cost"] == row["running"] == 0


def check_books(service: Service, owner: str, reported: list[dict]) -> None:
    """The ledger and the owner's row agree: one reported call for each answer (in order, with the usage
    the fake reported), and the row's day and month count their sum; only the admitted turns stored
    anything."""
    calls, answers = calls_of(service, owner), len(reported)
    assert len(calls) == answers, calls
    for call, usage in zip(calls, reported, strict=True):
        assert (call["state"], call["purpose"], call["source"], call["outcome"]) == (
            "settled", "answer", "reported", "complete"
        ), call  # fmt: skip
        assert {k: call[k] for k in usage} == usage, call
    row = owner_row(service, owner)
    total = sum(c["total_tokens"] for c in calls)
    assert row["day_tokens"] == row["month_tokens"] == total, (row, total)
    assert row["month_cost"] == sum(c["cost_micros"] or 0 for c in calls), (row, calls)
    assert row["day_reserved"] == row["month_reserved"] == row["running"] == 0, row
    assert all(c["day"] == row["day"] and c["month"] == row["month"] for c in calls), (calls, row)
    stored = service.rows("SELECT id, role, status FROM messages WHERE owner = ? ORDER BY id", owner)
    assert sorted(r["role"] for r in stored) == ["assistant"] * answers + ["user"] * answers, stored
    assert all(r["status"] == "complete" for r in stored if r["role"] == "assistant"), stored
    assert len(service.rows("SELECT session_id FROM conversations WHERE owner = ?", owner)) == answers
    assert {c["message_id"] for c in calls} == {r["id"] for r in stored if r["role"] == "assistant"}


def one_answer(server: ServerProcess, owner: str, session_id: str) -> dict:
    with server.client() as client:
        r = client.post(f"{API}/chat/{session_id}", json={"message": "first"}, headers={USER: owner})
    assert r.status_code == 200, r.text
    return r.json()


class Watcher:
    """Samples a query in a thread until stopped; keeps the largest value it saw."""

    def __init__(self, service: Service, sql: str, *args):
        self.service, self.sql, self.args = service, sql, args
        self.highest, self.samples = 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rows = self.service.rows(self.sql, *self.args)
            self.highest = max([self.highest, *(next(iter(r.values())) or 0 for r in rows)])
            self.samples += 1

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


# ── two replicas on one PostgreSQL database ────────────────────────────────────────────


@pytest.fixture
def make_cluster(postgres_database, fake, tmp_path):
    """Two replicas (or more) with these settings, started at once, on the run's emptied database."""
    servers: list[ServerProcess] = []

    def make(count: int = 2, **env: str) -> tuple[Service, list[ServerProcess]]:
        pg(postgres_database, EMPTY_POSTGRES)
        service = Service(postgres_database, fake, CHATSVC_USER_HEADER=USER, CHATSVC_HEARTBEAT_SECONDS="0.3",
                          CHATSVC_CHECKPOINT_SECONDS="0.1", CHATSVC_UPSTREAM_IDLE_TIMEOUT="60",
                          CHATSVC_ADMIN_TOKEN=ADMIN, **env)  # fmt: skip
        started = [ServerProcess(service.env, tmp_path) for _ in range(count)]
        servers.extend(started)
        errors: list[BaseException] = []

        def start(server: ServerProcess) -> None:
            try:
                server.start()
            except BaseException as exc:  # reported below, in the test's thread
                errors.append(exc)

        threads = [threading.Thread(target=start, args=(s,)) for s in started]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        return service, started

    yield make
    for server in servers:
        server.stop()
    for server in servers:
        assert "Traceback" not in server.log(), server.log()


# per million tokens: the warm-up answer costs 22 x 0.8 + 17 x 2 = 51.6 -> 52 micros, the last one
# 22 x 0.8 + 1000 x 2 = 2017.6 -> 2018; a budget of 0.002 CNY then has room for exactly the last one
PRICES = '{"currency": "CNY", "models": {"qwen-plus": {"input": 0.8, "output": 2}}}'
BUDGETS = {  # limit -> (its setting's value, its size as a refusal shows it, the settings it needs)
    "tokens_per_day": (str(LIMIT), LIMIT, {}),
    "tokens_per_month": (str(LIMIT), LIMIT, {}),
    "cost_per_month": ("0.002", 0.002, {"CHATSVC_PRICES": PRICES}),
}


@pytest.mark.parametrize(
    "limit, trial", [("tokens_per_day", 1), ("tokens_per_day", 2), ("tokens_per_day", 3), ("tokens_per_month", 1),
                     ("cost_per_month", 1)]
)  # fmt: skip
def test_of_fifty_clients_on_two_replicas_one_gets_the_last_answer_of_a_budget(make_cluster, fake, limit, trial):
    # 1000 tokens: an answer holds its prompt's estimate and 4096 (at their prices, for a cost) while
    # it runs, so once one answer is admitted the budget holds no room for another until it settles
    value, size, settings = BUDGETS[limit]
    service, servers = make_cluster(**{f"CHATSVC_LIMIT_{limit.upper()}": value}, **settings)
    owner = f"racer-{trial}"
    one_answer(servers[0], owner, "warm")  # spent before the race: 39 tokens of 1000, 52 micros of 2000
    assert owner_row(service, owner)["day_tokens"] == REPORTED["total_tokens"]
    calls_before = len(fake.requests)
    fake.default = last_answer()
    outcomes = race(servers, owner, f"t{trial}")
    winners = admitted(outcomes)
    assert len(winners) == 1, [(o.status, o.body) for o in outcomes]
    check_refusals(outcomes, "quota_exceeded", limit, size)
    assert ended(winners[0])["full_text"] == "the last answer"
    assert len(fake.requests) - calls_before == 1  # the model was called for the admitted answer only
    wait_for(lambda: settled(service, owner, 2), 30)
    check_books(service, owner, [REPORTED, LAST])
    if settings:
        assert [c["cost_micros"] for c in calls_of(service, owner)] == [52, 2018]
    # the other owners' budgets are their own
    one_answer(servers[1], f"bystander-{trial}", "b")


def test_a_budget_set_by_an_admin_holds_across_replicas_too(make_cluster, fake):
    # no global limit: the owner's own, PUT on one replica, read by the other's admission
    service, servers = make_cluster()
    owner = "limited"
    with servers[0].client() as client:
        r = client.put(f"{API}/admin/users/{owner}/limits", json={"tokens_per_day": LIMIT},
                       headers={"Authorization": f"Bearer {ADMIN}"})  # fmt: skip
    assert r.status_code == 200, r.text
    one_answer(servers[1], owner, "warm")
    fake.default = last_answer()
    outcomes = race(servers, owner, "admin")
    assert len(admitted(outcomes)) == 1, [(o.status, o.body) for o in outcomes]
    check_refusals(outcomes, "quota_exceeded", "tokens_per_day", LIMIT)
    wait_for(lambda: settled(service, owner, 2), 30)
    check_books(service, owner, [REPORTED, LAST])
    # everyone else has no limit: the same race lets all of them through
    others = race(servers, "free", "free", n=10)
    assert len(admitted(others)) == 10


@pytest.mark.parametrize("trial", [1, 2, 3])
def test_one_concurrent_answer_across_two_replicas(make_cluster, fake, trial):
    service, servers = make_cluster(CHATSVC_LIMIT_CONCURRENT_ANSWERS="1")
    owner = f"runner-{trial}"
    # the admitted answer stays running (the model holds its third chunk) until every client has its status
    hold = threading.Event()
    fake.default = Reply.answer(["slow ", "answer ", "here"], hold=hold, hold_at=3)
    running = Watcher(service, "SELECT running FROM usage_owners WHERE owner = ?", owner)
    streaming = Watcher(service, "SELECT count(*) AS n FROM messages WHERE owner = ? AND status = 'streaming'", owner)

    def answered() -> None:  # every client has its status: once the watchers saw the answer running, it goes on
        wait_for(lambda: running.highest and streaming.highest, 30)
        hold.set()

    try:
        with running, streaming:
            outcomes = race(servers, owner, f"c{trial}", answered=answered)
    finally:
        hold.set()
    winners = admitted(outcomes)
    assert len(winners) == 1, [(o.status, o.body) for o in outcomes]
    check_refusals(outcomes, "rate_limited", "concurrent_answers", 1)
    assert ended(winners[0])["full_text"] == "slow answer here"
    assert running.highest == 1 and streaming.highest == 1, (running.highest, streaming.highest)
    wait_for(lambda: settled(service, owner, 1), 30)
    check_books(service, owner, [{"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}])
    # its answer ended: the slot is free again, on either replica
    fake.default = Reply.transcript("stream_usage.sse")
    one_answer(servers[1], owner, "after")
    check_books(service, owner, [{"total_tokens": 13}, REPORTED])


@pytest.mark.parametrize("trial", [1, 2, 3])
def test_five_answers_per_minute_of_fifty_across_two_replicas(make_cluster, fake, trial):
    service, servers = make_cluster(CHATSVC_LIMIT_ANSWERS_PER_MINUTE="5")
    owner = f"burst-{trial}"
    calls_before = len(fake.requests)
    # the bucket holds 5 and gains one every 12 s: the race is over long before that
    outcomes = race(servers, owner, f"m{trial}")
    winners = admitted(outcomes)
    assert len(winners) == 5, [(o.status, o.body) for o in outcomes]
    check_refusals(outcomes, "rate_limited", "answers_per_minute", 5)
    assert all(float(o.retry_after) <= 13 for o in outcomes if o.status == 429)  # the next token: at most 12 s
    assert len(fake.requests) - calls_before == 5
    for o in winners:
        ended(o)
    wait_for(lambda: settled(service, owner, 5), 30)
    check_books(service, owner, [REPORTED] * 5)
    assert owner_row(service, owner)["bucket"] < 1


def test_a_killed_replicas_reservation_is_settled_by_the_others_sweep(make_cluster, fake):
    service, (a, b) = make_cluster(CHATSVC_LIMIT_TOKENS_PER_DAY="100000", CHATSVC_LIMIT_CONCURRENT_ANSWERS="1")
    owner = "victim"
    hold = threading.Event()
    fake.push(Reply.answer([f"w{i} " for i in range(8)], hold=hold, hold_at=6))
    both = ("SELECT m.status, c.state FROM messages m JOIN usage_calls c ON c.message_id = m.id"
            " WHERE m.owner = ? AND m.role = 'assistant'")  # fmt: skip
    try:
        with b.client() as client, client.stream("POST", f"{API}/chat/s1/stream", json={"message": "hi"},
                                                 headers={USER: owner}) as response:  # fmt: skip
            assert response.status_code == 200
            # its text checkpointed (so the sweep has something to estimate from), its call reserved
            wait_for(lambda: service.rows("SELECT content FROM messages WHERE owner = ? AND role = 'assistant'"
                                          " AND content <> ''", owner), 30)  # fmt: skip
            held = owner_row(service, owner)
            assert held["running"] == 1 and held["day_reserved"] > 0 and held["day_tokens"] == 0, held
            [call] = calls_of(service, owner)
            assert call["state"] == "reserved" and call["reserved_tokens"] == held["day_reserved"], call
            b.kill()  # SIGKILL: no drain, no last word
            killed = time.monotonic()
            # every read sees the answer and its call change together: the sweep's one transaction
            seen = set()

            def swept() -> bool:
                rows = service.rows(both, owner)
                seen.update((r["status"], r["state"]) for r in rows)
                return rows == [{"status": "interrupted", "state": "settled"}]

            wait_for(swept, 30)
            took = time.monotonic() - killed
    finally:
        hold.set()
    assert seen <= {("streaming", "reserved"), ("interrupted", "settled")}, seen
    print(f"reservation settled {took:.2f} s after the SIGKILL (heartbeat 0.3 s, stale after 0.9 s)")
    [call] = calls_of(service, owner)
    stored = service.rows("SELECT content FROM messages WHERE owner = ? AND role = 'assistant'", owner)[0]
    assert (call["state"], call["source"], call["outcome"], call["purpose"]) == (
        "settled", "estimated", "interrupted", "answer"
    ), call  # fmt: skip
    assert stored["content"].startswith("w0 ")
    assert call["prompt_tokens"] > 0 and call["completion_tokens"] > 0
    assert call["total_tokens"] == call["prompt_tokens"] + call["completion_tokens"], call
    row = owner_row(service, owner)
    assert row["day_reserved"] == row["month_reserved"] == row["running"] == 0, row
    assert row["day_tokens"] == row["month_tokens"] == call["total_tokens"], (row, call)
    # the slot the dead replica held is free: the owner answers again on the survivor
    fake.default = Reply.transcript("stream_usage.sse")
    one_answer(a, owner, "s2")


# ── one process on SQLite ──────────────────────────────────────────────────────────────


def test_of_fifty_clients_on_sqlite_one_gets_the_last_answer_of_a_budget(fake, tmp_path):
    service = Service(f"sqlite+aiosqlite:///{tmp_path / 'races.db'}", fake, CHATSVC_USER_HEADER=USER,
                      CHATSVC_LIMIT_TOKENS_PER_DAY=str(LIMIT))  # fmt: skip
    server = ServerProcess(service.env, tmp_path).start()
    try:
        for trial in (1, 2, 3):
            owner = f"racer-{trial}"
            fake.default = Reply.transcript("stream_usage.sse")
            one_answer(server, owner, "warm")
            fake.default = last_answer()
            outcomes = race([server], owner, f"t{trial}")
            assert len(admitted(outcomes)) == 1, [(o.status, o.body) for o in outcomes]
            check_refusals(outcomes, "quota_exceeded", "tokens_per_day", LIMIT)
            wait_for(lambda owner=owner: settled(service, owner, 2), 30)
            check_books(service, owner, [REPORTED, LAST])
    finally:
        server.stop()
    assert "Traceback" not in server.log(), server.log()
