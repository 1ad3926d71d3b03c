"""Trains tiny models with transformers' Trainer and with Accelerate, checkpointing through
dckpt, resumes them from another seed, and records the losses and checks.

Run by tests/integrations/test_hf.py as ``python _hf_run.py OUT`` (its own process: the
Trainer and Accelerate keep process-wide state). Writes ``OUT/result.json``. The model is
built from a config: nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

warnings.filterwarnings("ignore")

from accelerate import Accelerator  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments  # noqa: E402

from dckpt.integrations.hf import DckptTrainer, load_state, save_state  # noqa: E402


def tiny(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


class Tokens(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, 64, (12,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids.clone()}


class Recording(DckptTrainer):
    """Records each step's exact loss (the Trainer's logs round it)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.losses: dict[int, float] = {}

    def compute_loss(self, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        # Noise from the global RNG: a resumed run matches only if the RNG was restored.
        loss = super().compute_loss(model, inputs, *args, **kwargs)
        loss = loss + 1e-3 * torch.rand(())
        self.losses[self.state.global_step] = float(loss)
        return loss


def args(out: str) -> TrainingArguments:
    return TrainingArguments(
        output_dir=out,
        per_device_train_batch_size=4,
        max_steps=8,
        save_steps=2,
        save_total_limit=2,
        learning_rate=1e-2,
        warmup_steps=2,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def trainer_run(out: str) -> dict[str, Any]:
    first = Recording(model=tiny(0), args=args(os.path.join(out, "a")), train_dataset=Tokens())
    first.train()
    kept = sorted(os.listdir(os.path.join(out, "a")))  # save_total_limit=2: steps 6 and 8
    # Mid-epoch (4 steps an epoch): the Trainer skips the batches already seen.
    ckpt6 = os.path.join(out, "a", "checkpoint-6")
    files6 = sorted(os.listdir(ckpt6))
    resumed = Recording(model=tiny(1), args=args(os.path.join(out, "c")), train_dataset=Tokens())
    resumed.train(resume_from_checkpoint=ckpt6)

    # dckpt convert --to hf of the last checkpoint loads with from_pretrained.
    ckpt8 = os.path.join(out, "a", "checkpoint-8")
    hf_dir = os.path.join(out, "hf")
    cli = [
        sys.executable,
        "-m",
        "dckpt",
        "convert",
        ckpt8,
        hf_dir,
        "--to",
        "hf",
        "--prefix",
        "model.",
    ]
    subprocess.run(cli, check=True, capture_output=True)
    for name in ("config.json", "generation_config.json"):
        shutil.copy(os.path.join(ckpt8, name), hf_dir)
    loaded = LlamaForCausalLM.from_pretrained(hf_dir)
    expected = first.model.state_dict()
    got = loaded.state_dict()
    same_weights = sorted(got) == sorted(expected) and all(
        torch.equal(got[k], expected[k]) for k in expected
    )
    return {
        "first": first.losses,
        "resumed": resumed.losses,
        "kept": kept,
        "files6": files6,
        "same_weights": same_weights,
        "hf_files": sorted(os.listdir(hf_dir)),
    }


class Counter:
    """A custom object registered for checkpointing."""

    def __init__(self) -> None:
        self.n = 0

    def state_dict(self) -> dict[str, int]:
        return {"n": self.n}

    def load_state_dict(self, sd: dict[str, int]) -> None:
        self.n = sd["n"]


def accelerate_run(out: str) -> dict[str, Any]:
    def build(seed: int) -> tuple[Accelerator, Any, Any, Any, Counter]:
        torch.manual_seed(seed)
        acc = Accelerator(cpu=True)
        model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        model, opt, sched = acc.prepare(model, opt, sched)
        counter = Counter()
        acc.register_for_checkpointing(counter)
        return acc, model, opt, sched, counter

    def step(parts: tuple[Any, ...], i: int) -> float:
        acc, model, opt, sched, counter = parts
        g = torch.Generator().manual_seed(i)
        x = torch.randn(4, 8, generator=g) + 0.1 * torch.randn(4, 8)  # global RNG too
        loss = F.mse_loss(model(x), x.sum(dim=1, keepdim=True).sin())
        acc.backward(loss)
        opt.step()
        sched.step()
        opt.zero_grad()
        counter.n += 1
        return float(loss)

    first = build(0)
    for i in range(3):
        step(first, i)
    path = save_state(first[0], os.path.join(out, "acc"))
    expected = [step(first, i) for i in range(3, 6)]

    second = build(1)
    load_state(second[0], path)
    got = [step(second, i) for i in range(3, 6)]
    return {"expected": expected, "got": got, "counter": second[4].n}


def main() -> None:
    out = sys.argv[1]
    torch.set_num_threads(1)
    result = {"trainer": trainer_run(out), "accelerate": accelerate_run(out)}
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
