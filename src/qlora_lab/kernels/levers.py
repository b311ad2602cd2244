"""The runtime levers of a LoRA model, switched to a plan in one place.

`qlora-lab train` switches them once, on the model it loaded (training/recipe.load_model); the bench switches
them between rows on one loaded model (bench/worker.py), so every switch also undoes the last one. The levers:
fused (and grouped) LoRA, the fused MLP, the NF4 kernel and the layer graphs. Recomputation and offloading are
model.set_recomputation's, set before this runs: the graphs capture what it chose.
"""
from __future__ import annotations

from . import fused_lora, graphs, grouped_lora, lora_mlp, nf4


def switch(model, plan, train) -> dict:
    """Set `model`'s levers to `plan` (plan.Plan) and `train` (the config's train section); returns the counts
    model_summary.json records. The layer graphs captured for an earlier plan are dropped first."""
    graphs.disable(model)
    groups = 0
    if plan.fused_lora:
        fused_lora.enable(model)
        if train.group_lora:
            groups = grouped_lora.group(model)
        else:
            grouped_lora.ungroup(model)
        (lora_mlp.enable if train.fused_mlp else lora_mlp.disable)(model)
    else:
        lora_mlp.disable(model)
        fused_lora.disable(model)  # its groups go with it
    nf4.enable(train.nf4_kernel)
    fused = fused_lora.count(model)
    graphed = graphs.enable(model, fp16=plan.mixed_precision == "fp16", offloaded=train.offload_graphs) \
        if fused and train.cuda_graphs else 0
    return {"fused_lora_modules": fused, "lora_groups": groups, "fused_mlp_blocks": lora_mlp.count(model),
            "nf4_kernel": train.nf4_kernel, "cuda_graph_layers": graphed}
