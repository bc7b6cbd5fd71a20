"""`edgepipe`: the workstation command line."""
from __future__ import annotations

import click

from edgepipe.device import __version__
from edgepipe.device.lazycli import LazyGroup

COMMANDS = {
    "convert": "edgepipe.pipeline.cli_convert:convert",
    "evaluate": "edgepipe.pipeline.cli_evaluate:evaluate",
    "ablate": "edgepipe.pipeline.cli_ablate:ablate",
    "serve": "edgepipe.pipeline.cli_serve:serve",
    "bench": "edgepipe.pipeline.cli_fleet:bench",
    "devices": "edgepipe.pipeline.cli_devices:devices",
    "report": "edgepipe.pipeline.cli_report:report",
    "samples": "edgepipe.pipeline.cli_samples:samples",
}


@click.group(cls=LazyGroup, lazy=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgepipe")
def main():
    """Convert, quantize, deploy and measure TensorFlow models on edge devices."""


if __name__ == "__main__":
    main()
