"""The Triton kernel of fused_adam.py: bitsandbytes' 32-bit Adam update for many tensors in one launch.

Each program updates BLOCK values of one tensor: `block_param[pid]` says which, `block_start[pid]` where in it.
`table` holds five int64 rows, one column per tensor: the gradient's, parameter's, state1's and state2's addresses
and how many values to update this step (0: no gradient this step); `scalars` two fp32 rows: the step size and
eps * c2 (from the tensor's step count and learning rate, fused_adam.py). The arithmetic is that of bitsandbytes'
CUDA kernel for 32-bit Adam without weight decay, update-norm limit or gradient scale, in fp32, with IEEE square
root and division:

    s1 = s1 * beta1 + (1 - beta1) * g
    s2 = s2 * beta2 + (1 - beta2) * g * g
    p  = p + step_size * s1 / (sqrt(s2) + eps * c2)
"""
import triton
import triton.language as tl


@triton.jit
def adam32_many(table, scalars, k, block_param, block_start, beta1, beta2, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    i = tl.load(block_param + pid)
    start = tl.load(block_start + pid)
    n = tl.load(table + 4 * k + i)
    offs = start + tl.arange(0, BLOCK)
    mask = offs < n
    g_ptr = tl.load(table + i).to(tl.pointer_type(tl.float32))
    p_ptr = tl.load(table + k + i).to(tl.pointer_type(tl.float32))
    s1_ptr = tl.load(table + 2 * k + i).to(tl.pointer_type(tl.float32))
    s2_ptr = tl.load(table + 3 * k + i).to(tl.pointer_type(tl.float32))
    step_size = tl.load(scalars + i)
    eps_c2 = tl.load(scalars + k + i)

    g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0)
    s1 = tl.load(s1_ptr + offs, mask=mask, other=0.0)
    s2 = tl.load(s2_ptr + offs, mask=mask, other=1.0)  # masked lanes: no 0 / 0

    s1 = tl.fma(s1, beta1, (1.0 - beta1) * g)
    s2 = tl.fma(s2, beta2, (1.0 - beta2) * g * g)
    p = tl.fma(step_size, tl.math.div_rn(s1, tl.sqrt_rn(s2) + eps_c2), p)

    tl.store(p_ptr + offs, p, mask=mask)
    tl.store(s1_ptr + offs, s1, mask=mask)
    tl.store(s2_ptr + offs, s2, mask=mask)
