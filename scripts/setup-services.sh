#!/usr/bin/env bash
# Install the real components the tests and the demo start on loopback, when missing:
#   mosquitto            MQTT broker (fleets behind NAT)
#   postgresql           shared results store for teams
#   chromium + driver    headless browser tests of the dashboard
# Debian packages through apt (mirrors from this machine's apt configuration); root only when
# something is missing. Services are NOT started here: each test fixture / the demo starts
# its own private instance on 127.0.0.1 and stops it.
# Usage: scripts/setup-services.sh [--check]   (--check: report what is missing, install nothing)
set -euo pipefail
log="${TMPDIR:-/tmp}/edgepipe-services-apt.log"
check_only=0
[ "${1:-}" = "--check" ] && check_only=1

pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1; }
missing=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
{ [ -n "$(pg_bin)" ] && [ -x "$(pg_bin)/initdb" ]; } || missing+=(postgresql)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)

if [ "${#missing[@]}" -eq 0 ]; then
    exit 0
fi
if [ "$check_only" = 1 ]; then
    echo "services: missing ${missing[*]}"
    exit 1
fi
if [ "$(id -u)" != "0" ]; then
    echo "services: ${missing[*]} not installed and installing them needs root (apt-get install ${missing[*]}); tests that need them will be skipped" >&2
    exit 0
fi
echo "==> installing ${missing[*]} (Debian packages)"
export DEBIAN_FRONTEND=noninteractive
: > "$log"
if ! apt-cache show "${missing[0]}" >/dev/null 2>&1; then
    apt-get -q update >>"$log" 2>&1 || true
fi
if ! apt-get -q -o Dpkg::Use-Pty=0 install -y --no-install-recommends "${missing[@]}" >>"$log" 2>&1; then
    # A stale package list is the usual cause: refresh once and retry.
    apt-get -q update >>"$log" 2>&1 || true
    if ! apt-get -q -o Dpkg::Use-Pty=0 install -y --no-install-recommends "${missing[@]}" >>"$log" 2>&1; then
        tail -n 20 "$log" >&2
        echo "error: apt-get install ${missing[*]} failed (log: $log)" >&2
        exit 1
    fi
fi
# Debian's packages start system-wide daemons; the project runs private instances instead.
for svc in mosquitto postgresql; do
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$svc" 2>/dev/null; then
        systemctl stop "$svc" >/dev/null 2>&1 || true
    fi
done
