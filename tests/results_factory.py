"""Stored results like the demo's: six recipes on two boards, evaluations, video and photo runs.

Real report documents (edgepipe.device.report.new_report), valid against the
contract, so the collector accepts them; p50s span 1.7..166 ms like the demo.
"""
from __future__ import annotations

import datetime as _dt

from edgepipe.device.report import new_report

P50 = {"fp32": 11.0, "fp16": 11.2, "dynamic": 9.5, "int8": 1.7, "int8-io": 1.8, "int16x8": 166.0}
ACC = {"fp32": (0.72, 1.0), "fp16": (0.72, 0.998), "dynamic": (0.71, 0.985), "int8": (0.70, 0.96),
       "int8-io": (0.69, 0.955), "int16x8": (0.72, 0.995)}
DEVICES = ({"hostname": "lab-pi5", "id": "pi5-0a1b2c3d4e5f", "name": "pi5-bench", "tags": ["lab"],
            "board": "Raspberry Pi 5 Model B Rev 1.0", "governor": "performance"},
           {"hostname": "raspberrypi", "board": "Raspberry Pi 4 Model B Rev 1.4", "governor": "ondemand"})
SCALE = (1.0, 2.6)  # the Pi 4 is slower


def stats(p50: float, n: int = 30) -> dict:
    return {"n": n, "mean": p50 * 1.03, "std": p50 * 0.05, "min": p50 * 0.9, "p50": p50, "p90": p50 * 1.12,
            "p99": p50 * 1.3, "max": p50 * 1.6}


def sha(recipe: str) -> str:
    return (recipe.encode().hex() * 64)[:64]


def bench(device: dict, recipe: str, p50: float, threads: int = 4) -> dict:
    return new_report("bench", device=dict(device),
                      runtime={"backend": "ai_edge_litert", "version": "2.3.0", "delegate": "xnnpack",
                               "threads": threads, "load": "cold"},
                      model={"name": f"mobilenet_v2-{recipe}", "recipe": recipe, "sha256": sha(recipe),
                             "size": 3_500_000 if "int" in recipe else 14_000_000},
                      load_ms={"file_read": 1.0, "interpreter_build": 9.0, "delegate": 3.0, "allocate": 2.0,
                               "first_invoke": 2 * p50},
                      latency_ms=stats(p50), throughput={"fps": 1000 / p50, "mode": "sequential", "frames": 30})


def evaluation(recipe: str) -> dict:
    top1, agree = ACC[recipe]
    r = new_report("eval", device={"hostname": "workstation"},
                   runtime={"backend": "ai_edge_litert", "delegate": "cpu", "threads": None},
                   model={"name": f"mobilenet_v2-{recipe}", "recipe": recipe, "sha256": sha(recipe),
                          "size": 3_500_000})
    r["accuracy"] = {"top1": top1, "agreement": {"top1_agreement": agree}, "images": 32}
    return r


def run(device: dict, source_kind: str, source: str, e2e: float) -> dict:
    stages = {"capture": stats(e2e * 0.3), "preprocess": stats(e2e * 0.15), "invoke": stats(e2e * 0.45),
              "postprocess": stats(e2e * 0.1)}
    return new_report("run", device=dict(device),
                      runtime={"backend": "ai_edge_litert", "version": "2.3.0", "delegate": "xnnpack", "threads": 4,
                               "load": "cold"},
                      model={"name": "mobilenet_v2-int8", "recipe": "int8", "sha256": sha("int8"), "size": 3_500_000},
                      latency_ms=stats(e2e), stages_ms=stages,
                      throughput={"fps": 1000 / e2e, "mode": "pipelined", "workers": 2, "frames": 60},
                      input={"kind": source_kind, "source": source, "live": False})


def at(report: dict, days_ago: float) -> dict:
    when = _dt.datetime.now(_dt.timezone.utc) - _dt.timedelta(days=days_ago)
    report["created"] = when.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return report


def demo_reports() -> list:
    """Every report of a demo-like session, oldest first."""
    out = []
    for dev, scale in zip(DEVICES, SCALE):
        for recipe, p50 in P50.items():
            for days, slower in ((3, 1.25), (2, 1.2), (1, 1.02)):  # older, slower results...
                out.append(at(bench(dev, recipe, round(p50 * scale * slower, 3)), days))
            out.append(bench(dev, recipe, round(p50 * scale, 3)))        # ...and the latest
    out += [evaluation(recipe) for recipe in P50]
    out.append(run(DEVICES[0], "video", "sample_data/video/vtest_short.avi", 9.0))
    out.append(run(DEVICES[0], "images", "sample_data/images", 14.0))
    return out
