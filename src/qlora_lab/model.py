"""Load the base model (4-bit NF4 + double quant, or 16-bit) and tokenizer once, attach LoRA, load an adapter.

The 4-bit side (the loader's config, FalconLinear built as nn.Linear, the in-place fallback and the
check that a model labelled QLoRA has no 16-bit linear layer left) lives in quant.py.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from . import quant
from .distributed import fsdp_active, local_rank
from .errors import UserError

# LoRA targets for "all-linear" per architecture (every linear layer of every block; not lm_head).
TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "falcon": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}


def model_path(cfg) -> str:
    """Hub id or folder to load; a random_init preset is written to the local cache first."""
    if cfg.model.random_init:
        from .presets import cached_model

        return str(cached_model(cfg.model.random_init))
    name = cfg.model.name_or_path
    local = Path(name).expanduser()
    if name.startswith((".", "/", "~")) or local.exists():  # a folder, not a hub id
        if not (local / "config.json").is_file():
            raise UserError(f"model.name_or_path: {name}: not a model folder (no config.json there)")
        return str(local)
    return name


def load_hf_config(cfg, path: str):
    """The model's transformers config; a hub id that cannot be fetched is a one-line error."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, revision=cfg.model.revision,
                                          trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"model.name_or_path: {path}: cannot load its config: {first}") from None


def load_tokenizer(cfg, path: str | None = None):
    from transformers import AutoTokenizer

    path = path or model_path(cfg)
    tok = AutoTokenizer.from_pretrained(path, revision=cfg.model.revision,
                                        trust_remote_code=cfg.model.trust_remote_code)
    _ensure_pad_token(tok)
    return tok


def fit_to_tokenizer(model, tok) -> None:
    """Embeddings grown to a pad token the tokenizer gained (_ensure_pad_token), and the config's pad id:
    training, reload and merge all see the model the same way."""
    if len(tok) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tok), pad_to_multiple_of=64)
    model.config.pad_token_id = tok.pad_token_id


def _ensure_pad_token(tok) -> None:
    """Pad must differ from EOS, or masking pads would also hide the EOS the model must learn."""
    if tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id:
        return
    for cand in [tok.unk_token] + list(getattr(tok, "additional_special_tokens", None) or []):
        if cand is not None and tok.convert_tokens_to_ids(cand) not in (tok.eos_token_id, tok.bos_token_id):
            tok.pad_token = cand
            return
    tok.add_special_tokens({"pad_token": "<pad>"})  # caller resizes embeddings


def load_model(cfg, for_training: bool = False, plan=None, device_map=None):
    """(model, tokenizer, summary). Quantized to NF4 when cfg.quant.bits == 4, verified either way."""
    import importlib.util

    from transformers import AutoModelForCausalLM

    from .distributed import set_local_device
    from .plan import check_machine, resolve_compute_dtype

    check_machine(cfg)  # 4-bit without bitsandbytes' native library, uint8 under FSDP: one line, before loading
    path = model_path(cfg)
    dtype_name = plan.compute_dtype if plan else resolve_compute_dtype(cfg.quant.bnb_4bit_compute_dtype)[0]
    dtype = getattr(torch, dtype_name)
    hf_config = load_hf_config(cfg, path)
    if cfg.model.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise UserError("model.attn_implementation: flash_attention_2 needs the flash-attn package, which "
                        "is not installed; use sdpa")
    tok = load_tokenizer(cfg, path)
    bnb = quant.bnb_config(cfg, dtype)
    # Non-quantized parts (norms, embeddings) in the compute dtype; fp32 under fp16 compute, where
    # fp16 norms and a fp16 lm_head are what makes QLoRA diverge on a T4.
    load_dtype = torch.float32 if dtype == torch.float16 and for_training and cfg.is_qlora else dtype
    if fsdp_active() and for_training:
        # FSDP flattens a block's tensors into one of a single dtype: everything in the 4-bit storage
        # dtype, no fp32 upcast. No device_map: every process loads onto its own GPU (the current
        # device) and FSDP keeps only its shard.
        load_dtype = bnb.bnb_4bit_quant_storage if bnb is not None else dtype
        set_local_device()
        device_map = None
    elif device_map is None:
        device_map = {"": _local_device()}
    ctx = quant.plain_linear_layers(hf_config.model_type) if bnb is not None else contextlib.nullcontext()
    with ctx:
        model = AutoModelForCausalLM.from_pretrained(
            path, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code,
            quantization_config=bnb, dtype=load_dtype, device_map=device_map,
            attn_implementation=cfg.model.attn_implementation)
    fit_to_tokenizer(model, tok)
    summary = quant.verify_quantization(model, cfg, dtype)
    quant.pin_cpu_kernel(model)
    summary["compute_dtype"] = dtype_name
    summary["source"] = cfg.model.random_init and f"random_init:{cfg.model.random_init}" or cfg.model.name_or_path
    return model, tok, summary


def _local_device():
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def lora_targets(cfg, model) -> list[str] | str:
    t = cfg.lora.target_modules
    if t == "all-linear":
        return TARGETS.get(model.config.model_type, "all-linear")
    return list(t)


def add_lora(model, cfg, recompute_layers: int, offload: bool = False):
    """Prepare for k-bit training (when 4-bit) and wrap with LoRA adapters. Returns the PeftModel.

    recompute_layers: how many decoder layers (from the first) recompute their activations, as the
    plan says (Plan.recompute_layers); the others keep them. 0 = none, the model's depth = all.
    offload: the recomputed layers keep their input in CPU memory (Plan.offload_checkpoints).
    """
    from peft import LoraConfig, get_peft_model

    if cfg.is_qlora:
        _prepare_kbit(model, upcast_fp16=not fsdp_active())
    model.config.use_cache = False
    targets = lora_targets(cfg, model)
    lcfg = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.lora_alpha, lora_dropout=cfg.lora.lora_dropout,
                      target_modules=targets, bias=cfg.lora.bias, task_type="CAUSAL_LM")
    expected = None
    if isinstance(targets, list):
        expected = sum(1 for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in targets)
    try:
        peft_model = get_peft_model(model, lcfg)
    except ValueError as e:
        if type(e).__name__ != "NoMatchingPeftModuleError":  # peft: no module matched the names
            raise
        names = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise UserError(f"lora.target_modules: {targets} matched no layer of this "
                        f"{model.config.model_type} model; its linear layers: {', '.join(names)}") from None
    n_lora = sum(1 for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and len(getattr(m, "lora_A", {})))
    if expected is not None and n_lora != expected:
        raise UserError(f"lora.target_modules: {n_lora} adapters attached, expected {expected} for {targets}")
    if n_lora == 0:
        raise UserError(f"lora.target_modules: no module matched {targets}")
    # After peft: its wrapper makes the embeddings' output require grad when recomputation is on at its start.
    set_recomputation(model, recompute_layers, offload)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(_numel(p) for p in peft_model.parameters())
    return peft_model, {"n_lora_modules": n_lora, "lora_targets": targets,
                        "trainable_params": int(trainable), "total_params": int(total)}


def _prepare_kbit(model, upcast_fp16: bool = True) -> None:
    """peft's prepare_model_for_kbit_training, minus its blanket fp32 upcast of every 16-bit param.

    fp16 norms, embeddings and head are upcast to fp32 (fp16 overflows; a T4's QLoRA diverges without
    it), except under FSDP (upcast_fp16=False), which shards only tensors of one dtype. bf16 ones stay
    bf16: bf16 has fp32's range, so the upcast costs memory and time and buys no stability (norms
    compute in fp32 internally either way).
    """
    for p in model.parameters():
        p.requires_grad = False
        if upcast_fp16 and p.dtype == torch.float16 and p.__class__.__name__ != "Params4bit":
            p.data = p.data.to(torch.float32)


def set_recomputation(model, recompute_layers: int, offload: bool = False) -> None:
    """Recompute activations in the first `recompute_layers` decoder layers (0 = none, >= depth = all);
    offload: those layers keep their input in pinned CPU memory until the backward (kernels/recompute.py)."""
    import functools

    from .kernels import recompute

    if isinstance(recompute_layers, bool) or not isinstance(recompute_layers, int):
        # True would read as 1 layer: the count is the only encoding (Plan.recompute_layers).
        raise TypeError(f"recompute_layers: a layer count, got {recompute_layers!r}")
    if recompute_layers <= 0:
        model.gradient_checkpointing_disable()
    else:
        # context_fn marks the recomputation, in which a fused MLP skips the matmul whose output is thrown away.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False,
                                                                           "context_fn": recompute.context_fn})
        for i, layer in enumerate(_checkpoint_first_layers(model, recompute_layers)):
            if offload and layer.gradient_checkpointing:
                layer._gradient_checkpointing_func = functools.partial(recompute.offloaded, slot=i)
    # transformers makes the embeddings' output require grad when it enables checkpointing (what a reentrant
    # checkpoint needs). Neither torch's non-reentrant checkpoint nor recompute.offloaded needs it, and it costs: the
    # output becomes a leaf that autograd holds until the backward ends, and the first layer then computes an input
    # gradient nobody reads (Llama-2-7B at 4,096 tokens: 32 MiB held through the backward, 32 more at its end, and
    # three input-gradient matmuls).
    model.disable_input_require_grads()


def _checkpoint_first_layers(model, k: int) -> list:
    """Keep recomputation on the first k decoder layers only (k >= depth: all of them); returns the layers."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i < k
    return layers


def _numel(p) -> int:
    # A 4-bit Params4bit stores two weights per byte; count the weights it stands for.
    shape = getattr(getattr(p, "quant_state", None), "shape", None)
    return int(torch.Size(shape).numel()) if shape is not None else p.numel()


def load_adapter(model, adapter_dir):
    """Attach a saved adapter for inference. Only safetensors are read (never pickle); a damaged
    adapter file is named in one line (fileio.check_adapter)."""
    from peft import PeftModel

    from .fileio import check_adapter

    d = Path(adapter_dir)
    if not d.is_dir():
        raise UserError(f"{d}: adapter folder not found")
    check_adapter(d)
    return PeftModel.from_pretrained(model, str(d), is_trainable=False)
