"""Trains a LightningModule, resumes it from a dckpt checkpoint, and records the losses.

Run by tests/integrations/test_lightning.py as ``python _lightning_run.py OUT``; Lightning's
own launcher (``strategy="ddp"`` / ``DckptModelParallelStrategy``, ``accelerator="cpu"``,
``devices=2``) starts the second process by running this script again. Per strategy:
train 3 epochs with a checkpoint after each, then train a model built from another seed
from the first epoch's checkpoint, and write both runs' losses (averaged over the ranks)
to ``OUT/<strategy>.json``. A single-process run (``devices=1``) goes first, in the
launching process only.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from dckpt.integrations.lightning import DckptCheckpointIO, DckptModelParallelStrategy

warnings.filterwarnings("ignore")  # Lightning's advice about workers, loggers, CPUs


class Regression(pl.LightningModule):
    def __init__(self, sharded: bool = False, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
        self.losses: list[tuple[int, float]] = []

    def configure_model(self) -> None:
        if self.hparams.sharded:
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            fully_shard(self.net[0], mesh=mesh)
            fully_shard(self.net, mesh=mesh)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self.net(x), y)
        mean = loss.detach().clone()
        if dist.is_initialized():
            dist.all_reduce(mean)
            mean /= dist.get_world_size()
        self.losses.append((self.global_step, float(mean)))
        return loss

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def train_dataloader(self) -> DataLoader[Any]:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(32, 8, generator=g)
        dataset = TensorDataset(x, x.sum(dim=1, keepdim=True).sin())
        # No shuffling: Lightning's resume from an epoch-end checkpoint replays the next
        # epoch with another shuffle seed (with torch.save checkpoints too).
        sampler = DistributedSampler(dataset, shuffle=False) if dist.is_initialized() else None
        return DataLoader(dataset, batch_size=4, sampler=sampler)


def trainer(out: str, name: str, devices: int, strategy: Any, plugins: list[Any]) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        plugins=plugins,
        max_epochs=3,
        use_distributed_sampler=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[
            ModelCheckpoint(
                dirpath=os.path.join(out, name, "all"), every_n_epochs=1, save_top_k=-1
            ),
            ModelCheckpoint(
                dirpath=os.path.join(out, name, "latest"), every_n_train_steps=4, save_top_k=1
            ),
        ],
    )


def run(out: str, name: str, devices: int, strategy: Any, plugins: list[Any]) -> None:
    sharded = name == "model_parallel"
    pl.seed_everything(0, verbose=False)
    first = Regression(sharded=sharded)
    trainer(out, name, devices, strategy(), plugins).fit(first)
    ckpts = sorted(os.listdir(os.path.join(out, name, "all")))
    latest = sorted(os.listdir(os.path.join(out, name, "latest")))
    pl.seed_everything(1, verbose=False)
    second = Regression(sharded=sharded)
    resumed = trainer(out, name, devices, strategy(), plugins)
    resumed.fit(second, ckpt_path=os.path.join(out, name, "all", ckpts[0]))
    if not dist.is_initialized() or dist.get_rank() == 0:
        result = {
            "first": first.losses,
            "resumed": second.losses,
            "checkpoints": ckpts,
            "latest": latest,
        }
        with open(os.path.join(out, f"{name}.json"), "w") as f:
            json.dump(result, f)


def main() -> None:
    out = sys.argv[1]
    torch.set_num_threads(1)
    if "LOCAL_RANK" not in os.environ:  # the launching process, before any launch
        run(out, "single", 1, lambda: "auto", [DckptCheckpointIO()])
    run(out, "ddp", 2, lambda: "ddp", [DckptCheckpointIO()])
    run(
        out,
        "model_parallel",
        2,
        lambda: DckptModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        [],
    )


if __name__ == "__main__":
    main()
