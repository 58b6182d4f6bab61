# One image for every role: coordinator, worker (per GPU node) and Flower.
# GPU nodes: build with --build-arg EXTRAS=gpu to add CuPy (CUDA 12 wheels).
FROM python:3.11-slim
ARG EXTRAS=""
WORKDIR /app
COPY . /app
RUN pip install --no-cache-dir ".${EXTRAS:+[$EXTRAS]}"
# Scripts are looked up in /app; jobs run in /work, the volume shared with the head node.
WORKDIR /work
CMD ["coordinator", "--help"]
