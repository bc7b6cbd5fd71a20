#!/usr/bin/env bash
# Make sure qemu-user >= 8 (from bookworm-backports on Debian 12) and mmdebstrap
# are installed. bookworm's own qemu 7.2 passes the x86 /proc/cpuinfo through to
# the guest and ai-edge-litert then crashes, so the backports build is required.
# The mirror comes from this machine's apt sources (never a host name in the repo).
# Needs root only when something is missing.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
QEMU_MIN_MAJOR=8

qemu_major() {
    command -v qemu-aarch64 >/dev/null 2>&1 || { echo 0; return; }
    qemu-aarch64 --version 2>/dev/null | sed -n 's/^qemu-aarch64 version \([0-9]*\).*/\1/p' | head -1
}

have_tools() {
    [ "$(qemu_major)" -ge "$QEMU_MIN_MAJOR" ] && command -v mmdebstrap >/dev/null 2>&1
}

if have_tools; then
    exit 0
fi
if [ "$(id -u)" != "0" ]; then
    echo "error: need qemu-user >= $QEMU_MIN_MAJOR (bookworm-backports) and mmdebstrap; run as root to install them" >&2
    exit 1
fi

codename="$(. /etc/os-release && echo "${VERSION_CODENAME:-}")"
export DEBIAN_FRONTEND=noninteractive
apt_q=(-q -o Dpkg::Use-Pty=0 -o APT::Color=0)

if ! command -v mmdebstrap >/dev/null 2>&1; then
    echo "    installing mmdebstrap"
    if ! apt-cache show mmdebstrap >/dev/null 2>&1; then apt-get "${apt_q[@]}" update >/dev/null; fi
    apt-get "${apt_q[@]}" install -y --no-install-recommends mmdebstrap >/dev/null
fi

if [ "$(qemu_major)" -lt "$QEMU_MIN_MAJOR" ]; then
    if [ "$codename" = "bookworm" ]; then
        if ! python3 "$here/apt-mirror.py" bookworm-backports >/dev/null 2>&1; then
            mirror="$(python3 "$here/apt-mirror.py" bookworm)"
            keyring="$(python3 "$here/apt-mirror.py" bookworm --keyring)"
            echo "    adding bookworm-backports from this machine's mirror ($mirror)"
            {
                echo "Types: deb"
                echo "URIs: $mirror"
                echo "Suites: bookworm-backports"
                echo "Components: main"
                if [ -n "$keyring" ]; then echo "Signed-By: $keyring"; fi
            } > /etc/apt/sources.list.d/edgepipe-backports.sources
        fi
        apt-get "${apt_q[@]}" update >/dev/null
        echo "    installing qemu-user from bookworm-backports"
        apt-get "${apt_q[@]}" install -y --no-install-recommends -t bookworm-backports qemu-user >/dev/null
    else
        # Newer Debian/Ubuntu releases ship a recent enough qemu in the main suite.
        apt-get "${apt_q[@]}" update >/dev/null
        apt-get "${apt_q[@]}" install -y --no-install-recommends qemu-user >/dev/null
    fi
fi

if ! have_tools; then
    echo "error: qemu-aarch64 $(qemu_major) installed, need >= $QEMU_MIN_MAJOR; install qemu-user from backports" >&2
    exit 1
fi
