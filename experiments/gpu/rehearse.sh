#!/usr/bin/env bash
# Rehearsal of the device check on a CPU machine: a Python 3.12 environment standing in for the
# GPU image (experiments/gpu/image.txt, nothing of the project's own installation), the wheels
# of .gpu/wheels.tar.xz installed into it as check.sh installs them there, and every stage run end to
# end at test sizes, all at once as on the GPU. Run experiments/gpu/prepare.py first.
#   bash experiments/gpu/rehearse.sh [check.py options, e.g. --out DIR]
# PYTHON312: a Python 3.12 interpreter [pyenv's 3.12, else python3.12 on PATH].
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ -z "${PYTHON312:-}" ]; then
    for p in $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12.*/bin/python3.12 2>/dev/null) $(command -v python3.12); do
        if "$p" -c '' 2>/dev/null; then PYTHON312=$p; break; fi
    done
fi
if [ -z "${PYTHON312:-}" ]; then
    echo "rehearse.sh: no Python 3.12 found; set PYTHON312" >&2
    exit 2
fi
VENV=.venv-gpu-image
if [ ! -f "$VENV/.installed" ] || [ experiments/gpu/image.txt -nt "$VENV/.installed" ]; then
    rm -rf "$VENV"
    "$PYTHON312" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --upgrade pip
    "$VENV/bin/pip" install --quiet -r experiments/gpu/image.txt
    touch "$VENV/.installed"
fi
SITE=$(mktemp -d)
trap 'rm -rf "$SITE"' EXIT
PYTHON="$VENV/bin/python" CHECK_SITE="$SITE" JAX_PLATFORMS=cpu \
    bash experiments/gpu/check.sh --sizes tiny --parallel --budget 900 "$@"
