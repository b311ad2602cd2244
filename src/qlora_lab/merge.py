"""Merge a run's LoRA adapter into its 16-bit base: a plain transformers checkpoint to serve anywhere.

    DIR/
      config.json, model.safetensors, generation_config.json, tokenizer files
                    loadable with AutoModelForCausalLM.from_pretrained; no peft, no bitsandbytes
      merge.json    run, adapter (sha256), base, dtype, and the checks below

The update is added in fp32 (W + scale * B @ A) and the sum is cast to the target dtype once: adding
a small update to a bf16 weight in bf16 rounds much of it away.

The checks run every model on the same short prompts, all in fp32, and report the largest absolute
logit difference over every position, plus how often the greedy next token agrees:
  adapter_effect  base + adapter vs the base alone: how much there is to merge (a no-op adapter would
             make every check below pass trivially)
  merge      merged weights (fp32) vs the same base with the adapter unmerged (peft): the merge maths
  cast       the checkpoint as written (DIR, in the target dtype) vs the merged fp32 weights
  saved      the checkpoint as written vs the unmerged reference: what serving DIR changes
  qlora_gap  the checkpoint as written vs the 4-bit base + adapter the run trained (QLoRA runs, where
             bitsandbytes 4-bit runs): the quantization gap of serving a 16-bit merge
"""
from __future__ import annotations

import gc
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from .errors import UserError
from .runs import RunFolder, atomic_write_json

DTYPES = {"bf16": "bfloat16", "fp16": "float16"}
CHECK_PROMPTS = (
    "The capital of France is",
    "Write a short poem about the sea.\n",
    "def fibonacci(n):",
    "Question: what does QLoRA quantize?\nAnswer:",
)
RECORD = "merge.json"
ADAPTER_FILE = "adapter_model.safetensors"


def merge(run_dir, out_dir, base: str | None = None, dtype: str = "bf16") -> dict:
    """Write the merged checkpoint to out_dir (atomically: a temp folder beside it, renamed at the end)."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: allowed: {', '.join(DTYPES)}")
    run = RunFolder.open(run_dir)
    adapter = run.adapter_dir / ADAPTER_FILE
    if not adapter.is_file():
        raise UserError(f"{run.path}: no adapter ({adapter.relative_to(run.path)}); "
                        "did training finish?")
    out = _check_output(out_dir)
    cfg = run.config()
    base_cfg = _base_config(cfg, base)
    path, n_params = _check_base(base_cfg, base, run, adapter)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would hide the checkpoint from a server's user
    try:
        record = _merge_into(tmp, cfg, base_cfg, path, run, adapter, dtype, _device(n_params))
        record["base_source"] = "--base" if base else "the run's config"
        atomic_write_json(tmp / RECORD, record)
        if out.exists():
            out.rmdir()  # empty (checked above); rename needs the name free
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return record


# ----------------------------------------------------------------------------- checks before any work

def _check_output(out_dir) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"-o {out}: is a file; give a new or empty folder")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"-o {out}: folder holds files; give a new or empty folder")
    return out


def _base_config(cfg, base: str | None):
    """The run's config with its model section naming the 16-bit base to merge into."""
    if base is None:
        return cfg
    from dataclasses import replace

    return cfg.replace(model=replace(cfg.model, name_or_path=str(base), random_init=None, revision=None))


def _check_base(base_cfg, base, run, adapter: Path) -> tuple[str, int]:
    """(folder or hub id, parameter count) of the base, once it is known to be 16-bit and of the
    adapter's architecture and size."""
    from transformers import AutoConfig

    from .model import model_path

    label = f"--base {base}" if base else f"base {base_cfg.model.random_init or base_cfg.model.name_or_path}"
    local = Path(str(base or "")).expanduser()
    if base and (str(base).startswith((".", "/", "~")) or local.exists()) and not (local / "config.json").is_file():
        raise UserError(f"{label}: not a model folder (no config.json)")
    path = model_path(base_cfg)
    try:
        hf = AutoConfig.from_pretrained(path, revision=base_cfg.model.revision,
                                        trust_remote_code=base_cfg.model.trust_remote_code)
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{label}: cannot load its config: {first}") from None
    q = getattr(hf, "quantization_config", None)
    if q:
        kind = q.get("quant_method", "quantized") if isinstance(q, dict) else getattr(q, "quant_method", "quantized")
        raise UserError(f"{label}: a quantized checkpoint ({kind}); merge needs the 16-bit base weights")
    trained = (run.read_json("model_summary.json") or {}).get("model_type")
    if trained and hf.model_type != trained:
        raise UserError(f"{label}: a {hf.model_type} model; the run trained a {trained}")
    return path, _check_shapes(hf, adapter, label)


def _check_shapes(hf_config, adapter: Path, label: str) -> int:
    """Every adapted layer exists in the base with the in/out sizes the adapter was trained on.
    Returns the base's parameter count."""
    import torch
    from safetensors import safe_open
    from torch import nn
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # shapes only, no memory
        skeleton = AutoModelForCausalLM.from_config(hf_config)
    modules = dict(skeleton.named_modules())
    with safe_open(str(adapter), framework="pt") as f:
        for key in f.keys():
            head, sep, tail = key.partition(".lora_")
            if not sep or not tail.startswith(("A.", "B.")):
                continue
            name = head.removeprefix("base_model.model.")
            m = modules.get(name)
            if not isinstance(m, nn.Linear):
                raise UserError(f"{label}: has no linear layer {name}, which the adapter changes "
                                "(another architecture?)")
            shape = f.get_slice(key).get_shape()
            want, have = (shape[1], m.in_features) if tail[0] == "A" else (shape[0], m.out_features)
            if want != have:
                raise UserError(f"{label}: layer {name} is {m.in_features} -> {m.out_features}; the adapter "
                                f"was trained on another size ({'in' if tail[0] == 'A' else 'out'} {want})")
    return sum(p.numel() for p in skeleton.parameters())


# ----------------------------------------------------------------------------- the merge

def _device(n_params: int):
    """The GPU when the fp32 base (4 bytes a parameter, 28 GB for a 7B) fits in its free memory, else the CPU."""
    import torch

    if torch.cuda.is_available() and torch.cuda.mem_get_info()[0] > 4.5 * n_params + 2 * 2**30:
        return torch.device("cuda")
    return torch.device("cpu")


def _merge_into(tmp: Path, cfg, base_cfg, path: str, run, adapter: Path, dtype: str, device) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from .model import fit_to_tokenizer, load_adapter, load_tokenizer
    from .presets import random_init_info

    target = getattr(torch, DTYPES[dtype])
    tok = load_tokenizer(base_cfg, path)
    model = AutoModelForCausalLM.from_pretrained(
        path, revision=base_cfg.model.revision, trust_remote_code=base_cfg.model.trust_remote_code,
        dtype=torch.float32, device_map={"": device})
    fit_to_tokenizer(model, tok)  # as training did (model.load_model)
    peft_model = load_adapter(model, run.adapter_dir)
    prompts = [tok(p, return_tensors="pt").input_ids.to(device) for p in CHECK_PROMPTS]

    unmerged = _logits(peft_model, prompts)
    with peft_model.disable_adapter():
        base_only = _logits(peft_model, prompts)
    merged = peft_model.merge_and_unload()  # fp32: W + scale * B @ A
    merged_fp32 = _logits(merged, prompts)
    merged.to(target)
    merged.config.dtype = target
    merged.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    _copy_sentencepiece(path, tmp)
    del merged, peft_model, model
    _free()

    # The checkpoint as written, read back the way a user would.
    saved_model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, device_map={"": device})
    saved = _logits(saved_model, prompts)
    del saved_model
    _free()

    checks = {
        "compared_in": f"float32 on {device.type}",
        "prompts": list(CHECK_PROMPTS),
        "positions": sum(p.shape[1] for p in prompts),
        "logit_scale": max(float(x.abs().max()) for x in unmerged),  # largest |logit|: the scale of a diff
        "adapter_effect": _compare(unmerged, base_only),  # how much there is to merge
        "merge": _compare(merged_fp32, unmerged),
        "cast": _compare(saved, merged_fp32),
        "saved": _compare(saved, unmerged),
        "qlora_gap": _qlora_gap(cfg, base_cfg, run, prompts, saved),
    }
    return {
        "run": str(run.path.resolve()),
        "adapter": str(adapter.resolve()),
        "adapter_sha256": _sha256(adapter),
        "method": cfg.method,
        "base": path,
        "base_random_init": random_init_info(path) if Path(path).is_dir() else None,
        "dtype": DTYPES[dtype],
        "merged_in": "float32",
        "checks": checks,
        "versions": _versions(),
    }


def describe(record: dict) -> list[str]:
    """What a user reads after a merge: the checks in a few lines."""
    c = record["checks"]

    def line(what, r):
        if "skipped" in r:
            return f"  {what}: skipped ({r['skipped']})"
        return (f"  {what}: {r['max_abs_logit_diff']:.2e}, greedy next token agrees at "
                f"{r['top1_agreement']:.0%} of positions")

    return [f"largest logit difference ({c['compared_in']}, {len(c['prompts'])} prompts, {c['positions']} "
            f"positions, logits up to {c['logit_scale']:.3g}):",
            line("adapter on vs off (what the merge must carry)", c["adapter_effect"]),
            line("merged fp32 vs base + adapter unmerged (peft)", c["merge"]),
            line(f"checkpoint as written ({record['dtype']}) vs base + adapter unmerged", c["saved"]),
            line("checkpoint as written vs the 4-bit model the run trained", c["qlora_gap"])]


def _qlora_gap(cfg, base_cfg, run, prompts, saved) -> dict:
    """The 4-bit model the run trained (its base in NF4 + adapter) vs the checkpoint as written."""
    from .model import load_adapter, load_model
    from .quant import bitsandbytes_problem

    if not cfg.is_qlora:
        return {"skipped": "a 16-bit LoRA run: it trained on no 4-bit model"}
    problem = bitsandbytes_problem()
    if problem:
        return {"skipped": f"4-bit layers cannot run here: {problem}"}
    model, _, summary = load_model(cfg.replace(model=base_cfg.model))
    model = load_adapter(model, run.adapter_dir)
    device = next(model.parameters()).device
    q = _logits(model, [p.to(device) for p in prompts])
    del model
    _free()
    return {**_compare(saved, q), "4bit_compute_dtype": summary["compute_dtype"],
            "4bit": f"{summary['quantization']}, double quant {summary['double_quant']}"}


def _logits(model, prompts) -> list:
    import torch

    model.eval()
    with torch.no_grad():
        return [model(input_ids=ids).logits[0].float().cpu() for ids in prompts]


def _compare(a, b) -> dict:
    diff = max(float((x - y).abs().max()) for x, y in zip(a, b))
    same = sum(int((x.argmax(-1) == y.argmax(-1)).sum()) for x, y in zip(a, b))
    total = sum(x.shape[0] for x in a)
    return {"max_abs_logit_diff": diff, "top1_agreement": same / total}


def _copy_sentencepiece(base_path: str, out: Path) -> None:
    """Keep the SentencePiece model (Llama-2's tokenizer.model) beside the merge: GGUF export reads it."""
    src = Path(base_path) / "tokenizer.model"
    if src.is_file() and not (out / "tokenizer.model").exists():
        shutil.copyfile(src, out / "tokenizer.model")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _versions() -> dict:
    import peft
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
