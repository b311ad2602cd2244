"""bitsandbytes' optimizers wait for the GPU after every parameter's update; this waits once per step.

bitsandbytes' `Optimizer8bit.step` (0.50; the paged and 8-bit AdamW that `train.optim` names) updates one
parameter at a time and calls `torch.cuda.synchronize()` after each. A LoRA of rank 64 on every linear layer
of a 7B Llama has 448 adapter matrices: 448 device syncs per optimizer step, each leaving the GPU idle while
the host prefetches the next parameter's paged states and launches its update (a profile of a Llama-2-7B
8x512 step on an H200 counted 451 `cudaDeviceSynchronize` and ~900 page prefetches per step). The updates
are kernels on one stream, run in the order they are issued, so none needs a sync before the next.

`sync_once(optimizer)` gives a bitsandbytes optimizer a step that issues the same prefetches and the same
update kernels in the same order and synchronizes once, at the end (where bitsandbytes also does for paged
states): the same arithmetic, bit for bit (tests/unit/kernels/test_optimizer_step.py compares parameters and
states with bitsandbytes' own step). `train.optimizer_sync: per-step` (the default) turns it on: +16% on
an H200 (assets/bench/README.md run 7).
"""
from __future__ import annotations

import types

import torch

_NEEDS = ("initialized", "check_overrides", "to_gpu", "init_state", "prefetch_state", "update_step", "param_groups")


def supported(optimizer) -> bool:
    """A bitsandbytes optimizer whose step is the per-parameter loop this replaces."""
    try:
        from bitsandbytes.optim.optimizer import Optimizer8bit
    except ImportError:
        return False
    return isinstance(optimizer, Optimizer8bit) and all(hasattr(optimizer, a) for a in _NEEDS)


@torch.no_grad()
def _step_sync_once(self, closure=None):
    loss = None
    if closure is not None:
        with torch.enable_grad():
            loss = closure()
    if not self.initialized:
        self.check_overrides()
        self.to_gpu()
        self.initialized = True
    last = None
    for gindex, group in enumerate(self.param_groups):
        for pindex, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            if len(self.state[p]) == 0:
                self.init_state(group, p, gindex, pindex)
            self.prefetch_state(p)
            self.update_step(group, p, gindex, pindex)
            last = p
    if last is not None and last.device.type == "cuda":
        torch.cuda.synchronize(last.device)
    return loss


def sync_once(optimizer) -> bool:
    """Give `optimizer` (a bitsandbytes optimizer) the once-per-step sync; False (unchanged) for any other."""
    if not supported(optimizer):
        return False
    optimizer.step = types.MethodType(_step_sync_once, optimizer)
    return True
