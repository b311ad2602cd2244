"""What every bench path trains: the shapes, the LoRA and optimizer settings, the synthetic batches.

One place, so that ours, the standard recipe and a peer cannot drift apart. The peer's worker
(unsloth_worker.py) cannot import this module (it runs in another interpreter); it gets the numbers
from `peer.worker_spec` and replays `synthetic_examples` in plain torch (a test compares them bit for bit).
"""
from __future__ import annotations

from dataclasses import dataclass

LORA_R = 64              # every path's LoRA rank (ours: bench_config; the standard recipe: baseline.load)
LORA_ALPHA = 16
LOSS_STEPS = 20          # steps whose losses must agree between the two paths
LOSS_TOLERANCE = 0.01    # relative
BATCH_SEED = 1234        # seeds the synthetic batches (with the shape), the same for every path
# Variants that only change these keys run inside the "ours" process, on the model it already loaded.
RUNTIME_KEYS = ("train.fused_lora", "train.gradient_checkpointing", "train.memory_budget_gib", "train.optimizer_sync",
                "train.optimizer_direct", "train.optimizer_fused", "train.group_lora", "train.nf4_kernel",
                "train.cuda_graphs", "train.fused_mlp", "train.offload_checkpoints", "train.offload_graphs")


@dataclass(frozen=True)
class Shape:
    seq_len: int
    batch_size: int

    @property
    def tokens(self) -> int:
        return self.seq_len * self.batch_size

    def __str__(self) -> str:
        return f"{self.batch_size}x{self.seq_len}"


def default_warmup(steps: int) -> int:
    return max(1, min(5, steps // 4))


def bench_config(preset: str, shape: Shape, steps: int, budget, overrides=()):
    """Our path's config for one bench row (raises ConfigError on a bad override: the CLI checks early)."""
    from ..config import from_dict

    raw = {"model": {"random_init": preset},
           "lora": {"r": LORA_R, "lora_alpha": LORA_ALPHA, "lora_dropout": 0.05, "target_modules": "all-linear"},
           "data": {"max_length": shape.seq_len, "eval_size": 0},
           "train": {"max_steps": steps, "per_device_train_batch_size": shape.batch_size,
                     "gradient_accumulation_steps": 1, "learning_rate": 2e-4, "lr_scheduler_type": "constant",
                     "warmup_ratio": 0.0, "max_grad_norm": 0.3, "logging_steps": 1, "eval_steps": None,
                     "save_steps": 10**9, "memory_budget_gib": budget},
           "logging": {"report_to": "none"}}
    cfg = from_dict(raw, source="<bench>")
    return cfg.set(*overrides) if overrides else cfg


def synthetic_examples(vocab: int, shape: Shape, steps: int, seed: int = BATCH_SEED) -> list[dict]:
    """steps x batch_size sequences of seq_len tokens: a random motif repeated (learnable by copying).

    Every token is trained (labels = input_ids); ids 0-3 (pad, bos, eos, unk) are never drawn.
    Batch i is rows [i * batch_size, (i + 1) * batch_size): every path reads them in order.
    """
    import torch

    g = torch.Generator().manual_seed(seed + shape.seq_len * 1000 + shape.batch_size)
    rows = []
    for _ in range(steps * shape.batch_size):
        period = int(torch.randint(8, 65, (1,), generator=g))
        motif = torch.randint(4, vocab, (period,), generator=g)
        ids = motif.repeat(shape.seq_len // period + 1)[: shape.seq_len].tolist()
        rows.append({"input_ids": ids, "labels": list(ids)})
    return rows
