"""Fused Triton kernels for training (Liger): imported only on CUDA, applied per architecture.

Llama: Liger's RoPE, RMSNorm, SwiGLU and fused linear cross-entropy (the head's matmul and the loss
in chunks: the (tokens x vocab) logits are never stored). Falcon-7B has no Liger model patch (only
Falcon-H1 does): its fused linear cross-entropy goes through `fuse_lm_head_loss` (any causal LM), and
`falcon_flash_attention` lets SDPA use its fused kernel (transformers hands it one K/V head for 71
query heads and a materialized mask, which only SDPA's math kernel takes: T x T scores stored per
layer, out of memory at 2 x 2048 on an H100). LayerNorm and GELU are single PyTorch kernels already.
"""
from __future__ import annotations

import importlib.util
import types

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


def falcon_flash_attention(model) -> int:
    """Same attention maths, fused SDPA kernel: K/V broadcast to every head, mask dropped when causal.

    The mask is dropped only when it is plain causal (no padding, no cache); SDPA then runs with
    is_causal=True. Falcon's create_causal_mask gets no position_ids, so that is all it would build.
    """
    from transformers.models.falcon import modeling_falcon as mf

    n = 0
    for m in model.modules():
        if isinstance(m, mf.FalconAttention) and m.multi_query and not m.new_decoder_architecture:
            split = m._split_heads

            def split_expanded(fused_qkv, _split=split):
                q, k, v = _split(fused_qkv)
                return q, k.expand_as(q), v.expand_as(q)

            m._split_heads = split_expanded
            m.num_kv_heads = m.num_heads
            n += 1
    if n and not getattr(mf.create_causal_mask, "_qlora_lab", False):
        original = mf.create_causal_mask

        def create_causal_mask(*a, **kw):
            am = kw.get("attention_mask")
            if kw.get("past_key_values") is None and not a and (am is None or bool(am.all())):
                return None
            return original(*a, **kw)

        create_causal_mask._qlora_lab = True
        mf.create_causal_mask = create_causal_mask
    return n


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
