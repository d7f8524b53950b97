# syntax=docker/dockerfile:1
# extproc-otel: the Envoy ext_proc sidecar as a small, non-root image.
#
#   docker build -t extproc-otel .
#   docker run --read-only --tmpfs /tmp --network container:<envoy> extproc-otel
#
# The sidecar's default listen address is 127.0.0.1:50051 (share the Envoy
# container's network, as a Kubernetes pod does). It is not set here, so a config
# file (the Kubernetes ConfigMap) can change it. To listen on another interface, set
# EXTPROC_SERVER__LISTEN=0.0.0.0:50051 and either TLS (docs/security.md) or the
# explicit plaintext opt-in EXTPROC_SERVER__ALLOW_INSECURE_NON_LOOPBACK=true.
#
# Stage 1 builds the wheel exactly as tests/e2e/test_artifacts.py does (its command is
# read from this file): setup.py generates the protobuf modules with the grpcio-tools
# pinned in pyproject's build-system.requires. Stage 2 installs only that wheel and its
# runtime dependencies (envoy-data-plane included: `extproc-otel envoy-config` works
# in the image). The test installs the wheel with stage 2's own command into a fresh
# venv, serves behind a real Envoy and runs every `envoy-config` format.
#
# Not exercised here (no Docker engine on the project's machines): the image build
# itself, the base image's contents, USER/HEALTHCHECK as Docker runs them, and a
# read-only root filesystem. tests/unit/deploy/test_deploy_docker.py checks those statically
# and runs the HEALTHCHECK command against a real sidecar.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml setup.py MANIFEST.in README.md CHANGELOG.md ./
COPY proto ./proto
COPY ext_proc ./ext_proc
RUN pip wheel --no-deps --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
# Read-only root filesystem friendly: no bytecode writes, HOME and the working
# directory on /tmp (mount a tmpfs there), nothing else written at run time.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp \
    EXTPROC_HEALTH_TARGET=127.0.0.1:50051
COPY --from=build /wheels /wheels
RUN pip install /wheels/*.whl \
 && rm -rf /wheels \
 && useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin extproc
USER 10001:10001
WORKDIR /tmp
EXPOSE 50051
# gRPC health check (grpc.health.v1) against the sidecar's own port.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os, sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; ch = grpc.insecure_channel(os.environ['EXTPROC_HEALTH_TARGET']); r = g.HealthStub(ch).Check(h.HealthCheckRequest(), timeout=2); sys.exit(0 if r.status == h.HealthCheckResponse.SERVING else 1)"]
CMD ["extproc-otel", "serve"]
