#!/usr/bin/env bash
# Set up the environments if needed, then run the whole test suite:
#   1. everything in .venv (host + device, TensorFlow present)
#   2. the device tests again in .venv-device, where TensorFlow is absent
#   3. the device tests on emulated arm64 (scripts/test-arm64.sh), both runtime stacks
# EDGEPIPE_SKIP_ARM64=1 skips step 3 for quick local runs (never in CI).
# Extra arguments go to pytest in step 1.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/setup-env.sh all

echo "==> [1/3] full suite (host + device)"
.venv/bin/python -m pytest -q "$@"

echo "==> [2/3] device tests without TensorFlow (.venv-device)"
.venv-device/bin/python -m pytest -q tests/device -p no:cacheprovider

if [ -x scripts/test-arm64.sh ]; then
    if [ "${EDGEPIPE_SKIP_ARM64:-0}" = "1" ] && [ "${CI:-}" != "true" ]; then
        echo "==> [3/3] arm64 device tests skipped (EDGEPIPE_SKIP_ARM64=1)"
    else
        echo "==> [3/3] device tests on emulated arm64"
        scripts/test-arm64.sh
    fi
else
    echo "==> [3/3] arm64 device tests: scripts/test-arm64.sh not present"
fi
