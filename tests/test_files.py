"""The routes under /api/v1/files, through the app on both databases: uploads (multipart and raw),
dedup, limits, the owner's files only, the content's headers and ranges, deletion, an upload cut off
mid-body, and the collector. Files are made in memory (Pillow, pypdf)."""

from __future__ import annotations

import hashlib
import io
import socket
import time

import httpx2 as httpx
import pytest
from live import LiveServer
from PIL import Image
from support import wait_for

import chatsvc

API = "/api/v1"
FILES = f"{API}/files"
CSP = "default-src 'none'; sandbox; frame-ancestors 'none'"


def png(width: int = 64, height: int = 48, color=(200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, "PNG")
    return out.getvalue()


def pdf() -> bytes:
    from pypdf import PdfWriter

    writer = PdfWriter()
    writer.add_blank_page(width=200, height=200)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def lines(count: int) -> bytes:
    """A text file whose every byte says where it is (9 bytes a line)."""
    return "".join(f"{i:08d}\n" for i in range(count)).encode()


def upload(client, data: bytes, name: str = "photo.png", media_type: str = "image/png", **kw):
    return client.post(FILES, files={"file": (name, data, media_type)}, **kw)


def upload_raw(client, data: bytes, name: str | None, media_type: str = "text/plain", headers=None):
    params = {} if name is None else {"name": name}
    return client.post(FILES, content=data, params=params, headers={"Content-Type": media_type, **(headers or {})})


def counts(service) -> tuple[int, int]:
    """(files rows, file_chunks rows) in the service's database."""
    files = service.rows("SELECT count(*) AS n FROM files")[0]["n"]
    chunks = service.rows("SELECT count(*) AS n FROM file_chunks")[0]["n"]
    return int(files), int(chunks)


def refused(r, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["code"] == code and body["detail"].endswith("."), body
    return body


def test_multipart_and_raw_uploads_their_metadata_and_bytes(service, client):
    image = png(64, 48)
    r = upload(client, image)
    assert r.status_code == 201, r.text
    shown = r.json()
    assert set(shown) == {"id", "name", "media_type", "size", "sha256", "kind", "created_at", "width", "height"}
    assert shown["name"] == "photo.png" and shown["media_type"] == "image/png" and shown["kind"] == "image"
    assert shown["size"] == len(image) and shown["sha256"] == hashlib.sha256(image).hexdigest()
    assert (shown["width"], shown["height"]) == (64, 48)
    text = b"# Notes\nline one\n"
    r = upload_raw(client, text, "notes.txt")
    assert r.status_code == 201, r.text
    note = r.json()
    assert note["kind"] == "document" and note["media_type"] == "text/plain" and note["text_chars"] == len(text)
    assert "width" not in note and "note" not in note
    got = client.get(f"{FILES}/{shown['id']}")
    assert got.status_code == 200 and got.json() == {**shown, "references": 0}
    assert client.get(f"{FILES}/{shown['id']}/content").content == image
    assert client.get(f"{FILES}/{note['id']}/content").content == text
    assert counts(service) == (2, 2)
    assert service.rows("SELECT status FROM files") == [{"status": "ready"}] * 2


def test_the_same_bytes_are_stored_once_per_owner(make_service):
    service = make_service(CHATSVC_USER_HEADER="X-User")
    image = png()
    with service.client() as client:
        first = upload(client, image, headers={"X-User": "ann"})
        assert first.status_code == 201
        again = upload(client, image, name="other.png", headers={"X-User": "ann"})
        assert again.status_code == 200 and again.json() == first.json()  # the stored file, its name
        raw = upload_raw(client, image, "third.png", "application/octet-stream", headers={"X-User": "ann"})
        assert raw.status_code == 200 and raw.json()["id"] == first.json()["id"]
        bob = upload(client, image, headers={"X-User": "bob"})
        assert bob.status_code == 201 and bob.json()["id"] != first.json()["id"]
        assert bob.json()["sha256"] == first.json()["sha256"]
    assert counts(service) == (2, 2)


def test_the_files_list_is_the_owners_newest_first_a_page_at_a_time(make_service):
    service = make_service(CHATSVC_USER_HEADER="X-User")
    ann = {"X-User": "ann"}
    with service.client() as client:
        ids = [upload_raw(client, f"file {n}\n".encode(), f"f{n}.txt", headers=ann).json()["id"] for n in range(3)]
        upload_raw(client, b"bob's\n", "b.txt", headers={"X-User": "bob"})
        page = client.get(FILES, params={"limit": 2}, headers=ann).json()
        assert [f["id"] for f in page["files"]] == ids[:0:-1] and page["next_cursor"]
        rest = client.get(FILES, params={"limit": 2, "cursor": page["next_cursor"]}, headers=ann).json()
        assert [f["id"] for f in rest["files"]] == ids[:1] and rest["next_cursor"] is None
        refused(client.get(FILES, params={"cursor": "garbage!"}, headers=ann), 422, "invalid_request")


def test_another_owners_file_is_absent_on_every_route(make_service):
    service = make_service(CHATSVC_USER_HEADER="X-User")
    with service.client() as client:
        file_id = upload(client, png(), headers={"X-User": "ann"}).json()["id"]
        bob = {"X-User": "bob"}
        for r in (
            client.get(f"{FILES}/{file_id}", headers=bob),
            client.get(f"{FILES}/{file_id}/content", headers=bob),
            client.delete(f"{FILES}/{file_id}", headers=bob),
        ):
            assert refused(r, 404, "file_not_found")["detail"] == f"No file '{file_id}'."
        assert client.get(FILES, headers=bob).json() == {"files": [], "next_cursor": None}
        assert client.get(f"{FILES}/{file_id}", headers={"X-User": "ann"}).status_code == 200
        refused(client.get(f"{FILES}/not-an-id", headers=bob), 404, "file_not_found")
        refused(client.get(FILES), 401, "unauthorized")  # no owner: no files at all


def test_delete_unused_204_in_use_409(service, client, fake):
    unused = upload_raw(client, b"unused\n", "unused.txt").json()["id"]
    used = upload(client, png()).json()["id"]
    assert client.post(f"{API}/chat/s1", json={"message": "hi"}).status_code == 200
    question = service.rows("SELECT id FROM messages WHERE role = 'user'")[0]["id"]
    service.rows(
        "INSERT INTO message_files (owner, message_id, position, file_id) VALUES ('', ?, 0, ?)", question, used
    )
    assert client.get(f"{FILES}/{used}").json()["references"] == 1
    assert "1" in refused(client.delete(f"{FILES}/{used}"), 409, "file_in_use")["detail"]
    r = client.delete(f"{FILES}/{unused}")
    assert r.status_code == 204 and r.content == b""
    refused(client.delete(f"{FILES}/{unused}"), 404, "file_not_found")
    refused(client.get(f"{FILES}/{unused}/content"), 404, "file_not_found")
    assert client.get(f"{FILES}/{used}/content").content == png()
    assert counts(service) == (1, 1)


def test_empty_too_large_and_over_quota_store_nothing(make_service):
    service = make_service(CHATSVC_MAX_FILE_BYTES="3000", CHATSVC_MAX_STORAGE_BYTES_PER_USER="4000")
    with service.client() as client:
        refused(upload_raw(client, b"", "empty.txt"), 422, "empty_file")
        refused(upload(client, b"", name="empty.png"), 422, "empty_file")
        body = refused(upload_raw(client, b"x" * 3001, "big.txt"), 413, "file_too_large")
        assert "CHATSVC_MAX_FILE_BYTES" in body["detail"]
        chunked = client.post(FILES, params={"name": "big.txt"}, content=iter([b"x" * 2000, b"y" * 2000]))
        refused(chunked, 413, "file_too_large")  # no Content-Length: counted as it arrives
        refused(upload(client, b"z" * 3001, name="big.txt", media_type="text/plain"), 413, "file_too_large")
        assert counts(service) == (0, 0)
        assert upload_raw(client, b"a" * 2500, "a.txt").status_code == 201
        body = refused(upload_raw(client, b"b" * 2500, "b.txt"), 413, "storage_full")
        assert "CHATSVC_MAX_STORAGE_BYTES_PER_USER" in body["detail"]
        assert upload_raw(client, b"a" * 2500, "again.txt").status_code == 200  # a dedup hit costs nothing
        assert upload_raw(client, b"c" * 1500, "c.txt").status_code == 201
        refused(upload_raw(client, b"d" * 10, "d.txt"), 413, "storage_full")  # full before a byte is read
    assert counts(service) == (2, 2)


def test_the_upload_is_not_bound_by_the_json_body_limit(make_service):
    service = make_service(CHATSVC_MAX_BODY_BYTES="1024")
    with service.client() as client:
        data = lines(20_000)  # 180,000 bytes
        r = upload_raw(client, data, "log.txt")
        assert r.status_code == 201, r.text
        assert client.get(f"{FILES}/{r.json()['id']}/content").content == data
        assert client.post(f"{API}/chat/s1", json={"message": "x" * 2000}).status_code == 413  # JSON: as before


def multipart(*parts: tuple[str, str | None, bytes], boundary: str = "XyZ") -> tuple[bytes, dict]:
    body = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    return body + f"--{boundary}--\r\n".encode(), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def test_bad_multipart_bodies_and_names(service, client):
    body, headers = multipart(("note", None, b"hello"), ("file", "a.txt", b"file text\n"))
    r = client.post(FILES, content=body, headers=headers)
    assert r.status_code == 201 and r.json()["name"] == "a.txt"  # other parts are skipped
    for parts, why in (
        ((("note", None, b"hello"),), "no part named 'file'"),
        ((("file", "a.txt", b"one\n"), ("file", "b.txt", b"two\n")), "two parts named 'file'"),
        ((("file", None, b"one\n"),), "no filename"),
    ):
        body, headers = multipart(*parts)
        assert why in refused(client.post(FILES, content=body, headers=headers), 400, "bad_upload")["detail"]
    body, headers = multipart(("file", "a.txt", b"cut off"))
    refused(client.post(FILES, content=body[:-20], headers=headers), 400, "bad_upload")  # no closing boundary
    refused(client.post(FILES, content=b"garbage", headers=headers), 400, "bad_upload")
    no_boundary = {"Content-Type": "multipart/form-data"}
    assert "boundary" in refused(client.post(FILES, content=body, headers=no_boundary), 400, "bad_upload")["detail"]
    assert "?name=" in refused(upload_raw(client, b"text\n", None), 400, "bad_file_name")["detail"]
    raw_name = "../../etc/x\x01\u202e.txt"
    r = upload_raw(client, b"named\n", raw_name)
    assert r.status_code == 201 and r.json()["name"] == chatsvc.clean_name(raw_name)
    assert "/" not in r.json()["name"] and "\x01" not in r.json()["name"] and "\u202e" not in r.json()["name"]
    r = upload(client, b"named too\n", name="..\\..\\évil\x7f.txt", media_type="text/plain")
    assert r.status_code == 201 and r.json()["name"] == chatsvc.clean_name("..\\..\\évil\x7f.txt")
    refused(upload_raw(client, b"text\n", "../\x01/"), 400, "bad_file_name")
    assert counts(service) == (3, 3)


def test_content_headers_of_an_image_a_pdf_and_html(client):
    image = upload_raw(client, png(), 'red dot "x".png', "image/png").json()  # (a browser's multipart says %22)
    r = client.get(f"{FILES}/{image['id']}/content")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert image["name"] == 'red dot "x".png'  # kept in the name; the header's ASCII fallback drops them
    disposition = "inline; filename=\"red dot _x_.png\"; filename*=UTF-8''red%20dot%20%22x%22.png"
    assert r.headers["content-disposition"] == disposition
    assert r.headers.get_list("content-security-policy") == [CSP]
    assert r.headers.get_list("x-content-type-options") == ["nosniff"]
    assert r.headers["cache-control"] == "private, max-age=31536000, immutable"
    assert r.headers["etag"] == f'"{image["sha256"]}"' and r.headers["accept-ranges"] == "bytes"
    assert r.headers["cross-origin-resource-policy"] == "same-origin"
    assert r.headers["content-length"] == str(image["size"])
    document = upload(client, pdf(), name="report.pdf", media_type="application/pdf").json()
    r = client.get(f"{FILES}/{document['id']}/content")
    assert r.status_code == 200 and r.headers["content-type"] == "application/pdf" and r.content == pdf()
    assert r.headers["content-disposition"] == "attachment; filename=\"report.pdf\"; filename*=UTF-8''report.pdf"
    assert r.headers.get_list("content-security-policy") == [CSP]
    html = b"<!doctype html><html><body><script>alert(1)</script></body></html>\n"
    page = upload_raw(client, html, "page.html", "text/html").json()
    r = client.get(f"{FILES}/{page['id']}/content")
    assert r.status_code == 200 and r.content == html
    assert r.headers["content-type"] == "text/plain; charset=utf-8"
    assert r.headers["content-disposition"].startswith("attachment;")
    assert r.headers.get_list("content-security-policy") == [CSP]
    r = client.get(f"{FILES}/{page['id']}/content", headers={"If-None-Match": f'"{page["sha256"]}"'})
    assert r.status_code == 304 and r.content == b"" and r.headers["etag"] == f'"{page["sha256"]}"'
    r = client.get(f"{FILES}/{page['id']}/content", headers={"If-None-Match": '"other"'})
    assert r.status_code == 200 and r.content == html
    r = client.head(f"{FILES}/{image['id']}/content")
    assert r.status_code == 200 and r.content == b"" and r.headers["content-length"] == str(image["size"])


def test_ranges(make_service):
    service = make_service(CHATSVC_MAX_DOCUMENT_CHARS="4000000")
    data = lines(300_000)  # 2,700,000 bytes: three chunk rows
    size = len(data)
    with service.client() as client:
        file_id = upload_raw(client, data, "big.txt").json()["id"]
        assert service.rows("SELECT count(*) AS n FROM file_chunks")[0]["n"] == 3

        def get(range_header: str, **headers):
            return client.get(f"{FILES}/{file_id}/content", headers={"Range": range_header, **headers})

        chunk = chatsvc.FILE_CHUNK_BYTES
        for header, start, end in (
            ("bytes=0-99", 0, 100),
            (f"bytes={chunk - 1000}-{chunk + 999}", chunk - 1000, chunk + 1000),  # across a chunk boundary
            (f"bytes={chunk}-{chunk}", chunk, chunk + 1),
            ("bytes=-500", size - 500, size),
            (f"bytes={size - 10}-", size - 10, size),
            (f"bytes=2000000-{size + 1000}", 2_000_000, size),  # past the end: to the end
            (f"bytes=0-{size - 1}", 0, size),
        ):
            r = get(header)
            assert r.status_code == 206, (header, r.status_code)
            assert r.headers["content-range"] == f"bytes {start}-{end - 1}/{size}", header
            assert r.content == data[start:end] and r.headers["content-length"] == str(end - start), header
        for header in ("bytes=0-9,20-29", "bytes=9-0", "lines=0-9", "bytes=abc"):  # several, or malformed: all
            r = get(header)
            assert r.status_code == 200 and r.content == data and "content-range" not in r.headers, header
        for header in (f"bytes={size}-", f"bytes={size + 5}-{size + 9}", "bytes=-0"):
            r = get(header)
            assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{size}", header
        etag = client.get(f"{FILES}/{file_id}").json()["sha256"]
        assert get("bytes=0-9", **{"If-Range": f'"{etag}"'}).status_code == 206
        assert get("bytes=0-9", **{"If-Range": '"stale"'}).status_code == 200


def test_an_upload_cut_off_mid_body_leaves_nothing(service):
    """A raw socket sends 3 MiB of a 10 MiB body and closes: the staged row and its chunks go."""
    with LiveServer(service.settings) as live:
        sock = socket.create_connection(("127.0.0.1", live.port))
        sock.sendall(
            f"POST {FILES}?name=cut.txt HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {10 * 2**20}\r\n\r\n".encode()
        )
        sock.sendall(b"a" * (3 * 2**20))
        wait_for(lambda: counts(service)[1] >= 2, timeout=30)  # the upload is being stored
        assert service.rows("SELECT status FROM files") == [{"status": "uploading"}]
        sock.close()
        wait_for(lambda: counts(service) == (0, 0), timeout=30)
        cut = 'chatsvc_file_uploads_total{kind="unknown",outcome="client_disconnected"} 1.0'
        with live.client() as client:  # counted as the refusal leaves the handler, just after the discard
            wait_for(lambda: cut in client.get("/metrics").text)


def test_the_collector_deletes_unused_files_past_their_retention_and_outlives_its_errors(
    make_service, monkeypatch, caplog
):
    monkeypatch.setattr(chatsvc, "FILE_COLLECT_SECONDS", 0.05)
    collect, calls = chatsvc.Files.collect, []

    async def failing_once(self, retention_seconds, limit=100):
        calls.append(retention_seconds)
        if len(calls) == 1:
            raise chatsvc.StorageUnavailable("The database is away.")
        return await collect(self, retention_seconds, limit)

    monkeypatch.setattr(chatsvc.Files, "collect", failing_once)
    service = make_service(CHATSVC_FILE_RETENTION_HOURS="0.000001")  # 3.6 ms
    with service.client() as client:
        assert upload_raw(client, b"short-lived\n", "tmp.txt").status_code == 201
        wait_for(lambda: counts(service) == (0, 0))
        wait_for(lambda: "file collector: 1 file(s) deleted" in caplog.text)  # logged once counted
        assert "chatsvc_files_collected_total 1.0" in client.get("/metrics").text
    assert calls[0] == pytest.approx(0.0036)
    assert "the file collector failed" in caplog.text


def raw_upload(port: int, pieces: list[bytes], pause: float, length: int | None = None) -> bytes:
    """A raw upload sent a piece at a time, `pause` s apart (a slow client); the response's bytes."""
    total = sum(len(p) for p in pieces) if length is None else length
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            f"POST {FILES}?name=tok-do-not-log.txt HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
            f"Connection: close\r\nContent-Length: {total}\r\n\r\n".encode()
        )
        for piece in pieces:
            time.sleep(pause)  # the client is slow: that is what is tested
            sock.sendall(piece)
        response = b""
        while data := sock.recv(65536):
            response += data
    return response


def test_the_read_timeout_applies_between_pieces_not_to_the_whole_upload(make_service, caplog):
    service = make_service(CHATSVC_READ_TIMEOUT="0.5")
    with LiveServer(service.settings) as live:
        started = time.monotonic()
        slow = raw_upload(live.port, [b"line\n"] * 5, pause=0.25)  # 1.25 s in all, each piece within 0.5 s
        assert time.monotonic() - started > 1 and slow.startswith(b"HTTP/1.1 201"), slow[:300]
        stalled = raw_upload(live.port, [b"line\n"], pause=0, length=100)  # then nothing more
        assert stalled.startswith(b"HTTP/1.1 408") and b'"code":"request_timeout"' in stalled, stalled[:300]
        assert b"CHATSVC_READ_TIMEOUT" in stalled
        wait_for(lambda: counts(service) == (1, 1))  # the stalled upload's staged row is gone
    # a file's name is never logged (the run's log scan fails on "tok-do-not-log" anywhere)
    assert f'"POST {FILES}?name=[redacted] HTTP/1.1" 201' in caplog.text


@pytest.mark.slow  # two chatsvc processes: ~6 s
def test_a_file_stored_through_one_replica_is_served_by_another(postgres_database, fake, tmp_path):
    from procs import ServerProcess
    from support import EMPTY_POSTGRES, Service, pg

    pg(postgres_database, EMPTY_POSTGRES)
    service = Service(postgres_database, fake)
    a, b = ServerProcess(service.env, tmp_path), ServerProcess(service.env, tmp_path)
    try:
        a.start()
        b.start()
        data = lines(150_000)  # 1,350,000 bytes: two rows
        with httpx.Client(timeout=10) as client:
            r = client.post(f"{a.url}{FILES}", params={"name": "shared.txt"}, content=data)
            assert r.status_code == 201, r.text
            file_id = r.json()["id"]
            assert client.get(f"{b.url}{FILES}/{file_id}").json() == {**r.json(), "references": 0}
            assert client.get(f"{b.url}{FILES}/{file_id}/content").content == data
            part = client.get(f"{b.url}{FILES}/{file_id}/content", headers={"Range": "bytes=1048570-1048589"})
            assert part.status_code == 206 and part.content == data[1048570:1048590]
            assert client.delete(f"{b.url}{FILES}/{file_id}").status_code == 204
            assert client.get(f"{a.url}{FILES}/{file_id}").status_code == 404
    finally:
        for server in (a, b):
            server.stop()
    for server in (a, b):
        assert "Traceback" not in server.log(), server.log()


def test_a_browser_of_an_allowed_origin_may_ask_for_ranges_and_read_the_files_headers(make_service):
    service = make_service(CHATSVC_CORS_ORIGINS="https://app.example")
    origin = {"Origin": "https://app.example"}
    with service.client() as client:
        file_id = upload_raw(client, b"some text\n", "t.txt").json()["id"]
        preflight = client.options(
            f"{FILES}/{file_id}/content",
            headers={**origin, "Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "range"},
        )
        assert preflight.status_code == 200 and "range" in preflight.headers["access-control-allow-headers"].lower()
        r = client.get(f"{FILES}/{file_id}/content", headers={**origin, "Range": "bytes=0-3"})
        assert r.status_code == 206 and r.content == b"some"
        exposed = {h.strip().lower() for h in r.headers["access-control-expose-headers"].split(",")}
        assert {"content-disposition", "content-range", "etag", "content-length", "accept-ranges"} <= exposed
