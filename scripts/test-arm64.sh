#!/usr/bin/env bash
# Run the device test suite (tests/device) on emulated arm64, the architecture of a
# 64-bit Raspberry Pi OS (bookworm, Python 3.11), on both runtime stacks:
#   1. tflite-runtime==2.14.0 + numpy<2   (scripts/arm64/stack-tflite-runtime.txt)
#   2. ai-edge-litert + numpy 2            (scripts/arm64/stack-ai-edge-litert.txt)
# Steps: qemu-user (>= 8; backports on bookworm) + mmdebstrap via apt if missing;
# an arm64 Python 3.11 sysroot and each stack's aarch64 wheels, cached under
# .cache/arm64/; aarch64 registered with binfmt_misc (tests start subprocesses);
# x86 reference outputs for tests/device/test_arm64_parity.py; then pytest under
# qemu (Cortex-A72) with EDGEPIPE_EMULATED=1, `timing` and `slow` tests deselected
# (slow ones are CLI/process tests that do not depend on the CPU; they run on x86).
# The code under test is the built wheel (installed per run next to each stack's
# wheels), not the checkout; the tests themselves come from the checkout's tests/.
#
# Environment:
#   EDGEPIPE_SKIP_ARM64=1    skip (local runs only; ignored when CI=true)
#   EDGEPIPE_ARM64_STACKS    stacks to run (default "tflite-runtime ai-edge-litert")
#   EDGEPIPE_ARM64_JOBS      stacks run at once (default 2: the stacks are independent)
#   EDGEPIPE_ARM64_TIMEOUT   seconds allowed per stack (default 1800: a stack took 10-17 min on a shared 2-core VM)
#   EDGEPIPE_ARM64_CPU       qemu CPU model (default cortex-a72 = Pi 4; cortex-a76 = Pi 5)
#   EDGEPIPE_ARM64_CACHE     cache dir (default <repo>/.cache/arm64)
#   EDGEPIPE_WHEEL           the edgepipe wheel to test (default: scripts/build-wheel.sh builds it)
# Extra arguments go to pytest instead of the default `tests/device`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
helpers="$root/scripts/arm64"
cache="${EDGEPIPE_ARM64_CACHE:-$root/.cache/arm64}"
export EDGEPIPE_ARM64_CACHE="$cache"
stacks="${EDGEPIPE_ARM64_STACKS:-tflite-runtime ai-edge-litert}"
jobs="${EDGEPIPE_ARM64_JOBS:-2}"
per_stack_timeout="${EDGEPIPE_ARM64_TIMEOUT:-1800}"
in_ci=0
if [ "${CI:-}" = "true" ]; then in_ci=1; fi
started=$SECONDS

if [ "${EDGEPIPE_SKIP_ARM64:-0}" = "1" ]; then
    if [ "$in_ci" = 1 ]; then
        echo "arm64: EDGEPIPE_SKIP_ARM64=1 is ignored in CI; running the arm64 tests"
    else
        echo "arm64: skipped (EDGEPIPE_SKIP_ARM64=1)"
        exit 0
    fi
fi

# Fail loudly (never a pass) when this machine cannot emulate arm64.
cannot_emulate() {
    echo "arm64: ERROR: this machine cannot run the arm64 device tests: $1" >&2
    if [ "$in_ci" = 1 ]; then
        echo "arm64: CI needs root on Debian/Ubuntu with binfmt_misc (or qemu-user >= 8, mmdebstrap and an aarch64 binfmt entry already set up)." >&2
    else
        echo "arm64: run as root on Debian/Ubuntu, or set EDGEPIPE_SKIP_ARM64=1 to skip this step locally." >&2
    fi
    exit 1
}
# On an arm64 host the device tests already run natively (steps 1-2); this step
# exists to compare an x86 host against arm64.
[ "$(uname -m)" = "x86_64" ] || cannot_emulate "this step emulates arm64 on an x86_64 host; this host is $(uname -m)"
if [ "$(id -u)" != "0" ] && ! command -v mmdebstrap >/dev/null 2>&1; then
    cannot_emulate "mmdebstrap/qemu-user are not installed and installing them needs root"
fi
if ! grep -qw binfmt_misc /proc/filesystems; then
    cannot_emulate "the kernel has no binfmt_misc support"
fi

host_py=""
for p in "$root/.venv-device/bin/python" "$root/.venv/bin/python"; do
    if [ -x "$p" ]; then host_py="$p"; break; fi
done
[ -n "$host_py" ] || { echo "arm64: ERROR: no .venv-device or .venv; run scripts/setup-env.sh all" >&2; exit 1; }
export EDGEPIPE_HOST_PYTHON="$host_py"  # the helpers read apt's configuration with it

if [ -z "${EDGEPIPE_WHEEL:-}" ]; then
    EDGEPIPE_WHEEL="$("$root/scripts/build-wheel.sh")" || { echo "arm64: ERROR: the wheel did not build" >&2; exit 1; }
fi
export EDGEPIPE_WHEEL  # run-stack.sh installs it for each run
echo "arm64: testing $(basename "$EDGEPIPE_WHEEL")"

echo "arm64: preparing qemu, the sysroot and the wheels (cache: ${cache#"$root"/})"
"$helpers/host-tools.sh" || cannot_emulate "qemu-user >= 8 and mmdebstrap could not be installed"
"$helpers/binfmt.sh" || cannot_emulate "aarch64 binaries cannot be registered with binfmt_misc"
"$helpers/sysroot.sh" "$cache/sysroot"
for s in $stacks; do
    [ -f "$helpers/stack-$s.txt" ] || { echo "arm64: ERROR: unknown stack $s (no scripts/arm64/stack-$s.txt)" >&2; exit 1; }
    "$helpers/wheels.sh" "$helpers/stack-$s.txt" "$cache/stack-$s" "$cache/sysroot" "$host_py"
done
echo "arm64: $(qemu-aarch64 --version | head -1), CPU ${EDGEPIPE_ARM64_CPU:-cortex-a72}, ready after $((SECONDS - started))s"

# Reference outputs on this (x86) machine for the cross-arch parity test.
reference="$cache/x86_reference.json"
echo "arm64: writing x86 reference outputs with $(basename "$(dirname "$(dirname "$host_py")")")"
rm -f "$reference"
if ! EDGEPIPE_ARM64_REFERENCE="$reference" "$host_py" -m pytest -q -p no:cacheprovider \
        tests/device/test_arm64_parity.py >"$cache/x86_reference.log" 2>&1; then
    tail -n 30 "$cache/x86_reference.log" >&2
    echo "arm64: ERROR: the x86 reference run failed (log: $cache/x86_reference.log)" >&2
    exit 1
fi
export EDGEPIPE_ARM64_REFERENCE="$reference"

# Run the stacks, at most $jobs at a time; each one's output goes to its own log
# and is printed whole when it finishes, so the logs never interleave.
# A stack whose process dies from a signal (not a timeout) gets one more try: a
# crash of qemu itself is not a test result; a real crash crashes again.
run_one() {
    local s="$1" t0=$SECONDS rc=0 note=""
    shift
    for attempt in 1 2; do
        rc=0
        timeout --kill-after=20 "$per_stack_timeout" "$helpers/run-stack.sh" "$s" -q -rfEs "$@" \
            >"$cache/pytest-$s.log" 2>&1 || rc=$?
        if [ "$rc" -le 128 ] || [ "$rc" = 137 ] || [ "$attempt" = 2 ]; then break; fi
        cp "$cache/pytest-$s.log" "$cache/pytest-$s.crash.log"
        note="retried after the first run died with signal $((rc - 128)), log: ${cache#"$root"/}/pytest-$s.crash.log"
        echo "arm64: [$s] died with signal $((rc - 128)); retrying once"
    done
    echo "$rc $((SECONDS - t0)) $note" > "$cache/pytest-$s.rc"
}
pytest_args=("$@")
if [ "${#pytest_args[@]}" -eq 0 ]; then pytest_args=(tests/device); fi
running=()
cleanup() { for p in "${running[@]}"; do pkill -TERM -P "$p" 2>/dev/null || true; done; }
trap cleanup EXIT INT TERM
for s in $stacks; do
    rm -f "$cache/pytest-$s.rc" "$cache/pytest-$s.crash.log"
    while [ "${#running[@]}" -ge "$jobs" ]; do
        wait "${running[0]}" || true
        running=("${running[@]:1}")
    done
    echo "arm64: [$s] started"
    run_one "$s" "${pytest_args[@]}" &
    running+=("$!")
done
for p in "${running[@]}"; do wait "$p" || true; done
trap - EXIT INT TERM

failed=0
summary=()
n_passed=0 n_failed=0 n_skipped=0
count() {  # count WORD LINE: the number before WORD in a pytest summary line, else 0
    local n
    n="$(echo "$2" | grep -oE "[0-9]+ $1" | head -1 | cut -d' ' -f1)"
    echo "${n:-0}"
}
for s in $stacks; do
    rc=1 secs="?" note="no result recorded"
    if [ -f "$cache/pytest-$s.rc" ]; then read -r rc secs note < "$cache/pytest-$s.rc"; fi
    echo "----- arm64 [$s] pytest output -----"
    cat "$cache/pytest-$s.log"
    last="$(grep -E '(passed|failed|error|skipped|deselected|no tests ran)' "$cache/pytest-$s.log" | tail -n 1 | sed 's/=//g; s/^ *//; s/ *$//')"
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        last="TIMED OUT after ${per_stack_timeout}s; ${last:-no summary}"
    fi
    if [ "$rc" != 0 ]; then failed=1; fi
    n_passed=$((n_passed + $(count passed "$last")))
    n_skipped=$((n_skipped + $(count skipped "$last")))
    bad=$(( $(count failed "$last") + $(count error "$last") ))
    if [ "$rc" != 0 ] && [ "$bad" = 0 ]; then bad=1; fi  # crashed or timed out: count the stack as a failure
    n_failed=$((n_failed + bad))
    summary+=("arm64 [$s] $([ "$rc" = 0 ] && echo ok || echo "FAILED (exit $rc)") in ${secs}s: ${last:-no pytest summary}${note:+ ($note)}")
done
echo "----- arm64 summary (qemu ${EDGEPIPE_ARM64_CPU:-cortex-a72}) -----"
printf '%s\n' "${summary[@]}"
echo "arm64: total $((SECONDS - started))s for $(echo $stacks | wc -w) stack(s)"
echo "arm64: $n_passed passed, $n_failed failed, $n_skipped skipped"
exit "$failed"
