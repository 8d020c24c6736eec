# syntax=docker/dockerfile:1
# chatsvc as a sidecar: docker run -e DASHSCOPE_API_KEY=sk-... -v chatsvc-data:/data -p 8000:8000 chatsvc

# Build stage: wheels for chatsvc and everything it needs (anything compiled stays here).
FROM python:3.12-slim AS build
WORKDIR /src
COPY pyproject.toml README.md chatsvc.py schema.sql ./
COPY docs/openapi.json docs/
COPY playground/ playground/
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[postgres,mcp]"

# Runtime stage: the wheels installed, nothing else; a non-root user; the database on a volume.
FROM python:3.12-slim
# tini: PID 1 that reaps orphans (the children of stdio MCP servers) and passes signals on to chatsvc.
# hadolint ignore=DL3008,DL3013
RUN apt-get update && apt-get install -y --no-install-recommends tini && rm -rf /var/lib/apt/lists/*
# hadolint ignore=DL3013
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links /wheels "chatsvc[postgres,mcp]" \
    && useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin chatsvc \
    && mkdir -p /data && chown chatsvc /data
USER 10001
WORKDIR /data
ENV DATABASE_URL=sqlite+aiosqlite:////data/chatsvc.db \
    HOST=0.0.0.0 \
    PORT=8000 \
    PYTHONUNBUFFERED=1
VOLUME ["/data"]
EXPOSE 8000
# No curl in the image: the health check is a few lines of the Python it already has.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8000'), timeout=2)"]
# chatsvc drains on SIGTERM: running answers get CHATSVC_SHUTDOWN_GRACE seconds (default 10), so give
# `docker stop` more than that: docker stop -t 20, or stop_grace_period: 20s in compose.
STOPSIGNAL SIGTERM
# The exec form under tini (PID 1): SIGTERM goes on to chatsvc, and orphaned processes are reaped.
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["chatsvc"]
