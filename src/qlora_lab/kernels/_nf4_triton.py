"""The Triton kernel behind nf4.dequantize (imported only where Triton is installed)."""
import triton
import triton.language as tl


@triton.jit
def nf4_dequantize(packed, absmax, absmax2, code2, code, offset, out, n_bytes, n_out,
                   HALF_BLOCK: tl.constexpr, BLOCK2: tl.constexpr, NESTED: tl.constexpr, BYTES: tl.constexpr):
    j = tl.program_id(0).to(tl.int64) * BYTES + tl.arange(0, BYTES)
    live = j < n_bytes
    byte = tl.load(packed + j, mask=live, other=0).to(tl.int32)
    b = j // HALF_BLOCK  # the block (of 2 * HALF_BLOCK weights) this byte's two weights belong to
    if NESTED:
        q = tl.load(absmax + b, mask=live, other=0).to(tl.int32)
        scale = tl.load(code2 + q, mask=live, other=0.0) * tl.load(absmax2 + b // BLOCK2, mask=live, other=0.0)
        scale = scale + tl.load(offset)  # not fused into one FMA with the product (launched with enable_fp_fusion=False)
    else:
        scale = tl.load(absmax + b, mask=live, other=0.0)
    hi = tl.load(code + (byte >> 4), mask=live, other=0.0) * scale
    lo = tl.load(code + (byte & 15), mask=live, other=0.0) * scale
    k = tl.program_id(0).to(tl.int64) * (2 * BYTES) + tl.arange(0, 2 * BYTES)
    tl.store(out + k, tl.interleave(hi, lo).to(out.dtype.element_ty), mask=k < n_out)
