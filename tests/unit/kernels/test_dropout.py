"""kernels/dropout.py: the adapter dropout the fused LoRA layers use on a GPU.

The path exercised is the Triton kernel itself, in Triton's CPU interpreter, in a child process (skipped
where Triton is not installed: a CPU-only install trains with torch's dropout, tested in test_fused_lora.py).
tests/integration/test_gpu.py checks the fused layers' gradients on the compiled kernel's masks.
"""
from __future__ import annotations

import pytest
import torch

from qlora_lab.kernels import dropout

from .conftest import run_in_triton_interpreter


def check_in_interpreter() -> None:
    """Run in a child process with TRITON_INTERPRET=1 (read when Triton itself is imported)."""
    torch.manual_seed(0)
    p, n = 0.3, 3 * dropout.BLOCK + 17  # a ragged last block
    x = torch.randn(n // 7 + 1, 7)[: n // 7].contiguous()
    scale = torch.tensor(1.0 / (1.0 - p), dtype=torch.float32)
    y = dropout.apply(x, p, salt=5)
    kept = y != 0
    assert torch.equal(y[kept], x[kept] * scale), "kept elements are x / (1 - p)"
    assert abs(kept.float().mean().item() - (1 - p)) < 0.03, kept.float().mean()
    assert torch.equal(dropout.apply(x, p, salt=5), y), "the same (seed, layer) draws the same mask"
    other = dropout.apply(x, p, salt=6) != 0
    assert abs((other & kept).float().mean().item() - (1 - p) ** 2) < 0.03, "another layer: an independent mask"
    # The four uniforms of one Philox draw mask the four quarters of a block: no quarter repeats another's mask.
    quarters = dropout.apply(torch.ones(4 * dropout.BLOCK), p, salt=5).ne(0).view(4, 4, -1)  # blocks, quarters
    for a, b in [(0, 1), (1, 2), (2, 3), (0, 3)]:
        both = (quarters[:, a] & quarters[:, b]).float().mean().item()
        assert abs(both - (1 - p) ** 2) < 0.04, (a, b, both)
    assert not torch.equal(quarters[0], quarters[1]), "another block, another mask"
    g, acc = torch.randn_like(x), torch.randn_like(x)
    want = acc + torch.where(kept, g * scale, torch.zeros_like(g))
    assert torch.allclose(dropout.add_masked_(acc.clone(), g, p, salt=5), want, rtol=0, atol=1e-6)
    dropout.advance()
    assert not torch.equal(dropout.apply(x, p, salt=5) != 0, kept), "advance() draws new masks"
    torch.manual_seed(1)
    dropout.advance()
    first = dropout.apply(x, p, salt=5)
    torch.manual_seed(1)
    dropout.advance()
    assert torch.equal(dropout.apply(x, p, salt=5), first), "the masks follow torch's seed"
    with pytest.raises(ValueError, match="contiguous"):
        dropout.apply(x.t(), p, salt=5)
    print("checked")


def test_the_kernel_draws_a_reproducible_mask_of_the_right_law():
    assert "checked" in run_in_triton_interpreter("test_dropout", "check_in_interpreter")


def test_the_cpu_keeps_torchs_dropout():
    """No Triton path on a CPU tensor: the fused layers draw torch's masks there (and rewind its generator)."""
    assert not dropout.usable(torch.device("cpu"))
