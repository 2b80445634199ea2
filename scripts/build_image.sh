#!/usr/bin/env bash
# Build the synth7t container image (the Dockerfile at the repository root) with podman or docker,
# whichever is present, on any machine, with or without a container registry.
#
#   scripts/build_image.sh [options] [save [FILE]]
#
# With no arguments: the CPU image synth7t:<version>. The base is python:3.11-slim-bookworm when it
# is present locally or a registry answers; otherwise a Debian bookworm base bootstrapped here with
# mmdebstrap (no registry needed: Debian's package mirror is enough) and imported as
# localhost/synth7t-base:bookworm.
#
# Options:
#   --engine podman|docker   container engine (default: podman if installed, else docker)
#   --base registry|bootstrap|IMAGE
#                            base image: python:3.11-slim-bookworm from a registry, the bootstrapped
#                            Debian base, or any image with (or able to apt-get) python3 >= 3.10
#   --gpu                    CUDA build: nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 base and
#                            PyPI's (CUDA) torch wheel; tag synth7t:<version>-cuda
#   --tag NAME:TAG           image tag (default synth7t:<version>, or synth7t:<version>-cuda)
#   --context DIR            build context holding the Dockerfile (default: this repository)
#   --no-host-pip            do not pass the host's pip CA bundle and find-links folders (podman)
#   --rebootstrap            bootstrap the Debian base again even if it exists
#   save [FILE]              afterwards write a docker-archive tarball (default synth7t-<tag>.tar),
#                            e.g. for `apptainer build synth7t.sif docker-archive://FILE`
#   -- ARGS                  passed on to `<engine> build`
#
# The host's pip settings (podman only; `docker build` cannot mount host folders): the CA bundle
# (`pip config get global.cert` or $PIP_CERT) and local find-links folders (global.find-links or
# $PIP_FIND_LINKS) are mounted read-only into the build and named by the build args PIP_CERT and
# PIP_FIND_LINKS, so pip inside the build trusts what pip on the host trusts and finds the wheels
# it finds (e.g. a CPU torch wheel when the PyTorch CPU index is out of reach). Nothing of this is
# kept in the image.
#
# With podman, runc is used when installed (crun refuses hybrid cgroup set-ups) and the builds run
# with --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 (podman's defaults can exceed what the
# machine allows). The build uses the host's network (--network host); the image needs none.
# Environment: SYNTH7T_BUILD_DIR (scratch folder for the base tarball, default $TMPDIR or /tmp).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VERSION="$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$HERE/synth7t/__init__.py")"
REGISTRY_BASE="docker.io/library/python:3.11-slim-bookworm"
BOOT_BASE="localhost/synth7t-base:bookworm"
BOOT_PACKAGES="python3,python3-venv,ca-certificates,libgomp1,passwd"
GPU_BASE="docker.io/nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04"
TORCH_INDEX="https://download.pytorch.org/whl/cpu"
TORCH_VERSION="2.13.0"   # keep in step with scripts/install.sh (TORCH_SPEC)
BUILD_DIR="${SYNTH7T_BUILD_DIR:-${TMPDIR:-/tmp}/synth7t-image-build}"
MOUNT_ROOT="/run/synth7t-pip"

ENGINE="" BASE="" GPU=0 TAG="" CONTEXT="$HERE" HOST_PIP=1 REBOOT=0 SAVE=0 SAVE_FILE=""
EXTRA=()

say() { echo "build_image: $*" >&2; }
die() { say "error: $*"; exit 2; }
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --engine) ENGINE="${2:?--engine needs a value}"; shift 2 ;;
        --base) BASE="${2:?--base needs a value}"; shift 2 ;;
        --gpu) GPU=1; shift ;;
        --tag) TAG="${2:?--tag needs a value}"; shift 2 ;;
        --context) CONTEXT="$(cd "${2:?--context needs a value}" && pwd)"; shift 2 ;;
        --no-host-pip) HOST_PIP=0; shift ;;
        --rebootstrap) REBOOT=1; shift ;;
        save) SAVE=1; shift
              if [[ $# -gt 0 && "$1" != -* ]]; then SAVE_FILE="$1"; shift; fi ;;
        -h|--help) usage; exit 0 ;;
        --) shift; EXTRA=("$@"); break ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done

# ------------------------------------------------------------------ engine
if [[ -z "$ENGINE" ]]; then
    if command -v podman >/dev/null; then ENGINE=podman
    elif command -v docker >/dev/null; then ENGINE=docker
    else die "neither podman nor docker is installed (Debian: apt-get install podman runc uidmap)"; fi
fi
command -v "$ENGINE" >/dev/null || die "$ENGINE is not installed"
ENG=("$ENGINE")
BUILD_OPTS=(--network host)
if [[ "$ENGINE" == podman ]]; then
    if command -v runc >/dev/null; then ENG+=(--runtime runc); fi
    BUILD_OPTS+=(--ulimit nofile=1024:1024 --ulimit nproc=1024:1024)
fi
image_exists() { "${ENG[@]}" image inspect "$1" >/dev/null 2>&1; }

[[ -f "$CONTEXT/Dockerfile" ]] || die "$CONTEXT has no Dockerfile"
if [[ -z "$TAG" ]]; then
    TAG="synth7t:${VERSION}"
    [[ "$GPU" == 1 ]] && TAG="${TAG}-cuda"
fi

# ------------------------------------------------------------------ base image
bootstrap_base() {
    if [[ "$REBOOT" == 0 ]] && image_exists "$BOOT_BASE"; then
        say "using the bootstrapped base $BOOT_BASE (--rebootstrap makes it again)"
        return
    fi
    command -v mmdebstrap >/dev/null || die "no registry answers and mmdebstrap is missing \
(Debian: apt-get install mmdebstrap uidmap)"
    mkdir -p "$BUILD_DIR"
    local tar="$BUILD_DIR/base.tar" t0=$SECONDS
    say "bootstrapping a Debian bookworm base with mmdebstrap (minbase + $BOOT_PACKAGES)"
    rm -f "$tar"
    mmdebstrap --quiet --variant=minbase --include="$BOOT_PACKAGES" bookworm "$tar"
    "${ENG[@]}" import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' \
        "$tar" "$BOOT_BASE" >/dev/null
    rm -f "$tar"
    say "bootstrapped $BOOT_BASE in $((SECONDS - t0)) s"
}

if [[ "$GPU" == 1 ]]; then
    BASE="${BASE:-$GPU_BASE}"
fi
case "$BASE" in
    "")
        if image_exists "$REGISTRY_BASE"; then BASE="$REGISTRY_BASE"
        elif timeout 120 "${ENG[@]}" pull -q "$REGISTRY_BASE" >/dev/null 2>&1; then BASE="$REGISTRY_BASE"
        else say "no registry answers for $REGISTRY_BASE"; bootstrap_base; BASE="$BOOT_BASE"; fi ;;
    registry) BASE="$REGISTRY_BASE" ;;
    bootstrap) bootstrap_base; BASE="$BOOT_BASE" ;;
esac
if ! image_exists "$BASE"; then
    "${ENG[@]}" pull "$BASE" || die "cannot pull the base image $BASE"
fi

# ------------------------------------------------------------------ pip settings for the build
BUILD_ARGS=(--build-arg "BASE_IMAGE=$BASE")
host_pip() {  # value of a pip option as pip on the host sees it: $PIP_<KEY>, else pip config
    local key="$1" env_name
    env_name="PIP_$(echo "$key" | tr 'a-z-' 'A-Z_')"
    if [[ -n "${!env_name:-}" ]]; then echo "${!env_name}"; return; fi
    local py
    for py in python3 python; do
        if command -v "$py" >/dev/null && "$py" -m pip --version >/dev/null 2>&1; then
            "$py" -m pip config get "global.$key" 2>/dev/null \
                || "$py" -m pip config get "install.$key" 2>/dev/null || true
            return
        fi
    done
}

LOCAL_CPU_TORCH=0
if [[ "$HOST_PIP" == 1 && "$ENGINE" == podman ]]; then
    cert="$(host_pip cert)"
    if [[ -n "$cert" && -f "$cert" ]]; then
        BUILD_OPTS+=(-v "$(readlink -f "$cert"):$MOUNT_ROOT/cert.pem:ro")
        BUILD_ARGS+=(--build-arg "PIP_CERT=$MOUNT_ROOT/cert.pem")
        say "pip in the build trusts the host pip's CA bundle"
    fi
fi
if [[ "$GPU" == 1 ]]; then
    BUILD_ARGS+=(--build-arg "TORCH_INDEX_URL=")   # PyPI's Linux torch wheel is the CUDA build
    say "GPU build: the host's find-links folders are not used (they may hold a CPU torch)"
elif [[ "$HOST_PIP" == 1 && "$ENGINE" == podman ]]; then
    links=() i=0
    for fl in $(host_pip find-links); do
        if [[ -d "$fl" ]]; then
            BUILD_OPTS+=(-v "$(readlink -f "$fl"):$MOUNT_ROOT/find-links-$i:ro")
            links+=("$MOUNT_ROOT/find-links-$i")
            compgen -G "$fl/torch-${TORCH_VERSION}+cpu-*.whl" >/dev/null && LOCAL_CPU_TORCH=1
            i=$((i + 1))
        elif [[ "$fl" == *://* ]]; then
            links+=("$fl")
        fi
    done
    if [[ ${#links[@]} -gt 0 ]]; then
        BUILD_ARGS+=(--build-arg "PIP_FIND_LINKS=${links[*]}")
        say "pip in the build sees the host's find-links (${#links[@]} location(s))"
    fi
fi
if [[ "$GPU" == 0 ]]; then
    if ! python3 -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=15)" \
            "$TORCH_INDEX/" >/dev/null 2>&1; then
        BUILD_ARGS+=(--build-arg "TORCH_INDEX_URL=")
        if [[ "$LOCAL_CPU_TORCH" == 1 ]]; then
            say "the PyTorch CPU index does not answer; torch ${TORCH_VERSION}+cpu comes from the find-links folder"
        else
            die "the PyTorch CPU index ($TORCH_INDEX) does not answer and no find-links folder \
holds torch-${TORCH_VERSION}+cpu: pip would install the multi-GB CUDA build. Put the CPU wheel in \
a pip find-links folder, or build the CUDA image with --gpu."
        fi
    fi
fi

# ------------------------------------------------------------------ build
say "$ENGINE build -t $TAG from $CONTEXT on $BASE"
t0=$SECONDS
"${ENG[@]}" build "${BUILD_OPTS[@]}" "${BUILD_ARGS[@]}" -t "$TAG" -f "$CONTEXT/Dockerfile" \
    ${EXTRA[@]+"${EXTRA[@]}"} "$CONTEXT"
secs=$((SECONDS - t0))
size="$("${ENG[@]}" image inspect --format '{{.Size}}' "$TAG")"
say "built $TAG in ${secs} s; size $(awk -v s="$size" 'BEGIN { printf "%.2f GB (%d bytes)", s / 1e9, s }')"

if [[ "$SAVE" == 1 ]]; then
    SAVE_FILE="${SAVE_FILE:-synth7t-${TAG##*:}.tar}"
    rm -f "$SAVE_FILE"
    if [[ "$ENGINE" == podman ]]; then
        "${ENG[@]}" save --format docker-archive -o "$SAVE_FILE" "$TAG"
    else
        docker save -o "$SAVE_FILE" "$TAG"
    fi
    say "saved $TAG to $SAVE_FILE ($(du -h "$SAVE_FILE" | cut -f1)); Apptainer: \
apptainer build synth7t.sif docker-archive://$SAVE_FILE"
fi
