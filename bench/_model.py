"""The benchmark model, shared by the scripts in this folder: a stack of Linear layers
wrapped with FSDP2, and Adam with its state, on the CPU."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

LAYERS = 24
BATCH = 8


class Stack(nn.Module):
    def __init__(self, width: int, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


def width_for(params_m: float) -> int:
    """Width of a LAYERS-deep stack with about ``params_m`` million parameters (x64)."""
    w = (params_m * 1e6 / LAYERS) ** 0.5
    return max(64, round(w / 64) * 64)


def build(width: int, mesh: Any, *, trained: bool) -> tuple[nn.Module, torch.optim.Optimizer]:
    """FSDP2 model + Adam whose state exists.

    ``trained``: real init and one real training step (the state that gets saved).
    Otherwise a fresh load target: meta init, materialised and touched (filled), and Adam
    state created by one step on zero gradients, so a load finds every tensor allocated,
    as after a restart's first ``get_state_dict``.
    """
    from torch.distributed.fsdp import fully_shard

    if trained:
        torch.manual_seed(0)
        model = Stack(width, LAYERS)
    else:
        with torch.device("meta"):
            model = Stack(width, LAYERS)
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if not trained:
        model.to_empty(device="cpu")
        with torch.no_grad():
            for p in model.parameters():
                p.to_local().fill_(0.5)
    optim = torch.optim.Adam(model.parameters(), lr=1e-3)
    if trained:
        torch.manual_seed(1)
        loss = model(torch.randn(BATCH, width)).square().mean()
        loss.backward()
    else:
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
    optim.step()
    optim.zero_grad(set_to_none=True)
    return model, optim


def local_tensors(model: nn.Module, optim: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every tensor of the model+optimizer state as this rank holds it (local shards)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.tensor import DTensor

    msd, osd = get_state_dict(model, optim)
    out: dict[str, torch.Tensor] = {}

    def walk(node: Any, key: str) -> None:
        if isinstance(node, DTensor):
            out[key] = node.to_local()
        elif isinstance(node, torch.Tensor):
            out[key] = node
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{key}.{k}")
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, f"{key}.{i}")

    walk(msd, "model")
    walk(osd, "optim")
    return out
