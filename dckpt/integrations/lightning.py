"""PyTorch Lightning checkpoints through dckpt.

- :class:`DckptCheckpointIO`: a ``CheckpointIO`` plugin for strategies that use one
  (single device, DDP): ``Trainer(plugins=[DckptCheckpointIO()])``. Rank 0 writes the
  whole checkpoint; every rank reads it.
- :class:`DckptModelParallelStrategy`: Lightning's ``ModelParallelStrategy`` (FSDP2 and
  tensor parallelism), whose sharded save and load call torch DCP directly and bypass
  ``CheckpointIO``; this subclass routes them through dckpt, every rank writing and
  reading only its own shards.

A Lightning checkpoint ``epoch=0-step=100.ckpt`` becomes a dckpt checkpoint directory of
that name. Its keys are Lightning's (``state_dict.<fqn>``, ``optimizer_states.0.state...``,
``loops...``), so ``dckpt convert PATH weights.safetensors --prefix state_dict.`` extracts
the weights.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.pytorch.strategies import ModelParallelStrategy

import dckpt

__all__ = ["DckptCheckpointIO", "DckptModelParallelStrategy"]

# Saved beside Lightning's keys: what a load needs to rebuild the checkpoint dict.
META_KEY = "dckpt_lightning"
_MODEL, _OPTIMIZERS = "state_dict", "optimizer_states"
_groups: dict[int, Any] = {}


class DckptCheckpointIO(CheckpointIO):
    """Saves Lightning checkpoints as dckpt checkpoints; loads them back as dicts.

    Lightning calls ``save_checkpoint`` on rank 0 only and ``load_checkpoint`` on every
    rank, so each call runs in this process alone (under DDP, in a one-rank process
    group). The loaded tensors are on the CPU; Lightning copies them into the model and
    optimizers, wherever those live.

    Args:
        allow_pickle: store values that are not plain data (numbers, strings, lists and
            dicts of them, tensors) as pickles, e.g. unusual ``hyper_parameters``; loading
            them then needs ``allow_pickle=True`` too. Off by default: a checkpoint
            without pickles cannot run code when loaded.
        durable: fsync the data before the commit (``False`` for scratch runs).
        timeout: seconds a save or load may take before
            :class:`dckpt.CheckpointTimeoutError`.

    Example:
        >>> import lightning.pytorch as pl  # doctest: +SKIP
        >>> from dckpt.integrations.lightning import DckptCheckpointIO
        >>> trainer = pl.Trainer(plugins=[DckptCheckpointIO()])  # doctest: +SKIP
        >>> trainer.fit(model, ckpt_path="last")  # doctest: +SKIP
    """

    def __init__(
        self, *, allow_pickle: bool = False, durable: bool = True, timeout: float = 600.0
    ) -> None:
        self.allow_pickle = allow_pickle
        self.durable = durable
        self.timeout = timeout

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        """Write ``checkpoint`` as a dckpt checkpoint directory at ``path`` (replaced if
        there: it stays loadable until the new one commits).

        Args:
            checkpoint: Lightning's checkpoint dict.
            path: the checkpoint's path (a directory is created there).
            storage_options: a dict of fsspec options for an object-store ``path``.

        Raises:
            dckpt.UnsupportedStateError: a value that is not plain data, without
                ``allow_pickle``.
            dckpt.CheckpointError: the save failed.
        """
        state = encode(checkpoint)
        dckpt.save(
            state,
            os.fspath(path),
            process_group=_this_process(),
            overwrite=True,
            durable=self.durable,
            timeout=self.timeout,
            allow_pickle=self.allow_pickle,
            storage_options=_options(storage_options),
        )

    def load_checkpoint(
        self, path: str | Path, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Read the checkpoint at ``path`` back into Lightning's dict.

        Args:
            path: a checkpoint written by :meth:`save_checkpoint`.
            map_location: ignored: tensors are read to the CPU and Lightning moves them.
            weights_only: ``True`` refuses pickled values even with ``allow_pickle``.

        Returns:
            The checkpoint dict, as it was saved.

        Raises:
            dckpt.CheckpointNotFoundError: no committed checkpoint at ``path``.
            dckpt.CheckpointError: the load failed (corrupt data, pickle refused, ...).
        """
        return load_dict(
            os.fspath(path),
            process_group=_this_process(),
            timeout=self.timeout,
            allow_pickle=self.allow_pickle and weights_only is not True,
        )

    def remove_checkpoint(self, path: str | Path) -> None:
        """Delete the checkpoint at ``path`` (Lightning's ``ModelCheckpoint`` retention).

        Args:
            path: a checkpoint directory (or a file) to remove; missing is fine.
        """
        remove(os.fspath(path))


class DckptModelParallelStrategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` with its sharded checkpoints in dckpt.

    Takes the same arguments as ``ModelParallelStrategy``. With
    ``save_distributed_checkpoint=True`` (the default) every rank saves its shards of the
    model and optimizers in one collective dckpt save, and a load reshards into the
    current layout, including another world size; with ``False`` Lightning's full
    single-file checkpoint is used unchanged.

    Example:
        >>> import lightning.pytorch as pl  # doctest: +SKIP
        >>> from dckpt.integrations.lightning import DckptModelParallelStrategy
        >>> trainer = pl.Trainer(strategy=DckptModelParallelStrategy(), devices=8)  # doctest: +SKIP
        >>> trainer.fit(model, ckpt_path="last")  # doctest: +SKIP
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: str | Path, storage_options: Any | None = None
    ) -> None:
        """Save ``checkpoint`` at ``filepath``, collectively over all ranks.

        Args:
            checkpoint: Lightning's checkpoint dict; its ``state_dict`` and
                ``optimizer_states`` hold this rank's shards (DTensors).
            filepath: the checkpoint path (rank 0's wins, as in Lightning).
            storage_options: a dict of fsspec options for an object-store path.

        Raises:
            dckpt.CheckpointError: the save failed on any rank (raised on all of them).
        """
        if not self._save_distributed_checkpoint:
            super().save_checkpoint(checkpoint, filepath, storage_options)
            return
        path = os.fspath(self.broadcast(filepath))
        dckpt.save(
            encode(checkpoint),
            path,
            overwrite=True,
            storage_options=_options(storage_options),
        )

    def load_checkpoint(
        self, checkpoint_path: str | Path, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Load the model's and optimizers' shards in place; return the rest.

        Args:
            checkpoint_path: a checkpoint saved by this strategy (any world size).
            weights_only: unused: dckpt checkpoints hold no pickles.

        Returns:
            The checkpoint's other entries (loops, callbacks, epoch, ...), as Lightning's
            own sharded load returns them.

        Raises:
            dckpt.StateMismatchError: the model or an optimizer does not match the
                checkpoint (with the module's ``strict_loading``).
            dckpt.CheckpointError: the load failed on any rank.
        """
        path = os.fspath(self.broadcast(checkpoint_path))
        if not os.path.isdir(path) and "://" not in path:
            # A full single-file checkpoint (save_distributed_checkpoint=False).
            return super().load_checkpoint(checkpoint_path, weights_only)
        assert self.model is not None and self.lightning_module is not None
        model = self.model
        optimizers = [dckpt.OptimizerState(model, opt) for opt in self.optimizers]
        return load_dict(
            path,
            process_group=None,
            inplace={_MODEL: model, _OPTIMIZERS: optimizers},
            strict=self.lightning_module.strict_loading,
        )


# -- the checkpoint dict <-> a dckpt state ---------------------------------------------


def encode(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """Lightning's checkpoint dict as a dckpt state, plus what :func:`load_dict` needs.

    dckpt stores mapping keys as strings; optimizer state dicts key their entries by
    integer, so dicts with integer keys are saved with string keys and their paths are
    recorded to turn them back.

    Args:
        checkpoint: a dict whose keys are strings.

    Returns:
        A new dict (the input is not modified) with an extra ``dckpt_lightning`` entry.

    Raises:
        dckpt.UnsupportedStateError: a dict mixes integer and string keys that collide.

    Example:
        >>> state = encode({"optimizer_states": [{"state": {0: {"step": 3}}}]})
        >>> state["dckpt_lightning"]["int_keyed"]
        [['optimizer_states', 0, 'state']]
    """
    int_keyed: list[list[str | int]] = []
    kinds = {k: _kind(v) for k, v in checkpoint.items()}
    state = {
        k: [v] if kinds[k] == "boxed" else _encode(v, [k], int_keyed) for k, v in checkpoint.items()
    }
    state[META_KEY] = {"kinds": kinds, "int_keyed": int_keyed}
    return state


def _encode(node: Any, path: list[str | int], int_keyed: list[list[str | int]]) -> Any:
    if isinstance(node, Mapping):
        if any(isinstance(k, int) and not isinstance(k, bool) for k in node):
            keys = [str(k) for k in node]
            if len(set(keys)) != len(keys):
                raise dckpt.UnsupportedStateError(
                    f"the dict at {'.'.join(map(str, path))!r} has keys that collide as "
                    f"strings ({list(node)[:6]}); use distinct keys"
                )
            int_keyed.append(list(path))
        return {str(k): _encode(v, [*path, str(k)], int_keyed) for k, v in node.items()}
    if isinstance(node, list):
        return [_encode(v, [*path, i], int_keyed) for i, v in enumerate(node)]
    if isinstance(node, tuple):
        return tuple(_encode(v, [*path, i], int_keyed) for i, v in enumerate(node))
    return node


def _kind(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return "boxed"  # saved as a one-item list: a load grows lists, not tensors
    if isinstance(value, Mapping):
        return "dict"
    if isinstance(value, list):
        return "list"
    return "value"


def load_dict(
    path: str,
    *,
    process_group: Any,
    inplace: Mapping[str, Any] | None = None,
    strict: bool = True,
    timeout: float = 600.0,
    allow_pickle: bool = False,
) -> dict[str, Any]:
    """Read a checkpoint written from :func:`encode` back into a dict.

    Args:
        path: the checkpoint.
        process_group: passed to :func:`dckpt.load`.
        inplace: entries loaded into these objects (a module, optimizers) instead of
            being returned.
        strict: for the ``inplace`` entries: every key must be in the checkpoint.
        timeout: seconds before :class:`dckpt.CheckpointTimeoutError`.
        allow_pickle: accept pickled values.

    Returns:
        The checkpoint's entries other than those in ``inplace``.

    Raises:
        dckpt.CheckpointError: as :func:`dckpt.load` does; a checkpoint not written by
            this module is reported as corrupt.

    Example:
        >>> ckpt = load_dict("epoch=0-step=100.ckpt", process_group=None)  # doctest: +SKIP
        >>> ckpt["global_step"], sorted(ckpt["state_dict"])[:1]  # doctest: +SKIP
        (100, ['net.0.bias'])
    """
    inplace = dict(inplace or {})
    meta_holder: dict[str, Any] = {META_KEY: {}}
    # Reads the manifest only: the meta entry holds values, no tensor data.
    dckpt.load(meta_holder, path, process_group=process_group, timeout=timeout, strict=False)
    meta = meta_holder[META_KEY]
    if not meta or "kinds" not in meta:
        raise dckpt.CorruptCheckpointError(
            f"{path} is a dckpt checkpoint but not one saved by dckpt's Lightning "
            f"integration (no {META_KEY!r} entry); load it with dckpt.load instead"
        )
    # Empty containers grow to what was saved under them; a plain value is replaced.
    state: dict[str, Any] = {
        k: inplace[k] if k in inplace else _template(kind) for k, kind in meta["kinds"].items()
    }
    dckpt.load(
        state,
        path,
        process_group=process_group,
        strict=strict,
        timeout=timeout,
        allow_pickle=allow_pickle,
    )
    for p in meta["int_keyed"]:
        node: Any = state
        for part in p:
            node = node[part]
        restored = {int(k) if k.lstrip("-").isdigit() else k: v for k, v in node.items()}
        node.clear()
        node.update(restored)
    boxed = [k for k, kind in meta["kinds"].items() if kind == "boxed"]
    return {k: v[0] if k in boxed else v for k, v in state.items() if k not in inplace}


def _template(kind: str) -> Any:
    if kind == "dict":
        return {}
    if kind in ("list", "boxed"):
        return []
    return None


def remove(path: str) -> None:
    """Delete a checkpoint directory or file, locally or on an object store.

    Args:
        path: a local path or an fsspec URL; nothing happens if it does not exist.

    Raises:
        OSError: the deletion failed.

    Example:
        >>> remove("checkpoints/epoch=0-step=100.ckpt")  # doctest: +SKIP
    """
    if "://" in path:
        import fsspec  # lazy: only remote checkpoint paths need it

        fs, root = fsspec.core.url_to_fs(path)
        if fs.exists(root):
            fs.rm(root, recursive=True)
    elif os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def _options(storage_options: Any) -> dict[str, Any] | None:
    if storage_options is None or isinstance(storage_options, dict):
        return storage_options
    raise dckpt.ArgumentTypeError(
        f"storage_options must be a dict of fsspec options, got {type(storage_options).__name__}"
    )


def _this_process() -> Any:
    """A process group of this rank alone (None outside torch.distributed).

    Lightning saves from rank 0 only and loads on each rank independently; dckpt's
    collectives would wait for the other ranks of the default group. A group made with
    local synchronization is created by its one member alone, so no other rank joins in.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    rank = dist.get_rank()
    if rank not in _groups:
        _groups[rank] = dist.new_group([rank], use_local_synchronization=True)
    return _groups[rank]
