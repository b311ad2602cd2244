"""The two studies end to end: one code path for the notebooks and scripts/reproduce_studies.sh.

    qlora-lab study falcon7b_oasst1 -o assets/studies/falcon7b_oasst1 [--offline] [--steps N]
    qlora_lab.studies.run("llama2_7b_lima", "assets/studies/llama2_7b_lima", offline=True)  # a notebook

A study is its configs (the QLoRA arm first), each trained with `qlora-lab train`; then the answers of
the base model and of every fine-tune to the study's prompt set, the loss curves, and the study folder:
table.md/html, generations.jsonl, metrics/, loss.png/svg and summary.json, whose `measured` section holds
what each run took (conversations and tokens trained, wall time, tokens/s, peak GPU memory, GPU). Never
weights: run folders (adapters, checkpoints) go to `work_dir`.
`write_study` writes that folder (`qlora-lab compare` and the demo write the same one) and `load_study`
reads it back for a notebook.

offline=True is what a machine without a model hub can run: a random-weight model of each config's shape
(speed and memory real, text gibberish) and synthetic corpora of the real dataset's size and token lengths
(`data/synthetic.py`), fed through the same `data oasst1` / `data lima` pipeline a download would take.
A memory-budget run (`budget_gib`) trains the QLoRA arm once more under that cap (T4-class: 15) and
records its measurements beside the others.
"""
from __future__ import annotations

import html
import json
import logging
import math
import os
import queue
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from .errors import UserError

log = logging.getLogger("qlora_lab.studies")


@dataclass(frozen=True)
class StudySpec:
    name: str
    configs: tuple[str, ...]   # file names under the configs folder; the QLoRA arm first
    prompts: str               # packaged prompt set
    corpus: str                # oasst1 | lima: what offline data to synthesize
    title: str
    short: str                 # the loss plot's title


STUDIES = {
    "falcon7b_oasst1": StudySpec(
        "falcon7b_oasst1", ("falcon7b_oasst1_qlora.yaml",), "oasst1_levels", "oasst1",
        "Falcon-7B + QLoRA on OASST1 (best path of every tree), lr 2e-4", "Falcon-7B + QLoRA on OASST1"),
    "llama2_7b_lima": StudySpec(
        "llama2_7b_lima", ("llama2_7b_lima_qlora.yaml", "llama2_7b_lima_lora.yaml"), "lima_examples", "lima",
        "Llama-2-7B on LIMA: base vs QLoRA vs LoRA", "Llama-2-7B on LIMA: QLoRA vs LoRA"),
}
OFFLINE_SEED = 0  # the synthetic corpora's seed (data/synthetic.py): same seed, same files


def spec(name: str) -> StudySpec:
    if name not in STUDIES:
        raise UserError(f"unknown study {name!r}; known: {', '.join(STUDIES)}")
    return STUDIES[name]


def offline_data(study: StudySpec, work_dir) -> list[str]:
    """Write the study's synthetic corpora through the real data pipeline; the config overrides that use them."""
    from .data.lima import prepare_lima
    from .data.oasst1 import prepare_oasst1
    from .data.synthetic import write

    d = Path(work_dir) / "data"
    d.mkdir(parents=True, exist_ok=True)
    if study.corpus == "oasst1":
        for split, out in (("train", "oasst1_best.jsonl"), ("validation", "oasst1_best_validation.jsonl")):
            write("oasst1", d / f"synth_oasst1_{split}.trees.jsonl", split=split, seed=OFFLINE_SEED)
            log.info("%s", prepare_oasst1(d / f"synth_oasst1_{split}.trees.jsonl", d / out).summary())
        return [f"data.train_file={d / 'oasst1_best.jsonl'}", f"data.eval_file={d / 'oasst1_best_validation.jsonl'}"]
    write("lima", d / "synth_lima_train.jsonl", split="train", seed=OFFLINE_SEED)
    prepare_lima(d / "synth_lima_train.jsonl", d / "lima.jsonl")
    return [f"data.train_file={d / 'lima.jsonl'}"]


def offline_overrides(cfg_path) -> list[str]:
    """A config's model, as a random-weight model of the same shape (no hub)."""
    from .config import load_config

    name = load_config(cfg_path).model.name_or_path or ""
    preset = "falcon-7b" if "falcon" in name.lower() else "llama2-7b" if "llama" in name.lower() else None
    if preset is None:
        raise UserError(f"{cfg_path}: no random-weight preset for model {name!r}")
    return ["model.name_or_path=null", f"model.random_init={preset}", "logging.report_to=none"]


def measured(run_dir) -> dict:
    """What a finished run took, from its run folder."""
    from .runs import RunFolder

    run = RunFolder.open(run_dir)
    s = run.read_json("train_summary.json") or {}
    data = run.read_json("data_stats.json") or {}
    env = run.read_json("env.json") or {}
    plan = run.read_json("plan.json") or {}
    return {
        "train_conversations": data.get("n_train"), "steps": s.get("steps"),
        "tokens_trained": s.get("tokens_trained"), "wall_time_s": s.get("train_runtime_s"),
        "tokens_per_s": s.get("tokens_per_s"), "peak_memory_bytes": s.get("peak_memory_bytes"),
        "gpu": env.get("device"), "memory_budget_gib": plan.get("memory_budget_gib"),
        "checkpoint_layers": plan.get("checkpoint_layers"), "status": s.get("status"),
    }


def train_in_own_process(config, sets: Sequence[str], out_dir, gpu: Optional[int] = None,
                         prefix: str = "") -> Path:
    """`qlora-lab train` in a child process, its output passed through; returns the run folder.

    One process per arm: a process keeps part of what an arm allocated (library objects hold the model),
    so a second arm in the same process would count it in its peak memory, and under a memory cap run out
    (seen on an H200: a 15 GiB run after the two Llama arms started with 17 GiB already allocated).
    gpu: the one GPU the child sees (CUDA_VISIBLE_DEVICES); prefix: put before each of its output lines,
    so that arms running side by side can be told apart.
    """
    from .distributed import gpu_env

    cmd = [sys.executable, "-m", "qlora_lab.cli", "train", str(config), "--output-dir", str(out_dir)]
    for s in sets:
        cmd += ["--set", s]
    env = None if gpu is None else gpu_env(gpu)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                          env=env) as p:
        for line in p.stdout:  # through sys.stderr, so that a notebook shows it
            sys.stderr.write(prefix + line)
    if p.returncode != 0:
        raise UserError(f"{out_dir}: training {config} failed (exit {p.returncode}); its log: {out_dir}/train.log")
    return Path(out_dir)


@dataclass(frozen=True)
class Job:
    config: Path
    sets: tuple[str, ...]
    out_dir: Path


def train_all(jobs: Sequence[Job], gpus: Optional[Sequence[int]] = None) -> list[Path]:
    """Train every job, each in its own process; returns their run folders in the jobs' order.

    Without gpus (or with one), one after the other. With several, side by side: each job takes the next
    free GPU and has it to itself, so that its time and peak memory are its own (a study's arms and its
    memory-budget run on a 2-GPU box: the wall time of the longest instead of the sum). A failed job
    fails the study once the others have finished; their run folders stay.
    """
    if not gpus or len(gpus) == 1:
        gpu = gpus[0] if gpus else None
        return [train_in_own_process(j.config, j.sets, j.out_dir, gpu=gpu) for j in jobs]
    free: queue.Queue = queue.Queue()
    for g in gpus:
        free.put(g)

    def one(job: Job) -> Path:
        gpu = free.get()
        try:
            log.info("%s: training on GPU %s", job.out_dir.name, gpu)
            return train_in_own_process(job.config, job.sets, job.out_dir, gpu=gpu, prefix=f"[{job.out_dir.name}] ")
        finally:
            free.put(gpu)

    with ThreadPoolExecutor(max_workers=len(gpus)) as pool:
        futures = [pool.submit(one, j) for j in jobs]
        wait(futures)
    return [f.result() for f in futures]  # the first failure, in the jobs' order, raises here


def run(name: str, study_dir, work_dir="runs/studies", offline: bool = False, overrides: Sequence[str] = (),
        steps: Optional[int] = None, budget_gib: Optional[float] = None, budget_steps: Optional[int] = None,
        configs_dir="configs", configs: Optional[Sequence] = None, progress: bool = True,
        title: Optional[str] = None, gpus: Optional[Sequence[int]] = None) -> Path:
    """Train every arm, answer the prompts, plot, and write `study_dir`; returns it.

    configs: other config files for the arms (the QLoRA arm first), e.g. the tiny CPU twins; default the
    study's own, under configs_dir. gpus: GPU indices to train the arms (and the memory-budget run) on
    side by side, one per GPU (train_all); the answers are then generated on the first of them.
    """
    from . import generate, plots
    from .config import load_config

    study = spec(name)
    work = Path(work_dir) / study.name
    paths = [Path(c) for c in configs] if configs else [Path(configs_dir) / c for c in study.configs]
    for p in paths:
        if not p.is_file():
            raise UserError(f"{p}: config not found (configs_dir={configs_dir})")
    common = list(overrides)
    if steps:
        common.append(f"train.max_steps={steps}")
    if offline:
        common = offline_data(study, work) + common
    sets = {p: (offline_overrides(p) if offline else []) + common for p in paths}
    cfgs = [load_config(p, sets[p]) for p in paths]  # validated before anything trains
    jobs = [Job(p, tuple(sets[p]), work / p.stem) for p in paths]
    if budget_gib:  # the QLoRA arm again, capped like a smaller GPU; its folder stays out of the tables
        extra = [f"train.memory_budget_gib={budget_gib}"] + ([f"train.max_steps={budget_steps}"] if budget_steps else [])
        jobs.append(Job(paths[0], tuple(sets[paths[0]] + extra), work / f"{paths[0].stem}-budget{budget_gib:g}"))
    if gpus:
        from .distributed import use_gpus

        use_gpus(gpus[:1])  # this process (the answers) on the first; each job sets its own
    trained = train_all(jobs, gpus)
    runs = trained[:len(paths)]
    meas = {Path(r).name: measured(r) for r in trained}
    notes = _notes([load_config(p).train.max_steps for p in paths], steps,
                   gpus if gpus and len(gpus) > 1 else None, len(jobs))
    gen = cfgs[0].generation
    rows = generate.run(generate.targets_for(runs, include_base=True), study.prompts, gen, progress=progress)
    title = title or study.title + (" (random weights of the real shape: the text is gibberish)" if offline else "")
    write_study(study_dir, runs, rows, prompts=study.prompts, title=title, notes=notes)
    _add_measured(Path(study_dir) / "summary.json", meas, offline)
    short = study.short + (" (random weights of the real shape)" if offline else "")
    plots.save_figure(plots.loss_figure(plots.load_curves(runs), title=short), Path(study_dir) / "loss.png")
    return Path(study_dir)


def _notes(config_steps: Sequence[int], steps: Optional[int], gpus: Optional[Sequence[int]],
           n_jobs: int) -> list[str]:
    """How the study ran where it departs from its configs or runs side by side: said in its tables."""
    notes = []
    if steps and any(n != steps for n in config_steps):
        notes.append(f"Every arm trained {steps} steps instead of the config's "
                     f"{', '.join(sorted({str(n) for n in config_steps}))}; config otherwise unchanged.")
    if gpus:
        notes.append(f"The {n_jobs} training runs ran side by side in their own processes, one per GPU "
                     f"(GPUs {', '.join(map(str, gpus))} of one machine): each time and peak is its own run's.")
    return notes


def _add_measured(summary_file: Path, meas: dict, offline: bool) -> None:
    from .fileio import atomic_write

    doc = json.loads(summary_file.read_text(encoding="utf-8"))
    doc["measured"] = meas
    if offline:
        doc["offline_data"] = (f"synthetic corpora (qlora-lab data synth, seed {OFFLINE_SEED}) of the real "
                               "dataset's size and Llama-2 token lengths, through the real data pipeline")
    atomic_write(summary_file, json.dumps(doc, indent=2, default=str) + "\n")



# ----------------------------------------------------------------------------- the study folder

def write_study(out_dir, runs: Sequence, generations=None, prompts=None, title: str = "",
                notes: Sequence[str] = ()) -> dict[str, Path]:
    """Write the results of a study to `out_dir` (summary.json, table.md/html, metrics/, generations).

    The caller saves the loss figure (plots.save_figure) into the same folder as loss.png/.svg.
    """
    from . import report
    from .fileio import atomic_write

    out = Path(out_dir)
    runs = report.read_runs(runs)
    summary = report.summary_table(runs)
    raw = report.summary_table(runs, formatted=False)
    table = None
    written = {}
    if generations is not None:
        rows = report.read_jsonl(generations) if isinstance(generations, (str, os.PathLike)) else list(generations)
        table = report.comparison_table(rows, prompts)
        written["generations.jsonl"] = atomic_write(
            out / "generations.jsonl", "".join(json.dumps(g, ensure_ascii=False) + "\n" for g in rows))
    notes = [*report.provenance(runs), *notes]
    caption = report.random_weights_caption(runs)
    written["table.md"] = atomic_write(out / "table.md", report.to_markdown(table, summary, title, notes, caption=caption))
    written["table.html"] = atomic_write(out / "table.html", report.to_html(table, summary, title, notes, caption=caption))
    for r in runs:
        if r.metrics_file.is_file():  # the logged rows, without a last line a crash cut short
            dst = out / "metrics" / f"{r.name.replace('/', '_')}.jsonl"
            written[f"metrics/{dst.name}"] = atomic_write(dst, "".join(json.dumps(x) + "\n" for x in r.metrics()))
    doc = {
        "title": title,
        "provenance": notes,
        "runs": {name: {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
                 for name, row in raw.to_dict(orient="index").items()},
        "configs": {r.name: r.config_data for r in runs},
        "model_summaries": {r.name: r.model_summary for r in runs},
        "env": {r.name: r.env for r in runs},
    }
    written["summary.json"] = atomic_write(out / "summary.json", json.dumps(doc, indent=2, default=str) + "\n")
    return written


@dataclass
class Study:
    """Committed results of one study, as `load_study` finds them. Renders itself in a notebook."""
    path: Path
    available: bool
    message: str
    summary: dict = field(default_factory=dict)
    markdown: str = ""
    html: str = ""
    metrics: dict = field(default_factory=dict)   # run name -> metrics.jsonl path
    loss_png: Optional[Path] = None

    def _repr_markdown_(self) -> str:
        return self.markdown if self.available else f"**{self.message}**"

    def _repr_html_(self) -> Optional[str]:
        if not self.available:
            return f"<p><strong>{html.escape(self.message)}</strong></p>"
        return self.html or None


def load_study(path) -> Study:
    """Read a study folder under assets/. Absent results give available=False and say so plainly."""
    from .fileio import read_json

    p = Path(path)
    summary_path = p / "summary.json"
    if not summary_path.is_file():
        return Study(path=p, available=False,
                     message=f"No results committed yet under {p} (no summary.json). They are produced "
                             f"by running this notebook with RUN_TRAINING=True on a GPU; nothing is shown "
                             f"rather than made-up numbers.")
    summary = read_json(summary_path, required=False) or {}
    md = (p / "table.md").read_text(encoding="utf-8") if (p / "table.md").is_file() else ""
    ht = (p / "table.html").read_text(encoding="utf-8") if (p / "table.html").is_file() else ""
    metrics = {f.stem: f for f in sorted((p / "metrics").glob("*.jsonl"))} if (p / "metrics").is_dir() else {}
    prov = " ".join(summary.get("provenance") or [])
    return Study(path=p, available=True, message=f"Results in {p}. Produced by: {prov or 'unknown'}",
                 summary=summary, markdown=md, html=ht, metrics=metrics,
                 loss_png=(p / "loss.png") if (p / "loss.png").is_file() else None)
