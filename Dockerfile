# The NER service with its bundled model (models/en-conll03), served by `ner serve`.
#
# CPU image (default):
#   docker build -t ner-service .
# CUDA image (for `ner train` on a GPU; the service itself tags on the CPU):
#   docker build -t ner-service:cuda \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#     --build-arg TORCH_INDEX_URL=https://pypi.org/simple .
# Any BASE_IMAGE works whose `python3` is >= 3.11 or where apt can install one (Ubuntu 24.04: 3.12).

ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE}

# where torch comes from: the CPU-only wheel index (no CUDA libraries, ~5x smaller), or
# https://pypi.org/simple for the default PyPI build, which bundles CUDA
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# python:3.11-slim has Python; a CUDA base image gets it from apt. Everything goes into a virtualenv
# (Ubuntu 24.04's system Python refuses `pip install`).
RUN set -eux; \
    if ! command -v python3 >/dev/null 2>&1 || ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then \
        apt-get update; \
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv; \
        rm -rf /var/lib/apt/lists/*; \
    fi; \
    python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "the service needs Python >= 3.11; choose another BASE_IMAGE")'; \
    python3 -m venv /opt/venv

WORKDIR /app

# dependencies first, from pyproject.toml alone, so that code changes do not reinstall them;
# torch (pinned there) comes from TORCH_INDEX_URL
COPY pyproject.toml ./
RUN set -eux; \
    python -c "import re, tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; torch = [d for d in deps if re.split(r'[\s<>=!~;\[]', d, maxsplit=1)[0] == 'torch']; assert torch, 'torch is not pinned in pyproject.toml'; open('/tmp/torch.txt', 'w').write('\n'.join(torch) + '\n'); open('/tmp/deps.txt', 'w').write('\n'.join(deps) + '\n')"; \
    pip install -r /tmp/torch.txt --index-url "${TORCH_INDEX_URL}"; \
    pip install -r /tmp/deps.txt; \
    rm /tmp/torch.txt /tmp/deps.txt

# the code and the bundled model (see .dockerignore for what stays out), readable by the service's
# user whatever the modes in the build context (safetensors writes 0600). The install is editable on
# purpose: the bundled model is found beside the `ml` package (models/en-conll03), i.e. in /app.
COPY . .
RUN set -eux; \
    chmod -R a+rX /app; \
    test -f models/en-conll03/weights.safetensors || { echo "models/en-conll03 is missing from the build context: train or copy the bundled model first" >&2; exit 1; }; \
    pip install --no-deps -e .; \
    python -c "from ml.artifact import default_model_path; from service.serving.model import ServedModel; m = ServedModel.load(default_model_path()); print('bundled model:', m.name, m.version)"; \
    ner --help >/dev/null

# an unprivileged user; the code stays owned by root (read-only for the service). /data/models is
# for model versions added later (a volume in docker-compose.yml), registered via POST /admin/models.
RUN set -eux; \
    groupadd --system --gid 10001 ner; \
    useradd --system --uid 10001 --gid ner --home-dir /home/ner --create-home --shell /usr/sbin/nologin ner; \
    mkdir -p /data/models; \
    chown ner:ner /data/models
USER 10001:10001

EXPOSE 8000

# curl is not in the slim image: probe /healthz with Python. The first API key is sent along so the
# probe also passes with PROTECT_PROBES=true.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; k = os.environ.get('API_KEYS', '').split(',')[0].strip().split(':')[-1]; u.urlopen(u.Request('http://127.0.0.1:8000/healthz', headers={'X-API-Key': k} if k else {}), timeout=4)"]

# several worker processes; `ner serve` then aggregates their metrics (PROMETHEUS_MULTIPROC_DIR)
CMD ["sh", "-c", "exec ner serve --host 0.0.0.0 --port 8000 --workers \"${WORKERS:-2}\""]
