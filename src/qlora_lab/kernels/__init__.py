"""Speed levers, one file each; every one keeps the maths and the saved files, only the route changes.

`fused_lora.py` runs each peft LoRA linear layer (4-bit or 16-bit base) as one autograd function:
dequantize, base matmul, dropout, A, B, in a handful of kernels instead of a chain of modules
(`enable` / `disable` / `count` / `eligible`, `LoRALinearFunction`); the plan turns it on with
`fused_lora`; it keeps no dropout mask (the backward draws it again). `liger.py` wires Liger's
Triton kernels per architecture (Llama: RoPE, RMSNorm, SwiGLU, fused linear cross-entropy; Falcon: the
fused loss and flash attention below): `supported` tells the plan whether they apply, `apply` patches a
loaded model before LoRA is attached. `fused_loss.py`: the head and the loss fused for any causal LM.
`falcon_attention.py`: Falcon-7B's multi-query attention through SDPA's fused kernel.
`grouped_lora.py`: fused LoRA layers that share an input as one autograd function (`train.group_lora`).
`nf4.py`: NF4 weights (double quantization included) dequantized in one Triton kernel on CUDA, with
bitsandbytes' own dequantization everywhere else. `optimizer_step.py`: a bitsandbytes optimizer step with
one device sync instead of one per parameter (`train.optimizer_sync`); `fused_adam.py`: its 32-bit paged AdamW
for every adapter tensor in one Triton launch, the states pooled in one paged buffer (`train.optimizer_fused`). `dropout.py`: adapter dropout on the GPU
whose mask is a function of (seed, layer, element), drawn again in the backward without a generator to rewind.
`graphs.py`: every decoder layer's forward and backward replayed from CUDA graphs (`train.cuda_graphs`).
`lora_mlp.py`: each LoRA MLP block as one autograd function (`train.fused_mlp`). `recompute.py`: what a
recomputed layer may skip, and offloaded checkpoints (`train.offload_checkpoints`). `levers.py`: all of them
switched to a plan in one place (`train` at load, the bench between rows).
"""
from __future__ import annotations

from . import dropout, falcon_attention, fused_lora, fused_loss, graphs, grouped_lora, liger, nf4, optimizer_step
from .fused_lora import LoRALinearFunction, count, disable, eligible, enable
from .liger import apply, supported

__all__ = ["dropout", "graphs", "falcon_attention", "fused_lora", "fused_loss", "grouped_lora", "liger", "nf4", "optimizer_step",
           "LoRALinearFunction", "enable", "disable", "count", "eligible", "apply", "supported"]
