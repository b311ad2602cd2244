"""Tables from run folders and generations. Run folders here are written by hand in the
contract's format (config.yaml, metrics.jsonl, model_summary.json, train_summary.json, env.json)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from qlora_lab import report
from qlora_lab.cli import main
from qlora_lab.config import load_config
from qlora_lab.errors import UserError

from .conftest import CONFIGS, run_cli


def make_run(root: Path, name: str, method: str = "qlora", steps: int = 20, seed: int = 0) -> Path:
    """A finished run folder in the documented layout (no adapter weights)."""
    import random

    cfg = load_config(CONFIGS / ("tiny_llama_qlora.yaml" if method == "qlora" else "tiny_llama_lora.yaml"))
    d = root / name
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    rng = random.Random(seed)
    rows, loss = [], 5.0
    for s in range(1, steps + 1):
        loss = loss * 0.9 + rng.uniform(-0.1, 0.1)
        rows.append({"step": s, "loss": loss, "learning_rate": 3e-3, "tokens": 400 * s, "epoch": s / 5})
        if s % 5 == 0:
            rows.append({"step": s, "eval_loss": loss + 0.2, "tokens": 400 * s, "epoch": s / 5})
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "model_summary.json").write_text(json.dumps({
        "architecture": "LlamaForCausalLM", "quantization": "nf4" if method == "qlora" else None,
        "double_quant": method == "qlora", "compute_dtype": "float32", "n_linear_4bit": 14 if method == "qlora" else 0,
        "n_linear_total": 15, "n_lora_modules": 14, "trainable_params": 1_234_567, "total_params": 10_000_000,
        "weights_bytes": 1000}))
    (d / "train_summary.json").write_text(json.dumps({
        "method": method, "train_runtime_s": 75.5, "peak_memory_bytes": 3 * 1024**3 if method == "qlora" else None,
        "final_train_loss": loss, "final_eval_loss": loss + 0.2, "tokens_per_s": 1000.0, "status": "completed"}))
    (d / "env.json").write_text(json.dumps({"gpu_name": "NVIDIA H100 80GB HBM3"}))
    (d / "adapter").mkdir()
    return d


def gen_rows(models=("base", "a", "b"), prompts=None, answer=lambda m, p: f"{m} says {p}"):
    from qlora_lab.prompts import load_prompts

    ps = load_prompts(prompts or "oasst1_levels")
    return [{"model": m, "adapter": None if m == "base" else f"runs/{m}/adapter", "prompt_id": p.id,
             "level": p.level, "prompt": p.prompt, "answer": answer(m, p.prompt)}
            for m in models for p in reversed(ps.prompts)]


def test_read_run_and_summary_table(tmp_path):
    a, b = make_run(tmp_path, "q", "qlora"), make_run(tmp_path, "l", "lora", seed=1)
    df = report.summary_table([a, b])
    assert list(df.index) == ["q", "l"]
    assert df.loc["q", "method"] == "QLoRA" and df.loc["l", "method"] == "LoRA"
    assert df.loc["q", "trainable params"] == "1,234,567"
    assert df.loc["l", "quantization"] == "none (float32)"  # the dtype it computed in, not '16-bit'
    assert df.loc["q", "peak memory"] == "3.00 GiB" and df.loc["l", "peak memory"] == "n/a (CPU)"
    assert df.loc["q", "train time"] == "75.5 s"
    assert df.loc["q", "device"] == "NVIDIA H100 80GB HBM3"
    raw = report.summary_table([a, b], formatted=False)
    assert raw.loc["q", "method"] == "qlora"
    ts = json.loads((a / "train_summary.json").read_text())
    assert math.isclose(raw.loc["q", "final train loss"], ts["final_train_loss"])
    assert raw.loc["q", "trainable %"] == pytest.approx(12.34567)


def test_bad_run_folders_are_user_errors(tmp_path):
    with pytest.raises(UserError, match=f"{tmp_path / 'nope'}: run folder not found"):
        report.read_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a run folder"):
        report.read_run(tmp_path / "empty")


def test_runs_are_read_as_run_folders_with_the_method_their_config_says(tmp_path):
    from qlora_lab.runs import RunFolder

    a = make_run(tmp_path, "l", "lora")
    (a / "train_summary.json").write_text(json.dumps({"status": "completed"}))  # no method: the config says it
    (run,) = report.read_runs([a])
    assert isinstance(run, RunFolder) and run.method == "lora" and run.name == "l"
    assert report.summary_table([run]).loc["l", "method"] == "LoRA"
    (a / "env.json").write_text("{")
    with pytest.raises(UserError, match="env.json"):  # named when read, before any table is made
        report.read_run(a)


def test_comparison_table_orders_prompts_by_level_and_models_base_first(tmp_path):
    rows = gen_rows(models=("a", "base", "b"))
    df = report.comparison_table(rows, prompts="oasst1_levels")
    assert list(df.columns) == ["level", "prompt", "base", "a", "b"]
    assert list(df["level"]) == ["Easy"] * 4 + ["Intermediate"] * 3 + ["Advanced"] * 2
    assert df.iloc[0]["prompt"] == "What is the capital of France?"
    assert df.iloc[0]["a"] == "a says What is the capital of France?"
    # without a prompt set: the order in the file
    assert report.comparison_table(rows).iloc[0]["level"] == "Advanced"


def test_markdown_and_html_keep_long_answers_readable():
    long = "word " * 200 + "| <b>pipe & tag</b>\nsecond line"
    rows = gen_rows(models=("base", "a"), answer=lambda m, p: long if m == "a" else "short")
    df = report.comparison_table(rows, "oasst1_levels")
    md = report.to_markdown(df, title="T")
    table_lines = [l for l in md.splitlines() if l.startswith("| ")]
    assert len(table_lines) == 1 + 9  # header + one line per prompt: newlines became <br>
    assert all(l.count(" | ") == 3 for l in table_lines[1:])  # level, prompt, base, a: pipes escaped
    assert "<details><summary>" in md and "\\<b>pipe & tag\\</b>" in md and "\\|" in md and "<br>second line" in md
    assert "&lt;" not in md and "&amp;" not in md  # Markdown escapes, not HTML entities
    html = report.to_html(df, title="T")
    assert html.count("<details>") == 9 and "white-space:pre-wrap" in html
    assert "&lt;b&gt;pipe &amp; tag&lt;/b&gt;" in html and "<b>pipe" not in html
    assert html.startswith("<!doctype html>")


def test_compare_cli_with_saved_generations(tmp_path):
    a, b = make_run(tmp_path, "q", "qlora"), make_run(tmp_path, "l", "lora")
    g = tmp_path / "g.jsonl"
    g.write_text("".join(json.dumps(r) + "\n" for r in gen_rows(models=("base", "q", "l"))))
    r = run_cli("compare", a, b, "--generations", g, "--prompts", "oasst1_levels", "-o", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    md = (tmp_path / "out" / "table.md").read_text()
    assert "| level | prompt | base | q | l |" in md and "### Runs" in md


def test_compare_cli_on_a_missing_run_is_one_line(tmp_path, capsys):
    g = tmp_path / "g.jsonl"
    g.write_text("".join(json.dumps(r) + "\n" for r in gen_rows(models=("base",))))
    assert main(["compare", str(tmp_path / "missing"), "--generations", str(g)]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "missing: run folder not found" in err


def test_generated_control_characters_and_bad_bytes_show_as_escapes():
    """A random model's bytes: a bell, an escape, a NUL and U+FFFD (what an undecodable byte becomes)."""
    raw = "ok\x07 \x1b[31m\x00 \ufffd\ufffd >> <x> a|b\r\nnext"
    rows = gen_rows(models=("base",), answer=lambda m, p: raw)
    df = report.comparison_table(rows, "oasst1_levels")
    md, page = report.to_markdown(df), report.to_html(df)
    for text in (md, page):
        assert "\\x07" in text and "\\x1b[31m" in text and "\\x00" in text and "\\ufffd\\ufffd" in text
        assert not any(c in text for c in "\x07\x1b\x00\ufffd\r")
    assert "ok\\x07 \\x1b[31m\\x00 \\ufffd\\ufffd >> \\<x> a\\|b<br>next" in md  # `>>` stays `>>`
    assert "&gt;&gt; &lt;x&gt; a|b\nnext" in page


def test_expected_answers_become_a_column_after_the_prompt(tmp_path):
    from qlora_lab.prompts import Prompt, PromptSet

    ps = PromptSet(name="t", source="t", levels=("Fact", "Number"), prompts=(
        Prompt(id="n", prompt="How many legs does a spider have?", level="Number", expected="Eight."),
        Prompt(id="f", prompt="Capital of France?", level="Fact", expected="Paris.")))
    rows = [{"model": m, "adapter": None if m == "base" else "a", "prompt_id": p.id, "level": p.level,
             "prompt": p.prompt, "answer": f"{m}: {p.id}"} for m in ("base", "q") for p in ps]
    df = report.comparison_table(rows, ps)
    assert list(df.columns) == ["level", "prompt", "expected", "base", "q"]
    assert list(df["level"]) == ["Fact", "Number"] and list(df["expected"]) == ["Paris.", "Eight."]
    md = report.to_markdown(df)
    assert "| level | prompt | expected | base | q |" in md
    assert "| Fact | Capital of France? | Paris. | base: f | q: f |" in md
    assert "<th>level</th><th>prompt</th><th>expected</th><th>base</th><th>q</th>" in report.to_html(df)
    assert "expected" not in report.comparison_table(gen_rows(), "oasst1_levels").columns  # none: no column


def test_study_provenance_names_real_shapes_only_for_7b_presets(tmp_path):
    a = make_run(tmp_path, "q", "qlora")
    cfg = yaml.safe_load((a / "config.yaml").read_text())
    cfg["model"]["random_init"], cfg["train"]["max_steps"] = "llama2-7b", 1200
    (a / "config.yaml").write_text(yaml.safe_dump(cfg))
    (line,) = report.provenance([a])
    assert "QLoRA fine-tune of llama2-7b with random weights (real shape, meaningless text), 1,200 steps" in line
