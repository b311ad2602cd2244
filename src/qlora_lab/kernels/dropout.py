"""Adapter dropout on the GPU whose mask is a pure function of (seed, layer, element): no generator to rewind.

The fused LoRA layers (fused_lora.py) do not keep their dropout masks: the backward draws the same mask
again. With torch's dropout that means saving the CUDA generator's state in the forward and rewinding it in
the backward, which a CUDA graph cannot capture (graphs.py replays every decoder layer from one) and which
costs host work twice per layer. Here the mask of element i of layer `salt` is

    keep[i] = uniform_q(philox(seed * 2^20 + salt, c)) >= p
    for element i = b * BLOCK + q * BLOCK/4 + k and Philox counter c = b * BLOCK/4 + k

(each counter gives four uniforms, q < 4, one per quarter of a block: a quarter of the generator's work per
element, as torch's dropout spends), with `seed` one int64 on the GPU. The forward and the backward compute
it from the same three numbers, so the backward (or a recomputed layer, or a graph's replay) gets the
forward's mask bit for bit; keeping it costs nothing. `advance()` draws a new seed from torch's CUDA generator before every training forward of
the model (fused_lora.enable registers it), so each step and micro-batch gets new masks, `set_seed`
reproduces them and a resumed run (whose generator states the Trainer restores) draws on from there. One
kernel applies a mask (x * mask / (1 - p)); one adds a masked gradient into another (dx += mask * g / (1 - p)).

It runs where Triton does (CUDA); the CPU keeps torch's dropout with the generator rewound. The masks
differ from torch's (another generator), not their law: each element kept with probability 1 - p, scaled
by 1 / (1 - p). tests/unit/kernels/test_dropout.py runs the kernel in Triton's CPU interpreter;
tests/integration/test_gpu.py checks the fused layers' gradients against autograd on the same masks.
"""
from __future__ import annotations

import functools

import torch

_SEEDS: dict = {}  # device -> its int64 seed (one element, never reallocated: graphs read it in place)
generation = 0     # how many times advance() ran: a backward checks that no forward drew new masks since its own
BLOCK = 1024


@functools.cache
def _kernel():
    try:
        from ._dropout_triton import dropout
    except ImportError:  # no Triton (a CPU-only install)
        return None
    return dropout


def usable(device) -> bool:
    """Whether adapter dropout on `device` draws its masks here (a GPU with Triton) rather than torch's."""
    return device.type == "cuda" and _kernel() is not None


def seed(device) -> torch.Tensor:
    t = _SEEDS.get(device)
    if t is None:
        t = _SEEDS[device] = torch.empty(1, dtype=torch.int64, device=device)
        _draw(t)
    return t


def _draw(t) -> None:
    t.random_(0, 2**42)  # from the device's torch generator: seeded by set_seed, restored on resume


def advance() -> None:
    """New masks for the next forward (every layer's, on every device in use)."""
    global generation
    generation += 1
    for t in _SEEDS.values():
        _draw(t)


def apply(x2, p: float, salt: int, out=None):
    """x2 (contiguous) with this layer's mask applied and kept elements scaled by 1 / (1 - p)."""
    out = torch.empty_like(x2) if out is None else out
    _launch(x2, out, p, salt, add=False)
    return out


def add_masked_(acc, g, p: float, salt: int):
    """acc += mask * g / (1 - p), the mask the forward of layer `salt` drew for an input of acc's shape."""
    _launch(g, acc, p, salt, add=True)
    return acc


def _launch(x, out, p: float, salt: int, add: bool) -> None:
    if not (x.is_contiguous() and out.is_contiguous() and x.shape == out.shape):
        raise ValueError(f"dropout kernel: contiguous tensors of one shape expected, got {tuple(x.shape)} "
                         f"and {tuple(out.shape)}")
    n = x.numel()
    _kernel()[(-(-n // BLOCK),)](x, out, seed(x.device), int(salt), n, float(p), 1.0 / (1.0 - p),
                                 ADD=add, BLOCK=BLOCK)
