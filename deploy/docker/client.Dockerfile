# syntax=docker/dockerfile:1
# The data owner's image: `offsite-client enroll | fetch | join | train` and the Flower SuperNode.
# Build from the repository root:  docker build -f deploy/docker/client.Dockerfile -t offsite-client .

# ---- build: a virtual environment with the CPU torch build and offsite[client] ----
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/offsite
ENV PATH=/opt/offsite/bin:$PATH
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
WORKDIR /src
COPY pyproject.toml README.md ./
COPY offsite ./offsite
COPY emulators ./emulators
COPY client ./client
COPY server ./server
COPY protos ./protos
COPY safety_evals ./safety_evals
RUN pip install ".[client]"

# ---- runtime: the venv only, a non-root user; client home, cache and node key on a volume ----
FROM python:3.11-slim
ENV PATH=/opt/offsite/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    OFFSITE_CLIENT_HOME=/home/offsite/.offsite-client \
    OFFSITE_CACHE=/home/offsite/.cache/offsite
COPY --from=build /opt/offsite /opt/offsite
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/offsite offsite
USER 10001:10001
WORKDIR /home/offsite
VOLUME ["/home/offsite"]
# The SuperNode's gRPC health server (flower-supernode --health-server-address 127.0.0.1:9095).
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-m", "offsite.server.healthcheck", "127.0.0.1:9095"]
ENTRYPOINT ["offsite-client"]
CMD ["--help"]
