# syntax=docker/dockerfile:1
# Flywheel server, CPU build: `flywheel serve` (HTTP 3000 + gRPC 50051 in one process).
# Build from the repository root:
#   docker build -f deploy/docker/server.Dockerfile -t flywheel-server:dev .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FLYWHEEL_DATA_DIR=/data \
    FLYWHEEL_HOST=0.0.0.0

WORKDIR /src
# Only what the wheel needs (no .venv, no runtime data; the repo has no .dockerignore).
COPY pyproject.toml constraints.txt README.md /src/
COPY proto /src/proto
COPY model /src/model
COPY demo /src/demo
COPY server /src/server
COPY learner /src/learner
COPY clients/python /src/clients/python
# constraints.txt pins torch's CPU build; the postgres extra brings the psycopg driver.
RUN pip install -c constraints.txt --extra-index-url https://download.pytorch.org/whl/cpu ".[serve,postgres]" \
    && rm -rf /src

RUN useradd --create-home --uid 10001 --user-group flywheel \
    && mkdir -p /data \
    && chown flywheel:flywheel /data
USER 10001:10001
WORKDIR /home/flywheel
VOLUME ["/data"]

EXPOSE 3000 50051
HEALTHCHECK --interval=15s --timeout=3s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import urllib.request, sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:3000/livez', timeout=2).status == 200 else 1)"]

ENTRYPOINT ["flywheel"]
CMD ["serve", "--host", "0.0.0.0", "--data-dir", "/data"]
