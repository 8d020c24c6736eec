"""The playground as a page people keep open (issue 26): the layout while an answer streams (the
composer and Stop in view, following unless scrolled up, "Jump to latest", Esc), a phone-wide
screen, dark mode, the conversation's settings (title, system prompt, model), export and import,
fork and delete from a message, search that opens at the match, and the first screen (with and
without a model key). What the database holds afterwards is checked where the page changed it.
Screenshots at desktop and phone widths go to test-artifacts/."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fake_dashscope import Reply
from test_playground import ARTIFACTS, WAIT, Playground, assert_accessible, expect


@pytest.fixture
def playground(browser, make_service):
    p = Playground(browser, make_service(CHAT_MODEL="qwen-plus", CHATSVC_ALLOWED_MODELS="qwen-turbo,qwen-max"))
    yield p
    p.close()
    assert p.problems == [], p.problems


def in_view(page, selector: str) -> bool:
    return page.evaluate(
        """(selector) => { const r = document.querySelector(selector).getBoundingClientRect();
        return r.width > 0 && r.top >= 0 && r.bottom <= window.innerHeight; }""",
        selector,
    )


def scrolled_to_end(page) -> bool:
    script = "(l => l.scrollHeight - l.scrollTop - l.clientHeight < 40)(document.querySelector('#messages'))"
    return page.evaluate(script)


def test_a_long_answer_streams_with_the_composer_in_view_following_until_scrolled_up_and_esc_stops(playground, fake):
    page = playground.page
    fake.push(Reply.answer([f"Paragraph {i}, a line of a long answer.\n\n" for i in range(400)], pause=0.03))
    playground.send("write a lot")
    answer = playground.last_answer()
    expect(answer.locator(".content")).to_contain_text("Paragraph 60,", timeout=WAIT)
    assert in_view(page, "#composer") and in_view(page, "#stop") and in_view(page, "#send")
    # the page itself does not scroll, only its message list
    assert page.evaluate("document.scrollingElement.scrollHeight <= window.innerHeight")
    assert scrolled_to_end(page)  # following the answer
    expect(page.locator("#jump")).to_be_hidden()
    page.locator("#messages").hover()
    page.mouse.wheel(0, -1500)  # the reader scrolls up: the view stays where it was put
    expect(page.locator("#jump")).to_be_visible(timeout=WAIT)
    expect(answer.locator(".content")).to_contain_text("Paragraph 120,", timeout=WAIT)
    assert not scrolled_to_end(page)
    page.click("#jump")
    expect(page.locator("#jump")).to_be_hidden()
    assert scrolled_to_end(page)
    page.keyboard.press("Escape")  # Esc stops
    expect(answer.locator(".state")).to_have_text("Stopped.", timeout=WAIT)
    row = playground.rows("SELECT content, status FROM messages WHERE role = 'assistant'")[0]
    assert row["status"] == "stopped" and row["content"].startswith("Paragraph 0,")
    expect(answer.locator(".continue")).to_be_visible()  # (issue 25's Continue, offered on a stopped answer)


def test_a_scroll_event_still_on_its_way_when_the_reader_scrolls_up_does_not_bring_following_back(playground, fake):
    """The view's own scroll to the end fires its scroll event a frame later; a reader whose wheel
    turns up before that frame (a busy machine's slow frames) has left the answer all the same: the
    late event, at the end still, does not follow again, and "Jump to latest" comes as text arrives."""
    page = playground.page
    fake.push(Reply.answer([f"Paragraph {i}, a line of a long answer.\n\n" for i in range(400)], pause=0.03))
    playground.send("write a lot")
    answer = playground.last_answer()
    expect(answer.locator(".content")).to_contain_text("Paragraph 40,", timeout=WAIT)
    assert scrolled_to_end(page)
    page.evaluate(
        """() => { const list = document.querySelector('#messages');
        list.scrollTop = list.scrollHeight - list.clientHeight - 20;  // the view's own: its event comes later
        list.dispatchEvent(new WheelEvent('wheel', {deltaY: -100}));  // the reader's wheel, before that event
        }"""
    )
    expect(page.locator("#jump")).to_be_visible(timeout=WAIT)
    expect(answer.locator(".content")).to_contain_text("Paragraph 120,", timeout=WAIT)
    assert not scrolled_to_end(page)
    page.keyboard.press("Escape")
    expect(answer.locator(".state")).to_have_text("Stopped.", timeout=WAIT)


def test_meta_shows_time_model_and_tokens(playground, fake):
    fake.push(Reply.answer(["Hi", " there"], usage={"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}))
    playground.send("hello")
    playground.wait_idle()
    meta = playground.last_answer().locator(".meta")
    expect(meta).to_contain_text("qwen-plus · 15 tokens")
    assert "12 tokens in, 3 out" in meta.get_attribute("title")


def test_phone_width_folds_the_list_and_screenshots_at_both_widths(browser, make_service, fake):
    p = Playground(browser, make_service())
    try:
        fake.push(Reply.answer(["A **short** answer with `code`:\n\n```js\nconsole.log(1);\n```\n"]))
        p.send("Show code")
        p.wait_idle()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        name = "sqlite" if p.service.is_sqlite else "postgresql"
        p.page.set_viewport_size({"width": 1280, "height": 800})
        expect(p.page.locator("#nav-toggle")).to_be_hidden()
        expect(p.page.locator("#conversation-nav")).to_be_visible()
        p.page.screenshot(path=str(ARTIFACTS / f"playground-desktop-{name}.png"))
        p.page.set_viewport_size({"width": 390, "height": 844})
        expect(p.page.locator("#conversation-nav")).to_be_hidden()  # folded behind the button
        toggle = p.page.locator("#nav-toggle")
        expect(toggle).to_be_visible()
        expect(toggle).to_have_attribute("aria-expanded", "false")
        assert in_view(p.page, "#composer") and in_view(p.page, "#stop")
        p.page.screenshot(path=str(ARTIFACTS / f"playground-phone-{name}.png"))
        toggle.click()
        expect(p.page.locator("#conversation-nav")).to_be_visible()
        expect(toggle).to_have_attribute("aria-expanded", "true")
        assert_accessible(p.page)
        p.page.locator("#conversations button").first.click()  # opening one folds the list again
        expect(p.page.locator("#conversation-nav")).to_be_hidden()
        p.page.click("#theme")
        p.page.screenshot(path=str(ARTIFACTS / f"playground-phone-dark-{name}.png"))
        p.page.set_viewport_size({"width": 1280, "height": 800})
        p.page.screenshot(path=str(ARTIFACTS / f"playground-desktop-dark-{name}.png"))
    finally:
        p.close()
    assert p.problems == [], p.problems


def test_dark_mode_follows_the_system_and_the_toggle_is_remembered(browser, service, fake):
    p = Playground(browser, service)
    try:
        html = p.page.locator("html")
        expect(html).to_have_attribute("data-theme", "light")
        p.page.emulate_media(color_scheme="dark")
        expect(html).to_have_attribute("data-theme", "dark")  # the system's
        p.page.click("#theme")
        expect(html).to_have_attribute("data-theme", "light")  # the toggle's, over the system's
        expect(p.page.locator("#theme")).to_have_attribute("aria-pressed", "false")
        p.page.click("#theme")
        expect(html).to_have_attribute("data-theme", "dark")
        p.page.emulate_media(color_scheme="light")
        p.page.reload()
        expect(html).to_have_attribute("data-theme", "dark")  # remembered
        assert p.page.evaluate("localStorage.getItem('chatsvc.playground.theme')") == "dark"
        background = p.page.evaluate("getComputedStyle(document.documentElement).backgroundColor")
        assert background == "rgb(20, 24, 29)", background
        assert_accessible(p.page)
    finally:
        p.close()
    assert p.problems == [], p.problems


def test_rename_system_prompt_and_model_are_saved(playground, fake):
    fake.push(Reply.answer(["first"]))
    playground.send("hello")
    playground.wait_idle()
    page = playground.page
    page.click("#settings summary")
    expect(page.locator("#setting-model option")).to_have_text(["qwen-plus (default)", "qwen-turbo", "qwen-max"])
    page.fill("#setting-title", "My renamed chat")
    page.fill("#setting-prompt", "Answer in French.")
    page.select_option("#setting-model", "qwen-turbo")
    page.click("#save-settings")
    expect(page.locator("#title")).to_have_text("My renamed chat", timeout=WAIT)
    expect(page.locator("#conversations button")).to_have_text(["My renamed chat"])
    [row] = playground.rows("SELECT title, system_prompt, model FROM conversations")
    assert (row["title"], row["system_prompt"], row["model"]) == ("My renamed chat", "Answer in French.", "qwen-turbo")
    fake.push(Reply.answer(["Bonjour"], model="qwen-turbo"))
    playground.send("again")
    playground.wait_idle()
    sent = fake.requests[-1].body
    assert sent["model"] == "qwen-turbo" and sent["messages"][0] == {"role": "system", "content": "Answer in French."}


def test_export_json_and_markdown_and_import(playground, fake, tmp_path):
    fake.push(Reply.answer(["An **exported** answer"]))
    playground.send("export me")
    playground.wait_idle()
    page = playground.page
    page.click("#settings summary")
    with page.expect_download() as download:
        page.click("#export-json")
    exported = json.loads(Path(download.value.path()).read_text())
    assert exported["format"] == "chatsvc.conversation"
    assert [m["content"] for m in exported["messages"]] == ["export me", "An **exported** answer"]
    with page.expect_download() as download:
        page.click("#export-markdown")
    assert "An **exported** answer" in Path(download.value.path()).read_text()
    path = tmp_path / "conversation.json"
    path.write_text(json.dumps(exported))
    page.set_input_files("#import", str(path))
    expect(page.locator("#conversations > li")).to_have_count(2, timeout=WAIT)
    sessions = {r["session_id"] for r in playground.rows("SELECT session_id FROM conversations")}
    assert len(sessions) == 2
    expect(playground.last_answer().locator(".content strong")).to_have_text("exported")
    opened = page.evaluate("decodeURIComponent(location.hash.slice(1))")
    assert opened in sessions and opened != exported["conversation"]["session_id"]


def test_fork_from_a_message_and_delete_a_message(playground, fake):
    fake.push(Reply.answer(["one"]))
    playground.send("first question")
    playground.wait_idle()
    fake.push(Reply.answer(["two"]))
    playground.send("second question")
    playground.wait_idle()
    page = playground.page
    first = page.locator("#messages li.assistant").first
    original = page.evaluate("decodeURIComponent(location.hash.slice(1))")
    first.locator(".fork").click()
    expect(page.locator("#conversations > li")).to_have_count(2, timeout=WAIT)
    expect(page.locator("#messages li .content")).to_have_text(["first question", "one"])
    forked = page.evaluate("decodeURIComponent(location.hash.slice(1))")
    assert forked != original
    rows = playground.rows("SELECT content FROM messages WHERE session_id = ? ORDER BY created_at", forked)
    assert [r["content"] for r in rows] == ["first question", "one"]
    page.locator("#messages li.user .delete-message").click()  # the forked conversation's only question
    expect(page.locator("#messages li")).to_have_count(0, timeout=WAIT)
    assert playground.rows("SELECT content FROM messages WHERE session_id = ?", forked) == []
    assert len(playground.rows("SELECT id FROM messages WHERE session_id = ?", original)) == 4  # untouched


def test_search_marks_the_match_and_opens_the_conversation_at_it(playground, fake):
    fake.push(Reply.answer(["".join(f"Filler line {i}.\n\n" for i in range(60))]))
    playground.send("a long one")
    playground.wait_idle()
    fake.push(Reply.answer(["The zebra crossing is here."]))
    playground.send("where is it?")
    playground.wait_idle()
    fake.push(Reply.answer(["".join(f"More filler {i}.\n\n" for i in range(60))]))
    playground.send("and more")
    playground.wait_idle()
    page = playground.page
    page.click("#new-conversation")
    page.fill("#search", "ZEBRA")
    snippet = page.locator("#conversations .snippet")
    expect(snippet.locator("mark")).to_have_text("zebra", timeout=WAIT)
    page.locator("#conversations button").first.click()
    found = page.locator("#messages li.found")
    expect(found.locator(".content")).to_have_text("The zebra crossing is here.", timeout=WAIT)
    expect(found).to_be_in_viewport()
    [row] = playground.rows("SELECT id FROM messages WHERE content LIKE '%zebra%'")
    expect(found).to_have_attribute("data-id", row["id"])


def test_the_first_screen_says_what_this_is_and_sends_an_example(playground, fake):
    page = playground.page
    empty = page.locator("#empty")
    expect(empty).to_be_visible()
    expect(page.locator("#empty-model")).to_have_text("qwen-plus")
    expect(page.locator("#no-key")).to_be_hidden()
    fake.push(Reply.answer(["Here is a list."]))
    page.locator("#examples .example").nth(2).click()
    playground.wait_idle()
    expect(empty).to_be_hidden()
    rows = playground.rows("SELECT content FROM messages WHERE role = 'user'")
    assert [r["content"] for r in rows] == ["Give me three ideas for a short weekend trip, as a list."]
    assert_accessible(page)


def test_without_a_key_the_first_screen_says_how_to_set_one_before_a_send(browser, make_service, fake):
    p = Playground(browser, make_service(DASHSCOPE_API_KEY=None))
    try:
        warning = p.page.locator("#no-key")
        expect(warning).to_be_visible(timeout=WAIT)
        expect(warning).to_contain_text("set DASHSCOPE_API_KEY")
        assert not [url for method, url in p.requests if method == "POST"]  # said before any send
        assert fake.requests == []
        assert_accessible(p.page)
    finally:
        p.close()
    assert p.problems == [], p.problems
