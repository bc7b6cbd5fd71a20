"""The detection section of the HTML report: annotated frames next to detection accuracy and latency.

Rows (pipeline/reporting.row) carry a run's ``detections`` block and an eval's
detection accuracy. Per model family the section shows each recipe's
agreement with the float model (precision, recall, mean IoU; mAP when the data
had box labels) beside the latency and FPS of its runs, then a few annotated
frames: JPEGs a run wrote with ``--annotate`` into a folder on this machine, or
evenly spaced stills of its annotated MP4 (with OpenCV), downscaled and
embedded (the page stays one self-contained file).
"""
from __future__ import annotations

import base64
import io
from html import escape as esc
from pathlib import Path
from typing import List, Optional

MAX_FRAMES = 4
FRAME_WIDTH = 384
MAX_FRAME_BYTES = 20 << 20


def _num(v, fmt: str = "{:.3f}") -> str:
    return fmt.format(v) if isinstance(v, (int, float)) else "-"


def _frames(folder: str) -> List[str]:
    """Up to MAX_FRAMES annotated JPEGs of a folder as data URIs (downscaled; unreadable ones skipped)."""
    from PIL import Image

    p = Path(folder)
    if not p.is_dir():
        return []
    out = []
    for f in sorted(p.glob("*.jpg"))[:MAX_FRAMES]:
        try:
            if f.stat().st_size > MAX_FRAME_BYTES:
                continue
            with Image.open(f) as im:
                out.append(_data_uri(im))
        except OSError:
            continue
    return out


def _video_frames(path: str) -> List[str]:
    """Up to MAX_FRAMES evenly spaced frames of an annotated MP4 as data URIs (needs OpenCV)."""
    try:
        import cv2
    except ImportError:
        return []
    from PIL import Image

    cap = cv2.VideoCapture(str(path))
    try:
        n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        out = []
        for i in range(MAX_FRAMES if n >= MAX_FRAMES else n):
            cap.set(cv2.CAP_PROP_POS_FRAMES, int(i * n / MAX_FRAMES))
            ok, frame = cap.read()
            if ok:
                out.append(_data_uri(Image.fromarray(frame[:, :, ::-1])))
        return out
    finally:
        cap.release()


def _data_uri(im) -> str:
    im = im.convert("RGB")
    if im.width > FRAME_WIDTH:
        im = im.resize((FRAME_WIDTH, round(im.height * FRAME_WIDTH / im.width)))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _accuracy_rows(rows: list) -> list:
    evals = [r for r in rows if r.get("kind") == "eval" and r.get("detection")]
    runs = {}
    for r in rows:
        if r.get("kind") == "run" and r.get("detections"):
            runs.setdefault((r["model"], r["recipe"]), r)  # rows are newest first
    body = []
    for e in evals:
        d = e["detection"]
        run = runs.get((e["model"], e["recipe"]), {})
        body.append([esc(e["model"]), esc(e["recipe"]), _num(d.get("precision")), _num(d.get("recall")),
                     _num(d.get("mean_iou")), _num(d.get("map50")), _num(d.get("map50_95")),
                     _num(run.get("p50"), "{:.1f}"), _num(run.get("fps"), "{:.1f}")])
    return body


def _gallery(rows: list) -> str:
    return "".join(_gallery_entry(r) for r in rows)


def _gallery_entry(r: dict) -> str:
    """One report's annotated frames (stills from a video, or the JPEG folder), or ""."""
    block = r.get("detections") or {}
    ann = block.get("annotated") or {}
    if not ann.get("path"):
        return ""
    title = f"{esc(r['model'])} ({esc(r['recipe'])}) on {esc(r.get('source') or '?')}"
    found = (f"{block.get('boxes', 0)} boxes in {block.get('frames', 0)} frames, classes "
             + esc(", ".join(f"{k} {v}" for k, v in (block.get("classes") or {}).items()) or "none"))
    video = ann.get("kind") != "images"
    uris = _video_frames(ann["path"]) if video and Path(ann["path"]).is_file() else (
        [] if video else _frames(ann["path"]))
    imgs = "".join(f'<img src="{u}" alt="annotated frame" style="max-width:{FRAME_WIDTH}px;margin:4px">'
                   for u in uris)
    where = f"; annotated video <code>{esc(str(ann['path']))}</code> ({ann.get('frames')} frames)" if video else ""
    if not (imgs or video):
        return ""
    return f"<h3>{title}</h3><p class=\"muted\">{found}{where}</p><div>{imgs}</div>"


def section(rows: list) -> str:
    """The section's HTML, or "" when no report holds detections."""
    from edgepipe.pipeline.views import table

    body = _accuracy_rows(rows)
    gallery = _gallery(rows)
    if not body and not gallery:
        return ""
    parts = ['<section id="detection"><h2>Detection: accuracy, latency and annotated frames</h2>']
    if body:
        parts.append('<p class="muted">Precision, recall and mean IoU of each variant\'s boxes against the '
                     "float model's (same class, IoU &ge; 0.5); mAP against box labels when the data had them; "
                     "p50 and FPS of the latest run of that variant.</p>")
        parts.append(table(["model", "recipe", "precision", "recall", "mean IoU", "mAP@.5", "mAP@.5:.95",
                            "run p50 ms", "FPS"], body))
    parts.append(gallery)
    parts.append("</section>")
    return "".join(parts)


def row_fields(report) -> dict:
    """The detection fields of a report's flat row (reporting.row adds them)."""
    acc = getattr(report, "accuracy", None) or {}
    detection: Optional[dict] = None
    if acc.get("task") == "detection":
        agr = acc.get("agreement") or {}
        detection = {k: agr.get(k) for k in ("precision", "recall", "mean_iou", "matched", "reference")}
        detection.update(map50=acc.get("map50"), map50_95=acc.get("map50_95"))
    extra = getattr(report, "extra", None) or {}
    return {"detection": detection, "detections": extra.get("detections")}


__all__ = ["row_fields", "section"]
