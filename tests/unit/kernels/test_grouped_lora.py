"""Grouped LoRA (q/k/v and gate/up as one autograd function) trains what peft and the ungrouped fused
layers train: loss and every adapter gradient, with and without dropout and recomputation (CPU)."""
from __future__ import annotations

import pytest
import torch

from qlora_lab.kernels import fused_lora, grouped_lora

from .test_fused_lora import _loss_and_grads, _model, assert_same_dropout_step, assert_same_step, peft_step


def _fused(name, *sets, checkpointing=False, grouped=True):
    torch.manual_seed(0)  # the same LoRA init in every model of a test
    model = _model(name, *sets, checkpointing=checkpointing)
    model.train()
    assert fused_lora.enable(model) > 0
    if grouped:
        assert grouped_lora.group(model) == 2 * model.config.num_hidden_layers  # q/k/v and gate/up per layer
    return model


@pytest.mark.parametrize("name", ["tiny_llama_qlora", "tiny_llama_lora"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_grouped_matches_peft_without_dropout(name, checkpointing):
    """No dropout: the stacked-A path (one A matmul per group)."""
    x = torch.randint(4, 200, (2, 16))
    ref_loss, ref = peft_step(name, x, checkpointing)
    model = _fused(name, "lora.lora_dropout=0.0", checkpointing=checkpointing)
    loss, got = _loss_and_grads(model, x)
    assert_same_step(loss, got, ref_loss, ref)
    assert any(g.abs().sum() > 0 for k, g in got.items() if "k_proj.lora_A" in k)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_grouped_draws_the_same_dropout_masks_as_ungrouped(checkpointing):
    """Dropout: each layer its own mask, drawn in the order the layers' own calls draw them."""
    x = torch.randint(4, 200, (2, 16))
    assert_same_dropout_step(
        lambda grouped: _fused("tiny_llama_qlora", "lora.lora_dropout=0.2", checkpointing=checkpointing, grouped=grouped),
        (False, True), x)


def test_a_group_layer_called_on_another_input_computes_alone():
    model = _fused("tiny_llama_qlora", "lora.lora_dropout=0.0")
    attn = model.get_base_model().model.layers[0].self_attn
    h = torch.randn(1, 4, model.config.hidden_size)
    q = attn.q_proj(h)  # computes q, k and v; k and v wait for a call on the same tensor
    k_same = attn.k_proj(h)
    other = torch.randn_like(h)
    v_other = attn.v_proj(other)  # not the group's input: its own computation
    fused_lora.disable(model)  # peft's path for the reference
    torch.testing.assert_close(q, attn.q_proj(h))
    torch.testing.assert_close(k_same, attn.k_proj(h))
    torch.testing.assert_close(v_other, attn.v_proj(other))


def test_falcon_has_nothing_to_group_and_disable_ungroups():
    torch.manual_seed(0)
    falcon = _model("tiny_falcon_qlora")
    fused_lora.enable(falcon)
    assert grouped_lora.group(falcon) == 0  # query_key_value is one layer already; its MLP has no gate
    model = _fused("tiny_llama_qlora")
    assert grouped_lora.count(model) > 0
    fused_lora.disable(model)
    assert grouped_lora.count(model) == 0


def test_training_groups_when_the_config_asks(tmp_path):
    """train.group_lora and train.nf4_kernel, as loading the model for training applies and records them."""
    from qlora_lab import training
    from qlora_lab.config import load_config
    from qlora_lab.kernels import nf4

    from .conftest import CONFIGS

    for on in (True, False):
        cfg = load_config(CONFIGS / "tiny_llama_qlora.yaml", [f"train.group_lora={str(on).lower()}",
                                                                f"train.nf4_kernel={str(on).lower()}"])
        run = training.prepare_run_folder(cfg, tmp_path / f"run-{on}", resume=False)
        _, hf, plan = training.load_plan(cfg, run)
        model = training.load_model(cfg, plan, run)
        expected = 2 * hf.num_hidden_layers if on else 0
        summary = run.read_json("model_summary.json")
        assert grouped_lora.count(model) == expected == summary["lora_groups"]
        assert nf4.enabled() is on and summary["nf4_kernel"] is on  # off: bitsandbytes dequantizes on CUDA too
    nf4.enable(True)
