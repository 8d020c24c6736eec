"""The HTTP surface of issue 24 (docs/CONTRACT.md, "Usage, prices and limits"): the limit settings, a
429 over a limit end to end (each limit at its edge, nothing stored, the model not called), the
window's reset, an admin's limits and resets, who may read whose usage, the report as JSON and CSV,
and where a user stands. Through the HTTP app and the fake DashScope, on SQLite and PostgreSQL."""

from __future__ import annotations

import csv
import io
import json
import logging
import threading
from decimal import Decimal
from pathlib import Path

import pytest
from fake_dashscope import Reply
from support import wait_for

import chatsvc

API = "/api/v1"
CONV = f"{API}/context/conversations"
ADMIN = "tok-do-not-log"  # tests/support.py fails the run if a log line holds it
API_TOKEN = "tok-secret-123"
AS_ADMIN = {"Authorization": f"Bearer {ADMIN}"}
# the fake's default reply (tests/dashscope/stream_usage.sse) reports these
PROMPT, COMPLETION, TOTAL = 22, 17, 39
# 1000 per million tokens: a default answer costs 0.039 (39,000 micros)
PRICES = json.dumps({"currency": "CNY", "models": {"qwen-plus": {"input": 1000, "output": 1000}}})
KINDS = chatsvc.LIMIT_KINDS


def chat(client, session_id="s1", message="hi", headers=None, **body):
    return client.post(f"{API}/chat/{session_id}", json={"message": message, **body}, headers=headers or {})


def answered(client, session_id="s1", headers=None, **body) -> dict:
    r = chat(client, session_id, headers=headers, **body)
    assert r.status_code == 200, r.text
    return r.json()


def counts(service) -> tuple[int, int, int]:
    """(conversations, messages, usage_calls) rows."""
    return tuple(
        service.rows(f"SELECT count(*) AS n FROM {table}")[0]["n"]
        for table in ("conversations", "messages", "usage_calls")
    )


def refused(client, service, fake, session_id="refused", headers=None, stream=False) -> dict:
    """A turn refused over a limit: 429 with its fields and Retry-After, nothing stored, no model call."""
    before, calls = counts(service), len(fake.requests)
    path = f"{API}/chat/{session_id}" + ("/stream" if stream else "")
    r = client.post(path, json={"message": "one more"}, headers=headers or {})
    assert r.status_code == 429, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert set(body) == {"detail", "code", "limit", "size", "used", "resets_at"}, body
    assert body["code"] == ("quota_exceeded" if body["limit"] in KINDS[:3] else "rate_limited")
    assert body["detail"] and int(r.headers["retry-after"]) >= 1
    assert counts(service) == before and len(fake.requests) == calls
    assert client.get(f"{CONV}/{session_id}", headers=headers or {}).status_code in (404, 200)
    return {**body, "retry_after": int(r.headers["retry-after"])}


def report(client, headers=None, **params) -> dict:
    r = client.get(f"{API}/usage", params=params, headers=headers or {})
    assert r.status_code == 200, r.text
    return r.json()


def metric(client, name: str, limit: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(f'{name}{{limit="{limit}"}}'):
            return float(line.split()[-1])
    return 0.0


# ── settings ─────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    "env, says",
    [
        ({"CHATSVC_LIMIT_TOKENS_PER_DAY": "1.5"}, "CHATSVC_LIMIT_TOKENS_PER_DAY='1.5': must be a whole number"),
        ({"CHATSVC_LIMIT_TOKENS_PER_MONTH": "-1"}, "CHATSVC_LIMIT_TOKENS_PER_MONTH='-1': must be a whole number"),
        ({"CHATSVC_LIMIT_ANSWERS_PER_MINUTE": "ten"}, "CHATSVC_LIMIT_ANSWERS_PER_MINUTE='ten': must be a whole"),
        ({"CHATSVC_LIMIT_CONCURRENT_ANSWERS": "1e3"}, "CHATSVC_LIMIT_CONCURRENT_ANSWERS='1e3': must be a whole"),
        ({"CHATSVC_LIMIT_TOKENS_PER_DAY": "9007199254740992"}, "from 0 to 9007199254740991"),
        ({"CHATSVC_LIMIT_COST_PER_MONTH": "5"}, "CHATSVC_LIMIT_COST_PER_MONTH: a cost limit needs prices"),
        (
            {"CHATSVC_LIMIT_COST_PER_MONTH": "0.0000001", "CHATSVC_PRICES": PRICES},
            "at most 6 decimal places",
        ),
        ({"CHATSVC_LIMIT_COST_PER_MONTH": "-2", "CHATSVC_PRICES": PRICES}, "an amount of at least 0"),
        ({"CHATSVC_LIMIT_COST_PER_MONTH": "NaN", "CHATSVC_PRICES": PRICES}, "an amount of at least 0"),
        ({"CHATSVC_API_TOKEN": "same-token", "CHATSVC_ADMIN_TOKEN": "same-token"}, "CHATSVC_ADMIN_TOKEN: must differ"),
        ({"CHATSVC_RESERVE_OUTPUT_TOKENS": "0"}, "CHATSVC_RESERVE_OUTPUT_TOKENS='0': must be between 1"),
    ],
)
def test_a_limit_setting_chatsvc_cannot_use_stops_it_with_one_sentence(env, says):
    with pytest.raises(ValueError) as caught:
        chatsvc.Settings.from_env(env, env_file=None)
    message = str(caught.value)
    assert says in message and message.endswith(".") and "same-token" not in message


def test_the_limit_settings_are_read_and_listed():
    settings = chatsvc.Settings.from_env(
        {
            "CHATSVC_LIMIT_TOKENS_PER_DAY": "0",
            "CHATSVC_LIMIT_TOKENS_PER_MONTH": " 3000000 ",
            "CHATSVC_LIMIT_COST_PER_MONTH": "12.345678",
            "CHATSVC_LIMIT_ANSWERS_PER_MINUTE": "20",
            "CHATSVC_LIMIT_CONCURRENT_ANSWERS": "2",
            "CHATSVC_PRICES": PRICES,
            "CHATSVC_ADMIN_TOKEN": ADMIN,
        },
        env_file=None,
    )
    assert settings.limit_tokens_per_day == 0 and settings.limit_tokens_per_month == 3_000_000
    assert settings.limit_cost_per_month == Decimal("12.345678")
    assert chatsvc.Limits.of(settings) == chatsvc.Limits(0, 3_000_000, 12_345_678, 20, 2)
    listed = chatsvc.Settings.help()
    for env in ("CHATSVC_PRICES", "CHATSVC_ADMIN_TOKEN", "CHATSVC_RESERVE_OUTPUT_TOKENS"):
        assert env in listed
    for kind in KINDS:
        assert f"CHATSVC_LIMIT_{kind.upper()}" in listed


def test_an_over_limit_refusal_is_a_429_with_its_fields_and_retry_after_rounded_up():
    exc = chatsvc.OverLimit(
        "quota_exceeded", "Over.", "cost_per_month", 5_000_000, 5_012_345, "2027-01-01T00:00:00Z", 3600.2
    )
    error = chatsvc.api_error(exc)
    response = error.response()
    assert response.status_code == 429 and response.headers["retry-after"] == "3601"
    assert json.loads(response.body) == {
        "detail": "Over.",
        "code": "quota_exceeded",
        "limit": "cost_per_month",
        "size": 5.0,
        "used": 5.012345,
        "resets_at": "2027-01-01T00:00:00Z",
    }
    soon = chatsvc.OverLimit("rate_limited", "Wait.", "concurrent_answers", 1, 1, None, 0.01)
    response = chatsvc.api_error(soon).response()
    assert response.headers["retry-after"] == "1"
    assert json.loads(response.body)["size"] == 1 and json.loads(response.body)["resets_at"] is None


# ── who may call what ────────────────────────────────────────────────────────────────────


def test_without_an_admin_token_the_admin_routes_do_not_exist(client):
    for method, path in [
        ("GET", f"{API}/admin/users/alice/limits"),
        ("PUT", f"{API}/admin/users/alice/limits"),
        ("POST", f"{API}/admin/users/alice/usage/reset"),
    ]:
        r = client.request(method, path, json={}, headers=AS_ADMIN)
        assert r.status_code == 404 and r.json() == {"detail": f"There is no route {path}.", "code": "not_found"}
    for params in ({"user": "alice"}, {"group_by": "user"}):
        r = client.get(f"{API}/usage", params=params, headers=AS_ADMIN)
        assert r.status_code == 403 and r.json()["code"] == "admin_only", r.text
        assert "CHATSVC_ADMIN_TOKEN" in r.json()["detail"]


def test_the_admin_routes_need_the_admin_token_and_it_passes_where_the_api_token_is_asked(make_service):
    service = make_service(CHATSVC_API_TOKEN=API_TOKEN, CHATSVC_ADMIN_TOKEN=ADMIN)
    with service.client() as client:
        user = {"Authorization": f"Bearer {API_TOKEN}"}
        for headers in ({}, user, {"Authorization": "Bearer tok-wrong"}, {"Authorization": ADMIN}):
            r = client.get(f"{API}/admin/users/alice/limits", headers=headers)
            assert r.status_code == 401 and r.json()["code"] == "unauthorized", r.text
            assert r.headers["www-authenticate"].startswith("Bearer")
        # the admin token in the query is the API's EventSource way in, never an admin's
        r = client.get(f"{API}/admin/users/alice/limits", params={"access_token": ADMIN})
        assert r.status_code == 401
        r = client.get(f"{API}/usage", params={"user": "alice"}, headers=user)
        assert r.status_code == 401 and "admin token" in r.json()["detail"]
        assert client.get(f"{API}/usage/limits", headers=user).status_code == 200
        assert client.get(CONV, headers=AS_ADMIN).status_code == 200  # TokenAuth lets the admin token through
        r = client.get(f"{API}/admin/users/alice/limits", headers=AS_ADMIN)
        assert r.status_code == 200, r.text
        assert r.json() == {
            "user": "alice",
            "limits": {},
            "effective": dict.fromkeys(KINDS),
            "currency": None,
        }


@pytest.mark.parametrize(
    "params, says",
    [
        ({"from": "yesterday"}, "'from' must be a UTC date"),
        ({"to": "2026-13-01"}, "'to' must be a UTC date"),
        ({"from": "2026-12-01T25:00:00Z"}, "'from' must be a UTC date"),
        ({"from": "2026-12-01T10:00:00"}, "'from' must be a UTC date"),  # no offset: not RFC 3339
        ({"from": "2026-12-02", "to": "2026-12-01"}, "'from' must be before 'to'"),
        ({"from": "2026-12-01", "to": "2026-12-01"}, "'from' must be before 'to'"),
        ({"from": "2025-01-01", "to": "2026-01-03"}, "at most 366 days"),
        ({"from": "9999-12-31T23:59:59.9999Z"}, "within the years 1 to 9999"),
        ({"to": "0001-01-01"}, "within the years 1 to 9999"),
        ({"from": "9000-01-01"}, "'from' must be before 'to'"),  # alone, 'to' is the next month's first
        ({"group_by": "week"}, "'group_by' must be one of day, model, conversation, purpose, user"),
        ({"group_by": ""}, "'group_by' must be one of"),
        ({"format": "xml"}, "'format' must be json or csv"),
        ({"limit": "0"}, "'limit' must be a whole number from 1 to 1000"),
        ({"limit": "1001"}, "'limit' must be a whole number from 1 to 1000"),
    ],
)
def test_a_report_with_a_bad_parameter_is_a_422_naming_it(client, params, says):
    r = client.get(f"{API}/usage", params=params)
    assert r.status_code == 422 and r.json()["code"] == "invalid_request"
    assert says in r.json()["detail"]


@pytest.mark.parametrize(
    "body, says",
    [
        ({"tokens_per_week": 5}, "Unknown field 'tokens_per_week'"),
        ({"tokens_per_day": -1}, "'tokens_per_day' must be null (no limit) or a whole number from 0"),
        ({"tokens_per_day": 1.5}, "'tokens_per_day' must be null"),
        ({"answers_per_minute": True}, "'answers_per_minute' must be null"),
        ({"concurrent_answers": "2"}, "'concurrent_answers' must be null"),
        ({"tokens_per_month": 2**53}, "'tokens_per_month' must be null"),
        ({"cost_per_month": 0.0000001}, "'cost_per_month' must be null (no limit) or an amount"),
        ({"cost_per_month": -1}, "'cost_per_month' must be null"),
    ],
)
def test_a_bad_limit_is_a_422_naming_it(make_service, body, says):
    with make_service(CHATSVC_ADMIN_TOKEN=ADMIN, CHATSVC_PRICES=PRICES).client() as client:
        r = client.put(f"{API}/admin/users/alice/limits", json=body, headers=AS_ADMIN)
        assert r.status_code == 422 and r.json()["code"] == "invalid_request", r.text
        assert says in r.json()["detail"]


def test_an_admin_request_with_a_bad_body_or_user_is_refused(make_service):
    with make_service(CHATSVC_ADMIN_TOKEN=ADMIN).client() as client:
        r = client.put(f"{API}/admin/users/alice/limits", json={"cost_per_month": 5}, headers=AS_ADMIN)
        assert r.status_code == 422 and "CHATSVC_PRICES" in r.json()["detail"]
        for body in ({"window": "week"}, {}, {"window": "day", "also": 1}):
            r = client.post(f"{API}/admin/users/alice/usage/reset", json=body, headers=AS_ADMIN)
            assert r.status_code == 422 and r.json()["code"] == "invalid_request", r.text
        r = client.put(
            f"{API}/admin/users/alice/limits", content=b"[1]", headers={**AS_ADMIN, "Content-Type": "application/json"}
        )
        assert r.status_code == 400 and r.json()["code"] == "invalid_json"
        r = client.put(f"{API}/admin/users/{'x' * 257}/limits", json={}, headers=AS_ADMIN)
        assert r.status_code == 422 and "256 characters" in r.json()["detail"]
        r = client.put(f"{API}/admin/users/a%01b/limits", json={}, headers=AS_ADMIN)
        assert r.status_code == 422 and "control characters" in r.json()["detail"]
        r = client.get(f"{API}/usage", params={"user": "a", "group_by": "user"}, headers=AS_ADMIN)
        assert r.status_code == 422 and "group_by=user" in r.json()["detail"]


# ── each limit at its edge, end to end ───────────────────────────────────────────────────


def test_tokens_per_day_admits_below_the_limit_and_refuses_at_it(make_service, fake):
    service = make_service(CHATSVC_LIMIT_TOKENS_PER_DAY=str(2 * TOTAL), CHATSVC_RESERVE_OUTPUT_TOKENS="100")
    with service.client() as client:
        answered(client, "s1")
        assert fake.requests[-1].body["max_tokens"] == 100  # a budget applies: the reserve is sent as max_tokens
        answered(client, "s1", max_tokens=7)  # 39 used < 78: admitted
        assert fake.requests[-1].body["max_tokens"] == 7
        body = refused(client, service, fake)  # 78 used, not < 78
        assert body["limit"] == "tokens_per_day" and body["size"] == 2 * TOTAL and body["used"] == 2 * TOTAL
        assert body["resets_at"].endswith("T00:00:00Z") and body["retry_after"] <= 86400
        # the streaming route refuses the same way, as JSON before any event
        refused(client, service, fake, "s1", stream=True)
        assert metric(client, "chatsvc_limit_refusals_total", "tokens_per_day") == 2.0


def test_a_limit_of_0_refuses_every_answer(make_service, fake):
    service = make_service(CHATSVC_LIMIT_TOKENS_PER_MONTH="0")
    with service.client() as client:
        body = refused(client, service, fake, "new")
        assert body["limit"] == "tokens_per_month" and body["size"] == 0 and body["used"] == 0
        assert body["resets_at"].endswith("-01T00:00:00Z")
        assert client.get(f"{CONV}/new").status_code == 404  # the conversation was not made either


def test_tokens_per_month_at_its_edge(make_service, fake):
    service = make_service(CHATSVC_LIMIT_TOKENS_PER_MONTH=str(TOTAL + 1))
    with service.client() as client:
        answered(client, "s1")
        answered(client, "s1")  # 39 < 40
        body = refused(client, service, fake, "s1")
        assert body["limit"] == "tokens_per_month" and body["size"] == TOTAL + 1 and body["used"] == 2 * TOTAL


def test_cost_per_month_at_its_edge_in_money(make_service, fake):
    service = make_service(CHATSVC_PRICES=PRICES, CHATSVC_LIMIT_COST_PER_MONTH="0.078")
    with service.client() as client:
        answered(client, "s1")  # 0.039
        answered(client, "s1")  # 0.039 < 0.078
        body = refused(client, service, fake, "s1")
        assert body["limit"] == "cost_per_month" and body["size"] == 0.078 and body["used"] == 0.078
        standing = client.get(f"{API}/usage/limits").json()
        assert standing["currency"] == "CNY"
        assert standing["limits"]["cost_per_month"]["limit"] == 0.078
        assert standing["limits"]["cost_per_month"]["used"] == 0.078


def test_answers_per_minute_is_a_bucket_that_refills(make_service, fake):
    service = make_service(CHATSVC_LIMIT_ANSWERS_PER_MINUTE="2")
    with service.client() as client:
        answered(client, "s1")
        answered(client, "s2")
        body = refused(client, service, fake, "s3")
        assert body["limit"] == "answers_per_minute" and body["size"] == 2
        assert 1 <= body["retry_after"] <= 30  # one answer every 30 s
        service.rows("UPDATE usage_owners SET bucket_at = bucket_at - 60")  # a minute later, by the database
        answered(client, "s3")
        answered(client, "s4")
        assert refused(client, service, fake, "s5")["limit"] == "answers_per_minute"
        assert metric(client, "chatsvc_limit_refusals_total", "answers_per_minute") == 2.0


def test_concurrent_answers_refuses_while_one_runs(make_service, fake):
    service = make_service(CHATSVC_LIMIT_CONCURRENT_ANSWERS="1", CHATSVC_UPSTREAM_IDLE_TIMEOUT="60")
    with service.client() as client:
        release = threading.Event()
        fake.push(Reply.answer(["slow ", "answer"], hold=release, hold_at=2))
        running = threading.Thread(target=lambda: answered(client, "s1"))
        running.start()
        try:
            wait_for(lambda: len(fake.requests) == 1)  # the running answer's model call is made
            body = refused(client, service, fake, "s2")
            assert body["limit"] == "concurrent_answers" and body["size"] == 1 and body["used"] == 1
            assert body["resets_at"] is None and body["retry_after"] == 1
        finally:
            release.set()
            running.join(30)
        answered(client, "s2")  # the running one ended


def test_an_answer_running_when_the_budget_is_crossed_finishes(make_service, fake):
    service = make_service(CHATSVC_LIMIT_TOKENS_PER_DAY="10", CHATSVC_RESERVE_OUTPUT_TOKENS="50")
    with service.client() as client:
        fake.push(
            Reply.answer(["a long answer"], usage={"prompt_tokens": 30, "completion_tokens": 45, "total_tokens": 75})
        )
        reply = answered(client, "s1")
        assert reply["finish_reason"] == "stop"
        refused(client, service, fake, "s1")
        standing = client.get(f"{API}/usage/limits").json()["limits"]["tokens_per_day"]
        assert standing["used"] == 75 and standing["limit"] == 10  # the overshoot, reported
        assert standing["remaining"] == 0


# ── windows, an admin's limits and resets ────────────────────────────────────────────────


def test_a_new_day_by_the_database_counts_from_0(make_service, fake):
    service = make_service(CHATSVC_LIMIT_TOKENS_PER_DAY=str(TOTAL))
    with service.client() as client:
        answered(client, "s1")
        refused(client, service, fake, "s1")
        service.rows("UPDATE usage_owners SET day = '2000-01-01'")  # the row holds an old day
        answered(client, "s1")
        refused(client, service, fake, "s1")


def test_an_admin_overrides_the_global_limit_for_one_user(make_service, fake, caplog):
    service = make_service(
        CHATSVC_USER_HEADER="X-User-Id", CHATSVC_ADMIN_TOKEN=ADMIN, CHATSVC_LIMIT_TOKENS_PER_DAY=str(TOTAL)
    )
    alice, bob = {"X-User-Id": "alice"}, {"X-User-Id": "bob"}
    limits = f"{API}/admin/users/alice/limits"
    with service.client() as client:
        answered(client, "s1", headers=alice)
        refused(client, service, fake, "s1", headers=alice)
        with caplog.at_level(logging.INFO, logger="chatsvc"):
            r = client.put(limits, json={"tokens_per_day": 1000, "answers_per_minute": None}, headers=AS_ADMIN)
        assert r.status_code == 200, r.text
        assert r.json() == {
            "user": "alice",
            "limits": {"tokens_per_day": 1000, "answers_per_minute": None},
            "effective": {
                "tokens_per_day": 1000,
                "tokens_per_month": None,
                "cost_per_month": None,
                "answers_per_minute": None,
                "concurrent_answers": None,
            },
            "currency": None,
        }
        assert 'admin limits owner="alice" set=answers_per_minute,tokens_per_day' in caplog.text
        assert client.get(limits, headers=AS_ADMIN).json() == r.json()
        answered(client, "s1", headers=alice)  # 39 < 1000
        standing = client.get(f"{API}/usage/limits", headers=alice).json()["limits"]["tokens_per_day"]
        assert standing["limit"] == 1000 and standing["source"] == "user"
        # null: no limit at all for alice
        client.put(limits, json={"tokens_per_day": None}, headers=AS_ADMIN)
        for _ in range(3):
            answered(client, "s1", headers=alice)
        standing = client.get(f"{API}/usage/limits", headers=alice).json()["limits"]["tokens_per_day"]
        assert standing["limit"] is None and standing["source"] == "none" and standing["used"] == 5 * TOTAL
        # absent: the global limit again
        r = client.put(limits, json={}, headers=AS_ADMIN)
        assert r.json()["limits"] == {} and r.json()["effective"]["tokens_per_day"] == TOTAL
        refused(client, service, fake, "s1", headers=alice)
        # bob was never changed
        answered(client, "b1", headers=bob)
        refused(client, service, fake, "b1", headers=bob)


def test_an_owner_with_a_slash_and_the_one_owner_are_addressable(make_service):
    with make_service(CHATSVC_ADMIN_TOKEN=ADMIN).client() as client:
        r = client.put(f"{API}/admin/users/org%2Falice/limits", json={"concurrent_answers": 3}, headers=AS_ADMIN)
        assert r.status_code == 200 and r.json()["user"] == "org/alice", r.text
        r = client.put(f"{API}/admin/users//limits", json={"concurrent_answers": 0}, headers=AS_ADMIN)
        assert r.status_code == 200 and r.json()["user"] == "", r.text
        assert client.get(f"{API}/usage/limits").json()["limits"]["concurrent_answers"]["limit"] == 0


def test_an_admin_resets_a_window_and_the_report_keeps_every_call(make_service, fake, caplog):
    service = make_service(CHATSVC_ADMIN_TOKEN=ADMIN, CHATSVC_LIMIT_TOKENS_PER_DAY=str(TOTAL))
    with service.client() as client:
        answered(client, "s1")
        refused(client, service, fake, "s1")
        with caplog.at_level(logging.INFO, logger="chatsvc"):
            r = client.post(f"{API}/admin/users//usage/reset", json={"window": "day"}, headers=AS_ADMIN)
        assert r.status_code == 200, r.text
        assert r.json()["user"] == "" and r.json()["window"] == "day"
        assert r.json()["standing"]["limits"]["tokens_per_day"]["used"] == 0
        assert 'admin reset owner="" window=day' in caplog.text
        answered(client, "s1")
        assert report(client)["totals"]["total_tokens"] == 2 * TOTAL  # the ledger kept the first
        r = client.post(f"{API}/admin/users//usage/reset", json={"window": "month"}, headers=AS_ADMIN)
        assert r.status_code == 200 and r.json()["standing"]["limits"]["tokens_per_month"]["used"] == 0


def test_where_a_user_stands(make_service, fake):
    service = make_service(CHATSVC_LIMIT_TOKENS_PER_DAY="100", CHATSVC_LIMIT_CONCURRENT_ANSWERS="2")
    with service.client() as client:
        fake.push(Reply.answer(["x"], usage={"prompt_tokens": 60, "completion_tokens": 20, "total_tokens": 80}))
        answered(client, "s1")
        limits = client.get(f"{API}/usage/limits").json()["limits"]
        day = limits["tokens_per_day"]
        assert (day["limit"], day["source"], day["used"], day["reserved"]) == (100, "global", 80, 0)
        assert day["used"] / day["limit"] == 0.8 and day["remaining"] == 20
        assert day["resets_at"].endswith("T00:00:00Z")
        assert limits["tokens_per_month"]["limit"] is None and limits["tokens_per_month"]["source"] == "none"
        assert limits["tokens_per_month"]["used"] == 80
        assert limits["concurrent_answers"]["limit"] == 2


# ── reports ──────────────────────────────────────────────────────────────────────────────


def test_a_user_reads_only_their_own_usage_and_an_admin_anyones(make_service, fake):
    service = make_service(CHATSVC_USER_HEADER="X-User-Id", CHATSVC_ADMIN_TOKEN=ADMIN)
    alice, bob = {"X-User-Id": "alice"}, {"X-User-Id": "bob"}
    with service.client() as client:
        answered(client, "s1", headers=alice)
        answered(client, "s2", headers=alice)
        answered(client, "s1", headers=bob)
        assert report(client, headers=alice)["totals"]["calls"] == 2
        assert report(client, headers=bob)["totals"]["calls"] == 1
        r = client.get(f"{API}/usage", params={"user": "alice"}, headers=bob)
        assert r.status_code == 401 and r.json()["code"] == "unauthorized"
        r = client.get(f"{API}/usage", params={"group_by": "user"}, headers=bob)
        assert r.status_code == 401
        seen = report(client, headers=AS_ADMIN, user="alice", group_by="conversation")
        assert seen["totals"]["calls"] == 2 and [g["key"] for g in seen["groups"]] == ["s1", "s2"]
        everyone = report(client, headers=AS_ADMIN, group_by="user")
        assert [(g["key"], g["calls"]) for g in everyone["groups"]] == [("alice", 2), ("bob", 1)]
        assert everyone["totals"]["total_tokens"] == 3 * TOTAL
        first = report(client, headers=AS_ADMIN, group_by="user", limit=1)
        assert [g["key"] for g in first["groups"]] == ["alice"] and first["next_cursor"]
        second = report(client, headers=AS_ADMIN, group_by="user", limit=1, cursor=first["next_cursor"])
        assert [g["key"] for g in second["groups"]] == ["bob"] and second["next_cursor"] is None


def test_a_report_counts_answers_tokens_and_costs(make_service, fake):
    service = make_service(CHATSVC_PRICES=PRICES)
    with service.client() as client:
        answered(client, "s1")
        answered(client, "s2")
        r = report(client, group_by="purpose")
        assert r["currency"] == "CNY" and r["group_by"] == "purpose" and r["next_cursor"] is None
        assert r["from"].endswith("-01T00:00:00.000Z") and r["to"].endswith("-01T00:00:00.000Z")
        totals = r["totals"]
        assert totals == {
            "calls": 2,
            "answers": 2,
            "prompt_tokens": 2 * PROMPT,
            "completion_tokens": 2 * COMPLETION,
            "reasoning_tokens": 0,
            "cached_tokens": 0,
            "total_tokens": 2 * TOTAL,
            "estimated_tokens": 0,
            "cost": 0.078,
        }
        assert r["groups"] == [{"key": "answer", **totals}]
        day = report(client)  # by day, the default
        today = service.rows("SELECT day FROM usage_calls")[0]["day"]  # the database's UTC day
        assert day["group_by"] == "day" and [g["key"] for g in day["groups"]] == [today]
        # a range with nothing in it
        empty = report(client, **{"from": "2020-01-01", "to": "2020-02-01T00:00:00+00:00"})
        assert empty["totals"]["calls"] == 0 and empty["groups"] == []
        assert (empty["from"], empty["to"]) == ("2020-01-01T00:00:00.000Z", "2020-02-01T00:00:00.000Z")
        shifted = report(client, **{"from": "2020-01-01T08:00:00.0001+08:00", "to": "2020-01-02"})
        assert shifted["from"] == "2020-01-01T00:00:00.001Z"
        assert report(client, to="2020-02-15")["from"] == "2020-02-01T00:00:00.000Z"  # `to` alone: its month
        alone = report(client, **{"from": "2020-01-01"})  # `from` alone: 366 days at most
        assert alone["to"] == "2021-01-01T00:00:00.000Z" and alone["totals"]["calls"] == 0


def test_a_priced_answer_fits_the_openapi_document(make_service, fake):
    doc = json.loads((Path(__file__).resolve().parent.parent / "docs" / "openapi.json").read_text())
    schemas = doc["components"]["schemas"]
    with make_service(CHATSVC_PRICES=PRICES).client() as client:
        reply = answered(client, "s1")
        assert (reply["cost"], reply["currency"]) == (0.039, "CNY")
        assert set(reply) <= set(schemas["ChatResponse"]["properties"])
        messages = client.get(f"{CONV}/s1/messages").json()["messages"]
        assert messages[-1]["cost"] == 0.039
        for message in messages:
            assert set(message) <= set(schemas["Message"]["properties"])


def test_without_prices_a_report_has_no_cost(client, fake):
    answered(client, "s1")
    r = report(client, group_by="model")
    assert r["currency"] is None and r["totals"]["cost"] is None and r["groups"][0]["cost"] is None
    assert r["groups"][0]["key"] == "qwen-plus"


def test_the_csv_holds_what_the_json_holds(make_service, fake):
    service = make_service(CHATSVC_PRICES=PRICES, CHATSVC_USER_HEADER="X-User-Id")
    alice = {"X-User-Id": "alice"}
    with service.client() as client:
        answered(client, "s1", headers=alice)
        answered(client, "-x", headers=alice)  # a key a spreadsheet would take for a formula
        fake.push(Reply.answer(["y"], usage={"prompt_tokens": 1234, "completion_tokens": 567, "total_tokens": 1801}))
        answered(client, "s2", headers=alice)
        params = {"group_by": "conversation", "from": "2026-01-01", "to": "2027-01-01"}
        as_json = report(client, headers=alice, **params)
        as_csv = client.get(f"{API}/usage", params={**params, "format": "csv"}, headers=alice)
        by_accept = client.get(f"{API}/usage", params=params, headers={**alice, "Accept": "text/csv"})
        json_wins = client.get(
            f"{API}/usage", params={**params, "format": "json"}, headers={**alice, "Accept": "text/csv"}
        )
        assert json_wins.json() == as_json
        for r in (as_csv, by_accept):
            assert r.status_code == 200 and r.headers["content-type"] == "text/csv; charset=utf-8"
            assert r.headers["content-disposition"] == 'attachment; filename="usage-2026-01-01-2027-01-01.csv"'
            assert r.text == as_csv.text
        rows = list(csv.DictReader(io.StringIO(as_csv.text)))
        assert list(rows[0]) == ["key", *chatsvc.USAGE_FIELDS_REPORTED, "currency"]
        assert as_csv.text.endswith("\r\n") and len(rows) == len(as_json["groups"]) == 3  # no totals row
        for row, group in zip(rows, as_json["groups"], strict=True):
            key = row.pop("key")
            assert key == ("'" + group["key"] if group["key"].startswith("-") else group["key"])
            assert row.pop("currency") == "CNY"
            assert float(row.pop("cost")) == group["cost"]
            assert {k: int(v) for k, v in row.items()} == {k: group[k] for k in chatsvc.USAGE_FIELDS_REPORTED[:-1]}
        assert sum(g["cost"] for g in as_json["groups"]) == pytest.approx(as_json["totals"]["cost"])
        assert as_json["totals"]["cost"] == 1.879  # 0.039 twice, and 1.801
        paged = client.get(f"{API}/usage", params={**params, "format": "csv", "limit": 1}, headers=alice)
        assert len(list(csv.DictReader(io.StringIO(paged.text)))) == 1 and paged.headers["x-next-cursor"]
