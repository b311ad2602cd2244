"""One timed worker process: ours or the standard recipe, every shape on one loaded model.

    python -m qlora_lab.bench.worker SPEC_JSON        (started by bench.run, never by hand)

"ours" is exactly what `qlora-lab train` runs: training.load_plan -> training.load_model ->
training.build_trainer -> Trainer.train. Each row: median wall time per optimizer step after warm-up
(data loading and logging included), trained tokens/s, peak allocated and reserved GPU memory, the base
weights' bytes and the losses of the first LOSS_STEPS steps. Results go to the spec's events file as
JSON lines, one per event, so a crash keeps the rows already written.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

from ..distributed import is_main_process, world_size
from ..errors import is_out_of_memory
from . import profiling
from .flops import matmul_tflops, row_flops
from .spec import LORA_ALPHA, LORA_R, LOSS_STEPS, Shape, bench_config, synthetic_examples


class _Emit:
    def __init__(self, path):
        self.path = Path(path)

    def __call__(self, event: str, **kw):
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"event": event, **kw}, default=str) + "\n")


def _step_timer(profiler=None):
    """Trainer callback: wall time of every optimizer step (synchronized), the host probe after each, and
    every logged loss; with a profiling.StepProfiler, its steps profiled."""
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.probes, self.losses, self.phases, self._t = [], [], [], [], None
            self._marks = {}

        def _now(self):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            return time.perf_counter()

        def on_train_begin(self, args, state, control, **kw):
            self._t = self._now()

        def on_step_begin(self, args, state, control, **kw):
            self._marks = {"batch": time.perf_counter()}
            if profiler is not None:
                profiler.step_begin(len(self.times))

        def on_pre_optimizer_step(self, args, state, control, **kw):
            self._marks["backward"] = time.perf_counter()

        def on_optimizer_step(self, args, state, control, **kw):
            self._marks["optimizer"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self._marks["bookkeeping"] = time.perf_counter()
            if profiler is not None:
                profiler.step_end(len(self.times))
            self.times.append(self._now() - self._t)
            self.phases.append(profiling.host_phases(self._t, self._marks))
            self.probes.append(profiling.host_probe_ms())
            self._t = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs and "train_runtime" not in logs:
                self.losses.append(float(logs["loss"]))

    return StepTimer()


def _lora_state(model) -> dict:
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


def _sync_init_lora(model, path: str) -> str:
    """The first process saves its initial LoRA weights; every other one loads them (same start)."""
    import torch
    from safetensors.torch import load_file, save_file

    state = _lora_state(model)
    p = Path(path)
    if not p.is_file() and world_size() > 1:
        return "own (several processes start from their own, identically seeded, init)"
    if p.is_file():
        saved = load_file(str(p))
        if set(saved) != set(state):
            raise RuntimeError(f"LoRA parameters differ between paths: {sorted(set(saved) ^ set(state))[:4]}")
        with torch.no_grad():
            for n, t in state.items():
                t.copy_(saved[n])
        return "loaded"
    save_file({n: t.detach().to("cpu", copy=True).contiguous() for n, t in state.items()}, str(p))
    return "saved"


def _peak_reset():
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peaks() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"peak_allocated_bytes": None, "peak_reserved_bytes": None}
    peaks = [torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()]
    if torch.distributed.is_available() and torch.distributed.is_initialized():  # the largest GPU's
        t = torch.tensor(peaks, dtype=torch.float64, device="cuda")
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        peaks = [int(x) for x in t.tolist()]
    return {"peak_allocated_bytes": peaks[0], "peak_reserved_bytes": peaks[1]}


def _row(spec, shape: Shape, timer, steps: int, warmup: int, hf_config, lora_r: int, recomputed: int,
         extra: dict) -> dict:
    med = statistics.median(profiling.timed(timer.times, warmup, bool(spec.get("profile"))))
    trained = shape.batch_size * (shape.seq_len - 1)  # tokens with a next-token label, as training.Trainer counts
    return {"preset": spec["preset"], "path": spec["label"], "seq_len": shape.seq_len,
            "batch_size": shape.batch_size, "status": "ok", "steps": len(timer.times),
            "median_step_s": med, "step_times_s": [round(t, 4) for t in timer.times],
            "host_probe_ms": [round(t, 3) for t in timer.probes],
            "host_phases_ms": profiling.median_phases(profiling.timed(timer.phases, warmup, bool(spec.get("profile")))),
            "tokens_per_s": trained / med, "trained_tokens_per_step": trained,
            **row_flops(hf_config, shape.seq_len, lora_r, recomputed),
            "lora_r": lora_r,
            "world_size": world_size(),
            "losses": timer.losses[:max(steps, LOSS_STEPS)], **_peaks(), **extra}


def worker(spec: dict) -> int:
    emit = _Emit(spec["out"])
    emit("start", pid=os.getpid(), matmul_tflops=matmul_tflops())
    shapes = [Shape(L, B) for L, B in spec["shapes"]]
    fn = _worker_ours if spec["path"] == "ours" else _worker_baseline
    if not is_main_process():  # several processes: rank 0 reports
        emit = _no_emit
    return fn(spec, shapes, emit)


def _no_emit(event: str, **kw):
    pass


def _worker_ours(spec, shapes, emit) -> int:
    """Load the model once; train every (run, shape) on it, each run with its own plan."""
    model = summary = None
    for label, overrides in spec["runs"]:
        for shape in shapes:
            model, summary = _train_ours(spec, label, overrides, shape, model, summary, emit)
    return 0


def _train_ours(spec, label, overrides, shape, model, summary, emit):
    import torch
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import set_seed

    from .. import training
    from ..kernels import fused_lora, graphs, grouped_lora, levers, lora_mlp
    from ..model import set_recomputation

    trainer = memory = None
    cfg = bench_config(spec["preset"], shape, spec["steps"], spec["memory_budget"], overrides)
    run = training.prepare_run_folder(cfg, Path(spec["workdir"]) / f"run-{label}-{shape}", resume=False)
    set_seed(cfg.train.seed)
    if torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(1.0, 0)  # load_plan applies this run's budget, if any
    tok, hf_config, plan = training.load_plan(cfg, run)
    try:
        if model is None:
            model = training.load_model(cfg, plan, run)
            summary = run.read_json("model_summary.json") or {}  # written by rank 0 only
            emit("model", summary=summary, lora_init=_sync_init_lora(model, spec["init_lora"]))
        else:  # the loaded model, this run's plan: recompute all, some or no layers; fused LoRA or not
            set_recomputation(model.get_base_model(), plan.recompute_layers, plan.offload_checkpoints)
            levers.switch(model, plan, cfg.train)
            if (spec.get("launch") or {}).get("kind") != "fsdp":  # FSDP has wrapped (flattened) the LoRA weights
                _sync_init_lora(model, spec["init_lora"])
        ds = Dataset.from_list(synthetic_examples(hf_config.vocab_size, shape, spec["steps"]))
        trainer = training.build_trainer(cfg, plan, model, tok, ds, None, run)
        trainer._get_train_sampler = lambda *a, **k: SequentialSampler(ds)  # same order as the baseline
        timer = _step_timer(_profiler(spec, label, shape))
        trainer.add_callback(timer)
        _peak_reset()
        memory = _memory_recorder(spec, label, shape)
        if memory is not None:
            memory.start()
        trainer.train()
        n = plan.recompute_layers
        words = (f"{plan.kernels}{' + fused LoRA' if plan.fused_lora else ''}, ckpt {n}/{hf_config.num_hidden_layers}, "
                 f"micro {plan.per_device_train_batch_size}x{plan.gradient_accumulation_steps}"
                 + (f", budget {plan.memory_budget_gib:g} GiB" if cfg.train.memory_budget_gib else "")
                 + (", grouped q/k/v, gate/up" if grouped_lora.count(model) else "")
                 + (", fused MLP" if lora_mlp.count(model) else "")
                 + (", inputs offloaded" if plan.offload_checkpoints else "")
                 + (", 1 optimizer sync/step" if cfg.train.optimizer_sync == "per-step" else "")
                 + (", direct optimizer calls" if getattr(trainer.optimizer, "_qlora_lab_direct", False) else "")
                 + (", fused optimizer" if getattr(trainer.optimizer, "_qlora_lab_fused", None) else "")
                 + (", bitsandbytes dequant" if plan.fused_lora and not cfg.train.nf4_kernel else "")
                 + (f", layer graphs ({graphs.captures(model)} capture)" if graphs.count(model) else ""))
        emit("row", row=_row({**spec, "label": label}, shape, timer, spec["steps"], spec["warmup"], hf_config,
                             cfg.lora.r, n, {
            "plan": plan.to_dict(), "plan_words": words, "kernels": summary.get("kernels"),
            "fused_lora_modules": fused_lora.count(model),
            "launch": (spec.get("launch") or {}).get("kind"), "reference": (spec.get("launch") or {}).get("ref"),
            "weights_bytes": summary.get("weights_bytes"), "n_linear_16bit":
                summary.get("n_linear_expected_4bit", 0) - summary.get("n_linear_4bit", 0) if summary.get("quantization") else None,
            "n_linear": summary.get("n_linear_total"), "n_lora_modules": summary.get("n_lora_modules")}))
    except Exception as e:  # an OOM loses this shape only
        emit("row", row=_failed_row({**spec, "label": label}, shape, e))
        if not is_out_of_memory(e):
            raise
    finally:
        if memory is not None:
            memory.finish()  # every row's breakdown, a failed one's too (an OOM's matters most); stops the recording
        trainer = None
        _peak_reset()
    return model, summary


def _profiler(spec, label: str, shape: Shape):
    """A StepProfiler for this row's last steps where the bench was asked to --profile, else None."""
    if not spec.get("profile") or not is_main_process():
        return None
    name = profiling.file_name(spec["preset"], label, shape.seq_len, shape.batch_size)
    return profiling.StepProfiler(spec["profile"], name, f"{spec['preset']} {label} {shape}",
                                  spec["steps"] - profiling.STEPS)


def _memory_recorder(spec, label: str, shape: Shape):
    """A MemoryRecorder for this row where the bench was asked to --memory-profile, else None."""
    if not spec.get("memory_profile") or not is_main_process():
        return None
    name = profiling.file_name(spec["preset"], label, shape.seq_len, shape.batch_size)
    return profiling.MemoryRecorder(spec["memory_profile"], name, f"{spec['preset']} {label} {shape}")


def _failed_row(spec, shape, e) -> dict:
    """The table row of a shape that failed: out of memory loses that shape only."""
    return {"preset": spec["preset"], "path": spec["label"], "seq_len": shape.seq_len,
            "batch_size": shape.batch_size, "status": "failed: out of memory" if is_out_of_memory(e)
            else f"failed: {type(e).__name__}: {str(e)[:200]}", **_peaks()}


def _worker_baseline(spec, shapes, emit) -> int:
    import torch
    from datasets import Dataset
    from transformers import AutoConfig, set_seed

    from ..presets import cached_model
    from . import baseline

    path = str(cached_model(spec["preset"]))
    hf_config = AutoConfig.from_pretrained(path)
    cuda = torch.cuda.is_available()
    if cuda and spec["memory_budget"]:
        frac = min(1.0, spec["memory_budget"] * 2**30 / torch.cuda.get_device_properties(0).total_memory)
        torch.cuda.set_per_process_memory_fraction(frac, 0)
    # bf16 on the GPU as the recipe says; float32 on a CPU, where our path computes in float32 too.
    dtype = torch.bfloat16 if cuda else torch.float32
    model = facts = tok = lora = None
    for shape in shapes:
        tr = None
        try:
            set_seed(42)
            if model is None:
                model, tok, lora, facts = baseline.load(path, dtype, lora_r=LORA_R, lora_alpha=LORA_ALPHA,
                                                          lora_dropout=0.05)
                emit("model", facts=facts)
            ds = Dataset.from_list(synthetic_examples(hf_config.vocab_size, shape, spec["steps"]))
            timer = _step_timer(_profiler(spec, spec["label"], shape))
            tr = baseline.trainer(
                model, tok, lora, ds, out_dir=str(Path(spec["workdir"]) / f"run-{shape}"), seq_len=shape.seq_len,
                batch_size=shape.batch_size, steps=spec["steps"], learning_rate=2e-4, max_grad_norm=0.3,
                weight_decay=0.0, lr_scheduler_type="constant", warmup_steps=0, seed=42, bf16=cuda,
                optim="paged_adamw_32bit" if cuda else "adamw_torch", callbacks=[timer])
            model = tr.model
            lora_init = _sync_init_lora(model, spec["init_lora"])
            _peak_reset()
            tr.train()
            n_lora = sum(1 for _, m in model.named_modules() if hasattr(m, "lora_A") and len(m.lora_A))
            emit("row", row=_row(spec, shape, timer, spec["steps"], spec["warmup"], hf_config, LORA_R,
                                 hf_config.num_hidden_layers, {  # the standard recipe recomputes every layer
                "plan_words": "TRL SFT, ckpt all, fp32 norms/head", "weights_bytes": facts["weights_bytes"],
                "weights_bytes_loaded": facts["weights_bytes_loaded"], "n_linear_16bit": facts["n_linear_16bit"],
                "n_linear": facts["n_linear"], "n_lora_modules": n_lora, "lora_init": lora_init}))
        except Exception as e:
            emit("row", row=_failed_row(spec, shape, e))
            if not is_out_of_memory(e):
                raise
        finally:
            tr = None
            _peak_reset()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(worker(json.loads(sys.argv[1])))
