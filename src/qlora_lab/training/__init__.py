"""Training: the recipe (setup / train / save), the Trainer subclass, its callbacks, and the guards of a run.

    recipe.py     Recipe and main(); the steps bench/worker.py shares (prepare_run_folder, load_plan, load_model,
                  build_trainer)
    trainer.py    the Trainer subclass: trained tokens, finite checks, an evaluation that survives OOM
    callbacks.py  the run callback (metrics.jsonl, stops, checkpoints) and the console's progress
    guards.py     graceful stop, undoing bad input, recording failures, checking the saved adapter
    logs.py       train.log and wandb
"""
from .guards import Interrupted, check_saved_adapter
from .recipe import (PACKING_SAFE, Recipe, build_trainer, load_data, load_model, load_plan, main, open_run_folder,
                     prepare_run_folder)
from .trainer import Trainer

__all__ = ["Interrupted", "PACKING_SAFE", "Recipe", "Trainer", "build_trainer", "check_saved_adapter", "load_data",
           "load_model", "load_plan", "main", "open_run_folder", "prepare_run_folder"]
