#!/usr/bin/env python
"""Process start to first result: `edgerun run <int8 bundle> --source IMAGE` until its first prediction line.

Measures the wall time from spawning the process to reading the first JSON
line on its stdout (target <= 0.3 s), repeated and summarized by the median,
next to two floors measured in the same run: a bare interpreter start
(`python -c pass`) and `import numpy` (the device side cannot avoid it). Also
prints the in-process breakdown (imports, bundle, load, preprocess, invoke)
so a regression points at its stage. No assertion (shared, noisy machine).

    .venv-device/bin/python scripts/bench/first_result.py [--bundles DIR] [--repeats 7]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_overhead import ROOT, cache_root, ensure_bundles  # noqa: E402

IMAGE = ROOT / "sample_data" / "images" / "apple.jpg"

BREAKDOWN = textwrap.dedent("""
    import time, json, sys
    c = time.perf_counter
    t = [c()]
    import numpy
    t.append(c())
    from edgepipe.device.runtime import get_backend, load_model
    get_backend()
    t.append(c())
    from edgepipe.device.bundle import load_bundle
    b = load_bundle(sys.argv[1])
    t.append(c())
    m = load_model(b.model_path)
    t.append(c())
    from edgepipe.device.preprocess import load_image, to_model_input
    pre = b.manifest.preprocess
    x = to_model_input(load_image(sys.argv[2], pre), pre, m.inputs[0])
    t.append(c())
    m.set_input(0, x); m.invoke(); y = m.get_output(0)
    t.append(c())
    names = ["import numpy", "import runtime", "load_bundle (sha256 verify)", "load_model", "preprocess", "invoke"]
    print(json.dumps({n: (t[i + 1] - t[i]) * 1e3 for i, n in enumerate(names)}))
""")


def time_to_first_line(cmd) -> float:
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT)
    line = p.stdout.readline()
    t1 = time.perf_counter()
    p.stdout.read()
    p.wait()
    if p.returncode != 0 or not line.strip():
        sys.exit(f"command failed ({p.returncode}): {' '.join(map(str, cmd))}")
    return t1 - t0


def wall(cmd) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundles", type=Path, default=None)
    ap.add_argument("--recipe", default="int8")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    bundle = ensure_bundles(args.bundles or cache_root() / "bench-bundles", [args.recipe])[args.recipe]
    py = sys.executable
    run = [py, "-m", "edgepipe.device.cli", "run", str(bundle), "--source", str(IMAGE), "--max-frames", "1", "-q"]
    time_to_first_line(run)  # page cache warm-up, not counted
    firsts, bare, numpy_ = [], [], []
    for _ in range(args.repeats):  # interleaved so load drift hits all three alike
        bare.append(wall([py, "-c", "pass"]))
        numpy_.append(wall([py, "-c", "import numpy"]))
        firsts.append(time_to_first_line(run))
    med = statistics.median
    print(f"bundle {bundle.name}, image {IMAGE.name}, {args.repeats} repeats (median, min..max)")
    print(f"  python -c pass            {med(bare):6.3f} s  ({min(bare):.3f}..{max(bare):.3f})")
    print(f"  python -c 'import numpy'  {med(numpy_):6.3f} s  ({min(numpy_):.3f}..{max(numpy_):.3f})")
    print(f"  edgerun run -> 1st result {med(firsts):6.3f} s  ({min(firsts):.3f}..{max(firsts):.3f})")
    out = subprocess.run([py, "-c", BREAKDOWN, str(bundle), str(IMAGE)], capture_output=True, text=True, cwd=ROOT)
    if out.returncode == 0:
        parts = json.loads(out.stdout.strip().splitlines()[-1])
        print("  in-process breakdown (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in parts.items()))
    print(f"process start to first result: {med(firsts):.3f} s, {med(firsts) / 0.3:.2f} x the 0.3 s target")
    return 0


if __name__ == "__main__":
    sys.exit(main())
