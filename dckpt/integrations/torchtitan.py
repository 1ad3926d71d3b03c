"""A torchtitan checkpoint manager that saves and loads through dckpt.

torchtitan's trainer builds its checkpointer from ``config.checkpoint``; pointing that at
:class:`DckptCheckpointManager.Config` swaps DCP for dckpt without touching the trainer::

    from dckpt.integrations.torchtitan import DckptCheckpointManager

    config.checkpoint = DckptCheckpointManager.Config(enable=True, interval=500)

The state has torchtitan's layout: model FQNs at the top level, then ``optimizer``,
``lr_scheduler``, ``dataloader`` and the trainer's own states (``train_state``), so keys
line up with the DCP checkpoints torchtitan writes and an existing one loads through
``initial_load_path``. Steps live under ``<dump_folder>/<folder>/step-<n>`` and are
managed by :class:`dckpt.CheckpointManager` (retention, atomic commits, async saves).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn as nn
from torchtitan.components.checkpointer import (
    DATALOADER,
    LR_SCHEDULER,
    MODEL,
    OPTIMIZER,
    BaseCheckpointManager,
    ModelWrapper,
)
from torchtitan.config import TORCH_DTYPE_MAP
from torchtitan.tools import filesystem

import dckpt

__all__ = ["MODEL_ONLY_KEY", "DckptCheckpointManager"]

log = logging.getLogger("dckpt")

MODEL_ONLY_KEY = "dckpt_model_only"
"""Top-level value saved (True) in model-only checkpoints: a final export or a seed."""

_STEP = re.compile(r"^step-(\d+)$")
_ASYNC_MODES = ("disabled", "async", "async_with_pinned_mem")


class _Delegate:
    """Hands a Stateful's state to dckpt as a plain Stateful.

    torchtitan's ``OptimizersContainer`` subclasses ``torch.optim.Optimizer``; dckpt would
    otherwise re-key it through torch's optimizer helpers, which need the module in the
    same state. Its own ``state_dict`` is already flat and FQN-keyed, as DCP saves it.
    """

    def __init__(self, target: Any) -> None:
        self.target = target

    def state_dict(self) -> dict[str, Any]:
        return dict(self.target.state_dict())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.target.load_state_dict(state_dict)


class DckptCheckpointManager(BaseCheckpointManager):
    """torchtitan's checkpointer, backed by :class:`dckpt.CheckpointManager`.

    Built by torchtitan's trainer from ``config.checkpoint`` with the keywords below. Saves
    every ``interval`` steps (and at ``last_step``), keeps the newest ``keep_latest_k``
    (0: all), resumes from the newest committed step (or ``load_step``), otherwise from
    ``initial_load_path`` (a dckpt checkpoint or one of torchtitan's DCP step
    directories). The final save is model-only in ``export_dtype`` when
    ``last_save_model_only``, plus Hugging Face safetensors through ``sd_adapter`` in
    ``<folder>/step-<n>-hf`` when ``last_save_in_hf``. ``async_mode`` other than
    ``"disabled"`` makes interval saves return once the state is copied to host memory;
    the write and commit run in the background.

    Args:
        config: the checkpoint section of torchtitan's config.
        dataloader: the trainer's stateful data loader (its per-rank position is saved).
        model_parts: the model, or its pipeline stages.
        optimizers: torchtitan's ``OptimizersContainer``.
        lr_schedulers: torchtitan's ``LRSchedulersContainer``.
        states: further Stateful objects by key (the trainer passes ``train_state``);
            updated in place with the four above, as torchtitan's managers do.
        sd_adapter: converts model state dicts to Hugging Face names (for
            ``last_save_in_hf``).
        base_folder: the trainer's dump folder; ``config.folder`` is relative to it.

    Raises:
        dckpt.ArgumentError: ``last_save_in_hf`` without ``sd_adapter``, an HF save to an
            object store, or a ``folder`` that holds torchtitan DCP steps (dckpt's
            manager would not resume from them).

    Example:
        >>> from dckpt.integrations.torchtitan import DckptCheckpointManager
        >>> config.checkpoint = DckptCheckpointManager.Config(  # doctest: +SKIP
        ...     enable=True, interval=100, keep_latest_k=3, async_mode="async"
        ... )
    """

    @dataclass(kw_only=True, slots=True)
    class Config(BaseCheckpointManager.Config):
        """torchtitan's shared checkpoint options, plus dckpt's.

        ``async_mode``: ``"disabled"``, or ``"async"`` / ``"async_with_pinned_mem"`` (the
        same for dckpt: it stages into reusable host buffers). ``timeout``: seconds a
        collective save or load waits for the other ranks before raising
        :class:`dckpt.CheckpointTimeoutError`.
        """

        async_mode: Literal["disabled", "async", "async_with_pinned_mem"] = "disabled"
        """disabled: saves block; async: they return once staged in host memory."""

        timeout: float = 600.0
        """Seconds a collective save or load waits for the other ranks."""

        def __post_init__(self) -> None:
            BaseCheckpointManager.Config.__post_init__(self)
            mode = self.async_mode.lower()
            if mode not in _ASYNC_MODES:
                raise dckpt.ArgumentError(
                    f"checkpoint.async_mode must be one of {', '.join(_ASYNC_MODES)}, "
                    f"got {self.async_mode!r}"
                )
            self.async_mode = mode  # type: ignore[assignment]
            if self.timeout <= 0:
                raise dckpt.ArgumentError(f"checkpoint.timeout must be > 0, got {self.timeout!r}")

    def __init__(
        self,
        config: Config,
        *,
        dataloader: Any,
        model_parts: list[nn.Module],
        optimizers: Any,
        lr_schedulers: Any,
        states: dict[str, Any],
        sd_adapter: Any,
        base_folder: str = "",
    ) -> None:
        self.enable = config.enable
        self.save_future: Future[None] | None = None
        if not self.enable:
            return
        self.folder = filesystem.join(base_folder, config.folder)
        self.interval = config.interval
        self.states = states
        self.states.update(
            {
                MODEL: ModelWrapper(model_parts),
                OPTIMIZER: optimizers,
                DATALOADER: dataloader,
                LR_SCHEDULER: lr_schedulers,
            }
        )
        self.load_only = config.load_only
        self.exclude_from_loading = list(config.exclude_from_loading)
        self.initial_load_path = config.initial_load_path
        self.initial_load_model_only = config.initial_load_model_only
        self.initial_load_in_hf = config.initial_load_in_hf
        self.enable_first_step_checkpoint = config.enable_first_step_checkpoint
        self.last_save_model_only = config.last_save_model_only
        self.last_save_in_hf = config.last_save_in_hf
        self.export_dtype: torch.dtype = TORCH_DTYPE_MAP[config.export_dtype]
        self.sd_adapter = sd_adapter
        self.timeout = config.timeout
        self._check_options()
        self.async_mode = config.async_mode
        self._manager = dckpt.CheckpointManager(
            self.folder,
            keep_last=config.keep_latest_k or None,
            async_save=self.async_mode != "disabled",
            timeout=self.timeout,
        )
        log.info("dckpt checkpointing active under %s", self.folder)

    def _check_options(self) -> None:
        """Refuse what cannot work, before anything is saved."""
        if self.last_save_in_hf and self.sd_adapter is None:
            raise dckpt.ArgumentError(
                "checkpoint.last_save_in_hf is True but the model has no sd_adapter to name "
                "its weights the Hugging Face way; set last_save_in_hf=False"
            )
        if self.last_save_in_hf and filesystem.is_remote(self.folder):
            raise dckpt.ArgumentError(
                f"checkpoint.last_save_in_hf writes local safetensors files, but "
                f"checkpoint.folder is {self.folder!r}; use a local folder or "
                "last_save_in_hf=False"
            )
        foreign = _dcp_steps(self.folder)
        if foreign:
            raise dckpt.ArgumentError(
                f"checkpoint.folder {self.folder!r} holds torch DCP checkpoints "
                f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}) written by "
                "torchtitan's own CheckpointManager; dckpt's manager would not resume from "
                "them. To switch, set checkpoint.initial_load_path "
                f"to the step to resume from (e.g. {filesystem.join(self.folder, foreign[-1])}), "
                "checkpoint.initial_load_model_only=False, and a new checkpoint.folder"
            )

    # -- saving -----------------------------------------------------------------------

    def _should_save(self, curr_step: int, last_step: bool) -> bool:
        if self.load_only:
            return False
        if curr_step == 1 and self.enable_first_step_checkpoint:
            return True
        return last_step or curr_step % self.interval == 0

    @torch.no_grad()
    def _save(self, curr_step: int, last_step: bool = False) -> bool:
        """Save ``curr_step`` if the interval (or ``last_step``) asks for it.

        Args:
            curr_step: the step just trained.
            last_step: the final step of training: saved whatever the interval, and
                model-only (in ``export_dtype``) when ``last_save_model_only``.

        Returns:
            Whether a checkpoint was saved (or, in async mode, staged).

        Raises:
            dckpt.CheckpointError: the save failed, or the previous async save did.
        """
        if not self._should_save(curr_step, last_step):
            return False
        self.maybe_wait_for_saving()
        model_only = last_step and self.last_save_model_only
        state = self._model_export() if model_only else self._full_state()
        self._manager.save(curr_step, state)
        if self._manager.async_save:
            if last_step:
                # The final checkpoint is complete when training returns, as with DCP.
                self._manager.wait()
            else:
                self.save_future = Future()
        if model_only and self.last_save_in_hf:
            self._save_hf(curr_step, {k: v for k, v in state.items() if k != MODEL_ONLY_KEY})
        return True

    def _model_export(self) -> dict[str, Any]:
        """The model alone, floating-point tensors cast to ``export_dtype``."""
        model: dict[str, Any] = {
            k: v.to(self.export_dtype)
            if isinstance(v, torch.Tensor) and v.is_floating_point()
            else v
            for k, v in self.states[MODEL].state_dict().items()
        }
        model[MODEL_ONLY_KEY] = True
        return model

    def _save_hf(self, step: int, model: dict[str, Any]) -> None:
        """Weights under Hugging Face names, as sharded safetensors in ``step-<n>-hf``."""
        hf = self.sd_adapter.to_hf(model)
        out = filesystem.join(self.folder, f"step-{step}-hf")
        staging = filesystem.join(self.folder, f".step-{step}-hf.staging")
        dckpt.save(hf, staging, overwrite=True, timeout=self.timeout)
        failure = [""]
        if _rank() == 0:
            partial = f"{out}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            try:
                dckpt.convert(staging, partial, to="hf")
                shutil.rmtree(out, ignore_errors=True)
                os.replace(partial, out)
            except Exception as exc:  # reported on every rank below
                failure[0] = f"{type(exc).__name__}: {exc}"
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        # Rank 0's outcome, so that no rank waits on a failed export (and all raise).
        if dist.is_available() and dist.is_initialized():
            dist.broadcast_object_list(failure, src=0)
        if failure[0]:
            raise dckpt.CheckpointError(
                f"step {step} was saved, but writing its Hugging Face safetensors to {out} "
                f"failed on rank 0: {failure[0]}"
            )

    def _full_state(self) -> dict[str, Any]:
        return self._flatten({k: v for k, v in self.states.items() if v is not None})

    def _flatten(self, states: dict[str, Any]) -> dict[str, Any]:
        """torchtitan's layout: model FQNs at the top level, other states by key."""
        out: dict[str, Any] = {}
        for key, value in states.items():
            if key == MODEL:
                continue
            out[key] = _Delegate(value) if isinstance(value, torch.optim.Optimizer) else value
        if MODEL in states:
            out.update(states[MODEL].state_dict())
        return out

    # -- loading ----------------------------------------------------------------------

    @torch.no_grad()
    def _load(self, step: int = -1) -> bool:
        """Resume from ``step`` (-1: the newest committed one), else ``initial_load_path``.

        Args:
            step: the step to load, or -1 for the newest. A model-only step (step 0, a
                seed) restores the model alone.

        Returns:
            Whether anything was loaded (False: a fresh start).

        Raises:
            dckpt.CheckpointNotFoundError: ``step`` (or ``initial_load_path``) holds no
                committed checkpoint.
            dckpt.CheckpointError: the chosen step is a model-only final export, which
                cannot resume training; or the load failed.
            dckpt.ArgumentError: ``initial_load_in_hf`` (not supported: convert the
                weights with ``dckpt convert`` first), or an ``exclude_from_loading`` key
                that is not in the state.
        """
        target = self._manager.latest_step() if step == -1 else step
        if target is None:
            return self._initial_load()
        path = self._manager.path_of(target)
        if target not in self._manager.steps():
            raise dckpt.CheckpointNotFoundError(
                f"checkpoint.load_step={target}: no committed checkpoint at {path}; "
                f"committed steps: {self._manager.steps() or 'none'}"
            )
        model_only = target == 0 or self._is_model_only(path)
        if model_only and target != 0:
            raise dckpt.CheckpointError(
                f"{path} is the model-only checkpoint saved at the end of training "
                "(checkpoint.last_save_model_only), so it cannot resume training; to train "
                "on from its weights, set checkpoint.initial_load_path to it with a new "
                "checkpoint.folder, or set checkpoint.last_save_model_only=False next time"
            )
        state = self._states_to_load(model_only)
        self._manager.load(state, step=target)
        self._restore_model(state)
        log.info("loaded step %d from %s", target, path)
        return True

    def _initial_load(self) -> bool:
        if not self.initial_load_path:
            if self.initial_load_in_hf:
                raise dckpt.ArgumentError(
                    "checkpoint.initial_load_in_hf is not supported by dckpt's manager; "
                    "convert the weights first (dckpt convert HF_DIR DST --to dckpt) and "
                    "load them by name through a state_dict adapter, or use torchtitan's "
                    "own CheckpointManager for the first run"
                )
            return False
        if self.initial_load_in_hf:
            raise dckpt.ArgumentError(
                "checkpoint.initial_load_in_hf is not supported by dckpt's manager; point "
                "checkpoint.initial_load_path at a dckpt or DCP checkpoint instead"
            )
        state = self._states_to_load(self.initial_load_model_only)
        dckpt.load(state, self.initial_load_path, timeout=self.timeout)
        self._restore_model(state)
        log.info("loaded %s", self.initial_load_path)
        return True

    def _is_model_only(self, path: str) -> bool:
        # A value-only load reads the manifest alone: no tensor data.
        probe: dict[str, Any] = {MODEL_ONLY_KEY: False}
        dckpt.load(probe, path, strict=False, timeout=self.timeout)
        return probe[MODEL_ONLY_KEY] is True

    def _states_to_load(self, model_only: bool) -> dict[str, Any]:
        if model_only:
            return dict(self.states[MODEL].state_dict())
        for key in self.exclude_from_loading:
            if key not in self.states:
                raise dckpt.ArgumentError(
                    f"checkpoint.exclude_from_loading names {key!r}, which is not in the "
                    f"state; the state holds {', '.join(sorted(self.states))}"
                )
        return self._flatten(
            {
                k: v
                for k, v in self.states.items()
                if k not in self.exclude_from_loading and v is not None
            }
        )

    def _restore_model(self, state: dict[str, Any]) -> None:
        # The load wrote into the model's own tensors; this refreshes what a state-dict
        # hook computes, as torchtitan's managers do.
        self.states[MODEL].load_state_dict(state)

    # -- waiting and closing ----------------------------------------------------------

    def _maybe_wait_for_staging(self) -> None:
        """Nothing to wait for: dckpt's async save returns once staging is done."""

    def _wait_for_saving(self) -> None:
        """Block until the in-flight async save has committed and retention has run.

        Raises:
            dckpt.CheckpointError: that save failed (the manager stays usable).
        """
        future, self.save_future = self.save_future, None
        try:
            self._manager.wait()
        except BaseException as exc:
            if future is not None:
                future.set_exception(exc)
            raise
        if future is not None:
            future.set_result(None)

    def _close(self) -> None:
        """Not collective, so that a failing rank can close alone: an async save still in
        flight is finished by :func:`dckpt.wait` at exit, or by ``maybe_wait_for_saving``."""


def _dcp_steps(folder: str) -> list[str]:
    """The ``step-<n>`` directories of ``folder`` that hold a DCP checkpoint, by step."""
    if not filesystem.isdir(folder):
        return []
    found = []
    for name in filesystem.listdir(folder):
        m = _STEP.match(name)
        if not m:
            continue
        step_dir = filesystem.join(folder, name)
        if filesystem.isfile(filesystem.join(step_dir, ".metadata")) and not filesystem.isfile(
            filesystem.join(step_dir, "manifest.json")
        ):
            found.append((int(m.group(1)), name))
    return [name for _, name in sorted(found)]


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
