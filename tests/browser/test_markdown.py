"""Answers in the playground are Markdown rendered by the vendored marked, sanitized by DOMPurify and
highlighted by highlight.js (playground/vendor/): what a person sees (headings, lists, tables, code
with a copy button, links into a new tab) and what no message may do (run a script: the classic
payloads, from the model and from the user)."""

from __future__ import annotations

import pytest
from fake_dashscope import Reply
from test_playground import WAIT, Playground, expect


@pytest.fixture
def playground(browser, service):
    p = Playground(browser, service)
    p.dialogs = []
    p.page.on("dialog", lambda dialog: p.dialogs.append(dialog.message))
    yield p
    p.close()
    assert p.problems == [], p.problems


ANSWER = """# Steps

1. first
2. second

| name | value |
|------|-------|
| a    | 1     |

```python
def double(x):
    return x * 2  # twice
```

See [the docs](https://example.com/docs) and `inline code`.
"""


def test_an_answer_is_rendered_as_markdown_with_highlighted_code_and_a_copy_button(playground, fake):
    fake.push(Reply.answer([ANSWER[:40], ANSWER[40:90], ANSWER[90:]], pause=0.1))
    playground.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=playground.live.url)
    playground.send("Show me Markdown")
    playground.wait_idle()
    content = playground.last_answer().locator(".content")
    expect(content.locator("h1")).to_have_text("Steps", timeout=WAIT)
    expect(content.locator("ol > li")).to_have_text(["first", "second"])
    expect(content.locator("table td")).to_have_text(["a", "1"])
    expect(content.locator("code:not(pre code)")).to_have_text("inline code")
    code = content.locator("pre code.hljs")
    expect(code).to_have_text("def double(x):\n    return x * 2  # twice\n")
    expect(code.locator(".hljs-keyword").first).to_have_text("def")  # highlighted
    expect(code.locator(".hljs-comment")).to_have_text("# twice")
    link = content.locator("a", has_text="the docs")
    expect(link).to_have_attribute("href", "https://example.com/docs")
    expect(link).to_have_attribute("target", "_blank")
    expect(link).to_have_attribute("rel", "noopener noreferrer")
    content.locator(".code-block .copy").click()
    expect(content.locator(".code-block .copy")).to_have_text("Copied")
    copied = playground.page.evaluate("navigator.clipboard.readText()")
    assert copied == "def double(x):\n    return x * 2  # twice\n"
    # the database holds the Markdown source, the page only draws it
    row = playground.rows("SELECT content FROM messages WHERE role = 'assistant'")[0]
    assert row["content"] == ANSWER


def test_a_streaming_answer_is_never_drawn_half_replaced(playground, fake):
    """Each frame shows one whole rendering: the list of items only grows as the chunks arrive."""
    chunks = [f"- item {i}\n" for i in range(12)]
    fake.push(Reply.answer(chunks, pause=0.08))
    playground.page.evaluate("""() => {
        window.counts = [];
        new MutationObserver(() => {
            const items = document.querySelectorAll('#messages li.assistant .content li');
            window.counts.push(items.length);
        }).observe(document.querySelector('#messages'), {childList: true, subtree: true, characterData: true});
    }""")
    playground.send("a list")
    expect(playground.last_answer().locator(".content li")).to_have_count(12, timeout=WAIT)
    playground.wait_idle()
    counts = [c for c in playground.page.evaluate("window.counts") if c]
    assert counts == sorted(counts), counts  # never fewer items than a frame before (no flicker to empty)
    assert len(set(counts)) > 2, counts  # drawn as it arrived, not at the end only


PAYLOADS = [
    '<img src=x onerror="window.pwned=1">',
    "[click me](javascript:window.pwned=1)",
    "[angle](<javascript:window.pwned=1>)",
    '<svg onload="window.pwned=1"><circle r="1"/></svg>',
    '<iframe src="javascript:window.pwned=1"></iframe>',
    '<a href="data:text/html,<script>window.pwned=1</script>">data link</a>',
    '**<b onmouseover="window.pwned=1">bold</b>** and <script>window.pwned=1</script>',
    '<details open ontoggle="window.pwned=1"><summary>x</summary>y</details>',
    '> <a href="jav&#x09;ascript:window.pwned=1">tab link</a>',
    '<math><mi xlink:href="javascript:window.pwned=1">m</mi></math>',
    '<form action="javascript:window.pwned=1"><button>go</button></form>',
    "<div style=\"background:url('javascript:window.pwned=1')\">styled</div>",
]

DANGEROUS = """() => {
    const found = [];
    for (const root of document.querySelectorAll('#messages .content, #messages .reasoning-text')) {
        for (const element of root.querySelectorAll('*')) {
            for (const attribute of element.attributes) {
                const value = attribute.value.replace(/\\s/g, '').toLowerCase();
                if (attribute.name.startsWith('on') || attribute.name === 'style' || attribute.name === 'action'
                    || value.startsWith('javascript:') || value.startsWith('data:')) {
                    found.push(`${element.tagName} ${attribute.name}=${attribute.value}`);
                }
            }
            const tag = element.tagName.toUpperCase();
            if (['SCRIPT', 'IFRAME', 'SVG', 'IMG', 'MATH', 'FORM', 'OBJECT', 'EMBED'].includes(tag)) {
                found.push(element.tagName);
            }
        }
    }
    return found;
}"""


def test_no_html_from_a_message_runs(playground, fake):
    """The classic payloads, in an answer (and its reasoning) and in the user's message: none runs,
    none leaves an event handler, a script, a frame or a javascript:/data: link in the page."""
    text = "\n\n".join(PAYLOADS)
    fake.push(Reply.answer([text[: len(text) // 2], text[len(text) // 2 :]], reasoning=PAYLOADS[:3]))
    playground.send(text)
    playground.wait_idle()
    answer = playground.last_answer()
    expect(answer.locator(".content")).to_contain_text("bold", timeout=WAIT)
    expect(answer.locator(".content strong")).to_have_count(1)  # the Markdown around the HTML is rendered
    expect(answer.locator(".content")).to_contain_text("click me")
    answer.locator(".reasoning summary").click()
    for link in answer.locator(".content a").all():  # hover and click what is left: nothing runs
        link.hover()
    assert playground.page.evaluate(DANGEROUS) == []
    expect(answer.locator(".content a[href]")).to_have_count(0)  # no link survives with a dangerous address
    # HTML in a message is shown as the text it is
    expect(answer.locator(".content")).to_contain_text('<img src=x onerror="window.pwned=1">')
    # the user's message is shown as the text it is
    expect(playground.page.locator("#messages li.user .content")).to_have_text(text)
    assert playground.page.evaluate("window.pwned") is None
    playground.page.reload()  # and drawn again from what was stored
    expect(playground.last_answer().locator(".content")).to_contain_text("bold", timeout=WAIT)
    assert playground.page.evaluate(DANGEROUS) == []
    assert playground.page.evaluate("window.pwned") is None
    assert playground.dialogs == []
