#!/usr/bin/env bash
# Make sure qemu-user >= 8 (from bookworm-backports on Debian 12) and mmdebstrap
# are installed, plus (optional) an aarch64 cross C compiler. bookworm's own qemu
# 7.2 passes the x86 /proc/cpuinfo through to the guest and ai-edge-litert then
# crashes, so the backports build is required. The mirror comes from this
# machine's apt sources (never a host name in the repo). Root only when something
# is missing.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py="${EDGEPIPE_HOST_PYTHON:-python3}"
QEMU_MIN_MAJOR=8
log="${TMPDIR:-/tmp}/edgepipe-arm64-apt.log"

qemu_major() {
    command -v qemu-aarch64 >/dev/null 2>&1 || { echo 0; return; }
    qemu-aarch64 --version 2>/dev/null | sed -n 's/^qemu-aarch64 version \([0-9]*\).*/\1/p' | head -1 | grep . || echo 0
}
have_tools() { [ "$(qemu_major)" -ge "$QEMU_MIN_MAJOR" ] && command -v mmdebstrap >/dev/null 2>&1; }
have_cc() { command -v aarch64-linux-gnu-gcc >/dev/null 2>&1; }

if have_tools && { have_cc || [ "$(id -u)" != "0" ]; }; then
    exit 0
fi
if [ "$(id -u)" != "0" ]; then
    echo "error: need qemu-user >= $QEMU_MIN_MAJOR (bookworm-backports) and mmdebstrap; run as root to install them" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt_run() {  # quiet apt-get; its output goes to $log and is shown on failure
    if ! apt-get -q -o Dpkg::Use-Pty=0 "$@" >>"$log" 2>&1; then
        tail -n 20 "$log" >&2
        echo "error: apt-get $* failed (log: $log)" >&2
        return 1
    fi
}
: > "$log"
updated=0
apt_update() { if [ "$updated" = 0 ]; then apt_run update; updated=1; fi; }

if ! command -v mmdebstrap >/dev/null 2>&1; then
    echo "    installing mmdebstrap"
    apt-cache show mmdebstrap >/dev/null 2>&1 || apt_update
    apt_run install -y --no-install-recommends mmdebstrap
fi

if [ "$(qemu_major)" -lt "$QEMU_MIN_MAJOR" ]; then
    codename="$(. /etc/os-release && echo "${VERSION_CODENAME:-}")"
    if [ "$codename" = "bookworm" ]; then
        if ! "$py" "$here/apt-mirror.py" bookworm-backports >/dev/null 2>&1; then
            mirror="$("$py" "$here/apt-mirror.py" bookworm)"
            keyring="$("$py" "$here/apt-mirror.py" bookworm --keyring)"
            echo "    adding bookworm-backports from this machine's bookworm mirror"
            {
                echo "Types: deb"
                echo "URIs: $mirror"
                echo "Suites: bookworm-backports"
                echo "Components: main"
                if [ -n "$keyring" ]; then echo "Signed-By: $keyring"; fi
            } > /etc/apt/sources.list.d/edgepipe-backports.sources
            updated=0
        fi
        apt_update
        echo "    installing qemu-user from bookworm-backports"
        apt_run install -y --no-install-recommends -t bookworm-backports qemu-user
    else
        # Newer Debian/Ubuntu releases ship a recent enough qemu in their main suite.
        apt_update
        echo "    installing qemu-user"
        apt_run install -y --no-install-recommends qemu-user
    fi
fi

# A cross C compiler, so tests that build a shared library (the external delegate
# fixture) build an aarch64 one under emulation instead of skipping. Optional.
if ! have_cc; then
    echo "    installing gcc-aarch64-linux-gnu (tests build an aarch64 test delegate with it)"
    apt_run install -y --no-install-recommends gcc-aarch64-linux-gnu libc6-dev-arm64-cross \
        || echo "    warning: no aarch64 cross compiler; the external-delegate tests will skip on arm64"
fi

if ! have_tools; then
    echo "error: qemu-aarch64 $(qemu_major) installed, need >= $QEMU_MIN_MAJOR; install qemu-user from backports" >&2
    exit 1
fi
