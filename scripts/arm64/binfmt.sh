#!/usr/bin/env bash
# Make the kernel run aarch64 ELF binaries through qemu-aarch64 (binfmt_misc), so
# an emulated Python can start emulated subprocesses (sys.executable, shebangs).
# Reuses an existing registration when it points at a new enough qemu; otherwise
# (re)registers, which needs root. QEMU_LD_PREFIX / QEMU_CPU in the environment
# are then honoured by every emulated process.
set -euo pipefail
BINFMT=/proc/sys/fs/binfmt_misc
NAME=qemu-aarch64
QEMU_MIN_MAJOR=8
am_root() { [ "$(id -u)" = "0" ]; }

interp_major() {  # major version of the qemu behind an interpreter path
    local real
    real="$(readlink -f "$1" 2>/dev/null || true)"
    [ -x "$real" ] || { echo 0; return; }
    "$real" --version 2>/dev/null | sed -n 's/^qemu-aarch64 version \([0-9]*\).*/\1/p' | head -1 | grep . || echo 0
}

if [ ! -e "$BINFMT/status" ]; then
    if am_root && grep -qw binfmt_misc /proc/filesystems; then
        mount -t binfmt_misc binfmt_misc "$BINFMT"
    else
        echo "error: binfmt_misc is not mounted at $BINFMT and cannot be mounted here (need root and kernel support)" >&2
        exit 1
    fi
fi
if [ "$(cat "$BINFMT/status")" != "enabled" ]; then
    if am_root; then echo 1 > "$BINFMT/status"; else echo "error: binfmt_misc is disabled" >&2; exit 1; fi
fi

if [ -e "$BINFMT/$NAME" ]; then
    interp="$(sed -n 's/^interpreter //p' "$BINFMT/$NAME")"
    if grep -qx enabled "$BINFMT/$NAME" && [ "$(interp_major "$interp")" -ge "$QEMU_MIN_MAJOR" ]; then
        exit 0
    fi
    if ! am_root; then
        echo "error: $NAME is registered with $interp (disabled or qemu < $QEMU_MIN_MAJOR); re-registering needs root" >&2
        exit 1
    fi
    echo "    replacing the binfmt entry $NAME ($interp: disabled or qemu < $QEMU_MIN_MAJOR)"
    echo -1 > "$BINFMT/$NAME"
fi
am_root || { echo "error: aarch64 binaries are not registered with binfmt_misc; registering needs root" >&2; exit 1; }

# Prefer the distribution's own line (its wrapper preserves argv[0]); fall back to
# the plain binary with the standard aarch64 ELF magic/mask. 'F' opens the
# interpreter now, so it also works from other mount namespaces.
conf=/usr/share/qemu/binfmt.d/qemu-aarch64.conf
if [ -r "$conf" ] && line="$(grep -m1 "^:$NAME:" "$conf")" \
        && [ "$(interp_major "$(echo "$line" | cut -d: -f7)")" -ge "$QEMU_MIN_MAJOR" ]; then
    :
else
    qemu="$(command -v qemu-aarch64)"
    line=":$NAME:M::\\x7fELF\\x02\\x01\\x01\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x02\\x00\\xb7\\x00:\\xff\\xff\\xff\\xff\\xff\\xff\\xff\\x00\\xff\\xff\\xff\\xff\\xff\\xff\\xff\\xff\\xfe\\xff\\xff\\xff:$qemu:F"
fi
printf '%s' "$line" > "$BINFMT/register"
echo "    registered $NAME with binfmt_misc ($(sed -n 's/^interpreter //p' "$BINFMT/$NAME"))"
