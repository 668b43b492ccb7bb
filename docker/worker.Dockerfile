# The worker image: the CUDA runtime, Python 3.11, the pinned torch/torchvision (PyPI's Linux
# x86_64 wheels are the CUDA builds: torch 2.14.1 is built for CUDA 13.0 and needs an NVIDIA
# driver >= 580 on the host) and the Celery workers. The default command runs one supervised
# training worker per visible GPU; `simmim-service worker --queues embed` runs the embedding worker.
#
#   docker build -f docker/worker.Dockerfile -t simmim-service/worker .
#
# Layers: third-party packages first (rebuilt only when docker/requirements-worker.txt changes;
# torch and its CUDA libraries are several GB), then this project as a wheel with --no-deps.

ARG CUDA_IMAGE=nvidia/cuda:13.0.2-runtime-ubuntu24.04
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.9.26
ARG PYTHON_VERSION=3.11

# uv only fetches a standalone CPython 3.11 (Ubuntu 24.04 ships 3.12; CI and the API run 3.11).
FROM ${UV_IMAGE} AS uv

# ---- deps: Python in /opt/python, every third-party package in /opt/venv ----------------------
FROM ${CUDA_IMAGE} AS deps
ARG PYTHON_VERSION
ENV UV_PYTHON_INSTALL_DIR=/opt/python UV_PYTHON_PREFERENCE=only-managed \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=uv /uv /usr/local/bin/uv
RUN uv python install ${PYTHON_VERSION} \
 && uv venv --seed --python ${PYTHON_VERSION} /opt/venv
COPY docker/requirements-worker.txt /tmp/requirements-worker.txt
RUN /opt/venv/bin/pip install -r /tmp/requirements-worker.txt

# ---- wheel: this project, built without its dependencies --------------------------------------
FROM deps AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY simmim ./simmim
COPY simmim_service ./simmim_service
COPY api ./api
COPY worker ./worker
COPY jobstore ./jobstore
RUN /opt/venv/bin/pip wheel --no-deps --wheel-dir /wheels .

# ---- worker: runtime only (no uv, no build tools), a non-root user ---------------------------
FROM ${CUDA_IMAGE} AS worker
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# CA certificates for HTTPS to S3 and to http(s) datasets.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
# UID/GID 10001 in both images: they share the artifacts volume. Named volumes mounted on these
# directories start out owned by this user.
RUN groupadd --system --gid 10001 simmim \
 && useradd --system --uid 10001 --gid simmim --home-dir /var/lib/simmim --shell /usr/sbin/nologin simmim \
 && mkdir -p /var/lib/simmim/artifacts /var/lib/simmim/work /data \
 && chown -R simmim:simmim /var/lib/simmim
COPY --from=deps /opt/python /opt/python
COPY --from=deps /opt/venv /opt/venv
COPY --from=wheel /wheels /tmp/wheels
RUN pip install --no-deps /tmp/wheels/*.whl && rm -rf /tmp/wheels
WORKDIR /var/lib/simmim
USER simmim
# Pings every Celery worker of this container over the broker (see worker/healthcheck.py).
HEALTHCHECK --interval=30s --timeout=20s --start-period=120s --retries=3 \
    CMD ["python", "-m", "worker.healthcheck", "--timeout", "10"]
CMD ["simmim-service", "worker", "--queues", "train", "--gpus", "all"]
