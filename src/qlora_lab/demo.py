"""`qlora-lab demo`: QLoRA vs LoRA end to end on a CPU, offline, in a few minutes.

It trains the tiny random-weight Llama twice on the 24 LIMA-format question/answer pairs shipped in
``resources/demo/`` (once with a 4-bit NF4 base, once with an unquantized base, float32 on a CPU;
nothing else differs), answers the same questions greedily with the base model and both fine-tunes,
and writes under one folder::

    runs/tiny_llama_qlora/, runs/tiny_llama_lora/   run folders (config, metrics, adapter, ...)
    loss.png, loss.svg                              train loss of both runs on one axis
    table.md, table.html, summary.json              base vs QLoRA vs LoRA, with run summaries
    generations.jsonl

Learning, not noise: a fine-tune "reproduces" an answer when its greedy output equals the shipped
answer exactly. The random base model reproduces none; each fine-tune should reproduce >= 80%.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .config import Config, GenerationConfig, from_dict
from .errors import UserError
from .fileio import atomic_write, resource
from .prompts import Prompt, PromptSet

MARKER = "demo.json"

# The tiny QLoRA config (configs/tiny_llama_qlora.yaml) with the demo's own training settings:
# the goal is to memorize 24 short answers, exactly, in about a minute per run on 2 CPU cores.
DEMO_CONFIG = {
    "model": {"random_init": "tiny-llama"},
    "quant": {"bits": 4, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
              "bnb_4bit_compute_dtype": "auto"},
    # lm_head too: its random rows (std 0.02) cap every logit near 5 otherwise, so the loss cannot
    # fall below ~1.1 nats and memorizing takes ~50% more epochs (measured on seeds 0-2).
    "lora": {"r": 32, "lora_alpha": 64, "lora_dropout": 0.0,
             "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                                "lm_head"]},
    "data": {"format": "lima_eot", "max_length": 96, "eval_size": 0,   # no held-out rows: memorization
             "train_on_inputs": False},
    "train": {"seed": 42, "max_steps": 240,          # 80 epochs; >= 80% exact from ~45 epochs on (seeds 0-2)
              "per_device_train_batch_size": 8,    # 3 steps per epoch; the whole set per step learns slower
              "gradient_accumulation_steps": 1,
              "learning_rate": 1.0e-3,             # 3e-3 and up stalls at the unigram loss (~3 nats)
              "lr_scheduler_type": "cosine",    # decays to 0: the last epochs settle instead of jitter
              "warmup_ratio": 0.0, "max_grad_norm": 1.0,
              "optim": "adamw_torch", "logging_steps": 1, "eval_steps": None,
              "save_steps": 10_000,                # no checkpoints: nothing to resume in a demo
              "save_total_limit": 1, "gradient_checkpointing": False, "kernels": "none"},
    "generation": {"max_new_tokens": 64, "do_sample": False, "num_beams": 1, "batch_size": 24, "seed": 0},
    "logging": {"report_to": "none"},
}
METHODS = ("qlora", "lora")
THRESHOLD = 0.8   # share of the shipped answers each fine-tune must reproduce exactly
LEVELS = ("Fact", "Number", "Concept")  # what each shipped answer is: a name or place, a number, a definition


@dataclass
class DemoResult:
    out_dir: Path
    runs: dict                      # method -> run folder
    files: dict                     # name -> path (loss.png, table.md, ...)
    exact: dict                     # model label -> share of shipped answers reproduced exactly
    n_pairs: int
    seconds: float
    counts: dict = field(default_factory=dict)

    @property
    def learned(self) -> bool:
        return all(self.exact[m] >= THRESHOLD for m in METHODS) and self.exact["base"] == 0.0


def _demo_rows() -> list[dict]:
    path = resource("demo", "lima_demo.jsonl")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def demo_pairs() -> list[tuple[str, str]]:
    """The shipped (question, answer) pairs, in LIMA format (`conversations: [user, assistant]`)."""
    return [tuple(row["conversations"][:2]) for row in _demo_rows()]


def demo_prompts() -> PromptSet:
    """The shipped questions as a prompt set: each with its level (from the data) and expected answer."""
    prompts = tuple(Prompt(id=f"demo-{i}", prompt=row["conversations"][0], level=row["level"],
                           expected=row["conversations"][1]) for i, row in enumerate(_demo_rows()))
    return PromptSet(name="lima_demo", source="qlora_lab/resources/demo/lima_demo.jsonl", levels=LEVELS,
                     prompts=prompts)


def demo_config(method: str, train_file: Path, steps: Optional[int] = None) -> Config:
    """The demo's config for one method; the two differ only in quant.bits (a fair comparison)."""
    raw = json.loads(json.dumps(DEMO_CONFIG))
    raw["quant"]["bits"] = 4 if method == "qlora" else None
    raw["data"]["train_file"] = str(train_file)
    raw["train"]["run_name"] = f"tiny_llama_{method}"
    if steps is not None:
        raw["train"]["max_steps"] = steps
    return from_dict(raw, source=f"qlora-lab demo ({method})")


def prepare_out_dir(out_dir) -> Path:
    """A fresh output folder. An earlier demo's folder (it holds demo.json) is replaced; anything else
    that is not empty is left alone and refused."""
    out = Path(out_dir)
    if out.exists():
        if not out.is_dir():
            raise UserError(f"{out}: exists and is not a folder")
        if (out / MARKER).is_file():
            shutil.rmtree(out)
        elif any(out.iterdir()):
            raise UserError(f"{out}: folder is not empty and is not an earlier demo's; choose another -o")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(json.dumps({"what": "qlora-lab demo output; `qlora-lab demo` replaces it"}))
    return out


def exact_match(rows: list[dict], answers: dict[str, str]) -> tuple[dict, dict]:
    """Share (and count) of the shipped answers each model reproduced exactly (whitespace-stripped)."""
    share, counts = {}, {}
    for label in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == label]
        hits = sum(r["answer"].strip() == answers[r["prompt_id"]].strip() for r in mine)
        share[label], counts[label] = hits / len(mine), hits
    return share, counts


def train_all(configs, overrides=(), runs_dir=None) -> list[Path]:
    """Train each config (a path or a Config); run folders go to runs_dir/<run name> when given."""
    from . import training
    from .config import load_config

    runs = []
    for c in configs:
        cfg = c if isinstance(c, Config) else load_config(c, list(overrides))
        name = cfg.train.run_name or Path(cfg.source or "run").stem
        runs.append(training.main(cfg, output_dir=Path(runs_dir) / name if runs_dir else None))
    return runs


def run_demo(out_dir="qlora-lab-demo", steps: Optional[int] = None, progress: bool = True) -> DemoResult:
    from . import console, generate, plots, studies, training
    from .data.lima import prepare_lima
    from .runs import RunFolder

    t0 = time.perf_counter()
    out = prepare_out_dir(out_dir)
    train_file = out / "data" / "lima_demo.jsonl"
    prepare_lima(resource("demo", "lima_demo.jsonl"), train_file)

    runs = {}
    for method in METHODS:
        cfg = demo_config(method, train_file, steps)
        runs[method] = training.main(cfg, output_dir=out / "runs" / cfg.train.run_name)

    prompts = demo_prompts()
    answers = {p.id: p.expected for p in prompts}
    targets = generate.targets_for([runs[m] for m in METHODS], include_base=True)
    gen = GenerationConfig(**DEMO_CONFIG["generation"])
    with console.log_file(out / "generate.log"):  # library warnings of this part; training's are in train.log
        rows = generate.run(targets, prompts, gen, progress=progress)
    share, counts = exact_match(rows, answers)
    label = {t.adapter and t.run_dir.resolve(): t.label for t in targets}
    exact = {"base": share["base"], **{m: share[label[runs[m].resolve()]] for m in METHODS}}
    hits = {"base": counts["base"], **{m: counts[label[runs[m].resolve()]] for m in METHODS}}

    n = len(prompts)
    notes = [f"Exact reproductions of the {n} shipped answers (greedy decoding): "
             + ", ".join(f"{m}: {hits[m]}/{n}" for m in ("base", *METHODS)) + ".",
             "Tiny random-weight Llama on a CPU: this shows the pipeline learns, not model quality."]
    files = studies.write_study(out, [runs[m] for m in METHODS], rows, prompts=prompts,
                                title="qlora-lab demo: base vs QLoRA vs LoRA", notes=notes)
    lora_dtype = RunFolder.open(runs["lora"]).model_summary.get("compute_dtype", "16-bit")  # float32 on a CPU
    fig = plots.loss_figure(plots.load_curves([runs[m] for m in METHODS]),
                            title=f"Demo: tiny Llama, QLoRA (NF4 base) vs LoRA ({lora_dtype} base)")
    png, svg = plots.save_figure(fig, out / "loss.png")
    files.update({"loss.png": png, "loss.svg": svg})
    result = DemoResult(out_dir=out, runs=runs, files=files, exact=exact, n_pairs=n,
                        seconds=time.perf_counter() - t0, counts=hits)
    atomic_write(out / MARKER, json.dumps({
        "what": "qlora-lab demo output; `qlora-lab demo` replaces it", "exact_match": exact,
        "exact_counts": hits, "n_pairs": n, "seconds": round(result.seconds, 1), "learned": result.learned,
        "runs": {m: str(p) for m, p in runs.items()}}, indent=2))
    return result
