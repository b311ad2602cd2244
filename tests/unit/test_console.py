"""The console shows our lines (and progress bars on a terminal); library warnings go to the run's train.log."""
from __future__ import annotations

import io
import logging
import re
import warnings

from qlora_lab import console

from .conftest import CONFIGS, run_cli


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


def test_train_console_is_our_lines_only_and_library_warnings_are_in_train_log(tmp_path):
    """A real tiny run, stderr a pipe (not a terminal): no library warnings, no tqdm redraw codes, a plain
    line per tenth of the run, rounded losses; the warnings are in train.log. lm_head among the targets
    makes peft warn about save_embedding_layers; transformers warns about gradient_checkpointing."""
    run = tmp_path / "run"
    r = run_cli("train", CONFIGS / "tiny_llama_qlora.yaml", "--output-dir", run, "--set", "train.max_steps=3",
                "--set", "data.eval_size=0", "--set", "lora.target_modules=[q_proj,v_proj,lm_head]")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "\r" not in r.stderr and "\x1b" not in r.stderr, r.stderr[-2000:]
    lines = r.stderr.splitlines()
    assert lines and all(line.startswith("qlora-lab: ") for line in lines), r.stderr[-3000:]
    assert [line for line in lines if re.match(r"qlora-lab: step \d/3: loss \d", line)]
    done = next(line for line in lines if line.startswith("qlora-lab: done:"))
    m = re.search(r"final loss (\S+), eval loss (\S+);", done)
    assert m and m.group(2) == "-", done
    assert len(re.sub(r"\D", "", m.group(1)).lstrip("0")) <= 4, done  # 4 significant digits, not 17
    log = (run / "train.log").read_text()
    assert "py.warnings WARNING" in log and "save_embedding_layers" in log, log[-3000:]
    assert "model: LlamaForCausalLM, nf4 base computing in float32" in log  # the plan's dtype, not '16-bit'
