"""The console shows our lines (and progress bars on a terminal); library warnings go to the run's train.log.
A real run's console: tests/integration/test_cli_runs.py."""
from __future__ import annotations

import io
import logging
import re
import warnings

from qlora_lab import console


class _Stream(io.StringIO):
    def __init__(self, tty):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


def test_progress_bars_only_where_they_redraw():
    assert console.progress_bars(_Stream(True))
    assert not console.progress_bars(_Stream(False))  # a pipe or a file: tqdm's cursor codes would be fragments


def test_library_records_and_warnings_go_to_the_log_file_not_the_console(tmp_path, capsys):
    """Records from before a file is open (warnings at import time, as bitsandbytes' CPU kernel notice)
    are held and written to the first file; the loggers and warnings.showwarning are restored after."""
    tf = logging.getLogger("transformers")
    before = (tf.handlers[:], tf.propagate, warnings.showwarning)
    log_path = tmp_path / "run" / "train.log"
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        with console.library_output():
            logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
                "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'")
            with console.log_file(log_path):
                warnings.warn("`gradient_checkpointing` is deprecated", FutureWarning)
                warnings.warn("Setting `save_embedding_layers` to `True`", UserWarning)
                logging.getLogger("transformers.trainer").warning("a transformers warning")
                logging.getLogger("datasets.builder").warning("a datasets warning")
    assert capsys.readouterr().err == ""
    text = log_path.read_text()
    for needle in ("gemm_4bit_forward", "FutureWarning: `gradient_checkpointing`", "save_embedding_layers",
                   "a transformers warning", "a datasets warning"):
        assert needle in text, needle
    assert text.index("gemm_4bit_forward") < text.index("gradient_checkpointing")  # held, then written first
    assert (tf.handlers, tf.propagate, warnings.showwarning) == before


def test_no_log_file_without_a_record(tmp_path):
    with console.log_file(tmp_path / "out" / "compare.log"):
        pass
    assert not (tmp_path / "out").exists()
