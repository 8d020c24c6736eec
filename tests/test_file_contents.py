"""File contents: what an uploaded file is, by its bytes (chatsvc's `File contents` section). No server and
no database: the Examiner is run on bytes made here (images with Pillow, in memory; PDFs with pypdf's
writer; DOCX with zipfile), the hostile ones included."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import struct
import threading
import time
import zlib

import pytest
from PIL import Image

import chatsvc
from chatsvc import FileRefused

SETTINGS = chatsvc.Settings()


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
    facts = examine(name, data)
    assert (facts.kind, facts.media_type) == ("document", media_type)
    assert facts.text == (data.decode() if text is None else text)
    assert facts.model_copy is None and facts.pages is None and facts.text_note is None


def test_json_is_parsed_to_be_called_json():
    deep = b"[" * 100_000 + b"]" * 100_000  # deeper than the parser goes: still text
    assert examine("deep.json", deep).media_type == "text/plain"
    assert examine("list.json", json.dumps(list(range(1000))).encode()).media_type == "application/json"


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
    """While a 20 MiB JSON document is read (parsed: most of a second), the loop keeps ticking."""
    data = b"[" + b"1," * (10 * 1024 * 1024 - 1) + b"1]"

    async def run() -> float:
        examiner = chatsvc.Examiner(dataclasses.replace(SETTINGS, max_document_chars=30_000_000))
        longest, done = 0.0, False

        async def ticker() -> None:
            nonlocal longest
            last = time.monotonic()
            while not done:
                await asyncio.sleep(0.005)
                now = time.monotonic()
                longest, last = max(longest, now - last), now

        tick = asyncio.create_task(ticker())
        started = time.monotonic()
        facts = await examiner.examine("big.json", lambda: loaded(data))
        assert time.monotonic() - started > 0.2  # long enough for a held loop to show
        done = True
        await tick
        assert (facts.media_type, len(facts.text)) == ("application/json", len(data))
        await examiner.close()
        return longest

    assert asyncio.run(run()) < 0.1
