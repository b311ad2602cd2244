"""A dropout mask kept for the backward in 1 bit per element instead of torch's 1 byte.

The fused LoRA layer (fused_lora.py) keeps each adapter's dropout mask until the backward. With
lora_dropout > 0 a Llama-2-7B layer has seven of them (q, k, v, o, gate, up over hidden-size inputs,
down over the MLP width): 6h + m bytes per token, 4.4 GiB over 32 layers at 8x512, the biggest item a
no-recomputation step keeps beside the activations themselves. Packed eight to a byte they take 0.55 GiB.
The mask is the same one (unpacked bit for bit), so training is unchanged; packing costs two small
elementwise kernels in the forward and two in the backward per layer.
"""
from __future__ import annotations

import torch

_WEIGHTS: dict = {}  # device -> the uint8 bit weights 1, 2, 4, ..., 128


def _weights(device) -> torch.Tensor:
    w = _WEIGHTS.get(device)
    if w is None:
        w = _WEIGHTS[device] = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=device)
    return w


def pack(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as uint8, eight elements (in memory order) per byte; the last byte zero-padded."""
    flat = mask.reshape(-1).view(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return (flat.view(-1, 8) * _weights(flat.device)).sum(1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, shape) -> torch.Tensor:
    """The bool tensor of `shape` that `pack` was given."""
    bits = packed.unsqueeze(1).bitwise_and(_weights(packed.device)).ne(0).view(-1)
    n = torch.Size(shape).numel()
    return (bits if bits.numel() == n else bits[:n]).view(shape)
