"""The registry of checkpoint formats, and the one place that decides which a storage holds.

A format is a :class:`CheckpointFormat` entry: a name, a sniff, and an ``open`` that
returns its reader (``dckpt._loadcore.FormatReader``). dckpt's own format is registered
here, first; the façade (``dckpt._api``) registers torch DCP's from ``dckpt.interop``, so
the engine never imports interop. A new format is one module that defines its entry plus
one :func:`register_format` line in the façade.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from dckpt._format import MANIFEST_NAME
from dckpt._loadcore import FormatReader
from dckpt._reader import CheckpointReader
from dckpt.storage import Storage

__all__ = ["DCKPT_FORMAT", "CheckpointFormat", "detect_format", "format_of", "register_format"]


@dataclass(frozen=True)
class CheckpointFormat:
    """One entry of the format registry.

    ``sniff`` says whether a storage holds this format; it may raise when the storage
    cannot be reached. ``open`` reads and validates the format's index and returns its
    reader. ``phase`` names a load's two coordinator phases (``<phase>-plan`` and
    ``<phase>-read``), which errors and fault points carry."""

    name: str
    phase: str
    sniff: Callable[[Storage], bool]
    open: Callable[[Storage], FormatReader]


def _has_manifest(storage: Storage) -> bool:
    return storage.size(MANIFEST_NAME) is not None


DCKPT_FORMAT = CheckpointFormat("dckpt", "load", _has_manifest, CheckpointReader.open)

# Tried in order, the first whose sniff says yes wins: so a later format's sniff may
# assume every earlier one said no (DCP's need not check that no manifest.json is there).
_FORMATS: list[CheckpointFormat] = [DCKPT_FORMAT]


def register_format(fmt: CheckpointFormat) -> None:
    """Add ``fmt`` to detection, after the formats already registered; once per name."""
    if all(f.name != fmt.name for f in _FORMATS):
        _FORMATS.append(fmt)


def detect_format(storage: Storage) -> CheckpointFormat | None:
    """The registered format ``storage`` holds, or None when no sniff recognises it.

    A sniff that raises (an unreachable store) ends the search with None: opening the
    fallback then meets the same failure and reports it, collectively in a load."""
    for fmt in _FORMATS:
        try:
            if fmt.sniff(storage):
                return fmt
        except Exception:
            return None
    return None


def format_of(storage: Storage) -> CheckpointFormat:
    """:func:`detect_format`'s answer, or dckpt's format when nothing is recognised: its
    ``open`` then says what is there instead (nothing, an uncommitted save, ...)."""
    return detect_format(storage) or DCKPT_FORMAT
