#!/usr/bin/env bash
# The device check's entry point on a GPU machine (or, with --sizes tiny, the rehearsal's):
# installs the wheels of .gpu/wheels.tar.xz (experiments/gpu/prepare.py) into a private folder,
# with no package registry, then runs experiments/gpu/check.py with the arguments given.
#   bash experiments/gpu/check.sh [--sizes full|tiny] [--budget SECONDS] [--out DIR]
# PYTHON: the interpreter [python3, the image's]; CHECK_SITE: the install folder [a new
# temporary folder].
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
SITE=${CHECK_SITE:-$(mktemp -d)}
if [ ! -f .gpu/wheels.tar.xz ] || [ ! -f .gpu/data/water.h5 ]; then
    echo "check.sh: .gpu/wheels.tar.xz or .gpu/data missing; run experiments/gpu/prepare.py on a CPU machine first" >&2
    exit 2
fi
WHEELS=$(mktemp -d)
tar -xJf .gpu/wheels.tar.xz -C "$WHEELS"
"$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$WHEELS"/*.whl
rm -rf "$WHEELS"
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" experiments/gpu/check.py "$@"
