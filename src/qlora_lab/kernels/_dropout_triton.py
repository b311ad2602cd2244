"""The Triton kernel behind dropout.py (imported only where Triton is installed)."""
import triton
import triton.language as tl


@triton.jit
def dropout(x, out, seed, salt, n, p, scale, ADD: tl.constexpr, BLOCK: tl.constexpr):
    """out = mask * x * scale (ADD: out += mask * x * scale); mask[i] = rand(seed[0] * 2^20 + salt, i) >= p."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = i < n
    keep = tl.rand(tl.load(seed) * 1048576 + salt, i) >= p
    v = tl.where(keep, tl.load(x + i, mask=live, other=0.0).to(tl.float32) * scale, 0.0)
    if ADD:
        v += tl.load(out + i, mask=live, other=0.0).to(tl.float32)
    tl.store(out + i, v.to(out.dtype.element_ty), mask=live)
