#!/usr/bin/env bash
# Unpack (once) an arm64 Debian bookworm sysroot with Python 3.11 and libstdc++,
# the same userland as 64-bit Raspberry Pi OS. --variant=extract in chrootless
# mode only downloads and unpacks .debs: seconds, no emulation, no root needed.
# Usage: sysroot.sh SYSROOT_DIR      (reused when SYSROOT_DIR/.complete exists)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py="${EDGEPIPE_HOST_PYTHON:-python3}"
sysroot="${1:?usage: sysroot.sh SYSROOT_DIR}"
packages="python3.11,libstdc++6"
want="bookworm arm64 $packages"

if [ -f "$sysroot/.complete" ] && [ "$(cat "$sysroot/.complete")" = "$want" ]; then
    exit 0
fi
mirror="$("$py" "$here/apt-mirror.py" bookworm 2>/dev/null || true)"
if [ -z "$mirror" ]; then
    # Not a bookworm host: any Debian mirror this machine already uses carries bookworm too.
    mirror="$("$py" "$here/apt-mirror.py" "$(. /etc/os-release && echo "${VERSION_CODENAME:-}")")"
fi
echo "    building the arm64 sysroot in $sysroot (bookworm, $packages)"
rm -rf "$sysroot" "$sysroot.tmp"
mkdir -p "$(dirname "$sysroot")"
log="$(dirname "$sysroot")/mmdebstrap.log"
if ! mmdebstrap --arch=arm64 --variant=extract --mode=chrootless --include="$packages" \
        bookworm "$sysroot.tmp" "$mirror" >"$log" 2>&1; then
    tail -n 30 "$log" >&2
    echo "error: mmdebstrap failed (full log: $log)" >&2
    exit 1
fi
[ -x "$sysroot.tmp/usr/bin/python3.11" ] || { echo "error: no python3.11 in the sysroot" >&2; exit 1; }
echo "$want" > "$sysroot.tmp/.complete"
mv "$sysroot.tmp" "$sysroot"
