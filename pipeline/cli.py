"""`edgepipe`: the workstation command line."""
from __future__ import annotations

import click

from device import __version__
from device.lazycli import LazyGroup

COMMANDS = {
    "convert": "pipeline.cli_convert:convert",
    "evaluate": "pipeline.cli_evaluate:evaluate",
    "ablate": "pipeline.cli_ablate:ablate",
    "serve": "pipeline.cli_serve:serve",
    "bench": "pipeline.cli_fleet:bench",
    "report": "pipeline.cli_report:report",
}


@click.group(cls=LazyGroup, lazy=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgepipe")
def main():
    """Convert, quantize, deploy and measure TensorFlow models on edge devices."""


if __name__ == "__main__":
    main()
