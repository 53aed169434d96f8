# syntax=docker/dockerfile:1
# csi-pipeline images (docs/deployment.md):
#   docker build --target edge  -t csi-edge  .   # `csi edge`: edge extra only, no torch
#   docker build --target cloud -t csi-cloud .   # `csi cloud`: CPU torch + cloud extra
# Both run as the unprivileged user csi (uid 10001). State lives under /var/lib/csi.

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------------------------
# builder: the project wheel, and the dependency lists of each extra read from pyproject.toml
# (so the dependency layers below are rebuilt only when pyproject.toml changes).
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
WORKDIR /build
COPY pyproject.toml README.md LICENSE ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
[open(f'requirements-{x}.txt', 'w').write('\n'.join(p['dependencies'] + \
p['optional-dependencies'][x]) + '\n') for x in ('edge', 'cloud')]"
COPY csi_edge ./csi_edge
COPY csi_cloud ./csi_cloud
RUN --mount=type=cache,target=/root/.cache/pip \
    pip wheel --no-deps --wheel-dir /wheels .

# ---------------------------------------------------------------------------------------------
# runtime: what both targets share (user, folders, the committed model bundles).
FROM ${PYTHON_IMAGE} AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN groupadd --system --gid 10001 csi \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/csi --create-home \
        --shell /usr/sbin/nologin csi
COPY models/ /app/models/
WORKDIR /var/lib/csi

# ---------------------------------------------------------------------------------------------
# edge: the AP-side agent. Base dependencies + the `edge` extra; torch is never installed
# (checked below), nor the web server.
FROM runtime AS edge
COPY --from=builder /build/requirements-edge.txt /tmp/requirements.txt
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install -r /tmp/requirements.txt
COPY --from=builder /wheels /tmp/wheels
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install "$(ls /tmp/wheels/csi_pipeline-*.whl)[edge]" \
 && rm -rf /tmp/wheels /tmp/requirements.txt \
 && python -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None)"
# Sample recordings to replay (compose mounts CSI_EDGE_DATA over /data).
COPY datasets/samples/ /data/
RUN install -d -o csi -g csi /var/lib/csi/spool /var/lib/csi/fetched
ENV CSI_EDGE_MODEL=/app/models/fition \
    CSI_EDGE_SPOOL_DIR=/var/lib/csi/spool \
    CSI_EDGE_MODELS_DIR=/var/lib/csi/fetched
USER 10001:10001
ENTRYPOINT ["csi", "edge"]

# ---------------------------------------------------------------------------------------------
# cloud: the service. torch's CPU wheel first (no CUDA libraries), then the `cloud` extra.
FROM runtime AS cloud
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
COPY --from=builder /build/requirements-cloud.txt /tmp/requirements.txt
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install -r /tmp/requirements.txt
COPY --from=builder /wheels /tmp/wheels
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install "$(ls /tmp/wheels/csi_pipeline-*.whl)[cloud]" \
 && rm -rf /tmp/wheels /tmp/requirements.txt
# Named volumes mounted here start with this ownership (the service writes as uid 10001).
RUN install -d -o csi -g csi /var/lib/csi/recordings /var/lib/csi/jobs
ENV CSI_CLOUD_MODELS=/app/models \
    CSI_CLOUD_HTTP=0.0.0.0:8000 \
    CSI_CLOUD_DB=sqlite:////var/lib/csi/csi-cloud.db \
    CSI_CLOUD_RECORDINGS=/var/lib/csi/recordings \
    CSI_CLOUD_JOBS_DIR=/var/lib/csi/jobs
USER 10001:10001
EXPOSE 8000
# Liveness from inside the container with the standard library (no curl in the image).
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('CSI_CLOUD_HTTP', ':8000').rpartition(':')[2]; urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4)"]
ENTRYPOINT ["csi", "cloud"]
