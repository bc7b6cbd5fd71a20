"""Reports as text for a person: the few-line summary and the threads x delegate comparison table."""
from __future__ import annotations

from typing import List, Optional

LOAD_STAGES = ("file_read", "interpreter_build", "delegate", "allocate", "first_invoke")


def _ms(v: Optional[float]) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 100 else f"{v:.0f}"


def _model_line(m: dict) -> str:
    size = m.get("size") or 0
    recipe = f", recipe {m['recipe']}" if m.get("recipe") else ""
    human = f"{size / 1e6:.2f} MB" if size >= 100_000 else f"{size / 1e3:.1f} KB"
    return f"model      {m.get('name')}{recipe}, {human}"


def _runtime_line(rt: dict) -> str:
    thr = rt.get("threads")
    return (f"runtime    {rt.get('backend')} {rt.get('version') or ''}, delegate {rt.get('delegate')}, "
            f"threads {thr if thr is not None else 'default'}, {rt.get('load') or 'cold'} load")


def _measure_lines(r: dict) -> List[str]:
    """Load stages, delegated ops, latency and throughput: each line only when measured."""
    lines = []
    ld = r.get("load_ms") or {}
    if ld:
        lines.append("load (ms)  " + " | ".join(f"{k.replace('_', ' ')} {_ms(ld.get(k))}" for k in LOAD_STAGES))
    fb = (r.get("settings") or {}).get("cpu_fallback")
    if fb and fb.get("total_ops"):
        names = ", ".join(f"{k} x{v}" for k, v in sorted((fb.get("cpu_op_names") or {}).items()))
        lines.append(f"ops        {fb['delegated_ops']} of {fb['total_ops']} on {fb['delegate']}, "
                     f"{fb['cpu_ops']} on the CPU" + (f" ({names})" if names else ""))
    return lines + _speed_lines(r)


def _speed_lines(r: dict) -> List[str]:
    lines = []
    lat = r.get("latency_ms")
    if lat and lat.get("n"):
        lines.append(f"latency    n={lat['n']}  mean {_ms(lat['mean'])}  std {_ms(lat['std'])}  min {_ms(lat['min'])}"
                     f"  p50 {_ms(lat['p50'])}  p90 {_ms(lat['p90'])}  p99 {_ms(lat['p99'])}  max {_ms(lat['max'])} ms")
    tp = r.get("throughput") or {}
    if tp.get("fps"):
        rss = r.get("peak_rss_mb")
        unit = "frames/s end to end" if r.get("kind") == "run" else "inferences/s"
        lines.append(f"throughput {tp['fps']:.1f} {unit}" + (f", peak RSS {rss:.0f} MB" if rss else ""))
    return lines


def _device_line(dev: dict) -> str:
    temps = dev.get("temperature_c") or {}
    bits = [dev.get("board") or dev.get("cpu") or "", f"{dev.get('cores')} cores"]
    if dev.get("governor"):
        bits.append(f"governor {dev['governor']}")
    if temps.get("start") is not None:
        bits.append(f"{temps['start']:.1f} -> {temps['end'] if temps.get('end') is None else round(temps['end'], 1)} C")
    return "device     " + ", ".join(b for b in bits if b)


def _input_lines(inp: dict) -> List[str]:
    lines = []
    if inp:
        count = f" ({inp['count']} images)" if inp.get("kind") == "images" and inp.get("count") else ""
        lines.append(f"input      {inp.get('kind')}{count}"
                     + (f", seed {inp['seed']}" if inp.get("seed") is not None and inp.get("kind") == "random" else ""))
    lines.extend(f"assumed    {a}" for a in inp.get("assumed") or ())
    return lines


def format_summary(r: dict) -> str:
    """A few aligned lines a person can read at a glance."""
    lines = [_model_line(r.get("model", {})), _runtime_line(r.get("runtime", {}))]
    lines += _measure_lines(r)
    lines.append(_device_line(r.get("device", {})))
    lines += _input_lines(r.get("input") or {})
    lines.extend(f"warning    {w}" for w in r.get("warnings") or ())
    lines.extend(f"error      {e}" for e in r.get("errors") or ())
    return "\n".join(lines)


def format_comparison(reports: List[dict]) -> str:
    """One row per report (threads x delegate), for ``--threads 1,2,4`` style runs."""
    head = f"{'delegate':<10} {'threads':>7} {'p50 ms':>9} {'mean ms':>9} {'p90 ms':>9} {'fps':>8} {'cold ms':>9}"
    rows = [head, "-" * len(head)]
    for r in reports:
        rt, lat = r.get("runtime", {}), r.get("latency_ms") or {}
        ld = r.get("load_ms") or {}
        cold = sum(v for v in ld.values() if isinstance(v, (int, float))) if ld else None
        fps = (r.get("throughput") or {}).get("fps")
        thr = rt.get("threads")
        rows.append(f"{str(rt.get('delegate')):<10} {str(thr if thr is not None else 'dflt'):>7} "
                    f"{_ms(lat.get('p50')):>9} {_ms(lat.get('mean')):>9} {_ms(lat.get('p90')):>9} "
                    f"{(f'{fps:.1f}' if fps else '-'):>8} {_ms(cold):>9}")
    return "\n".join(rows)
