"""kernels/falcon_attention.py on the CPU: the heads split by slicing are transformers' heads, as views."""
from __future__ import annotations

import torch

from qlora_lab.kernels.falcon_attention import SPLIT, falcon_flash_attention, split_heads

from .test_fused_lora import _model


def test_sliced_heads_are_transformers_heads_broadcast_without_a_copy():
    model = _model("tiny_falcon_qlora", "lora.lora_dropout=0.0")
    attention = model.get_base_model().transformer.h[0].self_attention
    assert attention.multi_query and not attention.new_decoder_architecture
    d, h = attention.head_dim, attention.num_heads
    fused = torch.randn(2, 5, (h + 2) * d)
    q0, k0, v0 = attention._split_heads(fused)  # transformers' own: a list index picks K and V
    assert k0.shape == (2, 5, 1, d)
    q, k, v = split_heads(attention, fused)
    assert torch.equal(q, q0) and torch.equal(k, k0.expand_as(q0)) and torch.equal(v, v0.expand_as(q0))
    for t in (q, k, v):  # views of the projection's output: nothing copied, no index tensor made
        assert t.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
    assert falcon_flash_attention(model) == model.config.num_hidden_layers
    assert falcon_flash_attention(model) == model.config.num_hidden_layers  # twice: split once, not wrapped again
    assert attention.__dict__[SPLIT] and attention.num_kv_heads == h
    q1, k1, _ = attention._split_heads(fused)
    assert torch.equal(k1, k) and k1.stride() == k.stride()
