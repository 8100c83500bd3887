# Visual product search: serving image (no torch). See docs/deploy.md.
#   docker build -t vps .                      # model and demo index baked in
#   docker run --read-only --tmpfs /tmp -p 8000:8000 vps
# Mount your own index read-only over /srv/index_data (and a model over /srv/models) instead of baking it.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: a virtualenv with the serving install --------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY app ./app
COPY deploy/docker/install-app.sh ./deploy/docker/install-app.sh
RUN ["sh", "deploy/docker/install-app.sh", "/opt/vps", "/src"]

# --- demo-index: the demo catalogue's index, built with the image's own install ---------------------------------
FROM build AS demo-index
COPY models/grocery-lite1-ms512-sp208-int8 ./models/grocery-lite1-ms512-sp208-int8
COPY examples/grocery ./examples/grocery
COPY deploy/docker/build-demo-index.sh ./deploy/docker/build-demo-index.sh
RUN ["sh", "deploy/docker/build-demo-index.sh", "/opt/vps", "/src", "/srv/index_data"]

# --- ray-build: index builds on a KubeRay cluster (docker build --target ray-build; overlays/ray-build) ----------
# Ray's own image (the ray CLI, the probes' tools, user ray 1000:100) with the app and the `ray` extra.
FROM rayproject/ray:2.60.0-py311-cpu AS ray-build
COPY --chown=1000:100 pyproject.toml README.md /home/ray/vps-src/
COPY --chown=1000:100 app /home/ray/vps-src/app
COPY models/grocery-lite1-ms512-sp208-int8 /srv/models/grocery-lite1-ms512-sp208-int8
RUN pip install --no-cache-dir --disable-pip-version-check --quiet "/home/ray/vps-src[ray]" \
 && vps --help > /dev/null
ENV OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 PYTHONDONTWRITEBYTECODE=1

# --- runtime ----------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 vps \
 && useradd --system --uid 10001 --gid vps --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin vps
COPY --from=build /opt/vps /opt/vps
COPY models/grocery-lite1-ms512-sp208-int8 /srv/models/grocery-lite1-ms512-sp208-int8
COPY --from=demo-index /srv/index_data /srv/index_data
COPY examples/grocery/images /srv/catalogue-images
COPY examples/grocery/LICENSE /srv/catalogue-images/LICENSE
ENV PATH=/opt/vps/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MALLOC_ARENA_MAX=2 \
    VPS_MODEL_DIR=/srv/models/grocery-lite1-ms512-sp208-int8 \
    VPS_INDEX_DIR=/srv/index_data \
    VPS_CATALOGUE_IMAGES_DIR=/srv/catalogue-images \
    PROMETHEUS_MULTIPROC_DIR=/tmp/vps-metrics \
    VPS_VERIFY_CACHE_DIR=/tmp/vps-verified \
    OMP_NUM_THREADS=1 \
    OPENBLAS_NUM_THREADS=1
# Read-only root filesystem: the process writes only under /tmp (multiprocess metrics with --workers > 1, and
# the index verification record that lets a restarted container skip re-hashing).
USER 10001:10001
EXPOSE 8000
# No curl in a slim image: the interpreter the service already has does the probe.
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request as u; sys.exit(u.urlopen('http://127.0.0.1:8000/readyz', timeout=2).status != 200)"]
# dumb-init as PID 1: forwards SIGTERM to the server (which drains) and reaps zombies.
ENTRYPOINT ["dumb-init", "--"]
CMD ["vps", "serve", "--host", "0.0.0.0", "--port", "8000"]
