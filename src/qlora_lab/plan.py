"""Every hardware-dependent choice, made in one place and logged (like nanoGPT's one dtype line).

`plan(cfg, model_config)` looks at the GPU (or its absence), the model's shape, the sequence length
and the memory budget, and composes one `_choose_*` function per decision: the compute dtype, the
memory budget, the kernels, fused LoRA, the batch per process, how many decoder layers recompute
their activations (with the micro-batch that goes with it) and the optimizer. Each returns
(value, reason); the reason is None where nothing needs saying (e.g. the optimizer kept as configured).
Each config key can force a choice; the training recipe writes the plan to the run folder (plan.json).

`check_machine(cfg)` refuses a config this machine cannot run (4-bit without bitsandbytes' native
library, uint8 storage under FSDP), before any model loads; config.py only checks the schema.
The estimates behind the automatic choices are in memory.py.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .distributed import fsdp_active, quant_storage, world_size
from .errors import ConfigError
from .memory import GiB, estimate_peak_gib, fastest_fit

# Fraction of the card the planner may fill when no budget is set (the rest: CUDA context, fragmentation).
DEFAULT_FILL = 0.90

# plan.json's keys, in their order (a file format users read; recomputation appears as two keys).
PLAN_JSON_KEYS = ("device", "device_name", "compute_dtype", "mixed_precision", "gradient_checkpointing",
                  "kernels", "fused_lora", "optim", "per_device_train_batch_size", "gradient_accumulation_steps",
                  "memory_budget_gib", "checkpoint_layers", "offload_checkpoints", "est_peak_gib", "reasons")


@dataclass(frozen=True)
class Plan:
    device: str                    # "cuda" or "cpu"
    device_name: str
    compute_dtype: str             # "bfloat16" | "float16" | "float32"
    mixed_precision: str | None    # Trainer flag: "bf16" | "fp16" | None
    kernels: str                   # "liger" | "none"
    fused_lora: bool               # LoRA layers through kernels.fused_lora.LoRALinearFunction
    optim: str
    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    memory_budget_gib: float | None
    recompute_layers: int          # decoder layers (from the first) that recompute activations: 0 = none
    offload_checkpoints: bool = False  # those layers keep their inputs in CPU memory (kernels/recompute.py)
    est_peak_gib: float | None = None
    reasons: list = field(default_factory=list)

    def to_dict(self) -> dict:
        """plan.json: recompute_layers written as `gradient_checkpointing` (any layer) and `checkpoint_layers`."""
        d = dataclasses.asdict(self)
        k = d.pop("recompute_layers")
        d.update(gradient_checkpointing=k > 0, checkpoint_layers=k)
        return {key: d[key] for key in PLAN_JSON_KEYS}


def plan(cfg, model_config) -> Plan:
    """The plan for training `cfg` on this machine; model_config: the model's transformers config."""
    t = cfg.train
    gpu = _gpu()
    cuda = gpu is not None
    reasons = []

    def take(choice):
        value, why = choice
        if why:
            reasons.append(why)
        return value

    dtype = take(_choose_compute_dtype(cfg.quant.bnb_4bit_compute_dtype, cuda))
    budget = take(_choose_memory_budget(t.memory_budget_gib, gpu))
    kernels = take(_choose_kernels(t.kernels, model_config, cuda))
    fused_lora = take(_choose_fused_lora(t.fused_lora))
    # Per process: the config's global batch divided over the data-parallel processes.
    micro, accum = take(_choose_process_batch(t.per_device_train_batch_size, t.gradient_accumulation_steps,
                                              world_size()))
    if fsdp_active():
        reasons.append(fsdp_words(cfg, dtype, world_size()))
    k, micro, accum, est, offload = take(_choose_recomputation(cfg, model_config, cuda, micro, accum, budget,
                                                               kernels, fused_lora, dtype))
    optim = take(_choose_optimizer(t.optim, cuda))
    return Plan(device="cuda" if cuda else "cpu", device_name=gpu[0] if cuda else _cpu_name(),
                compute_dtype=dtype, mixed_precision={"bfloat16": "bf16", "float16": "fp16"}.get(dtype) if cuda else None,
                kernels=kernels, fused_lora=fused_lora, optim=optim, per_device_train_batch_size=micro,
                gradient_accumulation_steps=accum, memory_budget_gib=round(budget, 2) if budget else None,
                recompute_layers=k, offload_checkpoints=offload,
                est_peak_gib=round(est, 2) if est is not None else None, reasons=reasons)


# ----------------------------------------------------------------------------- the machine

def _gpu() -> tuple[str, float] | None:
    """(name, total GiB) of this process's first visible GPU, None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0).total_memory / GiB


def _cpu_name() -> str:
    import platform

    return platform.processor() or "cpu"


def check_machine(cfg) -> None:
    """Refuse what this machine cannot run, before any model loads (ConfigError: one line, exit 2)."""
    from .quant import bitsandbytes_problem

    if not cfg.is_qlora:
        return
    problem = bitsandbytes_problem()
    if problem:
        raise ConfigError(f"{cfg.where('quant', 'bits')}: quant.bits: 4 needs bitsandbytes with a CUDA or CPU "
                          f"backend ({problem}); allowed here: null (16-bit LoRA)")
    if cfg.quant.bnb_4bit_quant_storage == "uint8" and fsdp_active():
        raise ConfigError(f"{cfg.where('quant', 'bnb_4bit_quant_storage')}: quant.bnb_4bit_quant_storage: uint8 "
                          f"cannot be sharded by FSDP (ACCELERATE_USE_FSDP is set); allowed here: auto or "
                          f"the compute dtype")


# ----------------------------------------------------------------------------- one function per decision

def resolve_compute_dtype(requested: str, cuda: bool | None = None) -> tuple[str, str]:
    """(dtype, why). bf16 where the GPU has it; fp16 on older GPUs (T4); float32 on a CPU.
    Also what model.load_model computes in when it is given no plan (generation, merging)."""
    import torch

    cuda = torch.cuda.is_available() if cuda is None else cuda
    if requested != "auto":
        return requested, "set in config"
    if not cuda:
        return "float32", "no CUDA: float32 on the CPU (bf16 matmuls are emulated there)"
    if torch.cuda.is_bf16_supported(including_emulation=False):
        return "bfloat16", "GPU supports bf16"
    return "float16", "GPU has no bf16 (e.g. T4): fp16 with loss scaling, adapters and norms kept in fp32"


def _choose_compute_dtype(requested: str, cuda: bool) -> tuple[str, str]:
    dtype, why = resolve_compute_dtype(requested, cuda)
    return dtype, f"compute_dtype={dtype}: {why}"


def _choose_memory_budget(requested: float | None, gpu: tuple[str, float] | None) -> tuple[float | None, str | None]:
    """GiB the run may use: the config's, else DEFAULT_FILL of the card; none on a CPU."""
    if gpu is None:
        return requested, None
    name, total = gpu
    if requested is None:
        budget = total * DEFAULT_FILL
        return budget, f"memory budget {budget:.1f} GiB = {DEFAULT_FILL:.0%} of {name}'s {total:.1f} GiB"
    return requested, f"memory budget {requested:.1f} GiB set in config (GPU has {total:.1f} GiB)"


def _choose_kernels(requested: str, model_config, cuda: bool) -> tuple[str, str]:
    if requested == "none":
        return "none", "kernels=none: set in config"
    from .kernels import supported

    ok, why = supported(model_config, cuda)
    if requested == "auto":
        kernels = "liger" if ok else "none"
        return kernels, f"kernels={kernels}: {why}"
    if not ok:
        return "none", f"kernels=none although liger was asked for: {why}"
    return "liger", "kernels=liger: set in config"


def _choose_fused_lora(requested: str | bool) -> tuple[bool, str]:
    if fsdp_active():
        return False, "fused_lora=off: FSDP shards the 4-bit weights (peft + bitsandbytes gather them)"
    if requested == "auto":
        return True, "fused_lora=on: one autograd function per LoRA layer (dequantize, matmul, adapter)"
    return requested, f"fused_lora={'on' if requested else 'off'}: set in config"


def _choose_process_batch(micro: int, accum: int, world: int) -> tuple[tuple[int, int], str | None]:
    """((micro-batch, accumulation steps) of each process, why): the config's global batch
    (micro x accum sequences per step) kept at any GPU count.

    With N data-parallel processes the accumulation steps are divided by N (else the micro-batch),
    so the learning rate and the schedule mean the same thing on 1 GPU or 8.
    """
    if world == 1:
        return (micro, accum), None
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
    return new, (f"global batch {global_batch} sequences over {world} processes: micro-batch {new[0]} x "
                 f"{new[1]} accumulation steps in each")


def _choose_recomputation(cfg, model_config, cuda: bool, micro: int, accum: int, budget: float | None,
                          kernels: str, fused_lora: bool,
                          compute_dtype: str = "bfloat16") -> tuple[tuple[int, int, int, float | None, bool], str]:
    """((recompute_layers, micro-batch, accumulation steps, est. peak GiB, offloaded), why).

    auto on a GPU: the fastest split of the same global batch that fits the budget (memory.fastest_fit),
    with the recomputed layers' inputs in CPU memory where train.offload_checkpoints allows and that is
    fastest; the plan owns the split, so an optimizer step sees the same sequences either way.
    """
    t = cfg.train
    requested = t.gradient_checkpointing
    n = model_config.num_hidden_layers
    seq_len = cfg.data.max_length
    fused_mlp = fused_lora and t.fused_mlp
    offload, offload_why = _offload_allowed(t.offload_checkpoints, cuda)
    graphs = _graphs_expected(cfg, model_config, fused_lora, compute_dtype)
    fp32_norms = compute_dtype == "float16" and cfg.is_qlora and not fsdp_active()  # model._prepare_kbit's upcast
    if requested == "auto":
        if not cuda:
            return (0, micro, accum, None, False), "gradient_checkpointing=off: CPU/tiny model, memory is not the limit"
        global_batch = micro * accum
        fit = fastest_fit(model_config, cfg.quant.bits, seq_len, global_batch, budget, lora_r=cfg.lora.r,
                          fused_ce=kernels == "liger", fused_lora=fused_lora, fused_mlp=fused_mlp, offload=offload,
                          graphs=graphs, fp16=fp32_norms)
        accum = global_batch // fit.micro_batch
        return (fit.recompute_layers, fit.micro_batch, accum, fit.est_peak_gib, fit.offload), (
            f"gradient_checkpointing={_recompute_words(fit.recompute_layers, n)}"
            f"{', inputs offloaded to CPU' if fit.offload else ''}, micro-batch {fit.micro_batch} x {accum} "
            f"accumulation (global batch {global_batch} x {seq_len} tokens): {fit.why}"
            + (f"; {offload_why}" if offload_why else ""))
    k = n if requested else 0
    off = bool(k) and offload is True
    est = estimate_peak_gib(model_config, cfg.quant.bits, micro * seq_len, k, cfg.lora.r, kernels == "liger",
                            seq_len=seq_len, fused_lora=fused_lora, fused_mlp=fused_mlp, offload=off,
                            graphs=graphs, fp16=fp32_norms) if cuda else None
    return (k, micro, accum, est, off), (f"gradient_checkpointing={'on' if requested else 'off'}"
                                         f"{', inputs offloaded to CPU' if off else ''}: set in config; "
                                         f"micro-batch {micro} x {accum} accumulation as configured"
                                         + (f"; {offload_why}" if offload_why and k else ""))


def _graphs_expected(cfg, model_config, fused_lora: bool, compute_dtype: str) -> bool:
    """Whether the layers will replay from CUDA graphs (kernels/graphs.py decides at load; this is its rule on
    what the plan knows), whose pool the memory estimate counts."""
    from .kernels.graphs import VERIFIED

    return bool(cfg.train.cuda_graphs and fused_lora and compute_dtype != "float16" and world_size() == 1
                and getattr(model_config, "model_type", None) in VERIFIED)


def _offload_allowed(requested: str | bool, cuda: bool) -> tuple[str | bool, str | None]:
    """(False | True | "auto", why not where it was asked for): offloaded checkpoints need one CUDA GPU."""
    if requested is False:
        return False, None
    if not cuda:
        return False, None if requested == "auto" else "offload_checkpoints=off: no CUDA (pinned memory, copy stream)"
    if world_size() > 1 or fsdp_active():
        return False, None if requested == "auto" else (
            "offload_checkpoints=off: several processes (their gradient hooks expect torch's own checkpoint)")
    return requested, None


def _choose_optimizer(requested: str, cuda: bool) -> tuple[str, str | None]:
    if fsdp_active() and (requested.startswith("paged_") or "8bit" in requested or "bnb" in requested):
        # Measured on 2 H200s: --resume of an FSDP run died loading its optimizer state.
        return "adamw_torch", (
            f"optim=adamw_torch: under FSDP a bitsandbytes optimizer ({requested}) nests its states to hide "
            "them from FSDP's gather, so a checkpoint holds one rank's shard and cannot be loaded back; "
            "torch's AdamW is the same update (fp32 states), sharded by FSDP")
    if not cuda and (requested.startswith("paged_") or requested == "adamw_8bit"):
        return "adamw_torch", f"optim=adamw_torch: {requested} needs CUDA (paged/8-bit states live on the GPU)"
    return requested, None


def _recompute_words(k: int, n: int) -> str:
    return "off" if k == 0 else "on" if k >= n else f"partial ({k} of {n} layers)"


# ----------------------------------------------------------------------------- beside the choices

def fsdp_words(cfg, compute_dtype: str, world: int) -> str:
    """The plan's line for a sharded run (what FSDP changes, and what it leaves as planned)."""
    storage = quant_storage(cfg.quant.bnb_4bit_quant_storage, compute_dtype)[0] if cfg.is_qlora else None
    return (f"fsdp: sharded over {world} GPUs (weights, gradients, optimizer states); "
            + (f"4-bit weights stored as {storage}, everything else {storage}, no fp32 upcast; " if storage else "")
            + "recomputation as planned below (non-reentrant, inside each FSDP unit; FSDP's own activation "
            "checkpointing stays off); the memory estimate counts unsharded weights (an upper bound)")


def apply_memory_budget(plan_: Plan) -> None:
    """Cap this process's GPU memory to the budget (what a smaller card would allow)."""
    import torch

    if plan_.device == "cuda" and plan_.memory_budget_gib:
        total = torch.cuda.get_device_properties(0).total_memory
        frac = min(1.0, plan_.memory_budget_gib * GiB / total)
        torch.cuda.set_per_process_memory_fraction(frac, 0)
