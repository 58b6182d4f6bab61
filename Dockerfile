# One image for every role: the head node's tools and Flower, and a GPU node's worker.
#   docker build -t scripts-coordinator:0.1.0 .                                   # head node
#   docker build --build-arg EXTRAS=worker,gpu -t scripts-coordinator:0.1.0-gpu .  # GPU nodes
# A pinned base (Debian 12, Python 3.11); dependencies install in a layer of their own, before
# the source is copied, so a source change rebuilds only the last layers.
FROM python:3.11.11-slim-bookworm
ARG EXTRAS="head,worker"
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
WORKDIR /app

# 1. Dependencies, from pyproject.toml alone (empty packages stand in for the source).
COPY pyproject.toml README.md ./
RUN mkdir -p coordinator worker_tasks scoring \
    && touch coordinator/__init__.py worker_tasks/__init__.py scoring/__init__.py celeryconfig.py \
    && pip install ".[${EXTRAS}]" \
    && pip uninstall -y scripts-coordinator \
    && rm -rf coordinator worker_tasks scoring celeryconfig.py

# 2. The project itself.
COPY . .
RUN pip install --no-deps . && rm -rf build

# Celery warns against running as root, and a job needs no root: a user of its own.
RUN useradd --create-home --uid 10001 pipeline && mkdir -p /work /scripts \
    && chown pipeline /work
USER pipeline
# Jobs run in /work (the volume shared with, or fetched by, the head node); the pipeline's
# scripts are mounted at /scripts; the project's own (Step 3) are built in.
WORKDIR /work
CMD ["coordinator", "--help"]
