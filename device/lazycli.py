"""A click group whose subcommands are imported only when invoked.

Keeps `--help` and light commands fast (no TensorFlow or runtime import at
start-up) and lets each command live in its own small module.
"""
from __future__ import annotations

import importlib

import click


class LazyGroup(click.Group):
    """``lazy`` maps a command name to ``"package.module:attribute"``."""

    def __init__(self, *args, lazy: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._lazy = dict(lazy or {})

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(self._lazy))

    def invoke(self, ctx):
        from edgepipe.device.errors import EdgepipeError

        try:
            return super().invoke(ctx)
        except EdgepipeError as e:  # an expected failure a command did not catch: still one line
            from edgepipe.device.cliout import fail

            name = ctx.invoked_subcommand
            raise fail(e, self.get_command(ctx, name) if name else None) from None

    def get_command(self, ctx, name):
        if name in self._lazy:
            module, attr = self._lazy[name].split(":")
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)
