#!/usr/bin/env bash
# Install one stack's aarch64 wheels into its own --target dir with the host's pip
# (no emulation: pip only picks and unpacks wheels), then byte-compile them and
# the sysroot's stdlib on the host (same CPython 3.11 bytecode) so the emulated
# interpreter does not have to. Reused while the requirements file is unchanged.
# Usage: wheels.sh REQUIREMENTS.txt TARGET_DIR SYSROOT_DIR HOST_PYTHON
set -euo pipefail
reqs="${1:?requirements file}" target="${2:?target dir}" sysroot="${3:?sysroot}" py="${4:?host python}"
# Pi OS bookworm has glibc 2.36; pip needs every acceptable manylinux tag listed.
platforms=(manylinux_2_34_aarch64 manylinux_2_28_aarch64 manylinux_2_27_aarch64 manylinux2014_aarch64)
want="$(cat "$reqs" | sha256sum | cut -c1-16) ${platforms[*]}"
if [ -f "$target/.complete" ] && [ "$(cat "$target/.complete")" = "$want" ]; then
    exit 0
fi
echo "    installing aarch64 wheels from $(basename "$reqs") into $target"
rm -rf "$target" "$target.tmp"
mkdir -p "$target.tmp"
log="$target.log"
plat_args=()
for p in "${platforms[@]}"; do plat_args+=(--platform "$p"); done
if ! "$py" -m pip install --disable-pip-version-check --no-warn-conflicts --no-compile \
        --target "$target.tmp" --only-binary=:all: \
        --python-version 3.11 --implementation cp --abi cp311 "${plat_args[@]}" \
        -r "$reqs" >"$log" 2>&1; then
    grep -v 'is ignored: it is neither' "$log" | tail -n 30 >&2
    echo "error: pip could not install the aarch64 wheels of $(basename "$reqs") (log: $log)" >&2
    exit 1
fi
"$py" -m compileall -q -j 0 "$target.tmp" >/dev/null 2>&1 || true
if [ ! -f "$sysroot/.stdlib-compiled" ]; then
    "$py" -m compileall -q -j 0 "$sysroot/usr/lib/python3.11" >/dev/null 2>&1 || true
    touch "$sysroot/.stdlib-compiled"
fi
sed -n 's/^Successfully installed //p' "$log" | tr ' ' '\n' | grep -iE '^(tflite|ai.edge|numpy|pillow|opencv|pytest)' \
    | tr '\n' ' ' | sed 's/^/      /; s/ $/\n/'
echo "$want" > "$target.tmp/.complete"
mv "$target.tmp" "$target"
