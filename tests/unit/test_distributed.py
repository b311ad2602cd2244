"""Data parallelism and FSDP, in one process: batch split, launch settings, gathered adapters. Several processes
(torchrun, bench dp:2): tests/integration/test_distributed.py."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from qlora_lab.runs import RunFolder
from qlora_lab.plan import _choose_process_batch
from qlora_lab.errors import ConfigError

from .conftest import CONFIGS


def test_global_batch_split():
    assert _choose_process_batch(4, 4, 1) == ((4, 4), None)
    assert _choose_process_batch(4, 4, 2)[0] == (4, 2)
    assert _choose_process_batch(4, 1, 2)[0] == (2, 1)
    assert _choose_process_batch(3, 4, 4) == ((3, 1), "global batch 12 sequences over 4 processes: micro-batch 3 x "
                                                      "1 accumulation steps in each")
    with pytest.raises(ConfigError, match="cannot be split evenly over 4"):
        _choose_process_batch(3, 1, 4)


# ----------------------------------------------------------------------------- FSDP (sharded)

def test_fsdp_is_read_from_accelerates_environment(monkeypatch):
    from qlora_lab.distributed import fsdp_active, quant_storage

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert not fsdp_active() and quant_storage("auto", "bfloat16")[0] == "uint8"
    for on in ("true", "True", "1"):  # `accelerate launch` writes "true"; accelerate's own helpers "True"
        monkeypatch.setenv("ACCELERATE_USE_FSDP", on)
        assert fsdp_active() and quant_storage("auto", "bfloat16")[0] == "bfloat16"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    assert not fsdp_active()
    assert quant_storage("float32", "bfloat16")[0] == "float32"  # set in config: kept


def test_adapter_is_saved_from_the_gathered_state_dict(tmp_path):
    """Under FSDP the model holds shards: the run folder's adapter comes from the full state dict."""
    from safetensors.torch import load_file

    from qlora_lab.config import load_config
    from qlora_lab.model import add_lora, load_adapter, load_model

    cfg = load_config(CONFIGS / "tiny_llama_qlora.yaml")
    model, _, _ = load_model(cfg, for_training=True)
    peft_model, _ = add_lora(model, cfg, recompute_layers=0)
    full = {k: v.clone() for k, v in peft_model.state_dict().items()}
    key = next(k for k in full if "lora_B" in k)
    full[key] = torch.full_like(full[key], 0.25)  # what the gathered shards say, not the local model
    run = RunFolder(tmp_path)
    run.save_adapter(peft_model, state_dict=full)
    saved = load_file(run.adapter_dir / "adapter_model.safetensors")
    assert len(saved) == 2 * 7 * model.config.num_hidden_layers  # lora_A and lora_B, no base weights
    assert any(torch.equal(v, full[key]) for v in saved.values())
    base, _, _ = load_model(cfg)
    loaded = load_adapter(base, run.adapter_dir)
    assert any(torch.equal(p, full[key]) for n, p in loaded.named_parameters() if "lora_B" in n)


def test_accelerate_configs_parse_and_agree_with_the_recipe():
    from accelerate.commands.config.config_args import load_config_from_file

    ddp = load_config_from_file(str(CONFIGS / "accelerate" / "ddp.yaml"))
    assert ddp.distributed_type.value == "MULTI_GPU" and ddp.num_processes == 2
    fsdp = load_config_from_file(str(CONFIGS / "accelerate" / "fsdp_qlora.yaml"))
    f = fsdp.fsdp_config
    assert fsdp.distributed_type.value == "FSDP" and fsdp.num_processes == 2
    assert f["fsdp_use_orig_params"] is False  # frozen 4-bit and trainable LoRA in separate flat params
    assert f["fsdp_activation_checkpointing"] is False  # model.add_lora recomputes, as the plan says
    assert f["fsdp_cpu_ram_efficient_loading"] and f["fsdp_sync_module_states"]
    assert f["fsdp_state_dict_type"] == "FULL_STATE_DICT"


def test_scaling_compares_per_gpu_batch_for_speed_and_global_batch_for_losses():
    from qlora_lab.bench import LOSS_TOLERANCE, compare_scaling

    def row(path, b, tps, peak, losses, world=1, ref=None):
        return {"preset": "p", "path": path, "seq_len": 8, "batch_size": b, "status": "ok", "tokens_per_s": tps,
                "peak_allocated_bytes": peak, "losses": losses, "world_size": world, "reference": ref}

    rows = [row("ours", 2, 100.0, 10, [5.0, 4.0]), row("ours", 4, 150.0, 18, [5.0, 4.0]),
            row("ours[fsdp2]", 4, 190.0, 6, [5.0, 4.0 * (1 + 2 * LOSS_TOLERANCE)], 2, "ours")]
    (c,) = compare_scaling(rows)
    assert c["per_gpu_batch"] == 2 and c["speedup"] == 1.9 and c["peak_allocated_ratio"] == 0.6
    assert c["loss_steps"] == 2 and not c["loss_ok"]  # 2% off the one-GPU run with the same global batch


def test_launchers():
    from qlora_lab.bench import launch_command

    assert launch_command(None) == [sys.executable]
    dp = launch_command({"kind": "dp", "nproc": 2})
    assert dp[1:3] == ["-m", "torch.distributed.run"] and "--nproc_per_node=2" in dp
    fsdp = launch_command({"kind": "fsdp", "nproc": 2})
    assert fsdp[1:3] == ["-m", "accelerate.commands.launch"] and fsdp[fsdp.index("--num_processes") + 1] == "2"
    assert fsdp[fsdp.index("--config_file") + 1].endswith("qlora_lab/resources/accelerate/fsdp_qlora.yaml")


@pytest.mark.parametrize("name", ["ddp.yaml", "fsdp_qlora.yaml"])
def test_the_package_ships_the_repos_accelerate_configs(name):
    """bench launches from the package's copy (an installed wheel has no configs/ folder); users read and edit
    configs/accelerate/. The two must not drift."""
    from importlib import resources

    from qlora_lab.bench import accelerate_config

    packaged = resources.files("qlora_lab") / "resources" / "accelerate" / name
    assert packaged.read_bytes() == (CONFIGS / "accelerate" / name).read_bytes()
    found = accelerate_config(name)
    assert found.is_file() and found.resolve() == Path(str(packaged)).resolve()
    assert CONFIGS.resolve() not in found.resolve().parents


def test_only_distributed_reads_the_launchers_environment():
    """RANK, WORLD_SIZE, LOCAL_RANK and ACCELERATE_USE_FSDP are read in distributed.py and nowhere else."""
    import re

    import qlora_lab

    names = "RANK|WORLD_SIZE|LOCAL_RANK|ACCELERATE_USE_FSDP"
    read = re.compile(rf"""(environ\s*(\.get\s*\(|\[)|getenv\s*\()\s*['"]({names})['"]""")
    package = Path(qlora_lab.__file__).parent
    assert len(read.findall((package / "distributed.py").read_text())) == 4  # the pattern finds its reads
    found = []
    for f in sorted(package.rglob("*.py")):
        if f != package / "distributed.py":
            text = f.read_text()
            found += [f"{f.relative_to(package)}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}"
                      for m in read.finditer(text)]
    assert found == [], "read qlora_lab.distributed's functions instead:\n" + "\n".join(found)


def test_gathered_state_dict_names_are_the_models_own():
    """Wrapper segments (FSDP units, checkpoint wrappers, DDP) never reach a saved adapter's keys."""
    from qlora_lab.distributed import _unwrapped_name

    own = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    assert _unwrapped_name(own) == own
    assert _unwrapped_name("_fsdp_wrapped_module.base_model.model.model.layers.0._fsdp_wrapped_module."
                           "self_attn.q_proj.lora_A.default.weight") == own
    assert _unwrapped_name("module.base_model.model.model.layers.0._checkpoint_wrapped_module."
                           "self_attn.q_proj.lora_A.default.weight") == own
    assert _unwrapped_name("base_model.model.model.embed_tokens.module.weight").endswith("embed_tokens.module.weight")


def test_an_adapter_written_from_a_gathered_state_dict_loads_in_stock_peft(tmp_path):
    """FSDP's save path (write_adapter) against peft's own save: the same file, loadable by PeftModel."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file

    from qlora_lab.config import load_config
    from qlora_lab.distributed import write_adapter
    from qlora_lab.model import add_lora, load_model

    cfg = load_config(CONFIGS / "tiny_llama_lora.yaml")
    model, _, _ = load_model(cfg, for_training=True)
    model, _ = add_lora(model, cfg, 0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    model.save_pretrained(str(tmp_path / "peft"), safe_serialization=True)
    n = write_adapter(model, model.state_dict(), tmp_path / "ours")
    ref, got = load_file(str(tmp_path / "peft" / "adapter_model.safetensors")), \
        load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    assert n == len(ref) > 0 and got.keys() == ref.keys()
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    base, tok, _ = load_model(cfg)
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "ours"))
    x = torch.randint(4, 200, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, model.eval()(input_ids=x).logits)
