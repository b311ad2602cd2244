"""Answers to a prompt set, with a fixed generation config and seed, so a table can be regenerated.

A target is what answers: a run folder (its base model + its adapter), or a base model alone (a
config YAML, a random-init preset name, a hub id or a model folder). Targets that share a base model
share one load of it: the base answers first, then each adapter is attached, used and removed.

Output rows (one JSON object per prompt and target)::

    {"model": "tiny_llama_qlora", "adapter": "runs/tiny_llama_qlora/adapter", "base_model": "...",
     "method": "qlora", "prompt_set": "lima_examples", "prompt_id": "...", "level": "...",
     "prompt": "...", "answer": "...", "new_tokens": 37, "stopped": "eos", "generation": {...}}
"""
from __future__ import annotations

import dataclasses
import gc
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from .config import Config, GenerationConfig, from_dict, load_config
from .console import progress_bars
from .errors import UserError
from .presets import PRESETS
from .prompts import PromptSet, load_prompts
from .fileio import atomic_write, check_adapter
from .runs import RunFolder

log = logging.getLogger("qlora_lab.generate")

BASE_LABEL = "base"


@dataclass(frozen=True)
class Target:
    label: str                      # column name in tables
    cfg: Config                     # whose model/quant sections say how to load the base
    adapter: Optional[Path] = None  # None: the base model alone
    run_dir: Optional[Path] = None

    @property
    def base_key(self) -> str:
        d = self.cfg.to_dict()
        return json.dumps({"model": d["model"], "quant": d["quant"]}, sort_keys=True)


# ----------------------------------------------------------------------------- targets

def run_config(run_dir) -> Config:
    return RunFolder.open(run_dir).config()  # UserError if missing, not a run, or its config.yaml is damaged


def resolve_target(spec, config: Optional[Config] = None) -> Target:
    """A run folder, a config YAML, a preset name, or a hub id / model folder -> Target."""
    s = str(spec)
    p = Path(s)
    if p.is_dir() and ((p / "config.yaml").exists() or (p / "adapter").exists()):
        cfg = run_config(p)
        adapter = p / "adapter"
        if not adapter.is_dir():
            raise UserError(f"{p}: run has no adapter/ folder (training did not finish?)")
        check_adapter(adapter)  # now, before any model loads
        return Target(label=p.resolve().name, cfg=cfg, adapter=adapter, run_dir=p)
    if p.is_file() and p.suffix in (".yaml", ".yml"):
        return Target(label=BASE_LABEL, cfg=load_config(p))
    raw = (config or Config()).to_dict()
    if config is None:  # plain 16-bit base unless a config says how to quantize it
        raw["quant"]["bits"] = None
    if s in PRESETS:
        raw["model"].update(random_init=s, name_or_path=None)
        return Target(label=BASE_LABEL, cfg=from_dict(raw, source=f"preset {s}"))
    if p.is_dir() and (p / "config.json").is_file():
        raw["model"].update(name_or_path=str(p), random_init=None)
        return Target(label=BASE_LABEL, cfg=from_dict(raw, source=str(p)))
    if p.exists():
        raise UserError(f"{p}: neither a run folder (config.yaml) nor a model folder (config.json)")
    if s.count("/") == 1 and not s.startswith((".", "/")):  # hub id: owner/name
        raw["model"].update(name_or_path=s, random_init=None)
        return Target(label=BASE_LABEL, cfg=from_dict(raw, source=s))
    raise UserError(f"{s}: not found; give a run folder, a config YAML, a model folder, a hub id "
                    f"(owner/name) or a preset ({', '.join(PRESETS)})")


def targets_for(specs: Sequence, include_base: bool = False, config: Optional[Config] = None) -> list[Target]:
    """Targets for the given specs; include_base adds the first run's base model (column 'base')."""
    if not specs:
        raise UserError("give at least one run folder or model")
    targets = [resolve_target(s, config) for s in specs]
    if include_base and not any(t.adapter is None for t in targets):
        first = next(t for t in targets if t.adapter is not None)
        targets.insert(0, Target(label=BASE_LABEL, cfg=first.cfg))
    for rename in (lambda i, t: f"{t.label} ({t.run_dir.resolve().parent.name if t.run_dir else i + 1})",
                   lambda i, t: f"{t.label} [{i + 1}]"):  # tell same-named runs apart: parent, then position
        labels = [t.label for t in targets]
        targets = [dataclasses.replace(t, label=rename(i, t)) if labels.count(t.label) > 1 else t
                   for i, t in enumerate(targets)]
    return targets


def generation_config(targets: Sequence[Target], config: Optional[Config] = None,
                      overrides: Sequence[str] = ()) -> GenerationConfig:
    """One generation config for all targets (a fair table): --config's, else the first target's."""
    cfg = config or targets[0].cfg
    if overrides:
        bad = [o for o in overrides if not o.strip().startswith("generation.")]
        if bad:
            raise UserError(f"--set {bad[0]}: only generation.* keys apply here")
        cfg = cfg.set(*overrides)
    return cfg.generation


# ----------------------------------------------------------------------------- generation

def _hf_generation_config(gen: GenerationConfig, tok):
    from transformers import GenerationConfig as HFGen

    kw = dict(max_new_tokens=gen.max_new_tokens, do_sample=gen.do_sample, num_beams=gen.num_beams,
              repetition_penalty=gen.repetition_penalty, eos_token_id=tok.eos_token_id,
              pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
              bos_token_id=tok.bos_token_id)
    if gen.do_sample:
        kw.update(temperature=gen.temperature, top_p=gen.top_p)
    return HFGen(**kw)


def answer(model, tok, prompts: PromptSet, gen: GenerationConfig, fmt: str, progress: bool = True,
           desc: str = "generate") -> list[dict]:
    """Answers of one loaded model to every prompt: [{prompt_id, answer, new_tokens, stopped}]."""
    import torch
    from tqdm.auto import tqdm
    from transformers import set_seed

    from .data.formats import encode_prompt

    hf_gen = _hf_generation_config(gen, tok)
    items = list(prompts)
    model.eval()
    device = next(model.parameters()).device
    out = []
    bar = tqdm(total=len(items), desc=desc, unit="prompt", disable=not (progress and progress_bars()), leave=False)
    for start in range(0, len(items), gen.batch_size):
        batch = items[start:start + gen.batch_size]
        enc = _left_padded([encode_prompt(p.prompt, fmt, tok) for p in batch], hf_gen.pad_token_id, device)
        # Seeded per batch: the same config and batch size give the same table.
        set_seed(gen.seed + start)
        with torch.inference_mode():
            ids = model.generate(**enc, generation_config=hf_gen)
        new = ids[:, enc["input_ids"].shape[1]:]
        for p, row in zip(batch, new):
            row = row.tolist()
            stopped = "length"
            if tok.eos_token_id is not None and tok.eos_token_id in row:
                row = row[:row.index(tok.eos_token_id)]
                stopped = "eos"
            while row and row[-1] == hf_gen.pad_token_id:
                row.pop()
            text = tok.decode(row, skip_special_tokens=True)
            for marker in _TURN_MARKERS.get(fmt, ()):  # a base model goes on to write the next turn
                if marker in text:
                    text, stopped = text[:text.index(marker)], "turn"
            out.append({"prompt_id": p.id, "answer": text.strip(), "new_tokens": len(row), "stopped": stopped})
        bar.update(len(batch))
    bar.close()
    return out


_TURN_MARKERS = {"guanaco": ("### Human:",)}


def _left_padded(seqs: list[list[int]], pad_id: int, device) -> dict:
    """Prompts padded on the left, so every answer starts at the same position. The ids are
    exactly those of training (`encode_prompt`: same text, same BOS handling)."""
    import torch

    n = max(len(s) for s in seqs)
    ids = torch.tensor([[pad_id] * (n - len(s)) + s for s in seqs], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (n - len(s)) + [1] * len(s) for s in seqs], dtype=torch.long, device=device)
    return {"input_ids": ids, "attention_mask": mask}


def run(targets: Sequence[Target], prompts, gen: GenerationConfig, out=None,
        progress: bool = True) -> list[dict]:
    """Answers of every target to every prompt. Writes JSONL to `out` (atomically) when given."""
    from .model import load_adapter, load_model

    ps = load_prompts(prompts)
    rows = []
    groups: dict[str, list[Target]] = {}
    for t in targets:
        groups.setdefault(t.base_key, []).append(t)
    for members in groups.values():
        members.sort(key=lambda t: t.adapter is not None)  # the base answers before adapters touch it
        model, tok, summary = load_model(members[0].cfg)
        for t in members:
            fmt = t.cfg.data.format
            m = load_adapter(model, t.adapter) if t.adapter is not None else model
            answers = answer(m, tok, ps, gen, fmt, progress=progress, desc=t.label)
            by_id = ps.by_id()
            for a in answers:
                p = by_id[a["prompt_id"]]
                rows.append({
                    "model": t.label, "adapter": str(t.adapter) if t.adapter else None,
                    "run_dir": str(t.run_dir) if t.run_dir else None,
                    "base_model": summary.get("source"), "method": t.cfg.method if t.adapter else None,
                    "quantization": summary.get("quantization"), "format": fmt,
                    "prompt_set": ps.name, "prompt_id": p.id, "level": p.level, "prompt": p.prompt,
                    "answer": a["answer"], "new_tokens": a["new_tokens"], "stopped": a["stopped"],
                    "generation": dataclasses.asdict(gen),
                    **({"expected": p.expected} if p.expected is not None else {}),
                })
            if t.adapter is not None:
                model = m.unload()  # take the adapter's layers out again; the base is unchanged
        del model
        _free()
    order = {t.label: i for i, t in enumerate(targets)}
    rows.sort(key=lambda r: order[r["model"]])  # stable: prompt order kept within a target
    if out is not None:
        atomic_write(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return rows


def _free() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass
