"""The seed document's JavaScript ChatClient, verbatim, in headless Chromium against chatsvc.

The browser comes from conftest.py (Debian's Chromium, driven by Playwright).
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from fake_dashscope import Reply
from live import LiveServer

CHAT_CLIENT = (Path(__file__).resolve().parents[2] / "playground" / "chat_client.js").read_text(encoding="utf-8")
PAGE = f"""<!doctype html><meta charset="utf-8"><title>seed client</title>
<script>
{CHAT_CLIENT}
// Run one streamChat call and collect what each callback received.
window.runChat = (sessionId, message) => new Promise((resolve) => {{
    const calls = [];
    const chat = new ChatClient(sessionId);
    chat.streamChat(message, {{
        onStart: () => calls.push(["start"]),
        onChunk: (chunk, fullText) => calls.push(["chunk", chunk, fullText]),
        onEnd: (fullText) => {{ calls.push(["end", fullText]); resolve(calls); }},
        onError: (error) => {{
            calls.push(["error", error && error.message !== undefined ? error.message : String(error)]);
            resolve(calls);
        }},
    }}).catch((error) => {{ calls.push(["throw", error.message]); resolve(calls); }});
}});
</script>"""


@pytest.fixture
def page(browser, service):
    with LiveServer(service.settings) as live:
        context = browser.new_context()
        page = context.new_page()
        # The seed client uses relative URLs, so the page is served from chatsvc's own origin.
        page.route(f"{live.url}/seed-client.html", lambda route: route.fulfill(body=PAGE, content_type="text/html"))
        page.goto(f"{live.url}/seed-client.html")
        page.live = live
        yield page
        context.close()


def run_chat(page, session_id: str, message: str):
    return page.evaluate("([s, m]) => runChat(s, m)", [session_id, message])


def expected_calls(chunks: list[str]) -> list[list[str]]:
    calls, text = [["start"]], ""
    for chunk in chunks:
        text += chunk
        calls.append(["chunk", chunk, text])
    return [*calls, ["end", text]]


def test_normal_answer(page, fake):
    chunks = ["从前", "有座山，", "山里有座庙。"]  # noqa: RUF001 (full-width punctuation is the point)
    fake.push(Reply.answer(chunks, pause=0.05))
    assert run_chat(page, "test-session", "请给我讲个故事") == expected_calls(chunks)


def test_instant_answer_and_the_next_message(page, fake):
    fake.push(Reply.answer(["quick"]), Reply.answer(["second", " answer"], pause=0.01))
    assert run_chat(page, "s-instant", "hi") == expected_calls(["quick"])
    assert run_chat(page, "s-instant", "again") == expected_calls(["second", " answer"])  # never the first again


def test_reasoning_answer(page, fake):
    fake.push(Reply.answer(["4"], reasoning=["2+2", "=4"], pause=0.02))
    assert run_chat(page, "s-think", "2+2?") == expected_calls(["4"])


def test_upstream_error(page, fake):
    fake.push(Reply.error(401, "invalid_api_key", "Incorrect API key provided."))
    calls = run_chat(page, "s-error", "hi")
    assert calls[0] == ["start"] and calls[-1][0] == "error" and len(calls) == 2
    assert "rejected the configured API key" in calls[-1][1]


def test_busy_conversation_throws_the_detail(page, fake):
    fake.push(Reply.answer(["slow"] * 50, pause=0.05))

    def occupy():
        with page.live.client() as client:
            client.post("/api/v1/chat/s-busy", json={"message": "first"})

    thread = threading.Thread(target=occupy)
    thread.start()
    while page.live.relay.registry.running(("", "s-busy")) is None:
        threading.Event().wait(0.01)
    calls = run_chat(page, "s-busy", "second")
    assert calls[-1][0] == "throw" and "already being generated" in calls[-1][1]
    with page.live.client() as client:
        client.post("/api/v1/chat/s-busy/stop")
    thread.join(10)


def test_an_answer_that_calls_tools_reaches_the_seed_client_as_its_text(browser, make_service, fake, tmp_path):
    # tool_call and tool_result events come between the chunks: the seed client ignores their type
    # and gets start, every chunk of every round, and the end with the whole text
    import json

    from mcp_server import McpProcess
    from support import wait_for

    mcp = McpProcess.http(tmp_path)
    try:
        service = make_service(CHATSVC_MCP_SERVERS=json.dumps({"t": mcp.entry()}))
        with LiveServer(service.settings) as live:
            wait_for(lambda: live.app.state.toolbox.find("t__echo") is not None, 20)
            context = browser.new_context()
            page = context.new_page()
            page.route(f"{live.url}/seed-client.html", lambda route: route.fulfill(body=PAGE, content_type="text/html"))
            page.goto(f"{live.url}/seed-client.html")
            fake.push(
                Reply.tool_calls([("t__echo", {"text": "hi"})], content=["Let me see. "]),
                Reply.answer(["It says ", "hi."], pause=0.02),
            )
            assert run_chat(page, "s-tools", "echo hi") == expected_calls(["Let me see. ", "It says ", "hi."])
            context.close()
    finally:
        mcp.stop()
