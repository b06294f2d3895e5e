# The arks-ray image: the operator (python -m controller) and model download Jobs (python -m arks_ray.models).
# CPU only, without an engine: not a Ray head (Serve builds engine apps there, and ray.serve.llm needs vLLM).
#
#   make images            (buildah; see docker/README.md for the local base and what differs)
#   docker build -f docker/operator.Dockerfile -t ghcr.io/arks-ray/arks-ray:0.1.0 .
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS build
RUN python3 -m venv /opt/arks-ray
COPY pyproject.toml README.md /src/
# Dependencies first, from pyproject.toml alone, so a code change rebuilds only the small layer after them.
RUN python3 -c "import tomllib; p = tomllib.load(open('/src/pyproject.toml', 'rb'))['project']; \
print('\\n'.join(p['dependencies']))" > /src/requirements.txt \
    && /opt/arks-ray/bin/pip install --no-cache-dir -r /src/requirements.txt
COPY arks_ray /src/arks_ray
COPY controller /src/controller
COPY deployments /src/deployments
RUN /opt/arks-ray/bin/pip install --no-cache-dir --no-deps /src \
    && /opt/arks-ray/bin/pip uninstall -y pip \
    && find /opt/arks-ray -name '__pycache__' -prune -exec rm -rf {} +

FROM ${BASE}
LABEL org.opencontainers.image.source="https://github.com/arks-ray/arks-ray" \
      org.opencontainers.image.description="arks-ray operator and model downloader" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/arks-ray /opt/arks-ray
ENV PATH=/opt/arks-ray/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# KubeRay runs Ray in this image as the pod's user; the chart runs the operator as uid 1000.
RUN useradd --uid 1000 --create-home --shell /bin/bash ray
USER 1000
WORKDIR /home/ray
CMD ["python", "-m", "controller"]
