#!/usr/bin/env bash
# Run pytest on emulated arm64 (Cortex-A72, i.e. a Raspberry Pi 4) with one stack.
# Needs the sysroot, the stack's wheels and the binfmt registration in place
# (scripts/test-arm64.sh prepares all three).
# The code under test is the edgepipe wheel, installed (host pip, no deps) into a
# directory of this run only and put on PYTHONPATH with the stack's wheels, as on
# a Pi; the checkout's tests/ and its data are only the tests.
# Usage: run-stack.sh STACK_NAME [pytest args...]   (default args: tests/device)
#   STACK_NAME is a scripts/arm64/stack-NAME.txt, e.g. tflite-runtime, ai-edge-litert
#   EDGEPIPE_ARM64_CPU  qemu CPU model (default cortex-a72; cortex-a76 ~ Pi 5)
#   EDGEPIPE_WHEEL      the wheel to test (default: scripts/build-wheel.sh builds it)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cache="${EDGEPIPE_ARM64_CACHE:-$root/.cache/arm64}"
stack="${1:?usage: run-stack.sh STACK_NAME [pytest args...]}"
shift
sysroot="$cache/sysroot"
target="$cache/stack-$stack"
py="$sysroot/usr/bin/python3.11"
for need in "$sysroot/.complete" "$target/.complete"; do
    [ -f "$need" ] || { echo "error: $need missing; run scripts/test-arm64.sh first" >&2; exit 1; }
done

# Shims so tests that spawn `edgerun` or `python3` get the emulated ones, as in
# an activated venv on the Pi. The shebang names an aarch64 binary: binfmt_misc
# routes it through qemu, which reads QEMU_LD_PREFIX/QEMU_CPU from the environment.
bin="$cache/bin-$stack"
mkdir -p "$bin"
ln -sf "$py" "$bin/python3"
ln -sf "$py" "$bin/python"
for cmd in edgerun:edgepipe.device.cli edgepipe:edgepipe.pipeline.cli; do
    printf '#!%s\nimport sys\nfrom %s import main\nsys.exit(main())\n' "$py" "${cmd#*:}" > "$bin/${cmd%%:*}"
    chmod +x "$bin/${cmd%%:*}"
done

# `cc` builds aarch64 code here (tests compile a test delegate with `cc`).
if command -v aarch64-linux-gnu-gcc >/dev/null 2>&1; then
    ln -sf "$(command -v aarch64-linux-gnu-gcc)" "$bin/cc"
else
    rm -f "$bin/cc"
fi

if [ "$#" -eq 0 ]; then set -- tests/device; fi
cd "$root"
# A private temp dir per run: pytest prunes other sessions' basetemps under
# /tmp/pytest-of-$USER, and the two stacks (and other users) run side by side.
tmp="$(mktemp -d "${TMPDIR:-/tmp}/edgepipe-arm64-$stack.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

wheel="${EDGEPIPE_WHEEL:-}"
if [ -z "$wheel" ]; then wheel="$("$root/scripts/build-wheel.sh")"; fi
host_py="${EDGEPIPE_HOST_PYTHON:-$root/.venv-device/bin/python}"
site="$tmp/site"
"$host_py" -m pip install -q --no-deps --no-warn-conflicts --target "$site" "$wheel" 2>&1 \
    | grep -v 'is ignored: it is neither' >&2 || true
[ -f "$site/edgepipe/device/cli.py" ] || { echo "error: could not install $wheel into $site" >&2; exit 1; }

# A clean environment: nothing from the host's venv may leak into the emulated Python.
# A private, empty sample cache: the 12 MB sample detector takes minutes per test under emulation, so its
# real-model tests skip here (they run on x86); the decoders themselves are covered on synthetic and tiny models.
run_env=(env -u PYTHONHOME -u VIRTUAL_ENV -u PYTHONSTARTUP EDGEPIPE_CACHE="$tmp/cache"
    QEMU_LD_PREFIX="$sysroot" QEMU_CPU="${EDGEPIPE_ARM64_CPU:-cortex-a72}"
    PYTHONPATH="$site:$target" PYTHONNOUSERSITE=1 PATH="$bin:$PATH" TMPDIR="$tmp"
    EDGEPIPE_EMULATED=1 EDGEPIPE_ARM64_STACK="$stack" TF_CPP_MIN_LOG_LEVEL=3)
# -P: the working directory (the checkout) is not on sys.path; edgepipe must come from the wheel.
origin="$("${run_env[@]}" "$py" -P -c 'import edgepipe.device as d; print(d.__file__)')"
case "$origin" in
    "$site"/*) echo "edgepipe under test: $(basename "$wheel") (${origin#"$tmp"/})" ;;
    *) echo "error: edgepipe.device came from $origin, not from the wheel in $site" >&2; exit 1 ;;
esac
rc=0
"${run_env[@]}" "$py" -P -m pytest -p no:cacheprovider --basetemp="$tmp/pytest" -m "not timing and not slow" "$@" || rc=$?
exit "$rc"
