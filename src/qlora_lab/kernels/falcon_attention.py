"""Falcon-7B's multi-query attention through SDPA's fused (flash) kernel instead of its math kernel.

transformers hands SDPA one K/V head for Falcon-7B's 71 query heads and a materialized causal mask,
which only SDPA's math kernel accepts: it stores T x T scores per layer (out of memory at 2 x 2048 on an
H100). Broadcasting K/V to every head (a view, no copy) and dropping a plain causal mask lets SDPA pick
its fused kernel: the same attention, in a fraction of the memory.
"""
from __future__ import annotations


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
