"""The pages for a person with a browser, over HTTP: the playground at / with its files under
/playground/, the API docs at /docs with Swagger UI's files under /docs/static/. No token is needed
to load them; CHATSVC_PLAYGROUND=0 and CHATSVC_DOCS=0 take them away. (What they do in a browser:
tests/browser/test_playground.py and test_docs.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

PLAYGROUND = Path(__file__).resolve().parent.parent / "playground"


@pytest.mark.parametrize(
    "path, media_type, holds",
    [
        ("/", "text/html", b'<script src="playground/chat_client.js">'),
        ("/playground/chat_client.js", "text/javascript", b"class ChatClient {"),
        ("/playground/playground.js", "text/javascript", b"new ChatClient(id)"),
        ("/playground/playground.css", "text/css", b":root"),
        ("/docs", "text/html", b'SwaggerUIBundle({\n  url: "openapi.json"'),
        ("/docs/static/swagger-ui-bundle.js", "text/javascript", b"SwaggerUIBundle"),
        ("/docs/static/swagger-ui.css", "text/css", b".swagger-ui"),
    ],
)
def test_the_pages_and_their_files_are_served_without_the_token(make_service, path, media_type, holds):
    with make_service(CHATSVC_API_TOKEN="page-token").client() as client:
        r = client.get(path)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].split(";")[0] == media_type
        assert holds in r.content
        assert client.get("/api/v1/context/conversations").status_code == 401  # the API still needs it


def test_the_playground_files_are_the_ones_in_its_folder(client):
    for name in ("index.html", "playground.js", "playground.css", "chat_client.js"):
        served = client.get("/" if name == "index.html" else f"/playground/{name}")
        assert served.content == (PLAYGROUND / name).read_bytes()


def test_the_pages_refer_only_to_files_chatsvc_serves(client):
    """No CDN: every script, style and link of the pages is served here (a sidecar often has no internet)."""
    import re

    for page in ("/", "/docs"):
        html = client.get(page).text
        refs = re.findall(r'(?:src|href)="([^"]+)"', html)
        assert refs
        for ref in refs:
            if ref.startswith("data:"):
                continue
            assert "//" not in ref, ref
            assert client.get("/" + ref).status_code == 200, ref


@pytest.mark.parametrize(
    "setting, paths",
    [
        ("CHATSVC_PLAYGROUND", ["/", "/playground/playground.js", "/playground/index.html"]),
        ("CHATSVC_DOCS", ["/docs", "/docs/static/swagger-ui-bundle.js"]),
    ],
)
def test_a_page_turned_off_is_not_there(make_service, setting, paths):
    with make_service(**{setting: "0"}).client() as client:
        for path in paths:
            r = client.get(path)
            assert r.status_code == 404 and r.json()["code"] == "not_found", (path, r.text)
        assert client.get("/healthz").status_code == 200


def test_missing_files_and_wrong_methods_are_json_errors(client):
    r = client.get("/playground/nothing-here.js")
    assert r.status_code == 404 and r.json()["code"] == "not_found"
    r = client.get("/docs/static/../../chatsvc.py")
    assert r.status_code == 404
    r = client.post("/playground/playground.js")
    assert r.status_code == 405 and r.json()["code"] == "method_not_allowed"
    assert set(r.headers["allow"].split(", ")) == {"GET", "HEAD"}
    r = client.post("/")
    assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD"
