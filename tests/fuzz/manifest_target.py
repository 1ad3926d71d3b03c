"""Coverage-guided fuzzing of the manifest parser and value decoder (atheris / libFuzzer).

Run by ``tests/test_faults.py`` for a bounded number of inputs; by hand for longer:
``python tests/fuzz/manifest_target.py -max_total_time=600``. Any exception other than a
``CheckpointError`` is a crash that libFuzzer reports with the input that caused it.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["dckpt"]):  # not torch: too big to instrument
    from dckpt._errors import CheckpointError
    from dckpt._format import manifest_from_bytes
    from dckpt._values import decode_value

SEED = (Path(__file__).parent.parent / "golden" / "v1" / "manifest.json").read_bytes()


def one_input(data: bytes) -> None:
    try:
        manifest = manifest_from_bytes(data, source="fuzz")
    except CheckpointError:
        pass
    else:
        for key, entry in manifest.values.items():
            with contextlib.suppress(CheckpointError):
                decode_value(entry.value, key)
    with contextlib.suppress(ValueError, RecursionError, UnicodeDecodeError, CheckpointError):
        decode_value(json.loads(data), "fuzz")


def main() -> None:
    corpus = Path(sys.argv[-1]) if len(sys.argv) > 1 and Path(sys.argv[-1]).is_dir() else None
    if corpus is not None and not any(corpus.iterdir()):
        (corpus / "golden").write_bytes(SEED)
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
