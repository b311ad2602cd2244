"""The two studies end to end: one code path for the notebooks and scripts/reproduce_studies.sh.

    qlora-lab study falcon7b_oasst1 -o assets/studies/falcon7b_oasst1 [--offline] [--steps N]
    qlora_lab.studies.run("llama2_7b_lima", "assets/studies/llama2_7b_lima", offline=True)  # a notebook

A study is its configs (the QLoRA arm first), each trained with `qlora-lab train`; then the answers of
the base model and of every fine-tune to the study's prompt set, the loss curves, and the study folder:
table.md/html, generations.jsonl, metrics/, loss.png/svg and summary.json, whose `measured` section holds
what each run took (conversations and tokens trained, wall time, tokens/s, peak GPU memory, GPU). Never
weights: run folders (adapters, checkpoints) go to `work_dir`.

offline=True is what a machine without a model hub can run: a random-weight model of each config's shape
(speed and memory real, text gibberish) and synthetic corpora of the real dataset's size and token lengths
(`data/synthetic.py`), fed through the same `data oasst1` / `data lima` pipeline a download would take.
A memory-budget run (`budget_gib`) trains the QLoRA arm once more under that cap (T4-class: 15) and
records its measurements beside the others.
"""
from __future__ import annotations

import json
import logging
import queue
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
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
    from . import generate, plots, report
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
    report.write_study(study_dir, runs, rows, prompts=study.prompts, title=title, notes=notes)
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


def add_parser(sub) -> None:
    p = sub.add_parser("study", help="run one of the two studies end to end into a study folder",
                       description=__doc__.split("\n\n")[2])
    p.add_argument("name", choices=sorted(STUDIES), help="which study")
    p.add_argument("-o", "--output", required=True, help="study folder to write (e.g. assets/studies/NAME)")
    p.add_argument("--work-dir", default="runs/studies", help="where run folders (adapters, checkpoints) go")
    p.add_argument("--configs-dir", default="configs", help="folder holding the study's configs")
    p.add_argument("--offline", action="store_true",
                   help="random-weight model of each config's shape + synthetic corpora of the real size (no hub)")
    p.add_argument("--steps", type=int, help="train.max_steps for every arm (default: the configs')")
    p.add_argument("--memory-budget", type=float, help="also train the QLoRA arm under this many GiB (15: a T4)")
    p.add_argument("--budget-steps", type=int, help="steps of the memory-budget run (default: as the others)")
    p.add_argument("--gpus", type=_gpu_list, metavar="I,J,...",
                   help="train the arms (and the memory-budget run) side by side, one per GPU (e.g. 0,1)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override for every arm (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=lambda a: run(a.name, a.output, a.work_dir, offline=a.offline, overrides=a.set,
                                      steps=a.steps, budget_gib=a.memory_budget, budget_steps=a.budget_steps,
                                      configs_dir=a.configs_dir, progress=not a.no_progress, gpus=a.gpus) and 0)


def _gpu_list(text: str) -> list[int]:
    import argparse

    try:
        gpus = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: GPU indices separated by commas, e.g. 0,1") from None
    if not gpus or min(gpus) < 0 or len(set(gpus)) != len(gpus):
        raise argparse.ArgumentTypeError(f"{text!r}: distinct GPU indices >= 0, e.g. 0,1")
    return gpus
