# One image for every kvcluster container: the Ray head, the Ray workers and the client.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    RAY_AUTH_MODE=disabled \
    RAY_USAGE_STATS_ENABLED=0

# gcc builds the optional native accelerators (block-hash chains, radix walks); without it the
# install still works, on the slower pure-Python paths.
RUN apt-get update \
    && apt-get install -y --no-install-recommends redis-tools curl gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/kvcluster
COPY pyproject.toml setup.py constraints.txt README.md ./
COPY kvcluster ./kvcluster
COPY tiers ./tiers
COPY routing ./routing
# The CPU build of the pinned torch, from PyTorch's CPU index (no CUDA packages in the image).
RUN pip install -c constraints.txt torch --index-url https://download.pytorch.org/whl/cpu \
    && pip install -c constraints.txt -e ".[dev]"
COPY configs ./configs
COPY examples ./examples
COPY tests ./tests
