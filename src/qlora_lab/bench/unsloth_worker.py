"""The Unsloth peer of `qlora-lab bench`, run by file path in the peer's own interpreter.

    PEER_PYTHON unsloth_worker.py --probe       one JSON line: are unsloth, torch and bitsandbytes there
    PEER_PYTHON unsloth_worker.py SPEC_JSON     train every shape; one JSON line per event on stdout,
                                                 the same lines appended to spec["out"]

The peer pins its own transformers and trl, so this file runs where qlora_lab may not import: it
imports nothing from qlora_lab, and the bench's parent (bench/peer.py) puts everything it needs in the
spec: the random-weight checkpoint folder our rows load, rank, alpha, dropout, target modules, optimizer
settings, shapes, steps and the batch seed. Importing this file loads neither torch nor unsloth, so a
test compares `synthetic_batches` with the bench's own batches in-process, bit for bit.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

if __name__ == "__main__" and sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(
        os.path.abspath(__file__)):
    del sys.path[0]  # the bench package's folder: its modules must not shadow the peer's imports

LOSS_STEPS = 20  # losses kept per row at least (the bench's LOSS_STEPS)


def _profiling():
    """The bench's profiling.py, loaded by path (this interpreter may not have qlora_lab)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_qlora_lab_bench_profiling",
                                                  os.path.join(os.path.dirname(os.path.abspath(__file__)), "profiling.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def synthetic_batches(vocab: int, seq_len: int, batch_size: int, steps: int, seed: int) -> list:
    """The bench's batches as (batch_size, seq_len) int64 tensors, step by step.

    The same draws from the same generator as bench.spec.synthetic_examples: a random motif repeated,
    ids 0-3 never drawn, batch i = sequences [i * batch_size, (i + 1) * batch_size). Labels = input ids.
    """
    import torch

    g = torch.Generator().manual_seed(seed + seq_len * 1000 + batch_size)
    rows = []
    for _ in range(steps * batch_size):
        period = int(torch.randint(8, 65, (1,), generator=g))
        motif = torch.randint(4, vocab, (period,), generator=g)
        rows.append(motif.repeat(seq_len // period + 1)[:seq_len])
    return [torch.stack(rows[i * batch_size:(i + 1) * batch_size]) for i in range(steps)]


def probe() -> dict:
    """What this interpreter has, without importing unsloth (it needs a GPU to import)."""
    import importlib.metadata
    import importlib.util

    info = {"python": sys.version.split()[0], "executable": sys.executable}
    for name in ("unsloth", "torch", "bitsandbytes"):
        found = importlib.util.find_spec(name) is not None
        try:
            info[name] = importlib.metadata.version(name) if found else None
        except importlib.metadata.PackageNotFoundError:
            info[name] = "unknown"
    return info


def linear_counts(model) -> dict:
    """Linear layers (the output head aside) and how many of them bitsandbytes holds in 4 bits."""
    import bitsandbytes as bnb
    from torch import nn

    head = model.get_output_embeddings()
    lin = [m for m in model.modules() if isinstance(m, nn.Linear) and m is not head]
    n4 = sum(isinstance(m, bnb.nn.Linear4bit) for m in lin)
    return {"n_linear": len(lin), "n_linear_4bit": n4, "n_linear_16bit": len(lin) - n4,
            "weights_4bit": n4 > 0 and n4 == len(lin)}


def load(spec: dict):
    """(model, facts): the checkpoint in 4 bits (as far as Unsloth quantizes it), LoRA attached."""
    import unsloth  # noqa: F401  (first: it patches transformers and trl on import)
    import torch
    from unsloth import FastLanguageModel

    max_len = max(L for L, _ in spec["shapes"])
    model, _tok = FastLanguageModel.from_pretrained(spec["model_path"], max_seq_length=max_len,
                                                    dtype=torch.bfloat16, load_in_4bit=True)
    facts = {**linear_counts(model), "weights_bytes": int(model.get_memory_footprint())}
    lora = spec["lora"]
    model = FastLanguageModel.get_peft_model(
        model, r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
        target_modules=lora["target_modules"], bias="none",
        use_gradient_checkpointing=spec["gradient_checkpointing"], random_state=spec["seed"])
    # The setting in force (Unsloth turns "unsloth" into plain recomputation below 512 tokens).
    facts["gradient_checkpointing"] = getattr(model, "_unsloth_gradient_checkpointing", spec["gradient_checkpointing"])
    facts["n_lora_modules"] = sum(1 for _, m in model.named_modules() if hasattr(m, "lora_A") and len(m.lora_A))
    return model, facts


def initial_lora(model, path: str) -> tuple[dict, str]:
    """The LoRA weights every shape starts from: the bench's saved ones when their names match ours."""
    state = {n: p for n, p in model.named_parameters() if "lora_" in n}
    if path and os.path.isfile(path):
        from safetensors.torch import load_file

        saved = load_file(path)
        if set(saved) == set(state) and all(saved[n].shape == p.shape for n, p in state.items()):
            return saved, "loaded"
        return _snapshot(state), f"own (names or shapes differ from the bench's: {len(set(saved) ^ set(state))} names)"
    return _snapshot(state), "own (no saved initial weights)"


def _snapshot(state: dict) -> dict:
    return {n: p.detach().to("cpu", copy=True) for n, p in state.items()}


def optimizer(spec: dict, params):
    """The optimizer our rows use, with the same settings (the Trainer's AdamW betas and epsilon)."""
    import torch

    o = spec["optimizer"]
    kw = dict(lr=o["learning_rate"], betas=tuple(o["betas"]), eps=o["eps"], weight_decay=o["weight_decay"])
    if o["name"] == "adamw_torch":
        return torch.optim.AdamW(params, **kw)
    import bitsandbytes as bnb

    cls = {"paged_adamw_32bit": bnb.optim.PagedAdamW32bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
           "adamw_8bit": bnb.optim.AdamW8bit}[o["name"]]
    return cls(params, **kw)


def _peaks() -> dict:
    import torch

    return {"peak_allocated_bytes": torch.cuda.max_memory_allocated(),
            "peak_reserved_bytes": torch.cuda.max_memory_reserved()}


def _peak_reset():
    import gc

    import torch

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def train_shape(spec: dict, model, facts: dict, init: dict, seq_len: int, batch_size: int) -> dict:
    """Train one shape from the initial LoRA weights with a fresh optimizer; the row's measured keys."""
    import torch

    torch.manual_seed(spec["seed"])
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in init:
                p.copy_(init[n])
    opt = optimizer(spec, params)
    batches = synthetic_batches(spec["vocab_size"], seq_len, batch_size, spec["steps"], spec["batch_seed"])
    gc_mode = facts["gradient_checkpointing"]
    if hasattr(model, "for_training"):  # what Unsloth's trainer does before it trains
        model.for_training(use_gradient_checkpointing=gc_mode)
    else:
        model.train()
    _peak_reset()
    times, probes, losses = [], [], []
    profiling = _profiling()  # the step timing both workers share, the profiler and the memory recorder
    memory = None
    if spec.get("memory_profile"):
        memory = profiling.MemoryRecorder(spec["memory_profile"], profiling.file_name(
            spec["preset"], spec["label"], seq_len, batch_size), f"{spec['preset']} {spec['label']} {seq_len}x{batch_size}")
        memory.start()
    prof = None
    if spec.get("profile"):
        prof = profiling.StepProfiler(spec["profile"], profiling.file_name(spec["preset"], spec["label"], seq_len,
                                      batch_size), f"{spec['preset']} {spec['label']} {seq_len}x{batch_size}",
                                      spec["steps"] - profiling.STEPS)
    try:
        torch.cuda.synchronize()
        t = time.perf_counter()
        phases = []
        for ids in batches:  # one optimizer step per batch, no accumulation, as in our rows
            marks = {}
            ids = ids.to("cuda", non_blocking=True)
            marks["batch"] = time.perf_counter()
            if prof is not None:
                prof.step_begin(len(times))
            with torch.autocast("cuda", dtype=torch.bfloat16):  # the Trainer's bf16 mixed precision
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, spec["optimizer"]["max_grad_norm"])
            marks["backward"] = time.perf_counter()
            opt.step()
            marks["optimizer"] = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))  # logged every step, as our rows do
            marks["bookkeeping"] = time.perf_counter()
            if prof is not None:
                prof.step_end(len(times))
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
            phases.append(profiling.host_phases(t, marks))
            probes.append(profiling.host_probe_ms())  # outside the step's timing, as in our rows
            t = time.perf_counter()
    finally:
        if memory is not None:  # an OOM's breakdown too; stops the recording
            memory.finish()
    del opt
    med = statistics.median(profiling.timed(times, spec["warmup"], prof is not None))
    trained = batch_size * (seq_len - 1)  # tokens with a next-token label, as our rows count
    return {"status": "ok", "steps": len(times), "median_step_s": med, "step_times_s": [round(x, 4) for x in times],
            "host_probe_ms": [round(x, 3) for x in probes],
            "host_phases_ms": profiling.median_phases(profiling.timed(phases, spec["warmup"], prof is not None)),
            "tokens_per_s": trained / med, "trained_tokens_per_step": trained,
            "losses": losses[:max(spec["steps"], LOSS_STEPS)], **_peaks()}


def _oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def main(spec: dict) -> int:
    import torch

    def emit(event: str, **kw):
        line = json.dumps({"event": event, **kw}, default=str)
        print(line, flush=True)
        with open(spec["out"], "a", encoding="utf-8") as f:
            f.write(line + "\n")

    info = probe()
    emit("start", pid=os.getpid(), peer=spec["path"], peer_version=info["unsloth"], torch=info["torch"],
         bitsandbytes=info["bitsandbytes"], python=info["python"])
    if spec.get("memory_budget"):  # the cap our rows train under
        frac = min(1.0, spec["memory_budget"] * 2**30 / torch.cuda.get_device_properties(0).total_memory)
        torch.cuda.set_per_process_memory_fraction(frac, 0)
    model, facts = load(spec)
    init, lora_init = initial_lora(model, spec.get("init_lora"))
    emit("model", facts=facts, lora_init=lora_init)
    gc_mode = facts["gradient_checkpointing"]
    words = (f"Unsloth {info['unsloth']}, "
             + ("offloaded ckpt all" if gc_mode == "unsloth" else "ckpt all" if gc_mode else "ckpt 0")
             + ("" if facts["weights_4bit"] else ", 16-bit weights"))
    for seq_len, batch_size in spec["shapes"]:
        row = {"preset": spec["preset"], "path": spec["label"], "seq_len": seq_len, "batch_size": batch_size}
        try:
            row.update(train_shape(spec, model, facts, init, seq_len, batch_size))
            row.update({"plan_words": words, "peer": spec["path"], "peer_version": info["unsloth"],
                        "lora_r": spec["lora"]["r"], "lora_dropout": spec["lora"]["dropout"], "world_size": 1,
                        "lora_init": lora_init, **facts})
        except Exception as e:  # an OOM loses this shape only
            why = "out of memory" if _oom(e) else f"{type(e).__name__}: {str(e)[:200]}"
            row.update({"status": f"failed: {why}", **_peaks()})
            emit("row", row=row)
            if not _oom(e):
                raise
            continue
        finally:
            _peak_reset()
        emit("row", row=row)
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--probe"]:
        print(json.dumps(probe()), flush=True)
        sys.exit(0)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main(json.loads(sys.argv[1])))
