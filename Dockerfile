# chatsvc as a sidecar:
#   docker run -e DASHSCOPE_API_KEY=sk-... -v chatsvc-data:/data -p 8000:8000 chatsvc
# The base is a build argument (both stages use it): CI builds on a local stand-in (.ci/container).
ARG PYTHON_IMAGE=python:3.12-slim

# Dependencies: a virtual environment with everything chatsvc needs but chatsvc itself, read from
# pyproject.toml alone, so an edit to chatsvc.py or README reuses this layer.
FROM ${PYTHON_IMAGE} AS deps
# The package index, if this machine's pip uses another than PyPI (.ci/container passes its own).
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_CERT
WORKDIR /src
COPY pyproject.toml ./
# hadolint ignore=DL3013
RUN python3 -m venv /opt/chatsvc \
    && python3 -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; extra = p['optional-dependencies']; print('\n'.join(p['dependencies'] + extra['postgres'] + extra['mcp']))" > requirements.txt \
    && /opt/chatsvc/bin/pip install --no-cache-dir --disable-pip-version-check --progress-bar off -r requirements.txt \
    && /opt/chatsvc/bin/pip uninstall -y pip \
    && /opt/chatsvc/bin/python -c "import sys; open(f'/opt/chatsvc/lib/python{sys.version_info[0]}.{sys.version_info[1]}/site-packages/chatsvc-app.pth', 'w').write('/opt/chatsvc-app\n')" \
    && /opt/chatsvc/bin/python -c "import importlib.util, pathlib; d = pathlib.Path(next(iter(importlib.util.find_spec('swagger_ui').submodule_search_locations))) / 'static'; keep = {'LICENSE', 'favicon-32x32.png', 'swagger-ui-bundle.js', 'swagger-ui.css'}; [p.unlink() for p in d.iterdir() if p.name not in keep]" \
    && find /opt/chatsvc -name __pycache__ -prune -exec rm -rf {} +
# Of swagger-ui-py's files (24.5 MB: editor bundles, source maps) only what /docs serves stays:
# chatsvc.DOCS_FILES and the LICENSE (.ci/container's check compares the two). Pruned here, not
# after chatsvc is copied, so that this stage's /opt/chatsvc is the same from one build to the
# next and the runtime stage's COPY of it is reused from the cache, not a new 190 MB layer.

# chatsvc itself: its one module and data files, into a folder of their own (/opt/chatsvc-app, on
# the environment's path through a .pth file). The build backend (pyproject's [build-system]) is
# installed before the source is copied: an edit to chatsvc.py reuses that layer too, and the
# install of chatsvc itself needs no index (--no-index).
FROM ${PYTHON_IMAGE} AS build
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_CERT
WORKDIR /src
COPY pyproject.toml ./
# hadolint ignore=DL3013
RUN python3 -m venv /tmp/pip \
    && python3 -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['build-system']['requires']))" > build-requirements.txt \
    && /tmp/pip/bin/pip install --no-cache-dir --disable-pip-version-check --progress-bar off -r build-requirements.txt
COPY README.md chatsvc.py schema.sql ./
COPY docs/openapi.json docs/CONTRACT.md docs/
COPY playground/ playground/
RUN /tmp/pip/bin/pip install --no-cache-dir --disable-pip-version-check --progress-bar off \
        --no-index --no-deps --no-build-isolation --target /opt/chatsvc-app . \
    && sed -i '1s|.*|#!/opt/chatsvc/bin/python|' /opt/chatsvc-app/bin/chatsvc \
    && find /opt/chatsvc-app -name __pycache__ -prune -exec rm -rf {} +

# Runtime: the environment and chatsvc, nothing else; a non-root user; the database on a volume.
FROM ${PYTHON_IMAGE}
# tini: PID 1 that reaps orphans (the children of stdio MCP servers) and passes signals on to chatsvc.
# A fixed uid and gid (10001): a host folder mounted as /data is made theirs with `chown 10001:10001`.
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends tini && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 chatsvc \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin chatsvc \
    && mkdir -p /data /app && chown 10001:10001 /data
COPY --from=deps /opt/chatsvc /opt/chatsvc
COPY --from=build /opt/chatsvc-app /opt/chatsvc-app
ENV PATH=/opt/chatsvc-app/bin:/opt/chatsvc/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
USER 10001:10001
# Not the data volume: chatsvc reads a `.env` in its working directory, and none should come from /data.
WORKDIR /app
ENV DATABASE_URL=sqlite+aiosqlite:////data/chatsvc.db \
    HOST=0.0.0.0 \
    PORT=8000 \
    PYTHONUNBUFFERED=1
VOLUME ["/data"]
EXPOSE 8000
# /readyz: ready means the database answers (a /healthz only says the process runs). No curl in the
# image: the check is a few lines of the Python it already has.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('PORT', '8000'), timeout=2)"]
# chatsvc drains on SIGTERM: running answers get CHATSVC_SHUTDOWN_GRACE seconds (default 8), which
# fits in `docker stop`'s default 10 s; a longer grace needs docker run --stop-timeout (or docker stop -t).
STOPSIGNAL SIGTERM
# The exec form under tini (PID 1): SIGTERM goes on to chatsvc, and orphaned processes are reaped.
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["chatsvc"]
