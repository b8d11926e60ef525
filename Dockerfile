# syntax=docker/dockerfile:1
# Multi-stage build.
#   docker build --target train -t genserve-train .     # torch (CPU) for training and export
#   docker build --target serve -t genserve-serve .     # ONNX Runtime with CUDA, no torch
#   docker run --gpus all -p 8500:8500 -p 8502:8502 -v $PWD/model_repository:/models genserve-serve

ARG PYTHON=3.11

# ---- wheel: build the genserve wheel once -----------------------------------------------------
FROM python:${PYTHON}-slim AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY core core
COPY training training
COPY export export
COPY server server
COPY clients clients
COPY app app
COPY protos protos
RUN pip wheel --no-deps --wheel-dir /wheels .

# ---- train: torch CPU build, training and export (produces the model repository) ---------------
FROM python:${PYTHON}-slim AS train
COPY --from=wheel /wheels /wheels
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && pip install --no-cache-dir "$(ls /wheels/genserve-*.whl)[export]"
WORKDIR /work
ENTRYPOINT ["genserve"]
CMD ["--help"]

# ---- serve: ONNX Runtime (CUDA provider, falls back to CPU), gRPC, Prometheus; no torch -----------
FROM nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 AS serve
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/genserve
ENV PATH=/opt/genserve/bin:$PATH \
    MALLOC_ARENA_MAX=2
COPY --from=wheel /wheels /wheels
RUN pip install --no-cache-dir "$(ls /wheels/genserve-*.whl)[serve-gpu]" \
 && python -c "import sys, genserve.server.app; assert 'torch' not in sys.modules" \
 && rm -rf /wheels
RUN useradd --system --uid 10001 --home /srv genserve
USER 10001
WORKDIR /srv
VOLUME ["/models"]
EXPOSE 8500 8502
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD ["genserve", "health", "--server", "127.0.0.1:8500"]
ENTRYPOINT ["genserve", "serve", "--repo", "/models", "--host", "0.0.0.0", "--port", "8500", "--metrics-port", "8502"]
