# syntax=docker/dockerfile:1
# Flywheel server, CUDA build: same as server.Dockerfile, on an NVIDIA CUDA runtime image with
# torch's CUDA wheels. Build from the repository root:
#   docker build -f deploy/docker/server-cuda.Dockerfile -t flywheel-server:cuda .
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

# torch's CUDA wheel index; the version itself comes from constraints.txt.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    FLYWHEEL_DATA_DIR=/data \
    FLYWHEEL_HOST=0.0.0.0 \
    FLYWHEEL_DEVICE=cuda

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
# torch first from the CUDA index (same pinned version), then the project under the constraints.
RUN pip install -c constraints.txt --index-url "${TORCH_INDEX_URL}" torch \
    && pip install -c constraints.txt ".[serve,postgres]" \
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
CMD ["serve", "--host", "0.0.0.0", "--data-dir", "/data", "--device", "cuda"]
