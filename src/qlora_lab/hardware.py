"""Every hardware-dependent choice, made in one place and logged (like nanoGPT's one dtype line).

`plan(cfg)` looks at the GPU (or its absence), the model's shape, the sequence length and the memory
budget, and returns the compute dtype, whether to recompute activations, the kernels, the optimizer
and the micro-batch. Each config key can force a choice; `reasons` says why each was made.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

GiB = 1024**3


@dataclass(frozen=True)
class Plan:
    device: str                    # "cuda" or "cpu"
    device_name: str
    compute_dtype: str             # "bfloat16" | "float16" | "float32"
    mixed_precision: str | None    # Trainer flag: "bf16" | "fp16" | None
    gradient_checkpointing: bool
    kernels: str                   # "liger" | "none"
    optim: str
    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    memory_budget_gib: float | None
    reasons: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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


def activation_bytes_per_token(model_config, checkpointing: bool) -> float:
    """Rough bytes of saved activations per token for a LoRA backward (16-bit activations).

    Without recomputation every decoder layer keeps its linear inputs and MLP intermediates:
    about 34*hidden + 3*mlp_width values per layer; with it, only each layer's input.
    """
    h = model_config.hidden_size
    layers = model_config.num_hidden_layers
    mlp = getattr(model_config, "intermediate_size", None) or getattr(model_config, "ffn_hidden_size", None) or 4 * h
    if checkpointing:
        per_layer = 2 * h
    else:
        per_layer = 2 * (17 * h + 3 * mlp)
    return layers * per_layer


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
            budget = total * 0.92
            reasons.append(f"memory budget {budget:.1f} GiB = 92% of {name}'s {total:.1f} GiB")
        else:
            reasons.append(f"memory budget {budget:.1f} GiB set in config (GPU has {total:.1f} GiB)")
    else:
        import platform

        name = platform.processor() or "cpu"

    # Recompute activations only when the saved ones would not fit the budget.
    gc = t.gradient_checkpointing
    if gc == "auto":
        if not cuda or model_config is None:
            gc = False
            reasons.append("gradient_checkpointing=off: CPU/tiny model, memory is not the limit")
        else:
            tokens = t.per_device_train_batch_size * cfg.data.max_length
            act = activation_bytes_per_token(model_config, checkpointing=False) * tokens / GiB
            weights = _weights_gib(model_config, cfg.quant.bits)
            need = weights + act + 2.0  # + LoRA states, logits, allocator slack
            gc = need > budget
            reasons.append(f"gradient_checkpointing={'on' if gc else 'off'}: est. {weights:.1f} GiB weights + "
                           f"{act:.1f} GiB activations for {tokens} tokens/micro-batch vs {budget:.1f} GiB budget")
    else:
        reasons.append(f"gradient_checkpointing={'on' if gc else 'off'}: set in config")

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

    optim = t.optim
    if not cuda and optim.startswith("paged_") or (not cuda and optim == "adamw_8bit"):
        reasons.append(f"optim=adamw_torch: {optim} needs CUDA (paged/8-bit states live on the GPU)")
        optim = "adamw_torch"

    return Plan(device="cuda" if cuda else "cpu", device_name=name, compute_dtype=dtype, mixed_precision=mixed,
                gradient_checkpointing=bool(gc), kernels=kernels, optim=optim,
                per_device_train_batch_size=t.per_device_train_batch_size,
                gradient_accumulation_steps=t.gradient_accumulation_steps,
                memory_budget_gib=budget, reasons=reasons)


def _weights_gib(model_config, bits) -> float:
    h, layers = model_config.hidden_size, model_config.num_hidden_layers
    mlp = getattr(model_config, "intermediate_size", None) or 4 * h
    vocab = model_config.vocab_size
    linear = layers * (4 * h * h + 3 * h * mlp)
    embed = 2 * vocab * h
    per_param = 0.5 * 1.03 if bits == 4 else 2.0  # NF4 + double-quantized scales
    return (linear * per_param + embed * 2) / GiB


def apply_memory_budget(plan_: Plan) -> None:
    """Cap this process's GPU memory to the budget (what a smaller card would allow)."""
    import torch

    if plan_.device == "cuda" and plan_.memory_budget_gib:
        total = torch.cuda.get_device_properties(0).total_memory
        frac = min(1.0, plan_.memory_budget_gib * GiB / total)
        torch.cuda.set_per_process_memory_fraction(frac, 0)
