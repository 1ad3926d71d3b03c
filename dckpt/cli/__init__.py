"""The ``dckpt`` command line: a thin shell over the library."""

from __future__ import annotations

from dckpt.cli._commands import cli, main

__all__ = ["cli", "main"]
