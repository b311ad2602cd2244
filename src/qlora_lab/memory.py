"""The memory model: peak GPU memory of one training step, per token and per layer, and the fastest
(micro-batch, recomputed layers) split that fits a budget.

Fitted to the peaks measured by `qlora-lab bench` on an H100 (assets/bench/README.md). plan.py asks it
when train.gradient_checkpointing is auto and logs `est_peak_gib` beside its choice, so a wrong estimate
shows up next to the measured peak in train_summary.json. Pure arithmetic on a model's shape: no torch.
"""
from __future__ import annotations

from typing import NamedTuple

GiB = 1024**3

# Headroom (GiB) for the allocator's fragmentation, cuBLAS workspaces and the optimizer's temporaries.
SLACK_GIB = 1.5
# The estimate may fill this much of a budget (allocator fragmentation: reserved ran ~10% over allocated).
BUDGET_FILL = 0.93
# A micro-batch costs a fixed overhead, in tokens of compute: the host side of ~10k kernel launches
# (bitsandbytes dequantization, peft's LoRA branches) and dequantizing every weight. Measured on an H100
# (Llama-2-7B shape, 8x512): 4 micro-batches of 2 took 2.26 s a step, 1 of 8 took 0.61 s (~2700 tokens each).
MICRO_BATCH_OVERHEAD_TOKENS = 3000
# Recomputing a frozen-base layer costs half again its forward+backward (the backward of a frozen
# weight is one matmul, like the forward): every layer recomputed = +50% matmul work.
RECOMPUTE_COST = 0.5
# A recomputed layer whose input waits in CPU memory (kernels/recompute.py) copies its input out and back:
# priced at this fraction of the step more, so the plan offloads only where that buys a fit or lets enough layers
# keep their activations. Priced from runs 16-17 (H200), when offloaded layers ran eagerly (the layer graphs
# standing aside): 13% (dropout 0.05) and 28% (dropout 0) slower than every layer recomputed with the graphs at
# 8x512, 1% and 17% at 2x2048; 0.13 is about their mean. Since the graphs replay offloaded layers too
# (train.offload_graphs) run 20 (H100, dropout 0, 8x512) measured 0.7% (10,439 against 10,510 tok/s). Kept at 0.13
# until a run measures a budgeted plan that offloads some of its layers: the plan still offloads only to fit.
OFFLOAD_COST = 0.13
# With layer graphs (kernels/graphs.py) and some layers recomputed, the graphs' pool holds the working memory of
# the captured recomputations beside the saved activations: ~5 full layers' activations, measured on an H200
# (Llama-2-7B shape, 4,096 tokens: 8.2 GiB with every layer recomputed against 6.2 eagerly; 14.0 allocated,
# 16.1 reserved at 16 of 32 recomputed, where the eager estimate said 13.9: out of a 15 GiB budget; run 13).
# Part of run 13's excess was the fused MLP holding each recomputed block's input outside save_for_backward (fixed
# since): runs 16-17 measured 7.0 GiB with every layer recomputed against 6.0 offloaded, and reserved memory ~2 GiB
# above allocated wherever graphs replay recomputed layers (10.1 / 12.2 GiB at 22 of 32). Kept at 5 until a run
# measures the 15 GiB plan with fewer layers recomputed.
GRAPH_POOL_LAYERS = 5
# fp16 compute (a T4) keeps the embeddings, norms and head in fp32 (model._prepare_kbit): those weights take 4 bytes
# a value, and the residual stream is fp32, so a recomputed layer's saved input takes 4 bytes a value and a kept
# layer's two norm inputs 2 bytes more each. Without these terms run 15 (H200, fp16, 15 GiB budget) planned 16 of
# 32 layers recomputed at an estimated 13.9 GiB and ran out of memory (13.8 allocated, 15.0 reserved). With them
# the estimate is conservative by ~2.3 GiB against run 12 (20 of 32, without the fused MLP: 15.7 estimated, 13.4
# allocated, 14.8 reserved): on a T4 running out of memory costs more than a few layers recomputed.
FP32_RESIDUAL_VECTORS = 2


def _shape(mc) -> dict:
    """Hidden size, MLP width, layers, vocab and linear-layer shapes (in, out) of one decoder block."""
    h, n = mc.hidden_size, mc.num_hidden_layers
    heads = mc.num_attention_heads
    hd = h // heads
    if mc.model_type == "falcon":
        m = getattr(mc, "ffn_hidden_size", None) or 4 * h
        kv = hd if getattr(mc, "multi_query", True) else h
        linears = [(h, h + 2 * kv), (h, h), (h, m), (m, h)]
        tied = getattr(mc, "tie_word_embeddings", True)
        # Fused LoRA saves each input once (and no mask) where peft saves input+mask per layer:
        # qkv and h_to_4h share one input (parallel attention), dense's input is kept by SDPA anyway.
        # That alone is 4h; fitted to the H100 peaks of run 3 (32.5 -> 25.4 GiB at 8x512): 13h.
        shared_saving = 13 * h
        # Parallel attention with one layernorm keeps fewer hidden-size vectors than Llama's sequential
        # block: 9 instead of 13, fitted to the same runs (32.5 GiB with peft's LoRA path).
        hidden_vectors = 9
        mask_bytes = 3 * h + m  # dropout masks: qkv and h_to_4h (one input each), dense, 4h_to_h
        # The fused MLP keeps GELU's input, not its output: 2m bytes by count, but the peak fell by m bytes a token
        # and layer (21.9 -> 19.9 GiB at 8x512: h200x2-run8 against h200-run15), so that is what is priced.
        mlp_saving = m
    else:
        m = getattr(mc, "intermediate_size", None) or 4 * h
        kv = hd * (getattr(mc, "num_key_value_heads", None) or heads)
        linears = [(h, h), (h, kv), (h, kv), (h, h), (h, m), (h, m), (m, h)]
        tied = getattr(mc, "tie_word_embeddings", False)
        shared_saving = 10 * h  # q, k, v, gate, up share one input; o_proj's is kept by SDPA anyway
        hidden_vectors = 13
        mask_bytes = 6 * h + m  # dropout masks: q, k, v, o, gate, up over hidden-size inputs, down over m
        mlp_saving = 2 * m  # the activation's output (21.4 -> 18.6 GiB at 8x512, run 13)
    return dict(h=h, m=m, layers=n, vocab=mc.vocab_size, linears=linears, tied=tied, shared_saving=shared_saving,
                hidden_vectors=hidden_vectors, mask_bytes=mask_bytes, mlp_saving=mlp_saving)


def param_counts(mc, lora_r: int = 64) -> dict:
    s = _shape(mc)
    linear = s["layers"] * sum(i * o for i, o in s["linears"])
    embed = s["vocab"] * s["h"]
    head = 0 if s["tied"] else embed
    lora = s["layers"] * sum(lora_r * (i + o) for i, o in s["linears"])
    return {"linear": linear, "embed": embed, "lm_head": s["vocab"] * s["h"], "head_stored": head, "lora": lora}


def weights_gib(mc, bits, dtype_bytes: int = 2) -> float:
    """Base weights: NF4 + double-quantized scales (~0.52 byte/param) or 16-bit; embeddings and head 16-bit."""
    p = param_counts(mc)
    per_param = 0.5 * 1.035 if bits == 4 else dtype_bytes
    return (p["linear"] * per_param + (p["embed"] + p["head_stored"]) * dtype_bytes) / GiB


def activation_bytes_per_token(model_config, recomputed: bool, seq_len: int = 0,
                               fused_attention: bool = True, fused_lora: bool = False,
                               fused_mlp: bool = False, offloaded: bool = False,
                               fp32_residual: bool = False) -> float:
    """Saved activations per token for a LoRA backward (16-bit activations, LoRA on every linear),
    with every layer recomputed (`recomputed`) or none.

    Without recomputation a layer keeps each linear's input, each adapter's dropped-out input and
    mask, the attention inputs and output, the MLP's intermediates: 13 hidden-size (Falcon's parallel
    block: 9) and 3.6 MLP-width 16-bit vectors, fitted to the H100 peaks at 8x512 (bench runs 1 and 3). Falcon's
    attention without our fix stores its T x T scores (SDPA math kernel): 4 x heads x T bytes more.
    With recomputation only the layer's input (one hidden vector) stays, and with `offloaded` not even
    that (it waits in CPU memory). The fused LoRA layer (kernels/fused_lora.py) keeps a shared input once
    where peft keeps a dropped-out copy per layer, and no dropout mask (its backward draws the mask again).
    (The fits above were made with peft's 1-byte masks at lora_dropout 0.05.) The fused MLP
    (kernels/lora_mlp.py) does not keep the activation's output, the down projection's input: one MLP-width
    vector less (Llama; Falcon's measured peak fell by half that). `fp32_residual` (fp16 compute): the
    residual stream in fp32 (FP32_RESIDUAL_VECTORS).
    """
    s = _shape(model_config)
    if recomputed:
        per_layer = 0 if offloaded else (4 if fp32_residual else 2) * s["h"]
    else:
        per_layer = 2 * (s["hidden_vectors"] * s["h"] + 3.6 * s["m"])
        if model_config.model_type == "falcon" and not fused_attention:
            per_layer += 4 * model_config.num_attention_heads * seq_len
        if fused_lora:
            per_layer -= s["shared_saving"] + s["mask_bytes"]
            if fused_mlp:
                per_layer -= s["mlp_saving"]
        if fp32_residual:
            per_layer += 2 * FP32_RESIDUAL_VECTORS * s["h"]
    return s["layers"] * per_layer


def estimate_peak_gib(mc, bits, tokens: int, recompute_layers: int, lora_r: int = 64,
                      fused_ce: bool = True, dtype_bytes: int = 2, seq_len: int = 0,
                      fused_lora: bool = False, fused_mlp: bool = False, offload: bool = False,
                      graphs: bool = False, fp16: bool = False) -> float:
    """Peak GPU memory (GiB) of one training step with `tokens` per micro-batch and the first
    `recompute_layers` decoder layers recomputed (fused_ce: our kernels; offload: their inputs in CPU memory;
    graphs: the layers replay from CUDA graphs, whose pool is counted where recomputed inputs stay on the GPU: with
    offloaded inputs nothing of an offloaded layer outlives its own replay (bench run 20, every layer offloaded:
    6.0 GiB allocated with the graphs, 5.8 without, against an estimate of 8.1); fp16: fp16
    compute with fp32 embeddings, norms and head, as a T4 trains)."""
    s = _shape(mc)
    n = s["layers"]
    full = activation_bytes_per_token(mc, False, seq_len, fused_attention=fused_ce, fused_lora=fused_lora,
                                      fused_mlp=fused_mlp, fp32_residual=fp16) / n
    ckpt = activation_bytes_per_token(mc, True, offloaded=offload, fp32_residual=fp16) / n
    k = max(0, min(n, recompute_layers))
    act = tokens * ((n - k) * full + k * ckpt + (full if k else 0))  # + one layer re-materialized
    if graphs and k and not offload:
        act += tokens * GRAPH_POOL_LAYERS * full
    p = param_counts(mc, lora_r)
    lora_states = p["lora"] * 16  # fp32 weight, grad, two Adam moments
    logits = 0.25 * GiB if fused_ce else tokens * s["vocab"] * 10  # fp32 logits, their grad, bf16 copy
    fp32_extra = 2 * (p["embed"] + p["head_stored"]) if fp16 else 0  # embeddings and head kept in fp32
    return weights_gib(mc, bits, dtype_bytes) + (act + lora_states + logits + fp32_extra) / GiB + SLACK_GIB


class Fit(NamedTuple):
    micro_batch: int
    recompute_layers: int
    est_peak_gib: float
    why: str
    offload: bool = False  # the recomputed layers keep their inputs in CPU memory


def fastest_fit(mc, bits, seq_len: int, global_batch: int, budget_gib: float, lora_r: int = 64,
                fused_ce: bool = True, fused_lora: bool = False, fused_mlp: bool = False,
                offload: str | bool = False, graphs: bool = False, fp16: bool = False) -> Fit:
    """The fastest (micro-batch, recomputed layers, offloaded or not) split that fits the budget.

    Cost model in tokens of compute: tokens x (1 + 0.5 x fraction of layers recomputed) plus a fixed
    overhead per micro-batch, x (1 + OFFLOAD_COST) where the recomputed layers are offloaded. Recomputation
    costs more than splitting the batch, until micro-batches get so small that the fixed overhead dominates.
    offload: False (never), True (always, where a layer is recomputed) or "auto" (where it is fastest).
    """
    n = _shape(mc)["layers"]
    modes = {False: (False,), True: (True,), "auto": (False, True)}[offload]
    best = None
    for off in modes:
        for micro in sorted((d for d in range(1, global_batch + 1) if global_batch % d == 0), reverse=True):
            tokens = micro * seq_len
            for k in range(n + 1):
                est = estimate_peak_gib(mc, bits, tokens, k, lora_r, fused_ce, seq_len=seq_len, fused_lora=fused_lora,
                                        fused_mlp=fused_mlp, offload=off, graphs=graphs, fp16=fp16)
                if est <= BUDGET_FILL * budget_gib:
                    cost = (global_batch * seq_len * (1 + RECOMPUTE_COST * k / n) +
                            (global_batch // micro) * MICRO_BATCH_OVERHEAD_TOKENS) * (1 + OFFLOAD_COST * (off and k > 0))
                    if best is None or cost < best[0]:
                        best = (cost, micro, k, est, off and k > 0)
                    break
    if best is None:  # nothing fits: smallest micro-batch, everything recomputed; the run will say OOM
        off = modes[-1]
        est = estimate_peak_gib(mc, bits, seq_len, n, lora_r, fused_ce, seq_len=seq_len, fused_lora=fused_lora,
                                fused_mlp=fused_mlp, offload=off, graphs=graphs, fp16=fp16)
        return Fit(1, n, est, f"nothing fits {budget_gib:.1f} GiB by the estimate (needs {est:.1f}); trying the "
                   "smallest", off)
    _, micro, k, est, off = best
    return Fit(micro, k, est, f"est. peak {est:.1f} GiB of {budget_gib:.1f}" + (", inputs offloaded" if off else ""),
               off)
