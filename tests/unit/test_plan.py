"""plan.plan: the one place where dtype, kernels, recomputation and micro-batch are chosen; its machine checks."""
from __future__ import annotations

import pytest

from qlora_lab import plan as planner
from qlora_lab.config import load_config
from qlora_lab.errors import ConfigError
from qlora_lab.presets import model_config

from .conftest import CONFIGS


def test_cpu_plan_is_plain_and_explained():
    cfg = load_config(CONFIGS / "tiny_llama_qlora.yaml")
    p = planner.plan(cfg, model_config("tiny-llama"))
    assert p.device == "cpu" and p.compute_dtype == "float32" and p.kernels == "none"
    assert p.recompute_layers == 0
    assert p.optim == "adamw_torch"  # paged optimizers need CUDA
    assert p.reasons and all(isinstance(r, str) for r in p.reasons)


def test_forced_checkpointing_is_kept():
    cfg = load_config(CONFIGS / "tiny_llama_qlora.yaml", ["train.gradient_checkpointing=true"])
    p = planner.plan(cfg, model_config("tiny-llama"))
    assert p.recompute_layers == 2  # every layer of the tiny model
    off = planner.plan(cfg.set("train.gradient_checkpointing=false"), model_config("tiny-llama"))
    assert off.recompute_layers == 0


def test_plan_json_keeps_its_keys():
    """plan.json is read by users and studies.py: the same keys, in the same order; recompute_layers is
    written as gradient_checkpointing (any layer) and checkpoint_layers (how many)."""
    cfg = load_config(CONFIGS / "tiny_llama_qlora.yaml", ["train.gradient_checkpointing=true"])
    d = planner.plan(cfg, model_config("tiny-llama")).to_dict()
    assert list(d) == ["device", "device_name", "compute_dtype", "mixed_precision", "gradient_checkpointing",
                       "kernels", "fused_lora", "optim", "per_device_train_batch_size",
                       "gradient_accumulation_steps", "memory_budget_gib", "checkpoint_layers", "offload_checkpoints",
                       "est_peak_gib", "reasons"]
    assert d["gradient_checkpointing"] is True and d["checkpoint_layers"] == 2
    d = planner.plan(cfg.set("train.gradient_checkpointing=false"), model_config("tiny-llama")).to_dict()
    assert d["gradient_checkpointing"] is False and d["checkpoint_layers"] == 0


def test_every_choice_returns_its_value_and_reason(monkeypatch):
    """One _choose_* per decision, each (value, reason): reason a line for plan.json, None if nothing to say."""
    cfg = load_config(CONFIGS / "tiny_llama_qlora.yaml")
    mc = model_config("tiny-llama")
    h100 = ("NVIDIA H100", 79.2)
    choices = {
        "compute_dtype": planner._choose_compute_dtype("auto", False),
        "memory_budget": planner._choose_memory_budget(None, h100),
        "kernels": planner._choose_kernels("auto", mc, False),
        "fused_lora": planner._choose_fused_lora("auto"),
        "process_batch": planner._choose_process_batch(4, 4, 2),
        "recomputation": planner._choose_recomputation(cfg, mc, False, 4, 4, None, "none", True),
        "optimizer": planner._choose_optimizer("paged_adamw_32bit", False),
    }
    assert {n.removeprefix("_choose_") for n in dir(planner) if n.startswith("_choose_")} == set(choices)
    for name, c in choices.items():
        assert isinstance(c, tuple) and len(c) == 2, name
        assert isinstance(c[1], str) and c[1], name
    assert choices["compute_dtype"] == ("float32", "compute_dtype=float32: no CUDA: float32 on the CPU "
                                                   "(bf16 matmuls are emulated there)")
    assert choices["memory_budget"][0] == pytest.approx(0.9 * 79.2)
    assert choices["process_batch"][0] == (4, 2)
    assert choices["recomputation"][0] == (0, 4, 4, None, False)
    assert choices["optimizer"][0] == "adamw_torch"
    # Nothing decided, nothing said: no budget on a CPU, one process, the optimizer as configured.
    assert planner._choose_memory_budget(None, None) == (None, None)
    assert planner._choose_process_batch(4, 4, 1) == ((4, 4), None)
    assert planner._choose_optimizer("adamw_torch", False) == ("adamw_torch", None)


@pytest.mark.parametrize("preset", ["llama2-7b", "falcon-7b"])
def test_forced_recomputation_on_a_gpu_is_estimated(preset):
    cfg = load_config(CONFIGS / "tiny_llama_qlora.yaml", ["train.gradient_checkpointing=true", "data.max_length=512"])
    mc = model_config(preset)
    (k, micro, accum, est, offload), why = planner._choose_recomputation(cfg, mc, True, 8, 1, 72.0, "liger", True)
    assert (k, micro, accum) == (mc.num_hidden_layers, 8, 1) and 0 < est < 72.0
    assert why.startswith("gradient_checkpointing=on: set in config")


def test_auto_recomputation_on_a_gpu_takes_the_fastest_fit():
    """The plan owns the split: memory.fastest_fit's micro-batch and layer count, the same global batch."""
    from qlora_lab.memory import fastest_fit

    cfg = load_config(CONFIGS / "tiny_llama_qlora.yaml", ["data.max_length=512", "lora.r=64",
                                                          "train.gradient_checkpointing=auto"])
    mc = model_config("llama2-7b")
    (k, micro, accum, est, offload), why = planner._choose_recomputation(cfg, mc, True, 8, 1, 15.0, "liger", False)
    assert (micro, k, est) == fastest_fit(mc, 4, 512, 8, 15.0, lora_r=64, fused_ce=True, fused_lora=False)[:3]
    assert 0 < k <= mc.num_hidden_layers and micro * accum == 8 and est <= 15.0
    assert why.startswith("gradient_checkpointing=") and f"micro-batch {micro} x {accum} accumulation" in why


def test_fp16_qlora_is_planned_with_its_fp32_embeddings_head_and_residual_stream():
    """QLoRA on a T4 computes in fp16 with fp32 embeddings, norms and head (model._prepare_kbit): the plan
    recomputes more layers for it than for bf16; 16-bit LoRA keeps fp16 everywhere and is planned as before."""
    from qlora_lab.memory import fastest_fit

    mc = model_config("llama2-7b")
    sets = ["data.max_length=512", "lora.r=64", "train.gradient_checkpointing=auto"]
    qlora = load_config(CONFIGS / "tiny_llama_qlora.yaml", sets)
    (k16, _, _, est16, _), _ = planner._choose_recomputation(qlora, mc, True, 8, 1, 15.0, "liger", True, "float16")
    (kbf, _, _, _, _), _ = planner._choose_recomputation(qlora, mc, True, 8, 1, 15.0, "liger", True, "bfloat16")
    assert k16 > kbf and est16 <= 15.0
    lora = load_config(CONFIGS / "tiny_llama_lora.yaml", sets)
    (k, micro, _, est, _), _ = planner._choose_recomputation(lora, mc, True, 8, 1, 30.0, "liger", True, "float16")
    want = fastest_fit(mc, None, 512, 8, 30.0, lora_r=64, fused_ce=True, fused_lora=True, fused_mlp=True)
    assert (micro, k, est) == want[:3]


def test_fsdp_is_named_in_the_plan(monkeypatch):
    cfg = load_config(CONFIGS / "tiny_llama_qlora.yaml", ["train.gradient_accumulation_steps=2"])
    p = planner.plan(cfg, model_config("tiny-llama"))
    assert not any(r.startswith("fsdp") for r in p.reasons) and p.fused_lora
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    p = planner.plan(cfg, model_config("tiny-llama"))
    line = next(r for r in p.reasons if r.startswith("fsdp"))
    assert "sharded over 2 GPUs" in line and "stored as float32" in line  # the CPU's compute dtype
    assert (p.per_device_train_batch_size, p.gradient_accumulation_steps) == (4, 1)  # same global batch
    assert not p.fused_lora and any(r.startswith("fused_lora=off: FSDP") for r in p.reasons)
    # bitsandbytes' optimizers hide their states from FSDP's gather: a checkpoint could not be resumed.
    paged = planner.plan(cfg.set("train.optim=paged_adamw_32bit"), model_config("tiny-llama"))
    assert paged.optim == "adamw_torch" and any(r.startswith("optim=adamw_torch: under FSDP") for r in paged.reasons)


# ----------------------------------------------------------------------------- machine checks (not the schema's)

def test_4bit_needs_bitsandbytes_backend(monkeypatch, tmp_path):
    import qlora_lab.quant as quant

    p = tmp_path / "c.yaml"
    p.write_text("model:\n  random_init: tiny-llama\nquant:\n  bits: 4\n")
    cfg = load_config(p)  # the schema is fine on any machine
    monkeypatch.setattr(quant, "bitsandbytes_problem", lambda: "bitsandbytes is not installed")
    with pytest.raises(ConfigError, match=r":4: quant.bits: 4 needs bitsandbytes"):
        planner.check_machine(cfg)
    planner.check_machine(cfg.set("quant.bits=null"))  # 16-bit LoRA needs no bitsandbytes


def test_uint8_storage_is_refused_under_fsdp(monkeypatch, tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  random_init: tiny-llama\nquant:\n  bnb_4bit_quant_storage: uint8\n")
    cfg = load_config(p)
    planner.check_machine(cfg)  # one model per process: uint8 is bitsandbytes' default
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    load_config(p)  # the schema does not look at the launch
    with pytest.raises(ConfigError, match=r":4: quant.bnb_4bit_quant_storage: uint8 cannot be sharded by FSDP"):
        planner.check_machine(cfg)
    with pytest.raises(ConfigError, match=r"^--set: quant.bnb_4bit_quant_storage: uint8"):
        planner.check_machine(load_config(p, ["quant.bnb_4bit_quant_storage=uint8"]))
    planner.check_machine(load_config(p, ["quant.bnb_4bit_quant_storage=auto"]))


def test_cli_train_refuses_uint8_under_fsdp_in_one_line_before_the_run_folder(tmp_path, cli, monkeypatch):
    """Through main() in this process: distributed.py reads ACCELERATE_USE_FSDP when asked, as a child would."""
    out = tmp_path / "run"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    r = cli("train", CONFIGS / "tiny_llama_qlora.yaml", "--output-dir", out,
            "--set", "quant.bnb_4bit_quant_storage=uint8")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines[-1] == ("qlora-lab: error: --set: quant.bnb_4bit_quant_storage: uint8 cannot be sharded by FSDP "
                         "(ACCELERATE_USE_FSDP is set); allowed here: auto or the compute dtype"), lines
    assert not out.exists()


def test_offloading_is_chosen_where_it_keeps_the_batch_whole():
    """At a budget where every layer's input on the GPU forces smaller micro-batches, the plan (offload auto)
    keeps the micro-batch whole with the inputs in CPU memory; where no layer recomputes it never offloads."""
    cfg = load_config(CONFIGS / "tiny_llama_qlora.yaml", ["data.max_length=512", "lora.r=64",
                                                          "train.gradient_checkpointing=auto"])
    mc = model_config("llama2-7b")
    (k, micro, _, est, offload), why = planner._choose_recomputation(cfg, mc, True, 8, 1, 9.0, "liger", True)
    assert offload and micro == 8 and k > 0 and est <= 9.0 and "inputs offloaded to CPU" in why
    never = cfg.set("train.offload_checkpoints=false")
    (k2, micro2, _, _, offload2), _ = planner._choose_recomputation(never, mc, True, 8, 1, 9.0, "liger", True)
    assert not offload2 and micro2 < 8  # the same budget without offloading splits the batch
    (k3, _, _, _, offload3), _ = planner._choose_recomputation(cfg, mc, True, 8, 1, 72.0, "liger", True)
    assert k3 == 0 and not offload3


def test_offloading_needs_one_cuda_gpu(monkeypatch):
    cfg = load_config(CONFIGS / "tiny_llama_qlora.yaml", ["train.gradient_checkpointing=true",
                                                          "train.offload_checkpoints=true", "data.max_length=512"])
    mc = model_config("llama2-7b")
    (_, _, _, est_on, on), why = planner._choose_recomputation(cfg, mc, True, 8, 1, 72.0, "liger", True)
    (_, _, _, est_off, _), _ = planner._choose_recomputation(cfg.set("train.offload_checkpoints=false"), mc, True,
                                                              8, 1, 72.0, "liger", True)
    assert on and est_on < est_off and "inputs offloaded to CPU" in why
    (_, _, _, _, cpu), why = planner._choose_recomputation(cfg, mc, False, 8, 1, None, "none", True)
    assert not cpu and "offload_checkpoints=off: no CUDA" in why
    monkeypatch.setattr(planner, "world_size", lambda: 2)
    (_, _, _, _, ddp), why = planner._choose_recomputation(cfg, mc, True, 8, 1, 72.0, "liger", True)
    assert not ddp and "several processes" in why
