"""kernels/nf4.py: NF4 (and double-quantized NF4) dequantization gives bitsandbytes' numbers.

The path exercised here is the Triton kernel itself, in Triton's CPU interpreter (skipped where Triton is
not installed, as on a CPU-only install, where every dequantization is bitsandbytes' own). The interpreter
rounds to bf16 by truncation, so it is compared in fp32, and with the format's arithmetic written in torch
(`_reference`), not with bitsandbytes' CPU kernels: which of those runs depends on the CPU (bitsandbytes 0.50.2 has
an AVX-512 path), and on a 2-core x86 machine here its dequantization of 128-value blocks does not invert its own
quantization (max error 1.65 on randn values, against 0.44 for the format's arithmetic). The reference equals
bitsandbytes' CPU output for 64-value blocks there. tests/integration/test_gpu.py compares the compiled kernel with
bitsandbytes' CUDA kernels in bf16 and fp16 on the GPU.
"""
from __future__ import annotations

import pytest
import torch

from qlora_lab.kernels import nf4

from .conftest import run_in_triton_interpreter

bnbf = pytest.importorskip("bitsandbytes.functional")

# (shape, double quantization, block size): a 7B-like row, a ragged tail block, an odd count of weights
CASES = [((96, 64), True, 64), ((4, 8192), True, 64), ((33, 64), False, 64), ((8, 100), True, 64),
         ((3, 7), False, 64), ((64, 64), True, 128)]


def _quantized(shape, nested, blocksize, seed=0):
    torch.manual_seed(seed)
    return bnbf.quantize_4bit(torch.randn(shape), blocksize=blocksize, compress_statistics=nested, quant_type="nf4")


def _reference(q, qs) -> torch.Tensor:
    """NF4 dequantization in fp32 torch: code[nibble] x the block's scale (with double quantization, the 8-bit scale's
    code value x its block's absmax, plus the scales' mean), high nibble first; one rounding per operation."""
    i = torch.arange(int(torch.tensor(qs.shape).prod()))
    byte = q.flatten().to(torch.int64)[i // 2]
    nibble = torch.where(i % 2 == 0, byte >> 4, byte & 15)
    b = i // qs.blocksize
    if qs.nested:
        s2 = qs.state2
        scale = s2.code[qs.absmax.long()[b]] * s2.absmax[b // s2.blocksize] + qs.offset
    else:
        scale = qs.absmax[b]
    return (qs.code[nibble] * scale).reshape(qs.shape)


def compare_in_interpreter() -> None:
    """Run in a child process with TRITON_INTERPRET=1 (read when Triton itself is imported)."""
    for shape, nested, blocksize in CASES:
        q, qs = _quantized(shape, nested, blocksize)
        want = _reference(q, qs)
        buffer = torch.full((shape[0] + 2, shape[1]), 7.0)  # written through rows 1..n only
        nf4._launch(q, qs, buffer[1:-1], nf4._prepared(qs, q.device))
        assert torch.equal(buffer[1:-1], want), (shape, nested, blocksize)
        assert buffer[0].eq(7.0).all() and buffer[-1].eq(7.0).all(), (shape, nested, blocksize)
    # The check `usable` runs once per GPU, passing where the kernel is right: here against the format's arithmetic
    # (what bitsandbytes' CUDA kernels give there), not against its CPU kernels, which vary with the CPU.
    bnbf.dequantize_4bit = lambda q, qs: _reference(q, qs).to(qs.dtype)  # this child process only
    assert nf4._self_test(torch.device("cpu"))
    print("compared", len(CASES))


def test_the_triton_kernel_gives_bitsandbytes_numbers():
    assert f"compared {len(CASES)}" in run_in_triton_interpreter("test_nf4", "compare_in_interpreter")


def test_a_kernel_that_fails_or_differs_is_not_used(monkeypatch, caplog):
    """`usable` (run once per GPU before the kernel's first use) turns it off, with one warning, if it cannot
    launch there or disagrees with bitsandbytes: dequantization falls back to bitsandbytes'."""
    monkeypatch.setattr(nf4, "_kernel", lambda: object())  # "Triton is installed"

    def cannot_compile(*a):
        raise RuntimeError("PTX for sm_60 not supported\nmore detail")

    monkeypatch.setattr(nf4, "_launch", cannot_compile)
    with caplog.at_level("WARNING", logger="qlora_lab.train"):
        assert nf4._self_test(torch.device("cpu")) is False
    assert "RuntimeError: PTX for sm_60 not supported)" in caplog.text and "bitsandbytes dequantizes" in caplog.text

    def off_by_one_code(q, qs, out, args):
        return out.copy_(bnbf.dequantize_4bit(q, qs)).add_(1e-3)

    caplog.clear()
    monkeypatch.setattr(nf4, "_launch", off_by_one_code)
    with caplog.at_level("WARNING", logger="qlora_lab.train"):
        assert nf4._self_test(torch.device("cpu")) is False
    assert "other numbers than bitsandbytes" in caplog.text

    monkeypatch.setattr(nf4, "_CHECKED", {})
    monkeypatch.setattr(nf4, "_launch", lambda q, qs, out, args: out.copy_(bnbf.dequantize_4bit(q, qs)))
    cpu = torch.device("cpu")
    assert nf4.usable(cpu) and nf4._CHECKED == {cpu: True}
    monkeypatch.setattr(nf4, "_launch", cannot_compile)
    assert nf4.usable(cpu)  # checked once per device: not run again
