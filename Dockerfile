# synth7t container image: the MRIxFields2026 Task 1 entry point by default, the BIDS App and the
# companion commands on PATH. Weights, model cards and the TemplateFlow-layout reference templates
# are package data, so they are baked in: the image needs no network at run time.
#
# Build (CPU, the default):
#   docker build -t synth7t:0.1.0 .
# torch is pinned (scripts/install.sh, TORCH_SPEC); TORCH_INDEX_URL is an extra pip index from which
# the wheel of the right flavour comes (PyPI's own Linux torch wheel is the multi-GB CUDA build).
# Build on a CUDA base (a CUDA torch wheel, e.g. PyPI's own: empty TORCH_INDEX_URL):
#   docker build -t synth7t:0.1.0-cuda \
#       --build-arg BASE_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 \
#       --build-arg TORCH_INDEX_URL= .
#
# MRIxFields2026 Task 1 (the challenge contract: /input read-only with manifest.json, /output
# writable, no network). The platform runs it exactly like this:
#   docker run --rm --network none \
#       -v /path/to/task1_input:/input:ro -v /path/to/task1_output:/output \
#       -e INPUT_DIR=/input -e OUTPUT_DIR=/output -e MANIFEST=/input/manifest.json -e TASK_ID=task1 \
#       synth7t:0.1.0
#   # add --gpus all (CUDA image) and e.g. `-- --device cuda` after the image name to use a GPU;
#   # check a finished output folder against the manifest:
#   docker run --rm -v /path/to/task1_input:/input:ro -v /path/to/task1_output:/output:ro \
#       synth7t:0.1.0 --check /output
#
# BIDS App (override the entry point):
#   docker run --rm --network none -v /data/bids:/data:ro -v /data/derivatives:/out \
#       -v /scratch/work:/work --entrypoint synth7t synth7t:0.1.0 \
#       /data /out participant --participant-label 01 -w /work --nprocs 4 --omp-nthreads 2
#   # files are written as the image's non-root user (uid 1000); add --user "$(id -u):$(id -g)"
#   # to own them as yourself.
# Metrics: docker run --rm -v ...:/pred:ro -v ...:/gt:ro -v ...:/res --entrypoint synth7t-eval \
#       synth7t:0.1.0 /pred /gt -o /res

ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG SYNTH7T_UID=1000
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A CUDA (Ubuntu) base has no Python of its own; python:3.11-slim already does.
RUN set -eux; \
    if ! command -v python3 >/dev/null || ! python3 -c "import venv, ensurepip" 2>/dev/null; then \
        apt-get update; \
        apt-get install -y --no-install-recommends python3 python3-venv python3-pip; \
    fi; \
    apt-get update; \
    apt-get install -y --no-install-recommends libgomp1 ca-certificates; \
    rm -rf /var/lib/apt/lists/*

# Only what the install needs (see .dockerignore): package sources, package data, install script.
WORKDIR /opt/synth7t
COPY setup.cfg pyproject.toml README.md ./
COPY scripts/ ./scripts/
COPY synth7t/ ./synth7t/
COPY workflows/ ./workflows/
COPY bids_app/ ./bids_app/

# The one install path (torch first, pinned), into a venv.
RUN set -eux; \
    if [ -n "${TORCH_INDEX_URL}" ]; then export PIP_EXTRA_INDEX_URL="${TORCH_INDEX_URL}"; fi; \
    TORCH_SPEC="${TORCH_SPEC}" PYTHON=python3 bash scripts/install.sh /opt/venv; \
    /opt/venv/bin/python -m compileall -q /opt/synth7t; \
    find /opt/venv -name '__pycache__' -path '*/tests/*' -prune -exec rm -rf {} + ; \
    chmod -R a+rX /opt/synth7t /opt/venv

ENV PATH=/opt/venv/bin:${PATH} \
    TEMPLATEFLOW_HOME=/opt/synth7t/synth7t/data/templateflow \
    TEMPLATEFLOW_AUTOUPDATE=0 \
    NIPYPE_NO_ET=1 \
    PYTHONNOUSERSITE=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    SYNTH7T_CONTAINER=docker \
    INPUT_DIR=/input \
    OUTPUT_DIR=/output \
    MANIFEST=/input/manifest.json \
    TASK_ID=task1

# Fails the build if the install is broken or a shipped model does not verify (SHA-256).
RUN set -eux; \
    synth7t-mrixfields --version; synth7t-eval --version; \
    python -c "from synth7t.registry import Registry, load_synthesizer; \
[load_synthesizer(e) for e in Registry.load()]; print('models verified')"

# (Ubuntu-based CUDA images already have a uid-1000 user "ubuntu": replace it.)
RUN set -eux; \
    if getent passwd "${SYNTH7T_UID}" >/dev/null; then \
        userdel --remove "$(getent passwd "${SYNTH7T_UID}" | cut -d: -f1)" 2>/dev/null || true; \
    fi; \
    useradd --create-home --uid "${SYNTH7T_UID}" --shell /usr/sbin/nologin synth7t
USER synth7t
WORKDIR /home/synth7t

ENTRYPOINT ["synth7t-mrixfields"]
CMD []
