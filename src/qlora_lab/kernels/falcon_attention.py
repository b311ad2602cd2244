"""Falcon-7B's multi-query attention through SDPA's fused (flash) kernel instead of its math kernel.

transformers hands SDPA one K/V head for Falcon-7B's 71 query heads and a materialized causal mask,
which only SDPA's math kernel accepts: it stores T x T scores per layer (out of memory at 2 x 2048 on an
H100). Broadcasting K/V to every head (a view, no copy) and dropping a plain causal mask lets SDPA pick
its fused kernel: the same attention, in a fraction of the memory.

The heads are split by slicing: transformers picks Falcon-7B's K and V heads with a Python list index, a
copy whose index tensor travels from the host on every call, which a CUDA graph cannot capture
(graphs.py replays Falcon's layers only where SPLIT marks them).

RoPE then rotates the one K head once, and the result is broadcast as before (`rope_once`): transformers'
rotation of the broadcast K writes all 71 heads, a (tokens x 71 x 64) tensor per layer that attention keeps for
its backward (37 MB at 4,096 tokens in bf16: 1.2 GB over 32 layers without recomputation), made by 71 times the
work. The rotated values are the same, bit for bit; in the backward the 71 heads' gradients are summed before the
rotation's (linear) backward instead of after it, the same sum in another order.
"""
from __future__ import annotations

import types

SPLIT = "_qlora_lab_split_heads"  # on a FalconAttention: its heads are split by split_heads below


def split_heads(attention, fused_qkv):
    """Falcon-7B's (multi-query) q, k, v from the fused projection's output: 71 query heads, then one K and
    one V head broadcast to all 71; views of fused_qkv, the values transformers' _split_heads gives."""
    batch, seq, _ = fused_qkv.shape
    qkv = fused_qkv.view(batch, seq, attention.num_heads + 2, attention.head_dim)
    q = qkv[..., :-2, :]
    return q, qkv[..., -2:-1, :].expand_as(q), qkv[..., -1:, :].expand_as(q)


def falcon_flash_attention(model) -> int:
    """Same attention maths, fused SDPA kernel: K/V broadcast to every head, mask dropped when causal.

    The mask is dropped only when it is plain causal (no padding, no cache); SDPA then runs with
    is_causal=True. Falcon's create_causal_mask gets no position_ids, so that is all it would build.
    """
    from transformers.models.falcon import modeling_falcon as mf

    n = 0
    for m in model.modules():
        if isinstance(m, mf.FalconAttention) and m.multi_query and not m.new_decoder_architecture:
            if not m.__dict__.get(SPLIT):
                m._split_heads = types.MethodType(split_heads, m)
                m.num_kv_heads = m.num_heads
                m.__dict__[SPLIT] = True
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
    if n and not getattr(mf.apply_rotary_pos_emb, "_qlora_lab", False):
        mf.apply_rotary_pos_emb = rope_once(mf.apply_rotary_pos_emb)
    return n


def rope_once(apply_rotary_pos_emb):
    """transformers' apply_rotary_pos_emb(q, k, cos, sin, ...), rotating a K that is one head broadcast to every
    query head (split_heads: stride 0 across heads) once and broadcasting the result; any other K as before."""
    def rope(q, k, cos, sin, *a, **kw):
        if k.dim() == 4 and k.shape[1] > 1 and k.stride(1) == 0:
            q_embed, k_embed = apply_rotary_pos_emb(q, k[:, :1], cos, sin, *a, **kw)
            return q_embed, k_embed.expand_as(k)
        return apply_rotary_pos_emb(q, k, cos, sin, *a, **kw)

    rope._qlora_lab = True
    rope.__wrapped__ = apply_rotary_pos_emb
    return rope
