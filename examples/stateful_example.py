"""The stateful checkpoint workflow, with dckpt in place of torch DCP.

An FSDP2-sharded model and its Adam optimizer on 2 ranks (CPU, gloo) train for two
steps, are saved with one call, rebuilt from scratch, loaded in place, and train on.
The loss after the restart is compared with an uninterrupted run: they are identical.

    python examples/stateful_example.py [--world-size 2] [--dir /tmp/ckpt]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import dckpt


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net1 = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.net2 = nn.Sequential(nn.Linear(16, 32), nn.ReLU())
        self.net3 = nn.Linear(32, 64)
        self.net4 = nn.Sequential(nn.ReLU(), nn.Linear(64, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net4(self.net3(self.net2(self.net1(x))))

    def get_input(self) -> torch.Tensor:
        return torch.rand(8, 8)


def train(model: nn.Module, optim: torch.optim.Optimizer, steps: int) -> torch.Tensor:
    torch.manual_seed(0)
    loss = torch.zeros(())
    for _ in range(steps):
        loss = model(model.get_input()).sum()
        loss.backward()
        optim.step()
        optim.zero_grad()
    return loss.detach()


def init_model(world_size: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    mesh = init_device_mesh("cpu", (world_size,))
    model = Model()
    for layer in (model.net1, model.net2, model.net3, model.net4):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.Adam(model.parameters(), lr=0.1)


def run(rank: int, world_size: int, rendezvous: str, ckpt_dir: str) -> None:
    # A file rendezvous: no port to pick, so nothing else on the machine can take it first.
    dist.init_process_group(
        "gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size
    )
    torch.set_num_threads(1)
    try:
        model, optim = init_model(world_size)
        train(model, optim, steps=2)
        dckpt.save({"model": model, "optimizer": optim}, ckpt_dir)
        uninterrupted = train(model, optim, steps=2)

        # "Restart": fresh objects, loaded in place, then the same two steps.
        model, optim = init_model(world_size)
        dckpt.load({"model": model, "optimizer": optim}, ckpt_dir)
        resumed = train(model, optim, steps=2)
        if rank == 0:
            print(f"loss without restart: {uninterrupted.item():.10f}")
            print(f"loss after restart:   {resumed.item():.10f}")
            same = torch.equal(uninterrupted, resumed)
            print("identical" if same else "DIFFERENT")
            if not same:
                raise SystemExit(1)
    finally:
        dist.destroy_process_group()
    # torch's gloo backend can abort in its C++ destructors while the interpreter shuts down
    # ("terminate called without an active exception", about one run in fifty here, with
    # or without dckpt). Everything is done and flushed: leave without that teardown.
    sys.stdout.flush()
    os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--dir", default=None, help="checkpoint directory (default: a temp dir)")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="dckpt-example-")
    ckpt_dir = args.dir or os.path.join(tmp, "checkpoint")
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    rendezvous = os.path.join(tmp, "rendezvous")
    print(f"Running the stateful checkpoint example on {args.world_size} CPU ranks -> {ckpt_dir}")
    try:
        mp.spawn(run, args=(args.world_size, rendezvous, ckpt_dir), nprocs=args.world_size)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # with --dir, the checkpoint stays there


if __name__ == "__main__":
    main()
