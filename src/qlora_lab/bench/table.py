"""The bench's outputs beside the rows: comparisons with the standard recipe and the peer, scaling, the Markdown
table."""
from __future__ import annotations

import statistics

from .spec import LOSS_STEPS, LOSS_TOLERANCE


def compare(rows: list) -> list:
    """Each ours-row against the baseline of the same preset and shape: speed, memory, loss agreement."""
    out = []
    base = {(r["preset"], r["seq_len"], r["batch_size"]): r for r in rows if r["path"] == "baseline"}
    for r in rows:
        if not r["path"].startswith("ours"):
            continue
        b = base.get((r["preset"], r["seq_len"], r["batch_size"]))
        if b is None:
            continue
        c = {"preset": r["preset"], "seq_len": r["seq_len"], "batch_size": r["batch_size"], "path": r["path"]}
        if r.get("tokens_per_s") and b.get("tokens_per_s"):
            c["speedup"] = r["tokens_per_s"] / b["tokens_per_s"]
        if r.get("peak_allocated_bytes") and b.get("peak_allocated_bytes"):
            c["peak_ratio"] = r["peak_allocated_bytes"] / b["peak_allocated_bytes"]
        c.update(_loss_agreement(r, b))
        out.append(c)
    return out


PEER_MEMORY_SLACK = 0.05  # an ours-row may peak this much above a peer row and still stand against it


def compare_peer(rows: list, slack: float = PEER_MEMORY_SLACK) -> list:
    """At each peer row (Unsloth's), our fastest one-GPU row of the same preset and shape whose peak allocated
    memory is at most `slack` above the peer's: the speed and memory ratios (allocated, the criterion; reserved,
    what the GPU must hold) and the loss agreement. Where no row of ours peaks that low, ours is None and
    `closest` is our row of that shape with the lowest peak: its path, speed ratio and peak ratio."""
    out = []
    ours = [r for r in rows if r["path"].startswith("ours") and r.get("status", "ok") == "ok"
            and r.get("world_size", 1) == 1 and r.get("tokens_per_s") and r.get("peak_allocated_bytes")]
    for p in rows:
        if p["path"].startswith(("ours", "baseline")) or p.get("status", "ok") != "ok":
            continue
        if not (p.get("tokens_per_s") and p.get("peak_allocated_bytes")):
            continue
        shape = [r for r in ours if (r["preset"], r["seq_len"], r["batch_size"]) ==
                 (p["preset"], p["seq_len"], p["batch_size"])]
        same = [r for r in shape if r["peak_allocated_bytes"] <= (1 + slack) * p["peak_allocated_bytes"]]
        c = {"preset": p["preset"], "seq_len": p["seq_len"], "batch_size": p["batch_size"], "peer": p["path"],
             "peer_tokens_per_s": p["tokens_per_s"], "peer_peak_allocated_bytes": p["peak_allocated_bytes"],
             "peer_peak_reserved_bytes": p.get("peak_reserved_bytes"), "memory_slack": slack, "ours": None}
        if same:
            best = max(same, key=lambda r: r["tokens_per_s"])
            c.update(ours=best["path"], ours_tokens_per_s=best["tokens_per_s"],
                     ours_peak_allocated_bytes=best["peak_allocated_bytes"],
                     ours_peak_reserved_bytes=best.get("peak_reserved_bytes"),
                     speedup=best["tokens_per_s"] / p["tokens_per_s"],
                     peak_ratio=best["peak_allocated_bytes"] / p["peak_allocated_bytes"], **_loss_agreement(best, p))
            if best.get("peak_reserved_bytes") and p.get("peak_reserved_bytes"):
                c["reserved_ratio"] = best["peak_reserved_bytes"] / p["peak_reserved_bytes"]
        elif shape:
            low = min(shape, key=lambda r: r["peak_allocated_bytes"])
            c["closest"] = {"path": low["path"], "speedup": low["tokens_per_s"] / p["tokens_per_s"],
                            "peak_ratio": low["peak_allocated_bytes"] / p["peak_allocated_bytes"]}
        out.append(c)
    return out


def compare_scaling(rows: list) -> list:
    """Each several-GPU row against its one-GPU reference (same overrides): the same batch per GPU
    for speed and memory, the same global batch for the losses."""
    out = []
    one = {(r["preset"], r["path"], r["seq_len"], r["batch_size"]): r for r in rows
           if r.get("status") == "ok" and r.get("world_size", 1) == 1}
    for r in rows:
        n = r.get("world_size", 1)
        if n == 1 or r.get("status") != "ok" or r["batch_size"] % n:
            continue
        c = {"preset": r["preset"], "path": r["path"], "seq_len": r["seq_len"], "batch_size": r["batch_size"],
             "world_size": n, "reference": r["reference"]}
        per_gpu = one.get((r["preset"], r["reference"], r["seq_len"], r["batch_size"] // n))
        if per_gpu:
            c.update(per_gpu_batch=r["batch_size"] // n, speedup=r["tokens_per_s"] / per_gpu["tokens_per_s"])
            if r.get("peak_allocated_bytes") and per_gpu.get("peak_allocated_bytes"):
                c["peak_allocated_ratio"] = r["peak_allocated_bytes"] / per_gpu["peak_allocated_bytes"]
        c.update(_loss_agreement(r, one.get((r["preset"], r["reference"], r["seq_len"], r["batch_size"])) or {}))
        out.append(c)
    return out


def _loss_agreement(row: dict, ref: dict) -> dict:
    """Largest relative difference of the two rows' losses over the first LOSS_STEPS steps ({} if none)."""
    la, lb = row.get("losses") or [], ref.get("losses") or []
    n = min(len(la), len(lb), LOSS_STEPS)
    if not n:
        return {}
    d = max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(la[:n], lb[:n]))
    return {"loss_steps": n, "loss_max_rel_diff": d, "loss_ok": d <= LOSS_TOLERANCE}


def _gib(x) -> str:
    return "-" if not x else f"{x / 2**30:.1f}"


def markdown(report: dict) -> str:
    """One table: a row per (preset, shape, path), baseline beside ours, then the losses."""
    env = report["env"]
    comp = {(c["preset"], c["seq_len"], c["batch_size"], c["path"]): c for c in report["comparisons"]}
    head = (f"Device: {env.get('device')} | torch {env.get('torch')} | transformers {env.get('transformers')} | "
            f"peft {env.get('peft')} | bitsandbytes {env.get('bitsandbytes')} | trl {env.get('trl')} | "
            f"liger-kernel {env.get('liger-kernel')}\n"
            f"Matmul rate measured (bf16, 8192^3): {report.get('matmul_tflops') or 'n/a'} TFLOP/s. "
            f"{report['steps']} steps, median after {report['warmup_steps']} warm-up steps"
            + (f"; memory budget {report['memory_budget_gib']} GiB" if report.get("memory_budget_gib") else "") + ".\n"
            + (f"Every CUDA allocation recorded (--memory-profile {report['memory_profile']}): the speeds below include "
               "the recording's host cost and do not count.\n" if report.get("memory_profile") else ""))
    lines = ["| model | batch x seq | path | plan | step s | tokens/s | MFU | HFU | peak alloc GiB | peak reserved GiB "
             "| weights GiB | vs baseline | loss max rel. diff (20 steps) |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|---|"]
    for r in report["rows"]:
        c = comp.get((r["preset"], r["seq_len"], r["batch_size"], r["path"]), {})
        if r.get("status", "ok") != "ok":
            lines.append(f"| {r['preset']} | {r['batch_size']}x{r['seq_len']} | {r['path']} | | {r['status']} "
                         "| | | | | | | | |")
            continue
        w = _gib(r.get("weights_bytes"))
        if r.get("weights_4bit") is False:  # a peer that kept its base in 16 bits: not QLoRA
            w += f" (**16-bit weights**: {r.get('n_linear_16bit')} of {r.get('n_linear')} linear layers not quantized)"
        elif r.get("n_linear_16bit"):
            w += f" (**16-bit**: {r['n_linear_16bit']} of {r['n_linear']} linear layers not quantized)"
        m, hw = r.get("mfu"), r.get("hfu")
        speed = f"{c['speedup']:.2f}x" if c.get("speedup") else ""
        loss = (f"{c['loss_max_rel_diff']:.2%} {'ok' if c['loss_ok'] else 'FAIL'}" if "loss_ok" in c else "")
        lines.append(f"| {r['preset']} | {r['batch_size']}x{r['seq_len']} | {r['path']} | {r.get('plan_words', '')} "
                     f"| {r['median_step_s']:.3f} | {r['tokens_per_s']:.0f} | {'n/a' if m is None else f'{m:.1%}'} "
                     f"| {'n/a' if hw is None else f'{hw:.1%}'} "
                     f"| {_gib(r.get('peak_allocated_bytes'))} | {_gib(r.get('peak_reserved_bytes'))} | {w} "
                     f"| {speed} | {loss} |")
    loads = [(r["path"], r["host_load_1min"]) for r in report["rows"] if r.get("host_load_1min")]
    if loads and all(x is not None for _, ld in loads for x in ld):
        cpus = report["env"].get("cpu_count")
        lines.append(f"\nHost load (1-minute average, {cpus} CPUs) before / after each row's worker: "
                     + "; ".join(f"{p} {a:g} / {b:g}" for p, (a, b) in loads)
                     + ". Other work on the host slows our path more than the peer's: compare rows measured under similar load.")
    probes = [(r, r["host_probe_ms"]) for r in report["rows"] if len(r.get("host_probe_ms") or ()) >= 4]
    if probes:
        def early_late(xs):
            h = len(xs) // 2
            return statistics.median(xs[:h]), statistics.median(xs[h:])

        lines.append("\nHost probe (a fixed Python loop between steps, ms; first half / second half of the steps: "
                     "a rise means the host slowed, not the step): "
                     + "; ".join(f"{r['path']} {r['batch_size']}x{r['seq_len']} {a:.2f} / {b:.2f}"
                                 for r, (a, b) in ((r, early_late(x)) for r, x in probes)) + ".")
    phased = [r for r in report["rows"] if r.get("host_phases_ms")]
    if phased:
        lines.append("\nHost timeline (median host ms per step from the previous step's end: next batch / forward and "
                     "backward launched, gradients clipped / optimizer step returned / bookkeeping; a phase that "
                     "waits for the GPU holds the wait): "
                     + "; ".join(f"{r['path']} {r['batch_size']}x{r['seq_len']} "
                                 + " / ".join(f"{v:.1f}" for v in r["host_phases_ms"].values()) for r in phased) + ".")
    peer = report.get("peer_comparisons") or []
    if peer:
        lines += ["", f"At each peer row, our fastest row of the same model and shape that peaks at most "
                  f"{peer[0]['memory_slack']:.0%} above it (peak allocated):", "",
                  "| model | batch x seq | peer row | tokens/s | peak alloc GiB | our row | tokens/s | peak alloc GiB "
                  "| speed | memory | reserved | loss max rel. diff |",
                  "|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---|"]
        for c in peer:
            row = (f"| {c['preset']} | {c['batch_size']}x{c['seq_len']} | {c['peer']} | {c['peer_tokens_per_s']:.0f} "
                   f"| {_gib(c['peer_peak_allocated_bytes'])} ")
            if c["ours"] is None:
                near = c.get("closest")
                lines.append(row + "| none peaks that low" + (
                    f" (lowest: {near['path']}, {near['speedup']:.2f}x at {near['peak_ratio'] - 1:+.1%})" if near else "")
                    + " | | | | | | |")
                continue
            loss = (f"{c['loss_max_rel_diff']:.2%} over {c['loss_steps']} steps" if "loss_steps" in c else "")
            reserved = f"{c['reserved_ratio'] - 1:+.1%}" if "reserved_ratio" in c else ""
            lines.append(row + f"| {c['ours']} | {c['ours_tokens_per_s']:.0f} | {_gib(c['ours_peak_allocated_bytes'])} "
                         f"| {c['speedup']:.2f}x | {c['peak_ratio'] - 1:+.1%} | {reserved} | {loss} |")
    for c in report.get("scaling") or []:
        line = f"\n{c['preset']} {c['path']} ({c['world_size']} GPUs, {c['batch_size']}x{c['seq_len']} in all) vs {c['reference']} on 1 GPU:"
        if "speedup" in c:
            line += f" {c['speedup']:.2f}x its tokens/s at {c['per_gpu_batch']}x{c['seq_len']} per GPU"
            if "peak_allocated_ratio" in c:
                line += f", peak allocated per GPU {c['peak_allocated_ratio']:.2f}x its"
            line += ";"
        if "loss_ok" in c:
            line += (f" losses over {c['loss_steps']} steps vs the same global batch on 1 GPU: max rel. diff "
                     f"{c['loss_max_rel_diff']:.2%} {'ok' if c['loss_ok'] else 'FAIL'}")
        lines.append(line)
    return head + "\n" + "\n".join(lines)


