"""Which module in a state names an optimizer's parameters, and capturing the two at once."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from dckpt._errors import UnsupportedStateError


def pair_optimizer(
    optim: torch.optim.Optimizer, modules: list[torch.nn.Module], key: str
) -> torch.nn.Module:
    """The module in the state that owns ``optim``'s parameters (at ``key``), so that its
    state can be keyed by parameter name; raises naming the key when there is none, or
    when it is ambiguous."""
    wanted = {id(p) for g in optim.param_groups for p in g["params"]}
    owners = [m for m in modules if wanted & {id(p) for p in m.parameters()}]
    hint = f"wrap it explicitly: state[{key!r}] = dckpt.OptimizerState(model, optimizer)"
    if not owners:
        raise UnsupportedStateError(
            f"the optimizer at key {key!r} has no module in the same state owning its "
            f"parameters, so its state cannot be keyed by parameter name; add the module to the "
            f"state or {hint}"
        )
    # Prefer the outermost module: nested modules in the state share parameters with it.
    owners.sort(key=lambda m: -sum(1 for _ in m.parameters()))
    top = owners[0]
    top_params = {id(p) for p in top.parameters()}
    if any(not ({id(p) for p in m.parameters()} <= top_params) for m in owners[1:]):
        raise UnsupportedStateError(
            f"the optimizer at key {key!r} holds parameters of several modules in the "
            f"state, so it is ambiguous which one names them; {hint}"
        )
    if not wanted <= top_params:
        raise UnsupportedStateError(
            f"the optimizer at key {key!r} holds parameters that the module in the "
            f"state does not own; {hint}"
        )
    return top


class Partners:
    """The modules and optimizers of one state that torch's helpers capture in one call.

    ``get_model_state_dict`` and ``get_optimizer_state_dict`` each validate their options
    over the whole model (every parameter's names), which is most of what capturing a
    state costs beyond its tensors; ``get_state_dict(model, optimizer)`` validates once
    and returns both, the same dicts. A module and the one optimizer of the state paired
    with it (no other optimizer pairs with that module) are partners: whichever the walk
    reaches first takes both state dicts, and the other gets its own dict from here.
    ``skip`` names optimizers the walk leaves out (no state yet, on a look-only walk).
    """

    def __init__(
        self,
        modules: list[torch.nn.Module],
        optimizers: Iterable[torch.optim.Optimizer],
        skip: Callable[[torch.optim.Optimizer], bool],
    ) -> None:
        self.owners: dict[int, torch.nn.Module] = {}
        by_owner: dict[int, list[torch.optim.Optimizer]] = {}
        for optim in optimizers:
            if skip(optim):
                continue
            try:
                owner = pair_optimizer(optim, modules, "")
            except UnsupportedStateError:
                continue  # the walk raises it, naming the optimizer's key
            self.owners[id(optim)] = owner
            by_owner.setdefault(id(owner), []).append(optim)
        self._partner: dict[int, tuple[torch.nn.Module, torch.optim.Optimizer]] = {}
        for optims in by_owner.values():
            if len(optims) == 1:
                pair = (self.owners[id(optims[0])], optims[0])
                self._partner[id(pair[0])] = self._partner[id(pair[1])] = pair
        self._held: dict[int, Mapping[str, Any]] = {}

    def owner(
        self, optim: torch.optim.Optimizer, modules: list[torch.nn.Module], key: str
    ) -> torch.nn.Module:
        """The module naming ``optim``'s parameters (see :func:`pair_optimizer`)."""
        known = self.owners.get(id(optim))
        return known if known is not None else pair_optimizer(optim, modules, key)

    def state_dict(self, obj: object, alone: Callable[[], Mapping[str, Any]]) -> Mapping[str, Any]:
        """``obj``'s state dict: taken with its partner's, or held since its partner's
        capture, else ``alone()``."""
        held = self._held.pop(id(obj), None)
        if held is not None:
            return held
        pair = self._partner.pop(id(obj), None)
        if pair is None:
            return alone()
        module, optim = pair
        from torch.distributed.checkpoint.state_dict import get_state_dict  # heavy

        model_sd, optim_sd = get_state_dict(module, optim)
        if obj is module:
            self._held[id(optim)] = dict(optim_sd)
            return dict(model_sd)
        self._held[id(module)] = dict(model_sd)
        return dict(optim_sd)
