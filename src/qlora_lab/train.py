"""The recipe: seed -> data -> model -> trainer -> train -> save.

    qlora-lab train configs/llama2_7b_lima_qlora.yaml [--set train.max_steps=20] [--resume]
    qlora_lab.train.main(cfg)            # from a notebook

Everything lands in the run folder (see runs.py); wandb mirrors the metrics when enabled.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path

from . import console
from .config import Config, to_yaml
from .distributed import full_state_dict, is_main_process
from .errors import ConfigError, UserError
from .runs import STATE_FILE, RunFolder, atomic_write_json, env_info

log = logging.getLogger("qlora_lab.train")

# Architectures whose attention builds its mask from position_ids, so padding-free packing keeps
# examples apart (checked by tests/test_data_packing.py). Falcon's attention does not.
PACKING_SAFE = {"llama"}


def main(cfg: Config, output_dir=None, resume: bool = False) -> Path:
    from .data import check_data_files

    check_data_files(cfg)  # before the run folder: a missing or empty data file leaves nothing behind
    run = prepare_run_folder(cfg, output_dir, resume)
    with _Attempt(run), _log_to(run):
        if run.resume:
            for _, why in run.resume.skipped:
                log.warning("checkpoint passed over: %s", why)
            log.info("resuming from %s (step %d)", run.resume.checkpoint, run.resume.step)
        from transformers import set_seed

        set_seed(cfg.train.seed)
        tokenizer, hf_config, plan = load_plan(cfg, run)
        train_ds, eval_ds, data_stats = load_data(cfg, tokenizer, run)
        model = load_model(cfg, plan, run)
        trainer = build_trainer(cfg, plan, model, tokenizer, train_ds, eval_ds, run)
        train(trainer, cfg, run, resume)
        save(trainer, cfg, run)
    return run.path


# ----------------------------------------------------------------------------- steps

def prepare_run_folder(cfg: Config, output_dir, resume: bool) -> RunFolder:
    name = cfg.train.run_name or (Path(cfg.source).stem if cfg.source and cfg.source.endswith(".yaml") else "run")
    path = Path(output_dir) if output_dir else Path(cfg.train.output_dir) / name
    run = RunFolder(path)
    run.check_layout()
    run.before = _snapshot(path)  # what bad input must leave as it was (see _Attempt)
    if resume:
        if not run.config_file.is_file():
            raise UserError(f"{path}: --resume needs an existing run folder (no config.yaml here)")
        run.resume = run.resume_point()  # the newest whole checkpoint; never unpickles
    elif run.metrics_file.exists() or run.checkpoints():
        raise UserError(f"{path}: already holds a run; pass --resume to continue it or choose --output-dir")
    if is_main_process():  # data-parallel runs write one run folder, from rank 0
        from .fileio import atomic_write

        path.mkdir(parents=True, exist_ok=True)
        atomic_write(run.config_file, to_yaml(cfg))
        atomic_write_json(path / "env.json", env_info())
        run.set_status("running")
    return run


def load_plan(cfg: Config, run: RunFolder):
    from .hardware import apply_memory_budget, plan
    from .model import load_hf_config, load_tokenizer, model_path

    path = model_path(cfg)
    hf_config = load_hf_config(cfg, path)
    if cfg.data.packing and hf_config.model_type not in PACKING_SAFE:
        raise ConfigError(
            f"{cfg.source}: data.packing: true is not supported for model_type {hf_config.model_type!r}: its "
            f"attention ignores position_ids, so packed examples would attend to each other; allowed: false")
    p = plan(cfg, hf_config)
    for r in p.reasons:
        log.info("plan: %s", r)
    run.write_json("plan.json", p.to_dict())
    if cfg.train.memory_budget_gib:
        apply_memory_budget(p)
    return load_tokenizer(cfg, path), hf_config, p


def load_data(cfg: Config, tokenizer, run: RunFolder):
    from .data import load_datasets

    train_ds, eval_ds, stats = load_datasets(cfg, tokenizer)
    if len(train_ds) == 0:
        raise UserError(f"data.train_file: no trainable example in {cfg.data.train_file}")
    run.write_json("data_stats.json", stats)
    return train_ds, eval_ds, stats


def load_model(cfg: Config, plan, run: RunFolder):
    from . import kernels
    from .kernels import fused_lora as lora_fused
    from .model import add_lora
    from .model import load_model as load_base

    import torch

    try:
        model, _, summary = load_base(cfg, for_training=True, plan=plan)
    except torch.OutOfMemoryError:
        run.set_status("failed: out of memory", step=0)
        raise UserError(
            "out of GPU memory while loading the base model: use quant.bits=4 (a 7B base takes ~3.6 GiB in NF4 "
            "instead of ~13 GiB in 16 bits), a GPU with more memory, or raise train.memory_budget_gib if it is "
            "set below the card's memory") from None
    fused = kernels.apply(model) if plan.kernels == "liger" else []
    # All, none, or the first plan.checkpoint_layers decoder layers recompute their activations.
    model, lora = add_lora(model, cfg, plan.recompute)
    n_fused = lora_fused.enable(model) if plan.fused_lora else 0
    summary.update(lora, kernels=fused, fused_lora_modules=n_fused, gradient_checkpointing=plan.gradient_checkpointing)
    run.write_json("model_summary.json", summary)
    q, dtype = summary["quantization"], summary["compute_dtype"]  # the dtype of the plan, not a guess
    log.info("model: %s, %s, %d/%d linear layers 4-bit, %d LoRA modules, %.2f M trainable params, "
             "base weights %.2f GiB", summary["architecture"],
             f"{q} base computing in {dtype}" if q else f"{dtype} base", summary["n_linear_4bit"],
             summary["n_linear_total"], summary["n_lora_modules"], summary["trainable_params"] / 1e6,
             summary["weights_bytes"] / 2**30)
    return model


def build_trainer(cfg: Config, plan, model, tokenizer, train_ds, eval_ds, run: RunFolder):
    from transformers import TrainingArguments

    from .data.packing import Collator

    t = cfg.train
    report_to = _setup_wandb(cfg, run)
    has_eval = eval_ds is not None and len(eval_ds) > 0
    args = TrainingArguments(
        output_dir=str(run.checkpoints_dir),
        run_name=run.path.name,
        max_steps=t.max_steps,
        per_device_train_batch_size=plan.per_device_train_batch_size,
        per_device_eval_batch_size=plan.per_device_train_batch_size,
        gradient_accumulation_steps=plan.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=math.ceil(t.warmup_ratio * t.max_steps),
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=plan.optim,
        bf16=plan.mixed_precision == "bf16",
        fp16=plan.mixed_precision == "fp16",
        gradient_checkpointing=False,  # applied (or not) by model.add_lora, as the plan says
        logging_steps=t.logging_steps,
        logging_nan_inf_filter=False,  # a NaN must be seen, not averaged away
        eval_strategy=("steps" if t.eval_steps else "no") if has_eval else "no",
        eval_steps=t.eval_steps if has_eval else None,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        seed=t.seed,
        data_seed=t.seed,
        report_to=report_to,
        remove_unused_columns=False,
        dataloader_num_workers=t.dataloader_num_workers,
        use_cpu=plan.device == "cpu",
        disable_tqdm=not console.progress_bars(),  # off a terminal: a line per tenth of the run instead
        ddp_find_unused_parameters=False,
    )
    if args.n_gpu > 1:
        # One process with several visible GPUs: the Trainer would batch n_gpu x the micro-batch (and
        # average losses as for nn.DataParallel), so the config's batch would mean something else.
        # The model sits on one GPU; several GPUs train through torchrun / accelerate (one process each).
        log.warning("%d GPUs visible to one process: training on %s only; launch with torchrun or accelerate "
                    "(configs/accelerate/) to use them all", args.n_gpu, args.device)
        args._n_gpu = 1
    collator = Collator(tokenizer.pad_token_id, packing=cfg.data.packing)
    trainer = _Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds if has_eval else None,
                       data_collator=collator, processing_class=tokenizer)
    trainer.add_callback(_RunCallback(trainer, run))
    _quiet_console_logs(trainer)
    return trainer


def train(trainer, cfg: Config, run: RunFolder, resume: bool) -> None:
    run.started = True
    checkpoint = None
    if resume:
        point = run.resume or run.resume_point()
        checkpoint = point.checkpoint
        if run.writer:
            for d, _ in point.skipped:  # set aside, so that no later save writes into a damaged folder
                log.info("%s set aside as %s", d, run.set_aside(d).name)
        run.truncate_metrics(point.step)
        trainer.resume_tokens(point.tokens)
        if getattr(trainer, "is_fsdp_enabled", False):
            trainer.fsdp_resume_adapter = checkpoint / "adapter_model.safetensors"
    stop = _GracefulStop()
    trainer.graceful_stop = stop
    t0 = time.perf_counter()
    _reset_peak_memory()
    try:
        with stop:
            result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except Exception as e:
        _record_failure(trainer, run, e)
        raise
    trainer.train_seconds = time.perf_counter() - t0
    trainer.train_result = result
    trainer.sync_tokens()
    cb = next(c for c in trainer.callback_handler.callbacks if isinstance(c, _RunCallback))
    if cb.failure:
        run.set_status(f"failed: {cb.failure}", step=cb.failure_step)
        raise UserError(f"{run.path}: training stopped at step {cb.failure_step}: {cb.failure}; "
                        f"last good checkpoint: {run.last_checkpoint()}")
    if stop.signum is not None:
        run.set_status("interrupted", step=trainer.state.global_step, signal=stop.signum)
        raise Interrupted(f"{run.path}: interrupted by signal {stop.signum} at step {trainer.state.global_step}; "
                          f"checkpoint saved: resume with --resume")


def save(trainer, cfg: Config, run: RunFolder) -> None:
    import torch

    # The adapter first: what training produced is on disk whatever the final evaluation does.
    # Under FSDP the adapter is in shards: gathered here (every process), written by rank 0.
    state_dict = full_state_dict(trainer)
    run.save_adapter(trainer.accelerator.unwrap_model(trainer.model), state_dict=state_dict)
    _check_saved_adapter(run)
    final_eval, eval_error = None, None
    if trainer.eval_dataset is not None:
        last = [r for r in run.metrics() if "eval_loss" in r]
        if last and last[-1]["step"] == trainer.state.global_step:
            final_eval = last[-1]["eval_loss"]
        else:
            final_eval = trainer.evaluate().get("eval_loss")  # {} when it ran out of memory
            if final_eval is None:
                eval_error = "out of GPU memory in the final evaluation (the adapter is saved)"
    rows = [r for r in run.metrics() if r.get("loss") is not None]
    cuda = torch.cuda.is_available()
    secs = trainer.train_seconds
    summary = {
        "method": cfg.method,
        "status": "completed",
        "steps": trainer.state.global_step,
        "train_runtime_s": round(secs, 3),
        "tokens_trained": trainer.tokens_trained,
        "tokens_per_s": round(trainer.tokens_trained_this_session / secs, 2) if secs else None,
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "peak_reserved_bytes": torch.cuda.max_memory_reserved() if cuda else None,
        "final_train_loss": rows[-1]["loss"] if rows else None,
        "final_eval_loss": final_eval,
        **({"final_eval_error": eval_error} if eval_error else {}),
        "device": env_info()["device"],
    }
    run.write_json("train_summary.json", summary)
    run.set_status("completed", step=trainer.state.global_step)
    log.info("done: %d steps in %.1f s, %.0f trained tokens/s, final loss %s, eval loss %s; adapter: %s",
             summary["steps"], secs, summary["tokens_per_s"] or 0, _num(summary["final_train_loss"]),
             _num(final_eval), run.adapter_dir)
    if cfg.logging.report_to == "wandb":
        try:
            import wandb

            if wandb.run is not None:
                wandb.run.summary.update({k: v for k, v in summary.items() if v is not None})
                wandb.finish()
        except ImportError:
            pass


def _check_saved_adapter(run: RunFolder) -> None:
    """The written adapter holds A and B of every LoRA module (a gather that lost names would save none)."""
    if not run.writer:
        return
    from safetensors import safe_open

    modules = (run.read_json("model_summary.json") or {}).get("n_lora_modules")
    with safe_open(str(run.adapter_dir / "adapter_model.safetensors"), "pt") as f:
        keys = [k for k in f.keys() if ".lora_A." in k or ".lora_B." in k]
    if modules and len(keys) != 2 * modules:
        run.set_status("failed: adapter saved incomplete")
        raise UserError(f"{run.adapter_dir}: saved {len(keys)} LoRA tensors, expected {2 * modules} (A and B of "
                        f"{modules} modules); the checkpoints under {run.checkpoints_dir} are kept")


# ----------------------------------------------------------------------------- pieces

class Interrupted(UserError):
    exit_code = 130


try:
    from transformers import Trainer as _HFTrainer
    from transformers import TrainerCallback as _HFCallback
except ImportError:  # pragma: no cover - transformers is a hard dependency
    _HFTrainer = _HFCallback = object


class _Trainer(_HFTrainer):
    """Trainer that counts trained (unmasked) tokens, the x-axis users compare runs on."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.tokens_trained = 0      # all processes, since the run began (restored on --resume)
        self._tokens_resumed = 0
        self._local_tokens = 0       # this process, this session
        self._step_finite = None     # all micro-batch losses of this optimizer step finite (tensor)

    def evaluate(self, *a, **kw):
        """An evaluation that runs out of GPU memory is skipped with one warning; training goes on.

        One process only: with several, the others would wait for this one's losses forever.
        """
        import torch

        try:
            return super().evaluate(*a, **kw)
        except torch.OutOfMemoryError:
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                raise
            _close_progress_bars(self, ("prediction_bar",))  # the training bar goes on
            torch.cuda.empty_cache()
            log.warning("out of GPU memory evaluating at step %d: evaluation skipped, training goes on "
                        "(evaluation batches are train.per_device_train_batch_size x data.max_length)",
                        self.state.global_step)
            return {}

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        ok = loss.detach().isfinite()  # no sync here; read once per step by _RunCallback.on_step_end
        self._step_finite = ok if self._step_finite is None else self._step_finite & ok
        return loss

    def step_was_finite(self) -> bool:
        """Whether every loss since the last call was finite, agreed by all processes (a collective)."""
        import torch

        ok, self._step_finite = self._step_finite, None
        ok = torch.ones((), dtype=torch.bool, device=self.args.device) if ok is None else ok
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            t = ok.to(torch.int32)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
            ok = t.bool()
        return bool(ok)

    def adapters_finite(self) -> bool:
        """All trainable weights finite, agreed by all processes (a collective: under FSDP each holds a shard)."""
        import torch

        ok = all(bool(p.detach().isfinite().all()) for p in self.model.parameters() if p.requires_grad)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            t = torch.tensor(int(ok), dtype=torch.int32, device=self.args.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
            ok = bool(t)
        return ok

    @property
    def tokens_trained_this_session(self) -> int:
        return self.tokens_trained - self._tokens_resumed

    def resume_tokens(self, n: int) -> None:
        self.tokens_trained = self._tokens_resumed = n

    def sync_tokens(self) -> int:
        """Sum the per-process counts (a collective: every rank calls it at the same step)."""
        import torch

        n = self._local_tokens
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            t = torch.tensor([n], dtype=torch.long, device=self.args.device)
            torch.distributed.all_reduce(t)
            n = int(t.item())
        self.tokens_trained = self._tokens_resumed + n
        return self.tokens_trained

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.get("labels")
        if labels is not None and model.training:
            self._local_tokens += int((labels[..., 1:] != -100).sum())
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)


class _RunCallback(_HFCallback):
    """Writes metrics.jsonl, stops on a non-finite loss, marks checkpoints complete, honours SIGTERM."""

    def __init__(self, trainer, run: RunFolder):
        self.trainer = trainer
        self.run = run
        self.failure = None
        self.failure_step = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "train_runtime" in logs:
            return
        self.trainer.sync_tokens()
        row = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), "tokens": self.trainer.tokens_trained}
        if "eval_loss" in logs:
            row["eval_loss"] = logs["eval_loss"]
        else:
            for k in ("loss", "learning_rate", "grad_norm"):
                if k in logs:
                    row[k] = float(logs[k])
        # Logged losses are gathered over the processes, so every process sees the same value and
        # stops together (a stop on rank 0 alone would leave the others waiting in a collective).
        loss = row.get("loss", row.get("eval_loss"))
        if loss is not None and not math.isfinite(loss):
            self._fail(state, control, "non-finite loss", f"loss {loss}")
        if state.is_world_process_zero:
            self.run.append_metric(row)

    def _fail(self, state, control, what: str, detail: str = "") -> None:
        """Stop training: `what` failed (recorded in status.json); no checkpoint of this step."""
        if self.failure is None:
            self.failure = what
            self.failure_step = state.global_step
            log.error("%s%s at step %d: stopping; the last checkpoint is kept", what,
                      f" ({detail})" if detail else "", state.global_step)
        control.should_save = False
        control.should_evaluate = False
        control.should_training_stop = True

    def on_step_end(self, args, state, control, **kwargs):
        # Checked every step, not only when logged: a checkpoint saved between a NaN and the next
        # log would hold NaN weights and be the one --resume picks.
        if not self.trainer.step_was_finite():
            control.should_log = True  # the row of this step shows the NaN
            self._fail(state, control, "non-finite loss")
        elif control.should_save and not self.trainer.adapters_finite():  # e.g. an inf gradient
            self._fail(state, control, "non-finite adapter weights")
        stop = getattr(self.trainer, "graceful_stop", None)
        if stop is not None and stop.signum is not None and self.failure is None:
            control.should_save = True
            control.should_training_stop = True

    def on_train_begin(self, args, state, control, **kwargs):
        # Under FSDP the Trainer's resume left the adapter at its initial values (2 H200s: the loss went
        # back to the untrained 11.1 after --resume); the checkpoint's adapter is loaded into the shards.
        path = getattr(self.trainer, "fsdp_resume_adapter", None)
        if path is not None:
            from .distributed import load_adapter_into_shards

            n = load_adapter_into_shards(self.trainer.model_wrapped, path)
            log.info("FSDP resume: %d adapter tensors loaded from %s", n, path)

    def on_save(self, args, state, control, **kwargs):
        self.trainer.sync_tokens()
        # Under FSDP the Trainer's checkpoint adapter comes out empty (distributed.write_adapter says why):
        # gathered (every process) and written again, before the checkpoint is marked complete.
        full = full_state_dict(self.trainer)
        if not state.is_world_process_zero:
            return
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if ckpt.is_dir():
            if full is not None:
                from .distributed import write_adapter

                write_adapter(self.trainer.accelerator.unwrap_model(self.trainer.model), full, ckpt)
            atomic_write_json(ckpt / STATE_FILE, {"step": state.global_step, "tokens": self.trainer.tokens_trained})


def _num(x) -> str:
    """A loss for the console: 4 significant digits (full precision is in the run folder's JSON)."""
    return "-" if x is None else f"{x:.4g}"


def _quiet_console_logs(trainer) -> None:
    """Show loss and learning rate on the progress bar instead of printing every log dict.

    Every logged value is in metrics.jsonl (and wandb); the console keeps one bar and our summary lines.
    Without a bar (the output is not a terminal) a plain line every tenth of the run says how it goes.
    """
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class _BarCallback(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            bar = getattr(self, "training_bar", None)
            if state.is_world_process_zero and bar is not None and logs:
                shown = {k: f"{logs[k]:.4g}" for k in ("loss", "eval_loss", "learning_rate") if k in logs}
                if shown:
                    bar.set_postfix(shown, refresh=False)

    class _LineCallback(_HFCallback):
        def __init__(self):
            self.next_step = 0

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if not state.is_world_process_zero:
                return
            if "eval_loss" in logs:
                log.info("step %d/%d: eval loss %s", state.global_step, state.max_steps, _num(logs["eval_loss"]))
            elif "loss" in logs and state.global_step >= self.next_step:
                log.info("step %d/%d: loss %s", state.global_step, state.max_steps, _num(logs["loss"]))
                self.next_step = state.global_step + max(1, state.max_steps // 10)

    trainer.remove_callback(PrinterCallback)
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(_BarCallback())
    else:
        trainer.add_callback(_LineCallback())


class _GracefulStop:
    """SIGTERM / SIGINT: finish the current step, save a checkpoint, stop."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def _handle(self, signum, frame):
        if self.signum is not None:  # second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("signal %d: saving a checkpoint after this step, then stopping", signum)

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False


def _snapshot(path: Path) -> dict | None:
    """Bytes of the run folder's top-level files (small: configs, JSON, the log); None if no folder."""
    if not path.is_dir():
        return None
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in path.iterdir()
            if p.is_file() and p.name != "metrics.jsonl"}


class _Attempt:
    """A run that fails records why in status.json; but bad input refused before training starts
    (a missing data file on --resume, ...) leaves an existing run folder exactly as it found it."""

    def __init__(self, run: RunFolder):
        self.run = run

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        run, before = self.run, self.run.before
        if exc is None or not is_main_process():
            return False
        if before is None or getattr(run, "started", False) or not isinstance(exc, UserError):
            if run.status() == "running":  # else train() already said how it ended
                why = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"failed: {type(exc).__name__}"
                run.set_status(why, error=str(exc).splitlines()[0] if str(exc) else None)
            return False
        for p in run.path.iterdir():
            if p.is_file() and p.name != "metrics.jsonl" and p.name not in before:
                p.unlink()
        for name, (data, mtime) in before.items():
            p = run.path / name
            if not p.is_file() or p.read_bytes() != data:
                p.write_bytes(data)
                os.utime(p, ns=(mtime, mtime))
        return False


def _record_failure(trainer, run: RunFolder, e: Exception) -> None:
    import torch

    _close_progress_bars(trainer)  # else the one-line error is glued to the half-drawn bar
    if isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower():
        run.set_status("failed: out of memory", step=trainer.state.global_step)
        raise UserError(
            f"out of GPU memory at step {trainer.state.global_step}: lower train.per_device_train_batch_size "
            f"(raise gradient_accumulation_steps to keep the global batch), lower data.max_length, set "
            f"train.gradient_checkpointing=true, or raise train.memory_budget_gib if the GPU has more") from None
    if type(e).__name__ == "UnpicklingError":  # torch.load(weights_only=True) met more than tensors
        run.set_status("failed: unsafe checkpoint", step=trainer.state.global_step)
        raise UserError(f"{run.last_checkpoint()}: a checkpoint file holds objects other than tensors; "
                        f"refused (not unpickled): {str(e).strip().splitlines()[0]}") from None
    if isinstance(e, OSError) and e.errno is not None:  # disk full, read-only, quota: not a bug
        try:
            run.set_status(f"failed: {e.strerror}", step=trainer.state.global_step)
        except OSError:  # the disk that just failed may refuse this too
            pass
        raise UserError(f"{e.filename or run.path}: could not write at step {trainer.state.global_step}: "
                        f"{e.strerror}; last complete checkpoint: {run.last_checkpoint()}") from None
    run.set_status(f"failed: {type(e).__name__}", step=trainer.state.global_step)


def _close_progress_bars(trainer, names=("training_bar", "prediction_bar")) -> None:
    for cb in trainer.callback_handler.callbacks:
        for name in names:
            bar = getattr(cb, name, None)
            if bar is not None:
                bar.close()
                setattr(cb, name, None)


def _reset_peak_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _setup_wandb(cfg: Config, run: RunFolder) -> list[str]:
    """wandb when asked; offline (and said so) without an API key. Keys stay in the environment."""
    if cfg.logging.report_to != "wandb":
        return []
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        log.warning("wandb is not installed: logging to metrics.jsonl only")
        return []
    if not os.environ.get("WANDB_API_KEY") and os.environ.get("WANDB_MODE") not in ("offline", "disabled"):
        if not _wandb_logged_in():
            os.environ["WANDB_MODE"] = "offline"
            log.warning("no WANDB_API_KEY: wandb runs offline in %s/wandb (upload later with `wandb sync`)",
                        run.path)
    os.environ["WANDB_PROJECT"] = cfg.logging.project
    if cfg.logging.entity:
        os.environ["WANDB_ENTITY"] = cfg.logging.entity
    os.environ["WANDB_DIR"] = str(run.path)
    os.environ.setdefault("WANDB_LOG_MODEL", "false")
    return ["wandb"]


def _wandb_logged_in() -> bool:
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


class _log_to:
    """Log to the console and to run/train.log for the duration of a run; library warnings
    (transformers, peft, bitsandbytes, datasets, Python warnings) to train.log only."""

    def __init__(self, run: RunFolder):
        self.run = run

    def __enter__(self):
        root = logging.getLogger("qlora_lab")
        root.setLevel(logging.INFO)
        fmt = logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s")
        self.file = None
        if is_main_process():
            self.file = logging.FileHandler(self.run.path / "train.log", encoding="utf-8")
            self.file.setFormatter(fmt)
            root.addHandler(self.file)
        self.console = None
        if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
                   for h in root.handlers):
            self.console = logging.StreamHandler(sys.stderr)
            self.console.setFormatter(logging.Formatter("qlora-lab: %(message)s"))
            root.addHandler(self.console)
        self.libraries = contextlib.ExitStack()
        self.libraries.enter_context(console.log_file(self.file))  # None (rank > 0): rank 0 logs the same
        return self

    def __exit__(self, *exc):
        self.libraries.__exit__(*exc)
        root = logging.getLogger("qlora_lab")
        for h in (self.file, self.console):
            if h is not None:
                root.removeHandler(h)
                h.close()
        return False
