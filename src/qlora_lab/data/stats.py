"""Counts and token lengths of a prepared file, so max_length is picked with the data in view."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .conversation import has_answer
from .dataset import read_prepared
from .formats import IGNORE, tokenize_conversation

_NO_LIMIT = 1 << 62


def tokenizer_for(cfg):
    """The tokenizer of the config's model, without loading any weights."""
    if cfg.model.random_init:
        from ..presets import byte_tokenizer, model_config

        # as presets.make_model saves it: BOS only for Llama-type models
        return byte_tokenizer(add_bos=model_config(cfg.model.random_init).model_type == "llama")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(cfg.model.name_or_path, revision=cfg.model.revision,
                                         trust_remote_code=cfg.model.trust_remote_code)


@dataclass
class LengthStats:
    path: str
    fmt: str
    max_length: int
    rows: int
    prompt_only: int
    turns: dict          # assistant turns per conversation -> rows
    lengths: list        # full token length of each row with an answer (untruncated)
    answer_tokens: int   # tokens trained on if nothing were truncated

    @property
    def over_max(self) -> int:
        return sum(1 for n in self.lengths if n > self.max_length)

    def percentile(self, q: float) -> int:
        s = sorted(self.lengths)
        return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]

    def histogram(self, bins: int = 10) -> list[tuple[int, int, int]]:
        """(low, high, count) bins of equal width covering 1..max length."""
        top = max(self.lengths)
        width = max(1, math.ceil(top / bins))
        counts = [0] * bins
        for n in self.lengths:
            counts[min(bins - 1, (n - 1) // width)] += 1
        return [(i * width + 1, (i + 1) * width, c) for i, c in enumerate(counts)]

    def text(self, bins: int = 10) -> str:
        lines = [f"{self.path}: {self.rows} rows, {self.rows - self.prompt_only} with an answer, "
                 f"{self.prompt_only} prompt-only (skipped by training)"]
        turns = ", ".join(f"{k}: {v}" for k, v in sorted(self.turns.items()))
        lines.append(f"answers per conversation: {turns}")
        if not self.lengths:
            return "\n".join(lines)
        lines.append(f"tokens per example (format {self.fmt}, BOS/EOS included): min {min(self.lengths)}, "
                     f"median {self.percentile(50)}, p90 {self.percentile(90)}, p95 {self.percentile(95)}, "
                     f"p99 {self.percentile(99)}, max {max(self.lengths)}; "
                     f"answer tokens {self.answer_tokens} of {sum(self.lengths)}")
        pct = 100 * self.over_max / len(self.lengths)
        lines.append(f"longer than data.max_length={self.max_length}: {self.over_max} rows ({pct:.1f}%) "
                     f"would be truncated")
        hist = self.histogram(bins)
        peak = max(c for _, _, c in hist) or 1
        for lo, hi, c in hist:
            mark = "  <- max_length" if lo <= self.max_length <= hi else ""
            lines.append(f"{lo:>7}-{hi:<7} {'#' * round(40 * c / peak):<40} {c}{mark}")
        return "\n".join(lines)

    def figure(self, bins: int = 30):
        """A matplotlib Figure of the length histogram with max_length marked (the caller saves)."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        from matplotlib.figure import Figure

        fig = Figure(figsize=(7, 3.5))
        ax = fig.add_subplot()
        ax.hist(self.lengths, bins=bins, color="#4c72b0")
        ax.axvline(self.max_length, color="#c44e52", linestyle="--", label=f"max_length {self.max_length}")
        ax.set_xlabel(f"tokens per example ({self.fmt})")
        ax.set_ylabel("examples")
        ax.set_title(Path(self.path).name)
        ax.legend()
        fig.tight_layout()
        return fig


def length_stats(path, tokenizer, data_cfg) -> LengthStats:
    convs = read_prepared(path)
    lengths, turns, answer_tokens, prompt_only = [], {}, 0, 0
    for messages in convs:
        k = sum(1 for m in messages if m["role"] == "assistant")
        turns[k] = turns.get(k, 0) + 1
        if not has_answer(messages):
            prompt_only += 1
            continue
        ex = tokenize_conversation(messages, tokenizer, data_cfg.format, _NO_LIMIT,
                                   train_on_inputs=data_cfg.train_on_inputs)
        lengths.append(len(ex["input_ids"]))
        answer_tokens += sum(1 for t in ex["labels"] if t != IGNORE)
    return LengthStats(str(path), data_cfg.format, data_cfg.max_length, len(convs), prompt_only, turns,
                       lengths, answer_tokens)


def write_png(stats: LengthStats, png: Optional[Path] = None) -> Optional[Path]:
    if not stats.lengths:
        return None
    png = Path(png) if png else Path(stats.path).with_suffix(".lengths.png")
    png.parent.mkdir(parents=True, exist_ok=True)
    stats.figure().savefig(png, dpi=120)
    return png
