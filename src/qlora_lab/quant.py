"""bitsandbytes 4-bit: the loader's config, the 4-bit layer check, in-place quantization, verification.

Verify, don't trust: transformers replaces only layers whose type *is* ``nn.Linear`` with 4-bit
ones, so a model built from a subclass (Falcon's ``FalconLinear``) silently stays 16-bit. Known
subclasses are built as plain ``nn.Linear`` while loading (`plain_linear_layers`: same maths, so the
quantizer converts them at load time, with no 16-bit copy in memory); any other 16-bit linear left
over is quantized in place; and the count is checked at the end (`verify_quantization`). A model
labelled QLoRA is never 16-bit. bitsandbytes and transformers are imported only when called.
"""
from __future__ import annotations

import contextlib
import functools
import logging

import torch
from torch import nn

from .errors import UserError

log = logging.getLogger("qlora_lab.quant")

# nn.Linear subclasses with the same maths that transformers' 4-bit replacement skips.
_LINEAR_ALIASES = {"falcon": ("transformers.models.falcon.modeling_falcon", "FalconLinear")}


class QuantizationError(UserError):
    pass


def bitsandbytes_problem() -> str | None:
    """None if 4-bit layers can run here, else why not. Cheap: no GPU code is imported."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("bitsandbytes")
    if spec is None:
        return "bitsandbytes is not installed"
    libdir = Path(spec.origin).parent
    libs = [p.name for p in libdir.glob("libbitsandbytes_*")]
    if not libs:
        return f"no native library in {libdir}"
    return None


def quant_storage_dtype(cfg, dtype: torch.dtype) -> torch.dtype:
    """What the packed 4-bit weights are stored in: uint8, or a float type FSDP can shard."""
    from .distributed import quant_storage

    return getattr(torch, quant_storage(cfg.quant.bnb_4bit_quant_storage, str(dtype).removeprefix("torch."))[0])


def bnb_config(cfg, dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for the loader (NF4, double quant, storage dtype); None for 16-bit LoRA."""
    if not cfg.is_qlora:
        return None
    from transformers import BitsAndBytesConfig

    q = cfg.quant
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=q.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=q.bnb_4bit_use_double_quant, bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=quant_storage_dtype(cfg, dtype))


@contextlib.contextmanager
def plain_linear_layers(model_type: str):
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


@functools.cache
def _linear4bit():
    """bitsandbytes' Linear4bit class, looked up once (None without bitsandbytes): the fused LoRA
    layer asks on every forward."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None
    return bnb.nn.Linear4bit


def is_4bit(module) -> bool:
    """A bitsandbytes 4-bit linear layer (False without bitsandbytes)."""
    cls = _linear4bit()
    return cls is not None and isinstance(module, cls)


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
        if is_4bit(m):
            m.support_avx512bf16_for_cpu = False  # the attribute bitsandbytes reads before repacking
            n += 1
    return n


def cpu_repacked_layers(model) -> list[str]:
    """4-bit layers whose weight is in bitsandbytes' CPU inference layout (none, once pinned)."""
    return [n for n, m in model.named_modules()
            if is_4bit(m) and getattr(getattr(m.weight, "quant_state", None), "packing_format_for_cpu", False)]


def _output_layer_names(model) -> set[str]:
    out = model.get_output_embeddings()
    return {n for n, m in model.named_modules() if m is out}


def verify_quantization(model, cfg, dtype) -> dict:
    """Count linear layers; under QLoRA every one but the output head must be 4-bit."""
    skip = _output_layer_names(model)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    left = [n for n, m in linears.items() if n not in skip and not is_4bit(m)]
    if cfg.is_qlora and left:
        log.warning("%d linear layers were left in 16 bits by the loader (%s, ...): quantizing them now",
                    len(left), left[0])
        quantize_in_place(model, left, cfg, dtype)
        linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        left = [n for n, m in linears.items() if n not in skip and not is_4bit(m)]
        if left:
            raise QuantizationError(
                f"QLoRA requested but {len(left)} linear layers are still 16-bit after loading "
                f"({', '.join(left[:3])}...): refusing to train a 16-bit model labelled QLoRA")
    n4 = sum(is_4bit(m) for m in linears.values())
    # uint8, or a float dtype under FSDP: same packed bytes, so the count above holds either way.
    storage = sorted({str(m.weight.dtype).removeprefix("torch.") for m in linears.values() if is_4bit(m)})
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

