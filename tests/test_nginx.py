"""Behind nginx with its default proxy settings (buffering on, HTTP/1.0 upstream, default gzip
types): answers still arrive chunk by chunk, and the seed client's channel works through it.

Needs Debian's nginx (/usr/sbin/nginx); skips without it, except under CI=true."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import httpx2 as httpx
import pytest
from fake_dashscope import Reply
from live import LiveServer, SSEReader
from procs import free_port
from support import wait_for

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def answers(client, path: str) -> bool:
    try:
        return client.get(path).status_code == 200
    except httpx.TransportError:  # nginx is not listening yet
        return False


@pytest.fixture
def behind_nginx(service, tmp_path):
    if not os.path.exists(NGINX):
        if os.environ.get("CI") == "true":
            pytest.fail("the nginx test must run under CI=true: no nginx (apt-get install nginx)")
        pytest.skip("no nginx (apt-get install nginx)")
    with LiveServer(service.settings) as live:
        port = free_port()
        conf = tmp_path / "nginx.conf"
        conf.write_text(f"""
            daemon off;
            pid {tmp_path}/nginx.pid;
            error_log {tmp_path}/error.log;
            events {{}}
            http {{
                access_log off;
                client_body_temp_path {tmp_path}; proxy_temp_path {tmp_path};
                fastcgi_temp_path {tmp_path}; uwsgi_temp_path {tmp_path}; scgi_temp_path {tmp_path};
                gzip on;
                server {{
                    listen 127.0.0.1:{port};
                    location / {{ proxy_pass http://127.0.0.1:{live.port}; }}
                }}
            }}
        """)  # only proxy_pass: every other proxy setting is nginx's default
        nginx = subprocess.Popen([NGINX, "-c", str(conf), "-p", str(tmp_path)])
        try:
            url = f"http://127.0.0.1:{port}"
            with live.client(base_url=url) as client:
                wait_for(lambda: answers(client, "/healthz"))
            live.proxy_url = url
            yield live
        finally:
            nginx.terminate()
            nginx.wait(10)


def test_chunks_arrive_one_by_one_through_nginx(behind_nginx, fake):
    fake.push(Reply.answer([f"w{i} " for i in range(10)], pause=0.2))
    with behind_nginx.client(base_url=behind_nginx.proxy_url, headers={"Accept-Encoding": "gzip"}) as client:
        reader = SSEReader(client, "POST", "/api/v1/chat/s1/stream", json={"message": "hi"})
        assert "content-encoding" not in reader.response.headers  # not compressed on the way
        started = time.monotonic()
        arrivals = []
        for event in iter(reader.next_event, None):
            arrivals.append(time.monotonic() - started)
            if event["type"] == "end":
                break
    # ten chunks 0.2 s apart: the first must arrive long before the last (no buffering to the end)
    assert len(arrivals) == 12
    assert arrivals[-1] - arrivals[1] > 1.5


def test_channel_through_nginx(behind_nginx, fake):
    fake.push(Reply.answer(["via", " nginx"], pause=0.05))
    listener = SSEReader(behind_nginx.client(base_url=behind_nginx.proxy_url), "GET", "/api/v1/chat/s1/stream")
    wait_for(lambda: behind_nginx.listeners("s1") == 1)
    with behind_nginx.client(base_url=behind_nginx.proxy_url) as client:
        assert client.post("/api/v1/chat/s1", json={"message": "hi"}).status_code == 200
    assert listener.until_end()[-1]["data"]["full_text"] == "via nginx"
    listener.close()
