"""The bench report on disk after every worker is a whole report (MFU, comparisons, table, Markdown twin),
so a bench killed or timed out mid-way (assets/bench run 8) leaves figures that read on their own."""
from __future__ import annotations

import json

import pytest

from qlora_lab import bench

from .conftest import ROOT


def test_a_bench_killed_after_its_first_worker_leaves_a_whole_report(tmp_path, monkeypatch):
    measured = json.loads((ROOT / "assets/bench/h200x2-run9-peer-llama-dropout0.05.json").read_text())
    ours = next(r for r in measured["rows"] if r["path"] == "ours" and r["seq_len"] == 512)
    calls = []

    def worker(spec, cmd, env, timeout, cwd=None):  # the first worker's real rows, then the run is killed
        calls.append(spec["label"])
        if len(calls) > 1:
            raise KeyboardInterrupt
        row = {k: v for k, v in ours.items() if k not in ("mfu", "hfu")}
        return [row], {"preset": spec["preset"], "label": spec["label"], "returncode": 0, "matmul_tflops": 786.8}

    monkeypatch.setattr(bench, "_run_worker", worker)
    out = tmp_path / "partial.json"
    with pytest.raises(KeyboardInterrupt):
        bench.run(["llama2-7b"], [bench.Shape(512, 8)], baseline=True, output=out)
    assert calls == ["ours", "baseline"]
    report = json.loads(out.read_text())
    assert [r["path"] for r in report["rows"]] == ["ours"] and report["matmul_tflops"] == 786.8
    assert report["rows"][0]["mfu"] == pytest.approx(ours["mfu"], rel=1e-3)  # MFU without the rest of the run
    assert "| llama2-7b | 8x512 | ours |" in report["table"]
    assert out.with_suffix(".md").read_text() == report["table"] + "\n"
