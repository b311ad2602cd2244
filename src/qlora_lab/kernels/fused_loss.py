"""The head's matmul and the cross-entropy in one fused call, for any causal LM: no (tokens x vocab) logits.

Liger patches Llama's forward itself; for other architectures (Falcon-7B) `fuse_lm_head_loss` replaces
the model's forward in training with one that hands the last hidden states and the head's weight to a
fused linear cross-entropy (`liger_linear_cross_entropy` on a GPU; `torch_linear_cross_entropy`, which
materializes the logits, is the reference the CPU tests use).
"""
from __future__ import annotations

import types


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
