"""Fused Triton kernels for training (Liger): imported only on CUDA, applied per architecture."""
from __future__ import annotations

import importlib.util


def supported(model_config, cuda: bool) -> tuple[bool, str]:
    if not cuda:
        return False, "no CUDA (Triton kernels run on GPUs only)"
    if importlib.util.find_spec("liger_kernel") is None:
        return False, "liger-kernel not installed (pip install -r requirements-gpu.txt)"
    arch = getattr(model_config, "model_type", None)
    if arch not in ("llama",):
        return False, f"no fused kernels wired for model_type={arch!r}"
    return True, f"liger kernels for {arch}"


def apply(model) -> list[str]:
    """Patch a loaded model instance in place; returns what was fused."""
    arch = model.config.model_type
    if arch == "llama":
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=True, model=model)
        return ["rope", "rms_norm", "swiglu", "fused_linear_cross_entropy"]
    return []
