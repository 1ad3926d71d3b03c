"""Which module in a state names an optimizer's parameters."""

from __future__ import annotations

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
