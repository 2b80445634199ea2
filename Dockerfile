# synth7t container image: the MRIxFields2026 Task 1 entry point by default, the BIDS App and the
# companion commands on PATH. Weights, model cards and the TemplateFlow-layout reference templates
# are package data, so they are baked in: the image needs no network at run time.
#
# Build with scripts/build_image.sh (podman or docker, whichever is present; tested in CI with
# podman): it picks the base (python:3.11-slim-bookworm where a registry answers, else a Debian
# bookworm base it bootstraps with mmdebstrap), passes the host's pip CA bundle and find-links
# folder to pip (podman), and can build the GPU variant or save a docker-archive tarball:
#   scripts/build_image.sh                      # -> synth7t:0.1.0 (CPU)
#   scripts/build_image.sh --gpu                # -> synth7t:0.1.0-cuda
#   scripts/build_image.sh save                 # + synth7t-0.1.0.tar (docker-archive)
# By hand (CPU, a registry reachable):
#   docker build -t synth7t:0.1.0 .
# torch is pinned (scripts/install.sh, TORCH_SPEC); TORCH_INDEX_URL is an extra pip index from which
# the wheel of the right flavour comes (PyPI's own Linux torch wheel is the multi-GB CUDA build).
# Without that index, a CPU torch wheel in a find-links folder (PIP_FIND_LINKS) does the same.
# Build on a CUDA base (a CUDA torch wheel, e.g. PyPI's own: empty TORCH_INDEX_URL):
#   docker build -t synth7t:0.1.0-cuda \
#       --build-arg BASE_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 \
#       --build-arg TORCH_INDEX_URL= .
#
# MRIxFields2026 Task 1 (the challenge contract: /input read-only with manifest.json, /output
# writable, no network). The platform runs it like this (tests/test_image.py runs it so, with
# podman, plus --read-only --tmpfs /tmp):
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
# pip settings for the build only (not kept in the image): a CA bundle and find-links folder(s)
# as seen inside the build (scripts/build_image.sh mounts the host's read-only and sets these).
ARG PIP_CERT=
ARG PIP_FIND_LINKS=
ARG SYNTH7T_UID=1000
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A CUDA (Ubuntu) base has no Python of its own; python:3.11-slim already does, and so does the
# bootstrapped base (its packages are all present, so apt is not even asked).
RUN set -eux; \
    need=""; \
    if ! command -v python3 >/dev/null || ! python3 -c "import venv, ensurepip" 2>/dev/null; then \
        need="python3 python3-venv python3-pip"; \
    fi; \
    for p in libgomp1 ca-certificates; do dpkg -s "$p" >/dev/null 2>&1 || need="$need $p"; done; \
    command -v useradd >/dev/null || need="$need passwd"; \
    if [ -n "$need" ]; then \
        apt-get update; \
        apt-get install -y --no-install-recommends $need; \
    fi; \
    apt-get clean; \
    rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log

WORKDIR /opt/synth7t
# 1. The dependencies (torch first, pinned; then setup.cfg's install_requires) through the one
#    install path, before any source is copied: this heavy layer is rebuilt only when setup.cfg
#    or scripts/install.sh change. pip's cache lives in a build cache mount (reused by the next
#    build, never part of the image).
COPY setup.cfg pyproject.toml ./
COPY scripts/install.sh scripts/verify_models.py ./scripts/
RUN --mount=type=cache,target=/root/.cache/pip,sharing=locked set -eux; \
    [ -n "${PIP_CERT}" ] || unset PIP_CERT; \
    [ -n "${PIP_FIND_LINKS}" ] || unset PIP_FIND_LINKS; \
    if [ -n "${TORCH_INDEX_URL}" ]; then export PIP_EXTRA_INDEX_URL="${TORCH_INDEX_URL}"; fi; \
    TORCH_SPEC="${TORCH_SPEC}" PYTHON=python3 bash scripts/install.sh /opt/venv --deps-only; \
    find /opt/venv -name '__pycache__' -path '*/tests/*' -prune -exec rm -rf {} + ; \
    chmod -R a+rX /opt/venv

# 2. The models, verified (SHA-256, standard library only) before anything else is copied: a
#    modified or corrupted weight file fails the build here, in seconds.
COPY synth7t/models/ ./synth7t/models/
RUN python3 scripts/verify_models.py synth7t/models

# 3. The package (see .dockerignore: sources, package data, scripts), installed by the same
#    script; the dependencies are already there, so this step is short.
COPY README.md ./
COPY scripts/ ./scripts/
COPY synth7t/ ./synth7t/
COPY workflows/ ./workflows/
COPY bids_app/ ./bids_app/
RUN --mount=type=cache,target=/root/.cache/pip,sharing=locked set -eux; \
    [ -n "${PIP_CERT}" ] || unset PIP_CERT; \
    [ -n "${PIP_FIND_LINKS}" ] || unset PIP_FIND_LINKS; \
    if [ -n "${TORCH_INDEX_URL}" ]; then export PIP_EXTRA_INDEX_URL="${TORCH_INDEX_URL}"; fi; \
    TORCH_SPEC="${TORCH_SPEC}" PYTHON=python3 bash scripts/install.sh /opt/venv; \
    /opt/venv/bin/python -m compileall -q /opt/synth7t; \
    chmod -R a+rX /opt/synth7t; \
    find /opt/venv ! -perm -a+r -exec chmod a+rX {} +

ENV PATH=/opt/venv/bin:${PATH} \
    PIP_NO_CACHE_DIR=1 \
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
    python -c "from synth7t.inference import load_synthesizer; from synth7t.registry import Registry; \
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
