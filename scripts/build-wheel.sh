#!/usr/bin/env bash
# Build the installable artefacts: dist/edgepipe-<version>.tar.gz (sdist) and
# dist/edgepipe-<version>-py3-none-any.whl, and print the wheel's path.
# `python -m build` makes the sdist first and the wheel from the unpacked sdist,
# so the wheel holds exactly what the sdist ships (never leftovers of an earlier
# build/ or __pycache__) and a broken sdist fails here, not on a user's machine.
# Each step runs in an isolated environment with the [build-system] requirements
# from the package index (setuptools>=77 for license-files).
# Usage: scripts/build-wheel.sh [OUTDIR]        (default: dist)
#   EDGEPIPE_BUILD_PYTHON  a Python with `build` installed (default: .venv, then
#                          .venv-device; both get it from the dev extra)
# Output of the build goes to .cache/build-wheel.log; only the path is printed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
outdir="${1:-dist}"

py="${EDGEPIPE_BUILD_PYTHON:-}"
if [ -z "$py" ]; then
    for p in .venv/bin/python .venv-device/bin/python; do
        if [ -x "$p" ] && "$p" -c 'import build' >/dev/null 2>&1; then py="$p"; break; fi
    done
fi
if [ -z "$py" ] || ! "$py" -c 'import build' >/dev/null 2>&1; then
    echo "build-wheel: no Python with the 'build' package; run scripts/setup-env.sh (dev extra)" \
         "or set EDGEPIPE_BUILD_PYTHON" >&2
    exit 1
fi

mkdir -p .cache "$outdir"
log=.cache/build-wheel.log
if ! "$py" -m build --outdir "$outdir" . >"$log" 2>&1; then
    grep -v 'is ignored: it is neither' "$log" | tail -n 30 >&2
    echo "build-wheel: the build failed (log: $log)" >&2
    exit 1
fi
# "Successfully built edgepipe-X.tar.gz and edgepipe-X-py3-none-any.whl"
wheel="$(sed -n 's/^Successfully built .* and \(.*\.whl\)$/\1/p' "$log" | tail -n 1)"
if [ -z "$wheel" ] || [ ! -f "$outdir/$wheel" ]; then
    echo "build-wheel: could not find the built wheel in $outdir (log: $log)" >&2
    exit 1
fi
echo "$(cd "$outdir" && pwd)/$wheel"
