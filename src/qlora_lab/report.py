"""Comparison tables: run folders and generations in, DataFrame / Markdown / HTML out.

* `read_runs(paths)`: the run folders (runs.RunFolder), checked, named for the tables.
* `summary_table(runs)`: one row per run: method, trainable params, peak memory, train time, losses.
* `comparison_table(generations, prompts)`: rows = prompts with their level (and expected answer, when
  the prompt set has one), columns = base, each run.
* `to_markdown` / `to_html`: the two tables, long answers wrapped and collapsible; generated text shown
  as it is, with control characters and undecodable bytes (U+FFFD) as visible escapes (`\x07`).
* `provenance` / `random_weights_caption`: what a reader must know about the runs behind a table.

The study folder these tables go into is written and read by studies.py. Nothing here loads a model;
everything is read from files, so a user with no GPU and no network can rebuild every table.
"""
from __future__ import annotations

import html
import math
import os
import re
from typing import Iterable, Optional, Sequence

import pandas as pd

from .errors import UserError
from .runs import RunFolder

GiB = 1024**3
METHOD_NAMES = {"qlora": "QLoRA", "lora": "LoRA"}
TEXT_COLUMNS = ("level", "prompt", "expected")  # comparison table columns that are not models' answers
# Answers longer than this many characters fold into a <details> block (first part stays visible).
FOLD_CHARS = 280
PREVIEW_CHARS = 160


# ----------------------------------------------------------------------------- files

def read_jsonl(path) -> list[dict]:
    """Every object of a JSONL file (generations, metrics); errors name the file and line."""
    from .data.jsonl import read_jsonl as read_lines

    return [obj for _, obj in read_lines(path, allow_empty=True)]


# ----------------------------------------------------------------------------- runs

def read_run(path) -> RunFolder:
    """A run folder, checked for tables. UserError if it is missing, is not a run folder (no config.yaml),
    or a file it holds is damaged (named, with what is wrong; metrics.jsonl is checked too)."""
    run = RunFolder.open(path)
    # Every file read now (once: RunFolder keeps them) and metrics.jsonl checked, so that a damaged one is
    # named before `compare` has generated its answers.
    _ = (run.config_data, run.train_summary, run.model_summary, run.env, run.metrics())
    return run


def read_runs(paths: Iterable) -> list[RunFolder]:
    runs = [r if isinstance(r, RunFolder) else read_run(r) for r in paths]
    names = [r.name for r in runs]
    for r in runs:  # two runs with the same folder name: tell them apart by their parent folder
        if names.count(r.name) > 1:
            r.name = f"{r.path.resolve().parent.name}/{r.name}"
    return runs


def device_of(run: RunFolder) -> str:
    """The machine a run trained on, in words, from its env.json (whatever keys it has)."""
    env = run.env or {}
    for key in ("gpu_name", "device_name", "gpu", "cuda_device_name", "device"):
        v = env.get(key)
        if isinstance(v, list):
            v = ", ".join(map(str, v))
        if isinstance(v, dict):
            v = v.get("name")
        if v:
            return str(v)
    plan = env.get("plan") or run.train_summary.get("plan") or {}
    if isinstance(plan, dict) and plan.get("device_name"):
        return str(plan["device_name"])
    return "unknown machine"


def model_name(run: RunFolder) -> str:
    m = run.config_data.get("model") or {}
    if m.get("random_init"):
        return f"{m['random_init']} (random weights)"
    return str(m.get("name_or_path") or "?")


# ----------------------------------------------------------------------------- summary

def _fmt_int(n) -> str:
    return "n/a" if n is None else f"{int(n):,}"


def _fmt_bytes(n) -> str:
    return "n/a (CPU)" if n is None else f"{n / GiB:.2f} GiB"


def _fmt_time(s) -> str:
    if s is None:
        return "n/a"
    s = float(s)
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.2f} h"


def _fmt_loss(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{float(x):.4f}"


def summary_table(runs: Sequence, formatted: bool = True) -> pd.DataFrame:
    """One row per run: method, trainable params, peak memory, train time, final train/eval loss.

    formatted=False keeps raw numbers (bytes, seconds) for further computation.
    """
    rows = []
    for r in read_runs(runs):
        ms, ts = r.model_summary, r.train_summary
        trainable, total = ms.get("trainable_params"), ms.get("total_params")
        row = {
            "run": r.name,
            "method": r.method,
            "model": model_name(r),
            # A LoRA base is held in the compute dtype of its plan: float32 on a CPU, bf16/fp16 on GPUs.
            "quantization": ms.get("quantization") or ("nf4" if r.method == "qlora" else
                                                       f"none ({ms['compute_dtype']})" if ms.get("compute_dtype")
                                                       else "none"),
            "trainable params": trainable,
            "trainable %": (100.0 * trainable / total) if trainable and total else None,
            "peak memory": ts.get("peak_memory_bytes"),
            "train time": ts.get("train_runtime_s"),
            "final train loss": ts.get("final_train_loss"),
            "final eval loss": ts.get("final_eval_loss"),
            "device": device_of(r),
            "status": ts.get("status", "no train_summary.json"),
        }
        if formatted:
            row["method"] = METHOD_NAMES.get(r.method, r.method)
            row["trainable params"] = _fmt_int(trainable)
            row["trainable %"] = "n/a" if row["trainable %"] is None else f"{row['trainable %']:.3f}%"
            row["peak memory"] = _fmt_bytes(row["peak memory"])
            row["train time"] = _fmt_time(row["train time"])
            row["final train loss"] = _fmt_loss(row["final train loss"])
            row["final eval loss"] = _fmt_loss(row["final eval loss"])
        rows.append(row)
    return pd.DataFrame(rows).set_index("run") if rows else pd.DataFrame()


# ----------------------------------------------------------------------------- comparison

def comparison_table(generations, prompts=None, models: Optional[Sequence[str]] = None) -> pd.DataFrame:
    """Rows: prompts (with their level), columns: base then each run, cells: the answers.

    `generations`: rows as written by `qlora_lab.generate` (or a path to that JSONL).
    `prompts`: a PromptSet (or name/path) that fixes the row order and levels; default: order seen.
    `models`: column order; default: base first, then runs in the order seen.
    An `expected` column follows the prompt when the prompt set (or the rows) hold expected answers.
    """
    from .prompts import load_prompts

    rows = read_jsonl(generations) if isinstance(generations, (str, os.PathLike)) else list(generations)
    if not rows:
        raise UserError("no generations to compare")
    seen_models, seen_prompts, cells, meta, expected = [], [], {}, {}, {}
    for g in rows:
        m, pid = g["model"], g["prompt_id"]
        if m not in seen_models:
            seen_models.append(m)
        if pid not in meta:
            seen_prompts.append(pid)
            meta[pid] = (g.get("level"), g.get("prompt"))
        if g.get("expected") is not None:
            expected[pid] = g["expected"]
        cells[(pid, m)] = g.get("answer", "")
    if models is None:
        base = [m for m in seen_models if _is_base_label(m, rows)]
        models = base + [m for m in seen_models if m not in base]
    if prompts is not None:
        ps = load_prompts(prompts)
        expected.update({p.id: p.expected for p in ps if p.expected is not None and p.id in meta})
        order = [p.id for p in ps if p.id in meta] + [pid for pid in seen_prompts if pid not in ps.by_id()]
        levels = {lv: i for i, lv in enumerate(ps.levels)}
        order.sort(key=lambda pid: levels.get(meta[pid][0], len(levels)))  # stable: keeps file order
    else:
        order = seen_prompts
    text_columns = ["level", "prompt"] + (["expected"] if expected else [])
    data = []
    for pid in order:
        level, text = meta[pid]
        data.append({"level": level or "", "prompt": text or pid, "expected": expected.get(pid),
                     **{m: cells.get((pid, m)) for m in models}})
    df = pd.DataFrame(data, columns=[*text_columns, *models])
    df.index = pd.Index(order, name="prompt_id")
    return df


def _is_base_label(label: str, rows) -> bool:
    return any(g["model"] == label and g.get("adapter") in (None, "") for g in rows)


_INVISIBLE = re.compile("[" + "".join(
    re.escape(chr(n)) for n in (*range(0x20), *range(0x7f, 0xa0)) if chr(n) not in "\n\t")
    + "\ud800-\udfff\ufffd]")
# Markdown's own specials in a table cell: `|` ends the cell, `<` + letter opens an HTML tag.
_MD_SPECIAL = re.compile(r"\||<(?=[A-Za-z/!?])")


def visible(text: str) -> str:
    """Control characters, lone surrogates and U+FFFD (bytes that did not decode) as escapes
    (`\\x07`, `\\ufffd`): a random or barely trained model emits them, and a page would show them
    as nothing or as tofu boxes. Newlines and tabs stay."""
    return _INVISIBLE.sub(lambda m: _escape_char(m.group()), text.replace("\r\n", "\n"))


def _escape_char(c: str) -> str:
    n = ord(c)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


def _md_cell(text) -> str:
    """Plain text for a GitHub Markdown table cell: Markdown escapes only (`\\|`, `\\<`), no HTML entities."""
    if text is None:
        return "—"
    s = _MD_SPECIAL.sub(lambda m: "\\" + m.group(), visible(str(text).strip()))
    s = s.replace("\n", "<br>")
    return s or "*(empty)*"


def _md_answer(text) -> str:
    if text is None:
        return "*(not generated)*"
    raw = str(text).strip()
    if len(raw) <= FOLD_CHARS:
        return _md_cell(raw)
    cut = raw.rfind(" ", 0, PREVIEW_CHARS)
    cut = cut if cut > PREVIEW_CHARS // 2 else PREVIEW_CHARS
    return (f"<details><summary>{_md_cell(raw[:cut])} …</summary>{_md_cell(raw[cut:])}"
            f"</details>")


def to_markdown(table: pd.DataFrame, summary: Optional[pd.DataFrame] = None, title: str = "",
                notes: Sequence[str] = (), caption: str = "") -> str:
    """GitHub Markdown: the run summary, then the side-by-side answers (long ones collapsible).

    `caption` goes under the answers' heading (e.g. that the base model has random weights)."""
    out = []
    if title:
        out += [f"## {title}", ""]
    out += [f"> {n}" for n in notes] + ([""] if notes else [])
    if summary is not None and len(summary):
        out += ["### Runs", "", _md_table(summary.reset_index()), ""]
    if table is not None and len(table):
        text = [c for c in TEXT_COLUMNS if c in table.columns]
        models = [c for c in table.columns if c not in TEXT_COLUMNS]
        header = [*text, *models]
        lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
        for _, row in table.iterrows():
            cells = ([_md_cell(row["level"]), _md_cell(row["prompt"])]
                     + [_md_answer(row[c]) if row[c] is not None else "—" for c in text[2:]]
                     + [_md_answer(row[m]) for m in models])
            lines.append("| " + " | ".join(cells) + " |")
        out += ["### Answers", "", *([f"*{_md_cell(caption)}*", ""] if caption else []), *lines, ""]
    return "\n".join(out)


def _md_table(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(map(_md_cell, cols)) + " |", "|" + "---|" * len(cols)]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(_md_cell(row[c]) for c in cols) + " |")
    return "\n".join(lines)


_CSS = """<style>
.qlab table{border-collapse:collapse;font:13px/1.4 system-ui,sans-serif;margin:0 0 1.5em}
.qlab th,.qlab td{border:1px solid #ccc;padding:6px 8px;vertical-align:top;text-align:left}
.qlab th{background:#f3f3f3}
.qlab td.answer{white-space:pre-wrap;word-wrap:break-word;max-width:36em;min-width:14em}
.qlab td.level{white-space:nowrap;font-weight:600}
.qlab details summary{cursor:pointer}
.qlab caption{caption-side:top;text-align:left;font-style:italic;padding:0 0 6px}
</style>"""


def _html_text(text) -> str:
    return html.escape(visible(str(text)))


def _html_answer(text) -> str:
    if text is None:
        return "<em>(not generated)</em>"
    raw = str(text).strip()
    if len(raw) <= FOLD_CHARS:
        return _html_text(raw) or "<em>(empty)</em>"
    cut = raw.rfind(" ", 0, PREVIEW_CHARS)
    cut = cut if cut > PREVIEW_CHARS // 2 else PREVIEW_CHARS
    return (f"<details><summary>{_html_text(raw[:cut])} …</summary>{_html_text(raw[cut:])}</details>")


def to_html(table: pd.DataFrame, summary: Optional[pd.DataFrame] = None, title: str = "",
            notes: Sequence[str] = (), standalone: bool = True, caption: str = "") -> str:
    """HTML: the run summary and the answers, wrapped text, long answers in <details>."""
    out = [_CSS, '<div class="qlab">']
    if title:
        out.append(f"<h2>{html.escape(title)}</h2>")
    out += [f"<p><em>{html.escape(n)}</em></p>" for n in notes]
    if summary is not None and len(summary):
        out.append("<h3>Runs</h3>")
        out.append(summary.reset_index().to_html(index=False, escape=True, border=0))
    if table is not None and len(table):
        text = [c for c in TEXT_COLUMNS if c in table.columns]
        models = [c for c in table.columns if c not in TEXT_COLUMNS]
        out.append("<h3>Answers</h3><table>"
                   + (f"<caption>{_html_text(caption)}</caption>" if caption else "") + "<thead><tr>"
                   + "".join(f"<th>{_html_text(c)}</th>" for c in [*text, *models]) + "</tr></thead><tbody>")
        for _, row in table.iterrows():
            out.append(f'<tr><td class="level">{_html_text(row["level"])}</td>'
                       f'<td class="answer">{_html_text(row["prompt"])}</td>'
                       + "".join(f'<td class="answer">{_html_answer(row[c]) if row[c] is not None else "—"}</td>'
                                 for c in text[2:])
                       + "".join(f'<td class="answer">{_html_answer(row[m])}</td>' for m in models)
                       + "</tr>")
        out.append("</tbody></table>")
    out.append("</div>")
    body = "\n".join(out)
    if not standalone:
        return body
    t = html.escape(title or "qlora-lab comparison")
    return f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{t}</title></head><body>\n{body}\n</body></html>\n'


# ----------------------------------------------------------------------------- notes on a study's runs

def provenance(runs: Sequence) -> list[str]:
    """Plain sentences saying what produced the results: model, weights, method, machine."""
    from .presets import shape_note

    lines = []
    for r in read_runs(runs):
        m = r.config_data.get("model") or {}
        model = (f"{m['random_init']} with random weights ({shape_note(m['random_init'])}, meaningless text)"
                 if m.get("random_init") else f"{m.get('name_or_path')} (pretrained weights)")
        steps = (r.config_data.get("train") or {}).get("max_steps")
        steps = f"{steps:,}" if isinstance(steps, int) else steps
        lines.append(f"{r.name}: {METHOD_NAMES.get(r.method, r.method)} fine-tune of {model}, "
                     f"{steps} steps, trained on {device_of(r)}.")
    return lines


def random_weights_caption(runs: Sequence) -> str:
    """What a reader must know before reading answers of a random-weight model ('' for pretrained ones)."""
    presets = sorted({(r.config_data.get("model") or {}).get("random_init") for r in read_runs(runs)} - {None})
    if not presets:
        return ""
    return (f"The base model ({', '.join(presets)}) has random weights: its answers are meaningless text, "
            f"and a fine-tune knows only what its training data taught it.")
