# lorafleet image: installs the project the way the README does (torch pinned first), and runs
# the `lorafleet` CLI. CPU (default) and CUDA variants via build arguments:
#   docker build -t lorafleet:cpu .
#   docker build -t lorafleet:cuda --build-arg BASE_IMAGE=rayproject/ray:2.60.0-py311-cu124 \
#       --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 .
ARG BASE_IMAGE=rayproject/ray:2.60.0-py311-cpu
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
USER root
RUN apt-get update && apt-get install -y --no-install-recommends make && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/lorafleet
COPY pyproject.toml README.md ./
COPY lorafleet ./lorafleet
COPY registry ./registry
COPY serve ./serve
COPY training ./training
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}" \
 && pip install --no-cache-dir .
USER ray
ENV LORAFLEET_CACHE__DISK_DIR=/tmp/lorafleet-cache HF_HUB_OFFLINE=1
ENTRYPOINT ["lorafleet"]
CMD ["serve", "--host", "0.0.0.0"]
