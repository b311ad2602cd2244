"""The recipe: seed -> run folder -> plan -> data -> model -> trainer -> train -> save.

    qlora-lab train configs/llama2_7b_lima_qlora.yaml [--set train.max_steps=20] [--resume]
    qlora_lab.training.main(cfg)            # from a notebook

Everything lands in the run folder (see runs.py); wandb mirrors the metrics when enabled. The steps below
the Recipe are module functions so that bench/worker.py builds its trainer the same way.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from .. import console
from ..config import Config, to_yaml
from ..distributed import full_state_dict
from ..errors import ConfigError, UserError, is_out_of_memory
from ..runs import ResumePoint, RunFolder, atomic_write_json, env_info
from .callbacks import RunCallback, num, quiet_console_logs
from .guards import GracefulStop, Interrupted, check_saved_adapter, record_failure, settle_failed_run, snapshot
from .logs import finish_wandb, log_to, setup_wandb
from .trainer import Trainer

log = logging.getLogger("qlora_lab.train")  # the name train.log lines carry

# Architectures whose attention builds its mask from position_ids, so padding-free packing keeps
# examples apart (checked by tests/unit/data/test_packing.py). Falcon's attention does not.
PACKING_SAFE = {"llama"}


def main(cfg: Config, output_dir=None, resume: bool = False) -> Path:
    with Recipe(cfg, output_dir, resume) as recipe:  # a failure: status.json says why, or bad input is undone
        recipe.setup()
        recipe.train()
        recipe.save()
    return recipe.run.path


class Recipe:
    """One training run. Its state is here: the run folder, what to restore on bad input, whether
    training started, the resume point, the trainer and its run callback, the stop flag, the timings."""

    def __init__(self, cfg: Config, output_dir=None, resume: bool = False):
        self.cfg, self.output_dir, self.resume = cfg, output_dir, resume
        self.run: RunFolder | None = None
        self.before: dict | None = None            # the run folder's top-level files before this run
        self.resume_point: ResumePoint | None = None
        self.started = False                       # training began: a failure no longer undoes the folder
        self.stop = GracefulStop()
        self.trainer: Trainer | None = None
        self.callback: RunCallback | None = None
        self.train_seconds: float | None = None
        self.train_result = None
        self._logs: log_to | None = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.cleanup(exc)
        return False

    def setup(self) -> None:
        from transformers import set_seed

        from ..data import check_data_files
        from ..plan import check_machine

        cfg = self.cfg
        check_data_files(cfg)  # before the run folder: a missing or empty data file leaves nothing behind
        check_machine(cfg)  # likewise a 4-bit config this machine cannot run
        run, self.resume_point = open_run_folder(cfg, self.output_dir, self.resume)
        self.before = snapshot(run.path)  # what bad input must leave as it was (see guards.settle_failed_run)
        start_run_folder(cfg, run)
        self.run = run
        self._logs = log_to(run).__enter__()
        if self.resume_point:
            for _, why in self.resume_point.skipped:
                log.warning("checkpoint passed over: %s", why)
            log.info("resuming from %s (step %d)", self.resume_point.checkpoint, self.resume_point.step)
        set_seed(cfg.train.seed)
        tokenizer, _, plan = load_plan(cfg, run)
        train_ds, eval_ds, _ = load_data(cfg, tokenizer, run)
        model = load_model(cfg, plan, run)
        resume_adapter = self.resume_point.checkpoint / "adapter_model.safetensors" if self.resume_point else None
        self.callback = RunCallback(run, stop=self.stop, resume_adapter=resume_adapter)
        self.trainer = build_trainer(cfg, plan, model, tokenizer, train_ds, eval_ds, run, callback=self.callback)

    def train(self) -> None:
        run, trainer, point = self.run, self.trainer, self.resume_point
        self.started = True
        if point:
            if run.writer:
                for d, _ in point.skipped:  # set aside, so that no later save writes into a damaged folder
                    log.info("%s set aside as %s", d, run.set_aside(d).name)
            run.truncate_metrics(point.step)
            trainer.resume_tokens(point.tokens)
        t0 = time.perf_counter()
        _reset_peak_memory()
        try:
            with self.stop:
                self.train_result = trainer.train(resume_from_checkpoint=str(point.checkpoint) if point else None)
        except Exception as e:
            record_failure(trainer, run, e)
            raise
        self.train_seconds = time.perf_counter() - t0
        trainer.sync_tokens()
        cb = self.callback
        if cb.failure:
            run.set_status(f"failed: {cb.failure}", step=cb.failure_step)
            raise UserError(f"{run.path}: training stopped at step {cb.failure_step}: {cb.failure}; "
                            f"last good checkpoint: {run.last_checkpoint()}")
        if self.stop.signum is not None:
            run.set_status("interrupted", step=trainer.state.global_step, signal=self.stop.signum)
            raise Interrupted(f"{run.path}: interrupted by signal {self.stop.signum} at step "
                              f"{trainer.state.global_step}; checkpoint saved: resume with --resume")

    def save(self) -> None:
        import torch

        cfg, run, trainer = self.cfg, self.run, self.trainer
        # The adapter first: what training produced is on disk whatever the final evaluation does.
        # Under FSDP the adapter is in shards: gathered here (every process), written by rank 0.
        state_dict = full_state_dict(trainer)
        run.save_adapter(trainer.accelerator.unwrap_model(trainer.model), state_dict=state_dict)
        check_saved_adapter(run)
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
        secs = self.train_seconds
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
                 summary["steps"], secs, summary["tokens_per_s"] or 0, num(summary["final_train_loss"]),
                 num(final_eval), run.adapter_dir)
        finish_wandb(cfg, summary)

    def cleanup(self, exc: BaseException | None = None) -> None:
        """After success or failure: a failure recorded (or bad input undone), train.log closed."""
        if self._logs is not None:
            self._logs.__exit__(type(exc) if exc else None, exc, exc.__traceback__ if exc else None)
            self._logs = None
        if exc is not None and self.run is not None:
            settle_failed_run(self.run, self.before, self.started, exc)


# ----------------------------------------------------------------------------- steps

def open_run_folder(cfg: Config, output_dir, resume: bool) -> tuple[RunFolder, ResumePoint | None]:
    """The run folder, checked, and on --resume its newest whole checkpoint; nothing written yet."""
    name = cfg.train.run_name or (Path(cfg.source).stem if cfg.source and cfg.source.endswith(".yaml") else "run")
    path = Path(output_dir) if output_dir else Path(cfg.train.output_dir) / name
    run = RunFolder(path)
    run.check_layout()
    point = None
    if resume:
        if not run.config_file.is_file():
            raise UserError(f"{path}: --resume needs an existing run folder (no config.yaml here)")
        point = run.resume_point()  # the newest whole checkpoint; never unpickles
    elif run.metrics_file.exists() or run.checkpoints():
        raise UserError(f"{path}: already holds a run; pass --resume to continue it or choose --output-dir")
    return run, point


def start_run_folder(cfg: Config, run: RunFolder) -> None:
    if run.writer:  # data-parallel runs write one run folder, from rank 0
        from ..fileio import atomic_write

        run.path.mkdir(parents=True, exist_ok=True)
        atomic_write(run.config_file, to_yaml(cfg))
        atomic_write_json(run.path / "env.json", env_info())
        run.set_status("running")


def prepare_run_folder(cfg: Config, output_dir, resume: bool) -> RunFolder:
    """open_run_folder + start_run_folder, for a caller that needs no resume point (bench/worker.py)."""
    run, _ = open_run_folder(cfg, output_dir, resume)
    start_run_folder(cfg, run)
    return run
def load_plan(cfg: Config, run: RunFolder):
    from ..plan import apply_memory_budget, plan
    from ..model import load_hf_config, load_tokenizer, model_path

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
    from ..data import load_datasets

    train_ds, eval_ds, stats = load_datasets(cfg, tokenizer)
    if len(train_ds) == 0:
        raise UserError(f"data.train_file: no trainable example in {cfg.data.train_file}")
    run.write_json("data_stats.json", stats)
    return train_ds, eval_ds, stats


def load_model(cfg: Config, plan, run: RunFolder):
    from .. import kernels
    from ..kernels import levers
    from ..model import add_lora
    from ..model import load_model as load_base

    try:
        model, _, summary = load_base(cfg, for_training=True, plan=plan)
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        run.set_status("failed: out of memory", step=0)
        raise UserError(
            "out of GPU memory while loading the base model: use quant.bits=4 (a 7B base takes ~3.6 GiB in NF4 "
            "instead of ~13 GiB in 16 bits), a GPU with more memory, or raise train.memory_budget_gib if it is "
            "set below the card's memory") from None
    fused = kernels.apply(model) if plan.kernels == "liger" else []
    # All, none, or the first plan.recompute_layers decoder layers recompute their activations.
    model, lora = add_lora(model, cfg, plan.recompute_layers, plan.offload_checkpoints)
    summary.update(lora, kernels=fused, **levers.switch(model, plan, cfg.train),
                   gradient_checkpointing=plan.recompute_layers > 0, offload_checkpoints=plan.offload_checkpoints)
    run.write_json("model_summary.json", summary)
    q, dtype = summary["quantization"], summary["compute_dtype"]  # the dtype of the plan, not a guess
    log.info("model: %s, %s, %d/%d linear layers 4-bit, %d LoRA modules, %.2f M trainable params, "
             "base weights %.2f GiB", summary["architecture"],
             f"{q} base computing in {dtype}" if q else f"{dtype} base", summary["n_linear_4bit"],
             summary["n_linear_total"], summary["n_lora_modules"], summary["trainable_params"] / 1e6,
             summary["weights_bytes"] / 2**30)
    return model


def build_trainer(cfg: Config, plan, model, tokenizer, train_ds, eval_ds, run: RunFolder,
                  callback: RunCallback | None = None) -> Trainer:
    """The Trainer of this plan, with `callback` (a fresh RunCallback if none) writing the run folder."""
    from transformers import TrainingArguments

    from ..data.packing import Collator

    t = cfg.train
    report_to = setup_wandb(cfg, run)
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
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds if has_eval else None,
                      data_collator=collator, processing_class=tokenizer, optimizer_sync=t.optimizer_sync,
                      optimizer_direct=t.optimizer_direct,
                      optimizer_fused=t.optimizer_fused)
    callback = callback or RunCallback(run)
    callback.trainer = trainer
    trainer.add_callback(callback)
    quiet_console_logs(trainer)
    return trainer


def _reset_peak_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
