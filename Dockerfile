# q8kv server image.
#
#   docker build -t q8kv .                                    # CUDA 12 + CuPy (q8kv[gpu])
#   docker build -t q8kv --build-arg Q8KV_EXTRAS= .           # numpy backend only
#   docker run --gpus 1 -p 50051:50051 -p 9464:9464 q8kv
#
# BASE_IMAGE must be Debian/Ubuntu-like (apt-get) with a Python >= 3.11 package:
# Ubuntu 24.04 (3.12) or Debian bookworm (3.11); Ubuntu 22.04's 3.10 is too old. The
# CUDA *runtime* flavour is enough: CuPy compiles its kernels with NVRTC, which it ships.
# Plain `docker build` syntax (no BuildKit-only features), so Debian's docker.io builds it.
ARG BASE_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu24.04

# ---- build: a venv with q8kv and its dependencies, copied whole into the runtime stage ---
FROM ${BASE_IMAGE} AS build
# "gpu" installs CuPy for CUDA 12; "" for a CPU-only image; "cuda13" on a CUDA 13 base.
ARG Q8KV_EXTRAS=gpu
# Package index settings for builds behind a mirror or a TLS-intercepting proxy (pass the
# proxy CA inside the base image and PIP_CERT=<its bundle>); unset ones are ignored.
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_TRUSTED_HOST
ARG PIP_CERT
ENV DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/q8kv

# Dependencies first, from pyproject.toml alone: this layer stays cached until they change.
COPY pyproject.toml /src/pyproject.toml
RUN for v in PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_TRUSTED_HOST PIP_CERT; do \
        [ -n "$(printenv "$v")" ] || unset "$v"; \
    done \
    && /opt/q8kv/bin/python -c 'import sys, tomllib; \
p = tomllib.load(open("/src/pyproject.toml", "rb"))["project"]; \
extras = [e for e in sys.argv[1].replace(",", " ").split() if e]; \
deps = p["dependencies"] + [d for e in extras for d in p["optional-dependencies"][e]]; \
print("\n".join(deps + ["setuptools>=68", "wheel"]))' "$Q8KV_EXTRAS" > /tmp/requirements.txt \
    && /opt/q8kv/bin/pip install -r /tmp/requirements.txt

# Then the package itself (server/, client/, proto/, hf/: see .dockerignore).
COPY . /src
RUN /opt/q8kv/bin/pip install --no-deps --no-build-isolation /src \
    && /opt/q8kv/bin/pip check \
    && /opt/q8kv/bin/python -c "import q8kv.server.app, q8kv.client.health"

# ---- runtime ----------------------------------------------------------------------------
FROM ${BASE_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 q8kv \
    && useradd --system --uid 10001 --gid q8kv --home-dir /var/lib/q8kv --no-create-home \
        --shell /usr/sbin/nologin q8kv \
    && mkdir -p /var/lib/q8kv/cupy-cache /var/lib/q8kv/snapshots \
    && chown -R q8kv:q8kv /var/lib/q8kv

# Same path and same base interpreter as in the build stage, so the venv works as copied.
COPY --from=build /opt/q8kv /opt/q8kv

# CuPy compiles each kernel once per GPU architecture and caches the result: keep the cache
# on a volume so a restarted or recreated container starts without recompiling.
ENV PATH=/opt/q8kv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CUPY_CACHE_DIR=/var/lib/q8kv/cupy-cache \
    HOME=/var/lib/q8kv \
    Q8KV_HOST=0.0.0.0 \
    Q8KV_PORT=50051 \
    Q8KV_METRICS_PORT=9464
VOLUME ["/var/lib/q8kv/cupy-cache"]

USER q8kv:q8kv
WORKDIR /var/lib/q8kv
EXPOSE 50051 9464

# The gRPC health service: SERVING once the engine is up, NOT_SERVING while draining.
# start-period covers the first CuPy compile on an empty cache.
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD python -m q8kv.client.health --timeout 3 "127.0.0.1:${Q8KV_PORT:-50051}"

# q8kv-server handles SIGTERM itself (drains for --grace-seconds), so it runs as PID 1.
ENTRYPOINT ["q8kv-server"]
CMD []
