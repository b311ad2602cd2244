"""Fused Triton kernels for training (Liger): imported only on CUDA, applied per architecture.

Llama: Liger's RoPE, RMSNorm, SwiGLU and fused linear cross-entropy (the head's matmul and the loss
in chunks: the (tokens x vocab) logits are never stored). Falcon-7B has no Liger model patch (only
Falcon-H1 does), so only the fused linear cross-entropy is wired, through `fuse_lm_head_loss`, which
works for any causal LM; its LayerNorm and GELU are single PyTorch kernels already.
"""
from __future__ import annotations

import importlib.util
import types

WIRED = {"llama": ("rope", "rms_norm", "swiglu", "fused_linear_cross_entropy"),
         "falcon": ("fused_linear_cross_entropy",)}


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
    if arch in WIRED:
        fuse_lm_head_loss(model, liger_linear_cross_entropy)
        return list(WIRED[arch])
    return []


def liger_linear_cross_entropy(weight, hidden, targets, reduction: str):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return liger_fused_linear_cross_entropy(hidden, weight, targets, ignore_index=-100, reduction=reduction)


def torch_linear_cross_entropy(weight, hidden, targets, reduction: str):
    """Reference for `liger_linear_cross_entropy` (materializes the logits): CPU tests use it."""
    import torch.nn.functional as F

    logits = (hidden @ weight.t()).float()
    return F.cross_entropy(logits, targets, ignore_index=-100, reduction=reduction)


def fuse_lm_head_loss(model, linear_cross_entropy) -> None:
    """Replace `model.forward` so that, in training with labels, the head and the loss run fused.

    Same loss as transformers' ForCausalLMLoss: labels shifted left by one, -100 ignored, summed over
    tokens and divided by `num_items_in_batch` when the Trainer passes it (gradient accumulation),
    else averaged. No logits are returned then (nothing in training reads them). Eval and generation
    keep the original forward.
    """
    import torch
    from transformers.modeling_outputs import CausalLMOutputWithPast

    original = model.forward
    backbone = getattr(model, model.base_model_prefix)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None,
                num_items_in_batch=None, **kwargs):
        if labels is None or not self.training:
            return original(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            labels=labels, **kwargs)
        kwargs.pop("use_cache", None)
        kwargs.pop("return_dict", None)
        out = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False, **kwargs)
        hidden = out[0]
        weight = self.get_output_embeddings().weight
        # Shift the labels, not the hidden states: no copy of the (tokens x hidden) activations.
        targets = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].reshape(-1)
        hidden = hidden.reshape(-1, hidden.shape[-1]).to(weight.dtype)
        if num_items_in_batch is not None:
            loss = linear_cross_entropy(weight, hidden, targets, "sum") / num_items_in_batch
        else:
            loss = linear_cross_entropy(weight, hidden, targets, "mean")
        return CausalLMOutputWithPast(loss=loss, logits=None)

    model.forward = types.MethodType(forward, model)
