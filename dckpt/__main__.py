"""``python -m dckpt``: the same command line as the ``dckpt`` console script."""

from __future__ import annotations

from dckpt.cli._commands import main

if __name__ == "__main__":
    main()
