"""`edgerun`: the device-side command line."""
from __future__ import annotations

import click

from edgepipe.device import __version__
from edgepipe.device.lazycli import LazyGroup

COMMANDS = {
    "info": "edgepipe.device.cli_bench:info",
    "bench": "edgepipe.device.cli_bench:bench",
    "run": "edgepipe.device.cli_run:run",
    "flush": "edgepipe.device.cli_agent:flush",
    "agent": "edgepipe.device.cli_agent:agent",
}


@click.group(cls=LazyGroup, lazy=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgerun")
def main():
    """Run edgepipe bundles on this device and measure them honestly."""


if __name__ == "__main__":
    main()
