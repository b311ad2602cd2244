"""`qlora-lab merge` on the tiny random-weight Llama and Falcon: real (short) QLoRA runs, real adapters.

Each architecture trains once per session (3 steps at a high learning rate, so the adapter moves the
logits) and is merged once (conftest.py's qlora_runs, shared with the GGUF tests); the tests read what was written.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qlora_lab.cli import main
from qlora_lab.config import load_config
from qlora_lab.merge import CHECK_PROMPTS, merge

@pytest.fixture(scope="module")
def runs(qlora_runs):
    """{arch: (run folder, merged folder, merge.json)} for the tiny Llama and Falcon QLoRA runs (conftest.py)."""
    return qlora_runs


def _reference_logits(run: Path) -> list[torch.Tensor]:
    """The 16-bit base in fp32 with the adapter unmerged (peft), independently of merge.py."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_lab.model import model_path

    path = model_path(load_config(run / "config.yaml"))
    tok = AutoTokenizer.from_pretrained(path)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), run / "adapter")
    with torch.no_grad():
        return [model(**tok(p, return_tensors="pt")).logits[0] for p in CHECK_PROMPTS]


@pytest.mark.parametrize("arch", ["llama", "falcon"])
def test_merged_checkpoint_is_plain_and_recorded(runs, arch):
    from safetensors import safe_open

    run, merged, record = runs[arch]
    cfg = json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["dtype"] == "bfloat16" and cfg["model_type"] == arch
    for f in ("model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "merge.json"):
        assert (merged / f).is_file(), f
    with safe_open(str(merged / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
        assert not any("lora" in k for k in f.keys())
    on_disk = json.loads((merged / "merge.json").read_text())
    assert on_disk["run"] == str(run.resolve()) and on_disk["dtype"] == "bfloat16" and on_disk["method"] == "qlora"
    import hashlib

    assert on_disk["adapter_sha256"] == hashlib.sha256((run / "adapter/adapter_model.safetensors").read_bytes()).hexdigest()
    assert on_disk["base_random_init"]["preset"] == f"tiny-{arch}"
    c = on_disk["checks"]
    assert c["compared_in"] == "float32 on cpu" and c["prompts"] == list(CHECK_PROMPTS)
    assert c["adapter_effect"]["max_abs_logit_diff"] > 0.1  # the adapter is not a no-op: the checks mean something
    assert c["merge"]["max_abs_logit_diff"] < 1e-4 and c["merge"]["top1_agreement"] == 1.0
    assert c["saved"]["max_abs_logit_diff"] < 0.1  # bf16 rounding of every weight
    assert c["qlora_gap"]["max_abs_logit_diff"] > 0 and c["qlora_gap"]["4bit"].startswith("nf4")
    assert not [p for p in merged.parent.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_merged_checkpoints_match_peft_without_peft_or_bitsandbytes(runs, tmp_path):
    """Loaded in a process where peft and bitsandbytes are not installed, each answers like base + adapter."""
    from safetensors.torch import load_file

    site = tmp_path / "site"  # the venv's packages minus peft and bitsandbytes
    site.mkdir()
    for d in {Path(p) for p in sys.path if p.endswith("site-packages")}:
        for entry in d.iterdir():
            if not entry.name.lower().startswith(("peft", "bitsandbytes", "qlora")) and not (site / entry.name).exists():
                (site / entry.name).symlink_to(entry)
    code = (
        "import sys, importlib.util, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "from safetensors.torch import save_file\n"
        "assert importlib.util.find_spec('peft') is None and importlib.util.find_spec('bitsandbytes') is None\n"
        "for d, out in zip(sys.argv[1::2], sys.argv[2::2]):\n"
        "    tok = AutoTokenizer.from_pretrained(d); m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)\n"
        "    assert not hasattr(m.config, 'quantization_config')\n"
        f"    prompts = {list(CHECK_PROMPTS)!r}\n"
        "    with torch.no_grad():\n"
        "        save_file({str(i): m(**tok(p, return_tensors='pt')).logits[0].contiguous()\n"
        "                   for i, p in enumerate(prompts)}, out)\n")
    args = [str(x) for arch in runs for x in (runs[arch][1], tmp_path / f"{arch}.safetensors")]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(site), HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-S", "-c", code, *args], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    for arch, (run, _, record) in runs.items():
        got = load_file(tmp_path / f"{arch}.safetensors")
        ref = _reference_logits(run)
        diff = max(float((got[str(i)] - x).abs().max()) for i, x in enumerate(ref))
        assert diff <= record["checks"]["saved"]["max_abs_logit_diff"] + 1e-5, arch
        assert all(torch.equal(got[str(i)].argmax(-1), x.argmax(-1)) for i, x in enumerate(ref)), arch


def test_cli_fp16_and_another_copy_of_the_base(runs, tmp_path, capsys):
    """--base names a copy (the same random weights, written by make-model): same merge as the default."""
    from safetensors.torch import load_file

    from qlora_lab.presets import make_model

    run, merged, _ = runs["llama"]
    copy = make_model("tiny-llama", tmp_path / "copy")
    (copy / "tokenizer.model").write_bytes(b"a SentencePiece model")  # transformers does not re-save it
    rc = main(["merge", str(run), "-o", str(tmp_path / "m16"), "--base", str(copy), "--dtype", "fp16"])
    out = capsys.readouterr().out
    assert rc == 0 and "largest logit difference" in out and "4-bit model the run trained" in out
    rec = json.loads((tmp_path / "m16/merge.json").read_text())
    assert rec["dtype"] == "float16" and rec["base"] == str(copy) and rec["base_source"] == "--base"
    assert (tmp_path / "m16/tokenizer.model").read_bytes() == b"a SentencePiece model"  # export-gguf reads it
    a, b = load_file(tmp_path / "m16/model.safetensors"), load_file(merged / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].dtype == torch.float16 for k in a)
    # The same fp32 merge, rounded to fp16 here and bf16 there: equal to bf16's precision.
    assert all(torch.allclose(a[k].float(), b[k].float(), rtol=1e-2, atol=1e-3) for k in a)


def test_lora_run_has_no_quantization_gap(runs, tmp_path):
    run, _, _ = runs["llama"]
    lora = tmp_path / "lora_run"
    shutil.copytree(run, lora, ignore=shutil.ignore_patterns("checkpoints"))
    cfg = lora / "config.yaml"
    cfg.write_text(cfg.read_text().replace("bits: 4", "bits: null"))
    rec = merge(lora, tmp_path / "m")
    assert rec["method"] == "lora" and "skipped" in rec["checks"]["qlora_gap"]


def test_help():
    for verb in ("merge", "export-gguf"):
        with pytest.raises(SystemExit) as e:
            main([verb, "--help"])
        assert e.value.code == 0


# ----------------------------------------------------------------------------- bad input

def _bad_base(tmp_path, kind: str) -> Path:
    from qlora_lab.presets import make_model

    if kind == "falcon":
        return make_model("tiny-falcon", tmp_path / "falcon")
    if kind == "folder":  # a folder, but no model in it
        (tmp_path / "folder").mkdir()
        return tmp_path / "folder"
    d = Path(shutil.copytree(make_model("tiny-llama", tmp_path / "llama"), tmp_path / kind))
    cfg = json.loads((d / "config.json").read_text())
    if kind == "4bit":
        cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    else:  # another size
        cfg.update(hidden_size=128, intermediate_size=256)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("case,fragments", [
    ("no-adapter", ["no adapter", "adapter_model.safetensors"]),
    ("4bit-base", ["--base", "quantized", "bitsandbytes", "16-bit"]),
    ("falcon-base", ["--base", "falcon", "the run trained a llama"]),
    ("smaller-base", ["--base", "layers.0", "another size"]),
    ("folder-base", ["--base", "not a model folder", "config.json"]),
    ("output-holds-files", ["-o", "holds files"]),
    ("not-a-run", ["not a run folder"]),
])
def test_bad_input_one_line_exit_2_nothing_written(runs, tmp_path, capsys, case, fragments):
    run, _, _ = runs["llama"]
    out = tmp_path / "out" / "merged"
    args = ["merge", str(run), "-o", str(out)]
    if case == "no-adapter":
        bare = tmp_path / "bare"
        bare.mkdir()
        shutil.copy(run / "config.yaml", bare)
        args[1] = str(bare)
    elif case == "not-a-run":
        args[1] = str(tmp_path)
    elif case == "output-holds-files":
        out.mkdir(parents=True)
        (out / "keep.txt").write_text("mine")
    else:
        args += ["--base", str(_bad_base(tmp_path, case.split("-")[0]))]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    capsys.readouterr()  # the setup's progress bars
    rc = main(args)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("qlora-lab: error:"), err
    assert all(f in err for f in fragments), err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written, no temp folder
    if case == "output-holds-files":
        assert (out / "keep.txt").read_text() == "mine"
