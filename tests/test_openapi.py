"""The OpenAPI document at /openapi.json matches the app, and schemathesis finds no 5xx and no
response that breaks the document, against the running service and the fake DashScope."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from fake_dashscope import Reply
from live import LiveServer
from starlette.routing import Route

import chatsvc

DOC = json.loads((Path(__file__).resolve().parent.parent / "docs" / "openapi.json").read_text())


def test_every_route_is_documented_and_every_documented_route_exists():
    app = chatsvc.create_app(chatsvc.Settings.from_env({}, env_file=None))
    routes = [r for r in app.routes if isinstance(r, Route)]
    # a path parameter's converter (`{user:path}`) is the app's business: the document names the parameter
    served = {(m.lower(), re.sub(r":\w+}", "}", r.path)) for r in routes for m in r.methods - {"HEAD"}}
    documented = {(m, path) for path, ops in DOC["paths"].items() for m in ops}
    assert served == documented


def test_the_document_is_served(client):
    r = client.get("/openapi.json")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    served = r.json()
    for name in ("ChatRequest", "ConversationCreate", "ConversationPatch"):
        assert served["components"]["schemas"][name]["properties"]["model"].pop("enum") == ["qwen-plus", None]
    schemas = served["components"]["schemas"]
    for name in ("ChatRequest", "ConversationPatch"):  # CHATSVC_WEB_SEARCH=off: asking is refused
        assert schemas[name]["properties"]["web_search"].pop("enum") == [False, None]
    file_model = schemas["ConversationFile"]["properties"]["conversation"]["properties"]["model"]
    assert file_model["enum"] == ["qwen-plus", None]
    file_model["enum"] = None  # as docs/openapi.json has it
    assert served == DOC


@pytest.mark.slow
def test_schemathesis_finds_no_5xx_and_no_nonconforming_response(tmp_path, fake, make_service):
    """Runs the schemathesis CLI against the running service: every check, a bounded number of
    examples per operation, the stateful phase included."""
    fake.default = Reply.answer(["fuzzed", " answer"])
    # A context budget large enough for any schema-valid message and system prompt: the budget is a
    # limit on their sum, which no schema can state (test_chatsvc.py tests it).
    service = make_service(CHATSVC_MAX_BODY_BYTES="65536", CHATSVC_MAX_CONTEXT_TOKENS="100000")
    with LiveServer(service.settings) as live:

        def schemathesis(*args: str, seconds: int) -> None:
            command = [
                sys.executable, "-m", "schemathesis.cli", "--config-file",
                str(Path(__file__).parent / "schemathesis.toml"), "run", f"{live.url}/openapi.json",
                "--max-examples", "25", "--seed", "1", "--workers", "1", "--request-timeout", "10",
                "--max-time", str(seconds), "--suppress-health-check", "all",
                "--report", "junit", "--report-dir", str(tmp_path), *args,
            ]  # fmt: skip
            run = subprocess.run(command, capture_output=True, text=True, timeout=300)
            print(run.stdout[-3000:])
            assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]

        schemathesis(
            "--checks", "all",
            # Two stateful heuristics misread the contract's "a chat to an unknown session_id creates
            # it": a conversation made by POST /chat/{id} then deleted reads as "created resource not
            # found", and one deleted then made again by a chat as "deleted resource still available".
            # (Both chains, replayed by hand, answer 404 where they should.)
            "--exclude-checks", "ensure_resource_availability,use_after_free",
            # The event channel (GET .../stream) never ends by design; test_streaming.py covers it.
            "--exclude-operation-id", "channel", "--exclude-operation-id", "importConversation",
            seconds=75,
        )  # fmt: skip
        # An import on its own, with every check but two. A conversation file refers to its own
        # messages (a parent is an earlier message of the file), which no schema can say, so a
        # generated file is mostly a 422 naming that field, rightly (tests/test_export.py). And
        # /conversations/import is also the path of a conversation named "import": its Allow header
        # truthfully lists GET, PATCH and DELETE too.
        schemathesis(
            "--checks", "all", "--exclude-checks", "positive_data_acceptance,allow_header_conformance",
            "--include-operation-id", "importConversation", "--phases", "examples,coverage,fuzzing", seconds=45,
        )  # fmt: skip


@pytest.mark.slow
def test_schemathesis_with_the_admin_token_prices_and_limits(tmp_path, fake, make_service):
    """The usage and admin operations as an admin calls them: with CHATSVC_ADMIN_TOKEN carried, prices and
    global limits configured (without them, as above, the admin routes answer 404 and a cost limit a 422)."""
    fake.default = Reply.answer(["fuzzed", " answer"])
    admin = "tok-do-not-log"  # tests/support.py fails the run if a log line holds it
    service = make_service(
        CHATSVC_ADMIN_TOKEN=admin,
        CHATSVC_PRICES=json.dumps({"currency": "CNY", "models": {"qwen-plus": {"input": 1000, "output": 1000}}}),
        CHATSVC_LIMIT_COST_PER_MONTH="100",
        CHATSVC_LIMIT_TOKENS_PER_DAY="1000000",
        CHATSVC_MAX_BODY_BYTES="65536",
    )
    with LiveServer(service.settings) as live:
        command = [
            sys.executable, "-m", "schemathesis.cli", "--config-file",
            str(Path(__file__).parent / "schemathesis.toml"), "run", f"{live.url}/openapi.json",
            "--max-examples", "60", "--seed", "1", "--workers", "1", "--request-timeout", "10",
            "--max-time", "90", "--suppress-health-check", "all",
            "--report", "junit", "--report-dir", str(tmp_path),
            "-H", f"Authorization: Bearer {admin}",
            "--checks", "all", "--exclude-checks", "ensure_resource_availability,use_after_free",
            "--include-tag", "usage", "--include-tag", "admin",
        ]  # fmt: skip
        run = subprocess.run(command, capture_output=True, text=True, timeout=300)
        print(run.stdout[-3000:])
        assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
