# The API image: FastAPI, the job store and the Celery client, without torch (api/ never
# imports it), so it stays small and starts fast. A second target, `flower`, adds Celery's
# monitoring UI to the same packages (compose profile "monitoring").
#
#   docker build -f docker/api.Dockerfile -t simmim-service/api .                 # the API
#   docker build -f docker/api.Dockerfile --target flower -t simmim-service/flower .
#
# Layers: third-party packages first (rebuilt only when docker/requirements-api.txt changes),
# then this project as a wheel installed with --no-deps, so editing the source rebuilds seconds.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- deps: every third-party package, in /opt/venv -------------------------------------------
FROM ${PYTHON_IMAGE} AS deps
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
COPY docker/requirements-api.txt /tmp/requirements-api.txt
RUN /opt/venv/bin/pip install -r /tmp/requirements-api.txt

# ---- wheel: this project, built without its dependencies --------------------------------------
FROM ${PYTHON_IMAGE} AS wheel
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY simmim ./simmim
COPY simmim_service ./simmim_service
COPY api ./api
COPY worker ./worker
COPY jobstore ./jobstore
RUN pip wheel --no-deps --wheel-dir /wheels .

# ---- app: packages + project, a non-root user, the data directories ---------------------------
FROM ${PYTHON_IMAGE} AS app
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# UID/GID 10001 in both images: they share the artifacts volume. Named volumes mounted on these
# directories start out owned by this user.
RUN groupadd --system --gid 10001 simmim \
 && useradd --system --uid 10001 --gid simmim --home-dir /var/lib/simmim --shell /usr/sbin/nologin simmim \
 && mkdir -p /var/lib/simmim/artifacts /var/lib/simmim/work /data \
 && chown -R simmim:simmim /var/lib/simmim
COPY --from=deps /opt/venv /opt/venv
COPY --from=wheel /wheels /tmp/wheels
RUN pip install --no-deps /tmp/wheels/*.whl && rm -rf /tmp/wheels
WORKDIR /var/lib/simmim
USER simmim

# ---- flower: Celery's monitoring UI (only in this target) ------------------------------------
FROM app AS flower
USER root
RUN pip install flower==2.0.1
USER simmim
EXPOSE 5555
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5555/healthcheck', timeout=4)"]
CMD ["celery", "-A", "worker.app", "flower", "--port=5555"]

# ---- api (the default target): `simmim-service serve` migrates the job store, then serves -----
FROM app AS api
EXPOSE 8000
# Slim images have no curl; /healthz answers without touching the store or the broker.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
CMD ["simmim-service", "serve", "--host", "0.0.0.0", "--port", "8000"]
