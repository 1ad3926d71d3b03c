"""Hugging Face ``transformers.Trainer`` and Accelerate checkpoints through dckpt.

- :class:`DckptTrainer` (or :class:`DckptTrainerMixin` in front of another ``Trainer``
  subclass): every ``checkpoint-<step>`` directory the Trainer writes is a dckpt
  checkpoint holding the model, optimizer, scheduler, gradient scaler and each rank's RNG
  states, beside the Trainer's own ``trainer_state.json`` and the model's
  ``config.json``. ``resume_from_checkpoint`` loads it back (older checkpoints written by
  the plain Trainer still load the usual way).
- :func:`save_state` / :func:`load_state`: ``accelerator.save_state(dir)`` /
  ``accelerator.load_state(dir)`` through dckpt.

Keys follow the module's parameter names (``model.<fqn>``,
``optimizer.state.<fqn>.exp_avg``, ...), so
``dckpt convert checkpoint-500 hf-out --to hf --prefix model.`` gives Hugging Face
weights; with the checkpoint's ``config.json`` and ``generation_config.json`` copied
beside them, ``from_pretrained("hf-out")`` loads them.
"""

from __future__ import annotations

import logging
import os
import random
from typing import Any

import numpy as np
import torch
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

import dckpt

__all__ = [
    "DckptTrainer",
    "DckptTrainerMixin",
    "is_dckpt_checkpoint",
    "load_state",
    "save_state",
]

log = logging.getLogger("dckpt")


def is_dckpt_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a committed dckpt checkpoint directory.

    Args:
        path: a local directory.

    Returns:
        True when its ``manifest.json`` exists.

    Example:
        >>> is_dckpt_checkpoint("out/checkpoint-500")  # doctest: +SKIP
        True
    """
    return os.path.isfile(os.path.join(os.fspath(path), "manifest.json"))


class DckptTrainerMixin:
    """Makes a ``transformers.Trainer`` save and resume its checkpoints through dckpt.

    Put it first among the bases: ``class MyTrainer(DckptTrainerMixin, SFTTrainer)``. It
    changes where the checkpoint's model, optimizer, scheduler, scaler and RNG states go
    (one collective dckpt save per checkpoint, every rank writing its part, instead of
    ``model.safetensors``, ``optimizer.pt``, ``scheduler.pt`` and ``rng_state*.pth``);
    everything else, naming, ``save_total_limit`` rotation, ``trainer_state.json`` and
    callbacks, stays the Trainer's. ``trainer.save_model()`` called by the user still
    writes ordinary Hugging Face weights.

    Attributes:
        dckpt_timeout: seconds a collective save or load waits for the other ranks.

    Example:
        >>> from dckpt.integrations.hf import DckptTrainer
        >>> trainer = DckptTrainer(model=model, args=args, train_dataset=ds)  # doctest: +SKIP
        >>> trainer.train(resume_from_checkpoint=True)  # doctest: +SKIP
    """

    dckpt_timeout: float = 600.0
    _dckpt_skip_files = False

    # Attributes of transformers.Trainer, for type checkers.
    args: Any
    state: Any
    model: Any
    optimizer: Any
    lr_scheduler: Any
    accelerator: Any
    processing_class: Any

    # -- saving -----------------------------------------------------------------------

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """Write ``checkpoint-<step>`` as a dckpt checkpoint, then let the Trainer add its
        JSON state and rotate old checkpoints (collective: every rank calls it)."""
        run_dir = self._get_output_dir(trial=trial)  # type: ignore[attr-defined]
        output_dir = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        dckpt.save(
            self._dckpt_state(training=not self.args.save_only_model),
            output_dir,
            overwrite=True,
            timeout=self.dckpt_timeout,
        )
        self._dckpt_skip_files = True
        try:
            super()._save_checkpoint(model, trial)  # type: ignore[misc]
        finally:
            self._dckpt_skip_files = False

    def _dckpt_state(self, *, training: bool) -> dict[str, Any]:
        state: dict[str, Any] = {"model": self.model}
        if not training:
            return state
        return {**state, **self._dckpt_training_parts(), "rng": rng_state()}

    def _dckpt_training_parts(self) -> dict[str, Any]:
        """The optimizer, scheduler and scaler the Trainer holds, keyed as saved."""
        parts: dict[str, Any] = {}
        if self.optimizer is not None:
            parts["optimizer"] = dckpt.OptimizerState(self.model, _unwrap_optimizer(self.optimizer))
        if self.lr_scheduler is not None:
            parts["scheduler"] = self.lr_scheduler
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None:
            parts["scaler"] = scaler
        return parts

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """As ``Trainer.save_model``; inside a checkpoint, only the model's config and
        the processing class are written (the weights are in the dckpt checkpoint)."""
        if not self._dckpt_skip_files:
            super().save_model(output_dir, _internal_call)  # type: ignore[misc]
            return
        if not self.args.should_save or output_dir is None:
            return
        # What from_pretrained needs beside the weights, once converted: config.json and
        # generation_config.json, as model.save_pretrained writes them.
        for part in ("config", "generation_config"):
            config = getattr(self.model, part, None)
            if config is not None and hasattr(config, "save_pretrained"):
                config.save_pretrained(output_dir)
        if self.processing_class is not None and hasattr(self.processing_class, "save_pretrained"):
            self.processing_class.save_pretrained(output_dir)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self._dckpt_skip_files:
            super()._save_optimizer_and_scheduler(output_dir)  # type: ignore[misc]

    def _save_scaler(self, output_dir: str) -> None:
        if not self._dckpt_skip_files:
            super()._save_scaler(output_dir)  # type: ignore[misc]

    def _save_rng_state(self, output_dir: str) -> None:
        if not self._dckpt_skip_files:
            super()._save_rng_state(output_dir)  # type: ignore[misc]

    # -- loading ----------------------------------------------------------------------

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        if not is_dckpt_checkpoint(resume_from_checkpoint):
            super()._load_from_checkpoint(resume_from_checkpoint, model)  # type: ignore[misc]
            return
        target = self.model if model is None else model
        dckpt.load({"model": target}, resume_from_checkpoint, timeout=self.dckpt_timeout)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None or not is_dckpt_checkpoint(checkpoint):
            super()._load_optimizer_and_scheduler(checkpoint)  # type: ignore[misc]
            return
        state = self._dckpt_training_parts()
        # Not strict: a checkpoint saved with save_only_model has none of these, and the
        # Trainer then starts them fresh, as it does without optimizer.pt.
        result = dckpt.load(state, checkpoint, strict=False, timeout=self.dckpt_timeout)
        if result.missing_keys:
            log.warning(
                "%s holds no state for %s; they start fresh",
                checkpoint,
                ", ".join(sorted({k.split(".")[0] for k in result.missing_keys})),
            )

    def _load_scaler(self, checkpoint: str | None) -> None:
        if checkpoint is None or not is_dckpt_checkpoint(checkpoint):
            super()._load_scaler(checkpoint)  # type: ignore[misc]
        # A dckpt checkpoint's scaler was loaded with the optimizer.

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if checkpoint is None or not is_dckpt_checkpoint(checkpoint):
            super()._load_rng_state(checkpoint)  # type: ignore[misc]
            return
        holder: dict[str, Any] = {"rng": {}}
        try:
            dckpt.load(holder, checkpoint, strict=False, timeout=self.dckpt_timeout)
        except dckpt.StateMismatchError as exc:
            # Per-rank states under another world size: as the Trainer does without an
            # RNG file for this process, go on without them.
            log.info(
                "RNG states of %s not restored (%s); reproducibility is not guaranteed",
                checkpoint,
                exc,
            )
            return
        if holder["rng"]:
            set_rng_state(holder["rng"])

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best is None or not is_dckpt_checkpoint(best):
            super()._load_best_model()  # type: ignore[misc]
            return
        log.info("loading the best model from %s (score: %s)", best, self.state.best_metric)
        dckpt.load({"model": self.model}, best, timeout=self.dckpt_timeout)


class DckptTrainer(DckptTrainerMixin, Trainer):
    """``transformers.Trainer`` whose checkpoints are dckpt checkpoints.

    Takes exactly ``Trainer``'s arguments; see :class:`DckptTrainerMixin` for what
    changes.

    Example:
        >>> from transformers import TrainingArguments
        >>> from dckpt.integrations.hf import DckptTrainer
        >>> args = TrainingArguments("out", save_steps=500)  # doctest: +SKIP
        >>> DckptTrainer(model=model, args=args, train_dataset=ds).train()  # doctest: +SKIP
    """


# -- Accelerate ------------------------------------------------------------------------


def save_state(
    accelerator: Any, output_dir: str | os.PathLike[str], *, timeout: float = 600.0
) -> str:
    """``accelerator.save_state(output_dir)`` as one dckpt checkpoint.

    Saves what Accelerate's own ``save_state`` does: every prepared model, optimizer and
    scheduler, stateful data loaders, objects registered with
    ``accelerator.register_for_checkpointing``, the gradient scaler, the step counter and
    each rank's RNG states. Collective: every process calls it.

    Args:
        accelerator: the ``accelerate.Accelerator`` the objects were prepared with.
        output_dir: the checkpoint directory (replaced if it holds one).
        timeout: seconds to wait for the other ranks.

    Returns:
        ``output_dir`` as a string.

    Raises:
        dckpt.UnsupportedStateError: an optimizer holds parameters of several models
            (dckpt names optimizer state by the owning model's parameter names).
        dckpt.CheckpointError: the save failed on any rank.

    Example:
        >>> from dckpt.integrations.hf import save_state, load_state
        >>> save_state(accelerator, "ckpt/step-100")  # doctest: +SKIP
        >>> load_state(accelerator, "ckpt/step-100")  # doctest: +SKIP
    """
    path = os.fspath(output_dir)
    state = _accelerator_state(accelerator)
    state["step"] = int(accelerator.step)
    state["rng"] = rng_state()
    dckpt.save(state, path, overwrite=True, timeout=timeout)
    return path


def load_state(
    accelerator: Any,
    input_dir: str | os.PathLike[str],
    *,
    strict: bool = True,
    timeout: float = 600.0,
) -> dckpt.LoadResult:
    """``accelerator.load_state(input_dir)`` from a checkpoint written by :func:`save_state`.

    Loads in place into the objects prepared with ``accelerator`` (which must be the same
    kinds, in the same order, as when saving), then restores the step counter and this
    rank's RNG states (skipped, with a log line, under another world size).

    Args:
        accelerator: the ``accelerate.Accelerator`` with the objects to restore.
        input_dir: the checkpoint directory.
        strict: every key of the objects must be in the checkpoint, with the same shape
            and dtype.
        timeout: seconds to wait for the other ranks.

    Returns:
        What did not match (empty unless ``strict=False``).

    Raises:
        dckpt.CheckpointNotFoundError: no committed checkpoint at ``input_dir``.
        dckpt.StateMismatchError: with ``strict``, the objects do not match the checkpoint.
        dckpt.CheckpointError: the load failed on any rank.

    Example:
        >>> model, opt = accelerator.prepare(model, opt)  # doctest: +SKIP
        >>> load_state(accelerator, "ckpt/step-100")  # doctest: +SKIP
        LoadResult(missing_keys=(), unexpected_keys=(), mismatched_keys=())
    """
    path = os.fspath(input_dir)
    state = _accelerator_state(accelerator)
    state["step"] = None
    result = dckpt.load(state, path, strict=strict, timeout=timeout)
    if state["step"] is not None:
        accelerator.step = int(state["step"])
    holder: dict[str, Any] = {"rng": {}}
    try:
        dckpt.load(holder, path, strict=False, timeout=timeout)
    except dckpt.StateMismatchError as exc:
        log.info("RNG states of %s not restored (%s)", path, exc)
    else:
        if holder["rng"]:
            set_rng_state(holder["rng"])
    return result


def _accelerator_state(accelerator: Any) -> dict[str, Any]:
    # Accelerate keeps what it prepared in these lists (its own save_state reads them).
    state: dict[str, Any] = {}
    for i, model in enumerate(getattr(accelerator, "_models", [])):
        state[f"model_{i}"] = accelerator.unwrap_model(model)
    for i, opt in enumerate(getattr(accelerator, "_optimizers", [])):
        # The plain optimizer: dckpt pairs it with the model above that owns its parameters.
        state[f"optimizer_{i}"] = _unwrap_optimizer(opt)
    for i, sched in enumerate(getattr(accelerator, "_schedulers", [])):
        state[f"scheduler_{i}"] = sched
    for i, loader in enumerate(getattr(accelerator, "_dataloaders", [])):
        if getattr(loader, "use_stateful_dataloader", False):
            state[f"dataloader_{i}"] = loader
    for i, obj in enumerate(getattr(accelerator, "_custom_objects", [])):
        state[f"custom_{i}"] = obj
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None:
        state["scaler"] = scaler
    return state


def _unwrap_optimizer(optimizer: Any) -> Any:
    """Accelerate's ``AcceleratedOptimizer`` wraps the real one in ``.optimizer``."""
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


# -- RNG states ------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """This process's Python, NumPy, torch CPU (and CUDA) RNG states, as dckpt stores them.

    Returns:
        A dict of plain values and tensors; ranks whose states differ get per-rank
        entries in the checkpoint.

    Example:
        >>> state = rng_state()
        >>> sorted(state)[:3]
        ['cpu', 'numpy', 'python']
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "cpu": torch.random.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.random.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore states taken by :func:`rng_state`.

    Args:
        state: as :func:`rng_state` returned it, after a save and load.

    Raises:
        KeyError: ``state`` lacks one of the generators :func:`rng_state` records.

    Example:
        >>> import torch
        >>> saved = rng_state()
        >>> a = torch.rand(2)
        >>> set_rng_state(saved)
        >>> torch.equal(a, torch.rand(2))
        True
    """
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.random.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.random.set_rng_state(state["cuda"])
