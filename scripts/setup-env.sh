#!/usr/bin/env bash
# Create or refresh the project's virtual environments; safe to re-run.
#   .venv         host + device + camera + dev extras (TensorFlow included)
#   .venv-device  device + camera + dev extras only: proves device/ runs without TensorFlow
# Usage: scripts/setup-env.sh [host|device|all]   (default: host)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
which_env="${1:-host}"

pick_python() {
    for p in python3.11 python3 python; do
        if command -v "$p" >/dev/null 2>&1 && "$p" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' 2>/dev/null; then
            echo "$p"; return 0
        fi
    done
    for p in python3 python; do
        if command -v "$p" >/dev/null 2>&1; then echo "$p"; return 0; fi
    done
    echo "error: no python3 found; install Python 3.11" >&2
    return 1
}

# make_env DIR EXTRAS: install the project editable with EXTRAS; skipped when
# pyproject.toml has not changed since the last successful install.
make_env() {
    local dir="$1" extras="$2"
    local stamp="$dir/.edgepipe-stamp"
    local want
    want="$(cat pyproject.toml scripts/setup-env.sh | sha256sum | cut -c1-16)-$extras"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$dir/bin/python" ]; then
        return 0
    fi
    if [ ! -x "$dir/bin/python" ]; then
        echo "==> creating $dir"
        "$(pick_python)" -m venv "$dir"
    fi
    echo "==> installing edgepipe[$extras] into $dir (the first run downloads the wheels: a few minutes)"
    "$dir/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
    "$dir/bin/python" -m pip install -q --disable-pip-version-check -e ".[$extras]"
    case ",$extras," in
        # The optional distillation toolchain (edgepipe.pipeline.distill), without its declared
        # dependencies: tf-keras would pull the full tensorflow wheel next to tensorflow-cpu, tfmot
        # would downgrade absl-py; neither is needed to run.
        *,host,*) "$dir/bin/python" -m pip install -q --disable-pip-version-check --no-deps \
            'tf-keras>=2.21,<2.22' 'tensorflow-model-optimization==0.8.1' 'dm-tree>=0.1.8' ;;
    esac
    echo "$want" > "$stamp"
}

case "$which_env" in
    host) make_env .venv "host,camera,dev" ;;
    device) make_env .venv-device "device,camera,dev" ;;
    all) make_env .venv "host,camera,dev"; make_env .venv-device "device,camera,dev" ;;
    *) echo "usage: $0 [host|device|all]" >&2; exit 2 ;;
esac
