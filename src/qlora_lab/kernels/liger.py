"""Fused Triton kernels for training (Liger): imported only on CUDA, applied per architecture.

Llama: Liger's RoPE, RMSNorm, SwiGLU and fused linear cross-entropy (the head's matmul and the loss
in chunks: the (tokens x vocab) logits are never stored). Falcon-7B has no Liger model patch (only
Falcon-H1 does): its fused linear cross-entropy goes through `fused_loss.fuse_lm_head_loss` (any causal
LM), and `falcon_attention.falcon_flash_attention` lets SDPA use its fused kernel. LayerNorm and GELU
are single PyTorch kernels already.
"""
from __future__ import annotations

import importlib.util

from .falcon_attention import falcon_flash_attention
from .fused_loss import fuse_lm_head_loss, liger_linear_cross_entropy

WIRED = {"llama": ("rope", "rms_norm", "swiglu", "fused_linear_cross_entropy"),
         "falcon": ("fused_linear_cross_entropy", "sdpa_flash_mqa")}


def supported(model_config, cuda: bool) -> tuple[bool, str]:
    if not cuda:
        return False, "no CUDA (Triton kernels run on GPUs only)"
    if importlib.util.find_spec("liger_kernel") is None:
        return False, "liger-kernel not installed (pip install -r requirements-gpu.txt)"
    arch = getattr(model_config, "model_type", None)
    if arch not in WIRED:
        return False, f"no fused kernels wired for model_type={arch!r}"
    return True, f"liger kernels for {arch}: {', '.join(WIRED[arch])}"


def apply(model) -> list[str]:
    """Patch a loaded model instance in place (before LoRA is attached); returns what was fused."""
    arch = model.config.model_type
    if arch == "llama":
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=True, model=model)
        return list(WIRED["llama"])
    if arch == "falcon":
        fuse_lm_head_loss(model, liger_linear_cross_entropy)
        falcon_flash_attention(model)
        return list(WIRED[arch])
    return []
