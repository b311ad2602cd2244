from __future__ import annotations

import dataclasses

import pytest
import yaml

from qlora_lab.cli import main
from qlora_lab.config import Config, from_dict, load_config
from qlora_lab.errors import ConfigError

from .conftest import CONFIGS


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_parses(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert (cfg.model.name_or_path is None) != (cfg.model.random_init is None)


@pytest.mark.parametrize("qlora,lora", [
    ("llama2_7b_lima_qlora.yaml", "llama2_7b_lima_lora.yaml"),
    ("tiny_llama_qlora.yaml", "tiny_llama_lora.yaml"),
])
def test_lora_twin_differs_only_in_quantization(qlora, lora):
    a, b = load_config(CONFIGS / qlora), load_config(CONFIGS / lora)
    assert a.is_qlora and not b.is_qlora
    da, db = a.to_dict(), b.to_dict()
    diff = {s for s in da if da[s] != db[s]}
    assert diff == {"quant"}
    # and within quant, only the quantization keys (compute dtype choice stays the same)
    assert da["quant"]["bnb_4bit_compute_dtype"] == db["quant"]["bnb_4bit_compute_dtype"]


def test_study_settings():
    falcon = load_config(CONFIGS / "falcon7b_oasst1_qlora.yaml")
    assert falcon.model.name_or_path == "tiiuae/falcon-7b"
    assert falcon.train.learning_rate == 2e-4 and falcon.train.max_steps == 200
    assert falcon.quant.bnb_4bit_quant_type == "nf4" and falcon.quant.bnb_4bit_use_double_quant
    assert falcon.train.optim == "paged_adamw_32bit"
    llama = load_config(CONFIGS / "llama2_7b_lima_qlora.yaml")
    assert llama.model.name_or_path == "meta-llama/Llama-2-7b-hf"
    g = llama.generation
    assert (g.max_new_tokens, g.temperature, g.top_p, g.do_sample) == (500, 0.8, 0.9, True)
    assert llama.data.format == "lima_eot"


def test_overrides_parse_values_as_yaml():
    cfg = load_config(CONFIGS / "tiny_llama_qlora.yaml", ["train.max_steps=7", "lora.target_modules=[q_proj, v_proj]",
                                                          "quant.bits=null"])
    assert cfg.train.max_steps == 7
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert not cfg.is_qlora
    assert cfg.set("train.learning_rate=1e-3").train.learning_rate == 1e-3


def test_frozen():
    cfg = load_config(CONFIGS / "tiny_llama_qlora.yaml")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.max_steps = 3


@pytest.mark.parametrize("override,needle", [
    ("lora.r=0", "lora.r: must be an integer >= 1 (got 0)"),
    ("train.learning_rate=-1e-4", "train.learning_rate"),
    ("train.max_steps=ten", "train.max_steps: must be an integer"),
    ("quant.bits=8", "quant.bits: must be one of 4, null"),
    ("train.optim=sgd", "allowed" if False else "train.optim: must be one of"),
    ("lora.rank=8", "lora.rank: unknown key; allowed: r, lora_alpha"),
    ("optimizer.lr=1", "unknown section 'optimizer'"),
    ("data.max_length=0", "data.max_length: must be an integer >= 8"),
    ("model.random_init=gpt5", "model.random_init: must be one of"),
    ("quant.bnb_4bit_quant_storage=int4",
     "quant.bnb_4bit_quant_storage: must be one of auto, uint8, bfloat16, float16, float32 (got 'int4')"),
])
def test_bad_values_name_key_and_allowed(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(CONFIGS / "tiny_llama_qlora.yaml", [override])
    assert needle in str(e.value)


def test_error_names_file_and_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  random_init: tiny-llama\nlora:\n  r: 16\n  alpah: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value).startswith(f"{p}:5: lora.alpah: unknown key")


def test_model_needs_exactly_one_source():
    with pytest.raises(ConfigError, match="exactly one of name_or_path"):
        from_dict({"model": {"name_or_path": "x", "random_init": "tiny-llama"}})
    with pytest.raises(ConfigError, match="exactly one of name_or_path"):
        from_dict({"model": {}})


def test_schema_does_not_look_at_the_machine(monkeypatch):
    """Whether bitsandbytes or FSDP is here is plan.check_machine's (tests/unit/test_plan.py), not the schema's."""
    import qlora_lab.quant as quant

    monkeypatch.setattr(quant, "bitsandbytes_problem", lambda: "bitsandbytes is not installed")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    cfg = from_dict({"model": {"random_init": "tiny-llama"}, "quant": {"bits": 4, "bnb_4bit_quant_storage": "uint8"}})
    assert cfg.is_qlora and cfg.quant.bnb_4bit_quant_storage == "uint8"


def test_where_names_the_file_and_line_of_a_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  random_init: tiny-llama\nquant:\n  bits: 4\n")
    cfg = load_config(p, ["quant.bnb_4bit_quant_type=fp4"])
    assert cfg.where("quant", "bits") == f"{p}:4" and cfg.where("quant", "bnb_4bit_quant_type") == "--set"
    assert cfg.where("train", "seed") == str(p)  # not in the file: the file
    assert cfg == load_config(p, ["quant.bnb_4bit_quant_type=fp4"]) and "locations" not in cfg.to_dict()


def test_cli_bad_config_exit_2_one_line_no_traceback(tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"model": {"random_init": "tiny-llama"}, "lora": {"r": -1}}))
    assert main(["train", str(p)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [l for l in err.splitlines() if l.strip()]
    assert lines == [f"qlora-lab: error: {p}:1: lora.r: must be an integer >= 1 (got -1)"] or "lora.r" in lines[-1]


def test_cli_config_prints_resolved(capsys):
    assert main(["config", str(CONFIGS / "tiny_llama_qlora.yaml"), "--set", "train.max_steps=3"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["train"]["max_steps"] == 3


def test_cli_bad_quant_storage_exit_2_names_file_and_line(tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  random_init: tiny-llama\nquant:\n  bits: 4\n  bnb_4bit_quant_storage: int8\n")
    assert main(["config", str(p)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"{p}:5: quant.bnb_4bit_quant_storage: must be one of auto, uint8" in err

