"""The API docs at /docs (Swagger UI, served by chatsvc from swagger-ui-py) in headless Chromium:
every documented operation is on the page, and a request made from it, with the API token given
in its Authorize dialog, succeeds."""

from __future__ import annotations

import contextlib
import json
import re

import pytest
from fake_dashscope import Reply
from live import LiveServer
from playwright.sync_api import expect

TOKEN = "docs-token-123"
REPORT_POLICY_VIOLATIONS = """document.addEventListener('securitypolicyviolation', (e) => console.error(
    `policy violation: ${e.effectiveDirective} ${e.blockedURI} at ${e.sourceFile}:${e.lineNumber} ${e.sample}`));"""


@contextlib.contextmanager
def docs_page(browser, service, stored: dict[str, str]):
    """/docs of a running service in a new browser profile whose localStorage first holds `stored`;
    at the end, nothing the page did was refused, failed or went outside chatsvc."""
    with LiveServer(service.settings) as live:
        state = {
            "cookies": [],
            "origins": [{"origin": live.url, "localStorage": [{"name": k, "value": v} for k, v in stored.items()]}],
        }
        context = browser.new_context(viewport={"width": 1200, "height": 900}, storage_state=state)
        # what the page's Content-Security-Policy refused (Swagger UI must need nothing it forbids)
        context.add_init_script(REPORT_POLICY_VIOLATIONS)
        page = context.new_page()
        problems: list[str] = []
        page.on("console", lambda m: m.text.startswith("policy violation") and problems.append(m.text))
        page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
        page.on("requestfailed", lambda r: problems.append(f"failed: {r.url}"))
        outside: list[str] = []  # the page must need nothing but chatsvc (a sidecar often has no internet)
        page.on("request", lambda r: r.url.startswith(live.url) or r.url.startswith("data:") or outside.append(r.url))
        page.goto(f"{live.url}/docs")
        page.live = live
        yield page
        context.close()
        assert problems == [] and outside == [], (problems, outside)


@pytest.fixture
def docs(request, browser, make_service):
    """The page of a service with CHATSVC_API_TOKEN; parametrized (indirect), what its localStorage holds first."""
    with docs_page(browser, make_service(CHATSVC_API_TOKEN=TOKEN), getattr(request, "param", {})) as page:
        yield page


def test_every_operation_is_on_the_page(docs):
    with docs.live.client() as client:
        document = client.get("/openapi.json").json()
    operations = [(method.upper(), path) for path, ops in document["paths"].items() for method in ops]
    blocks = docs.locator(".opblock")
    expect(blocks).to_have_count(len(operations), timeout=15_000)
    shown = set()
    for block in blocks.all():
        method = block.locator(".opblock-summary-method").inner_text().strip()
        path = block.locator(".opblock-summary-path").get_attribute("data-path")
        shown.add((method, path))
    assert shown == set(operations)


def test_a_request_made_from_the_page_succeeds_with_the_token(docs):
    with docs.live.client(headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        client.post("/api/v1/context/conversations", json={"session_id": "from-docs", "title": "made before"})
    docs.get_by_role("button", name="Authorize").first.click()
    dialog = docs.locator(".dialog-ux")
    dialog.locator("input[type=text], input[type=password]").first.fill(TOKEN)
    dialog.locator("button.modal-btn.authorize").first.click()  # the first scheme: bearer
    expect(dialog.locator(".auth-container").first).to_contain_text("Authorized")
    dialog.locator("button.modal-btn.btn-done").first.click()
    block = docs.locator("#operations-conversations-listConversations")
    block.locator(".opblock-summary").click()
    block.get_by_role("button", name="Try it out").click()
    block.get_by_role("button", name="Execute").click()
    status = block.locator(".live-responses-table .response .response-col_status")
    expect(status).to_have_text("200", timeout=15_000)
    expect(block.locator(".live-responses-table .microlight").first).to_contain_text("from-docs")
    # what was sent: the bearer token, as the Authorize dialog was given it
    expect(block.locator(".curl-command")).to_contain_text(f"Authorization: Bearer {TOKEN}")
    # kept for this page only: the browser's storage holds no second copy of the token
    assert TOKEN not in docs.evaluate("JSON.stringify(localStorage)")
    docs.reload()
    docs.get_by_role("button", name="Authorize").first.click()
    expect(docs.locator(".dialog-ux .auth-container").first).not_to_contain_text("Authorized")


EARLIER = {  # what the playground keeps, and what Swagger UI kept with persistAuthorization
    "chatsvc.playground.token": TOKEN,
    "authorized": json.dumps({"bearer": {"name": "bearer", "value": TOKEN}}),
}


@pytest.mark.parametrize("docs", [EARLIER], indirect=True)
def test_the_page_uses_the_token_the_playground_keeps(docs):
    """The token is kept once, by the playground: the docs page is authorized with it on load, and
    the copy Swagger UI kept with persistAuthorization (an earlier release) is removed."""
    block = docs.locator("#operations-conversations-listConversations")
    block.locator(".opblock-summary").click()
    block.get_by_role("button", name="Try it out").click()
    block.get_by_role("button", name="Execute").click()
    status = block.locator(".live-responses-table .response .response-col_status")
    expect(status).to_have_text("200", timeout=15_000)
    expect(block.locator(".curl-command")).to_contain_text(f"Authorization: Bearer {TOKEN}")
    assert docs.evaluate("Object.keys(localStorage)") == ["chatsvc.playground.token"]


def locked_operations(page) -> set[tuple[str, str]]:
    """The operations the page shows with a lock (an authorization button in their summary)."""
    expect(page.locator(".opblock").first).to_be_visible(timeout=15_000)
    locked = set()
    for block in page.locator(".opblock").all():
        if block.locator(".authorization__btn").count():
            method = block.locator(".opblock-summary-method").inner_text().strip()
            locked.add((method, block.locator(".opblock-summary-path").get_attribute("data-path")))
    return locked


def test_the_locks_are_where_the_token_is_needed(docs):
    """With CHATSVC_API_TOKEN: every /api/ operation shows a lock, the others (health, the pages) none."""
    with docs.live.client() as client:
        document = client.get("/openapi.json").json()
    api = {(m.upper(), p) for p, ops in document["paths"].items() for m in ops if p.startswith("/api/")}
    assert len(api) > 20 and locked_operations(docs) == api
    expect(docs.get_by_role("button", name="Authorize")).to_have_count(1)


@pytest.fixture
def open_docs(browser, make_service, fake):
    """The page of a service without CHATSVC_API_TOKEN (as `chatsvc` starts by default), the fake
    model answering; the playground's token kept in the browser all the same."""
    fake.default = Reply.answer(["Hello", "!"])
    service = make_service()
    with docs_page(browser, service, {"chatsvc.playground.token": "left-from-elsewhere"}) as page:
        page.service = service
        yield page


def test_without_a_token_no_lock_and_the_chat_example_answers(open_docs):
    """No token needed, none asked: no lock and no Authorize button; "Try it out" on the chat, its
    example as it comes (a plain "Hello" to the conversation "demo"), gets the answer, and both are stored."""
    docs = open_docs
    assert locked_operations(docs) == set()
    expect(docs.get_by_role("button", name="Authorize")).to_have_count(0)
    block = docs.locator("#operations-chat-chat")
    block.locator(".opblock-summary").click()
    block.get_by_role("button", name="Try it out").click()
    body = block.locator("textarea.body-param__text")
    expect(body).to_have_value(re.compile(r'^\{\s*"message": "Hello"\s*\}$'))
    expect(block.locator("input[placeholder=session_id]")).to_have_value("demo")
    block.get_by_role("button", name="Execute").click()
    expect(block.locator(".live-responses-table .response .response-col_status")).to_have_text("200", timeout=15_000)
    expect(block.locator(".live-responses-table .microlight").first).to_contain_text('"response": "Hello!"')
    expect(block.locator(".curl-command")).not_to_contain_text("Authorization")
    rows = docs.service.rows("SELECT role, content FROM messages ORDER BY role DESC")
    assert rows == [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hello!"}]
