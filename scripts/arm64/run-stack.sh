#!/usr/bin/env bash
# Run pytest on emulated arm64 (Cortex-A72, i.e. a Raspberry Pi 4) with one stack.
# Needs the sysroot, the stack's wheels and the binfmt registration in place
# (scripts/test-arm64.sh prepares all three).
# Usage: run-stack.sh STACK_NAME [pytest args...]   (default args: tests/device)
#   STACK_NAME is a scripts/arm64/stack-NAME.txt, e.g. tflite-runtime, ai-edge-litert
#   EDGEPIPE_ARM64_CPU  qemu CPU model (default cortex-a72; cortex-a76 ~ Pi 5)
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
# A clean environment: nothing from the host's venv may leak into the emulated Python.
rc=0
env -u PYTHONHOME -u VIRTUAL_ENV -u PYTHONSTARTUP \
    QEMU_LD_PREFIX="$sysroot" QEMU_CPU="${EDGEPIPE_ARM64_CPU:-cortex-a72}" \
    PYTHONPATH="$target:$root" PYTHONNOUSERSITE=1 PATH="$bin:$PATH" TMPDIR="$tmp" \
    EDGEPIPE_EMULATED=1 EDGEPIPE_ARM64_STACK="$stack" \
    TF_CPP_MIN_LOG_LEVEL=3 \
    "$py" -m pytest -p no:cacheprovider --basetemp="$tmp/pytest" -m "not timing" "$@" || rc=$?
exit "$rc"
