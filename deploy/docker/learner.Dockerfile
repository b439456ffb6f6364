# syntax=docker/dockerfile:1
# Flywheel learner, CPU build: `flywheel learn` against a running server's gRPC port.
# Build from the repository root:
#   docker build -f deploy/docker/learner.Dockerfile -t flywheel-learner:dev .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FLYWHEEL_SERVER=flywheel-server:50051

WORKDIR /src
# Only what the wheel needs (no .venv, no runtime data; the repo has no .dockerignore).
COPY pyproject.toml constraints.txt README.md /src/
COPY proto /src/proto
COPY model /src/model
COPY demo /src/demo
COPY server /src/server
COPY learner /src/learner
COPY clients/python /src/clients/python
RUN pip install -c constraints.txt --extra-index-url https://download.pytorch.org/whl/cpu ".[learn]" \
    && rm -rf /src

RUN useradd --create-home --uid 10001 --user-group flywheel \
    && mkdir -p /learner /models \
    && chown flywheel:flywheel /learner /models
USER 10001:10001
WORKDIR /home/flywheel
VOLUME ["/learner"]

# The learner serves nothing; the ports are the server's, listed so both images look alike.
EXPOSE 3000 50051
# The learner has no HTTP endpoint of its own: the check asks the server it learns from.
HEALTHCHECK --interval=30s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request, sys; host = os.environ.get('FLYWHEEL_SERVER', 'flywheel-server:50051').rsplit(':', 1)[0]; sys.exit(0 if urllib.request.urlopen(f'http://{host}:3000/livez', timeout=2).status == 200 else 1)"]

ENTRYPOINT ["flywheel"]
CMD ["learn", "--model", "/models/base", "--work-dir", "/learner"]
