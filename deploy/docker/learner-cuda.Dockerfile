# syntax=docker/dockerfile:1
# Flywheel learner, CUDA build (reward-model refits and PPO-ptx on the GPU).
# Build from the repository root:
#   docker build -f deploy/docker/learner-cuda.Dockerfile -t flywheel-learner:cuda .
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    FLYWHEEL_SERVER=flywheel-server:50051

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /src
# Only what the wheel needs (no .venv, no runtime data; the repo has no .dockerignore).
COPY pyproject.toml constraints.txt README.md /src/
COPY proto /src/proto
COPY model /src/model
COPY demo /src/demo
COPY server /src/server
COPY learner /src/learner
COPY clients/python /src/clients/python
RUN pip install -c constraints.txt --index-url "${TORCH_INDEX_URL}" torch \
    && pip install -c constraints.txt ".[learn]" \
    && rm -rf /src

RUN useradd --create-home --uid 10001 --user-group flywheel \
    && mkdir -p /learner /models \
    && chown flywheel:flywheel /learner /models
USER 10001:10001
WORKDIR /home/flywheel
VOLUME ["/learner"]

EXPOSE 3000 50051
HEALTHCHECK --interval=30s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request, sys; host = os.environ.get('FLYWHEEL_SERVER', 'flywheel-server:50051').rsplit(':', 1)[0]; sys.exit(0 if urllib.request.urlopen(f'http://{host}:3000/livez', timeout=2).status == 200 else 1)"]

ENTRYPOINT ["flywheel"]
CMD ["learn", "--model", "/models/base", "--work-dir", "/learner"]
