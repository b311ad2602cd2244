"""kernels/levers.py: one switch sets a LoRA model's levers to a plan, and undoes the last one (the bench's rows
switch them on one loaded model; `train` once at load)."""
from __future__ import annotations

from types import SimpleNamespace

from qlora_lab.config import load_config
from qlora_lab.kernels import fused_lora, graphs, grouped_lora, levers, lora_mlp, nf4

from .test_fused_lora import CONFIGS, _model


def _train(*sets):
    return load_config(CONFIGS / "tiny_llama_qlora.yaml", list(sets)).train


def test_switch_sets_and_undoes_every_lever():
    model = _model("tiny_llama_qlora", "lora.lora_dropout=0.0")
    n = model.config.num_hidden_layers
    fused, plain = SimpleNamespace(fused_lora=True, mixed_precision="no"), SimpleNamespace(fused_lora=False,
                                                                                           mixed_precision="no")
    got = levers.switch(model, fused, _train())
    assert got == {"fused_lora_modules": 7 * n, "lora_groups": 2 * n, "fused_mlp_blocks": n, "nf4_kernel": True,
                   "cuda_graph_layers": 0}  # q/k/v and gate/up grouped; no CUDA here: no graphs
    assert fused_lora.count(model) == 7 * n and grouped_lora.count(model) == 2 * n and lora_mlp.count(model) == n
    off = ("train.group_lora=false", "train.fused_mlp=false", "train.nf4_kernel=false")
    got = levers.switch(model, fused, _train(*off))
    assert got["lora_groups"] == 0 and grouped_lora.count(model) == 0
    assert got["fused_mlp_blocks"] == 0 and lora_mlp.count(model) == 0 and not nf4.enabled()
    levers.switch(model, fused, _train())
    got = levers.switch(model, plain, _train())  # peft's own path: nothing of ours left on the model
    assert got == {"fused_lora_modules": 0, "lora_groups": 0, "fused_mlp_blocks": 0, "nf4_kernel": True,
                   "cuda_graph_layers": 0}
    assert fused_lora.count(model) == grouped_lora.count(model) == lora_mlp.count(model) == graphs.count(model) == 0
