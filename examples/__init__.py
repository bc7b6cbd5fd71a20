"""Example specs shipped with edgepipe (``ablate/*.toml``); data only."""
