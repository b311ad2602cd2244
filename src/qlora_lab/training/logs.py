"""Where a run's messages go: the console and train.log, and wandb when the config asks for it."""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path

from .. import console
from ..config import Config
from ..distributed import is_main_process
from ..runs import RunFolder

log = logging.getLogger("qlora_lab.train")  # the name train.log lines carry


class log_to:
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


def setup_wandb(cfg: Config, run: RunFolder) -> list[str]:
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


def finish_wandb(cfg: Config, summary: dict) -> None:
    """The run's summary onto the wandb run, which then ends."""
    if cfg.logging.report_to == "wandb":
        try:
            import wandb

            if wandb.run is not None:
                wandb.run.summary.update({k: v for k, v in summary.items() if v is not None})
                wandb.finish()
        except ImportError:
            pass


def _wandb_logged_in() -> bool:
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False
