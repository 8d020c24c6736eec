"""The playground at / in headless Chromium, against chatsvc and the fake DashScope: what a person
sees and does (send and watch the chunks, reload mid-answer, stop, regenerate and flip versions,
edit, search, delete, errors, the API token), what the database holds afterwards, and an
accessibility check by axe-core. A screenshot is saved for a person to look at."""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from fake_dashscope import Reply
from live import LiveServer

API = "/api/v1"
ARTIFACTS = Path(os.environ.get("CHATSVC_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts"))
WAIT = 15_000  # ms: how long an expectation waits for the page


class Playground:
    """The page, its server and its database."""

    def __init__(self, browser, service, path: str = "/"):
        self.service = service
        self.live = LiveServer(service.settings).__enter__()
        self.context = browser.new_context(viewport={"width": 1200, "height": 800})
        # what the page's Content-Security-Policy refused: the page must need nothing it forbids
        self.context.add_init_script(
            "document.addEventListener('securitypolicyviolation', (e) => console.error("
            "`policy violation: ${e.effectiveDirective} ${e.blockedURI} at ${e.sourceFile}:${e.lineNumber}`));"
        )
        self.page = self.context.new_page()
        self.problems: list[str] = []  # script errors, failed loads, policy violations: none is expected
        self.requests: list[tuple[str, str]] = []  # (method, URL) of every request the page made
        self.page.on("request", lambda r: self.requests.append((r.method, r.url)))
        self.page.on("pageerror", lambda error: self.problems.append(f"page error: {error}"))
        self.page.on("console", lambda m: m.type == "error" and self.problems.append(f"console: {m.text}"))
        self.page.on("dialog", lambda dialog: dialog.accept())
        self.page.goto(self.live.url + path)

    def close(self) -> None:
        self.context.close()
        self.live.__exit__(None, None, None)

    def send(self, text: str) -> None:
        self.page.fill("#message", text)
        self.page.click("#send")

    def answers(self):
        return self.page.locator("#messages li.assistant")

    def last_answer(self):
        return self.answers().last

    def wait_idle(self) -> None:
        """The answer ended and the page shows what the server stored (Send is enabled again). (A
        selector, not wait_for_function, whose polling evaluates a string the page's policy forbids.)"""
        idle = self.page.locator("body:has(#send:enabled):not(:has(#messages li[data-status='streaming']))")
        expect(idle).to_have_count(1, timeout=WAIT)

    def rows(self, sql: str, *args):
        return self.service.rows(sql, *args)


@pytest.fixture
def playground(browser, service):
    p = Playground(browser, service)
    yield p
    p.close()
    assert p.problems == [], p.problems


def expect(locator):
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(locator)


def record_answer_texts(page) -> None:
    """Keep every text the newest answer shows, in order, as the page draws it."""
    page.evaluate("""() => {
        window.seen = [];
        new MutationObserver(() => {
            const items = document.querySelectorAll('#messages li.assistant .content');
            const text = items.length ? items[items.length - 1].textContent : null;
            if (text !== null && window.seen[window.seen.length - 1] !== text) window.seen.push(text);
        }).observe(document.querySelector('#messages'), {childList: true, subtree: true, characterData: true});
    }""")


def test_send_shows_the_chunks_as_they_arrive_and_the_answer_is_stored(playground, fake):
    fake.push(Reply.answer(["Once ", "upon ", "a time."], pause=0.3))
    record_answer_texts(playground.page)
    playground.send("Tell me a story")
    expect(playground.last_answer().locator(".content")).to_have_text("Once upon a time.", timeout=WAIT)
    playground.wait_idle()
    seen = []  # (rendered as Markdown: a paragraph, without its trailing space)
    for text in playground.page.evaluate("window.seen"):
        if text.strip() and (not seen or seen[-1] != text.strip()):
            seen.append(text.strip())
    assert seen == ["Once", "Once upon", "Once upon a time."]  # each chunk drawn as it arrived
    rows = playground.rows("SELECT role, content, status FROM messages ORDER BY created_at, role DESC")
    assert [(r["role"], r["content"], r["status"]) for r in rows] == [
        ("user", "Tell me a story", "complete"), ("assistant", "Once upon a time.", "complete")]  # fmt: skip
    expect(playground.page.locator("#conversations button")).to_have_text(["Tell me a story"])
    expect(playground.page.locator("#messages li.user .content")).to_have_text(["Tell me a story"])


def test_a_reload_mid_answer_shows_it_continue(playground, fake):
    words = [f"w{i} " for i in range(30)]
    fake.push(Reply.answer(words, pause=0.1))
    playground.send("long one")
    expect(playground.last_answer().locator(".content")).to_contain_text("w2 ", timeout=WAIT)
    playground.page.reload()
    record_answer_texts(playground.page)
    expect(playground.last_answer().locator(".content")).to_have_text("".join(words), timeout=WAIT)
    playground.wait_idle()
    seen = playground.page.evaluate("window.seen")
    assert any(0 < len(t) < len("".join(words)) for t in seen), seen  # still arriving after the reload
    row = playground.rows("SELECT content, status FROM messages WHERE role = 'assistant'")[0]
    assert (row["content"], row["status"]) == ("".join(words), "complete")


def test_stop_keeps_what_was_written(playground, fake):
    fake.push(Reply.answer([f"w{i} " for i in range(200)], pause=0.05))
    playground.send("go on forever")
    expect(playground.last_answer().locator(".content")).to_contain_text("w3 ", timeout=WAIT)
    playground.page.click("#stop")
    expect(playground.last_answer().locator(".state")).to_have_text("Stopped.", timeout=WAIT)
    row = playground.rows("SELECT content, status FROM messages WHERE role = 'assistant'")[0]
    assert row["status"] == "stopped" and row["content"].startswith("w0 w1 w2 w3 ")
    expect(playground.last_answer().locator(".content")).to_have_text(row["content"])
    expect(playground.page.locator("#send")).to_be_enabled()


def test_regenerate_and_flip_between_versions(playground, fake):
    fake.push(Reply.answer(["first answer"]))
    playground.send("question")
    playground.wait_idle()
    fake.push(Reply.answer(["second ", "answer"], pause=0.1))
    playground.last_answer().locator(".regenerate").click()
    answer = playground.last_answer()
    expect(answer.locator(".content")).to_have_text("second answer", timeout=WAIT)
    playground.wait_idle()
    expect(playground.answers()).to_have_count(1)  # one branch shown: the new version replaces the old
    expect(answer.locator(".position")).to_have_text("2/2")
    answer.get_by_role("button", name="Previous version").click()
    expect(playground.last_answer().locator(".content")).to_have_text("first answer", timeout=WAIT)
    expect(playground.last_answer().locator(".position")).to_have_text("1/2")
    first = playground.rows("SELECT id FROM messages WHERE content = 'first answer'")[0]["id"]
    assert playground.rows("SELECT current_message_id FROM conversations")[0]["current_message_id"] == first
    playground.last_answer().get_by_role("button", name="Next version").click()
    expect(playground.last_answer().locator(".content")).to_have_text("second answer", timeout=WAIT)


def test_edit_and_resend(playground, fake):
    fake.push(Reply.answer(["about cats"]))
    playground.send("tell me about cats")
    playground.wait_idle()
    fake.push(Reply.answer(["about dogs"]))
    playground.page.locator("#messages li.user .edit").click()
    playground.page.get_by_label("Edit message").fill("tell me about dogs")
    playground.page.get_by_role("button", name="Send edit").click()
    expect(playground.last_answer().locator(".content")).to_have_text("about dogs", timeout=WAIT)
    playground.wait_idle()
    question = playground.page.locator("#messages li.user")
    expect(question.locator(".content")).to_have_text("tell me about dogs")
    expect(question.locator(".position")).to_have_text("2/2")
    users = playground.rows("SELECT content, parent_id FROM messages WHERE role = 'user' ORDER BY created_at")
    assert [u["content"] for u in users] == ["tell me about cats", "tell me about dogs"]
    assert users[0]["parent_id"] is None and users[1]["parent_id"] is None  # siblings: the first message edited


def test_search_finds_a_conversation_and_opens_it(playground, fake):
    fake.default = Reply.answer(["noted"])
    with playground.live.client() as client:
        for sid, text in (("Fruit", "I like bananas"), ("Vegetables", "I like carrots")):
            client.post(f"{API}/context/conversations", json={"session_id": sid, "title": sid})
            assert client.post(f"{API}/chat/{sid}", json={"message": text}).status_code == 200
    playground.page.reload()
    expect(playground.page.locator("#conversations button")).to_have_count(2, timeout=WAIT)
    playground.page.get_by_label("Search conversations").fill("banana")
    expect(playground.page.locator("#conversations button")).to_have_text(["Fruit"], timeout=WAIT)
    expect(playground.page.locator("#conversations .snippet")).to_contain_text("I like bananas")
    playground.page.locator("#conversations button").click()
    expect(playground.page.locator("#title")).to_have_text("Fruit")
    expect(playground.page.locator("#messages li.user .content")).to_have_text(["I like bananas"])
    playground.page.get_by_label("Search conversations").fill("nothing like this")
    expect(playground.page.locator("#no-conversations")).to_be_visible(timeout=WAIT)


def test_new_and_delete_conversation(playground, fake):
    fake.default = Reply.answer(["ok"])
    playground.send("keep me")
    playground.wait_idle()
    playground.page.click("#new-conversation")
    expect(playground.page.locator("#title")).to_have_text("New conversation")
    expect(playground.page.locator("#messages li")).to_have_count(0)
    playground.send("delete me")
    playground.wait_idle()
    expect(playground.page.locator("#conversations button")).to_have_count(2)
    playground.page.click("#delete-conversation")  # the confirmation dialog is accepted
    expect(playground.page.locator("#conversations button")).to_have_text(["keep me"], timeout=WAIT)
    expect(playground.page.locator("#title")).to_have_text("New conversation")
    titles = playground.rows("SELECT title FROM conversations")
    assert [t["title"] for t in titles] == ["keep me"]


def test_an_upstream_error_shows_what_the_seed_client_shows(playground, fake):
    fake.push(Reply.error(401, "invalid_api_key", "Incorrect API key provided."))
    playground.send("hi")
    expect(playground.page.locator("#notice")).to_contain_text("rejected the configured API key", timeout=WAIT)
    playground.wait_idle()
    expect(playground.last_answer().locator(".state")).to_contain_text("Failed: ")
    row = playground.rows("SELECT status, error_code FROM messages WHERE role = 'assistant'")[0]
    assert (row["status"], row["error_code"]) == ("failed", "upstream_auth")


def test_a_refused_message_shows_the_detail(browser, make_service, fake):
    p = Playground(browser, make_service(CHATSVC_MAX_MESSAGE_CHARS="10"))
    try:
        p.send("far more than ten characters")
        expect(p.page.locator("#notice")).to_contain_text("'message' is longer than 10 characters", timeout=WAIT)
        expect(p.page.locator("#send")).to_be_enabled()
        expect(p.page.locator("#message")).to_have_value("far more than ten characters")  # nothing lost
        expect(p.page.locator("#messages li")).to_have_count(0)
        assert p.rows("SELECT id FROM messages") == []
        assert fake.requests == []
    finally:
        p.close()


def test_the_api_token_is_asked_for_and_used(browser, make_service, fake):
    fake.default = Reply.answer(["with the token"])
    p = Playground(browser, make_service(CHATSVC_API_TOKEN="s3cret-token"))
    try:
        expect(p.page.get_by_label("API token")).to_be_visible(timeout=WAIT)
        p.page.get_by_label("API token").fill("s3cret-token")
        p.page.get_by_role("button", name="Use token").click()
        expect(p.page.locator("#token-form")).to_be_hidden()
        p.send("hello")
        expect(p.last_answer().locator(".content")).to_have_text("with the token", timeout=WAIT)
        p.wait_idle()
        p.page.reload()  # the token stays in this browser
        expect(p.page.locator("#conversations button")).to_have_text(["hello"], timeout=WAIT)
        expect(p.page.locator("#token-form")).to_be_hidden()
        assert_accessible(p.page)
        # until it is forgotten: then the page asks again
        p.page.get_by_role("button", name="Forget token").click()
        expect(p.page.get_by_label("API token")).to_be_visible(timeout=WAIT)
        expect(p.page.get_by_role("button", name="Forget token")).to_be_hidden()
        assert p.page.evaluate("localStorage.length") == 0
        assert_accessible(p.page)
    finally:
        p.close()


def assert_accessible(page) -> None:
    from axe_playwright_python.sync_playwright import Axe

    results = Axe().run(page, options={"runOnly": ["wcag2a", "wcag2aa", "wcag21aa", "best-practice"]})
    assert results.violations_count == 0, results.generate_report()


SESSION_ID = re.compile(r"(?!\.+$)[A-Za-z0-9._-]{1,128}")


@pytest.mark.parametrize("address", ["#other/stop?", "#../x", "#%2E%2E", "#a%2Fb", "#%E0%A4%A", "#" + "x" * 129])
def test_an_address_that_is_no_session_id_opens_no_conversation(browser, service, fake, address):
    """A link to `/#other/stop?` made the next Send a POST to another route (the seed's ChatClient
    puts the id into its URLs unencoded), with the user's token: only a valid session id opens a
    conversation; anything else is ignored and cleared from the address, and Send starts a new one."""
    fake.default = Reply.answer(["a new one"])
    p = Playground(browser, service, path="/" + address)
    try:
        expect(p.page.locator("#title")).to_have_text("New conversation")
        with p.page.expect_request(lambda r: r.method == "POST", timeout=WAIT) as posted:
            p.send("hello")
        assert re.fullmatch(f"{API}/chat/c-[a-z0-9-]+/stream", urlsplit(posted.value.url).path), posted.value.url
        p.wait_idle()
        expect(p.last_answer().locator(".content")).to_have_text("a new one")
        [row] = p.rows("SELECT DISTINCT session_id FROM messages")
        session_id = row["session_id"]
        assert SESSION_ID.fullmatch(session_id) and session_id.startswith("c-"), session_id
        expect(p.page).to_have_url(f"{p.live.url}/#{session_id}")  # the bad address was cleared
        api = {(method, urlsplit(url).path) for method, url in p.requests if urlsplit(url).path.startswith(API)}
        conversation = f"{API}/context/conversations/{session_id}"
        allowed = {("GET", f"{API}/context/conversations"), ("GET", conversation), ("GET", f"{API}/models"),
                   ("GET", f"{API}/chat/{session_id}/stream"), ("POST", f"{API}/chat/{session_id}/stream")}  # fmt: skip
        assert api <= allowed, api - allowed
        assert ("POST", f"{API}/chat/{session_id}/stream") in api
    finally:
        p.close()
    assert p.problems == [], p.problems


def test_a_link_in_the_page_to_no_session_id_changes_nothing(playground, fake):
    """The address changed while a conversation is open (a link, the address bar): an id opens its
    conversation, anything else leaves the open one as it is, and the address names it again."""
    fake.default = Reply.answer(["same"])
    playground.send("first")
    playground.wait_idle()
    [row] = playground.rows("SELECT DISTINCT session_id FROM messages")
    session_id = row["session_id"]
    playground.page.evaluate("location.hash = '#other/stop?'")
    expect(playground.page).to_have_url(f"{playground.live.url}/#{session_id}", timeout=WAIT)
    expect(playground.page.locator("#messages li.user .content")).to_have_text(["first"])
    playground.send("second")
    playground.wait_idle()
    assert {r["session_id"] for r in playground.rows("SELECT session_id FROM messages")} == {session_id}
    assert not [url for method, url in playground.requests if "other" in url or "/stop" in url]


def test_accessibility_and_a_screenshot(playground, fake):
    """axe-core's checks (labels, names, contrast, landmarks, ...) on a page showing a conversation
    with reasoning and two versions of an answer; the screenshot is for a person to look at."""
    from axe_playwright_python.sync_playwright import Axe

    fake.push(Reply.answer(["The answer is 4."], reasoning=["2 and 2 ", "make 4"]))
    playground.send("What is 2 + 2?")
    playground.wait_idle()
    fake.push(Reply.answer(["4."], reasoning=["Simple sum"]))
    playground.last_answer().locator(".regenerate").click()
    expect(playground.last_answer().locator(".position")).to_have_text("2/2", timeout=WAIT)
    playground.wait_idle()
    reasoning = playground.last_answer().locator(".reasoning")
    expect(reasoning).to_be_visible()
    expect(reasoning.locator(".reasoning-text")).to_be_hidden()  # folded
    reasoning.locator("summary").click()
    expect(reasoning.locator(".reasoning-text")).to_have_text("Simple sum")
    for theme in ("light", "dark"):  # both themes: the toggle switches the page's colours
        if playground.page.evaluate("document.documentElement.dataset.theme") != theme:
            playground.page.click("#theme")
        expect(playground.page.locator(f"html[data-theme='{theme}']")).to_have_count(1)
        results = Axe().run(playground.page, options={"runOnly": ["wcag2a", "wcag2aa", "wcag21aa", "best-practice"]})
        assert results.violations_count == 0, f"{theme}: {results.generate_report()}"
        passed = {rule["id"] for rule in results.response["passes"]}
        assert {"label", "button-name", "color-contrast", "region", "landmark-one-main"} <= passed, passed  # they ran
    playground.page.click("#theme")  # (back to light for the rest)
    # the keyboard reaches every control in reading order: the conversations, the messages' tools, the composer
    playground.page.reload()
    expect(playground.last_answer().locator(".position")).to_have_text("2/2", timeout=WAIT)
    order = []
    for _ in range(19):
        playground.page.keyboard.press("Tab")
        order.append(playground.page.evaluate("(e => e.id || e.getAttribute('aria-label') || e.textContent.trim())"
                                              "(document.activeElement)"))  # fmt: skip
    assert order == ["API docs", "theme", "new-conversation", "search", "What is 2 + 2?", "import-button",
                     "delete-conversation", "Conversation settings and export", "messages", "Edit", "Fork from here",
                     "Delete this message and its answers", "Reasoning", "Previous version", "Regenerate",
                     "Fork from here", "Delete this message", "message", "send"], order  # fmt: skip
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / f"playground-{'sqlite' if playground.service.is_sqlite else 'postgresql'}.png"
    playground.page.screenshot(path=str(shot), full_page=True)
    print(f"screenshot: {shot}")
    (ARTIFACTS / "axe.json").write_text(json.dumps(results.response["violations"], indent=1))


def test_the_page_follows_an_answer_another_client_started(playground, fake):
    """The answer belongs to the server: a page opened on a conversation whose answer another
    client is writing shows it arrive, and Send waits for it."""
    fake.push(Reply.answer([f"x{i} " for i in range(20)], pause=0.1))
    done = threading.Event()

    def other_client():
        with playground.live.client() as client:
            client.post(f"{API}/chat/shared", json={"message": "from elsewhere"})
        done.set()

    thread = threading.Thread(target=other_client)
    thread.start()
    while playground.live.relay.registry.running(("", "shared")) is None:
        threading.Event().wait(0.01)
    playground.page.goto(playground.live.url + "/#shared")
    expect(playground.page.locator("#send")).to_be_disabled(timeout=WAIT)
    expect(playground.last_answer().locator(".content")).to_have_text("".join(f"x{i} " for i in range(20)),
                                                                      timeout=WAIT)  # fmt: skip
    playground.wait_idle()
    thread.join(10)
    assert done.is_set()


def test_without_the_user_header_the_page_says_so_and_asks_for_no_token(browser, make_service, fake):
    """CHATSVC_USER_HEADER is set by the proxy in front; reached without it, the page shows the
    service's detail (no token would help)."""
    p = Playground(browser, make_service(CHATSVC_USER_HEADER="X-User-Id"))
    try:
        expect(p.page.locator("#notice")).to_contain_text("needs the X-User-Id header", timeout=WAIT)
        expect(p.page.locator("#token-form")).to_be_hidden()
    finally:
        p.close()


def test_tool_calls_fold_under_the_answer_and_the_form_sends_the_app_s_results(browser, make_service, fake, tmp_path):
    """An answer that calls an MCP server's tool in its first round and one of the app's own (given in
    the page's App tools) in its second: both calls folded under it as they come, the server's with
    its result; it ends waiting, a form per pending call sends the result as the next turn and the
    answer to it appears as it streams; after a reload the stored steps show the same folded calls
    and the results turn its own folded block."""
    import time

    import httpx2 as httpx
    from mcp_server import McpProcess

    mcp = McpProcess.http(tmp_path)
    service = make_service(CHATSVC_MCP_SERVERS=json.dumps({"t": mcp.entry()}))
    p = Playground(browser, service)
    try:
        deadline = time.monotonic() + 20
        while b'chatsvc_mcp_server_up{server="t"} 1.0' not in httpx.get(p.live.url + "/metrics").content:
            assert time.monotonic() < deadline, "chatsvc did not list the MCP server's tools"
            time.sleep(0.05)
        weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string"}}}}}  # fmt: skip
        server_call = Reply.tool_calls([("t__echo", {"text": "hi"})])
        app_call = Reply.tool_calls([("get_weather", {"city": "Paris"})], content=["Looking. "])
        hold = threading.Event()
        fake.push(server_call, app_call, Reply.answer(["It is ", "sunny."], hold=hold, hold_at=2))
        page = p.page
        page.click("#app-tools-fold summary")
        page.fill("#app-tools", json.dumps([weather]))
        p.send("Weather in Paris?")
        answer = p.answers().first
        calls = answer.locator(".steps details.tool-call")
        expect(calls.locator(".tool-name")).to_have_text(["t__echo", "get_weather"], timeout=WAIT)
        expect(calls.nth(0).locator(".tool-outcome")).to_have_text(re.compile(r"^ok, \d+ ms$"), timeout=WAIT)
        expect(answer.locator(".content")).to_have_text("Looking. ")
        p.wait_idle()
        call_id = app_call.calls[0]["id"]
        field = page.get_by_label(f"result for get_weather ({call_id})")
        expect(field).to_be_visible()
        expect(answer.locator(".state")).to_have_text("Waiting for the app's tool results.")
        expect(calls.nth(1).locator(".tool-outcome")).to_have_text("for the app")
        # folded: opened, a call shows its arguments and its result
        expect(calls.nth(0).locator(".tool-result")).not_to_be_visible()
        calls.nth(0).locator("summary").click()
        expect(calls.nth(0).locator(".tool-arguments")).to_have_text('{"text": "hi"}')
        expect(calls.nth(0).locator(".tool-result")).to_have_text("echo: hi")
        from axe_playwright_python.sync_playwright import Axe  # the folds and the form pass axe-core's checks

        results = Axe().run(page, options={"runOnly": ["wcag2a", "wcag2aa", "wcag21aa", "best-practice"]})
        assert results.violations_count == 0, results.generate_report()
        field.fill("sunny, 25°C")
        page.click(".send-results")
        expect(p.last_answer().locator(".content")).to_have_text("It is ", timeout=WAIT)  # drawn as it streams
        hold.set()
        expect(p.last_answer().locator(".content")).to_have_text("It is sunny.", timeout=WAIT)
        p.wait_idle()
        expect(page.locator("#notice")).to_have_text("")
        sent = fake.requests[-1].body
        assert [m for m in sent["messages"] if m["role"] == "tool"] == [
            {"role": "tool", "tool_call_id": server_call.calls[0]["id"], "content": "echo: hi"},
            {"role": "tool", "tool_call_id": call_id, "content": "sunny, 25°C"},
        ]
        assert sent["tools"][-1] == weather  # the page's App tools, sent again with the results
        rows = p.rows("SELECT role, content, tool_results FROM messages ORDER BY created_at, role DESC")
        assert [(r["role"], r["content"]) for r in rows] == [
            ("user", "Weather in Paris?"), ("assistant", "Looking. "),
            ("user", ""), ("assistant", "It is sunny.")]  # fmt: skip
        assert json.loads(rows[2]["tool_results"]) == [{"tool_call_id": call_id, "content": "sunny, 25°C"}]

        page.reload()
        expect(page.locator("#messages li.message")).to_have_count(4, timeout=WAIT)
        expect(page.locator("#messages li.message").nth(1).locator(".state")).to_have_text("")  # answered
        stored = page.locator("#messages li.message").nth(1).locator(".steps details.tool-call")
        expect(stored.locator(".tool-name")).to_have_text(["t__echo", "get_weather"])
        expect(stored.nth(0).locator(".tool-outcome")).to_have_text(re.compile(r"^ok, \d+ ms$"))
        expect(stored.nth(0).locator(".tool-result")).not_to_be_visible()  # folded
        stored.nth(0).locator("summary").click()
        expect(stored.nth(0).locator(".tool-result")).to_have_text("echo: hi")
        stored.nth(1).locator("summary").click()
        expect(stored.nth(1).locator(".tool-arguments")).to_have_text('{"city": "Paris"}')
        turn = page.locator("#messages li.tool")
        expect(turn.locator(".role")).to_have_text("Tool results")
        expect(turn.locator("details.tool-results summary")).to_have_text("1 result")
        expect(turn.locator("details.tool-results pre")).not_to_be_visible()
        turn.locator("details.tool-results summary").click()
        expect(turn.locator("details.tool-results pre")).to_have_text("sunny, 25°C")
        expect(page.locator(".tool-results-form")).to_have_count(0)  # answered: no form any more
        assert p.problems == [], p.problems
    finally:
        p.close()
        mcp.stop()
