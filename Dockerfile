# lorafleet image: installs the project from requirements.lock (exact versions with hashes), and
# runs the `lorafleet` CLI. CPU (default) and CUDA variants via build arguments:
#   docker build -t lorafleet:cpu .
#   docker build -t lorafleet:cuda --build-arg BASE_IMAGE=rayproject/ray:2.60.0-py311-cu124 \
#       --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 .
# torch comes from TORCH_INDEX at TORCH_VERSION (its build differs per accelerator); everything
# else from the lock, hash-checked, without dependency resolution.
ARG BASE_IMAGE=rayproject/ray:2.60.0-py311-cpu
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
USER root
RUN apt-get update && apt-get install -y --no-install-recommends make && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/lorafleet
COPY requirements.lock ./
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}" \
 && awk '/^torch==/{skip=1; next} skip && /^[[:space:]]/{next} {skip=0; print}' requirements.lock > /tmp/lock.txt \
 && pip install --no-cache-dir --require-hashes --no-deps -r /tmp/lock.txt
COPY pyproject.toml README.md ./
COPY lorafleet ./lorafleet
COPY registry ./registry
COPY serve ./serve
COPY training ./training
RUN pip install --no-cache-dir --no-deps --no-build-isolation .
# uid 1000 (ray): the pods run as non-root with a read-only root filesystem and writable /tmp.
USER 1000
ENV LORAFLEET_CACHE__DISK_DIR=/tmp/lorafleet-cache HF_HUB_OFFLINE=1
ENTRYPOINT ["lorafleet"]
# Listening on all interfaces needs auth: set LORAFLEET_API_TOKENS (tokens of 32+ characters), or
# the server refuses to start (--insecure-no-auth overrides that, loudly).
CMD ["serve", "--host", "0.0.0.0"]
