"""GPU-only behaviour (skipped without CUDA): the plan's CUDA choices and a real QLoRA step on the GPU."""
from __future__ import annotations

import pytest

from qlora_lab.config import load_config
from qlora_lab.runs import RunFolder

from .conftest import CONFIGS, run_cli

pytestmark = pytest.mark.gpu


def test_plan_on_cuda_keeps_paged_optimizer_and_picks_a_16bit_dtype():
    import torch
    from transformers import AutoConfig

    from qlora_lab.plan import plan
    from qlora_lab.model import model_path

    cfg = load_config(CONFIGS / "tiny_llama_qlora.yaml", ["train.optim=paged_adamw_32bit"])
    p = plan(cfg, AutoConfig.from_pretrained(model_path(cfg)))
    assert p.device == "cuda" and p.optim == "paged_adamw_32bit"
    expected = "bfloat16" if torch.cuda.is_bf16_supported(including_emulation=False) else "float16"
    assert p.compute_dtype == expected and p.mixed_precision in ("bf16", "fp16")


def test_qlora_trains_on_the_gpu(tmp_path):
    out = tmp_path / "gpu"
    r = run_cli("train", CONFIGS / "tiny_llama_qlora.yaml", "--output-dir", out, "--set", "train.max_steps=4",
                "--set", "train.optim=paged_adamw_32bit")
    assert r.returncode == 0, r.stderr[-3000:]
    run = RunFolder(out)
    s = run.read_json("train_summary.json")
    assert s["peak_memory_bytes"] and s["peak_memory_bytes"] > 0
    assert run.read_json("model_summary.json")["n_linear_4bit"] == 14
    assert run.read_json("env.json")["cuda_available"] is True


@pytest.mark.parametrize("name", ["tiny_llama_qlora", "tiny_falcon_qlora"])
def test_fused_lora_is_as_accurate_as_peft_in_bf16_4bit_on_the_gpu(name):
    """The bench's speed comparison rests on this: on CUDA in bf16 autocast (bitsandbytes' CUDA dequantize
    kernel), the fused layer's loss and every adapter gradient are as close to the fp32 computation as
    peft + bitsandbytes' own (tolerances: tests/unit/kernels/test_fused_lora.bf16_errors)."""
    import torch

    from ..unit.kernels.test_fused_lora import _model, assert_fused_as_accurate_as_peft, bf16_errors

    model = _model(name, "lora.lora_dropout=0.0")
    errors = bf16_errors(model, torch.randint(4, 200, (2, 32), device="cuda"), "cuda")
    worst = max((v for k, v in errors.items() if k not in ("loss", "loss32")), key=lambda v: v[1])
    print(f"{name}: loss error peft {errors['loss'][0]:.2e} fused {errors['loss'][1]:.2e}; "
          f"worst gradient error peft {worst[0]:.2e} fused {worst[1]:.2e}")
    assert_fused_as_accurate_as_peft(errors)


def test_fused_lora_dropout_mask_drawn_again_on_the_gpu():
    """The backward draws the forward's dropout mask again from kernels/dropout.py's (seed, layer): loss and
    gradients equal autograd's through that mask."""
    from ..unit.kernels.test_fused_lora import check_dropout_by_hand

    check_dropout_by_hand("cuda")


def test_grouped_lora_trains_as_the_ungrouped_layers_in_bf16_on_the_gpu():
    """q/k/v and gate/up as one function (train.group_lora) on CUDA in bf16 autocast, 4-bit, with Liger's
    kernels as training uses them (its SwiGLU reads gate and up by one row stride): the loss and every
    adapter gradient as the ungrouped fused layers give them, within bf16's rounding."""
    import torch

    from qlora_lab.kernels import fused_lora, grouped_lora

    from ..unit.kernels.test_fused_lora import _model

    x = torch.randint(4, 200, (2, 32), device="cuda")
    results = []
    for grouped in (False, True):
        torch.manual_seed(0)
        model = _model("tiny_llama_qlora", "lora.lora_dropout=0.0", liger=True)
        model.train()
        fused_lora.enable(model)
        if grouped:
            assert grouped_lora.group(model) == 2 * model.config.num_hidden_layers
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        results.append((loss.item(), {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}))
    (l0, g0), (l1, g1) = results
    assert abs(l1 - l0) <= 1e-2 * abs(l0)
    for k in g0:
        assert (g1[k] - g0[k]).norm() <= 2e-2 * g0[k].norm() + 1e-6, k


def _graph_steps(graphed: bool, dropout: float, checkpointing: bool, micro: int = 1, name: str = "tiny_llama_qlora",
                 mlp: bool = True, offload: int = 0, layers: int | None = None):
    """Four SGD steps of a tiny 4-bit model (fused, grouped LoRA, the fused MLP unless `mlp` is False, Liger,
    bf16 autocast): the losses and every adapter gradient, with the layers replayed from CUDA graphs or run
    eagerly; `offload`: the first `offload` layers recomputed with their input in pinned CPU memory; `layers`:
    a deeper twin than the preset's 2 layers (its own random checkpoint)."""
    import os
    import tempfile

    import torch

    from qlora_lab import presets
    from qlora_lab.kernels import fused_lora, graphs, grouped_lora, lora_mlp
    from qlora_lab.model import set_recomputation

    from ..unit.kernels.test_fused_lora import _model

    torch.manual_seed(0)
    with pytest.MonkeyPatch.context() as mp:
        if layers is not None:
            preset = "tiny-falcon" if "falcon" in name else "tiny-llama"
            mp.setitem(presets._SHAPES, preset, {**presets._SHAPES[preset], "num_hidden_layers": layers})
            mp.setenv("QLORA_LAB_CACHE", os.path.join(tempfile.gettempdir(), f"qlora-lab-test-{layers}-layers"))
        model = _model(name, f"lora.lora_dropout={dropout}", checkpointing=checkpointing, liger=True)
    if layers is not None:
        assert model.config.num_hidden_layers == layers
    if offload:
        set_recomputation(model.get_base_model(), offload, offload=True)
    model.train()
    fused_lora.enable(model)
    grouped_lora.group(model)
    if mlp:
        assert lora_mlp.enable(model) == model.config.num_hidden_layers
    if graphed:
        assert graphs.enable(model, offloaded=bool(offload)) == model.config.num_hidden_layers
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    gen = torch.Generator().manual_seed(3)
    out = []
    for step in range(4):
        torch.manual_seed(100 + step)  # the dropout seed each forward draws (kernels/dropout.py)
        losses = []
        for _ in range(micro):
            x = torch.randint(4, 200, (2, 32), generator=gen).cuda()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=x, labels=x).loss
            loss.backward()
            losses.append(loss.item())
        out.append((losses, {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}))
        opt.step()
        opt.zero_grad(set_to_none=True)
    if graphed:
        state = model.__dict__[graphs._STATE]
        assert graphs.captures(model) == 1 and state.replays == 4 * micro - 1, (graphs.captures(model), state.replays)
        # offloaded inputs copied out and back: all but layer 0's (x0) and the last two's (never overwritten)
        assert [g.index for g in state.graphs if g.copy_out] == list(range(1, max(offload - 2, 1)))
    return out


@pytest.mark.parametrize("dropout,checkpointing,micro,name", [
    (0.0, False, 1, "tiny_llama_qlora"), (0.1, False, 1, "tiny_llama_qlora"), (0.1, True, 1, "tiny_llama_qlora"),
    (0.1, False, 2, "tiny_llama_qlora"), (0.1, False, 1, "tiny_falcon_qlora"),
    (0.1, True, 2, "tiny_falcon_qlora")])
def test_layer_graphs_train_as_the_eager_layers(dropout, checkpointing, micro, name):
    """kernels/graphs.py: replaying every decoder layer from CUDA graphs (captured on the second forward) gives
    the eager layers' losses and adapter gradients step after step: with dropout (kernels/dropout.py's masks,
    drawn again in the backward graph), with every layer recomputed, and with two micro-batches accumulating
    into .grad; Llama and Falcon (its heads split by slicing, kernels/falcon_attention.py). Same kernels in the same order: equal within bf16's last bit."""
    eager = _graph_steps(False, dropout, checkpointing, micro, name)
    graphed = _graph_steps(True, dropout, checkpointing, micro, name)
    for step, ((l0, g0), (l1, g1)) in enumerate(zip(eager, graphed)):
        assert l0 == pytest.approx(l1, rel=2e-3), (step, l0, l1)
        for k in g0:
            assert (g1[k] - g0[k]).norm() <= 1e-2 * g0[k].norm() + 1e-6, (step, k)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_nf4_kernel_gives_bitsandbytes_cuda_numbers(dtype):
    """kernels/nf4.py's Triton kernel (the path every fused layer's dequantization takes on CUDA, once its
    self-check passes) against bitsandbytes' CUDA kernels, bit for bit: double-quantized 7B shapes, plain
    absmax, a ragged tail."""
    import bitsandbytes.functional as bnbf
    import torch

    from qlora_lab.kernels import nf4

    assert nf4.usable(torch.device("cuda", torch.cuda.current_device())), "the kernel failed its own check here"
    dt = getattr(torch, dtype)
    torch.manual_seed(0)
    for shape, nested in [((4096, 4096), True), ((11008, 4096), True), ((4096, 11008), False), ((33, 100), True)]:
        q, qs = bnbf.quantize_4bit(torch.randn(shape, device="cuda", dtype=dt), compress_statistics=nested,
                                   quant_type="nf4", quant_storage=torch.uint8)
        want = bnbf.dequantize_4bit(q, qs)
        assert want.dtype == dt
        buffer = torch.full((shape[0] + 2, shape[1]), 7.0, dtype=dt, device="cuda")
        nf4._launch(q, qs, buffer[1:-1], nf4._prepared(qs, q.device))  # what nf4.dequantize launches
        assert torch.equal(nf4.dequantize(q, qs, dt), want)
        assert torch.equal(buffer[1:-1], want), (shape, nested, (buffer[1:-1] != want).sum().item())
        assert buffer[0].eq(7).all() and buffer[-1].eq(7).all()


@pytest.mark.parametrize("name", ["tiny_llama_qlora", "tiny_falcon_qlora"])
@pytest.mark.parametrize("dropout,checkpointing", [(0.0, False), (0.1, False), (0.1, True)])
def test_lora_mlp_trains_as_the_layer_by_layer_path_on_the_gpu(name, dropout, checkpointing):
    """kernels/lora_mlp.py on CUDA in bf16 with Liger (Llama: Liger's SwiGLU kernels, whose backward writes over
    the saved gate and up; Falcon: GELU), dropout masks from kernels/dropout.py, and a recomputed block that skips
    its down matmul: four steps' losses and every adapter gradient as the layer-by-layer fused path's."""
    ref = _graph_steps(False, dropout, checkpointing, name=name, mlp=False)
    got = _graph_steps(False, dropout, checkpointing, name=name, mlp=True)
    for step, ((l0, g0), (l1, g1)) in enumerate(zip(ref, got)):
        assert l1 == pytest.approx(l0, rel=1e-2), (step, l0, l1)
        for k in g0:
            assert (g1[k] - g0[k]).norm() <= 2e-2 * g0[k].norm() + 1e-6, (step, k)


@pytest.mark.parametrize("name", ["tiny_llama_qlora", "tiny_falcon_qlora"])
@pytest.mark.parametrize("graphed,offload,layers", [(False, 2, None), (True, 2, None), (True, 5, 5), (True, 3, 5),
                                                   (True, 6, 8)])
def test_offloaded_checkpoints_train_as_torch_checkpoint_on_the_gpu(name, graphed, offload, layers):
    """kernels/recompute.py on CUDA: pinned host buffers, the copy stream and the prefetch of the previous
    layer's input, two micro-batches: the losses and every adapter gradient of torch's checkpoint. Eagerly, and
    replayed from the layer graphs (graphs.py): with 5 layers the buffers used in turn are each used twice,
    3 offloaded of 5 hands the last offloaded output to a layer that keeps its input, and 6 of 8 copies three
    inputs out and back before two offloaded layers whose inputs stay in their buffers."""
    ref = _graph_steps(False, 0.1, True, micro=2, name=name, layers=layers)
    got = _graph_steps(graphed, 0.1, True, micro=2, name=name, offload=offload, layers=layers)
    for step, ((l0, g0), (l1, g1)) in enumerate(zip(ref, got)):
        assert l1 == pytest.approx(l0, rel=2e-3), (step, l0, l1)
        for k in g0:
            assert (g1[k] - g0[k]).norm() <= 1e-2 * g0[k].norm() + 1e-6, (step, k)



def _optimizer_steps(cls, direct: bool | None, steps: int = 4):
    """`steps` steps of a bitsandbytes optimizer on CUDA over adapter-like tensors: big enough for paged states
    (>= 1e5 values) and small ones, one left without a gradient every other step. direct None: bitsandbytes' own
    step; else kernels/optimizer_step's one-sync step, calling its C functions directly or not."""
    import torch

    from qlora_lab.kernels import optimizer_step

    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(64, 4096), (11008, 64), (8, 8), (64, 300)]
    params = [torch.nn.Parameter(torch.randn(s, generator=g, device="cuda") * 0.02) for s in shapes]
    opt = cls(params, lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    if direct is not None:
        assert optimizer_step.sync_once(opt, direct=direct)
    for step in range(steps):
        for i, p in enumerate(params):
            p.grad = None if (i == 2 and step % 2) else torch.randn(p.shape, generator=g, device="cuda") * 1e-2
        opt.step()
    torch.cuda.synchronize()
    return params, opt


@pytest.mark.parametrize("cls_name", ["PagedAdamW32bit", "AdamW32bit", "PagedAdamW8bit"])
def test_direct_optimizer_calls_are_bitsandbytes_step_bit_for_bit_on_the_gpu(cls_name, monkeypatch):
    """The 32-bit update through bitsandbytes' C functions called directly (kernels/optimizer_step._Direct) gives
    bitsandbytes' own step's parameters and states bit for bit; 8-bit states go through its update_step."""
    import bitsandbytes as bnb
    import torch

    from qlora_lab.kernels import optimizer_step

    cls = getattr(bnb.optim, cls_name)
    taken = []
    real = optimizer_step._Direct.update
    monkeypatch.setattr(optimizer_step._Direct, "update", lambda self, *a: taken.append(real(self, *a)) or taken[-1])
    ref, ref_opt = _optimizer_steps(cls, direct=None)
    got, got_opt = _optimizer_steps(cls, direct=True)
    assert got_opt._qlora_lab_direct and taken
    assert all(taken) == cls_name.endswith("32bit") and any(taken) == cls_name.endswith("32bit")
    for a, b in zip(ref, got):
        assert torch.equal(a, b)
        sa, sb = ref_opt.state[a], got_opt.state[b]
        assert sa.keys() == sb.keys()
        for k in sa:
            if torch.is_tensor(sa[k]):
                assert torch.equal(sa[k].cpu(), sb[k].cpu()), k
            else:
                assert sa[k] == sb[k], k


def _fused_steps(cls, fused: bool, steps: int = 4):
    """As _optimizer_steps, without weight decay (what the fused step takes), bitsandbytes' own step or the one-sync
    step with kernels/fused_adam.py's one launch; returns (params, optimizer, prefetch calls per step)."""
    import torch

    from qlora_lab.kernels import optimizer_step

    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(64, 4096), (11008, 64), (8, 8), (64, 300)]
    params = [torch.nn.Parameter(torch.randn(s, generator=g, device="cuda") * 0.02) for s in shapes]
    opt = cls(params, lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    fetches = []
    if fused:
        assert optimizer_step.sync_once(opt, direct=True, fused=True) and opt._qlora_lab_fused is not None
        real = opt._qlora_lab_fused.prefetch
        opt._qlora_lab_fused.prefetch = lambda pool, d: fetches.append(1) or real(pool, d)
    for step in range(steps):
        for i, p in enumerate(params):
            p.grad = None if (i == 2 and step % 2) else torch.randn(p.shape, generator=g, device="cuda") * 1e-2
        opt.step()
    torch.cuda.synchronize()
    return params, opt, len(fetches) / steps


@pytest.mark.parametrize("cls_name", ["PagedAdamW32bit", "AdamW32bit"])
def test_fused_optimizer_is_bitsandbytes_step_to_fp32_rounding_on_the_gpu(cls_name):
    """kernels/fused_adam.py (train.optimizer_fused): every tensor's update in one Triton launch, the states pooled
    (in paged memory for a paged optimizer, one prefetch a step): parameters and states within fp32 rounding of
    bitsandbytes' own CUDA step (the step size comes from the host; printed: how many values differ at all)."""
    import bitsandbytes as bnb
    import torch

    cls = getattr(bnb.optim, cls_name)
    ref, ref_opt, _ = _fused_steps(cls, fused=False)
    got, got_opt, fetches = _fused_steps(cls, fused=True)
    fused = got_opt._qlora_lab_fused
    assert len(fused.params) == 4
    assert getattr(fused.pool, "is_paged", False) is cls_name.startswith("Paged")
    assert fetches == 1
    differ = 0
    for i, (a, b) in enumerate(zip(ref, got)):
        pairs = [(a, b)] + [(ref_opt.state[a][k].cpu(), got_opt.state[b][k].cpu()) for k in ("state1", "state2")]
        assert ref_opt.state[a]["step"] == got_opt.state[b]["step"]
        for x, y in pairs:
            x, y = x.detach().float().cpu(), y.detach().float().cpu()
            assert (x - y).abs().max().item() <= 4 * torch.finfo(torch.float32).eps * x.abs().max().item(), i
            differ += int((x != y).sum())
    print(f"{cls_name}: {differ} values differ from bitsandbytes' step (all within fp32 rounding)")


def test_a_resumed_paged_optimizer_keeps_its_states_in_paged_memory_on_the_gpu():
    """States loaded from a checkpoint go back to paged memory at the first step (optimizer_step.page_loaded_states),
    not onto the GPU as ordinary tensors as bitsandbytes' to_gpu would put them: the resumed step allocates far less
    than the states' size, and trains as the uninterrupted run does, bit for bit."""
    import io

    import bitsandbytes as bnb
    import torch

    from qlora_lab.kernels import optimizer_step

    def run(steps, start=None, state=None):
        g = torch.Generator(device="cuda").manual_seed(0)
        shapes = [(64, 4096), (11008, 64), (64, 300)]
        params = [torch.nn.Parameter(torch.randn(s, generator=g, device="cuda") * 0.02) for s in shapes]
        if start is not None:
            with torch.no_grad():
                for p, q in zip(params, start):
                    p.copy_(q)
        opt = bnb.optim.PagedAdamW32bit(params, lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
        assert optimizer_step.sync_once(opt, direct=True)
        if state is not None:
            opt.load_state_dict(torch.load(state, weights_only=True, map_location="cpu"))  # as the Trainer loads it
        grow = None
        for step in range(steps):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g, device="cuda") * 1e-2
            if step >= (2 if start is not None else 0):
                before = torch.cuda.memory_allocated()
                opt.step()
                torch.cuda.synchronize()
                grow = torch.cuda.memory_allocated() - before if grow is None else grow
        return params, opt, grow

    whole, _, _ = run(4)
    first, opt, _ = run(2)
    saved = io.BytesIO()
    torch.save(opt.state_dict(), saved)
    saved.seek(0)
    resumed, ropt, grow = run(4, start=[p.detach() for p in first], state=saved)
    states = sum(2 * 4 * p.numel() for p in resumed if p.numel() >= 1e5)
    assert grow < states / 4, (grow, states)
    assert all(getattr(ropt.state[p]["state1"], "is_paged", False) for p in resumed if p.numel() >= 1e5)
    for a, b in zip(whole, resumed):
        assert torch.equal(a, b)


def test_memory_recorder_names_the_line_that_holds_the_peak_on_the_gpu(tmp_path):
    """bench --memory-profile's recorder (bench/profiling.py) on real CUDA allocations: the peak's live blocks,
    summed by the line of this test that allocated them, and what was allocated before it began."""
    import torch

    from qlora_lab.bench import profiling

    import gc

    gc.collect()  # no earlier test's tensors freed while recording
    before = torch.empty(2**20, dtype=torch.uint8, device="cuda")  # 1 MiB, allocated before the recording
    rec = profiling.MemoryRecorder(tmp_path, "row", "gpu test")
    rec.start()
    kept = [torch.empty(8 * 2**20, dtype=torch.uint8, device="cuda") for _ in range(3)]  # 24 MiB, live at the peak
    gone = torch.empty(4 * 2**20, dtype=torch.uint8, device="cuda")  # 4 MiB, freed before the peak
    del gone
    kept.append(torch.empty(16 * 2**20, dtype=torch.uint8, device="cuda"))  # the peak: 40 MiB since the start
    b = rec.finish()
    assert rec.finish() is None  # the recording stopped
    assert b["base_bytes"] >= before.nbytes and b["complete"]
    assert b["recorded_peak_bytes"] - b["base_bytes"] + b["base_freed_at_peak_bytes"] == 40 * 2**20
    here = [s for s in b["sites"] if s["site"].split(":")[0].endswith("test_gpu.py")]
    assert sorted((s["bytes"], s["blocks"]) for s in here) == [(16 * 2**20, 1), (24 * 2**20, 3)]
    assert (tmp_path / "row-memory.txt").read_text().startswith("gpu test\npeak allocated")
    assert b["max_allocated_bytes"] >= b["recorded_peak_bytes"]
    del kept, before
