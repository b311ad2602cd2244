"""`qlora-lab bench`: our training path vs the standard recipe and a peer, one table (see bench/)."""
from __future__ import annotations

from .args import add_set


def add_parser(sub) -> None:
    from ..bench.peer import PEERS
    from ..presets import PRESETS

    p = sub.add_parser(
        "bench", help="speed and memory of the training path, beside the standard HF recipe",
        description="Train random-init models of real shapes for a few steps with our path (what `train` runs) "
                    "and, with --baseline, the standard recipe (TRL SFTTrainer + NF4 + gradient checkpointing), "
                    "each in its own process; print one table and write JSON + Markdown. Several --seq-len and "
                    "--batch-size values pair up (512 2048 with 8 2 = 8x512 and 2x2048).")
    p.add_argument("--preset", nargs="+", required=True, choices=PRESETS, help="model shape(s)")
    p.add_argument("--seq-len", nargs="+", type=int, required=True, help="tokens per sequence")
    p.add_argument("--batch-size", nargs="+", type=int, required=True, help="sequences per optimizer step")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per configuration (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=None, help="steps left out of the median (default: steps/4, 1..5)")
    p.add_argument("--baseline", action="store_true", help="also run the standard recipe and compare")
    p.add_argument("--memory-budget", type=float, default=None, metavar="GiB",
                   help="cap GPU memory per process (15 = a Colab T4); the plan fits the run into it")
    add_set(p, help="override our path's config, e.g. --set train.gradient_checkpointing=true")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE]",
                   help="an extra row of our path with overrides, e.g. gc-on:train.gradient_checkpointing=true")
    p.add_argument("--multi-gpu", action="append", default=[], metavar="dp|fsdp:N[:VARIANT]",
                   help="also train on N GPUs: dp = data-parallel (torchrun), fsdp = sharded (accelerate + "
                        "configs/accelerate/fsdp_qlora.yaml), with a --variant's overrides; compared with that "
                        "path on one GPU (same batch per GPU: speed, memory; same global batch: losses)")
    p.add_argument("--peer", default=None, choices=PEERS,
                   help="also train this library's QLoRA, in its own interpreter (--peer-python), on the same "
                        "checkpoint, batches, rank, targets, dropout and optimizer, at each of its checkpointing "
                        "settings (GPU only)")
    p.add_argument("--peer-python", default=None, metavar="PATH",
                   help="an executable that runs Python with the peer installed, e.g. a wrapper script setting "
                        "PYTHONPATH (assets/bench/README.md)")
    p.add_argument("--isolate", action="store_true",
                   help="train each --variant in a process of its own, as the peer's settings are, so that no "
                        "row's peak memory holds what an earlier row left allocated (one model load per variant; "
                        "without it, variants of runtime keys share the first row's process and loaded model)")
    p.add_argument("--output", default=None, help="JSON path (a .md twin is written beside it; "
                                                  "default: bench-<presets>-<time>.json in the current folder)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per worker process")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="profile every row's last 3 steps (GPU kernels, ours and the peer's) into DIR/*.txt and "
                        "*.json; those steps are left out of the row's median")
    p.add_argument("--memory-profile", default=None, metavar="DIR",
                   help="record every CUDA allocation of each row (ours and the peer's) and write where its peak is, "
                        "by the Python line that allocated each live block, to DIR/*-memory.txt and .json; the "
                        "recording slows the host, so take speeds from another invocation (GPU only)")
    p.set_defaults(func=run)


def run(args) -> int:
    import sys

    from .. import bench
    from ..errors import UserError

    if len(args.seq_len) != len(args.batch_size):
        if len(args.batch_size) == 1:
            args.batch_size = args.batch_size * len(args.seq_len)
        elif len(args.seq_len) == 1:
            args.seq_len = args.seq_len * len(args.batch_size)
        else:
            raise UserError("--seq-len and --batch-size: give one value, or as many of one as of the other")
    if min(args.seq_len) < 8 or min(args.batch_size) < 1 or args.steps < 2:
        raise UserError("--seq-len >= 8, --batch-size >= 1, --steps >= 2")
    if args.profile:
        from ..bench.profiling import STEPS

        warmup = bench.default_warmup(args.steps) if args.warmup is None else args.warmup
        if args.steps < warmup + STEPS + 1:
            raise UserError(f"--profile: --steps must leave at least one timed step after {warmup} warm-up "
                            f"and {STEPS} profiled steps (--steps >= {warmup + STEPS + 1})")
    variants = []
    for v in args.variant:
        name, sep, sets = v.partition(":")
        if not sep or not name or not sets:
            raise UserError(f"--variant {v!r}: expected NAME:section.key=value[,section.key=value]")
        variants.append((name, [s for s in sets.split(",") if s]))
    multi = []
    for m in args.multi_gpu:
        kind, _, rest = m.partition(":")
        n, _, name = rest.partition(":")
        if kind not in ("dp", "fsdp") or not n.isdigit() or int(n) < 2 or (name and name not in dict(variants)):
            raise UserError(f"--multi-gpu {m!r}: expected dp:N or fsdp:N (N >= 2), optionally :VARIANT naming a --variant")
        multi.append((kind, int(n), name or None))
    shapes = [bench.Shape(L, B) for L, B in zip(args.seq_len, args.batch_size)]
    # Validate overrides now, not in a worker minutes later.
    for _, sets in [("", args.overrides)] + variants:
        bench.bench_config(args.preset[0], shapes[0], args.steps, args.memory_budget, list(args.overrides) + list(sets))
    report = bench.run(args.preset, shapes, steps=args.steps, baseline=args.baseline,
                       memory_budget=args.memory_budget, overrides=args.overrides, variants=variants, multi_gpu=multi,
                       output=args.output, warmup=args.warmup, timeout=args.timeout,
                       command="qlora-lab " + " ".join(sys.argv[1:]), peer=args.peer, peer_python=args.peer_python,
                       profile=args.profile, isolate=args.isolate, memory_profile=args.memory_profile)
    failed = [r for r in report["rows"] if r.get("status") != "ok"]
    bad_loss = [c for c in report["comparisons"] + report.get("scaling", []) if c.get("loss_ok") is False]
    if bad_loss:
        print(f"qlora-lab bench: losses differ by more than {bench.LOSS_TOLERANCE:.0%} in {len(bad_loss)} comparison(s)",
              file=sys.stderr)
    return 1 if failed or bad_loss else 0
