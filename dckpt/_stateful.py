"""The objects whose state a save asks for: anything ``Stateful``, and modules and
optimizers, which go through torch's distributed state-dict helpers (FSDP2, DDP and
tensor parallelism included, with FQN keys)."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class Stateful(Protocol):
    """Anything with ``state_dict()`` and ``load_state_dict()``: saved through its state dict.

    A value of ``state`` that has both methods (a data loader, a scheduler, a metrics
    tracker, your own class) needs no registration: a save stores what ``state_dict()``
    returns (tensors and plain values, nested as in any state), and a load builds the
    same dict from the checkpoint and passes it to ``load_state_dict()``. The dict it gets
    back holds every key that was saved, even those its fresh ``state_dict()`` lacks
    (per-worker positions, say). Modules and optimizers are Stateful too, but go through
    torch's distributed state-dict helpers instead. ``isinstance(obj, dckpt.Stateful)``
    tells whether an object qualifies.

    Example:
        ```python
        class Progress:
            def __init__(self) -> None:
                self.samples_seen = 0

            def state_dict(self) -> dict[str, int]:
                return {"samples_seen": self.samples_seen}

            def load_state_dict(self, state_dict: dict[str, int]) -> None:
                self.samples_seen = state_dict["samples_seen"]

        dckpt.save({"model": model, "progress": Progress()}, path)
        ```
    """

    def state_dict(self) -> dict[str, Any]:
        """The object's state: a dict of tensors and plain values (nested dicts allowed)."""
        ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> Any:
        """Take back a state that ``state_dict()`` returned before (the return is ignored)."""
        ...


class OptimizerState:
    """Pairs an optimizer with the module that owns its parameters, to save or load it.

    An optimizer's state is keyed by parameter name (``optimizer.state.net.0.weight.exp_avg``,
    as in torch DCP), so dckpt needs the module that names the parameters. It pairs an
    optimizer with the module in the same ``state`` by itself; wrap the optimizer when it
    cannot (the module is not in ``state``, or several modules there share the
    optimizer). torch's ``get/set_optimizer_state_dict`` do the work: FSDP2, DDP and
    tensor parallelism included.

    Args:
        model: The module whose parameters the optimizer updates (the outermost one, for
            an FSDP2 or tensor-parallel model).
        optimizer: The optimizer.

    Example:
        ```python
        state = {"optimizer": dckpt.OptimizerState(model, optimizer), "step": step}
        dckpt.save(state, "ckpt/optimizer-1000")
        dckpt.load(state, "ckpt/optimizer-1000")
        ```
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state keyed by parameter name: ``{"state": ..., "param_groups": ...}``."""
        # torch's helpers import DTensor and DCP support (half a second or more), which is
        # heavy for `import dckpt`: they load when a module or optimizer is first needed.
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return dict(get_optimizer_state_dict(self.model, self.optimizer))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of the form ``state_dict()`` returns into the optimizer.

        Args:
            state_dict: The optimizer's state keyed by parameter name.
        """
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict  # heavy

        set_optimizer_state_dict(self.model, self.optimizer, state_dict)


class ModuleState:
    """A module's state through torch's helpers (FQN keys; ``strict`` for loads)."""

    def __init__(self, model: torch.nn.Module, strict: bool) -> None:
        self.model = model
        self.strict = strict

    def state_dict(self) -> dict[str, Any]:
        # torch's helpers refuse a module without state (an activation, a loss): it has none
        if self._stateless():
            return {}
        from torch.distributed.checkpoint.state_dict import get_model_state_dict  # heavy

        return dict(get_model_state_dict(self.model))

    def _stateless(self) -> bool:
        return next(self.model.parameters(), None) is None and not self.model.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict and self._stateless():
            return
        # heavy, as in OptimizerState.state_dict
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(self.model, state_dict, options=StateDictOptions(strict=self.strict))
