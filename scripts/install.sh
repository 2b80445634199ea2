#!/usr/bin/env bash
# One install path for synth7t, used by the Makefile, .ci/run, the Dockerfile and Singularity.def.
#   scripts/install.sh [VENV_DIR] [--test | --deps-only]
# (--deps-only: torch and setup.cfg's install_requires, not the package: the container build
# caches that layer before it copies the sources.)
# torch is installed first and pinned to the CPU build: an unpinned torch pulls a multi-GB CUDA
# wheel. TORCH_SPEC overrides it (e.g. a CUDA build inside a GPU image).
set -euo pipefail
VENV="${1:-.venv}"
EXTRAS=""
DEPS_ONLY=0
if [[ "${2:-}" == "--test" ]]; then EXTRAS="[test]"; fi
if [[ "${2:-}" == "--deps-only" ]]; then DEPS_ONLY=1; fi
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
PYTHON="${PYTHON:-python3}"

if [[ "$VENV" != "system" ]]; then
    [[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
    PY="$VENV/bin/python"
else
    PY="$PYTHON"
fi
"$PY" -m pip install --quiet --upgrade pip setuptools wheel
"$PY" -m pip install --quiet "$TORCH_SPEC"
if [[ "$DEPS_ONLY" == 1 ]]; then
    mapfile -t REQS < <("$PY" - "$HERE/setup.cfg" <<'PY'
import configparser, sys
cfg = configparser.ConfigParser()
cfg.read(sys.argv[1])
for line in cfg["options"]["install_requires"].splitlines():
    if line.split("#")[0].strip():
        print(line.split("#")[0].strip())
PY
)
    "$PY" -m pip install --quiet "${REQS[@]}"
    echo "synth7t's dependencies installed into $VENV"
    exit 0
fi
"$PY" -m pip install --quiet -e "$HERE$EXTRAS"
echo "synth7t installed into $VENV"
