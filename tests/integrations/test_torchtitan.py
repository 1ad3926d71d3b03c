"""DckptCheckpointManager driven the way torchtitan's trainer drives it.

Two gloo ranks on the CPU, an FSDP2 model, torchtitan's OptimizersContainer and
LRSchedulersContainer, its ParallelAwareDataloader over a stateful dataset, and a
``train_state``: train, save, rebuild everything from another seed, load, and the next
losses must be bit-identical to those of the uninterrupted run. (torchtitan's own
trainer cannot run here: it picks CUDA when no accelerator is present, and its debug
model's flex attention has no CPU backward.)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import pytest

from tests._dist import RankPool
from tests.integrations._ranks import needs, two_ranks

__all__ = ["two_ranks"]  # the fixture

pytestmark = needs("torchtitan", "triton")

VOCAB = 64


# -- what torchtitan's trainer builds, in small ------------------------------------------


@dataclass
class TrainState:
    """The trainer's own Stateful (torchtitan's Trainer.state_dict has these keys)."""

    step: int = 0
    ntokens_seen: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "ntokens_seen": self.ntokens_seen}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.step, self.ntokens_seen = sd["step"], sd["ntokens_seen"]


def _dataset(rank: int) -> Any:
    import torch
    from torch.utils.data import IterableDataset

    class Tokens(IterableDataset):  # type: ignore[type-arg]
        """An endless token stream per rank whose position is its state."""

        def __init__(self) -> None:
            self.pos = 0

        def __iter__(self) -> Any:
            while True:
                g = torch.Generator().manual_seed(7919 * rank + self.pos)
                self.pos += 1
                x = torch.randint(0, VOCAB, (9,), generator=g)
                yield {"input": x[:-1]}, x[1:]

        def state_dict(self) -> dict[str, Any]:
            return {"pos": self.pos}

        def load_state_dict(self, sd: dict[str, Any]) -> None:
            self.pos = sd["pos"]

    return Tokens()


def _build(seed: int) -> dict[str, Any]:
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torchtitan.components.dataloader import ParallelAwareDataloader
    from torchtitan.components.optimizer import LRSchedulersContainer, default_adamw

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok_embeddings = nn.Embedding(VOCAB, 16)
            self.layers = nn.ModuleList([nn.Linear(16, 16) for _ in range(2)])
            self.lm_head = nn.Linear(16, VOCAB)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.tok_embeddings(x)
            for layer in self.layers:
                h = torch.tanh(layer(h))
            return self.lm_head(h)  # type: ignore[no-any-return]

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(seed)
    model = Tiny()
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt_config = default_adamw(lr=1e-2)
    opt_config.implementation = "foreach"  # "fused" is CUDA-only
    optimizers = opt_config.build(model_parts=[model])
    schedulers = LRSchedulersContainer.Config(warmup_steps=2, decay_ratio=0.5).build(
        optimizers=optimizers, training_steps=20
    )
    loader = ParallelAwareDataloader(
        _dataset(rank), dp_rank=rank, dp_world_size=world, batch_size=2
    )
    return {
        "model": model,
        "optimizers": optimizers,
        "lr_schedulers": schedulers,
        "dataloader": loader,
        "train_state": TrainState(),
        "it": None,
    }


def _manager(cls: Any, t: dict[str, Any], base: str, sd_adapter: Any = None, **config: Any) -> Any:
    """The checkpointer as torchtitan's trainer builds it: config.build(**these keywords)."""
    return cls.Config(enable=True, **config).build(
        dataloader=t["dataloader"],
        model_parts=[t["model"]],
        optimizers=t["optimizers"],
        lr_schedulers=t["lr_schedulers"],
        states={"train_state": t["train_state"]},
        sd_adapter=sd_adapter,
        base_folder=base,
    )


def _step(t: dict[str, Any]) -> float:
    """One training step as torchtitan's trainer takes it; the loss averaged over ranks."""
    import torch.distributed as dist
    import torch.nn.functional as F

    if t["it"] is None:
        t["it"] = iter(t["dataloader"])
    inputs, labels = next(t["it"])
    logits = t["model"](inputs["input"])
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
    loss.backward()
    t["optimizers"].step()
    t["lr_schedulers"].step()
    t["optimizers"].zero_grad()
    t["train_state"].step += 1
    t["train_state"].ntokens_seen += labels.numel()
    total = loss.detach().clone()
    dist.all_reduce(total)
    return float(total) / dist.get_world_size()


# -- rank functions ----------------------------------------------------------------------


def _w_resume(base: str, async_mode: str) -> dict[str, Any]:
    import torch.distributed as dist

    import dckpt
    from dckpt.integrations.torchtitan import DckptCheckpointManager

    config = {"interval": 1, "keep_latest_k": 2, "async_mode": async_mode}
    run = _build(seed=0)
    ckpt = _manager(DckptCheckpointManager, run, base, **config)
    assert ckpt.load(step=-1) is False  # nothing there yet: a fresh start
    for _ in range(4):
        _step(run)
        # The trainer waits for staging before the optimizer step; then saves.
        ckpt.maybe_wait_for_staging()
        assert ckpt.save(run["train_state"].step, last_step=False) is True
    ckpt.maybe_wait_for_saving()
    expected = [_step(run) for _ in range(3)]
    ckpt.close()

    resumed = _build(seed=1)
    ckpt2 = _manager(DckptCheckpointManager, resumed, base, **config)
    assert ckpt2.load(step=-1) is True
    got = [_step(resumed) for _ in range(3)]
    steps = dckpt.CheckpointManager(os.path.join(base, "checkpoint")).steps()
    ckpt2.close()

    # load_step picks an older step; exclude_from_loading leaves the data loader alone.
    older = _build(seed=2)
    ckpt3 = _manager(
        DckptCheckpointManager, older, base, exclude_from_loading=["dataloader"], **config
    )
    assert ckpt3.load(step=3) is True
    dist.barrier()
    return {
        "expected": expected,
        "got": got,
        "state": resumed["train_state"].state_dict(),
        "steps": steps,
        "older": older["train_state"].step,
        "older_loader_pos": older["dataloader"].dataset.pos,
    }


def _w_switch_from_dcp(base: str) -> dict[str, Any]:
    import torch
    from torchtitan.components.checkpointer import CheckpointManager

    import dckpt
    from dckpt.integrations.torchtitan import DckptCheckpointManager

    run = _build(seed=0)
    dcp = _manager(CheckpointManager, run, base, folder="dcp", interval=2, keep_latest_k=0)
    for _ in range(4):
        _step(run)
        dcp.save(run["train_state"].step, last_step=False)
    expected = [_step(run) for _ in range(2)]
    dcp.close()

    refused = ""
    try:
        _manager(DckptCheckpointManager, _build(seed=1), base, folder="dcp")
    except dckpt.ArgumentError as exc:
        refused = str(exc)

    dcp_step = os.path.join(base, "dcp", "step-4")
    weights = _build(seed=1)  # initial_load_model_only (torchtitan's default): the model only
    _manager(DckptCheckpointManager, weights, base, folder="w", initial_load_path=dcp_step).load()
    resumed = _build(seed=1)
    ckpt = _manager(
        DckptCheckpointManager,
        resumed,
        base,
        folder="dckpt",
        initial_load_path=dcp_step,
        initial_load_model_only=False,
    )
    assert ckpt.load(step=-1) is True
    same_model = all(
        torch.equal(a.full_tensor(), b.full_tensor())
        for a, b in zip(weights["model"].parameters(), resumed["model"].parameters(), strict=True)
    )
    got = [_step(resumed) for _ in range(2)]
    return {
        "expected": expected,
        "got": got,
        "step": resumed["train_state"].step,
        "refused": refused,
        "model_only_step": weights["train_state"].step,
        "same_model": same_model,
    }


class _Adapter:
    """A state-dict adapter of torchtitan's kind: native FQNs <-> Hugging Face names."""

    fqn_to_index_mapping = None
    hf_assets_path = None

    def to_hf(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        return {f"model.{k}": v for k, v in state_dict.items()}

    def from_hf(self, hf_state_dict: dict[str, Any]) -> dict[str, Any]:
        return {k.removeprefix("model."): v for k, v in hf_state_dict.items()}


def _w_final_export(base: str) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    import dckpt
    from dckpt.integrations.torchtitan import MODEL_ONLY_KEY, DckptCheckpointManager

    config = {
        "interval": 100,
        "last_save_model_only": True,
        "export_dtype": "bfloat16",
        "last_save_in_hf": True,
    }
    run = _build(seed=0)
    ckpt = _manager(DckptCheckpointManager, run, base, sd_adapter=_Adapter(), **config)
    for _ in range(3):
        _step(run)
        assert ckpt.save(run["train_state"].step, last_step=False) is False  # off-interval
    assert ckpt.save(3, last_step=True) is True
    full = {k: v.full_tensor() for k, v in run["model"].state_dict().items()}

    # The dckpt step holds the model alone, in bfloat16, loadable into plain tensors.
    step_dir = dckpt.CheckpointManager(os.path.join(base, "checkpoint")).path_of(3)
    plain: dict[str, Any] = {k: torch.empty(v.shape, dtype=torch.bfloat16) for k, v in full.items()}
    result = dckpt.load({**plain, MODEL_ONLY_KEY: None}, step_dir, strict=True)
    assert not result.unexpected_keys, result.unexpected_keys
    same = all(torch.equal(plain[k], full[k].to(torch.bfloat16)) for k in full)

    hf: dict[str, Any] = {}
    if dist.get_rank() == 0:
        from safetensors.torch import load_file

        hf_dir = os.path.join(base, "checkpoint", "step-3-hf")
        for name in sorted(os.listdir(hf_dir)):
            if name.endswith(".safetensors"):
                hf.update(load_file(os.path.join(hf_dir, name)))
        assert sorted(hf) == sorted(f"model.{k}" for k in full), sorted(hf)
        assert all(torch.equal(hf[f"model.{k}"], full[k].to(torch.bfloat16)) for k in full)
        assert not [n for n in os.listdir(os.path.join(base, "checkpoint")) if "staging" in n]

    # A model-only final step cannot resume training: a clear error, nothing loaded.
    again = _build(seed=1)
    ckpt2 = _manager(DckptCheckpointManager, again, base, sd_adapter=_Adapter(), **config)
    message = ""
    try:
        ckpt2.load(step=-1)
    except dckpt.CheckpointError as exc:
        message = str(exc)
    dist.barrier()
    return {"same": same, "hf_keys": len(hf), "message": message}


def _w_config_errors() -> list[str]:
    import dckpt
    from dckpt.integrations.torchtitan import DckptCheckpointManager

    seen = []
    for bad in ({"async_mode": "sometimes"}, {"timeout": 0}):
        try:
            DckptCheckpointManager.Config(**bad)
        except dckpt.ArgumentError as exc:
            seen.append(str(exc))
    disabled = DckptCheckpointManager.Config().build(
        dataloader=None,
        model_parts=[],
        optimizers=None,
        lr_schedulers=None,
        states={},
        sd_adapter=None,
    )
    assert disabled.load() is False and disabled.save(10) is False
    disabled.maybe_wait_for_saving()
    disabled.close()
    return seen


# -- tests -------------------------------------------------------------------------------


@pytest.mark.parametrize("async_mode", ["disabled", "async"])
def test_resume_gives_identical_losses(two_ranks: RankPool, tmp_path: Any, async_mode: str) -> None:
    r0, r1 = two_ranks.run(_w_resume, str(tmp_path), async_mode, timeout=120)
    assert r0["got"] == r0["expected"] and r1["got"] == r1["expected"]
    assert r0["state"] == {"step": 7, "ntokens_seen": 7 * 16}  # 4 restored + 3 trained
    assert r0["steps"] == [3, 4]  # keep_latest_k=2
    assert r0["older"] == 3 and r0["older_loader_pos"] == 0


def test_switch_from_torchtitans_dcp_checkpoint(two_ranks: RankPool, tmp_path: Any) -> None:
    r0, _ = two_ranks.run(_w_switch_from_dcp, str(tmp_path), timeout=120)
    assert r0["got"] == r0["expected"] and r0["step"] == 6
    assert r0["same_model"] and r0["model_only_step"] == 0
    assert "initial_load_path" in r0["refused"] and "step-4" in r0["refused"]


def test_final_save_is_model_only_in_export_dtype_with_hf_export(
    two_ranks: RankPool, tmp_path: Any
) -> None:
    r0, r1 = two_ranks.run(_w_final_export, str(tmp_path), timeout=120)
    assert r0["same"] and r1["same"]
    assert r0["hf_keys"] == 7  # embedding, 2 layers x (weight, bias), head (weight, bias)
    assert "model-only" in r0["message"] and "initial_load_path" in r0["message"]


def test_config_is_checked(two_ranks: RankPool) -> None:
    seen, _ = two_ranks.run(_w_config_errors, timeout=120)
    assert any("async_mode" in s for s in seen) and any("timeout" in s for s in seen)
