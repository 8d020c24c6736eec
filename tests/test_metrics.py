"""GET /metrics: Prometheus' text format through prometheus-client, asserted on the exposition an
operator's scraper reads: the counts a run makes, no token needed, labels that never carry an id,
a user or a text (the series stay as many however many users and conversations there are), and
CHATSVC_METRICS=0."""

from __future__ import annotations

from fake_dashscope import Reply
from live import LiveServer
from prometheus_client.parser import text_string_to_metric_families
from support import wait_for

API = "/api/v1"
USAGE = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}


def scrape(client) -> dict[tuple[str, tuple], float]:
    r = client.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return samples_of(r.text)


def samples_of(exposition: str) -> dict[tuple[str, tuple], float]:
    """Each sample of a /metrics exposition by its name and labels, as a scraper parses it."""
    samples = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def chat_as(client, fake, user: str, session_id: str, text: str) -> None:
    fake.push(Reply.answer(["an ", "answer"], usage=USAGE))
    r = client.post(f"{API}/chat/{session_id}", json={"message": text}, headers={"X-User": user})
    assert r.status_code == 200, r.text


def test_a_run_is_counted_without_a_token(make_service, fake):
    service = make_service(CHATSVC_API_TOKEN="t0ken")
    auth = {"Authorization": "Bearer t0ken"}
    with service.client() as client:
        fake.push(Reply.answer(["Hello", " there"], usage=USAGE))
        assert client.post(f"{API}/chat/s1", json={"message": "hi"}, headers=auth).status_code == 200
        fake.push(Reply.error(429, "limit_requests", "Requests rate limit exceeded."))
        assert client.post(f"{API}/chat/s1", json={"message": "again"}, headers=auth).status_code == 429
        assert client.get(f"{API}/context/conversations/s1").status_code == 401
        assert client.get("/no/such/path").status_code == 404
        with client.stream("POST", f"{API}/chat/s1/stream", json={"message": "x"}, headers=auth) as r:
            assert r.status_code == 200  # the fake has nothing queued: its default answer
            r.read()
        m = scrape(client)  # no Authorization header
    assert value(m, "chatsvc_answers_total", status="complete", code="none", model="qwen-plus") == 2
    assert value(m, "chatsvc_answers_total", status="failed", code="upstream_rate_limited", model="qwen-plus") == 1
    assert value(m, "chatsvc_upstream_requests_total", purpose="answer", outcome="ok") == 2
    assert value(m, "chatsvc_upstream_rate_limited_total") == 1
    assert value(m, "chatsvc_tokens_total", model="qwen-plus", kind="prompt") >= 11
    assert value(m, "chatsvc_tokens_total", model="qwen-plus", kind="completion") >= 7
    assert value(m, "chatsvc_answer_first_token_seconds_count", model="qwen-plus") == 2
    assert value(m, "chatsvc_answer_duration_seconds_count", model="qwen-plus") == 3
    chat = f"{API}/chat/{{session_id}}"
    assert value(m, "chatsvc_http_requests_total", route=chat, method="POST", status="200") == 1
    assert value(m, "chatsvc_http_requests_total", route=chat, method="POST", status="429") == 1
    conversation = f"{API}/context/conversations/{{session_id}}"
    assert value(m, "chatsvc_http_requests_total", route=conversation, method="GET", status="401") == 1
    assert value(m, "chatsvc_http_requests_total", route="unmatched", method="GET", status="404") == 1
    assert value(m, "chatsvc_http_request_duration_seconds_count", route=chat, method="POST") == 2
    assert value(m, "chatsvc_db_statement_seconds_count", role="write") > 0
    assert value(m, "chatsvc_running_answers") == 0 and value(m, "chatsvc_open_streams") == 0


def test_open_streams_and_listeners_are_gauges(service, fake):
    fake.push(Reply.answer(["slow"] * 100, pause=0.05))
    with LiveServer(service.settings) as live, live.client() as client:
        channel = live.reader("GET", f"{API}/chat/s1/stream")
        wait_for(lambda: live.listeners("s1") == 1)
        posted = live.reader("POST", f"{API}/chat/s1/stream", json={"message": "hi"})
        assert posted.next_event()["type"] == "start" and channel.next_event()["type"] == "start"
        m = scrape(client)
        assert value(m, "chatsvc_open_streams") == 2
        assert value(m, "chatsvc_channel_listeners") == 1
        assert value(m, "chatsvc_running_answers") == 1
        client.post(f"{API}/chat/s1/stop")
        posted.until_end()
        posted.close()
        wait_for(lambda: value(scrape(client), "chatsvc_open_streams") == 1)
        m = scrape(client)
        assert value(m, "chatsvc_answers_total", status="stopped", code="none", model="qwen-plus") == 1
        assert value(m, "chatsvc_running_answers") == 0 and value(m, "chatsvc_channel_listeners") == 1


def series_names(samples) -> set:
    return {(name, labels) for (name, labels) in samples}


def test_labels_carry_no_ids_users_or_texts(make_service, fake):
    service = make_service(CHATSVC_USER_HEADER="X-User")
    secrets = []

    def session(client, i):
        user = {"X-User": f"user-{i}@example.com"}
        chat_as(client, fake, user["X-User"], f"conv-{i}", f"private text {i}")
        client.get(f"{API}/context/conversations/conv-{i}/messages", headers=user)
        client.get(f"/random/path-{i}")
        client.get(f"/playground/file-{i}.js")  # a page's file that is not there: its mount's series
        secrets.extend([user["X-User"], f"conv-{i}", f"private text {i}", f"path-{i}", f"file-{i}"])

    with service.client() as client:
        scrape(client)  # a scrape is a request too: its series are in both
        for i in range(3):
            session(client, i)
        few = scrape(client)
        for i in range(3, 30):
            session(client, i)
        many = scrape(client)
        ids = [row["id"] for row in service.rows("SELECT id FROM messages")]
    assert len(ids) == 60
    labels = " ".join(v for (_, pairs) in many for _, v in pairs)
    for secret in [*secrets, *ids]:
        assert secret not in labels
    # ten times the users, conversations, messages and unknown paths: not one series more
    assert set(many) == set(few)
    assert value(many, "chatsvc_answers_total", status="complete", code="none", model="qwen-plus") == 30


def test_the_pages_files_are_counted_under_their_mount(client):
    """Each page's files count under their mount's template (one series, however many files), not as
    `unmatched`, which is for paths no route has."""
    for name in ("playground.js", "playground.css", "chat_client.js", "missing.js"):
        client.get(f"/playground/{name}")
    for name in ("swagger-ui.css", "swagger-ui-bundle.js", "chatsvc-docs.js", "oauth2-redirect.html"):
        client.get(f"/docs/static/{name}")
    client.get("/")
    client.get("/docs")
    client.get("/no/such/path")
    m = scrape(client)
    requests = "chatsvc_http_requests_total"
    assert value(m, requests, route="/playground/{path}", method="GET", status="200") == 3
    assert value(m, requests, route="/playground/{path}", method="GET", status="404") == 1
    assert value(m, requests, route="/docs/static/{path}", method="GET", status="200") == 3
    assert value(m, requests, route="/docs/static/{path}", method="GET", status="404") == 1
    assert value(m, "chatsvc_http_request_duration_seconds_count", route="/docs/static/{path}", method="GET") == 4
    for page in ("/", "/docs"):
        assert value(m, requests, route=page, method="GET", status="200") == 1
    assert value(m, requests, route="unmatched", method="GET", status="404") == 1  # only /no/such/path
    assert not [labels for (name, labels) in m if name == requests and ("status", "200") in labels
                and ("route", "unmatched") in labels]  # fmt: skip


def test_a_request_counts_under_the_route_the_router_chose_whether_or_not_it_got_there(make_service):
    """GET .../conversations/import is the path of a POST-only route and a GET of {session_id}: the
    router takes the route of its path and method, and so does the count, for the request the router
    answered and for the one refused before it (401), one series; a method no route of the path has
    (405) counts under the path's first route."""
    service = make_service(CHATSVC_API_TOKEN="t0ken")
    auth = {"Authorization": "Bearer t0ken"}
    with service.client() as client:
        assert client.get(f"{API}/context/conversations/import", headers=auth).status_code == 404
        assert client.get(f"{API}/context/conversations/import").status_code == 401
        assert client.put(f"{API}/context/conversations/import", headers=auth).status_code == 405
        m = scrape(client)
    requests, routed = "chatsvc_http_requests_total", f"{API}/context/conversations/{{session_id}}"
    assert value(m, requests, route=routed, method="GET", status="404") == 1
    assert value(m, requests, route=routed, method="GET", status="401") == 1
    assert value(m, requests, route=f"{API}/context/conversations/import", method="PUT", status="405") == 1


def test_file_uploads_are_counted_by_kind_and_outcome(client):
    """Uploads by kind and outcome (a refusal: kind unknown, its code), the bytes received, the
    examination's time (not for a dedup hit: nothing is examined), the file routes under their
    templates (never a file's id); the collector's, the context's and the vision switch's series
    exist from the start (the collector and the context count into them)."""
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(out, "PNG")
    image = out.getvalue()
    files = f"{API}/files"
    first = client.post(files, files={"file": ("a.png", image, "image/png")})
    assert first.status_code == 201
    assert client.post(files, files={"file": ("b.png", image, "image/png")}).status_code == 200
    assert client.post(files, params={"name": "n.txt"}, content=b"some text\n").status_code == 201
    assert client.post(files, params={"name": "e.txt"}, content=b"").status_code == 422
    assert client.get(f"{files}/{first.json()['id']}/content").status_code == 200
    m = scrape(client)
    uploads = "chatsvc_file_uploads_total"
    assert value(m, uploads, kind="image", outcome="stored") == 1
    assert value(m, uploads, kind="image", outcome="deduplicated") == 1
    assert value(m, uploads, kind="document", outcome="stored") == 1
    assert value(m, uploads, kind="unknown", outcome="empty_file") == 1
    assert value(m, "chatsvc_file_upload_bytes_total") == 2 * len(image) + len(b"some text\n")
    assert value(m, "chatsvc_file_processing_seconds_count", kind="image") == 1
    assert value(m, "chatsvc_file_processing_seconds_count", kind="document") == 1
    content = f"{files}/{{file_id}}/content"
    assert value(m, "chatsvc_http_requests_total", route=content, method="GET", status="200") == 1
    assert value(m, "chatsvc_http_requests_total", route=files, method="POST", status="201") == 2
    for name in ("chatsvc_files_collected_total", "chatsvc_vision_switches_total", "chatsvc_context_images_count"):
        assert (name, ()) in m and value(m, name) == 0


def test_metrics_can_be_turned_off(make_service):
    with make_service(CHATSVC_METRICS="0").client() as client:
        r = client.get("/metrics")
        assert r.status_code == 404 and r.json()["code"] == "not_found"
        assert client.get("/healthz").status_code == 200
