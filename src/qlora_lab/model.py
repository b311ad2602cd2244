"""Load the base model (4-bit NF4 + double quant, or 16-bit), verify it, attach LoRA.

Verify, don't trust: transformers replaces only layers whose type *is* ``nn.Linear`` with 4-bit
ones, so a model built from a subclass (Falcon's ``FalconLinear``) silently stays 16-bit. Known
subclasses are built as plain ``nn.Linear`` while loading (same maths, so the quantizer converts them
at load time, with no 16-bit copy in memory); any other 16-bit linear left over is quantized in place;
and the count is checked at the end. A model labelled QLoRA is never 16-bit.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
from torch import nn

from .distributed import fsdp_active, local_rank
from .errors import UserError

log = logging.getLogger("qlora_lab.model")

# LoRA targets for "all-linear" per architecture (every linear layer of every block; not lm_head).
TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "falcon": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}
# nn.Linear subclasses with the same maths that transformers' 4-bit replacement skips.
_LINEAR_ALIASES = {"falcon": ("transformers.models.falcon.modeling_falcon", "FalconLinear")}


class QuantizationError(UserError):
    pass


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


def quant_storage_dtype(cfg, dtype: torch.dtype) -> torch.dtype:
    """What the packed 4-bit weights are stored in: uint8, or a float type FSDP can shard."""
    from .distributed import quant_storage

    return getattr(torch, quant_storage(cfg.quant.bnb_4bit_quant_storage, str(dtype).removeprefix("torch."))[0])


def bnb_config(cfg, dtype: torch.dtype):
    if not cfg.is_qlora:
        return None
    from transformers import BitsAndBytesConfig

    q = cfg.quant
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=q.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=q.bnb_4bit_use_double_quant, bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=quant_storage_dtype(cfg, dtype))


@contextlib.contextmanager
def _plain_linear_layers(model_type: str):
    """Build known nn.Linear subclasses as nn.Linear while a model is constructed."""
    spec = _LINEAR_ALIASES.get(model_type)
    if spec is None:
        yield
        return
    import importlib

    mod = importlib.import_module(spec[0])
    original = getattr(mod, spec[1])
    setattr(mod, spec[1], nn.Linear)
    try:
        yield
    finally:
        setattr(mod, spec[1], original)


def load_tokenizer(cfg, path: str | None = None):
    from transformers import AutoTokenizer

    path = path or model_path(cfg)
    tok = AutoTokenizer.from_pretrained(path, revision=cfg.model.revision,
                                        trust_remote_code=cfg.model.trust_remote_code)
    _ensure_pad_token(tok)
    return tok


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
    from .hardware import resolve_compute_dtype

    path = model_path(cfg)
    dtype_name = plan.compute_dtype if plan else resolve_compute_dtype(cfg.quant.bnb_4bit_compute_dtype)[0]
    dtype = getattr(torch, dtype_name)
    hf_config = load_hf_config(cfg, path)
    if cfg.model.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise UserError("model.attn_implementation: flash_attention_2 needs the flash-attn package, which "
                        "is not installed; use sdpa")
    tok = load_tokenizer(cfg, path)
    quant = bnb_config(cfg, dtype)
    # Non-quantized parts (norms, embeddings) in the compute dtype; fp32 under fp16 compute, where
    # fp16 norms and a fp16 lm_head are what makes QLoRA diverge on a T4.
    load_dtype = torch.float32 if dtype == torch.float16 and for_training and cfg.is_qlora else dtype
    if fsdp_active() and for_training:
        # FSDP flattens a block's tensors into one of a single dtype: everything in the 4-bit storage
        # dtype, no fp32 upcast. No device_map: every process loads onto its own GPU (the current
        # device) and FSDP keeps only its shard.
        load_dtype = quant.bnb_4bit_quant_storage if quant is not None else dtype
        set_local_device()
        device_map = None
    elif device_map is None:
        device_map = {"": _local_device()}
    ctx = _plain_linear_layers(hf_config.model_type) if quant is not None else contextlib.nullcontext()
    with ctx:
        model = AutoModelForCausalLM.from_pretrained(
            path, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code,
            quantization_config=quant, dtype=load_dtype, device_map=device_map,
            attn_implementation=cfg.model.attn_implementation)
    if len(tok) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tok), pad_to_multiple_of=64)
    model.config.pad_token_id = tok.pad_token_id
    summary = verify_quantization(model, cfg, dtype)
    pin_cpu_kernel(model)
    summary["compute_dtype"] = dtype_name
    summary["source"] = cfg.model.random_init and f"random_init:{cfg.model.random_init}" or cfg.model.name_or_path
    return model, tok, summary


def _local_device():
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def _is_4bit(m) -> bool:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return isinstance(m, bnb.nn.Linear4bit)


def pin_cpu_kernel(model) -> int:
    """One 4-bit CPU kernel for training, evaluation and reload, whatever the CPU; returns the layer count.

    On a CPU with AVX512-BF16, bitsandbytes (0.50) repacks a Linear4bit's weight in place the first time
    it runs without grad outside training mode (an evaluation, generation): a CPU-only layout with bf16
    block scales and no double quantization, computed in bf16 by another kernel. The repack is lossy and
    stays: every later forward, training ones included, runs on it, and dequantize_4bit (our fused layer)
    reads the repacked bytes as if they were NF4. A run that evaluated and its resume, or a fresh load
    and a model after generation, then compute different things. The layers here never repack: every
    forward dequantizes the NF4 weight and multiplies in the compute dtype, on any CPU.
    """
    n = 0
    for m in model.modules():
        if _is_4bit(m):
            m.support_avx512bf16_for_cpu = False  # the attribute bitsandbytes reads before repacking
            n += 1
    return n


def cpu_repacked_layers(model) -> list[str]:
    """4-bit layers whose weight is in bitsandbytes' CPU inference layout (none, once pinned)."""
    return [n for n, m in model.named_modules()
            if _is_4bit(m) and getattr(getattr(m.weight, "quant_state", None), "packing_format_for_cpu", False)]


def _output_layer_names(model) -> set[str]:
    out = model.get_output_embeddings()
    return {n for n, m in model.named_modules() if m is out}


def verify_quantization(model, cfg, dtype) -> dict:
    """Count linear layers; under QLoRA every one but the output head must be 4-bit."""
    skip = _output_layer_names(model)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    left = [n for n, m in linears.items() if n not in skip and not _is_4bit(m)]
    if cfg.is_qlora and left:
        log.warning("%d linear layers were left in 16 bits by the loader (%s, ...): quantizing them now",
                    len(left), left[0])
        quantize_in_place(model, left, cfg, dtype)
        linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        left = [n for n, m in linears.items() if n not in skip and not _is_4bit(m)]
        if left:
            raise QuantizationError(
                f"QLoRA requested but {len(left)} linear layers are still 16-bit after loading "
                f"({', '.join(left[:3])}...): refusing to train a 16-bit model labelled QLoRA")
    n4 = sum(_is_4bit(m) for m in linears.values())
    # uint8, or a float dtype under FSDP: same packed bytes, so the count above holds either way.
    storage = sorted({str(m.weight.dtype).removeprefix("torch.") for m in linears.values() if _is_4bit(m)})
    q = cfg.quant
    return {
        "architecture": type(model).__name__,
        "model_type": model.config.model_type,
        "quantization": q.bnb_4bit_quant_type if cfg.is_qlora else None,
        "double_quant": bool(cfg.is_qlora and q.bnb_4bit_use_double_quant),
        "quant_storage": ",".join(storage) or None,
        "n_linear_4bit": n4,
        "n_linear_total": len(linears),
        "n_linear_expected_4bit": (len(linears) - len(skip & set(linears))) if cfg.is_qlora else 0,
        "weights_bytes": int(model.get_memory_footprint()),
    }


def quantize_in_place(model, names, cfg, dtype) -> None:
    """Replace 16-bit linear layers by NF4 ones (fallback for layer classes the loader skipped)."""
    import bitsandbytes as bnb

    q = cfg.quant
    storage = quant_storage_dtype(cfg, dtype)
    for name in names:
        old = model.get_submodule(name)
        new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=old.bias is not None,
                                compute_dtype=dtype, compress_statistics=q.bnb_4bit_use_double_quant,
                                quant_type=q.bnb_4bit_quant_type, quant_storage=storage, device="meta")
        device = old.weight.device
        new.weight = bnb.nn.Params4bit(old.weight.data.to("cpu"), requires_grad=False,
                                       quant_type=q.bnb_4bit_quant_type, quant_storage=storage,
                                       compress_statistics=q.bnb_4bit_use_double_quant).to(device)
        if old.bias is not None:
            new.bias = nn.Parameter(old.bias.data.to(dtype), requires_grad=False)
        model.set_submodule(name, new)
        del old


def lora_targets(cfg, model) -> list[str] | str:
    t = cfg.lora.target_modules
    if t == "all-linear":
        return TARGETS.get(model.config.model_type, "all-linear")
    return list(t)


def add_lora(model, cfg, gradient_checkpointing: bool | int):
    """Prepare for k-bit training (when 4-bit) and wrap with LoRA adapters. Returns the PeftModel.

    gradient_checkpointing: True/False, or how many decoder layers (from the first) recompute their
    activations; the others keep them (hardware.plan's "partial" choice).
    """
    from peft import LoraConfig, get_peft_model

    if cfg.is_qlora:
        _prepare_kbit(model, upcast_fp16=not fsdp_active())
    set_recomputation(model, gradient_checkpointing)
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


def set_recomputation(model, gradient_checkpointing: bool | int) -> None:
    """Recompute activations in all (True), none (False/0) or the first k decoder layers (an int)."""
    if not gradient_checkpointing:
        model.gradient_checkpointing_disable()
        return
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if gradient_checkpointing is not True:
        _checkpoint_first_layers(model, int(gradient_checkpointing))
    # Frozen embeddings give the checkpointed blocks inputs without grad: make them require it.
    model.enable_input_require_grads()


def _checkpoint_first_layers(model, k: int) -> None:
    """Keep recomputation on the first k decoder layers only (k >= depth: all of them)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i < k


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
