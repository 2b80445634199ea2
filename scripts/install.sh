#!/usr/bin/env bash
# One install path for synth7t, used by the Makefile, .ci/run, the Dockerfile and Singularity.def.
#   scripts/install.sh [VENV_DIR] [--test]
# torch is installed first and pinned to the CPU build: an unpinned torch pulls a multi-GB CUDA
# wheel. TORCH_SPEC overrides it (e.g. a CUDA build inside a GPU image).
set -euo pipefail
VENV="${1:-.venv}"
EXTRAS=""
if [[ "${2:-}" == "--test" ]]; then EXTRAS="[test]"; fi
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
"$PY" -m pip install --quiet -e "$HERE$EXTRAS"
echo "synth7t installed into $VENV"
