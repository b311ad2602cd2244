"""The Triton kernel behind dropout.py (imported only where Triton is installed)."""
import triton
import triton.language as tl


@triton.jit
def _quarter(x, out, i, r, n, p, scale, ADD: tl.constexpr):
    live = i < n
    v = tl.where(r >= p, tl.load(x + i, mask=live, other=0.0).to(tl.float32) * scale, 0.0)
    if ADD:
        v += tl.load(out + i, mask=live, other=0.0).to(tl.float32)
    tl.store(out + i, v.to(out.dtype.element_ty), mask=live)


@triton.jit
def dropout(x, out, seed, salt, n, p, scale, ADD: tl.constexpr, BLOCK: tl.constexpr):
    """out = mask * x * scale (ADD: out += mask * x * scale). One Philox evaluation gives four uniforms: element
    b * BLOCK + q * BLOCK/4 + k (q < 4) is kept where the q-th uniform of philox(seed[0] * 2^20 + salt,
    b * BLOCK/4 + k) is >= p, so each element costs a quarter of the 10-round generator (as torch's dropout)."""
    Q: tl.constexpr = BLOCK // 4
    b = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, Q)
    r0, r1, r2, r3 = tl.rand4x(tl.load(seed) * 1048576 + salt, b * Q + k)
    i = b * BLOCK + k
    _quarter(x, out, i, r0, n, p, scale, ADD)
    _quarter(x, out, i + Q, r1, n, p, scale, ADD)
    _quarter(x, out, i + 2 * Q, r2, n, p, scale, ADD)
    _quarter(x, out, i + 3 * Q, r3, n, p, scale, ADD)
