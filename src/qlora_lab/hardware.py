"""Every hardware-dependent choice, made in one place and logged (like nanoGPT's one dtype line).

`plan(cfg, model_config)` looks at the GPU (or its absence), the model's shape, the sequence length
and the memory budget, and returns the compute dtype, the kernels, how many decoder layers recompute
their activations (none, some or all), the micro-batch and the optimizer. Each config key can force a
choice; `reasons` says why each was made, and the training recipe writes the plan to the run folder (plan.json).

The memory model below is an estimate per token and per layer, fitted to the peaks measured by
`qlora-lab bench` on an H100 (assets/bench/README.md); `est_peak_gib` is logged beside the choice so a
wrong estimate shows up next to the measured peak in train_summary.json.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .distributed import fsdp_active, quant_storage, world_size

GiB = 1024**3

# Fraction of the card the planner may fill when no budget is set (the rest: CUDA context, fragmentation).
DEFAULT_FILL = 0.90
# Headroom (GiB) for the allocator's fragmentation, cuBLAS workspaces and the optimizer's temporaries.
SLACK_GIB = 1.5
# The estimate may fill this much of a budget (allocator fragmentation: reserved ran ~10% over allocated).
BUDGET_FILL = 0.93
# A micro-batch costs a fixed overhead, in tokens of compute: the host side of ~10k kernel launches
# (bitsandbytes dequantization, peft's LoRA branches) and dequantizing every weight. Measured on an H100
# (Llama-2-7B shape, 8x512): 4 micro-batches of 2 took 2.26 s a step, 1 of 8 took 0.61 s (~2700 tokens each).
MICRO_BATCH_OVERHEAD_TOKENS = 3000
# Recomputing a frozen-base layer costs half again its forward+backward (the backward of a frozen
# weight is one matmul, like the forward): full checkpointing = +50% matmul work.
RECOMPUTE_COST = 0.5


@dataclass(frozen=True)
class Plan:
    device: str                    # "cuda" or "cpu"
    device_name: str
    compute_dtype: str             # "bfloat16" | "float16" | "float32"
    mixed_precision: str | None    # Trainer flag: "bf16" | "fp16" | None
    gradient_checkpointing: bool   # any layer recomputed
    kernels: str                   # "liger" | "none"
    fused_lora: bool               # LoRA layers through kernels.fused_lora.LoRALinearFunction
    optim: str
    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    memory_budget_gib: float | None
    checkpoint_layers: int | None = 0  # decoder layers that recompute activations (0 = none, None = all)
    est_peak_gib: float | None = None
    reasons: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def recompute(self) -> bool | int:
        """model.set_recomputation's argument: all layers (True), none (False) or the first k."""
        return self.checkpoint_layers if self.gradient_checkpointing and self.checkpoint_layers else \
            self.gradient_checkpointing


def _cuda():
    import torch

    return torch.cuda.is_available()


def resolve_compute_dtype(requested: str, cuda: bool | None = None) -> tuple[str, str]:
    """(dtype, why). bf16 where the GPU has it; fp16 on older GPUs (T4); float32 on a CPU."""
    import torch

    cuda = _cuda() if cuda is None else cuda
    if requested != "auto":
        return requested, "set in config"
    if not cuda:
        return "float32", "no CUDA: float32 on the CPU (bf16 matmuls are emulated there)"
    if torch.cuda.is_bf16_supported(including_emulation=False):
        return "bfloat16", "GPU supports bf16"
    return "float16", "GPU has no bf16 (e.g. T4): fp16 with loss scaling, adapters and norms kept in fp32"


# ----------------------------------------------------------------------------- memory model

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
        # Fused LoRA saves each input once (+1-byte masks) where peft saves input+mask per layer:
        # qkv and h_to_4h share one input (parallel attention), dense's input is kept by SDPA anyway.
        # That alone is 4h; fitted to the H100 peaks of run 3 (32.5 -> 25.4 GiB at 8x512): 13h.
        shared_saving = 13 * h
        # Parallel attention with one layernorm keeps fewer hidden-size vectors than Llama's sequential
        # block: 9 instead of 13, fitted to the same runs (32.5 GiB with peft's LoRA path).
        hidden_vectors = 9
    else:
        m = getattr(mc, "intermediate_size", None) or 4 * h
        kv = hd * (getattr(mc, "num_key_value_heads", None) or heads)
        linears = [(h, h), (h, kv), (h, kv), (h, h), (h, m), (h, m), (m, h)]
        tied = getattr(mc, "tie_word_embeddings", False)
        shared_saving = 10 * h  # q, k, v, gate, up share one input; o_proj's is kept by SDPA anyway
        hidden_vectors = 13
    return dict(h=h, m=m, layers=n, vocab=mc.vocab_size, linears=linears, tied=tied, shared_saving=shared_saving,
                hidden_vectors=hidden_vectors)


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


def activation_bytes_per_token(model_config, checkpointing: bool, seq_len: int = 0,
                               fused_attention: bool = True, fused_lora: bool = False) -> float:
    """Saved activations per token for a LoRA backward (16-bit activations, LoRA on every linear).

    Without recomputation a layer keeps each linear's input, each adapter's dropped-out input and
    mask, the attention inputs and output, the MLP's intermediates: 13 hidden-size (Falcon's parallel
    block: 9) and 3.6 MLP-width 16-bit vectors, fitted to the H100 peaks at 8x512 (bench runs 1 and 3). Falcon's
    attention without our fix stores its T x T scores (SDPA math kernel): 4 x heads x T bytes more.
    With recomputation only the layer's input (one hidden vector) stays. The fused LoRA layer
    (kernels/fused_lora.py) keeps a shared input once where peft keeps a dropped-out copy per layer.
    """
    s = _shape(model_config)
    if checkpointing:
        per_layer = 2 * s["h"]
    else:
        per_layer = 2 * (s["hidden_vectors"] * s["h"] + 3.6 * s["m"])
        if model_config.model_type == "falcon" and not fused_attention:
            per_layer += 4 * model_config.num_attention_heads * seq_len
        if fused_lora:
            per_layer -= s["shared_saving"]
    return s["layers"] * per_layer


def estimate_peak_gib(mc, bits, tokens: int, checkpoint_layers: int, lora_r: int = 64,
                      fused_ce: bool = True, dtype_bytes: int = 2, seq_len: int = 0,
                      fused_lora: bool = False) -> float:
    """Peak GPU memory (GiB) of one training step with `tokens` per micro-batch (fused_ce: our kernels)."""
    s = _shape(mc)
    n = s["layers"]
    full = activation_bytes_per_token(mc, False, seq_len, fused_attention=fused_ce, fused_lora=fused_lora) / n
    ckpt = activation_bytes_per_token(mc, True) / n
    k = max(0, min(n, checkpoint_layers))
    act = tokens * ((n - k) * full + k * ckpt + (full if k else 0))  # + one layer re-materialized
    lora_states = param_counts(mc, lora_r)["lora"] * 16  # fp32 weight, grad, two Adam moments
    logits = 0.25 * GiB if fused_ce else tokens * s["vocab"] * 10  # fp32 logits, their grad, bf16 copy
    return weights_gib(mc, bits, dtype_bytes) + (act + lora_states + logits) / GiB + SLACK_GIB


def choose_batch_and_checkpointing(mc, bits, seq_len: int, global_batch: int, budget_gib: float,
                                   lora_r: int = 64, fused_ce: bool = True,
                                   fused_lora: bool = False) -> tuple[int, int, float, str]:
    """(micro_batch, checkpoint_layers, est_peak_gib, why): the fastest split that fits the budget.

    Cost model in tokens of compute: tokens x (1 + 0.5 x fraction of layers recomputed) plus a fixed
    overhead per micro-batch. Recomputation costs more than splitting the batch, until micro-batches
    get so small that the fixed overhead dominates.
    """
    n = _shape(mc)["layers"]
    best = None
    for micro in sorted((d for d in range(1, global_batch + 1) if global_batch % d == 0), reverse=True):
        tokens = micro * seq_len
        for k in range(n + 1):
            est = estimate_peak_gib(mc, bits, tokens, k, lora_r, fused_ce, seq_len=seq_len, fused_lora=fused_lora)
            if est <= BUDGET_FILL * budget_gib:
                cost = global_batch * seq_len * (1 + RECOMPUTE_COST * k / n) + \
                    (global_batch // micro) * MICRO_BATCH_OVERHEAD_TOKENS
                if best is None or cost < best[0]:
                    best = (cost, micro, k, est)
                break
    if best is None:  # nothing fits: smallest micro-batch, everything recomputed; the run will say OOM
        est = estimate_peak_gib(mc, bits, seq_len, n, lora_r, fused_ce, seq_len=seq_len, fused_lora=fused_lora)
        return 1, n, est, f"nothing fits {budget_gib:.1f} GiB by the estimate (needs {est:.1f}); trying the smallest"
    _, micro, k, est = best
    return micro, k, est, f"est. peak {est:.1f} GiB of {budget_gib:.1f}"


# ----------------------------------------------------------------------------- the plan

def plan(cfg, model_config=None) -> Plan:
    import torch

    t = cfg.train
    cuda = _cuda()
    reasons = []
    dtype, why = resolve_compute_dtype(cfg.quant.bnb_4bit_compute_dtype, cuda)
    reasons.append(f"compute_dtype={dtype}: {why}")
    mixed = {"bfloat16": "bf16", "float16": "fp16"}.get(dtype) if cuda else None

    budget = t.memory_budget_gib
    if cuda:
        total = torch.cuda.get_device_properties(0).total_memory / GiB
        name = torch.cuda.get_device_name(0)
        if budget is None:
            budget = total * DEFAULT_FILL
            reasons.append(f"memory budget {budget:.1f} GiB = {DEFAULT_FILL:.0%} of {name}'s {total:.1f} GiB")
        else:
            reasons.append(f"memory budget {budget:.1f} GiB set in config (GPU has {total:.1f} GiB)")
    else:
        import platform

        name = platform.processor() or "cpu"

    kernels = t.kernels
    if kernels != "none":
        from .kernels import supported

        ok, why = supported(model_config, cuda)
        if kernels == "auto":
            kernels = "liger" if ok else "none"
            reasons.append(f"kernels={kernels}: {why}")
        elif not ok:
            kernels = "none"
            reasons.append(f"kernels=none although liger was asked for: {why}")
        else:
            reasons.append("kernels=liger: set in config")
    else:
        reasons.append("kernels=none: set in config")

    fused_lora = t.fused_lora
    if fsdp_active():
        fused_lora = False
        reasons.append("fused_lora=off: FSDP shards the 4-bit weights (peft + bitsandbytes gather them)")
    elif fused_lora == "auto":
        fused_lora = True
        reasons.append("fused_lora=on: one autograd function per LoRA layer (dequantize, matmul, adapter)")
    else:
        reasons.append(f"fused_lora={'on' if fused_lora else 'off'}: set in config")

    # Per process: the config's global batch divided over the data-parallel processes.
    micro, accum = split_global_batch(t.per_device_train_batch_size, t.gradient_accumulation_steps,
                                      world_size(), reasons)
    if fsdp_active():
        reasons.append(fsdp_words(cfg, dtype, world_size()))
    n_layers = getattr(model_config, "num_hidden_layers", 0) if model_config is not None else 0
    gc = t.gradient_checkpointing
    est = None
    if gc == "auto":
        if not cuda or model_config is None:
            k = 0
            reasons.append("gradient_checkpointing=off: CPU/tiny model, memory is not the limit")
        else:
            # The plan owns the split of the global batch: same sequences per optimizer step either way.
            global_batch = micro * accum
            micro, k, est, why = choose_batch_and_checkpointing(
                model_config, cfg.quant.bits, cfg.data.max_length, global_batch, budget,
                lora_r=cfg.lora.r, fused_ce=kernels == "liger", fused_lora=fused_lora)
            accum = global_batch // micro
            reasons.append(f"gradient_checkpointing={_gc_words(k, n_layers)}, micro-batch {micro} x "
                           f"{accum} accumulation (global batch {global_batch} x {cfg.data.max_length} tokens): "
                           f"{why}")
    else:
        k = n_layers if gc else 0
        if cuda and model_config is not None:
            est = estimate_peak_gib(model_config, cfg.quant.bits, micro * cfg.data.max_length, k,
                                    cfg.lora.r, kernels == "liger", seq_len=cfg.data.max_length,
                                    fused_lora=fused_lora)
        reasons.append(f"gradient_checkpointing={'on' if gc else 'off'}: set in config; micro-batch {micro} "
                       f"x {accum} accumulation as configured")
    if gc is True and not n_layers:
        k = None  # depth unknown here: add_lora recomputes every layer

    optim = t.optim
    if fsdp_active() and (optim.startswith("paged_") or "8bit" in optim or "bnb" in optim):
        # Measured on 2 H200s: --resume of an FSDP run died loading its optimizer state.
        reasons.append(f"optim=adamw_torch: under FSDP a bitsandbytes optimizer ({optim}) nests its states to hide "
                       "them from FSDP's gather, so a checkpoint holds one rank's shard and cannot be loaded back; "
                       "torch's AdamW is the same update (fp32 states), sharded by FSDP")
        optim = "adamw_torch"
    elif not cuda and (optim.startswith("paged_") or optim == "adamw_8bit"):
        reasons.append(f"optim=adamw_torch: {optim} needs CUDA (paged/8-bit states live on the GPU)")
        optim = "adamw_torch"

    return Plan(device="cuda" if cuda else "cpu", device_name=name, compute_dtype=dtype, mixed_precision=mixed,
                gradient_checkpointing=k is None or k > 0, kernels=kernels, fused_lora=fused_lora, optim=optim,
                per_device_train_batch_size=micro, gradient_accumulation_steps=accum,
                memory_budget_gib=round(budget, 2) if budget else None, checkpoint_layers=k,
                est_peak_gib=round(est, 2) if est is not None else None, reasons=reasons)


def fsdp_words(cfg, compute_dtype: str, world: int) -> str:
    """The plan's line for a sharded run (what FSDP changes, and what it leaves as planned)."""
    storage = quant_storage(cfg.quant.bnb_4bit_quant_storage, compute_dtype)[0] if cfg.is_qlora else None
    return (f"fsdp: sharded over {world} GPUs (weights, gradients, optimizer states); "
            + (f"4-bit weights stored as {storage}, everything else {storage}, no fp32 upcast; " if storage else "")
            + "recomputation as planned below (non-reentrant, inside each FSDP unit; FSDP's own activation "
            "checkpointing stays off); the memory estimate counts unsharded weights (an upper bound)")


def split_global_batch(micro: int, accum: int, world: int, reasons: list) -> tuple[int, int]:
    """Keep the config's global batch (micro x accum sequences per step) at any GPU count.

    With N data-parallel processes the accumulation steps are divided by N (else the micro-batch),
    so the learning rate and the schedule mean the same thing on 1 GPU or 8.
    """
    from .errors import ConfigError

    if world == 1:
        return micro, accum
    global_batch = micro * accum
    if accum % world == 0:
        new = (micro, accum // world)
    elif micro % world == 0:
        new = (micro // world, accum)
    elif global_batch % world == 0:
        new = (global_batch // world, 1)
    else:
        raise ConfigError(
            f"train.gradient_accumulation_steps: global batch {micro} x {accum} = {global_batch} sequences "
            f"cannot be split evenly over {world} processes")
    reasons.append(f"global batch {global_batch} sequences over {world} processes: micro-batch {new[0]} x "
                   f"{new[1]} accumulation steps in each")
    return new


def _gc_words(k: int, n: int) -> str:
    return "off" if k == 0 else "on" if k >= n else f"partial ({k} of {n} layers)"


def apply_memory_budget(plan_: Plan) -> None:
    """Cap this process's GPU memory to the budget (what a smaller card would allow)."""
    import torch

    if plan_.device == "cuda" and plan_.memory_budget_gib:
        total = torch.cuda.get_device_properties(0).total_memory
        frac = min(1.0, plan_.memory_budget_gib * GiB / total)
        torch.cuda.set_per_process_memory_fraction(frac, 0)
