"""Export and import: a conversation's whole tree as JSON (and its current branch as Markdown),
imported as a new conversation of the caller with new ids and the same tree; hostile files are
422s naming the first bad field, and an import is all or nothing."""

from __future__ import annotations

import copy
import json
import re
import threading
from pathlib import Path

import pytest
from fake_dashscope import Reply
from support import wait_for

import chatsvc

API = "/api/v1"
CONV = f"{API}/context/conversations"
VOLATILE = ("exported_at",)


def say(client, fake, session_id, reply, headers=None, **body):
    fake.push(reply)
    r = client.post(f"{API}/chat/{session_id}", json=body, headers=headers or {})
    return r.json()


@pytest.fixture
def tree(client, fake):
    """A conversation with branches, reasoning, a failed answer and a context clear."""
    client.post(CONV, json={"session_id": "t", "system_prompt": "Be brief.", "title": "A tree"})
    first = say(client, fake, "t", Reply.answer(["4"], reasoning=["2+2", "=4"]), message="2+2?", enable_thinking=True)
    say(client, fake, "t", Reply.error(500, "InternalError", "boom"), message="and 3+3?")
    assert client.delete(f"{CONV}/t/context").status_code == 200
    again = say(client, fake, "t", Reply.answer(["six"]), message="3+3, please", parent_id=first["message_id"])
    say(client, fake, "t", Reply.answer(["4, still"]), regenerate=first["message_id"])
    client.patch(f"{CONV}/t", json={"current_message_id": again["message_id"]})
    return client


def export(client, session_id="t", headers=None):
    r = client.get(f"{CONV}/{session_id}/export", headers=headers or {})
    assert r.status_code == 200, r.text
    return r.json()


def normal(doc: dict) -> dict:
    """The file with its message ids renamed in order and what an import makes anew (the conversation's
    id and times, VOLATILE) dropped."""
    doc = copy.deepcopy(doc)
    names = {m["id"]: f"m{n}" for n, m in enumerate(doc["messages"])}
    for m in doc["messages"]:
        m["id"], m["parent_id"] = names[m["id"]], names.get(m["parent_id"])
    conv = doc["conversation"]
    conv["current_message_id"] = names.get(conv["current_message_id"])
    for name in ("session_id", "created_at", "updated_at"):
        conv.pop(name)
    for name in VOLATILE:
        doc.pop(name)
    return doc


def same_but_ids_and_times(a: dict, b: dict) -> None:
    """Equal once the ids are renamed in order and the times of the conversation dropped."""
    assert normal(a) == normal(b)


def test_export_holds_the_whole_tree(tree):
    doc = export(tree)
    assert doc["format"] == "chatsvc.conversation" and doc["version"] == 3
    assert doc["files"] == [] and all("files" not in m for m in doc["messages"])  # no files: none
    assert doc["conversation"]["title"] == "A tree" and doc["conversation"]["system_prompt"] == "Be brief."
    messages = doc["messages"]
    assert len(messages) == 7 and [m["role"] for m in messages].count("assistant") == 4
    assert messages[1]["reasoning_content"] == "2+2=4"
    failed = [m for m in messages if m["status"] == "failed"]
    assert failed[0]["error"]["code"] == "upstream_error" and failed[0]["content"] == ""
    assert [m["in_context"] for m in messages] == [False] * 4 + [True] * 3
    assert messages[6]["parent_id"] == messages[0]["id"]  # the regeneration, a sibling of the first answer
    assert doc["conversation"]["current_message_id"] == messages[5]["id"]


def test_export_import_export_is_the_same_but_ids_and_times(tree, service):
    doc = export(tree)
    r = tree.post(f"{CONV}/import", json=doc)
    assert r.status_code == 201, r.text
    imported = r.json()
    assert imported["session_id"] not in ("t", None)  # "t" is taken: a new id
    again = export(tree, imported["session_id"])
    same_but_ids_and_times(doc, again)
    assert not {m["id"] for m in doc["messages"]} & {m["id"] for m in again["messages"]}
    # the import is a conversation like any other: its branch, its context
    branch = [m["content"] for m in tree.get(f"{CONV}/{imported['session_id']}").json()["messages"]]
    assert branch == ["2+2?", "4", "3+3, please", "six"]
    # the id asked for; taken is 409
    r = tree.post(f"{CONV}/import?session_id=copy-2", json=doc)
    assert r.status_code == 201 and r.json()["session_id"] == "copy-2"
    r = tree.post(f"{CONV}/import?session_id=copy-2", json=doc)
    assert r.status_code == 409 and r.json()["code"] == "conversation_exists"
    # the file's own id when it is free
    tree.delete(f"{CONV}/t")
    r = tree.post(f"{CONV}/import", json=doc)
    assert r.status_code == 201 and r.json()["session_id"] == "t"


def test_import_continues_like_the_original(tree, fake):
    doc = export(tree)
    sid = tree.post(f"{CONV}/import", json=doc).json()["session_id"]
    fake.push(Reply.answer(["ok"]))
    assert tree.post(f"{API}/chat/{sid}", json={"message": "next"}).status_code == 200
    assert fake.requests[-1].body["messages"] == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "3+3, please"},
        {"role": "assistant", "content": "six"}, {"role": "user", "content": "next"}]  # fmt: skip


def test_markdown_is_the_current_branch(tree):
    r = tree.get(f"{CONV}/t/export?format=markdown")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/markdown; charset=utf-8"
    assert r.headers["content-disposition"] == 'attachment; filename="t.md"'
    text = r.text
    assert text.startswith("# A tree\n")
    assert (
        text.index("2+2?") < text.index("<summary>Reasoning</summary>") < text.index("3+3, please") < text.index("six")
    )
    assert "4, still" not in text and "and 3+3?" not in text  # other branches stay out
    assert tree.get(f"{CONV}/t/export?format=pdf").status_code == 422
    assert tree.get(f"{CONV}/missing/export").status_code == 404


def test_import_is_the_callers_and_never_touches_another_owners_ids(make_service, fake):
    with make_service(CHATSVC_USER_HEADER="X-User-Id").client() as client:
        alice, bob = {"X-User-Id": "alice"}, {"X-User-Id": "bob"}
        say(client, fake, "s1", Reply.answer(["alice's answer"]), headers=alice, message="alice's question")
        doc = export(client, "s1", alice)
        r = client.post(f"{CONV}/import", json=doc, headers=bob)  # alice's ids, in bob's file
        assert r.status_code == 201 and r.json()["session_id"] == "s1"  # bob has no s1: the file's id
        bobs = export(client, "s1", bob)
        assert not {m["id"] for m in bobs["messages"]} & {m["id"] for m in doc["messages"]}
        assert export(client, "s1", alice) | {"exported_at": None} == doc | {"exported_at": None}
        assert client.get(f"{CONV}/s1/export", headers={"X-User-Id": "eve"}).status_code == 404


def message(**fields):
    return {"id": "a", "parent_id": None, "role": "user", "content": "hi", "reasoning_content": None,
            "status": "complete", "model": None, "finish_reason": None, "error": None, "usage": None,
            "created_at": "2026-01-01T00:00:00.000Z", "in_context": True, **fields}  # fmt: skip


def file(*messages, **conversation):
    return {"format": "chatsvc.conversation", "version": 1,
            "conversation": {"session_id": None, "title": None, **conversation},
            "messages": list(messages) or [message()]}  # fmt: skip


@pytest.mark.parametrize(
    "doc, detail",
    [
        ({"format": "other", "version": 1}, "format: this is not a chatsvc conversation file"),
        (file() | {"version": True}, "format: this is not a chatsvc conversation file"),
        (file() | {"extra": 1}, "extra: unknown field"),
        (file() | {"messages": {"a": 1}}, "messages: must be a list"),
        (file(message(id=7)), "messages[0].id: must be a string"),
        (file(message(), message()), "messages[1].id: is the id of an earlier message"),
        (file(message(id="")), "messages[0].id: must not be empty"),
        (file(message(parent_id="b")), "messages[0].parent_id: must be null or the id of an earlier message"),
        (file(message(parent_id=["a"])), "messages[0].parent_id: must be null or the id of an earlier message"),
        (file(message(), current_message_id={"a": 1}), "conversation.current_message_id"),
        (file(message(id="b", parent_id="b")), "messages[0].parent_id"),
        (file(message(role="system")), "messages[0].role: must be 'user' or 'assistant'"),
        (file(message(status="streaming")), "messages[0].status: must be one of"),
        (file(message(content=None)), "messages[0].content: must be a string."),
        (file(message(content="a\x00b")), "messages[0].content: must not contain NUL"),
        (file(message(content="\ud800")), "messages[0].content: contains an unpaired surrogate"),
        (file(message(usage={"total_tokens": -1})), "messages[0].usage.total_tokens: must be a whole number"),
        (file(message(usage={"total_tokens": 2**31})), "messages[0].usage.total_tokens"),
        (file(message(usage={"tokens": 1})), "messages[0].usage.tokens: unknown field"),
        (file(message(error={"code": 5})), "messages[0].error.code: must be a string"),
        (file(message(in_context="yes")), "messages[0].in_context: must be true or false"),
        (file(message(), model="gpt-9"), "conversation.model: unknown model"),
        (file(message(), session_id="a/b"), "conversation.session_id: must be 1 to 128"),
        (file(message(), current_message_id="zz"), "conversation.current_message_id"),
        (file(message(created_at=["x"])), "messages[0].created_at: must be an RFC 3339 date-time"),
        (
            file(
                message(),
                message(id="b", parent_id="a", role="assistant"),
                message(id="c", parent_id="b", role="assistant"),
            ),
            'messages[2].parent_id: an answer must follow a user message; "b" is an answer.',
        ),
        (file(message(role="user", status="streaming")), "messages[0].status: must be one of"),
        *[
            (file(message(created_at=t)), "messages[0].created_at: must be an RFC 3339 date-time such as")
            for t in (
                "x",
                "",
                "2026-01-01",
                "2026-01-01 10:00:00Z",
                "2026-01-01T10:00:00",
                "2026-02-30T10:00:00Z",
                "2026-01-01T24:00:00Z",
                "2026-01-01T10:00:00+24:00",
                "2026-01-01T10:00:00+05:60",
                "\uff12\uff10\uff12\uff16-01-01T10:00:00Z",
                "1 Jan 2026",
                "2026-01-01T10:00:00.Z",
                None,
            )
        ],
        (file() | {"exported_at": "yesterday"}, "exported_at: must be an RFC 3339 date-time"),
        (file(message(), created_at="2026"), "conversation.created_at: must be an RFC 3339 date-time"),
        (file(message(), updated_at=1), "conversation.updated_at: must be an RFC 3339 date-time"),
    ],
)
def test_a_bad_file_is_a_422_naming_the_first_bad_field_and_stores_nothing(client, service, doc, detail):
    r = client.post(f"{CONV}/import", content=json.dumps(doc), headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["code"] == "invalid_request", r.text
    assert r.json()["detail"].startswith(detail), r.json()["detail"]
    assert service.rows("SELECT COUNT(*) AS n FROM conversations") == [{"n": 0}]


def test_big_deep_and_nested_files(make_service, fake):
    service = make_service(CHATSVC_MAX_IMPORT_BYTES="2000000")
    with service.client() as client:
        chain = [message(id=f"m{n}", parent_id=f"m{n - 1}" if n else None, role=("user", "assistant")[n % 2])
                 for n in range(3000)]  # fmt: skip
        r = client.post(f"{CONV}/import", json=file(*chain))
        assert r.status_code == 201, r.text
        conv = client.get(f"{CONV}/{r.json()['session_id']}?limit=2").json()
        assert conv["message_count"] == 3000 and len(conv["messages"]) == 2
        r = client.post(f"{CONV}/import", json=file(message(content="x" * 2_100_000)))
        assert r.status_code == 413 and r.json()["code"] == "payload_too_large"
        nested = b'{"format": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        r = client.post(f"{CONV}/import", content=nested, headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["code"] == "invalid_json"
        assert service.rows("SELECT COUNT(*) AS n FROM conversations") == [{"n": 1}]


def test_the_shapes_chatsvc_makes_are_imported_and_times_are_stored_as_chatsvc_writes_them(client, service):
    """An answer whose question was purged while it was written is a first message; a user message
    follows a user message whose answers were deleted; any RFC 3339 time is stored in UTC, ms."""
    doc = file(
        message(id="a", role="assistant", created_at="2026-01-01T10:00:00+01:00"),  # 09:00Z
        message(id="b", parent_id="a", created_at="2026-01-01t09:00:00.5z"),
        message(id="c", parent_id="b", created_at="2026-01-01T09:00:01.123456789Z"),
        message(id="d", parent_id="c", role="assistant", created_at="2026-01-01T04:00:02-05:00"),
        created_at="2026-01-01T09:00:00Z", updated_at=None,
    ) | {"exported_at": "2026-01-01T09:00:03Z"}  # fmt: skip
    r = client.post(f"{CONV}/import", json=doc)
    assert r.status_code == 201, r.text
    rows = service.rows("SELECT role, created_at FROM messages ORDER BY id")
    assert rows == [
        {"role": "assistant", "created_at": "2026-01-01T09:00:00.000Z"},
        {"role": "user", "created_at": "2026-01-01T09:00:00.500Z"},
        {"role": "user", "created_at": "2026-01-01T09:00:01.123Z"},
        {"role": "assistant", "created_at": "2026-01-01T09:00:02.000Z"},
    ]


def test_an_export_taken_while_an_answer_is_written_imports_it_as_interrupted(make_service, fake):
    """The answer is exported as stored so far with status `streaming`; the import stores what it
    holds as `interrupted`, and everything else as exported."""
    with make_service(CHATSVC_CHECKPOINT_SECONDS="0.05", CHATSVC_UPSTREAM_IDLE_TIMEOUT="60").client() as client:
        say(client, fake, "s1", Reply.answer(["fine"]), message="how are you?")
        release = threading.Event()
        fake.push(Reply.answer(["Once ", "upon"], reasoning=["a story"], hold=release, hold_at=3))
        chat = threading.Thread(target=lambda: client.post(f"{API}/chat/s1", json={"message": "a story?"}))
        chat.start()
        try:
            doc = wait_for(lambda: (d := export(client, "s1"))["messages"][-1]["content"] == "Once " and d, 60)
        finally:
            release.set()
            chat.join(30)
        writing = doc["messages"][-1]
        assert writing["status"] == "streaming" and writing["reasoning_content"] == "a story"
        assert writing["error"] is None and writing["finish_reason"] is None
        r = client.post(f"{CONV}/import", json=doc)
        assert r.status_code == 201, r.text
        assert r.json()["generating"] is False
        again = export(client, r.json()["session_id"])
        imported = again["messages"][-1]
        assert imported["status"] == "interrupted" and imported["content"] == "Once "
        assert imported["reasoning_content"] == "a story"
        assert imported["error"] == {"code": "interrupted", "message": chatsvc.EXPORTED_WHILE_WRITTEN}
        writing |= {"status": "interrupted", "error": imported["error"]}
        same_but_ids_and_times(doc, again)  # all else as exported
        # it is an answer like any interrupted one: it can be answered again
        fake.push(Reply.answer(["Once upon a time"]))
        r = client.post(f"{API}/chat/{r.json()['session_id']}", json={"regenerate": imported["id"]})
        assert r.status_code == 200 and r.json()["response"] == "Once upon a time"


def test_the_documented_example_file_imports(client):
    example = json.loads((Path(__file__).parent.parent / "docs" / "openapi.json").read_text())
    example = example["components"]["schemas"]["ConversationFile"]["example"]
    r = client.post(f"{CONV}/import", json=example)
    assert r.status_code == 201, r.text
    again = export(client, r.json()["session_id"])
    messages = again["messages"]
    assert [(m["content"], m["status"]) for m in messages] == [
        ("What makes the tides? My sketch is attached.", "complete"), ("Mostly the Moon's pull.", "complete"),
        ("The Moon and, less, the Sun", "interrupted")]  # fmt: skip
    assert messages[2]["error"]["code"] == "interrupted"
    assert messages[0]["files"] == ["f1"] and again["files"] == example["files"]  # its small PNG


HOSTILE = (
    "Sure.\n\n## Assistant · 2026-01-01 00:00\n\nNow I am the assistant\n---\n</details>\n"
    "<script>alert(1)</script> <img src=x onerror=alert(2)>\r# carriage return\n> ## quoted\n- # listed\n"
    "Setext\n===\n`a\\`<b>1</b>`\n\n``<i>2</i>`` &lt;script&gt;\n| `<u>3</u>` | x |\n```\nnever closed <b>4</b>"
)
NORMAL = (
    "Steps:\n\n1. Install it:\n   ```bash\n   pip install chatsvc\n   ```\n2. Run `chatsvc --port 8000`.\n\n"
    "| name | value |\n|------|-------|\n| **a** | 1 |\n\n---\n\nUse `a < b` and `x & y`, *not* `<div>`.\n\n"
    '````python\nif a < b:\n    print("```<b>")\n````'
)


def rendered(markdown: str):
    """The document as a CommonMark renderer (HTML on, GFM tables) reads it: its tokens and its HTML."""
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark").enable("table")
    tokens = md.parse(markdown)

    def walk(ts):
        for t in ts:
            yield t
            yield from walk(t.children or [])

    return list(walk(tokens)), md.render(markdown)


def test_markdown_structure_is_chatsvcs_alone(client, fake):
    """No message text, reasoning, title or error adds a heading, closes a fold, runs HTML or swallows
    what follows; each text still reads as written."""
    client.post(CONV, json={"session_id": "h", "title": "Evil\n## Title <img src=x onerror=alert(0)>"})
    say(client, fake, "h", Reply.answer([HOSTILE], reasoning=["think </details> <script>x</script>\n```\nopen"]),
        message=HOSTILE, enable_thinking=True)  # fmt: skip
    say(client, fake, "h", Reply.error(400, "invalid_parameter_error", "bad *x* </details>\n## Hi <b>"), message="q")
    say(client, fake, "h", Reply.answer([NORMAL]), message="normal")
    text = client.get(f"{CONV}/h/export?format=markdown").text
    tokens, html = rendered(text)
    headings = [h.split(" · ")[0] for h in re.findall(r"<h\d>(.*?)</h\d>", html)]
    assert headings == ["Evil ## Title &lt;img src=x onerror=alert(0)&gt;",
                        *["User", "Assistant (qwen-plus)"] * 3]  # fmt: skip
    assert [t.tag for t in tokens if t.type == "heading_open"] == ["h1"] + ["h2"] * 6
    assert [t.content for t in tokens if t.type == "html_inline"] == []
    assert [t.content for t in tokens if t.type == "html_block"] == [
        "<details><summary>Reasoning</summary>\n", "</details>\n"]  # fmt: skip
    for payload in ("&lt;script&gt;alert(1)&lt;/script&gt;", "&lt;img src=x onerror=alert(2)&gt;",
                    "## Assistant · 2026-01-01 00:00", "# carriage return", "## quoted", "# listed", "Setext\n===",
                    "&lt;/details&gt;", "bad *x* &lt;/details&gt; ## Hi &lt;b&gt;"):  # fmt: skip
        assert html.count(payload) >= 1, payload
    assert "<b>1</b>" not in html and "<i>" not in html and "<u>" not in html
    assert "<code>&lt;i&gt;2&lt;/i&gt;</code>" in html  # a code span reads as written
    assert html.count("&amp;lt;script&amp;gt;") == 2  # an entity is text, as written (question and answer)
    fences = [t.content for t in tokens if t.type == "fence"]
    assert fences[:3] == ["never closed <b>4</b>\n", "open\n", "never closed <b>4</b>\n"]  # closed where it ends
    # the ordinary answer reads as written: its code blocks, list, table and spans
    assert fences[-2:] == ["pip install chatsvc\n", 'if a < b:\n    print("```<b>")\n']
    assert "<table>" in html and "<strong>a</strong>" in html and "<hr />" in html
    assert "<code>a &lt; b</code>" in html and "<code>x &amp; y</code>" in html and "<code>&lt;div&gt;</code>" in html
    assert "<li>Install it:" in html or "<li>\n<p>Install it:" in html
