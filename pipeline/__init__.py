"""edgepipe host side: conversion, evaluation, fleet benchmarking and reports."""
from edgepipe.device import __version__  # one version for the whole distribution

__all__ = ["__version__"]
