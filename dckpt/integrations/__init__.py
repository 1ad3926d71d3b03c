"""Glue between dckpt and the trainers people use; nothing here is imported by ``import dckpt``.

- :mod:`dckpt.integrations.torchtitan`: ``DckptCheckpointManager``, a torchtitan
  checkpoint manager (``pip install 'dckpt[torchtitan]'``).
- :mod:`dckpt.integrations.lightning`: ``DckptCheckpointIO`` and strategies for
  PyTorch Lightning (``pip install 'dckpt[lightning]'``).
- :mod:`dckpt.integrations.hf`: ``DckptTrainer`` for ``transformers.Trainer`` and
  ``save_state``/``load_state`` for Accelerate (``pip install 'dckpt[hf]'``).

Each module imports its trainer package at the top, so importing one without that
package installed fails with ``ModuleNotFoundError``. See ``docs/integrations.md``.
"""
