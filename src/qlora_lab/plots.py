"""Loss curves: runs in, matplotlib Figure out. The caller saves (`save_figure` writes PNG and SVG).

Sources are local (a run folder's metrics.jsonl, or a metrics JSONL file such as those committed
under assets/) or a wandb run's full history (`wandb_history("entity/project/run_id")`).
All become the same frame: step, tokens, loss, eval_loss (NaN where a row has none).
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from .errors import UserError
from .fileio import atomic_write
from .report import read_jsonl
from .runs import RunFolder

COLUMNS = ("step", "tokens", "loss", "eval_loss", "learning_rate", "epoch")
X_AXES = ("step", "tokens")

# wandb key -> our column. HF Trainer logs train/loss, eval/loss, train/global_step; our callback
# mirrors the metrics.jsonl keys.
_WANDB_KEYS = {
    "step": ("train/global_step", "global_step", "step", "_step"),
    "tokens": ("tokens", "train/tokens", "train/num_input_tokens_seen", "num_input_tokens_seen"),
    "loss": ("train/loss", "loss"),
    "eval_loss": ("eval/loss", "eval_loss"),
    "learning_rate": ("train/learning_rate", "learning_rate"),
    "epoch": ("train/epoch", "epoch"),
}


@dataclass
class Curve:
    label: str
    frame: pd.DataFrame            # COLUMNS, one row per logged step (train and eval rows apart)
    source: str


def _frame(rows: list[dict], where: str) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    for c in COLUMNS:
        if c not in df.columns:
            df[c] = np.nan
    df = df[list(COLUMNS)].apply(pd.to_numeric, errors="coerce")
    if df["loss"].isna().all() and df["eval_loss"].isna().all():
        raise UserError(f"{where}: no loss values (expected rows with `loss` or `eval_loss`)")
    if df["step"].isna().all():
        raise UserError(f"{where}: no `step` values")
    return df.sort_values("step", kind="stable").reset_index(drop=True)


def read_metrics(source) -> Curve:
    """A run folder (its metrics.jsonl) or a metrics JSONL file -> Curve."""
    p = Path(source)
    if p.is_file():
        return Curve(label=p.stem, frame=_frame(read_jsonl(p), str(p)), source=str(p))
    run = RunFolder.open(p)
    if not run.metrics_file.exists():
        raise UserError(f"{run.metrics_file}: run has no metrics (was it trained?)")
    rows = run.metrics()  # file:line for a garbled line; a last line cut by a crash is left out
    if not rows:
        raise UserError(f"{run.metrics_file}: no logged row (empty file)")
    return Curve(label=p.resolve().name, frame=_frame(rows, str(run.metrics_file)), source=str(p))


def wandb_history(path: str, api=None) -> Curve:
    """A wandb run's full (unsampled) history, via wandb.Api().run(path).scan_history()."""
    if path.count("/") != 2 or not all(path.split("/")):
        raise UserError(f"--wandb {path}: expected ENTITY/PROJECT/RUN_ID")
    if api is None:
        try:
            import wandb
        except ImportError:
            raise UserError("--wandb needs the wandb package (pip install wandb)") from None
        api = wandb.Api()
    try:
        run = api.run(path)
        history = list(run.scan_history())
    except UserError:
        raise
    except Exception as e:  # network, auth, missing run: wandb raises many types; say which run
        raise UserError(f"wandb run {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    rows = []
    for h in history:
        row = {}
        for col, keys in _WANDB_KEYS.items():
            for k in keys:
                if h.get(k) is not None:
                    row[col] = h[k]
                    break
        if "loss" in row or "eval_loss" in row:
            rows.append(row)
    label = getattr(run, "name", None) or path.rsplit("/", 1)[-1]
    return Curve(label=str(label), frame=_frame(rows, f"wandb run {path}"), source=f"wandb:{path}")


def load_curves(runs: Sequence = (), wandb_paths: Sequence[str] = (), api=None) -> list[Curve]:
    curves = [c if isinstance(c, Curve) else read_metrics(c) for c in runs]
    curves += [wandb_history(p, api=api) for p in wandb_paths]
    if not curves:
        raise UserError("nothing to plot: give run folders or --wandb ENTITY/PROJECT/RUN_ID")
    labels = [c.label for c in curves]
    for i, c in enumerate(curves):
        if labels.count(c.label) > 1:
            c.label = f"{c.label} [{i + 1}]"
    return curves


def smooth_curve(values: Sequence[float], weight: float) -> np.ndarray:
    """Centred exponential smoothing: each point averaged with its neighbours, k points away counting
    weight**k, over a window as wide on both sides as the ends allow.

    Not a trailing EMA (TensorBoard's): that lags by weight / (1 - weight) points, so on a falling
    curve it runs above the losses and ends above the last one (4.98 for a last loss of 4.77 on a
    5-step run). A symmetric window has no lag, and narrowing it toward the ends makes the line start
    at the first loss and end at the last one; the price is less smoothing at the very ends.
    """
    v = np.asarray(values, dtype=float)
    n = len(v)
    if weight <= 0 or n < 3:
        return v.copy()
    # Neighbours further than this weigh under 1e-3 of the centre: leaving them out changes nothing visible.
    reach = min((n - 1) // 2, math.ceil(math.log(1e-3) / math.log(weight)))
    num, den = v.copy(), np.ones(n)
    for k in range(1, reach + 1):
        w = weight**k
        num[k:n - k] += w * (v[:n - 2 * k] + v[2 * k:])  # points with k neighbours on both sides
        den[k:n - k] += 2 * w
    return num / den


def loss_figure(curves: Sequence[Curve], x: str = "step", smooth: float = 0.6, show_raw: bool = True,
                title: Optional[str] = None):
    """Train loss (raw faint, smoothed solid) and eval loss (dashed, dots) of each curve on one axis."""
    import matplotlib
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend
    from matplotlib.ticker import MaxNLocator

    if x not in X_AXES:
        raise UserError(f"x axis {x!r}: allowed: {', '.join(X_AXES)}")
    if not 0 <= smooth < 1:
        raise UserError(f"smoothing {smooth}: must be in [0, 1)")
    fig = Figure(figsize=(8, 4.8), layout="constrained")
    ax = fig.add_subplot()
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, c in enumerate(curves):
        color = colors[i % len(colors)]
        df = c.frame
        if x == "tokens" and df["tokens"].isna().all():
            raise UserError(f"{c.source}: no `tokens` values; plot against steps (--x step)")
        train = df.dropna(subset=["loss", x])
        if len(train):
            if show_raw and smooth > 0:
                ax.plot(train[x], train["loss"], color=color, alpha=0.25, linewidth=1)
            ax.plot(train[x], smooth_curve(train["loss"], smooth), color=color, linewidth=2,
                    label=f"{c.label} train" + (f" (smoothed {smooth:g})" if smooth > 0 else ""))
        ev = df.dropna(subset=["eval_loss", x])
        if len(ev):
            ax.plot(ev[x], ev["eval_loss"], color=color, linestyle="--", marker="o", markersize=4,
                    linewidth=1.5, label=f"{c.label} eval")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps and tokens: no half-step ticks
    ax.set_xlabel("optimizer step" if x == "step" else "trained tokens")
    ax.set_ylabel("loss (cross-entropy, nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or ("Train and eval loss: " + " vs ".join(c.label for c in curves)))
    return fig


def save_figure(fig, path, formats: Sequence[str] = ("png", "svg"), dpi: int = 150) -> list[Path]:
    """Save `fig` as path.png and path.svg (or the given formats), each atomically."""
    stem = Path(path)
    if stem.is_dir():
        raise UserError(f"{stem}: is a folder; expected an image path such as {stem / 'loss.png'}")
    if stem.suffix.lstrip(".").lower() in ("png", "svg", "pdf"):
        stem = stem.with_suffix("")
    out = []
    for fmt in formats:
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=dpi)
        out.append(atomic_write(stem.with_suffix(f".{fmt}"), buf.getvalue()))
    return out
