"""`qlora-lab demo` end to end, as a user runs it after `pip install -e .`: CPU, no network."""
from __future__ import annotations

import json
import time

import pytest

from qlora_lab import demo

from .conftest import background, run_cli


@background
def demo_run(tmp, env):
    """(output folder, CompletedProcess, seconds) of `qlora-lab demo` in a child process, in the background
    lane (conftest.py)."""
    out = tmp / "demo"
    t0 = time.perf_counter()
    r = run_cli("demo", "-o", out, "--no-progress", timeout=600, base_env=env)
    return out, r, time.perf_counter() - t0


@pytest.mark.slow
def test_demo_learns_and_writes_everything(demo_run):
    out, r, seconds = demo_run
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert seconds < 300, f"demo took {seconds:.0f} s (budget: 5 minutes on 2 CPU cores)"
    for name in ("loss.png", "loss.svg", "table.md", "table.html", "summary.json", "generations.jsonl"):
        assert (out / name).is_file() and str(out / name) in r.stdout
    for m in ("qlora", "lora"):
        run = out / "runs" / f"tiny_llama_{m}"
        assert (run / "adapter" / "adapter_model.safetensors").is_file() and str(run) in r.stdout
        assert json.loads((run / "train_summary.json").read_text())["status"] == "completed"
    info = json.loads((out / demo.MARKER).read_text())
    assert info["exact_match"]["base"] == 0.0
    assert info["exact_match"]["qlora"] >= 0.8 and info["exact_match"]["lora"] >= 0.8
    assert "base: 0/24 (0%)" in r.stdout and "qlora: " in r.stdout
    # the figures printed are the figures in the generations
    rows = [json.loads(l) for l in (out / "generations.jsonl").read_text().splitlines()]
    answers = dict(demo.demo_pairs())
    lora = [x for x in rows if x["model"] == "tiny_llama_lora"]
    assert sum(x["answer"] == answers[x["prompt"]] for x in lora) == info["exact_counts"]["lora"]
    md = (out / "table.md").read_text()
    assert "| level | prompt | expected | base | tiny_llama_qlora | tiny_llama_lora |" in md
    assert "| Fact | What is the capital of France? | The capital of France is Paris. |" in md
    assert "| Concept | What is reinforcement learning? |" in md and "| demo |" not in md
    assert "The base model (tiny-llama) has random weights" in md
    assert "LoRA (float32 base)" in (out / "loss.svg").read_text()  # the dtype computed in on a CPU
    assert (out / "runs" / "tiny_llama_qlora" / "train.log").is_file()
    # running it again replaces its own folder (the step a second `qlora-lab demo -o` takes first)
    assert demo.prepare_out_dir(out) == out and [p.name for p in out.iterdir()] == [demo.MARKER]
    assert "runs" not in json.loads((out / demo.MARKER).read_text())
