"""The playground's issue-25 features on the real API: Continue (CONTRACT "Continuing an answer": one
message, its text appended to, shown once after a reload; Stop mid-continuation, then Continue again),
an answer's sources from the web (the live `sources` event and the stored message's; numbered links
that open a new tab, only http/https; "Search the web" only under CHATSVC_WEB_SEARCH=allowed), and a
long conversation's summary (the folded "Earlier messages summarised" note as sanitized Markdown, the
messages it covers marked). Axe finds nothing in either theme with them shown."""

from __future__ import annotations

import json

import pytest
from fake_dashscope import Reply, native_events
from support import wait_for
from test_playground import API, WAIT, Playground, assert_accessible, expect, record_answer_texts

import chatsvc

SOURCES = [  # what tests/fake_dashscope.py's SEARCH_RESULTS become
    {"index": 1, "title": "全年高温日数可能创新高,杭州何时能“熄火”?", "url": "https://baijiahao.baidu.com/s?id=1843390963791748953",
     "site": "百家号"},
    {"index": 2, "title": "杭州天气预报杭州2025年09月17日天气", "url": "https://tianqi.eastday.com/tianqi/hangzhou/20250917.html",
     "site": "eastday"},
]  # fmt: skip


@pytest.fixture
def playground(browser, service):
    p = Playground(browser, service)
    yield p
    p.close()
    assert p.problems == [], p.problems


def answer_row(playground) -> dict:
    [row] = playground.rows(
        "SELECT id, content, status, finish_reason, continued FROM messages WHERE role = 'assistant'"
    )
    return row


def test_continue_a_length_answer_appends_to_the_same_message(playground, fake):
    page = playground.page
    fake.push(Reply.answer(["Once ", "upon ", "a "], finish="length"))
    playground.send("Tell me a story")
    playground.wait_idle()
    answer = playground.last_answer()
    expect(answer.locator(".content")).to_have_text("Once upon a")
    more = answer.locator(".continue")
    expect(more).to_be_visible()  # cut by max_tokens: continuable
    expect(answer.locator(".regenerate")).to_be_visible()
    first = answer_row(playground)
    fake.push(Reply.answer(["time ", "there ", "was ", "a fox."], pause=0.2))
    record_answer_texts(page)
    with page.expect_request(lambda r: r.method == "POST" and r.url.endswith("/stream")) as posted:
        more.click()
    assert json.loads(posted.value.post_data) == {"continue": first["id"]}
    expect(more).to_be_hidden(timeout=WAIT)  # not while it streams
    expect(playground.answers()).to_have_count(1)  # the same bubble, no second one
    expect(answer.locator(".content")).to_have_text("Once upon a time there was a fox.", timeout=WAIT)
    playground.wait_idle()
    seen = [t.strip() for t in page.evaluate("window.seen") if t.strip()]
    assert seen and all(t.startswith("Once upon a") for t in seen), seen  # appended, never drawn from scratch
    assert any(t.startswith("Once upon a time") and t != seen[-1] for t in seen), seen  # drawn as it arrived
    row = answer_row(playground)
    assert (row["id"], row["content"], row["status"], row["continued"]) == (
        first["id"], "Once upon a time there was a fox.", "complete", 1)  # fmt: skip
    assert fake.requests[-1].body["messages"][-1] == {"role": "assistant", "content": "Once upon a ", "partial": True}
    expect(playground.answers()).to_have_count(1)
    expect(answer.locator(".continue")).to_be_hidden()  # complete with "stop": nothing to continue
    page.reload()
    expect(playground.answers()).to_have_count(1, timeout=WAIT)
    expect(playground.last_answer().locator(".content")).to_have_text("Once upon a time there was a fox.")
    expect(playground.last_answer().locator(".continue")).to_be_hidden()


def test_a_reload_mid_continuation_shows_the_whole_text_growing(playground, fake):
    """After a reload the page did not ask for the continuation: `start`'s `continues.chars` says where
    its chunks go on from in the stored text."""
    page = playground.page
    fake.push(Reply.answer(["Once ", "upon ", "a "], finish="length"))
    playground.send("Tell me a story")
    playground.wait_idle()
    words = [f"w{i} " for i in range(40)]
    fake.push(Reply.answer(words, pause=0.1))
    playground.last_answer().locator(".continue").click()
    expect(playground.last_answer().locator(".content")).to_contain_text("w2", timeout=WAIT)
    page.reload()
    record_answer_texts(page)
    whole = "Once upon a " + "".join(words)
    expect(playground.last_answer().locator(".content")).to_have_text(whole.strip(), timeout=WAIT)
    playground.wait_idle()
    seen = [t.strip() for t in page.evaluate("window.seen") if t.strip()]
    assert any(t != whole.strip() for t in seen), seen  # still arriving after the reload
    assert all(t.startswith("Once upon a") for t in seen), seen  # the stored text, then the new text after it
    expect(playground.answers()).to_have_count(1)
    assert answer_row(playground)["content"] == whole


def test_continue_is_offered_only_on_the_branchs_last_continuable_answer(playground, fake):
    fake.push(Reply.answer(["cut"], finish="length"), Reply.answer(["whole"]))
    playground.send("one")
    playground.wait_idle()
    expect(playground.last_answer().locator(".continue")).to_be_visible()
    playground.send("two")
    playground.wait_idle()
    first, second = playground.answers().all()
    expect(first.locator(".content")).to_have_text("cut")
    expect(first.locator(".continue")).to_be_hidden()  # it has a reply: the service would refuse it
    expect(second.locator(".continue")).to_be_hidden()  # complete: nothing to continue


def test_stop_during_a_continuation_then_continue_again(playground, fake):
    page = playground.page
    fake.push(Reply.answer(["A1 ", "A2 "], finish="length"))
    playground.send("count")
    playground.wait_idle()
    answer = playground.last_answer()
    fake.push(Reply.answer([f"B{i} " for i in range(1, 300)], pause=0.05))
    answer.locator(".continue").click()
    expect(answer.locator(".content")).to_contain_text("A1 A2 B1 B2 B3", timeout=WAIT)
    page.click("#stop")
    expect(answer.locator(".state")).to_have_text("Stopped.", timeout=WAIT)
    row = answer_row(playground)
    assert (row["status"], row["continued"]) == ("stopped", 1) and row["content"].startswith("A1 A2 B1 B2 B3 ")
    expect(answer.locator(".content")).to_have_text(row["content"].strip())
    expect(answer.locator(".continue")).to_be_visible()  # stopped: continuable again
    fake.push(Reply.answer(["C."]))
    answer.locator(".continue").click()
    expect(answer.locator(".content")).to_have_text(row["content"] + "C.", timeout=WAIT)
    playground.wait_idle()
    again = answer_row(playground)
    assert (again["id"], again["content"], again["status"], again["continued"]) == (
        row["id"], row["content"] + "C.", "complete", 2)  # fmt: skip
    expect(playground.answers()).to_have_count(1)
    page.reload()
    expect(playground.last_answer().locator(".content")).to_have_text(row["content"] + "C.", timeout=WAIT)


def sources_shown(answer) -> None:
    links = answer.locator(".sources li a")
    expect(links).to_have_text([s["title"] for s in SOURCES], timeout=WAIT)
    for k, source in enumerate(SOURCES):
        link = links.nth(k)
        expect(link).to_have_attribute("href", source["url"])
        expect(link).to_have_attribute("target", "_blank")
        expect(link).to_have_attribute("rel", "noopener noreferrer")
    numbers = answer.locator(".sources li").evaluate_all("(items) => items.map((i) => i.value)")
    assert numbers == [1, 2]


def test_an_answer_from_the_web_shows_its_sources_live_and_after_a_reload(browser, make_service, fake):
    p = Playground(browser, make_service(CHATSVC_WEB_SEARCH="allowed"))
    try:
        page = p.page
        toggle = page.locator("#web-search")
        expect(toggle).to_be_visible(timeout=WAIT)  # a turn may ask for a search here
        toggle.check()
        fake.push(Reply.of_events(native_events(["Hot [1]", " today [ref_2]."])))
        p.send("weather in Hangzhou?")
        p.wait_idle()
        answer = p.last_answer()
        expect(answer.locator(".content")).to_have_text("Hot [1] today [ref_2].")
        sources_shown(answer)
        asked = fake.requests[-1]
        assert asked.path.endswith("/text-generation/generation") and asked.body["parameters"]["enable_search"]
        [row] = p.rows("SELECT sources FROM messages WHERE role = 'assistant'")
        assert json.loads(row["sources"]) == SOURCES
        page.reload()
        sources_shown(p.last_answer())  # from the stored message
        assert_accessible(page)
        page.click("#theme")
        assert_accessible(page)
        # a link the page is handed that is no web link is shown as text, never as an href
        page.route(
            f"**{API}/context/conversations/*?limit=500",
            lambda route: route.fulfill(response=route.fetch(), json=with_a_script_source(route.fetch().json())),
        )
        page.reload()
        shown = p.last_answer().locator(".sources li")
        expect(shown).to_have_count(3, timeout=WAIT)
        expect(shown.nth(2)).to_have_text("a script")
        assert shown.nth(2).locator("a").get_attribute("href") is None
        page.unroute_all()
        fake.push(Reply.answer(["plain"]))
        toggle.uncheck()
        p.send("and without?")
        p.wait_idle()
        assert fake.requests[-1].path == "/compatible-mode/v1/chat/completions"
        expect(p.last_answer().locator(".sources")).to_be_hidden()
    finally:
        p.close()
    assert p.problems == [], p.problems


def with_a_script_source(conversation: dict) -> dict:
    for message in conversation["messages"]:
        if message.get("sources"):
            message["sources"].append({"index": 3, "title": "a script", "url": "javascript:alert(1)"})
    return conversation


def test_search_the_web_is_offered_only_when_the_service_allows_it(playground, fake):
    expect(playground.page.locator("#empty-model")).to_have_text("qwen-plus", timeout=WAIT)  # models read
    expect(playground.page.locator("#web-search")).to_be_hidden()  # CHATSVC_WEB_SEARCH=off


def test_a_long_conversations_summary_is_a_folded_note_and_marks_what_it_covers(browser, make_service, fake):
    service = make_service(CHATSVC_SUMMARIES="on", CHATSVC_MAX_CONTEXT_MESSAGES="6")
    summary = "**Facts**: the user counts.\n\n- q1 to q3 asked\n\n<img src=x onerror=alert(1)><script>alert(2)</script>"

    def reply(seen) -> Reply:
        if seen.body["messages"][0]["content"] == chatsvc.SUMMARY_PROMPT:
            return Reply.answer([summary])
        return Reply.answer([f"answer to {seen.body['messages'][-1]['content']}"])

    fake.default = reply
    p = Playground(browser, service)
    try:
        with p.live.client() as client:
            for n in range(1, 5):
                assert client.post(f"{API}/chat/s1", json={"message": f"q{n}"}).status_code == 200
        [row] = wait_for(lambda: p.rows("SELECT covered FROM summaries"))
        assert row["covered"] == 6
        page = p.page
        page.goto(f"{p.live.url}/#s1")
        page.reload()
        note = page.locator("#summary-note")
        expect(note).to_be_visible(timeout=WAIT)
        expect(note).not_to_have_attribute("open", "")  # folded
        expect(note.locator("summary")).to_have_text("Earlier messages summarised (6 messages)")
        note.locator("summary").click()
        text = note.locator(".summary-text")
        expect(text.locator("strong")).to_have_text("Facts")
        expect(text.locator("li")).to_have_text(["q1 to q3 asked"])
        assert text.locator("img, script").count() == 0  # sanitized
        expect(page.locator("#messages li.summarized")).to_have_count(6)
        expect(page.locator("#messages li:not(.summarized)")).to_have_count(2)
        assert_accessible(page)
        page.click("#theme")
        assert_accessible(page)
    finally:
        p.close()
    assert p.problems == [], p.problems
