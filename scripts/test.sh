#!/usr/bin/env bash
# Set up the environments if needed, then run the whole test suite:
#   1. everything in .venv (host + device, TensorFlow present)
#   2. the device tests again in .venv-device, where TensorFlow is absent
#   3. the built wheel, installed with only [device] and run outside the checkout
#      (scripts/build-wheel.sh, scripts/test-wheel.sh)
#   4. the device tests on emulated arm64 against that same wheel
#      (scripts/test-arm64.sh), both runtime stacks
# EDGEPIPE_SKIP_ARM64=1 skips step 4 for quick local runs (never in CI).
# Extra arguments go to pytest in step 1.
# pytest runs with python -P: the checkout's root is not on sys.path, so the tests
# import edgepipe.* through the installed (editable) package, never a stray top-level
# `device`/`pipeline` that only exists in the checkout.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/setup-env.sh all
# Built samples (MobileNetV2, the detector) live in the checkout's cache, shared with the demo and
# the benchmarks: built once, then reused by every step below.
export EDGEPIPE_CACHE="${EDGEPIPE_CACHE:-$root/.cache/edgepipe}"
scripts/setup-services.sh  # mosquitto, postgresql, chromium + driver when missing (tests skip with a reason otherwise)

# Step 2 runs the whole device suite without TensorFlow; here only its runtime test also runs with
# TensorFlow installed (the tf.lite fallback). Arguments replace the default selection.
if [ "$#" -eq 0 ]; then
    # the runtime test first: it checks that finding tf.lite never imports TensorFlow
    set -- tests/device/test_runtime.py tests/host tests/fuzz
fi
echo "==> [1/4] host suite, fuzzing, runtime fallbacks (.venv, with TensorFlow): $*"
.venv/bin/python -P -m pytest -q "$@"

echo "==> [2/4] device tests without TensorFlow (.venv-device)"
.venv-device/bin/python -P -m pytest -q tests/device -p no:cacheprovider

echo "==> [3/4] the wheel, installed with [device] only, outside the checkout"
EDGEPIPE_WHEEL="$(scripts/build-wheel.sh)"
export EDGEPIPE_WHEEL  # step 4 installs the same wheel
scripts/test-wheel.sh "$EDGEPIPE_WHEEL"

if [ -x scripts/test-arm64.sh ]; then
    if [ "${EDGEPIPE_SKIP_ARM64:-0}" = "1" ] && [ "${CI:-}" != "true" ]; then
        echo "==> [4/4] arm64 device tests skipped (EDGEPIPE_SKIP_ARM64=1)"
    else
        echo "==> [4/4] device tests on emulated arm64 (the same wheel)"
        scripts/test-arm64.sh
    fi
else
    echo "==> [4/4] arm64 device tests: scripts/test-arm64.sh not present"
fi
