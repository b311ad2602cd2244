"""Callbacks: the run callback (metrics.jsonl, stops, checkpoint marking) and what the console shows."""
from __future__ import annotations

import logging
import math
from pathlib import Path

from ..distributed import full_state_dict
from ..runs import STATE_FILE, RunFolder, atomic_write_json

log = logging.getLogger("qlora_lab.train")  # the name train.log lines carry

try:
    from transformers import TrainerCallback as _HFCallback
except ImportError:  # pragma: no cover - transformers is a hard dependency
    _HFCallback = object


class RunCallback(_HFCallback):
    """Writes metrics.jsonl, stops on a non-finite loss, marks checkpoints complete, honours SIGTERM.

    `stop` is the run's GracefulStop (its signum set by a signal); `resume_adapter` is the checkpoint's
    adapter file on --resume, loaded into the shards when training under FSDP.
    """

    def __init__(self, run: RunFolder, stop=None, resume_adapter: Path | None = None):
        self.run = run
        self.stop = stop
        self.resume_adapter = resume_adapter
        self.trainer = None  # the Trainer this callback is added to (build_trainer)
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
        if self.stop is not None and self.stop.signum is not None and self.failure is None:
            control.should_save = True
            control.should_training_stop = True

    def on_train_begin(self, args, state, control, **kwargs):
        # Under FSDP the Trainer's resume left the adapter at its initial values (2 H200s: the loss went
        # back to the untrained 11.1 after --resume); the checkpoint's adapter is loaded into the shards.
        if self.resume_adapter is not None and getattr(self.trainer, "is_fsdp_enabled", False):
            from ..distributed import load_adapter_into_shards

            n = load_adapter_into_shards(self.trainer.model_wrapped, self.resume_adapter)
            log.info("FSDP resume: %d adapter tensors loaded from %s", n, self.resume_adapter)

    def on_save(self, args, state, control, **kwargs):
        self.trainer.sync_tokens()
        # Under FSDP the Trainer's checkpoint adapter comes out empty (distributed.write_adapter says why):
        # gathered (every process) and written again, before the checkpoint is marked complete.
        full = full_state_dict(self.trainer)
        if not state.is_world_process_zero:
            return
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if ckpt.is_dir():
            self.run.sync_metrics()  # the rows this checkpoint's resume expects (RunFolder.check_checkpoint)
            if full is not None:
                from ..distributed import write_adapter

                write_adapter(self.trainer.accelerator.unwrap_model(self.trainer.model), full, ckpt)
            atomic_write_json(ckpt / STATE_FILE, {"step": state.global_step, "tokens": self.trainer.tokens_trained})


# ----------------------------------------------------------------------------- the console

def num(x) -> str:
    """A loss for the console: 4 significant digits (full precision is in the run folder's JSON)."""
    return "-" if x is None else f"{x:.4g}"


def quiet_console_logs(trainer) -> None:
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
                log.info("step %d/%d: eval loss %s", state.global_step, state.max_steps, num(logs["eval_loss"]))
            elif "loss" in logs and state.global_step >= self.next_step:
                log.info("step %d/%d: loss %s", state.global_step, state.max_steps, num(logs["loss"]))
                self.next_step = state.global_step + max(1, state.max_steps // 10)

    trainer.remove_callback(PrinterCallback)
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(_BarCallback())
    else:
        trainer.add_callback(_LineCallback())


def close_progress_bars(trainer, names=("training_bar", "prediction_bar")) -> None:
    for cb in trainer.callback_handler.callbacks:
        for name in names:
            bar = getattr(cb, name, None)
            if bar is not None:
                bar.close()
                setattr(cb, name, None)
