"""Files in conversation files (export version 3): the files the messages carry go into the export as
base64, keyed by first use, and come back on import as the importer's files, examined like uploads,
deduplicated, counted against the quota, all or nothing; the Markdown export links them by name. Both
databases (the `database` fixture)."""

from __future__ import annotations

import base64
import copy
import hashlib
import io
import json

import pytest
from PIL import Image
from test_export import normal

API = "/api/v1"
CONV = f"{API}/context/conversations"
JSON = {"Content-Type": "application/json"}


def png(width: int, height: int, colour: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(out, "PNG")
    return out.getvalue()


PHOTO = png(64, 48, (20, 90, 160))
NOTES = b"Tide table\nhigh water 06:12\nlow water 12:30\n"


def text_pdf(text: bytes) -> bytes:
    """A one-page PDF whose page says `text` (Helvetica), made with pypdf."""
    from pypdf import PdfWriter
    from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject

    writer = PdfWriter()
    page = writer.add_blank_page(200, 200)
    font = {"/Type": "/Font", "/Subtype": "/Type1", "/BaseFont": "/Helvetica"}
    font_ref = writer._add_object(DictionaryObject({NameObject(k): NameObject(v) for k, v in font.items()}))
    fonts = DictionaryObject({NameObject("/F1"): font_ref})
    page[NameObject("/Resources")] = DictionaryObject({NameObject("/Font"): fonts})
    stream = DecodedStreamObject()
    stream.set_data(b"BT /F1 12 Tf 20 100 Td (" + text + b") Tj ET")
    page[NameObject("/Contents")] = writer._add_object(stream)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


REPORT = text_pdf(b"High water 06:12")


def entry(key: str, name: str, data: bytes, media_type: str) -> dict:
    return {
        "key": key,
        "name": name,
        "media_type": media_type,
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
        "data": base64.b64encode(data).decode(),
    }


def message(mid: str, parent: str | None, role: str, content: str, files: list[str] | None = None) -> dict:
    m = {
        "id": mid, "parent_id": parent, "role": role, "content": content, "reasoning_content": None,
        "status": "complete", "model": "qwen-plus" if role == "assistant" else None,
        "finish_reason": "stop" if role == "assistant" else None, "error": None, "usage": None,
        "created_at": f"2026-12-01T10:00:0{mid[1]}.000Z", "in_context": True,
        "last_seq": 2 if role == "assistant" else None, "tool_steps": None, "tool_results": None,
    }  # fmt: skip
    if files:
        m["files"] = files
    return m


def a_file() -> dict:
    """A version 3 file as chatsvc exports it: a photo and a text document on the first question, the
    document again (written once, f2) and a PDF on the second."""
    return {
        "format": "chatsvc.conversation",
        "version": 3,
        "exported_at": "2026-12-01T10:00:09.000Z",
        "conversation": {
            "session_id": "tides",
            "title": "Tides",
            "system_prompt": None,
            "model": None,
            "created_at": "2026-12-01T10:00:00.000Z",
            "updated_at": "2026-12-01T10:00:05.000Z",
            "current_message_id": "m4",
        },
        "messages": [
            message("m1", None, "user", "What do these show?", ["f1", "f2"]),
            message("m2", "m1", "assistant", "A chart and a table."),
            message("m3", "m2", "user", "When is low water?", ["f2", "f3"]),
            message("m4", "m3", "assistant", "12:30."),
        ],
        "files": [
            entry("f1", "tide_chart.png", PHOTO, "image/png"),
            entry("f2", "notes (1).txt", NOTES, "text/plain"),
            entry("f3", "report.pdf", REPORT, "application/pdf"),
        ],
    }


def import_doc(client, doc, headers=None, query=""):
    return client.post(f"{CONV}/import{query}", content=json.dumps(doc), headers={**JSON, **(headers or {})})


def export(client, sid, headers=None) -> dict:
    r = client.get(f"{CONV}/{sid}/export", headers=headers or {})
    assert r.status_code == 200, r.text
    assert int(r.headers["content-length"]) == len(r.content)  # told before the first byte, exactly
    return r.json()


def carried(service, session_id: str, owner: str = "") -> list[tuple[int, str]]:
    """The stored message_files of a conversation: (position, file id), in message order."""
    rows = service.rows(
        "SELECT mf.position, mf.file_id FROM message_files mf JOIN messages m ON m.id = mf.message_id"
        " WHERE m.session_id = ? AND m.owner = ? AND mf.owner = ? ORDER BY m.id, mf.position",
        session_id, owner, owner,
    )  # fmt: skip
    return [(r["position"], r["file_id"]) for r in rows]


def test_export_import_export_is_the_same_but_ids_and_reuses_the_files(service, client):
    doc = a_file()
    r = import_doc(client, doc)
    assert r.status_code == 201, r.text
    assert r.json()["session_id"] == "tides"
    first = export(client, "tides")
    assert first["version"] == 3
    assert first["files"] == doc["files"]  # keys, names, media types, sha256, sizes and bytes as given
    assert normal(first) == normal(doc)
    assert [m.get("files") for m in first["messages"]] == [["f1", "f2"], None, ["f2", "f3"], None]
    assert "files" not in first["messages"][1]  # absent, not empty, on a message without files
    stored = service.rows("SELECT id, name, media_type, kind, size, width, height, pages, text FROM files ORDER BY id")
    assert [tuple(f.values())[1:] for f in stored] == [
        ("tide_chart.png", "image/png", "image", len(PHOTO), 64, 48, None, None),
        ("notes (1).txt", "text/plain", "document", len(NOTES), None, None, None, NOTES.decode()),
        ("report.pdf", "application/pdf", "document", len(REPORT), None, None, 1, "[page 1]\nHigh water 06:12"),
    ]  # examined as uploads are: the PDF's text extracted
    ids = [f["id"] for f in stored]
    assert carried(service, "tides") == [(0, ids[0]), (1, ids[1]), (0, ids[1]), (1, ids[2])]
    # importing one's own export: the same files, not copies
    r = import_doc(client, first)
    assert r.status_code == 201, r.text
    again_sid = r.json()["session_id"]
    assert again_sid != "tides"
    assert [f["id"] for f in service.rows("SELECT id FROM files ORDER BY id")] == ids
    assert carried(service, again_sid) == carried(service, "tides")
    again = export(client, again_sid)
    assert normal(again) == normal(first)
    assert not {m["id"] for m in again["messages"]} & {m["id"] for m in first["messages"]}


def test_markdown_links_the_files_by_name(client):
    doc = a_file()
    doc["files"][1] = entry("f2", "notes [draft]_1.txt", NOTES, "text/plain")
    assert import_doc(client, doc).status_code == 201
    text = client.get(f"{CONV}/tides/export?format=markdown").text
    notes = "[notes \\[draft\\]\\_1.txt](files/notes%20%5Bdraft%5D_1.txt)"
    line = f"Attached: [tide\\_chart.png](files/tide_chart.png) · {notes}"
    assert text.count("Attached: ") == 2
    first, second = text.split("## ")[1], text.split("## ")[3]  # the two questions' sections
    assert first.startswith("User · 2026-12-01 10:00\n\n" + line + "\n\nWhat do these show?")
    assert f"Attached: {notes} · [report.pdf](files/report.pdf)\n\nWhen is low water?" in second


def test_a_file_name_adds_no_markdown_of_its_own(client):
    doc = a_file()
    doc["files"][1] = entry("f2", "x](javascript:alert(1)) <b>*#`~|.txt", NOTES, "text/plain")
    assert import_doc(client, doc).status_code == 201
    text = client.get(f"{CONV}/tides/export?format=markdown").text
    label = "x\\](javascript:alert(1)) \\<b\\>\\*\\#\\`\\~\\|.txt"
    link = "files/x%5D%28javascript%3Aalert%281%29%29%20%3Cb%3E%2A%23%60~%7C.txt"
    assert f"Attached: [tide\\_chart.png](files/tide_chart.png) · [{label}]({link})\n" in text


def changed(change):
    doc = a_file()
    change(doc)
    return doc


def with_data(n: int, data: bytes, sha256: str | None = None):
    """The change of file n's bytes (its size and sha256 made to fit, but `sha256` if given)."""

    def change(doc):
        doc["files"][n] |= {"data": base64.b64encode(data).decode(), "size": len(data),
                            "sha256": sha256 or hashlib.sha256(data).hexdigest()}  # fmt: skip

    return change


TAMPERED = PHOTO[:-20] + bytes([PHOTO[-20] ^ 1]) + PHOTO[-19:]


@pytest.mark.parametrize(
    ("doc", "status", "code", "detail"),
    [
        (changed(with_data(0, TAMPERED, hashlib.sha256(PHOTO).hexdigest())), 422, "invalid_request",
         'files[0].sha256: does not match the data of file "f1": its bytes were changed.'),
        (changed(lambda d: d["files"][1].update(size=len(NOTES) + 3)), 422, "invalid_request",
         f'files[1].data: must be the base64 of the file\'s {len(NOTES) + 3} bytes (file "f2").'),
        (changed(lambda d: d["files"][1].update(data="!" * len(d["files"][1]["data"]))), 422, "invalid_request",
         'files[1].data: is not valid base64 (file "f2").'),
        (changed(lambda d: d["messages"][2].update(files=["f9"])), 422, "invalid_request",
         'messages[2].files[0]: "f9" is not the key of a file in the file\'s files.'),
        (changed(lambda d: d["messages"][0].update(files=["f1", "f1"])), 422, "invalid_request",
         'messages[0].files[1]: "f1" is carried twice.'),
        (changed(lambda d: d["messages"][1].update(files=["f1"])), 422, "invalid_request",
         "messages[1].files: must be absent: only a user message"),
        (changed(lambda d: d["messages"][2].pop("files") and d["messages"][0].update(files=["f1"])), 422,
         "invalid_request", 'files[1].key: no message of the file carries "f2".'),
        (changed(lambda d: d["files"].append(copy.deepcopy(d["files"][0]))), 422, "invalid_request",
         'files[3].key: "f1" is the key of an earlier file.'),
        (changed(lambda d: d["files"][0].pop("sha256")), 422, "invalid_request", "files[0].sha256: is required."),
        (changed(lambda d: d["files"][2].update(copy.deepcopy(d["files"][1]) | {"key": "f3"})), 422,
         "invalid_request", 'files[2].sha256: file "f3" has the same bytes as file "f2".'),
        (changed(lambda d: d.update(version=2)), 422, "invalid_request", "files: unknown field"),
        (changed(lambda d: d.update(version=4)), 422, "invalid_request",
         "format: this is not a chatsvc conversation file (format 'chatsvc.conversation', version 1, 2 or 3)."),
        (changed(with_data(1, b"\x00\x01\x02 neither an image nor text")), 415,
         "unsupported_file_type", 'files[1] ("f2"): '),
        (changed(with_data(0, PHOTO[:40])), 422, "image_unreadable", 'files[0] ("f1"): '),
        (changed(with_data(1, b"")), 422, "empty_file", 'files[1] ("f2"): '),
        (changed(lambda d: d.update(files=d["files"] * 334)), 422, "invalid_request",
         "files: holds 1002 files; an import takes at most 1000."),
    ],
)  # fmt: skip
def test_a_bad_file_is_refused_naming_it_and_nothing_is_stored(service, client, doc, status, code, detail):
    r = import_doc(client, doc)
    assert r.status_code == status, r.text
    assert r.json()["code"] == code and r.json()["detail"].startswith(detail), r.json()["detail"]
    assert client.get(CONV).json()["conversations"] == []
    assert service.rows("SELECT id FROM files") == [] and service.rows("SELECT file_id FROM file_chunks") == []


def test_a_file_over_the_upload_limit_is_413(make_service):
    with make_service(CHATSVC_MAX_FILE_BYTES=str(len(PHOTO) - 1)).client() as client:
        r = import_doc(client, a_file())
        assert r.status_code == 413, r.text
        assert r.json()["code"] == "file_too_large"
        assert r.json()["detail"] == (
            f'files[0]: file "f1" ({len(PHOTO):,} bytes) is larger than CHATSVC_MAX_FILE_BYTES'
            f" ({len(PHOTO) - 1:,} bytes)."
        )


def test_an_import_refused_half_way_leaves_no_files(make_service):
    """The first file is stored, the second passes the quota: the import is refused and the first one
    removed; a file the owner had before stays."""
    service = make_service(CHATSVC_MAX_STORAGE_BYTES_PER_USER=str(len(PHOTO) + len(NOTES) - 1))
    with service.client() as client:
        r = import_doc(client, a_file())
        assert r.status_code == 413, r.text
        assert r.json()["code"] == "storage_full" and r.json()["detail"].startswith('files[1] ("f2"): Your files use')
        assert service.rows("SELECT id FROM files") == [] and service.rows("SELECT file_id FROM file_chunks") == []
        assert client.get(CONV).json()["conversations"] == []
        # a conversation of only the photo imports; the full file is then refused for its session id,
        # which removes the document it stored but keeps the photo the owner had
        photo_only = a_file()
        del photo_only["files"][1:]
        for m in photo_only["messages"]:
            m.pop("files", None)
        photo_only["messages"][0]["files"] = ["f1"]
        assert import_doc(client, photo_only, query="?session_id=taken").status_code == 201
        photo = service.rows("SELECT id FROM files")
        assert len(photo) == 1
        service_quota_free = make_service()
    with service_quota_free.client() as client:
        r = import_doc(client, a_file(), query="?session_id=taken")
        assert r.status_code == 409 and r.json()["code"] == "conversation_exists"
        assert service_quota_free.rows("SELECT id FROM files") == photo
        assert [c["session_id"] for c in client.get(CONV).json()["conversations"]] == ["taken"]


def test_another_owner_importing_gets_files_of_its_own(make_service):
    service = make_service(CHATSVC_USER_HEADER="X-User-Id")
    alice, bob = {"X-User-Id": "alice"}, {"X-User-Id": "bob"}
    with service.client() as client:
        assert import_doc(client, a_file(), alice).status_code == 201
        doc = export(client, "tides", alice)
        r = import_doc(client, doc, bob)
        assert r.status_code == 201 and r.json()["session_id"] == "tides"
        owners = service.rows("SELECT owner, sha256, id FROM files ORDER BY owner, id")
        shas = [f["sha256"] for f in doc["files"]]
        assert [(f["owner"], f["sha256"]) for f in owners] == [("alice", sha) for sha in shas] + [
            ("bob", sha) for sha in shas
        ]
        alices = {f["id"] for f in owners if f["owner"] == "alice"}
        bobs = {f["id"] for f in owners if f["owner"] == "bob"}
        assert not alices & bobs
        assert {file_id for _, file_id in carried(service, "tides", "bob")} == bobs
        assert {file_id for _, file_id in carried(service, "tides", "alice")} == alices
        assert normal(export(client, "tides", bob)) == normal(doc)
        assert client.get(f"{CONV}/tides/export", headers={"X-User-Id": "eve"}).status_code == 404


def test_a_version_2_file_still_imports(service, client):
    doc = a_file()
    doc["version"] = 2
    del doc["files"]
    for m in doc["messages"]:
        m.pop("files", None)
    r = import_doc(client, doc)
    assert r.status_code == 201, r.text
    again = export(client, "tides")
    assert again["version"] == 3 and again["files"] == []
    assert normal(again) == normal(doc) | {"version": 3, "files": []}
    assert service.rows("SELECT file_id FROM message_files") == []


def test_files_sent_in_a_chat_export_and_import_and_reach_the_model_again(make_service, fake):
    """End to end: uploaded, sent with a message, exported, imported (the same files: dedup), and the
    imported conversation's next turn sends the model what the original's did."""
    from fake_dashscope import Reply

    service = make_service(CHATSVC_VISION_MODEL="qwen3-vl-plus")
    with service.client() as client:
        ids = []
        for name, data, media_type in (
            ("tide_chart.png", PHOTO, "image/png"),
            ("report.pdf", REPORT, "application/pdf"),
        ):
            r = client.post(f"{API}/files", content=data, params={"name": name}, headers={"Content-Type": media_type})
            assert r.status_code == 201, r.text
            ids.append(r.json()["id"])
        fake.push(Reply.answer(["High water at 06:12."]))
        r = client.post(f"{API}/chat/s1", json={"message": "When is high water?", "files": ids})
        assert r.status_code == 200, r.text
        question = fake.requests[-1].body["messages"][-1]
        doc = export(client, "s1")
        assert doc["messages"][0]["files"] == ["f1", "f2"]
        assert [(f["key"], f["name"], base64.b64decode(f["data"])) for f in doc["files"]] == [
            ("f1", "tide_chart.png", PHOTO),
            ("f2", "report.pdf", REPORT),
        ]
        r = import_doc(client, doc)
        assert r.status_code == 201, r.text
        sid = r.json()["session_id"]
        shown = client.get(f"{CONV}/{sid}").json()["messages"]
        assert [f["id"] for f in shown[0]["files"]] == ids  # the owner's own files, not copies
        assert service.rows("SELECT COUNT(*) AS n FROM files")[0]["n"] == 2
        fake.push(Reply.answer(["Low water at 12:30."]))
        r = client.post(f"{API}/chat/{sid}", json={"message": "And low water?"})
        assert r.status_code == 200, r.text
        assert fake.requests[-1].body["messages"][1] == question  # the image part and the PDF's text, again
        assert fake.requests[-1].body["model"] == "qwen3-vl-plus"
        again = export(client, sid)
        assert normal(again)["files"] == normal(doc)["files"]
        assert normal(again)["messages"][:2] == normal(doc)["messages"]  # the files' keys too
