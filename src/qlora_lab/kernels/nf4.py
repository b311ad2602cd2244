"""NF4 weights dequantized in one kernel launch, double quantization included.

bitsandbytes dequantizes a double-quantized NF4 weight in three kernels, each behind a Python op
dispatch: the 8-bit block scales back to fp32 (`dequantize_blockwise`), the scales' mean added back
(`absmax += offset`), then the 4-bit codes. A LoRA step of a 7B model does this 448 times (every frozen
weight in the forward, again in the backward), so on a fast GPU its host time, not its memory traffic,
is what costs. `dequantize` does the same arithmetic in one Triton kernel:

    scale[b] = code2[absmax[b]] * absmax2[b // blocksize2] + offset      (double quantization)
    w[2j], w[2j+1] = nf4[byte_j >> 4] * scale[2j // blocksize], nf4[byte_j & 15] * scale[...]

in fp32, rounded once to the compute dtype, as bitsandbytes' CUDA kernels do. Before its first use on a
GPU it checks itself against bitsandbytes there (`usable`). Anything else (a CPU tensor, FP4, Triton
missing or failing on that GPU) goes through bitsandbytes' own dequantization, so every path gives
bitsandbytes' numbers; tests/integration/test_gpu.py compares the Triton kernel with bitsandbytes' on the GPU.
"""
from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger("qlora_lab.train")

_PREPARED = "_qlora_lab_nf4"  # on a QuantState: the kernel's arguments, built once (the weight is frozen)
_CHECKED: dict = {}  # device -> whether the kernel runs there and gives bitsandbytes' numbers
_enabled = True  # train.nf4_kernel, for this process (set by the recipe when it loads the model)


def enable(on: bool = True) -> None:
    """Use the kernel where it is usable (on), or bitsandbytes' dequantization everywhere (off)."""
    global _enabled
    _enabled = bool(on)


def enabled() -> bool:
    return _enabled


@functools.cache
def _kernel():
    try:
        from ._nf4_triton import nf4_dequantize
    except ImportError:  # no Triton (a CPU-only install)
        return None
    return nf4_dequantize


def usable(device) -> bool:
    """Whether the kernel runs on `device` and gives bitsandbytes' numbers there, checked once per device on
    a small double-quantized matrix. Where it does not (no Triton, a GPU Triton cannot compile for, a wrong
    result), one warning says so and bitsandbytes dequantizes: slower, never different."""
    ok = _CHECKED.get(device)
    if ok is None:
        ok = _CHECKED[device] = _self_test(device)
    return ok


def _self_test(device) -> bool:
    if _kernel() is None:
        return False
    import bitsandbytes.functional as bnbf

    try:
        # fp16: a dtype every GPU has, rounded as training rounds (tests/integration/test_gpu.py: bit for bit)
        w = torch.randn(64, 200, generator=torch.Generator().manual_seed(0)).to(device, torch.float16)
        q, qs = bnbf.quantize_4bit(w, compress_statistics=True, quant_type="nf4")
        got = _launch(q, qs, torch.empty(64, 200, dtype=torch.float16, device=device), _prepared(qs, device))
        same = torch.equal(got, bnbf.dequantize_4bit(q, qs))
    except Exception as e:  # noqa: BLE001 - any failure to compile or launch means: use bitsandbytes
        log.warning("NF4 kernel unavailable on %s (%s: %s): bitsandbytes dequantizes instead (slower, same numbers)",
                    device, type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
        return False
    if not same:
        log.warning("NF4 kernel gives other numbers than bitsandbytes on %s: bitsandbytes dequantizes instead", device)
    return same


def _prepared(quant_state, device):
    """(absmax, absmax2, code2, code, offset, nested block size) on `device` for the kernel, or None where it
    does not apply (FP4, an odd block size)."""
    got = getattr(quant_state, _PREPARED, None)
    if got is not None and got[3].device == device:
        return got
    if quant_state.quant_type != "nf4" or quant_state.blocksize % 2:
        return None
    code = quant_state.code.to(device, torch.float32)
    if quant_state.nested:
        s2 = quant_state.state2
        got = (quant_state.absmax.to(device), s2.absmax.to(device, torch.float32), s2.code.to(device, torch.float32),
               code, quant_state.offset.to(device, torch.float32).reshape(1), s2.blocksize)
    else:
        got = (quant_state.absmax.to(device, torch.float32), None, None, code, None, None)
    setattr(quant_state, _PREPARED, got)
    return got


def dequantize(weight, quant_state, dtype):
    """The 4-bit `weight` as a (out_features, in_features) matrix of `dtype`."""
    args = _prepared(quant_state, weight.device) if weight.is_cuda and _enabled and usable(weight.device) else None
    if args is None:
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight, quant_state).to(dtype)
    return _launch(weight, quant_state, torch.empty(tuple(quant_state.shape), dtype=dtype, device=weight.device), args)


def _launch(weight, quant_state, out, args):
    """Run the kernel: `out` is any contiguous matrix of the weight's shape (rows of a larger one too)."""
    absmax, absmax2, code2, code, offset, block2 = args
    n_out = out.numel()
    n_bytes = (n_out + 1) // 2
    bytes_per_program = 1024
    _kernel()[(-(-n_bytes // bytes_per_program),)](
        weight.view(torch.uint8),  # the packed codes, whatever dtype bitsandbytes stores them in
        absmax, absmax2 if absmax2 is not None else absmax, code2 if code2 is not None else code, code,
        offset if offset is not None else code, out, n_bytes, n_out,
        HALF_BLOCK=quant_state.blocksize // 2, BLOCK2=block2 or 1, NESTED=absmax2 is not None, BYTES=bytes_per_program,
        enable_fp_fusion=False)  # bitsandbytes rounds the scale's product to fp32 before adding the offset
    return out
