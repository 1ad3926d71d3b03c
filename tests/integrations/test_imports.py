"""``import dckpt`` never loads the integrations, nor do they load a trainer until asked."""

from __future__ import annotations

import json
import subprocess
import sys

TRAINERS = ("torchtitan", "lightning", "pytorch_lightning", "transformers", "accelerate")

CODE = f"""
import json, sys
def loaded():
    return sorted(m for m in sys.modules
                  if m.split('.')[0] in {TRAINERS!r} or m.startswith('dckpt.integrations'))
import dckpt
after_dckpt = loaded()
import dckpt.integrations
print(json.dumps([after_dckpt, loaded()]))
"""


def test_import_dckpt_loads_no_integration_and_no_trainer() -> None:
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, check=True)
    after_dckpt, after_package = json.loads(out.stdout)
    assert after_dckpt == []
    assert after_package == ["dckpt.integrations"]  # the docstring-only package, no trainer
