"""A hostile review of issue 24's HTTP surface, kept: a cost limit that cannot hold (a model without a
price), limit values the settings and PUT .../limits must refuse with a sentence (never a traceback or
a 500), paging every user past the owner '', docs/openapi.json against what the routes take, and
tokens with surrounding whitespace. Through the HTTP app and the fake DashScope, on SQLite and
PostgreSQL (docs/CONTRACT.md, "Usage, prices and limits")."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
from fake_dashscope import Reply
from starlette.testclient import TestClient

import chatsvc

API = "/api/v1"
ADMIN = "tok-do-not-log"  # tests/support.py fails the run if a log line holds it
AS_ADMIN = {"Authorization": f"Bearer {ADMIN}"}
PRICES = json.dumps({"currency": "CNY", "models": {"qwen-plus": {"input": 1000, "output": 1000}}})
DOC = json.loads((Path(__file__).resolve().parent.parent / "docs" / "openapi.json").read_text())
ADMIN_PATHS = ("/api/v1/admin/users/{user}/limits", "/api/v1/admin/users/{user}/usage/reset")


def answered(client, session_id="s1", headers=None, **body) -> dict:
    r = client.post(f"{API}/chat/{session_id}", json={"message": "hi", **body}, headers=headers or {})
    assert r.status_code == 200, r.text
    return r.json()


def conforms(value, schema_name: str) -> None:
    """`value` fits components/schemas/<schema_name> of docs/openapi.json (OpenAPI 3.1 = JSON Schema 2020-12)."""
    schema = {"$ref": f"#/components/schemas/{schema_name}", "components": DOC["components"]}
    jsonschema.Draft202012Validator(schema).validate(value)


def refused_at_start(env: dict) -> str:
    """The one sentence Settings.from_env stops with."""
    with pytest.raises(ValueError) as caught:
        chatsvc.Settings.from_env(env, env_file=None)
    message = str(caught.value)
    assert message.endswith(".") and "\n" not in message, message
    return message


def put_limits(client, body: bytes | dict, user="alice"):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.put(
        f"{API}/admin/users/{user}/limits",
        content=content,
        headers={**AS_ADMIN, "Content-Type": "application/json"},
    )


# ── a cost limit holds for every model the service may call, or is refused ───────────────


@pytest.mark.parametrize(
    "env, unpriced",
    [
        ({"CHAT_MODEL": "qwen-max"}, "qwen-max (CHAT_MODEL)"),
        ({"CHATSVC_ALLOWED_MODELS": "qwen-turbo,qwen-plus,qwen-turbo"}, "qwen-turbo (CHATSVC_ALLOWED_MODELS)"),
        ({"CHATSVC_TITLE_MODEL": "qwen-flash"}, "qwen-flash (CHATSVC_TITLE_MODEL)"),
        ({"CHATSVC_VISION_MODEL": "qwen-vl-max"}, "qwen-vl-max (CHATSVC_VISION_MODEL)"),
        (
            {"CHAT_MODEL": "qwen-max", "CHATSVC_ALLOWED_MODELS": "qwen-max"},
            "qwen-max (CHAT_MODEL, CHATSVC_ALLOWED_MODELS)",
        ),
    ],
)
def test_a_cost_limit_with_a_model_without_a_price_is_refused_at_start(env, unpriced):
    message = refused_at_start({"CHATSVC_PRICES": PRICES, "CHATSVC_LIMIT_COST_PER_MONTH": "5", **env})
    assert message.startswith("CHATSVC_LIMIT_COST_PER_MONTH: a cost limit cannot hold for ")
    assert f" {unpriced}, which CHATSVC_PRICES has no price for" in message


def test_a_cost_limit_holds_for_models_a_pattern_prices_and_ignores_an_unused_title_model():
    patterned = json.dumps({"currency": "CNY", "models": {"qwen-*": {"input": 1, "output": 1}}})
    settings = chatsvc.Settings.from_env(
        {
            "CHATSVC_PRICES": patterned,
            "CHATSVC_LIMIT_COST_PER_MONTH": "5",
            "CHATSVC_ALLOWED_MODELS": "qwen-turbo",
            "CHATSVC_VISION_MODEL": "qwen-vl-max",
        },
        env_file=None,
    )
    assert settings.unpriced_models() == ""
    # titles that are not the model's never call CHATSVC_TITLE_MODEL
    for titles in ("first-line", "off"):
        chatsvc.Settings.from_env(
            {
                "CHATSVC_PRICES": PRICES,
                "CHATSVC_LIMIT_COST_PER_MONTH": "5",
                "CHATSVC_TITLES": titles,
                "CHATSVC_TITLE_MODEL": "qwen-flash",
            },
            env_file=None,
        )


def test_an_admins_cost_limit_is_refused_while_a_model_has_no_price(make_service):
    service = make_service(CHATSVC_ADMIN_TOKEN=ADMIN, CHATSVC_PRICES=PRICES, CHATSVC_ALLOWED_MODELS="qwen-turbo")
    with service.client() as client:
        r = put_limits(client, {"cost_per_month": 5})
        assert r.status_code == 422 and r.json()["code"] == "invalid_request", r.text
        assert "qwen-turbo (CHATSVC_ALLOWED_MODELS)" in r.json()["detail"]
        assert client.get(f"{API}/admin/users/alice/limits", headers=AS_ADMIN).json()["limits"] == {}
        # what can hold still can
        r = put_limits(client, {"cost_per_month": None, "tokens_per_day": 1000})
        assert r.status_code == 200, r.text
        assert r.json()["limits"] == {"cost_per_month": None, "tokens_per_day": 1000}
    without_prices = make_service(CHATSVC_ADMIN_TOKEN=ADMIN)
    with without_prices.client() as client:
        r = put_limits(client, {"cost_per_month": 5})
        assert r.status_code == 422 and "CHATSVC_PRICES" in r.json()["detail"], r.text


def test_a_cost_limit_holds_over_every_model_once_each_is_priced(make_service, fake):
    both = json.dumps(
        {
            "currency": "CNY",
            "models": {"qwen-plus": {"input": 1000, "output": 1000}, "qwen-turbo": {"input": 1000, "output": 1000}},
        }
    )
    service = make_service(
        CHATSVC_PRICES=both, CHATSVC_ALLOWED_MODELS="qwen-turbo", CHATSVC_LIMIT_COST_PER_MONTH="0.05"
    )
    with service.client() as client:
        statuses = []
        for n in range(3):
            fake.push(
                Reply.answer(["x"], usage={"prompt_tokens": 50000, "completion_tokens": 50000, "total_tokens": 100000})
            )
            statuses.append(client.post(f"{API}/chat/s{n}", json={"message": "hi", "model": "qwen-turbo"}).status_code)
        assert statuses[0] == 200 and 429 in statuses, statuses


# ── limit values: a sentence, never a traceback or a 500 ──────────────────────────────────


@pytest.mark.parametrize("kind", chatsvc.LIMIT_KINDS)
@pytest.mark.parametrize("number", [b"1" + b"0" * 400, b"-1" + b"0" * 400, b"1" + b"0" * 400 + b".0", b"1e400"])
def test_a_huge_limit_is_a_422_not_a_500(make_service, kind, number):
    service = make_service(CHATSVC_ADMIN_TOKEN=ADMIN, CHATSVC_PRICES=PRICES)
    with TestClient(chatsvc.create_app(service.settings), raise_server_exceptions=False) as client:
        r = put_limits(client, b'{"%s": %s}' % (kind.encode(), number))  # valid JSON: Python reads an int
        assert r.status_code == 422 and r.json()["code"] == "invalid_request", r.text
        assert r.json()["detail"].startswith(f"'{kind}' must be null (no limit) or ")


def test_an_admins_cost_limit_reaches_its_documented_maximum_and_no_further(make_service):
    with make_service(CHATSVC_ADMIN_TOKEN=ADMIN, CHATSVC_PRICES=PRICES).client() as client:
        for cost in (chatsvc.MAX_COST, 999_999_999.999999, 0.000003):
            r = put_limits(client, {"cost_per_month": cost})
            assert r.status_code == 200 and r.json()["limits"]["cost_per_month"] == cost, r.text
        for cost in (1_000_000_000.000001, 1_000_000_001, 0.0000001):
            r = put_limits(client, {"cost_per_month": cost})
            assert r.status_code == 422, r.text
            assert "an amount from 0 to 1000000000 with at most 6 decimal places" in r.json()["detail"]
    maximum = {DOC["components"]["schemas"]["UserLimitsUpdate"]["properties"]["cost_per_month"]["maximum"]}
    assert maximum == {chatsvc.MAX_COST}


@pytest.mark.parametrize(
    "value",
    ["1e999999999", "9e999999", "1e3", "5_000", "\u0665", "\u0661\u0662", "-0", "+5", "5.", ".5", "0x10", "Infinity",
     "5 000", "12.3456789", "1000000000.000001", "10000000000"],
)  # fmt: skip
def test_the_cost_limit_setting_takes_only_a_plain_decimal(value):
    message = refused_at_start({"CHATSVC_LIMIT_COST_PER_MONTH": value, "CHATSVC_PRICES": PRICES})
    assert message.startswith(f"CHATSVC_LIMIT_COST_PER_MONTH={value!r}: must be an amount of at least 0")


def test_the_command_says_the_sentence_without_a_traceback(tmp_path):
    from test_cli import chatsvc as command

    for env in (
        {"CHATSVC_LIMIT_COST_PER_MONTH": "1e999999999", "CHATSVC_PRICES": PRICES},
        {"CHATSVC_LIMIT_COST_PER_MONTH": "5", "CHATSVC_PRICES": PRICES, "CHATSVC_ALLOWED_MODELS": "qwen-turbo"},
        {"CHATSVC_ADMIN_TOKEN": f"{ADMIN} "},
    ):
        run = command("--check", env=env, cwd=tmp_path)
        assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
        assert run.stderr.startswith("chatsvc: bad configuration: CHATSVC_") and run.stderr.count("\n") == 1
        assert ADMIN not in run.stderr


@pytest.mark.parametrize("value", ["0", "25", "12.5", "0.000001", " 7.25 ", "1000000000", "1000000000.000000"])
def test_the_cost_limit_setting_takes_a_plain_decimal(value):
    settings = chatsvc.Settings.from_env(
        {"CHATSVC_LIMIT_COST_PER_MONTH": value, "CHATSVC_PRICES": PRICES}, env_file=None
    )
    assert str(settings.limit_cost_per_month) == value.strip()


@pytest.mark.parametrize(
    "env", [f"CHATSVC_LIMIT_{kind.upper()}" for kind in chatsvc.LIMIT_KINDS if kind != "cost_per_month"]
)
@pytest.mark.parametrize("value", ["1e3", "5_000", "\u0665", "-0", "+5", "5.0", "1" + "0" * 400])
def test_a_token_or_answer_limit_setting_takes_only_plain_digits(env, value):
    message = refused_at_start({env: value})
    assert message.startswith(f"{env}={value!r}: must be a whole number from 0 to 9007199254740991")


# ── paging every user ─────────────────────────────────────────────────────────────────────


def test_paging_every_user_reaches_every_user_when_one_is_the_empty_owner(make_service, fake):
    before = make_service()  # no CHATSVC_USER_HEADER: owner ''
    with before.client() as client:
        answered(client, "s0")
    after = make_service(CHATSVC_USER_HEADER="X-User-Id", CHATSVC_ADMIN_TOKEN=ADMIN)  # the same database
    with after.client() as client:
        answered(client, "a1", headers={"X-User-Id": "alice"})
        answered(client, "b1", headers={"X-User-Id": "bob"})
        for as_csv in (False, True):
            seen, cursor = [], None
            for _ in range(5):
                params = {"group_by": "user", "limit": 1, **({"cursor": cursor} if cursor is not None else {})}
                if as_csv:
                    r = client.get(f"{API}/usage", params={**params, "format": "csv"}, headers=AS_ADMIN)
                    seen += [line.split(",", 1)[0] for line in r.text.splitlines()[1:]]
                    cursor = r.headers.get("x-next-cursor")
                else:
                    page = client.get(f"{API}/usage", params=params, headers=AS_ADMIN).json()
                    seen += [g["key"] for g in page["groups"]]
                    cursor = page["next_cursor"]
                if not cursor:  # what a client does with "" (JS, Python: falsy)
                    break
            assert seen == ["", "alice", "bob"] and cursor is None, (as_csv, seen, cursor)


def test_a_usage_cursor_is_never_empty_and_belongs_to_its_report(make_service, fake):
    service = make_service(CHATSVC_USER_HEADER="X-User-Id", CHATSVC_ADMIN_TOKEN=ADMIN)
    with service.client() as client:
        answered(client, "a1", headers={"X-User-Id": "alice"})
        answered(client, "b1", headers={"X-User-Id": "bob"})
        r = client.get(f"{API}/usage", params={"group_by": "user", "cursor": ""}, headers=AS_ADMIN)
        assert r.status_code == 422 and r.json()["detail"].startswith("'cursor' is empty"), r.text
        page = client.get(f"{API}/usage", params={"group_by": "user", "limit": 1}, headers=AS_ADMIN).json()
        assert page["next_cursor"]
        r = client.get(f"{API}/usage", params={"group_by": "model", "cursor": page["next_cursor"]}, headers=AS_ADMIN)
        assert r.status_code == 422 and "another report" in r.json()["detail"], r.text
        r = client.get(f"{API}/usage", params={"cursor": page["next_cursor"]}, headers={"X-User-Id": "alice"})
        assert r.status_code == 422, r.text  # group_by=day by default


# ── docs/openapi.json against the routes ──────────────────────────────────────────────────


def test_an_admins_limits_with_a_cost_of_6_places_fit_the_document(make_service):
    with make_service(CHATSVC_ADMIN_TOKEN=ADMIN, CHATSVC_PRICES=PRICES).client() as client:
        body = {"cost_per_month": 12.345678, "tokens_per_day": 1000}
        conforms(body, "UserLimitsUpdate")  # a body CONTRACT.md allows
        r = client.put(f"{API}/admin/users/alice/limits", json=body, headers=AS_ADMIN)
        assert r.status_code == 200, r.text
        conforms(r.json(), "UserLimits")
    for cost in (12.3456789, 1_000_000_000.5, -1):  # 7 places, over the maximum, under 0
        with pytest.raises(jsonschema.ValidationError):
            conforms({"cost_per_month": cost}, "UserLimitsUpdate")


def user_parameters():
    for path in ADMIN_PATHS:
        for method, op in DOC["paths"][path].items():
            (user,) = [p for p in op["parameters"] if p["name"] == "user"]
            yield f"{method} {path}", user["schema"]
    (user,) = [p for p in DOC["paths"]["/api/v1/usage"]["get"]["parameters"] if p["name"] == "user"]
    yield "get /api/v1/usage ?user=", user["schema"]


@pytest.mark.parametrize(
    "user", ["alice", "", "a/b", "é", "\u0085", "\u00a0x", "a b", "\x00", "\x1f", "\x7f", "tab\there", "x" * 257]
)
def test_the_documents_user_is_what_the_routes_take(user):
    """A control character (or 257 characters) is a 422 (check_owner): each user parameter's schema says so."""
    try:
        chatsvc.check_owner(user, "user")
        taken = True
    except chatsvc.ApiError:
        taken = False
    for where, schema in user_parameters():
        allowed = len(user) <= schema["maxLength"] and re.search(schema["pattern"], user) is not None
        assert allowed == taken, (where, user)


def test_every_new_operation_has_a_200_example():
    for path, method in [
        ("/api/v1/usage", "get"),
        ("/api/v1/usage/limits", "get"),
        ("/api/v1/admin/users/{user}/limits", "get"),
        ("/api/v1/admin/users/{user}/limits", "put"),
        ("/api/v1/admin/users/{user}/usage/reset", "post"),
    ]:
        content = DOC["paths"][path][method]["responses"]["200"]["content"]["application/json"]
        assert "example" in content or "examples" in content, (method, path)
        schema = content["schema"]["$ref"].rsplit("/", 1)[-1]
        for example in [content["example"]] if "example" in content else [e["value"] for e in content["examples"]]:
            conforms(example, schema)


# ── tokens: what is configured is what a request can carry ────────────────────────────────


@pytest.mark.parametrize("env", ["CHATSVC_ADMIN_TOKEN", "CHATSVC_API_TOKEN"])
@pytest.mark.parametrize("token", [f"{ADMIN} ", f" {ADMIN}", f"{ADMIN}\t", f"{ADMIN}\n", "\u00a0" + ADMIN])
def test_a_token_with_surrounding_whitespace_is_refused_at_start(env, token):
    message = refused_at_start({env: token})
    assert message == f"{env}: must not start or end with whitespace (a request's token is read without)."


def test_the_admin_token_is_read_as_the_api_token_is(make_service):
    service = make_service(CHATSVC_ADMIN_TOKEN=ADMIN)  # no API token: the admin routes check it themselves
    with service.client() as client:
        for value, status in [(f"Bearer {ADMIN}", 200), (f"bearer   {ADMIN} ", 200), (f"Bearer {ADMIN}x", 401)]:
            r = client.get(f"{API}/admin/users/alice/limits", headers={"Authorization": value})
            assert r.status_code == status, (value, r.text)
