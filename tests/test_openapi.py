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
    # the release's version, as the file has it (bump both together)
    assert served["info"]["version"] == chatsvc.__version__ == DOC["info"]["version"]
    # without CHATSVC_API_TOKEN nor CHATSVC_ADMIN_TOKEN, no operation needs a token: no scheme, no lock
    assert "security" not in served and "securitySchemes" not in served["components"]
    assert [op for ops in served["paths"].values() for op in ops.values() if op.get("security")] == []
    served["security"], served["components"]["securitySchemes"] = DOC["security"], DOC["components"]["securitySchemes"]
    for path, ops in DOC["paths"].items():
        for method, op in ops.items():
            if "security" in op:  # the admin operations, which say they are not enabled here
                description = served["paths"][path][method]["description"]
                assert description.startswith("**Not enabled here**: this service has no CHATSVC_ADMIN_TOKEN")
                served["paths"][path][method] = op
    for name in ("ChatRequest", "ConversationCreate", "ConversationPatch"):
        assert served["components"]["schemas"][name]["properties"]["model"].pop("enum") == ["qwen-plus", None]
    schemas = served["components"]["schemas"]
    for name in ("ChatRequest", "ConversationPatch"):  # CHATSVC_WEB_SEARCH=off: asking is refused
        assert schemas[name]["properties"]["web_search"].pop("enum") == [False, None]
    file_model = schemas["ConversationFile"]["properties"]["conversation"]["properties"]["model"]
    assert file_model["enum"] == ["qwen-plus", None]
    file_model["enum"] = None  # as docs/openapi.json has it
    assert served == DOC


def locks(document: dict) -> dict[tuple[str, str], list]:
    """Each operation's security requirement as Swagger UI reads it (its own, else the document's)."""
    default = document.get("security", [])
    return {(m, p): op.get("security", default) for p, ops in document["paths"].items() for m, op in ops.items()}


API_OPERATIONS = {(m, p) for p, ops in DOC["paths"].items() for m in ops if p.startswith("/api/")}
ADMIN_OPERATIONS = {(m, p) for p, ops in DOC["paths"].items() for m, op in ops.items() if "security" in op}
CHANNEL = ("get", "/api/v1/chat/{session_id}/stream")


@pytest.mark.parametrize("api_token", [None, "tok-secret-123"])
@pytest.mark.parametrize("admin_token", [None, "tok-do-not-log"])
def test_the_locks_say_which_token_each_operation_needs(make_service, api_token, admin_token):
    """/docs shows a lock where the service needs a token, and only there: the served document's
    security requirements follow CHATSVC_API_TOKEN and CHATSVC_ADMIN_TOKEN."""
    service = make_service(CHATSVC_API_TOKEN=api_token, CHATSVC_ADMIN_TOKEN=admin_token)
    with service.client() as client:
        served = client.get("/openapi.json").json()
    bearer = [{"bearer": []}] if api_token else []
    expected = {operation: [] for operation in locks(DOC)}
    expected.update({operation: bearer for operation in API_OPERATIONS})
    if api_token:
        expected[CHANNEL] = [{"bearer": []}, {"accessToken": []}]
    if admin_token:
        expected.update({operation: [{"adminToken": []}] for operation in ADMIN_OPERATIONS})
    assert ADMIN_OPERATIONS and locks(served) == expected
    schemes = served["components"].get("securitySchemes", {})
    wanted = ({"bearer", "accessToken"} if api_token else set()) | ({"adminToken"} if admin_token else set())
    assert set(schemes) == wanted
    for method, path in ADMIN_OPERATIONS:
        assert ("Not enabled here" in served["paths"][path][method].get("description", "")) is (admin_token is None)
    # what the document says is what the service does: an operation without a lock answers without a token
    with service.client() as client:
        assert client.get("/api/v1/context/conversations").status_code == (401 if api_token else 200)
        assert client.get("/healthz").status_code == 200
        assert client.get("/api/v1/admin/users/alice/limits").status_code == (401 if admin_token or api_token else 404)


def example_of(media: dict):
    """The example Swagger UI's "Try it out" fills in: the media type's, or the first of its examples."""
    if "example" in media:
        return media["example"]
    return next(iter(media["examples"].values()))["value"] if "examples" in media else None


ADMIN = "tok-do-not-log"


def test_every_operation_s_example_works(make_service, fake):
    """What "Try it out" sends on first use, sent to the service (fake model): every request body's
    example and every parameter's is accepted (2xx; 404 only for an id in the path that no
    conversation, message or file has)."""
    fake.default = Reply.answer(["Hello", "!"])
    service = make_service(
        CHATSVC_ADMIN_TOKEN=ADMIN,
        CHATSVC_PRICES=json.dumps({"currency": "CNY", "models": {"qwen-plus": {"input": 1000, "output": 1000}}}),
        CHATSVC_LIMIT_COST_PER_MONTH="100",
    )
    with service.client() as client:
        document = client.get("/openapi.json").json()
        operations = [(m, p, op) for p, ops in document["paths"].items() for m, op in ops.items()]
        bodies = {op["operationId"]: op["requestBody"]["content"] for _, _, op in operations if "requestBody" in op}
        # each has an example (the multipart upload's file is picked in the page: its text/plain one has)
        assert [name for name, content in bodies.items() if not any(map(example_of, content.values()))] == []
        chat = document["paths"]["/api/v1/chat/{session_id}"]["post"]
        assert example_of(chat["requestBody"]["content"]["application/json"]) == {"message": "Hello"}
        # the chat first (its example's session_id is the one every path example names: the chat makes it),
        # the deletions last, the conversation's own the very last
        conversation = "/api/v1/context/conversations/{session_id}"
        operations.sort(key=lambda o: (o[1] != "/api/v1/chat/{session_id}", o[0] == "delete", o[1] == conversation))
        tried = 0
        for method, path, op in operations:
            if (method, path) == CHANNEL:
                continue  # the event channel never ends by design (test_streaming.py)
            params = {x["name"]: x for x in op.get("parameters", [])}
            url = path.format(**{n: x["example"] for n, x in params.items() if x["in"] == "path"})
            query = {n: x["example"] for n, x in params.items() if x["in"] == "query" and "example" in x}
            headers = {"Authorization": f"Bearer {ADMIN}"} if op.get("security") else {}
            kwargs: dict = {}
            if "requestBody" in op:
                content_type, media = next((t, m) for t, m in op["requestBody"]["content"].items() if example_of(m))
                body = example_of(media)
                if op["operationId"] == "forkConversation":  # a message of the conversation the chat made
                    made = client.get(url.removesuffix("/fork") + "/messages").json()["messages"]
                    body = {**body, "message_id": made[0]["id"]}
                headers["Content-Type"] = content_type
                kwargs["content"] = body.encode() if isinstance(body, str) else json.dumps(body).encode()
            r = client.request(method.upper(), url, params=query, headers=headers, **kwargs)
            ids_in_path = {"message_id", "file_id"} & {n for n, x in params.items() if x["in"] == "path"}
            ok = r.status_code < 400 or (r.status_code == 404 and ids_in_path and "not_found" in r.json()["code"])
            assert ok, (method, path, r.status_code, r.text[:500])
            if tried == 0:  # the chat: its question and the answer are stored, in the conversation of the examples
                rows = service.rows("SELECT role, content FROM messages ORDER BY role DESC")
                assert rows == [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hello!"}]
                assert service.rows("SELECT session_id FROM conversations") == [{"session_id": "demo"}]
            tried += 1
        assert tried == len(operations) - 1


def test_the_contract_the_description_links_to_is_served(client):
    """The document's description links to docs/CONTRACT.md, relatively: from /docs that is
    /docs/CONTRACT.md, which chatsvc serves (the page cannot reach the repository)."""
    assert "[docs/CONTRACT.md](docs/CONTRACT.md)" in DOC["info"]["description"]
    r = client.get("/docs/CONTRACT.md")
    assert r.status_code == 200 and r.headers["content-type"] == "text/plain; charset=utf-8"
    assert r.content == (Path(__file__).resolve().parent.parent / "docs" / "CONTRACT.md").read_bytes()


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
