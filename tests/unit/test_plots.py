from __future__ import annotations

import json

import numpy as np
import pytest

from qlora_lab import plots
from qlora_lab.errors import UserError

from .test_report import make_run


def test_metrics_become_curves_with_train_and_eval_rows(tmp_path):
    c = plots.read_metrics(make_run(tmp_path, "q", steps=20))
    assert c.label == "q"
    assert c.frame["loss"].notna().sum() == 20 and c.frame["eval_loss"].notna().sum() == 4
    assert c.frame["step"].is_monotonic_increasing


def test_smoothing_keeps_level_smooths_noise_and_does_not_lag():
    assert plots.smooth_curve([2.0, 2.0, 2.0], 0.9).tolist() == pytest.approx([2.0, 2.0, 2.0])
    noisy = np.array([1.0, 3.0] * 50)
    assert plots.smooth_curve(noisy, 0.9)[10:-10].std() < noisy.std() / 3
    assert plots.smooth_curve([1.0, 2.0], 0).tolist() == [1.0, 2.0]
    line = np.linspace(5.0, 1.0, 40)  # a falling straight line: a centred window leaves it where it is
    assert plots.smooth_curve(line, 0.9) == pytest.approx(line)


def test_five_step_run_integer_ticks_and_line_ends_at_last_loss(tmp_path):
    """A 5-step run: ticks at whole steps only, the smoothed line starts and ends on real losses."""
    losses = [5.98, 5.742, 5.284, 4.91, 4.77]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps({"step": i + 1, "loss": v}) + "\n"
                                              for i, v in enumerate(losses)))
    fig = plots.loss_figure(plots.load_curves([tmp_path / "m.jsonl"]), smooth=0.6)
    ax = fig.axes[0]
    fig.canvas.draw()
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks
    smoothed = next(l for l in ax.get_lines() if "smoothed" in l.get_label())
    y = smoothed.get_ydata()
    assert y[0] == pytest.approx(losses[0]) and y[-1] == pytest.approx(losses[-1])
    assert all(min(losses) <= v <= max(losses) for v in y)


def test_loss_figure_overlays_runs_in_steps_and_tokens(tmp_path):
    curves = plots.load_curves([make_run(tmp_path, "qlora_run"), make_run(tmp_path, "lora_run", "lora", seed=3)])
    fig = plots.loss_figure(curves, x="step", smooth=0.6)
    ax = fig.axes[0]
    labels = [l.get_label() for l in ax.get_lines() if not l.get_label().startswith("_")]
    assert labels == ["qlora_run train (smoothed 0.6)", "qlora_run eval", "lora_run train (smoothed 0.6)",
                      "lora_run eval"]
    assert len(ax.get_lines()) == 6  # plus two faint raw curves
    fig = plots.loss_figure(curves, x="tokens", smooth=0)
    assert fig.axes[0].get_xlabel() == "trained tokens"
    assert max(fig.axes[0].get_lines()[0].get_xdata()) == 400 * 20
    paths = plots.save_figure(fig, tmp_path / "out" / "loss.png")
    assert [p.name for p in paths] == ["loss.png", "loss.svg"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and b"<svg" in paths[1].read_bytes()[:500]


class _FakeRun:
    name = "wandb-qlora"

    def __init__(self, history):
        self._history = history
        self.scanned = False

    def scan_history(self):
        self.scanned = True
        return iter(self._history)


class _FakeApi:
    def __init__(self, history):
        self.runs = {}
        self.history = history

    def run(self, path):
        self.runs[path] = _FakeRun(self.history)
        return self.runs[path]


def test_wandb_history_uses_scan_history(tmp_path, monkeypatch):
    history = [{"_step": i, "train/global_step": i + 1, "train/loss": 3.0 - 0.1 * i,
                "train/learning_rate": 2e-4} for i in range(10)]
    history.append({"_step": 10, "train/global_step": 10, "eval/loss": 2.5})
    history.append({"_step": 11, "train/global_step": 10, "train/train_runtime": 5.0})  # summary row: skipped
    import wandb

    api = _FakeApi(history)
    monkeypatch.setattr(wandb, "Api", lambda *a, **k: api)
    c = plots.wandb_history("me/proj/abc123")
    assert api.runs["me/proj/abc123"].scanned
    assert c.label == "wandb-qlora" and c.source == "wandb:me/proj/abc123"
    assert c.frame["loss"].notna().sum() == 10 and c.frame["eval_loss"].dropna().tolist() == [2.5]
    assert c.frame["step"].max() == 10
    with pytest.raises(UserError, match="no `tokens` values"):
        plots.loss_figure([c], x="tokens")
    with pytest.raises(UserError, match="ENTITY/PROJECT/RUN_ID"):
        plots.wandb_history("just-an-id")

    class Broken:
        def run(self, path):
            raise ValueError("Could not find run me/proj/zzz")

    with pytest.raises(UserError, match="wandb run me/proj/zzz: ValueError"):
        plots.wandb_history("me/proj/zzz", api=Broken())


def test_plot_cli_writes_png_and_svg(tmp_path, cli):
    a, b = make_run(tmp_path, "q"), make_run(tmp_path, "l", "lora")
    r = cli("plot", a, b, "-o", tmp_path / "loss.png", "--x", "tokens")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "loss.png").stat().st_size > 1000 and (tmp_path / "loss.svg").is_file()


def test_plot_cli_bad_input_is_one_line(tmp_path, capsys):
    from qlora_lab.cli import main

    assert main(["plot", str(tmp_path / "nope"), "-o", str(tmp_path / "x.png")]) == 2
    assert "nope: run folder not found" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"step": 1, "foo": 2}) + "\n")
    assert main(["plot", str(bad), "-o", str(tmp_path / "y.png")]) == 2
    assert "no loss values" in capsys.readouterr().err
