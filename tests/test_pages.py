"""The pages for a person with a browser, over HTTP: the playground at / with its files under
/playground/, the API docs at /docs with Swagger UI's files under /docs/static/. No token is needed
to load them; CHATSVC_PLAYGROUND=0 and CHATSVC_DOCS=0 take them away. (What they do in a browser:
tests/browser/test_playground.py and test_docs.py.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import chatsvc

PLAYGROUND = Path(__file__).resolve().parent.parent / "playground"


@pytest.mark.parametrize(
    "path, media_type, holds",
    [
        ("/", "text/html", b'<script src="playground/chat_client.js">'),
        ("/playground/chat_client.js", "text/javascript", b"class ChatClient {"),
        ("/playground/playground.js", "text/javascript", b"new ChatClient(id)"),
        ("/playground/playground.css", "text/css", b":root"),
        ("/docs", "text/html", b'<script src="docs/static/chatsvc-docs.js">'),
        ("/docs/static/chatsvc-docs.js", "text/javascript", b"SwaggerUIBundle({\n  url: 'openapi.json'"),
        ("/docs/static/swagger-ui-bundle.js", "text/javascript", b"SwaggerUIBundle"),
        ("/docs/static/swagger-ui.css", "text/css", b".swagger-ui"),
        ("/docs/static/favicon-32x32.png", "image/png", b"PNG"),
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


PAGE_FILES = ["/", "/playground/index.html", "/playground/chat_client.js", "/playground/playground.js",
              "/playground/playground.css", "/docs", "/docs/static/chatsvc-docs.js", "/docs/static/swagger-ui.css",
              "/docs/static/swagger-ui-bundle.js", "/docs/static/favicon-32x32.png"]  # fmt: skip
POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
    "font-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


def assert_page_headers(r) -> None:
    assert r.headers.get("content-security-policy") == POLICY, r.headers
    assert r.headers.get("x-frame-options") == "DENY"
    assert r.headers.get("x-content-type-options") == "nosniff"
    assert r.headers.get("referrer-policy") == "no-referrer"


@pytest.mark.parametrize("path", PAGE_FILES)
def test_every_page_and_file_forbids_framing_sniffing_and_other_origins(client, path):
    """Both pages could be framed and clicked through, and ran whatever markup got into them: each
    answer for a page or one of its files (GET, HEAD, a 304 to a cache) says so in its headers."""
    r = client.get(path)
    assert r.status_code == 200
    assert_page_headers(r)
    assert_page_headers(client.head(path))
    if "etag" in r.headers:  # the files: a browser's revalidation
        again = client.get(path, headers={"If-None-Match": r.headers["etag"]})
        assert again.status_code == 304
        assert_page_headers(again)


def test_the_pages_run_no_inline_script_or_style(client):
    """The policy allows scripts and styles from files only: the pages have none inline."""
    for page in ("/", "/docs"):
        html = client.get(page).text
        assert re.findall(r"<script(?![^>]*\bsrc=)[^>]*>", html) == [], page
        assert "<style" not in html and " style=" not in html and "javascript:" not in html, page
        assert re.findall(r"\son[a-z]+=", html) == [], page  # no event handler attributes


def test_api_answers_say_nosniff_and_carry_no_page_policy(make_service):
    with make_service(CHATSVC_API_TOKEN="t0ken").client() as client:
        for r in (client.get("/api/v1/context/conversations"), client.get("/healthz"), client.get("/nowhere"),
                  client.get("/openapi.json")):  # fmt: skip
            assert r.headers.get("x-content-type-options") == "nosniff", r.url
            assert "content-security-policy" not in r.headers


# In swagger-ui-py's folder but not used by the docs page: the OAuth2 redirect page, the editor, the
# other bundles, source maps, the package's own page script and styles.
UNUSED = ["oauth2-redirect.html", "swagger-editor-bundle.js", "swagger-editor-bundle.js.map", "swagger-editor.js",
          "swagger-editor.css", "swagger-ui.js", "swagger-ui-es-bundle.js", "swagger-ui-standalone-preset.js",
          "swagger-initializer.js", "index.css", "favicon-16x16.png", "LICENSE"]  # fmt: skip


@pytest.mark.parametrize("name", UNUSED)
def test_the_docs_serve_only_the_swagger_ui_files_the_page_uses(client, name):
    assert (chatsvc.swagger_ui_assets() / name).is_file()  # there, and still not served
    for r in (client.get(f"/docs/static/{name}"), client.head(f"/docs/static/{name}")):
        assert r.status_code == 404
    assert client.get(f"/docs/static/{name}").json()["code"] == "not_found"
    assert client.get(f"/docs/static/./{name}").status_code == 404


def test_the_models_route_lists_the_allowed_models_and_says_whether_a_key_is_set(make_service):
    """GET /api/v1/models: the playground's model picker, and its warning before a send without a key."""
    with make_service(CHAT_MODEL="qwen-plus", CHATSVC_ALLOWED_MODELS="qwen-turbo,qwen-max").client() as client:
        r = client.get("/api/v1/models")
        assert r.status_code == 200, r.text
        assert r.json() == {
            "models": [
                {"id": "qwen-plus", "default": True},
                {"id": "qwen-turbo", "default": False},
                {"id": "qwen-max", "default": False},
            ],
            "default": "qwen-plus",
            "configured": True,
            "web_search": "off",
        }
    with make_service(DASHSCOPE_API_KEY=None, CHAT_MODEL="qwen-plus").client() as client:
        r = client.get("/api/v1/models")
        only = [{"id": "qwen-plus", "default": True}]
        assert r.json() == {"models": only, "default": "qwen-plus", "configured": False, "web_search": "off"}
        sent = client.post("/api/v1/chat/c1", json={"message": "Hello"})
        assert sent.status_code == 503 and sent.json()["code"] == "not_configured"  # what `configured` foretells
    with make_service(CHATSVC_WEB_SEARCH="allowed").client() as client:
        assert client.get("/api/v1/models").json()["web_search"] == "allowed"  # the playground's "Search the web"
    with make_service(CHATSVC_API_TOKEN="t").client() as client:
        refused = client.get("/api/v1/models")
        assert refused.status_code == 401 and refused.json()["code"] == "unauthorized"
        assert client.get("/api/v1/models", headers={"Authorization": "Bearer t"}).status_code == 200


def test_the_vendored_libraries_are_served_with_their_licences_noted():
    """The Markdown renderer, the sanitizer and the highlighter are files of the playground, each named
    with its version and licence in playground/vendor/README.md, each licence text next to it."""
    notes = (PLAYGROUND / "vendor" / "README.md").read_text()
    for name, licence in [("marked.umd.js", "marked.LICENSE"), ("purify.min.js", "dompurify.LICENSE"),
                          ("highlight.min.js", "highlight.LICENSE")]:  # fmt: skip
        assert name in notes and licence in notes
        assert (PLAYGROUND / "vendor" / licence).stat().st_size > 500
