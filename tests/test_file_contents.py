"""File contents: what an uploaded file is, by its bytes (chatsvc's `File contents` section). No server and
no database: the Examiner is run on bytes made here (images with Pillow, in memory; PDFs with pypdf's
writer; DOCX with zipfile), the hostile ones included."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import os
import struct
import subprocess
import sys
import threading
import time
import zipfile
import zlib

import pytest
from PIL import Image
from pypdf import PdfWriter
from pypdf.generic import DictionaryObject, NameObject, StreamObject
from support import wait_for

import chatsvc
from chatsvc import FileRefused

SETTINGS = chatsvc.Settings()
# Document limits small enough to reach in a test: the examiner (and worker process) of the PDF and JSON tests.
LIMITED = dataclasses.replace(SETTINGS, max_document_pages=4, max_document_chars=5000)


class Examiners:
    """The examiners of this module, one per settings, on an event loop in a thread of their own: their
    document worker processes start once, not once a test."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.examiners: dict[chatsvc.Settings, chatsvc.Examiner] = {}

    def run(self, coroutine, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def examine(self, name: str, data: bytes, settings: chatsvc.Settings) -> chatsvc.FileFacts:
        examiner = self.examiners.setdefault(settings, chatsvc.Examiner(settings))
        return self.run(examiner.examine(name, lambda: loaded(data)))

    def close(self) -> None:
        for examiner in self.examiners.values():
            self.run(examiner.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


EXAMINERS: Examiners | None = None


@pytest.fixture(scope="module", autouse=True)
def examiners():
    global EXAMINERS
    EXAMINERS = Examiners()
    yield EXAMINERS
    EXAMINERS.close()
    EXAMINERS = None


def examine(name: str, data: bytes, settings: chatsvc.Settings = SETTINGS) -> chatsvc.FileFacts:
    return EXAMINERS.examine(name, data, settings)


async def loaded(data: bytes) -> bytes:
    return data


def refused(name: str, data: bytes, settings: chatsvc.Settings = SETTINGS) -> FileRefused:
    with pytest.raises(FileRefused) as caught:
        examine(name, data, settings)
    return caught.value


def image_bytes(image: Image.Image, format: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format, **options)
    return out.getvalue()


def photo(width: int, height: int) -> Image.Image:
    """An RGB image with detail in it (gradients), so that JPEG has something to encode."""
    gradient = Image.linear_gradient("L")
    return Image.merge(
        "RGB",
        (
            gradient.resize((width, height)),
            gradient.rotate(90).resize((width, height)),
            Image.new("L", (width, height), 90),
        ),
    )


def opened(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


# ── names ─────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    ("raw", "cleaned"),
    [
        ("../../etc/x\x01\u202e.png", "x.png"),
        ("a\\b.txt", "b.txt"),
        ("C:\\Users\\me\\Desktop\\report.pdf", "report.pdf"),
        (".bashrc", "bashrc"),
        ("  .. notes.md ", "notes.md"),
        ("photo\u202egnp.exe", "photognp.exe"),
        ("tab\there\x7f\x85.csv", "tabhere.csv"),
        ("e\u0301t\u00e9.txt", "\u00e9t\u00e9.txt"),  # NFC: one é, as typed on another system
        ("lone\ud800.txt", "lone.txt"),
        ("报告.docx", "报告.docx"),
    ],
)
def test_names_are_cleaned(raw, cleaned):
    assert chatsvc.clean_name(raw) == cleaned


def test_a_long_name_is_cut_at_a_character_keeping_its_extension():
    name = chatsvc.clean_name("文" * 300 + ".txt")
    assert len(name.encode()) <= 255
    assert name == "文" * 83 + ".txt"  # 83 three-byte characters and 4 bytes of extension: 253 bytes
    name = chatsvc.clean_name("文" * 300)
    assert name == "文" * 85


@pytest.mark.parametrize("raw", ["...", "", "   ", "dir/", "a/..", "\x01\x02", "\u202e"])
def test_a_name_with_nothing_left_is_refused(raw):
    with pytest.raises(FileRefused) as caught:
        chatsvc.clean_name(raw)
    assert (caught.value.status, caught.value.code) == (400, "bad_file_name")
    assert "report.pdf" in caught.value.detail


# ── images ────────────────────────────────────────────────────────────────────────────


def test_image_tokens_count_28_pixel_patches_rounded_up_and_the_markers():
    assert chatsvc.image_tokens(1148, 840) == 41 * 30 + 2
    assert chatsvc.image_tokens(512, 512) == 19 * 19 + 2  # 363: DashScope's page says "about 334"
    assert chatsvc.image_tokens(29, 1) == 2 * 1 + 2
    assert chatsvc.image_tokens(1, 1) == 4


def test_model_size_fits_the_cap_in_multiples_of_28_and_never_grows():
    assert chatsvc.model_size(4000, 3000, 1_003_520) == (1148, 840)
    assert chatsvc.model_size(1000, 1000, 1_003_520) == (1000, 1000)  # under the cap: as it is
    assert chatsvc.model_size(100_000, 20, 1_003_520) == (50176, 20)  # a strip: the short side stays
    assert chatsvc.model_size(20, 100_000, 1_003_520) == (20, 50176)
    for width, height in [(7728, 5152), (1345, 747), (3000, 4000), (10_000, 29)]:
        w, h = chatsvc.model_size(width, height, 1_003_520)
        assert w * h <= 1_003_520 and w <= width and h <= height
        assert (w % 28, h % 28) == (0, 0) or min(width, height) < 56


def test_a_large_jpeg_photo_is_scaled_for_the_model_in_multiples_of_28():
    data = image_bytes(photo(4000, 3000), "JPEG", quality=90)
    started = time.monotonic()
    facts = examine("holiday.jpg", data)
    assert time.monotonic() - started < 2  # decoded at a fraction of its size (draft)
    assert (facts.media_type, facts.kind, facts.width, facts.height) == ("image/jpeg", "image", 4000, 3000)
    assert (facts.model_media_type, facts.model_width, facts.model_height) == ("image/jpeg", 1148, 840)
    copy = opened(facts.model_copy)
    assert (copy.format, copy.size, copy.mode) == ("JPEG", (1148, 840), "RGB")
    assert 1148 * 840 <= SETTINGS.image_max_pixels
    assert facts.text is None and facts.pages is None


def test_a_small_png_is_sent_as_it_came():
    data = image_bytes(photo(300, 200), "PNG")
    facts = examine("chart.png", data)
    assert facts.model_copy == data
    assert (facts.media_type, facts.model_media_type) == ("image/png", "image/png")
    assert (facts.width, facts.height, facts.model_width, facts.model_height) == (300, 200, 300, 200)


def test_a_small_jpeg_is_sent_as_it_came():
    data = image_bytes(photo(640, 480), "JPEG")
    facts = examine("small.jpg", data)
    assert facts.model_copy == data and facts.model_media_type == "image/jpeg"


def test_a_large_image_with_transparency_becomes_a_png_keeping_it():
    image = photo(1500, 1000).convert("RGBA")
    image.putalpha(Image.linear_gradient("L").resize((1500, 1000)))
    facts = examine("overlay.png", image_bytes(image, "PNG"))
    copy = opened(facts.model_copy)
    assert (facts.model_media_type, copy.format, copy.mode) == ("image/png", "PNG", "RGBA")
    assert copy.size == (facts.model_width, facts.model_height) == (1204, 812)
    assert copy.getpixel((0, 0))[3] < 10 and copy.getpixel((0, 811))[3] > 245  # the alpha gradient kept


def test_a_small_webp_is_reencoded_as_png_or_jpeg():
    image = Image.new("RGBA", (64, 48), (200, 10, 10, 128))
    facts = examine("sticker.webp", image_bytes(image, "WEBP", lossless=True))
    assert (facts.media_type, facts.width, facts.height) == ("image/webp", 64, 48)
    copy = opened(facts.model_copy)
    assert (facts.model_media_type, copy.format, copy.size) == ("image/png", "PNG", (64, 48))
    assert copy.getpixel((5, 5)) == (200, 10, 10, 128)
    facts = examine("photo.webp", image_bytes(photo(64, 48), "WEBP"))
    assert (facts.model_media_type, opened(facts.model_copy).format) == ("image/jpeg", "JPEG")


def grey(mode: str) -> Image.Image:
    """1500 by 1000 (over the cap): black at the top, white at the bottom, in `mode`."""
    ramp = Image.linear_gradient("L").resize((1500, 1000))
    if mode == "I;16":
        return ramp.convert("I").point(lambda value: value * 257).convert("I;16")
    return ramp.convert(mode)


@pytest.mark.parametrize(
    ("image", "format", "copy_format", "copy_mode"),
    [
        (grey("I;16"), "PNG", "JPEG", "L"),  # 16-bit grey: scaled to 8 bits, not clipped white
        (grey("CMYK"), "JPEG", "JPEG", "RGB"),
        (grey("L"), "JPEG", "JPEG", "L"),
        (grey("P"), "PNG", "PNG", "RGB"),
        (grey("1"), "PNG", "PNG", "L"),
        (grey("LA"), "PNG", "PNG", "RGBA"),
    ],
    ids=["16-bit", "cmyk", "grey-jpeg", "palette", "bilevel", "grey-alpha"],
)
def test_every_pixel_mode_becomes_a_copy_the_model_reads(image, format, copy_format, copy_mode):
    facts = examine(f"image.{format.lower()}", image_bytes(image, format))
    copy = opened(facts.model_copy)
    assert (copy.format, copy.mode, copy.size) == (copy_format, copy_mode, (1204, 812))
    top, bottom = (copy.convert("L").getpixel((600, y)) for y in (20, 790))
    assert top < 40 and bottom > 215, (top, bottom)


def test_the_exif_orientation_is_applied():
    image = Image.new("RGB", (60, 30), (255, 0, 0))
    image.paste((0, 0, 255), (30, 0, 60, 30))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90° clockwise: the left half on top
    facts = examine("phone.jpg", image_bytes(image, "JPEG", exif=exif.tobytes(), quality=95))
    assert (facts.width, facts.height, facts.model_width, facts.model_height) == (30, 60, 30, 60)
    copy = opened(facts.model_copy).convert("RGB")
    assert copy.size == (30, 60)
    top, bottom = copy.getpixel((15, 5)), copy.getpixel((15, 55))
    assert top[0] > 200 and top[2] < 60, top
    assert bottom[2] > 200 and bottom[0] < 60, bottom


def test_an_animated_gif_sends_its_first_frame():
    frames = [Image.new("RGB", (40, 20), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    data = image_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    facts = examine("blink.gif", data)
    assert (facts.media_type, facts.width, facts.height) == ("image/gif", 40, 20)
    copy = opened(facts.model_copy).convert("RGB")
    assert (facts.model_media_type, copy.size, copy.getpixel((10, 10))) == ("image/png", (40, 20), (255, 0, 0))


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def test_a_decompression_bomb_is_refused_before_it_is_decoded():
    """20,000 by 20,000 pixels (400 megapixels, 50 MB decoded as 1-bit, 400 MB as Pillow holds it) in a
    PNG of 50 KB."""
    width = height = 20_000
    packer = zlib.compressobj(9)
    row = b"\0" * (width // 8 + 1)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    bomb = (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )
    assert len(bomb) < 100_000
    started = time.monotonic()
    error = refused("bomb.png", bomb)
    assert time.monotonic() - started < 0.5
    assert (error.status, error.code) == (422, "image_too_large")
    assert error.detail == (
        "bomb.png is 20,000 by 20,000 pixels (400,000,000); images of at most 50,000,000 pixels are accepted"
        " (CHATSVC_MAX_IMAGE_PIXELS)."
    )


def test_a_gif_whose_first_frame_outgrows_its_screen_is_refused():
    """A 10 by 10 GIF whose frame is 20,000 by 20,000: Pillow grows the image to the frame (and refuses past
    its own limit, which this refusal is)."""

    def gif(side: int) -> bytes:
        screen = b"GIF89a" + struct.pack("<HHBBB", 10, 10, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
        return screen + b"\x2c" + struct.pack("<HHHHB", 0, 0, side, side, 0) + b"\x02\x02\x4c\x01\x00\x3b"

    error = refused("frame.gif", gif(20_000))
    assert (error.status, error.code, error.detail) == (
        422,
        "image_too_large",
        "frame.gif has a frame larger than 50,000,000 pixels (CHATSVC_MAX_IMAGE_PIXELS); send a smaller image.",
    )
    error = refused("frame.gif", gif(9_000))
    assert (error.code, error.detail) == (
        "image_too_large",
        "frame.gif is 9,000 by 9,000 pixels (81,000,000); images of at most 50,000,000 pixels are accepted"
        " (CHATSVC_MAX_IMAGE_PIXELS).",
    )


def test_html_behind_a_png_signature_is_unreadable():
    error = refused("cat.png", b"\x89PNG\r\n\x1a\n<html><script>alert(1)</script></html>")
    assert (error.status, error.code) == (422, "image_unreadable")
    assert error.detail.startswith("cat.png could not be read as a PNG image")


def test_a_truncated_jpeg_is_unreadable():
    data = image_bytes(photo(800, 600), "JPEG")
    error = refused("cut.jpg", data[: len(data) // 2])
    assert (error.status, error.code) == (422, "image_unreadable")
    data = image_bytes(photo(3000, 2000), "JPEG")  # scaled (draft) rather than kept: truncated all the same
    assert refused("cut.jpg", data[: len(data) // 2]).code == "image_unreadable"


def test_a_truncated_png_is_unreadable():
    data = image_bytes(photo(300, 200), "PNG")
    assert refused("cut.png", data[:-200]).code == "image_unreadable"


SVG_REFUSED = (415, "unsupported_file_type", "SVG images are not accepted; send PNG, JPEG, WebP or GIF.")


@pytest.mark.parametrize(
    "svg",
    [
        b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>',
        b'<?xml version="1.0" encoding="UTF-8"?>\n<!-- made by hand -->\n<svg width="10"/>',
        b'\xef\xbb\xbf  <!DOCTYPE svg PUBLIC "-//W3C//DTD SVG 1.1//EN" "x.dtd">\n<SVG>',
        b'<?xml version="1.0"?><!DOCTYPE svg [ <!ENTITY a "b"> ]><svg>&a;</svg>',
    ],
)
def test_svg_is_refused_whatever_its_name(svg):
    for name in ("logo.svg", "logo.txt"):
        error = refused(name, svg)
        assert (error.status, error.code, error.detail) == SVG_REFUSED


def test_many_comments_do_not_make_the_svg_check_backtrack():
    """(The check's first pattern took 2^n steps for n empty comments: 0.75 s for 22.)"""
    comments = "<!---->" * 580 + "\n<p>not an SVG</p>"
    started = time.monotonic()
    assert examine("comments.html", comments.encode()).text == comments
    assert time.monotonic() - started < 0.5
    assert refused("comments.svg", ("<!---->" * 500 + "<svg/>").encode()).detail == SVG_REFUSED[2]


def test_heic_is_refused_saying_it_is_not_supported_yet():
    heic = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 100
    error = refused("IMG_0001.HEIC", heic)
    assert (error.status, error.code) == (415, "unsupported_file_type")
    assert error.detail == "HEIC/HEIF images are not supported yet; send the photo as JPEG or PNG."


@pytest.mark.parametrize(
    "data",
    [
        b"BM" + b"\x00" * 100,  # BMP
        b"II*\x00" + b"\x00" * 100,  # TIFF
        bytes(range(256)) * 4,  # binary
        "caf\u00e9".encode("latin-1"),  # not UTF-8
        b"text with a NUL\x00 in it",
        b"\xff\xfe\x00\x00h\x00\x00\x00",  # UTF-32: NULs once read as UTF-16
    ],
)
def test_what_is_not_accepted_is_refused_with_the_list(data):
    error = refused("thing.bin", data)
    assert (error.status, error.code) == (415, "unsupported_file_type")
    assert error.detail == (
        "thing.bin is not a type of file chatsvc accepts; send an image (PNG, JPEG, WebP, GIF), a PDF, a DOCX,"
        " or a UTF-8 text file (plain text, Markdown, CSV, JSON, source code)."
    )


def test_an_empty_file_is_refused():
    error = refused("empty.txt", b"")
    assert (error.status, error.code, error.detail) == (
        422,
        "empty_file",
        "empty.txt is empty (0 bytes); send a file with something in it.",
    )
    assert refused("bom.txt", b"\xef\xbb\xbf").code == "empty_file"


# ── text ──────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    ("name", "data", "media_type", "text"),
    [
        ("notes.txt", "héllo\nwörld\n".encode(), "text/plain", "héllo\nwörld\n"),
        ("notes.TXT", b"\xef\xbb\xbfwith a BOM", "text/plain", "with a BOM"),
        ("win.txt", "UTF-16 \u6587".encode("utf-16"), "text/plain", "UTF-16 \u6587"),
        ("be.txt", b"\xfe\xff" + "big end".encode("utf-16-be"), "text/plain", "big end"),
        ("README.md", b"# Title\n\n*text*", "text/markdown", "# Title\n\n*text*"),
        ("table.csv", b"a,b\n1,2\n", "text/csv", "a,b\n1,2\n"),
        ("data.json", b'{"a": [1, 2]}', "application/json", '{"a": [1, 2]}'),
        ("broken.json", b'{"a": ', "text/plain", '{"a": '),
        ("main.py", b"print('hi')\n", "text/plain", "print('hi')\n"),
        ("page.html", b"<!DOCTYPE html><html><script>x()</script></html>", "text/plain", None),
        ("inline.html", b"<html><body><svg></svg></body></html>", "text/plain", None),
        ("noextension", b"just text", "text/plain", "just text"),
    ],
)
def test_text_documents_keep_their_text_and_a_type_from_their_extension(name, data, media_type, text):
    facts = examine(name, data, LIMITED)
    assert (facts.kind, facts.media_type) == ("document", media_type)
    assert facts.text == (data.decode() if text is None else text)
    assert facts.model_copy is None and facts.pages is None and facts.text_note is None


def test_json_is_parsed_to_be_called_json():
    deep = b"[" * 2400 + b"]" * 2400  # deeper than the parser goes (its recursion limit): still text
    assert examine("deep.json", deep, LIMITED).media_type == "text/plain"
    listed = json.dumps(list(range(500))).encode("utf-16")
    assert examine("list.json", listed, LIMITED).media_type == "application/json"  # UTF-16 JSON too


def test_a_text_longer_than_the_limit_is_refused():
    settings = dataclasses.replace(SETTINGS, max_document_chars=1000)
    assert examine("ok.txt", b"x" * 1000, settings).text == "x" * 1000
    error = refused("long.txt", b"x" * 1001, settings)
    assert (error.status, error.code, error.detail) == (
        422,
        "document_too_long",
        "long.txt holds 1,001 characters; at most 1,000 are kept (CHATSVC_MAX_DOCUMENT_CHARS): send a part of it.",
    )


# ── the examiner ──────────────────────────────────────────────────────────────────────


def test_at_most_two_files_are_loaded_and_examined_at_once():
    async def run() -> list[int]:
        examiner = chatsvc.Examiner(SETTINGS)
        loading, most, release = 0, [], asyncio.Event()

        async def load() -> bytes:
            nonlocal loading
            loading += 1
            most.append(loading)
            await release.wait()
            loading -= 1
            return b"some text"

        tasks = [asyncio.create_task(examiner.examine(f"{n}.txt", load)) for n in range(5)]
        for _ in range(50):  # every task had every chance to start loading
            await asyncio.sleep(0)
        assert most == [1, 2]
        release.set()
        facts = await asyncio.gather(*tasks)
        assert [f.text for f in facts] == ["some text"] * 5
        await examiner.close()
        return most

    assert max(asyncio.run(run())) == 2


def test_close_without_a_worker_is_a_no_op():
    async def run() -> None:
        examiner = chatsvc.Examiner(SETTINGS)
        await examiner.close()
        await examiner.close()

    asyncio.run(run())


def test_examinations_run_off_the_event_loop():
    """While a 20 MiB JSON document is examined, the loop keeps ticking; parsed in a thread of this process
    (json.loads holds the GIL throughout), the same document holds it for most of a second."""
    data = b"[" + b"1," * (10 * 1024 * 1024 - 1) + b"1]"

    async def longest_tick(work) -> float:
        longest, done = 0.0, False

        async def ticker() -> None:
            nonlocal longest
            last = time.monotonic()
            while not done:
                await asyncio.sleep(0.005)
                now = time.monotonic()
                longest, last = max(longest, now - last), now

        tick = asyncio.create_task(ticker())
        await asyncio.sleep(0.01)
        await work()
        done = True
        await tick
        return longest

    async def run() -> tuple[float, float]:
        examiner = chatsvc.Examiner(dataclasses.replace(SETTINGS, max_document_chars=30_000_000))
        await examiner.examine("small.json", lambda: loaded(b"[1]"))  # the worker started

        async def examined() -> None:
            facts = await examiner.examine("big.json", lambda: loaded(data))
            assert (facts.media_type, len(facts.text)) == ("application/json", len(data))

        held = await longest_tick(examined)
        await examiner.close()
        naive = await longest_tick(lambda: asyncio.to_thread(json.loads, data))
        return held, naive

    held, naive = asyncio.run(run())
    assert naive > 0.5 and held < 0.3, (held, naive)


# ── DOCX ──────────────────────────────────────────────────────────────────────────────

WORD = "http://schemas.openxmlformats.org/wordprocessingml/2006/main"


def docx(body: str, doctype: str = "", members: int = 0) -> bytes:
    """A DOCX as Word writes one, reduced to what its text needs (and `members` more files in the zip)."""
    xml = (
        f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>{doctype}'
        f'<w:document xmlns:w="{WORD}"><w:body>{body}</w:body></w:document>'
    )
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("[Content_Types].xml", '<?xml version="1.0"?><Types/>')
        archive.writestr("word/document.xml", xml)
        for n in range(members):
            archive.writestr(f"word/media/{n}.txt", "")
    return out.getvalue()


def paragraph(*runs: str) -> str:
    return "<w:p>" + "".join(f'<w:r><w:t xml:space="preserve">{run}</w:t></w:r>' for run in runs) + "</w:p>"


DOCX_TYPE = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"


def test_a_docx_gives_its_paragraphs_one_a_line():
    body = (
        paragraph("Quarterly ", "report")
        + "<w:p><w:r><w:t>a</w:t><w:tab/><w:t>b</w:t><w:br/><w:t>c &amp; d</w:t></w:r></w:p>"
        + "<w:p/>"
        + "<w:tbl><w:tr><w:tc>"
        + paragraph("cell 1")
        + "</w:tc><w:tc>"
        + paragraph("cell 2")
        + "</w:tc></w:tr></w:tbl>"
        + "<w:p><w:pPr><w:rPr><w:t>not text: properties</w:t></w:rPr></w:pPr><w:r><w:t>中文</w:t></w:r></w:p>"
    )
    facts = examine("report.docx", docx(body))
    assert (facts.media_type, facts.kind, facts.pages, facts.text_note) == (DOCX_TYPE, "document", None, None)
    assert facts.text == "Quarterly report\na\tb\nc & d\n\ncell 1\ncell 2\nnot text: properties中文"


def test_a_docx_named_otherwise_is_still_a_docx():
    assert examine("upload.bin", docx(paragraph("x"))).media_type == DOCX_TYPE


def test_a_docx_with_a_dtd_is_refused():
    """An internal entity expands (a "billion laughs" needs nothing more): Word never writes a DTD."""
    laughs = '<!DOCTYPE w:document [<!ENTITY a "ha"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]>'
    error = refused("laughs.docx", docx(paragraph("&b;"), doctype=laughs))
    assert (error.status, error.code) == (422, "document_unreadable")
    assert error.detail == (
        "laughs.docx holds a DTD (<!DOCTYPE>), which Word never writes; save it again from a word processor and"
        " send that."
    )


def test_a_zip_bomb_docx_is_refused_before_it_is_expanded(monkeypatch):
    monkeypatch.setattr(chatsvc, "DOCX_MAX_XML_BYTES", 1024 * 1024)
    big = docx(paragraph(" " * (2 * 1024 * 1024)))
    assert len(big) < 10_000
    error = refused("bomb.docx", big)
    assert (error.status, error.code) == (422, "document_unreadable")
    assert error.detail == (
        "bomb.docx expands to more than a Word document does (2 files, a text part of 2,097,374 bytes; at most 2,000"
        " files and 1,048,576 bytes are read); send a smaller document."
    )
    error = refused("many.docx", docx(paragraph("x"), members=chatsvc.DOCX_MAX_MEMBERS))
    assert error.code == "document_unreadable" and "(2,002 files," in error.detail


def test_a_docx_whose_header_understates_its_text_part_is_not_read_past_it(monkeypatch):
    """zipfile stops at the declared size (and the CRC then differs): never more than the bound is expanded."""
    monkeypatch.setattr(chatsvc, "DOCX_MAX_XML_BYTES", 1024 * 1024)
    data = bytearray(docx(paragraph(" " * (2 * 1024 * 1024))))
    # The size word/document.xml expands to, as its local header and its central directory entry declare it:
    # 1,000 bytes.
    local = zipfile.ZipFile(io.BytesIO(bytes(data))).getinfo("word/document.xml").header_offset
    central = data.rfind(b"word/document.xml") - 46
    assert data[local : local + 4] == b"PK\x03\x04" and data[central : central + 4] == b"PK\x01\x02"
    data[local + 22 : local + 26] = data[central + 24 : central + 28] = struct.pack("<I", 1000)
    assert zipfile.ZipFile(io.BytesIO(bytes(data))).getinfo("word/document.xml").file_size == 1000
    error = refused("liar.docx", bytes(data))
    assert (error.code, error.detail) == (
        "document_unreadable",
        "liar.docx could not be read as a DOCX (it is damaged); save it again and send that.",
    )


def test_a_broken_docx_is_unreadable_and_another_zip_is_not_accepted():
    data = docx(paragraph("x"))
    error = refused("cut.docx", data[: len(data) // 2])
    assert (error.status, error.code) == (422, "document_unreadable")
    assert error.detail == "cut.docx could not be read as a DOCX (it is damaged); save it again and send that."
    assert refused("cut.zip", data[: len(data) // 2]).code == "unsupported_file_type"
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("xl/workbook.xml", "<workbook/>")
    assert refused("sheet.xlsx", out.getvalue()).code == "unsupported_file_type"
    broken = docx("<w:p><w:r><w:t>unclosed</w:r></w:p>")
    assert refused("broken.docx", broken).code == "document_unreadable"


def test_a_docx_longer_than_the_limit_is_refused():
    settings = dataclasses.replace(SETTINGS, max_document_chars=100)
    assert examine("ok.docx", docx(paragraph("x" * 50) + paragraph("y" * 49)), settings).text.count("\n") == 1
    error = refused("long.docx", docx(paragraph("x" * 60) + paragraph("y" * 60)), settings)
    assert (error.status, error.code, error.detail) == (
        422,
        "document_too_long",
        "long.docx holds more than 100 characters; at most that many are kept (CHATSVC_MAX_DOCUMENT_CHARS): send"
        " a part of it.",
    )


# ── PDF ───────────────────────────────────────────────────────────────────────────────

HELVETICA = DictionaryObject(
    {
        NameObject("/Font"): DictionaryObject(
            {
                NameObject("/F1"): DictionaryObject(
                    {
                        NameObject("/Type"): NameObject("/Font"),
                        NameObject("/Subtype"): NameObject("/Type1"),
                        NameObject("/BaseFont"): NameObject("/Helvetica"),
                    }
                )
            }
        )
    }
)


def shown(text: str) -> bytes:
    """A minimal content stream that shows `text` in Helvetica."""
    return f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()


def pdf(*contents: bytes | None, flate: bool = False) -> bytes:
    """A PDF of one page per content stream (None: a blank page), made with pypdf's writer. `flate`: the
    streams are given already compressed."""
    writer = PdfWriter()
    for content in contents:
        page = writer.add_blank_page(612, 792)
        if content is None:
            continue
        page[NameObject("/Resources")] = HELVETICA
        stream = StreamObject()
        if flate:
            stream[NameObject("/Filter")] = NameObject("/FlateDecode")
        stream.set_data(content)
        page.replace_contents(stream)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def handmade_pdf(*objects: bytes) -> bytes:
    """A PDF of these objects (1 0 obj is the catalog), with a correct cross-reference table."""
    out, offsets = b"%PDF-1.4\n", []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    table = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    return out + b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, table)


def test_a_pdf_gives_its_text_page_by_page():
    facts = examine("report.pdf", pdf(shown("Revenue grew"), None, shown("by 12 percent")), LIMITED)
    assert (facts.media_type, facts.kind, facts.pages, facts.text_note) == ("application/pdf", "document", 3, None)
    assert facts.text == "[page 1]\nRevenue grew\n\n[page 2]\n\n\n[page 3]\nby 12 percent"
    assert facts.model_copy is None and facts.width is None


def test_a_scanned_pdf_is_kept_with_a_note_that_it_has_no_text():
    scan = image_bytes(photo(200, 300), "PDF", resolution=72)
    facts = examine("scan.pdf", scan, LIMITED)
    assert (facts.media_type, facts.pages, facts.text, facts.text_note) == ("application/pdf", 1, "", "no_text")
    facts = examine("blank.pdf", pdf(None, None), LIMITED)
    assert (facts.pages, facts.text, facts.text_note) == (2, "", "no_text")


def test_a_pdf_with_too_many_pages_is_refused():
    error = refused("book.pdf", pdf(*[shown("page")] * 5), LIMITED)
    assert (error.status, error.code, error.detail) == (
        422,
        "document_too_long",
        "book.pdf has 5 pages; at most 4 are read (CHATSVC_MAX_DOCUMENT_PAGES): send a part of it.",
    )


def test_a_pdf_claiming_20000_pages_is_refused_before_they_are_walked():
    claims = handmade_pdf(
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 20000 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] >>",
    )
    error = refused("claims.pdf", claims, LIMITED)
    assert (error.code, error.detail) == (
        "document_too_long",
        "claims.pdf has 20,000 pages; at most 4 are read (CHATSVC_MAX_DOCUMENT_PAGES): send a part of it.",
    )


def test_a_pdf_whose_page_count_understates_its_pages_is_counted_by_its_tree():
    page = b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] >>"
    understated = handmade_pdf(
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R 4 0 R 5 0 R 6 0 R 7 0 R] /Count 2 >>",
        *[page] * 5,
    )
    error = refused("understated.pdf", understated, LIMITED)
    assert (error.code, error.detail) == (
        "document_too_long",
        "understated.pdf has 5 pages; at most 4 are read (CHATSVC_MAX_DOCUMENT_PAGES): send a part of it.",
    )


def test_a_pdf_whose_text_is_too_long_is_refused_where_it_passes_the_limit():
    assert examine("ok.pdf", pdf(shown("x" * 4000)), LIMITED).text == "[page 1]\n" + "x" * 4000
    error = refused("long.pdf", pdf(shown("x" * 3000), shown("y" * 3000), shown("z")), LIMITED)
    assert (error.status, error.code, error.detail) == (
        422,
        "document_too_long",
        "long.pdf holds more than 5,000 characters of text by page 2 of 3; at most 5,000 are kept"
        " (CHATSVC_MAX_DOCUMENT_CHARS): send a part of it.",
    )


UNREADABLE_PDF = (
    " could not be read as a PDF (it is damaged, or a part of it expands past the reader's limits); print or"
    " save it to a new PDF and send that."
)


def test_a_flate_bomb_pdf_is_unreadable():
    """A content stream of 80 MiB of spaces in 360 KB: past pypdf's 75 MB per stream, refused at once."""
    packer = zlib.compressobj(1)
    bomb = b"".join(packer.compress(b" " * (1024 * 1024)) for _ in range(80)) + packer.flush()
    data = pdf(bomb, flate=True)
    assert len(data) < 400_000
    started = time.monotonic()
    error = refused("bomb.pdf", data, LIMITED)
    assert time.monotonic() - started < 2
    assert (error.status, error.code, error.detail) == (422, "document_unreadable", "bomb.pdf" + UNREADABLE_PDF)


@pytest.mark.parametrize(
    "data",
    [
        handmade_pdf(  # a page tree that is its own kid
            b"<< /Type /Catalog /Pages 2 0 R >>",
            b"<< /Type /Pages /Kids [2 0 R 3 0 R] /Count 2 >>",
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] >>",
        ),
        b"%PDF-1.7\n" + bytes(range(256)) * 40,  # a signature and then nothing a reader can use
        pdf(shown("cut"))[:300],  # the first 300 bytes of a PDF
    ],
    ids=["cyclic", "garbage", "truncated"],
)
def test_a_damaged_pdf_is_unreadable(data):
    error = refused("damaged.pdf", data, LIMITED)
    assert (error.status, error.code, error.detail) == (422, "document_unreadable", "damaged.pdf" + UNREADABLE_PDF)


def test_a_pdf_that_needs_a_password_is_refused():
    writer = PdfWriter()
    writer.add_blank_page(612, 792)
    writer.encrypt(user_password="secret", algorithm="RC4-128")
    out = io.BytesIO()
    writer.write(out)
    error = refused("locked.pdf", out.getvalue(), LIMITED)
    assert (error.code, error.detail) == (
        "document_unreadable",
        "locked.pdf is protected by a password; send a copy without one.",
    )


def process_state(pid: int) -> tuple[int, str] | None:
    """A process's parent and state (R, S, Z…), from /proc; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), fields[0]


def running(pid: int) -> bool:
    state = process_state(pid)
    return state is not None and state[1] not in ("Z", "X")


def worker_pids(parent: int | None = None) -> set[int]:
    """The document workers of `parent` (this process) that are running: their command line names the worker."""
    parent = os.getpid() if parent is None else parent
    found = set()
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                command = cmdline.read()
        except OSError:  # ended meanwhile
            continue
        state = process_state(int(entry))
        if b"chatsvc.document_worker" in command and state and state[0] == parent and running(int(entry)):
            found.add(int(entry))
    return found


def endless_pdf() -> bytes:
    """A page of a million text operators, 20 KB compressed: pypdf needs about 15 s to extract it."""
    content = b"BT /F1 12 Tf 72 720 Td " + b"(a) Tj " * 1_000_000 + b"ET"
    return pdf(zlib.compress(content, 9), flate=True)


def test_a_pdf_that_runs_past_the_deadline_is_stopped_and_its_worker_killed(caplog):
    settings = dataclasses.replace(LIMITED, extract_timeout=0.5)
    before = worker_pids()
    assert examine("warm.pdf", pdf(shown("warm")), settings).text == "[page 1]\nwarm"  # the worker started
    (worker,) = worker_pids() - before
    endless = endless_pdf()
    started = time.monotonic()
    error = refused("endless.pdf", endless, settings)
    took = time.monotonic() - started
    assert 0.5 <= took < 1.5, took
    assert (error.status, error.code, error.detail) == (
        422,
        "document_unreadable",
        "Reading the text of endless.pdf took longer than 0.5 s (CHATSVC_EXTRACT_TIMEOUT), so it was stopped;"
        " send a smaller or simpler document, or a part of it.",
    )
    assert worker not in worker_pids()  # killed, and waited for
    assert examine("next.pdf", pdf(shown("next")), settings).text == "[page 1]\nnext"  # a new worker
    (new,) = worker_pids() - before
    assert new != worker
    logged = [r.getMessage() for r in caplog.records if r.name == "chatsvc"]
    assert "document worker killed: a pdf ran past 0.5 s (CHATSVC_EXTRACT_TIMEOUT)" in logged
    assert f"document worker started (pid {new})" in logged
    assert not [line for line in logged if ".pdf" in line]  # file names are the users'


def test_an_examination_cancelled_ends_the_pdf_being_read():
    """The upload's client left: the worker is not left reading its PDF for the next upload to wait on. And
    close() ends the worker."""
    examiner = EXAMINERS.examiners.setdefault(LIMITED, chatsvc.Examiner(LIMITED))

    async def run() -> None:
        await examiner.close()  # its worker, if earlier tests started one
        before = worker_pids()  # the other examiners'
        await examiner.examine("warm.pdf", lambda: loaded(pdf(shown("warm"))))
        (worker,) = worker_pids() - before
        data, loading = endless_pdf(), asyncio.Event()

        async def load() -> bytes:
            loading.set()
            return data

        reading = asyncio.create_task(examiner.examine("endless.pdf", load))
        await loading.wait()  # and the examination went on to wait for the worker
        reading.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reading
        assert worker not in worker_pids()
        facts = await examiner.examine("next.pdf", lambda: loaded(pdf(shown("next"))))
        assert facts.text == "[page 1]\nnext"
        (new,) = worker_pids() - before
        assert new != worker
        await examiner.close()
        assert worker_pids() == before

    EXAMINERS.run(run())


SERVICE = """
import sys
import chatsvc

worker = chatsvc._Worker()
assert worker.conn.recv() == "ready"
worker.conn.send(("pdf", "endless.pdf", open(sys.argv[1], "rb").read(), 500, 2_000_000))  # in the worker's socket
print(worker.process.pid, flush=True)
sys.stdin.read()  # until killed
"""


def test_a_worker_whose_service_is_killed_ends_itself(tmp_path):
    """SIGKILL leaves the service no time to end its worker, which may be reading a PDF that never ends (for
    about 15 s here): the worker ends itself."""
    (tmp_path / "endless.pdf").write_bytes(endless_pdf())
    (tmp_path / "service.py").write_text(SERVICE)
    service = subprocess.Popen(
        [sys.executable, str(tmp_path / "service.py"), str(tmp_path / "endless.pdf")],
        env={**os.environ, "PYTHONPATH": os.path.dirname(chatsvc.__file__)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        worker = int(service.stdout.readline())
    finally:
        service.kill()
        service.wait()
        service.stdin.close()
        service.stdout.close()
    killed = time.monotonic()
    wait_for(lambda: not running(worker), timeout=5)
    assert time.monotonic() - killed < 3
