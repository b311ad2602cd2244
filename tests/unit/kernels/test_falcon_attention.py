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


def test_rope_rotates_the_broadcast_key_head_once():
    """The rotated K is one head broadcast (stride 0 across heads, no (tokens x heads) copy), with the values
    transformers' rotation of the broadcast K gives, bit for bit; a training step gives its loss and adapter
    gradients (the heads' gradients summed in another order: fp32 rounding)."""
    from transformers.models.falcon import modeling_falcon as mf

    from .test_fused_lora import _loss_and_grads

    model = _model("tiny_falcon_qlora", "lora.lora_dropout=0.0")
    falcon_flash_attention(model)
    rope = mf.apply_rotary_pos_emb
    assert rope._qlora_lab and rope.__wrapped__ is not rope
    attention = model.get_base_model().transformer.h[0].self_attention
    d, h = attention.head_dim, attention.num_heads
    q, k, _ = (t.transpose(1, 2) for t in split_heads(attention, torch.randn(2, 5, (h + 2) * d)))
    cos, sin = torch.randn(2, 5, d), torch.randn(2, 5, d)
    q1, k1 = rope(q, k, cos, sin)
    q0, k0 = rope.__wrapped__(q, k, cos, sin)
    assert torch.equal(q1, q0) and torch.equal(k1, k0)
    assert k1.stride(1) == 0 and k0.stride(1) != 0
    q2, k2 = rope(q, k.contiguous(), cos, sin)  # a K of its own per head: transformers' rotation as it is
    assert torch.equal(k2, k0) and k2.stride(1) != 0

    x = torch.randint(4, 200, (2, 12))
    torch.manual_seed(3)
    loss, got = _loss_and_grads(model, x)
    mf.apply_rotary_pos_emb = rope.__wrapped__
    try:
        torch.manual_seed(3)
        ref_loss, ref = _loss_and_grads(model, x)
    finally:
        mf.apply_rotary_pos_emb = rope
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-7)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-7, msg=name)
    assert any(g.abs().sum() > 0 for n, g in got.items() if "query_key_value.lora_B" in n)
