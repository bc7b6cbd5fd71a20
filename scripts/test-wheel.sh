#!/usr/bin/env bash
# Prove the wheel works outside the checkout, as on a Raspberry Pi: build it (or
# take WHEEL), install it with only the [device] extra into a venv of its own
# (no TensorFlow), then, from an empty temporary folder, run `edgerun info`,
# `edgerun bench` and `edgerun run` on a bundle made there; again with
# PYTHONPATH=. and decoy `device/` and `pipeline/` packages in that folder (they
# must not shadow the product); check that the distribution's only top-level
# import name is `edgepipe` and that its data (sample data, schemas, example
# specs, systemd unit, LICENSE, README) is installed.
# The venv (with the dependencies) is cached in .cache/wheel-test/, keyed on the
# wheel's [device] dependency set and the Python; the wheel is always reinstalled.
# Usage: scripts/test-wheel.sh [WHEEL]     (default: $EDGEPIPE_WHEEL, else build one)
# Prints "wheel: N passed, N failed"; exits non-zero when anything failed.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
started=$SECONDS
quiet() { grep -v -e 'is ignored: it is neither' -e '^$' || true; }  # pip's noise about /opt/wheels

wheel="${1:-${EDGEPIPE_WHEEL:-}}"
if [ -z "$wheel" ]; then
    wheel="$(scripts/build-wheel.sh)" || { echo "wheel: 0 passed, 1 failed (the build failed)"; exit 1; }
fi
[ -f "$wheel" ] || { echo "wheel: $wheel not found"; echo "wheel: 0 passed, 1 failed"; exit 1; }
wheel="$(cd "$(dirname "$wheel")" && pwd)/$(basename "$wheel")"
sdist="${wheel%-py3-none-any.whl}.tar.gz"

host_py=""
for p in .venv-device/bin/python .venv/bin/python; do
    if [ -x "$p" ]; then host_py="$root/$p"; break; fi
done
[ -n "$host_py" ] || { echo "wheel: no .venv-device or .venv; run scripts/setup-env.sh all" >&2; exit 1; }
base_py="$("$host_py" -c 'import sys; print(sys._base_executable)')"

# The venv is keyed on what the wheel asks for with [device] and on the Python.
key="$("$host_py" - "$wheel" "$base_py" <<'EOF'
import hashlib, subprocess, sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
deps = sorted(l for l in meta.splitlines() if l.startswith("Requires-Dist:")
              and ("extra ==" not in l or 'extra == "device"' in l))
ver = subprocess.run([sys.argv[2], "-VV"], capture_output=True, text=True).stdout
print(hashlib.sha256("\n".join(deps + [sys.argv[2], ver]).encode()).hexdigest()[:16])
EOF
)"
venv="$root/.cache/wheel-test/venv-$key"
vpy="$venv/bin/python"
if [ ! -f "$venv/.complete" ]; then
    echo "wheel: creating the test venv (first run for this dependency set: downloads the [device] wheels)"
    rm -rf "$root/.cache/wheel-test"
    mkdir -p "$root/.cache/wheel-test"
    "$base_py" -m venv "$venv" || exit 1
    "$vpy" -m pip install -q "$wheel[device]" 2>&1 | quiet
    [ "${PIPESTATUS[0]}" = 0 ] || { echo "wheel: 0 passed, 1 failed (pip could not install the wheel)"; exit 1; }
    touch "$venv/.complete"
fi
# Always the wheel just built; [device] again so its dependency metadata is exercised.
"$vpy" -m pip uninstall -q -y edgepipe 2>&1 | quiet
"$vpy" -m pip install -q "$wheel[device]" 2>&1 | quiet
[ "${PIPESTATUS[0]}" = 0 ] || { echo "wheel: 0 passed, 1 failed (pip could not install the wheel)"; exit 1; }

tmp="$(mktemp -d "${TMPDIR:-/tmp}/edgepipe-wheel.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
work="$tmp/work"
mkdir -p "$work" "$tmp/home"
passed=0 failed=0
# check NAME CMD...: run CMD in the empty folder with a clean environment (the
# venv's bin first on PATH, HOME in the temp folder); print its output on failure.
check() {
    local name="$1" rc=0
    shift
    (cd "$work" && env -u PYTHONPATH -u VIRTUAL_ENV -u PYTHONHOME HOME="$tmp/home" \
        PATH="$venv/bin:/usr/bin:/bin" timeout 120 "$@") >"$tmp/out" 2>&1 || rc=$?
    if [ "$rc" = 0 ]; then
        passed=$((passed + 1)); echo "wheel: ok    $name"
    else
        failed=$((failed + 1)); echo "wheel: FAIL  $name (exit $rc)"; tail -n 20 "$tmp/out" | sed 's/^/    /'
    fi
}

check "artefacts: wheel and sdist carry LICENSE, README, schemas, example specs, systemd unit" \
    "$host_py" - "$wheel" "$sdist" "$root" <<'EOF'
import os, sys, tarfile, tomllib, zipfile
z = zipfile.ZipFile(sys.argv[1]); names = set(z.namelist())
dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
tops = {n.split("/")[0] for n in names} - {dist_info}
assert tops == {"edgepipe"}, f"wheel top-level entries: {sorted(tops)}"
need = [f"{dist_info}/licenses/LICENSE", "edgepipe/device/schemas/bundle.schema.json",
        "edgepipe/device/schemas/report.schema.json", "edgepipe/examples/ablate/mobilenet_v2.toml",
        "edgepipe/deploy/systemd/edgerun-agent.service", "edgepipe/sample_data/imagenet_labels.txt"]
missing = [n for n in need if n not in names]
assert not missing, f"wheel lacks {missing}"
assert "Apache License" in z.read(f"{dist_info}/licenses/LICENSE").decode()
assert "## Install" in z.read(f"{dist_info}/METADATA").decode(), "README is not the wheel's description"
assert not [n for n in names if "__pycache__" in n], "wheel carries __pycache__"
# Every committed file of every folder mapped into the namespace ships (a subpackage
# left out of pyproject's explicit package list would silently vanish from the wheel).
# Committed (git ls-files), so files still being written in the tree do not count.
import subprocess
os.chdir(sys.argv[3])
cfg = tomllib.load(open("pyproject.toml", "rb"))["tool"]["setuptools"]
for pkg, folder in cfg["package-dir"].items():
    tracked = subprocess.run(["git", "ls-files", "-z", "--", folder], capture_output=True,
                             check=True).stdout.decode().split("\0")
    lacking = [f for f in tracked if f and os.path.isfile(f) and
               pkg.replace(".", "/") + "/" + os.path.relpath(f, folder) not in names]
    assert not lacking, f"wheel lacks {lacking} (pyproject: packages, package-data)"
t = {n.split("/", 1)[-1] for n in tarfile.open(sys.argv[2]).getnames()}
need = ["LICENSE", "README.md", "pyproject.toml", "device/schemas/report.schema.json",
        "examples/ablate/mobilenet_v2.toml", "deploy/systemd/edgerun-agent.service"]
missing = [n for n in need if n not in t]
assert not missing, f"sdist lacks {missing}"
EOF

check "installed: only 'edgepipe' at the top level, code and data from the venv, no TensorFlow" \
    python - "$venv" <<'EOF'
import importlib.util, sys
from importlib.metadata import distribution
from importlib.resources import files
venv = sys.argv[1]
d = distribution("edgepipe")
tops = {p.parts[0] for p in d.files if p.parts[0] != ".." and not p.parts[0].endswith(".dist-info")}
assert tops == {"edgepipe"}, f"installed top-level names: {sorted(tops)}"
assert d.read_text("top_level.txt").split() == ["edgepipe"], d.read_text("top_level.txt")
import edgepipe.device, edgepipe.pipeline
for m in (edgepipe.device, edgepipe.pipeline):
    assert m.__file__.startswith(venv), f"{m.__name__} comes from {m.__file__}"
images = files("edgepipe.sample_data") / "images"
assert sum(1 for p in images.iterdir() if p.name.endswith(".jpg")) >= 10, "sample images missing"
assert (files("edgepipe.sample_data") / "imagenet_labels.txt").read_text().count("\n") >= 999
assert (files("edgepipe.device") / "schemas" / "report.schema.json").is_file()
assert (files("edgepipe.examples") / "ablate" / "fashion_mnist_recipes.toml").is_file()
assert (files("edgepipe.deploy") / "systemd" / "edgerun-agent.service").is_file()
assert importlib.util.find_spec("tensorflow") is None, "TensorFlow is installed"
try:
    import tensorflow  # noqa: F401
except ImportError:
    pass
else:
    raise AssertionError("import tensorflow worked in the [device] venv")
EOF

# A bundle in the empty folder: a committed tiny model, its manifest written by the installed package.
check "bundle: manifest written by the installed edgepipe.device" \
    python -c 'import sys; sys.path.append(sys.argv[1]); from pathlib import Path
from bundle_factory import make_bundle
make_bundle(Path("."), "int8_float_io.tflite", "tiny-int8", "int8")' "$root/tests"
images="$("$vpy" -c 'from importlib.resources import files; print(files("edgepipe.sample_data") / "images")')"

check "edgerun info" edgerun info
check "edgerun bench BUNDLE" sh -c 'edgerun bench tiny-int8 --runs 20 --warmup 2 --min-secs 0 --out bench.json \
    && python -c "import json; r = json.load(open(\"bench.json\")); assert r[\"kind\"] == \"bench\", r[\"kind\"]"'
check "edgerun run BUNDLE --source (installed sample images)" sh -c 'edgerun run tiny-int8 --source "$1" \
    --max-frames 4 --out preds.jsonl && test "$(grep -c "{" preds.jsonl)" = 4' sh "$images"

# The shadowing bug: a user's own device/ and pipeline/ on PYTHONPATH must not matter.
for pkg in device pipeline; do
    mkdir -p "$work/$pkg"
    echo "raise ImportError('decoy $pkg package imported')" > "$work/$pkg/__init__.py"
    echo "raise ImportError('decoy $pkg.cli imported')" > "$work/$pkg/cli.py"
done
check "decoy device/ and pipeline/ with PYTHONPATH=.: edgerun info, run; edgepipe --version" sh -c '
    export PYTHONPATH=.
    python -c "import device" 2>&1 | grep -q "decoy device package" || { echo "the decoy is not on the path"; exit 1; }
    edgerun info && edgerun run tiny-int8 --source "$1" --max-frames 2 --sequential >/dev/null \
        && edgepipe --version' sh "$images"

size="$(du -k "$wheel" | cut -f1)"
echo "wheel: $passed passed, $failed failed in $((SECONDS - started))s ($(basename "$wheel"), $((size / 1024)).$(( (size % 1024) * 10 / 1024 )) MB)"
[ "$failed" = 0 ]
