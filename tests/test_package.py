"""`import qlora_lab` is light: no torch, bitsandbytes or wandb until a verb needs them."""
from __future__ import annotations

import subprocess
import sys

from .conftest import run_cli


def test_import_loads_no_gpu_or_logging_stack():
    code = ("import sys, qlora_lab; heavy = [m for m in ('torch', 'bitsandbytes', 'wandb', 'transformers', 'peft') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_every_verb_has_help():
    for verb in ("train", "make-model", "config", "data", "generate", "compare", "plot", "bench", "demo"):
        r = run_cli(verb, "--help")
        assert r.returncode == 0 and "usage: qlora-lab " + verb in r.stdout, (verb, r.stderr)
    for sub in ("oasst1", "lima", "stats", "synth"):
        r = run_cli("data", sub, "--help")
        assert r.returncode == 0 and f"usage: qlora-lab data {sub}" in r.stdout, (sub, r.stderr)
