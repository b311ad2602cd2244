"""Speed levers, one file each; every one keeps the maths and the saved files, only the route changes.

`fused_lora.py` runs each peft LoRA linear layer (4-bit or 16-bit base) as one autograd function:
dequantize, base matmul, dropout, A, B, in a handful of kernels instead of a chain of modules
(`enable` / `disable` / `count` / `eligible`, `LoRALinearFunction`); the plan turns it on with
`fused_lora`. `liger.py` wires Liger's Triton kernels per architecture (Llama: RoPE, RMSNorm, SwiGLU,
fused linear cross-entropy; Falcon: fused linear cross-entropy and a flash SDPA path for its
multi-query attention): `supported` tells the plan whether they apply, `apply` patches a loaded
model before LoRA is attached.
"""
from __future__ import annotations

from . import fused_lora, liger
from .fused_lora import LoRALinearFunction, count, disable, eligible, enable
from .liger import apply, supported

__all__ = ["fused_lora", "liger", "LoRALinearFunction", "enable", "disable", "count", "eligible",
           "apply", "supported"]
