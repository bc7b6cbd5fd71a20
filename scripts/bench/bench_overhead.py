#!/usr/bin/env python
"""`edgerun bench` overhead: its p50 against a bare ``interpreter.invoke()`` loop.

Both sides run the same MobileNetV2 bundle with the same thread count and
alternate A/B for many short rounds, so drifting machine load hits both
equally. Printed: the median of the per-round ratios (each round's edgerun
p50 over the bare p50 measured right before it; target <= 1.02), and the
ratio of the median per-round p50s.
Default mode: one process holds a bare ``Interpreter(model_path=...)`` and a
``edgepipe.device.runtime.load_model`` model side by side and alternates a bare loop
with ``edgepipe.device.bench.run_bench`` (what `edgerun bench` runs), which removes
process-to-process variance. ``--cli`` instead runs the `edgerun bench`
command and a bare-loop script as fresh processes per round (noisier).
No assertion: this machine is shared and noisy, the figure is for the README.

    .venv-device/bin/python scripts/bench/bench_overhead.py               # builds bundles if missing
    .venv-device/bin/python scripts/bench/bench_overhead.py --bundles out/ --recipes int8

Bundles are ``<DIR>/mobilenet_v2-<recipe>/`` as written by ``edgepipe convert``;
when missing they are built with ``.venv/bin/edgepipe convert`` into the cache
(``$EDGEPIPE_CACHE`` or ``<repo>/.cache/edgepipe``) first.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EDGEPIPE = ROOT / ".venv" / "bin" / "edgepipe"

# Both child programs feed the bare interpreter the same seeded input and warm it
# up the same way, without any edgepipe code in between.
FEED = """d = it.get_input_details()[0]
    rng = np.random.default_rng(0)
    if np.issubdtype(d["dtype"], np.integer):
        info = np.iinfo(d["dtype"])
        x = rng.integers(info.min, int(info.max) + 1, size=d["shape"], dtype=d["dtype"])
    else:
        x = rng.uniform(-1, 1, size=d["shape"]).astype(d["dtype"])
    it.set_tensor(d["index"], x)
    for _ in range(warmup):
        it.invoke()"""

BARE = textwrap.dedent("""
    import sys, time, json
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter
    path, threads, runs, warmup = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    it = Interpreter(model_path=path, num_threads=threads if threads > 0 else None)
    it.allocate_tensors()
    {FEED}
    inv, clock, out = it.invoke, time.perf_counter_ns, []
    for _ in range(runs):
        t0 = clock(); inv(); out.append(clock() - t0)
    out.sort()
    n = len(out)
    p50 = (out[(n - 1) // 2] + out[n // 2]) / 2e6
    print(json.dumps({"p50": p50}))
""".replace("{FEED}", FEED))


def cache_root() -> Path:
    return Path(os.environ.get("EDGEPIPE_CACHE", ROOT / ".cache" / "edgepipe"))


def ensure_bundles(directory: Path, recipes, name: str = "mobilenet_v2") -> dict:
    """``{recipe: bundle_dir}``, converting the sample MobileNetV2 for any that is missing."""
    want = {r: directory / f"{name}-{r}" for r in recipes}
    missing = [r for r, p in want.items() if not (p / "manifest.json").exists()]
    if missing:
        if not EDGEPIPE.exists():
            sys.exit(f"bundles missing in {directory} and {EDGEPIPE} not found: build them with edgepipe convert")
        print(f"building {', '.join(missing)} bundle(s) into {directory} (one-off, takes a minute) ...", flush=True)
        model = subprocess.run([str(EDGEPIPE), "samples", "build", "mobilenet_v2"], capture_output=True, text=True,
                               cwd=ROOT, check=True, env={**os.environ, "EDGEPIPE_CACHE": str(cache_root())}
                               ).stdout.strip().splitlines()[-1]
        cmd = [str(EDGEPIPE), "convert", model, "--recipes", ",".join(missing), "--out", str(directory),
               "--calib", str(ROOT / "sample_data" / "images"), "--name", name,
               "--labels", str(ROOT / "sample_data" / "imagenet_labels.txt")]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if res.returncode != 0:
            sys.exit(f"edgepipe convert failed: {res.stderr.strip()[-500:]}")
    return want


def bare_p50(model: Path, threads: int, runs: int, warmup: int) -> float:
    out = subprocess.run([sys.executable, "-c", BARE, str(model), str(threads), str(runs), str(warmup)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["p50"]


def edgerun_p50(bundle: Path, threads: int, runs: int, warmup: int) -> float:
    cmd = [sys.executable, "-m", "edgepipe.device.cli", "bench", str(bundle), "--runs", str(runs),
           "--warmup", str(warmup), "--min-secs", "0", "--json"]
    if threads > 0:
        cmd += ["--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        sys.exit(f"edgerun bench failed: {out.stderr.strip()}")
    return json.loads(out.stdout)["latency_ms"]["p50"]


INPROC = textwrap.dedent("""
    import sys, time, json
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter
    from edgepipe.device.bench import run_bench
    from edgepipe.device.runtime import load_model
    bundle = sys.argv[1]
    threads, runs, warmup, rounds = (int(a) for a in sys.argv[2:6])
    thr = threads if threads > 0 else None
    it = Interpreter(model_path=bundle + "/model.tflite", num_threads=thr)
    it.allocate_tensors()
    ours = load_model(bundle + "/model.tflite", threads=thr)
    {FEED}
    inv, clock = it.invoke, time.perf_counter_ns
    bare, edge = [], []
    for r in range(rounds):
        out = []
        for _ in range(runs):
            t0 = clock(); inv(); out.append(clock() - t0)
        out.sort()
        bare.append((out[(runs - 1) // 2] + out[runs // 2]) / 2e6)
        rep = run_bench(bundle, threads=thr, runs=runs, warmup=warmup if r == 0 else 0, min_secs=0, loaded=ours)
        edge.append(rep["latency_ms"]["p50"])
    print(json.dumps({"bare": bare, "edgerun": edge}))
""".replace("{FEED}", FEED))


def inprocess(bundle: Path, threads: int, runs: int, warmup: int, rounds: int):
    out = subprocess.run([sys.executable, "-c", INPROC, str(bundle), str(threads), str(runs), str(warmup),
                          str(rounds)], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        sys.exit(f"in-process bench failed: {out.stderr.strip()[-800:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    return res["bare"], res["edgerun"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundles", type=Path, default=None, help="Folder holding mobilenet_v2-<recipe>/ bundles.")
    ap.add_argument("--recipes", default="fp32,int8")
    ap.add_argument("--threads", type=int, default=1, help="0 = the runtime's default.")
    ap.add_argument("--runs", type=int, default=30, help="Timed invokes per side per round.")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=None,
                    help="Alternating A/B rounds per bundle (default 40 in-process, 5 with --cli).")
    ap.add_argument("--cli", action="store_true", help="Fresh processes per round: the edgerun command itself.")
    args = ap.parse_args(argv)
    directory = args.bundles or cache_root() / "bench-bundles"
    bundles = ensure_bundles(directory, [r.strip() for r in args.recipes.split(",") if r.strip()])
    rounds = args.rounds or (5 if args.cli else 40)
    mode = "fresh processes (edgerun bench CLI vs bare script)" if args.cli else "one process, alternating"
    print(f"mode: {mode}; threads={args.threads or 'default'} runs/round={args.runs} warmup={args.warmup} "
          f"rounds={rounds} (cores: {os.cpu_count()})")
    print(f"{'bundle':<22} {'bare p50 ms':>12} {'edgerun p50 ms':>15} {'ratio':>7} {'paired':>7}")
    ratios = []
    for recipe, bundle in bundles.items():
        if args.cli:
            bare, ours = [], []
            for _ in range(rounds):
                bare.append(bare_p50(bundle / "model.tflite", args.threads, args.runs, args.warmup))
                ours.append(edgerun_p50(bundle, args.threads, args.runs, args.warmup))
        else:
            bare, ours = inprocess(bundle, args.threads, args.runs, args.warmup, rounds)
        b, o = statistics.median(bare), statistics.median(ours)
        paired = statistics.median(y / x for x, y in zip(bare, ours))
        ratios.append(paired)
        spread = lambda v: f"{min(v):.2f}..{max(v):.2f}"  # noqa: E731
        print(f"{bundle.name:<22} {b:>12.3f} {o:>15.3f} {o / b:>7.3f} {paired:>7.3f}   "
              f"(round p50s: bare {spread(bare)}, edgerun {spread(ours)})")
    print(f"edgerun bench p50 / bare invoke p50 (median paired ratio): worst {max(ratios):.3f}, target <= 1.02")
    return 0


if __name__ == "__main__":
    sys.exit(main())
