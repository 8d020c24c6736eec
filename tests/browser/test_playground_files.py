"""Files in the playground (issue 23), in headless Chromium against chatsvc and the fake DashScope:
attach with the button, paste a screenshot, drop files on the composer; each uploads at once and
shows a thumbnail or a chip; Send posts them with the message, which then shows them (thumbnails
fetched with the page's headers, chips that download); what the model was sent, what the database
holds; refusals show the service's detail; axe-core passes with files on the page."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from fake_dashscope import Reply
from PIL import Image
from test_playground import WAIT, Playground, assert_accessible, expect

API = "/api/v1"
VISION = "qwen3-vl-plus"
NOTES = b"Meeting notes\nThe river flooded on Tuesday.\n"


def png(width: int = 64, height: int = 48, colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(out, "PNG")
    return out.getvalue()


def payload(name: str, media_type: str, data: bytes) -> dict:
    return {"name": name, "mimeType": media_type, "buffer": data}


@pytest.fixture
def playground(browser, make_service):
    # a vision model for turns with images; titles from the first line (no second request to the fake)
    p = Playground(browser, make_service(CHATSVC_VISION_MODEL=VISION, CHATSVC_TITLES="first-line"))
    yield p
    p.close()
    assert p.problems == [], p.problems


def user_parts(fake) -> list[dict]:
    """The content of the last user message of the model's last request, as a list of parts."""
    [*_, last] = [m for m in fake.requests[-1].body["messages"] if m["role"] == "user"]
    content = last["content"]
    return [{"type": "text", "text": content}] if isinstance(content, str) else content


def image_of(part: dict) -> tuple[str, tuple[int, int]]:
    """An image_url part's media type and pixel size, from its data: URL."""
    match = re.fullmatch(r"data:(image/[a-z]+);base64,(.+)", part["image_url"]["url"], re.S)
    assert match, part["image_url"]["url"][:60]
    return match[1], Image.open(io.BytesIO(base64.b64decode(match[2]))).size


def unexpected(problems: list[str], *statuses: int) -> list[str]:
    """The page's problems but the browser's report of the refusals a test expects."""
    expected = tuple(f"the server responded with a status of {status} " for status in statuses)
    return [problem for problem in problems if not any(e in problem for e in expected)]


def attachments(p: Playground):
    return p.page.locator("#attachments li.attachment")


def wait_uploaded(p: Playground, count: int) -> None:
    expect(p.page.locator("#attachments li.attachment[data-state='ready']")).to_have_count(count, timeout=WAIT)


def loaded_width(image) -> int:
    """The pixel width of an <img> once its blob: URL is loaded."""
    expect(image).to_have_attribute("src", re.compile(r"^blob:"), timeout=WAIT)
    expect(image).to_have_js_property("complete", True, timeout=WAIT)
    return image.evaluate("img => img.naturalWidth")


def stored_files(p: Playground) -> list[dict]:
    return p.rows("SELECT id, name, media_type, size, kind FROM files WHERE status = 'ready' ORDER BY name")


def message_files(p: Playground) -> list[tuple[str, int, str]]:
    rows = p.rows("SELECT m.content, mf.position, f.name FROM message_files mf JOIN messages m ON m.id = mf.message_id"
                  " JOIN files f ON f.id = mf.file_id ORDER BY m.created_at, mf.position")  # fmt: skip
    return [(r["content"], r["position"], r["name"]) for r in rows]


def test_attach_an_image_and_a_document_send_and_see_them_in_the_message(playground, fake):
    p, page = playground, playground.page
    image = png()
    with page.expect_file_chooser() as chooser:
        page.get_by_role("button", name="Attach files").click()
    chooser.value.set_files([payload("photo.png", "image/png", image), payload("notes.txt", "text/plain", NOTES)])
    wait_uploaded(p, 2)
    # the composer: the image's thumbnail from the local file, the document's chip, each with a remove button
    expect(attachments(p).nth(0).locator("img.thumb")).to_have_attribute("alt", "photo.png")
    assert loaded_width(attachments(p).nth(0).locator("img.thumb")) == 64
    expect(attachments(p).nth(1).locator(".chip")).to_have_text(f"notes.txt · {len(NOTES)} B")
    expect(page.get_by_role("button", name="Remove photo.png")).to_be_visible()
    expect(page.get_by_role("button", name="Remove notes.txt")).to_be_visible()
    assert [(f["name"], f["media_type"], f["size"], f["kind"]) for f in stored_files(p)] == [
        ("notes.txt", "text/plain", len(NOTES), "document"),
        ("photo.png", "image/png", len(image), "image"),
    ]
    assert not [url for _, url in p.requests if urlsplit(url).path.endswith("/content")]  # shown with no round trip
    assert_accessible(page)

    fake.push(Reply.answer(["A red rectangle and notes about a flood."]))
    p.send("What do these show?")
    expect(p.last_answer().locator(".content")).to_have_text("A red rectangle and notes about a flood.", timeout=WAIT)
    p.wait_idle()
    # the model was sent the image (unscaled: it is small) and the document's text with the message
    assert fake.requests[-1].body["model"] == VISION
    parts = user_parts(fake)
    assert [part["type"] for part in parts] == ["image_url", "text"]
    assert image_of(parts[0]) == ("image/png", (64, 48))
    text = parts[1]["text"]
    assert '<document name="notes.txt"' in text and NOTES.decode() in text and text.endswith("What do these show?")
    assert message_files(p) == [("What do these show?", 0, "photo.png"), ("What do these show?", 1, "notes.txt")]
    # the message shows its files; the composer is empty again
    expect(attachments(p)).to_have_count(0)
    question = page.locator("#messages li.user")
    expect(question.locator(".content")).to_have_text("What do these show?")
    expect(question.locator(".files img.thumb")).to_have_attribute("alt", "photo.png")
    expect(question.locator(".files .chip")).to_have_text(f"notes.txt · {len(NOTES)} B")
    assert_accessible(page)

    # after a reload the thumbnail is fetched with the page's headers and shown from a blob: URL
    page.reload()
    thumb = page.locator("#messages li.user .files img.thumb")
    expect(thumb).to_have_attribute("alt", "photo.png", timeout=WAIT)
    assert loaded_width(thumb) == 64
    photo_id = next(f["id"] for f in stored_files(p) if f["name"] == "photo.png")
    contents = [urlsplit(url).path for method, url in p.requests if method == "GET" and url.endswith("/content")]
    assert contents == [f"{API}/files/{photo_id}/content"]  # the image only: a chip fetches when clicked
    # the chip downloads the document, byte for byte, under its name
    with page.expect_download() as download:
        page.locator("#messages li.user .files .chip").click()
    assert download.value.suggested_filename == "notes.txt"
    assert Path(download.value.path()).read_bytes() == NOTES


def test_a_removed_file_is_not_sent(playground, fake):
    p, page = playground, playground.page
    page.set_input_files(
        "#attach", [payload("photo.png", "image/png", png()), payload("notes.txt", "text/plain", NOTES)]
    )
    wait_uploaded(p, 2)
    page.get_by_role("button", name="Remove photo.png").click()
    expect(attachments(p)).to_have_count(1)
    fake.push(Reply.answer(["Notes."]))
    p.send("Summarise")
    p.wait_idle()
    assert [part["type"] for part in user_parts(fake)] == ["text"]  # the document only: no image, the usual model
    assert fake.requests[-1].body["model"] != VISION
    assert message_files(p) == [("Summarise", 0, "notes.txt")]


PASTE = """([data, name, type]) => {
    const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
    const clipboard = new DataTransfer();
    clipboard.items.add(new File([bytes], name, {type}));
    const event = new ClipboardEvent('paste', {clipboardData: clipboard, bubbles: true, cancelable: true});
    return document.querySelector('#message').dispatchEvent(event);
}"""


def test_paste_a_screenshot_and_send_it_alone(playground, fake):
    p, page = playground, playground.page
    shot = png(120, 80, (20, 120, 200))
    page.focus("#message")
    not_cancelled = page.evaluate(PASTE, [base64.b64encode(shot).decode(), "image.png", "image/png"])
    assert not_cancelled is False  # an image only: nothing else is pasted into the text
    wait_uploaded(p, 1)
    expect(attachments(p).locator("img.thumb")).to_have_attribute("alt", "image.png")
    expect(page.locator("#message")).to_have_value("")
    fake.push(Reply.answer(["A blue picture."]))
    page.click("#send")  # files only: the message may be empty
    expect(p.last_answer().locator(".content")).to_have_text("A blue picture.", timeout=WAIT)
    p.wait_idle()
    parts = user_parts(fake)
    assert image_of(parts[0]) == ("image/png", (120, 80))
    assert [part["type"] for part in parts] in (["image_url"], ["image_url", "text"])
    assert all(part["text"] == "" for part in parts[1:])
    assert message_files(p) == [("", 0, "image.png")]
    expect(page.locator("#messages li.user .files img.thumb")).to_have_attribute("alt", "image.png")


DROP = """([data, name, type]) => {
    const transfer = new DataTransfer();
    transfer.items.add(new File([Uint8Array.from(atob(data), (c) => c.charCodeAt(0))], name, {type}));
    return transfer;
}"""


def test_drop_a_document_on_the_composer(playground, fake):
    p, page = playground, playground.page
    transfer = page.evaluate_handle(DROP, [base64.b64encode(NOTES).decode(), "notes.md", "text/markdown"])
    page.dispatch_event("#composer", "dragover", {"dataTransfer": transfer})
    expect(page.locator("#composer")).to_have_class(re.compile(r"\bdropping\b"))  # shown as a drop target
    page.dispatch_event("#composer", "drop", {"dataTransfer": transfer})
    expect(page.locator("#composer")).not_to_have_class(re.compile(r"\bdropping\b"))
    wait_uploaded(p, 1)
    expect(attachments(p).locator(".chip")).to_have_text(f"notes.md · {len(NOTES)} B")
    fake.push(Reply.answer(["It flooded."]))
    p.send("When?")
    p.wait_idle()
    [part] = user_parts(fake)
    assert '<document name="notes.md"' in part["text"] and NOTES.decode() in part["text"]
    assert message_files(p) == [("When?", 0, "notes.md")]


def test_an_edit_sends_the_message_s_files_again(playground, fake):
    p, page = playground, playground.page
    page.set_input_files("#attach", [payload("photo.png", "image/png", png())])
    wait_uploaded(p, 1)
    fake.push(Reply.answer(["Red."]))
    p.send("Colour?")
    p.wait_idle()
    fake.push(Reply.answer(["Rectangle."]))
    page.locator("#messages li.user .edit").click()
    page.get_by_label("Edit message").fill("Shape?")
    page.get_by_role("button", name="Send edit").click()
    expect(p.last_answer().locator(".content")).to_have_text("Rectangle.", timeout=WAIT)
    p.wait_idle()
    parts = user_parts(fake)
    assert image_of(parts[0]) == ("image/png", (64, 48)) and parts[-1]["text"].endswith("Shape?")
    assert message_files(p) == [("Colour?", 0, "photo.png"), ("Shape?", 0, "photo.png")]
    expect(page.locator("#messages li.user .files img.thumb")).to_have_attribute("alt", "photo.png")


def test_refused_uploads_show_the_service_s_detail_under_the_composer(browser, make_service, fake):
    p = Playground(browser, make_service(CHATSVC_MAX_FILE_BYTES="1000"))
    try:
        page = p.page
        big = b"x" * 5000
        with p.live.client() as client:  # what the service says of these files
            too_large = client.post(f"{API}/files", params={"name": "big.txt"}, content=big,
                                    headers={"Content-Type": "text/plain"})  # fmt: skip
            svg = b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>'
            refused_svg = client.post(f"{API}/files", params={"name": "logo.svg"}, content=svg,
                                      headers={"Content-Type": "image/svg+xml"})  # fmt: skip
        assert (too_large.status_code, too_large.json()["code"]) == (413, "file_too_large")
        assert (refused_svg.status_code, refused_svg.json()["code"]) == (415, "unsupported_file_type")
        page.set_input_files("#attach", [payload("big.txt", "text/plain", big)])
        expect(page.locator("#file-notice")).to_have_text(too_large.json()["detail"], timeout=WAIT)
        expect(attachments(p)).to_have_count(0)  # taken off the composer
        page.set_input_files("#attach", [payload("logo.svg", "image/svg+xml", svg)])
        expect(page.locator("#file-notice")).to_have_text(refused_svg.json()["detail"], timeout=WAIT)
        expect(attachments(p)).to_have_count(0)
        assert p.rows("SELECT id FROM files") == []
        assert_accessible(page)
        assert fake.requests == []
    finally:
        p.close()
    assert unexpected(p.problems, 413, 415) == [], p.problems


def test_a_refused_send_keeps_the_text_and_the_files(browser, make_service, fake):
    """Without a vision model the service refuses a turn with an image (422): the page shows why,
    and the message and its files stay in the composer to be sent again."""
    p = Playground(browser, make_service(CHATSVC_TITLES="first-line"))
    try:
        page = p.page
        page.set_input_files("#attach", [payload("photo.png", "image/png", png())])
        wait_uploaded(p, 1)
        p.send("What is this?")
        expect(page.locator("#notice")).to_contain_text("CHATSVC_VISION_MODEL", timeout=WAIT)
        expect(page.locator("#send")).to_be_enabled()
        expect(page.locator("#message")).to_have_value("What is this?")
        expect(attachments(p).locator("img.thumb")).to_have_attribute("alt", "photo.png")
        expect(page.locator("#messages li")).to_have_count(0)
        assert p.rows("SELECT id FROM messages") == [] and fake.requests == []
    finally:
        p.close()
    assert unexpected(p.problems, 422) == [], p.problems


def test_with_the_api_token_uploads_and_thumbnails_carry_it(browser, make_service, fake):
    """CHATSVC_API_TOKEN: the upload (XMLHttpRequest, for its progress) and the thumbnail's fetch send
    the page's token as its other requests do; an <img src> could not."""
    service = make_service(CHATSVC_API_TOKEN="s3cret-token", CHATSVC_VISION_MODEL=VISION, CHATSVC_TITLES="first-line")
    p = Playground(browser, service)
    try:
        page = p.page
        page.get_by_label("API token").fill("s3cret-token")
        page.get_by_role("button", name="Use token").click()
        expect(page.locator("#token-form")).to_be_hidden(timeout=WAIT)
        page.set_input_files("#attach", [payload("photo.png", "image/png", png())])
        wait_uploaded(p, 1)
        fake.push(Reply.answer(["Red."]))
        p.send("Colour?")
        p.wait_idle()
        assert image_of(user_parts(fake)[0]) == ("image/png", (64, 48))
        page.reload()
        thumb = page.locator("#messages li.user .files img.thumb")
        expect(thumb).to_have_attribute("alt", "photo.png", timeout=WAIT)
        assert loaded_width(thumb) == 64
        with p.live.client() as client:  # the routes do need it
            [row] = stored_files(p)
            assert client.get(f"{API}/files/{row['id']}/content").status_code == 401
    finally:
        p.close()
    assert unexpected(p.problems, 401) == [], p.problems
