"""The API docs at /docs (Swagger UI, served by chatsvc from swagger-ui-py) in headless Chromium:
every documented operation is on the page, and a request made from it, with the API token given
in its Authorize dialog, succeeds."""

from __future__ import annotations

import json

import pytest
from live import LiveServer
from playwright.sync_api import expect

TOKEN = "docs-token-123"
REPORT_POLICY_VIOLATIONS = """document.addEventListener('securitypolicyviolation', (e) => console.error(
    `policy violation: ${e.effectiveDirective} ${e.blockedURI} at ${e.sourceFile}:${e.lineNumber} ${e.sample}`));"""


@pytest.fixture
def docs(request, browser, make_service):
    """The page in a new browser profile; parametrized (indirect), what its localStorage holds first."""
    with LiveServer(make_service(CHATSVC_API_TOKEN=TOKEN).settings) as live:
        stored = [{"name": k, "value": v} for k, v in getattr(request, "param", {}).items()]
        state = {"cookies": [], "origins": [{"origin": live.url, "localStorage": stored}]}
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
