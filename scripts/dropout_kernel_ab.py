"""A/B of the adapter dropout kernel in one process on a CUDA GPU (assets/bench/h200-run19-dropout-kernel-ab.txt).

`old` is the kernel before 2026-12-04: one 10-round Philox evaluation per element, three of its four outputs
thrown away. `new` is kernels/_dropout_triton.py: one evaluation per four elements. Both run on the same bf16
tensor, 50 launches each after 3 warm-up launches, timed with CUDA events.

    PYTHONPATH=src python scripts/dropout_kernel_ab.py
"""
import torch
import triton
import triton.language as tl

from qlora_lab.kernels._dropout_triton import dropout as new


@triton.jit
def old(x, out, seed, salt, n, p, scale, ADD: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = i < n
    keep = tl.rand(tl.load(seed) * 1048576 + salt, i) >= p
    v = tl.where(keep, tl.load(x + i, mask=live, other=0.0).to(tl.float32) * scale, 0.0)
    if ADD:
        v += tl.load(out + i, mask=live, other=0.0).to(tl.float32)
    tl.store(out + i, v.to(out.dtype.element_ty), mask=live)


def main() -> None:
    seed = torch.tensor([12345], dtype=torch.int64, device="cuda")
    for shape in [(4096, 4096), (4096, 11008)]:
        x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        out = torch.empty_like(x)
        n = x.numel()
        us = {}
        for name, kernel in (("old", old), ("new", new)):
            for add in (False, True):
                def launch():
                    kernel[(-(-n // 1024),)](x, out, seed, 3, n, 0.05, 1 / 0.95, ADD=add, BLOCK=1024)
                for _ in range(3):
                    launch()
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(50):
                    launch()
                end.record()
                torch.cuda.synchronize()
                us[(name, add)] = start.elapsed_time(end) / 50 * 1000
        y = torch.empty_like(x)
        new[(-(-n // 1024),)](x, y, seed, 3, n, 0.05, 1 / 0.95, ADD=False, BLOCK=1024)
        print(f"{shape}: apply old {us['old', False]:.1f} us, new {us['new', False]:.1f} us; "
              f"add old {us['old', True]:.1f} us, new {us['new', True]:.1f} us; "
              f"new kept fraction {(y != 0).float().mean().item():.4f}; "
              f"new apply reads and writes {2 * 2 * n / us['new', False] / 1e6:.2f} TB/s")


if __name__ == "__main__":
    main()
