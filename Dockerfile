# syntax=docker/dockerfile:1
# Three images from one file, with one Python (${PYTHON}) in every stage. BuildKit (Docker 23+'s default) is needed
# for the cache and bind mounts.
#   docker build --target serve-cpu -t genserve-serve-cpu:0.1.0 .   # ONNX Runtime on CPU: no CUDA base, no torch
#   docker build --target serve     -t genserve-serve:0.1.0 .       # ONNX Runtime with CUDA (falls back to CPU), no torch
#   docker build --target train     -t genserve-train:0.1.0 .       # torch (CPU) for training and export
#   docker run -p 8500:8500 -p 8502:8502 -p 8503:8503 -v $PWD/model_repository:/models:ro genserve-serve-cpu:0.1.0
#   docker run --gpus all -p 8500:8500 -p 8502:8502 -p 8503:8503 -v $PWD/model_repository:/models:ro genserve-serve:0.1.0
#   docker run --rm -v $PWD:/work genserve-train:0.1.0 train vae --data digits --out runs/vae.pt
# Layers: the third-party dependencies are installed from the requirement lists of pyproject.toml, pinned by
# .ci/constraints.txt (the set CI tests), before any project code is copied; the genserve wheel comes last and is
# installed with --no-deps, so a code change rebuilds only that small layer, never ONNX Runtime or torch. pip's
# cache is a BuildKit cache mount: a changed requirement downloads only what changed.
# The tag is the project's version (pyproject.toml); deploy/ refers to images by that tag (tests/test_deploy.py).

ARG PYTHON=3.11
ARG DEBIAN=bookworm
ARG TORCH=2.13.0
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04
ARG UV_VERSION=0.13.9

# ---- uv: installs Python ${PYTHON} into the CUDA image (whose own python3 is another version) ----------------------
FROM ghcr.io/astral-sh/uv:${UV_VERSION} AS uv

# ---- requirements: the requirement lists of each image, from pyproject.toml (no project code) -------------------------
# Only the lists travel on, so a pyproject.toml edit that changes no requirement keeps the dependency layers cached.
FROM python:${PYTHON}-slim-${DEBIAN} AS requirements
WORKDIR /deps
COPY pyproject.toml .ci/constraints.txt deploy/docker/requirements.py ./
RUN python requirements.py pyproject.toml export > export.txt \
 && python requirements.py pyproject.toml serve > serve.txt \
 && python requirements.py pyproject.toml serve-gpu > serve-gpu.txt

# ---- wheel: the genserve wheel, the only layer that the project's code invalidates -----------------------------------
FROM python:${PYTHON}-slim-${DEBIAN} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY core core
COPY training training
COPY export export
COPY server server
COPY clients clients
COPY app app
COPY protos protos
RUN --mount=type=cache,target=/root/.cache/pip \
    pip wheel --no-deps --wheel-dir /wheels .

# ---- train: torch (CPU build), training and export (produces the model repository); runs as a non-root user ---------
FROM python:${PYTHON}-slim-${DEBIAN} AS train
ARG TORCH
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
# torch from PyTorch's CPU index first (PyPI's torch is the multi-GB CUDA build), then the rest, pinned.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install "torch==${TORCH}" --index-url https://download.pytorch.org/whl/cpu
COPY --from=requirements /deps/export.txt /deps/constraints.txt /deps/
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install -r /deps/export.txt -c /deps/constraints.txt
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-deps /wheels/genserve-*.whl \
 && pip check \
 && python -c "import torch; assert torch.version.cuda is None, torch.__version__"
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/genserve genserve \
 && mkdir /work \
 && chown 10001:10001 /work
USER 10001
WORKDIR /work
ENTRYPOINT ["genserve"]
CMD ["--help"]

# ---- serve-cpu: ONNX Runtime on CPU, gRPC, OIP HTTP, Prometheus; no CUDA, no torch ----------------------------------
FROM python:${PYTHON}-slim-${DEBIAN} AS serve-cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MALLOC_ARENA_MAX=2
COPY --from=requirements /deps/serve.txt /deps/constraints.txt /deps/
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install -r /deps/serve.txt -c /deps/constraints.txt
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-deps /wheels/genserve-*.whl \
 && pip check \
 && python -c "import sys, genserve.server.app; assert 'torch' not in sys.modules"
RUN useradd --system --uid 10001 --user-group --home-dir /srv genserve
USER 10001
WORKDIR /srv
VOLUME ["/models"]
# gRPC (genserve.v1 and OIP), Prometheus /metrics, OIP HTTP/JSON (/v2/health/live, /v2/health/ready, /v2/models/...)
EXPOSE 8500 8502 8503
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD ["genserve", "health", "--server", "127.0.0.1:8500"]
ENTRYPOINT ["genserve", "serve", "--repo", "/models", "--host", "0.0.0.0", "--port", "8500", "--metrics-port", "8502", \
            "--http-port", "8503"]

# ---- serve: ONNX Runtime with the CUDA provider (falls back to CPU); no torch ---------------------------------------
FROM ${CUDA_IMAGE} AS serve
ARG PYTHON
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MALLOC_ARENA_MAX=2 \
    UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_PYTHON_PREFERENCE=only-managed \
    PATH=/opt/genserve/bin:$PATH
# Python ${PYTHON} (a python-build-standalone build, as in the other stages' version) rather than the base image's
# python3, so that every image runs the version CI tests; uv is mounted for this step only, not kept.
RUN --mount=type=bind,from=uv,source=/uv,target=/usr/local/bin/uv \
    --mount=type=cache,target=/root/.cache/uv \
    uv python install "${PYTHON}" \
 && "$(uv python find "${PYTHON}")" -m venv /opt/genserve \
 && python -c "import sys; assert '%d.%d' % sys.version_info[:2] == '${PYTHON}', sys.version"
COPY --from=requirements /deps/serve-gpu.txt /deps/constraints.txt /deps/
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install -r /deps/serve-gpu.txt -c /deps/constraints.txt
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-deps /wheels/genserve-*.whl \
 && pip check \
 && python -c "import sys, genserve.server.app; assert 'torch' not in sys.modules"
RUN useradd --system --uid 10001 --user-group --home-dir /srv genserve
USER 10001
WORKDIR /srv
VOLUME ["/models"]
EXPOSE 8500 8502 8503
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD ["genserve", "health", "--server", "127.0.0.1:8500"]
ENTRYPOINT ["genserve", "serve", "--repo", "/models", "--host", "0.0.0.0", "--port", "8500", "--metrics-port", "8502", \
            "--http-port", "8503"]
