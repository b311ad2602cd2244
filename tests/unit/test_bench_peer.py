"""The peer in the bench (`--peer unsloth --peer-python PATH`) on the CPU: what can be checked without a GPU.

The peer's worker runs in another interpreter and never inside ours; here it is imported by file path
(importing it loads neither torch nor unsloth) to compare its batches with ours bit for bit. Its
training loop needs a GPU and the peer installed: that part is run on the GPU machine.
"""
from __future__ import annotations

import ast
import importlib.util
import os
import stat
import sys

import pytest
import torch

from qlora_lab import cli
from qlora_lab.bench import LORA_R, Shape, markdown, plan_jobs, synthetic_examples
from qlora_lab.bench import peer
from qlora_lab.bench.spec import BATCH_SEED


def _worker_module():
    spec = importlib.util.spec_from_file_location("_peer_worker", peer.worker_script("unsloth"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_peer_batches_equal_ours_bit_for_bit():
    w = _worker_module()
    assert "unsloth" not in sys.modules
    for vocab, shape, steps in ((320, Shape(64, 2), 3), (32000, Shape(512, 8), 2), (65024, Shape(2048, 2), 2)):
        ours = synthetic_examples(vocab, shape, steps)
        theirs = w.synthetic_batches(vocab, shape.seq_len, shape.batch_size, steps, BATCH_SEED)
        assert len(theirs) == steps
        for i, batch in enumerate(theirs):
            rows = ours[i * shape.batch_size:(i + 1) * shape.batch_size]  # the order our Trainer reads them in
            assert batch.dtype == torch.int64 and batch.shape == (shape.batch_size, shape.seq_len)
            assert torch.equal(batch, torch.tensor([r["input_ids"] for r in rows]))
            assert all(r["labels"] == r["input_ids"] for r in rows)  # the worker passes labels = input ids


def test_peer_worker_imports_nothing_of_ours():
    """It runs where qlora_lab's dependencies may be other versions, or absent."""
    tree = ast.parse(peer.worker_script("unsloth").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert not node.level and not (node.module or "").startswith("qlora_lab"), ast.dump(node)
        elif isinstance(node, ast.Import):
            assert not any(a.name.startswith("qlora_lab") for a in node.names)


def test_peer_worker_counts_4bit_linear_layers():
    """The row says whether the peer's base is 4-bit: Linear4bit layers among the linear ones, head aside."""
    import bitsandbytes as bnb
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self, quantized: bool):
            super().__init__()
            lin = bnb.nn.Linear4bit if quantized else nn.Linear
            self.blocks = nn.ModuleList([lin(16, 16), lin(16, 16)])
            self.head = nn.Linear(16, 8)

        def get_output_embeddings(self):
            return self.head

    w = _worker_module()
    assert w.linear_counts(Tiny(True)) == {"n_linear": 2, "n_linear_4bit": 2, "n_linear_16bit": 0, "weights_4bit": True}
    assert w.linear_counts(Tiny(False)) == {"n_linear": 2, "n_linear_4bit": 0, "n_linear_16bit": 2,
                                            "weights_4bit": False}


def test_peer_jobs_come_last_one_per_setting_and_nothing_changes_without_peer():
    shapes = [Shape(512, 8), Shape(2048, 2)]
    plain = plan_jobs(shapes, baseline=True, variants=[("peft", ["train.fused_lora=false"])])
    assert [j.label for j in plain] == ["ours", "baseline"] and not any(j.peer for j in plain)
    assert plain[0].runs == (("ours", ()), ("ours[peft]", ("train.fused_lora=false",)))
    jobs = plan_jobs(shapes, baseline=True, overrides=["lora.lora_dropout=0"], peer="unsloth", peer_python="/p")
    assert [j.label for j in jobs] == ["ours", "baseline", "unsloth[gc=unsloth]", "unsloth[gc=off]"]
    assert [j.peer["gradient_checkpointing"] for j in jobs[2:]] == ["unsloth", False]
    assert all(j.shapes == tuple(shapes) and j.peer["python"] == "/p" for j in jobs[2:])


def test_isolate_gives_each_variant_a_process_of_its_own():
    shapes = [Shape(512, 8), Shape(2048, 2)]
    variants = [("direct", ["train.optimizer_direct=true"]), ("peft", ["train.fused_lora=false"])]
    shared = plan_jobs(shapes, overrides=["lora.lora_dropout=0"], variants=variants, peer="unsloth", peer_python="/p")
    assert [j.label for j in shared][:1] == ["ours"] and len(shared[0].runs) == 3
    jobs = plan_jobs(shapes, overrides=["lora.lora_dropout=0"], variants=variants, peer="unsloth", peer_python="/p",
                     isolate=True)
    assert [j.label for j in jobs] == ["ours", "ours[direct]", "ours[peft]", "unsloth[gc=unsloth]", "unsloth[gc=off]"]
    assert jobs[0].runs == (("ours", ("lora.lora_dropout=0",)),)
    assert jobs[1].runs == (("ours[direct]", ("lora.lora_dropout=0", "train.optimizer_direct=true")),)
    assert all(j.path == "ours" and j.shapes == tuple(shapes) for j in jobs[:3])


def test_peer_spec_carries_our_settings(monkeypatch):
    """Rank, alpha, the dropout after --set, targets by architecture, optimizer; the checkpoint we load."""
    from qlora_lab.presets import model_config

    monkeypatch.setattr(peer, "checkpoint", lambda preset: f"/cache/{preset}")
    for preset, targets in (("tiny-llama", 7), ("tiny-falcon", 4)):
        job = plan_jobs([Shape(32, 2)], overrides=["lora.lora_dropout=0"], peer="unsloth", peer_python="/p")[-1]
        s = peer.worker_spec(job, preset, steps=5, warmup=1, memory_budget=None)
        assert s["model_path"] == f"/cache/{preset}" and s["gradient_checkpointing"] is False
        assert s["lora"]["r"] == LORA_R and s["lora"]["alpha"] == 16 and s["lora"]["dropout"] == 0
        assert len(s["lora"]["target_modules"]) == targets
        assert s["optimizer"]["name"] == "paged_adamw_32bit" and s["optimizer"]["learning_rate"] == 2e-4
        assert s["shapes"] == [[32, 2]] and s["steps"] == 5 and s["batch_seed"] == BATCH_SEED
        assert s["vocab_size"] == model_config(preset).vocab_size and s["label"] == "unsloth[gc=off]"


def test_peer_rows_get_our_flops_and_say_when_weights_stay_16bit():
    """FLOPs are counted as ours (recomputation only in HFU); a 16-bit base is said in the weights cell."""
    row = {"preset": "falcon-7b", "path": "unsloth[gc=unsloth]", "seq_len": 512, "batch_size": 8, "status": "ok",
           "median_step_s": 0.5, "tokens_per_s": 8176.0, "lora_r": 64, "gradient_checkpointing": "unsloth",
           "weights_bytes": 13 * 2**30, "n_linear": 128, "n_linear_16bit": 128, "weights_4bit": False,
           "peak_allocated_bytes": 15 * 2**30, "plan_words": "Unsloth 2026.10.9, offloaded ckpt all, 16-bit weights"}
    off = {**row, "path": "unsloth[gc=off]", "gradient_checkpointing": False}
    peer.complete_rows([row, off], "falcon-7b")
    assert row["flops_per_token"] == off["flops_per_token"] == off["hw_flops_per_token"] < row["hw_flops_per_token"]
    report = {"env": {}, "comparisons": [], "steps": 20, "warmup_steps": 5, "rows": [row, off]}
    table = markdown(report)
    assert "| falcon-7b | 8x512 | unsloth[gc=unsloth] |" in table and "16-bit weights" in table
    assert "Host load" not in table  # rows without the record (older reports) get no host line
    row["host_load_1min"], off["host_load_1min"] = [1.0, 3.5], [0.5, 0.75]
    report["env"]["cpu_count"] = 16
    assert ("Host load (1-minute average, 16 CPUs) before / after each row's worker: "
            "unsloth[gc=unsloth] 1 / 3.5; unsloth[gc=off] 0.5 / 0.75.") in markdown(report)
    assert "Host probe" not in markdown(report)  # no probes recorded: no probe line
    row["host_probe_ms"], off["host_probe_ms"] = [1.0, 1.2, 1.1, 2.0, 2.2, 2.4], [1.0, 1.0, 1.0, 1.0]
    assert ("Host probe (a fixed Python loop between steps, ms; first half / second half of the steps: a rise "
            "means the host slowed, not the step): unsloth[gc=unsloth] 8x512 1.10 / 2.20; "
            "unsloth[gc=off] 8x512 1.00 / 1.00.") in markdown(report)
    assert "Host timeline" not in markdown(report)
    off["host_phases_ms"] = {"batch": 0.21, "backward": 30.0, "optimizer": 250.25, "bookkeeping": 0.5}
    assert "unsloth[gc=off] 8x512 0.2 / 30.0 / 250.2 / 0.5." in markdown(report).split("Host timeline")[1]


def _script(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _bench(capsys, tmp_path, *extra):
    rc = cli.main(["bench", "--preset", "tiny-llama", "--seq-len", "32", "--batch-size", "2", "--steps", "2",
                   "--output", str(tmp_path / "b.json"), *map(str, extra)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "b.json").exists()  # refused before any worker started
    return err


def test_peer_refuses_a_bad_interpreter_in_one_line(tmp_path, capsys):
    missing = tmp_path / "nope" / "python"
    assert f"--peer-python {missing}: no such file" in _bench(capsys, tmp_path, "--peer", "unsloth", "--peer-python", missing)
    plain = tmp_path / "plain"
    plain.write_text("#!/bin/sh\n")
    assert f"--peer-python {plain}: not executable" in _bench(capsys, tmp_path, "--peer", "unsloth", "--peer-python", plain)
    no_shebang = _script(tmp_path / "noshebang", "exec python3 \"$@\"\n")
    assert f"--peer-python {no_shebang}: " in _bench(capsys, tmp_path, "--peer", "unsloth", "--peer-python", no_shebang)
    # A working Python without unsloth (ours): named, and nothing of unsloth imported here.
    ours = _script(tmp_path / "ours-python", f"#!/bin/sh\nexec {sys.executable} \"$@\"\n")
    err = _bench(capsys, tmp_path, "--peer", "unsloth", "--peer-python", ours)
    assert f"--peer-python {ours}: cannot import unsloth there" in err
    assert "unsloth" not in sys.modules
    assert "--peer unsloth needs --peer-python" in _bench(capsys, tmp_path, "--peer", "unsloth")
    assert "give --peer NAME" in _bench(capsys, tmp_path, "--peer-python", ours)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_peer_without_cuda_fails_in_one_line(tmp_path, capsys):
    fake = tmp_path / "site"
    (fake / "unsloth").mkdir(parents=True)
    (fake / "unsloth" / "__init__.py").write_text("raise ImportError('never imported by the probe')\n")
    wrapper = _script(tmp_path / "peer-python", f"#!/bin/sh\nPYTHONPATH={fake}{os.pathsep}$PYTHONPATH "
                                                f"exec {sys.executable} \"$@\"\n")
    err = _bench(capsys, tmp_path, "--peer", "unsloth", "--peer-python", wrapper)
    assert "--peer unsloth needs a CUDA GPU" in err


def test_both_workers_time_a_step_with_the_same_code():
    """The host probe (a fixed loop between steps) and the host phases of a step come from profiling.py, which
    our worker imports and the peer's loads by path: one piece of code measures both rows."""
    import inspect

    from qlora_lab.bench import profiling, unsloth_worker, worker

    peers = unsloth_worker._profiling()
    assert inspect.getsourcefile(peers.host_phases) == inspect.getsourcefile(profiling.host_phases)
    assert worker.profiling is profiling and not hasattr(worker, "host_probe_ms")
    assert not hasattr(unsloth_worker, "host_probe_ms") and not hasattr(unsloth_worker, "host_phases")
    assert profiling.host_probe_ms(1000) > 0
    marks = {"batch": 10.001, "backward": 10.031, "optimizer": 10.281, "bookkeeping": 10.2815}
    want = {"batch": 1.0, "backward": 30.0, "optimizer": 250.0, "bookkeeping": 0.5}
    for m in (profiling, peers):
        got = m.host_phases(10.0, marks)
        assert list(got) == list(want) and all(abs(got[k] - want[k]) < 1e-6 for k in want)
        assert list(m.host_phases(10.0, {"batch": 10.5, "optimizer": 11.0})) == ["batch", "optimizer"]
    steps = [{"batch": 1.0, "optimizer": 5.0}, {"batch": 3.0, "optimizer": 1.0}, {"batch": 2.0, "optimizer": 9.0}]
    assert profiling.median_phases(steps) == peers.median_phases(steps) == {"batch": 2.0, "optimizer": 5.0}


def test_each_peer_row_meets_our_fastest_row_that_peaks_no_higher():
    """bench.compare_peer: at each peer row, our fastest one-GPU row of the same preset and shape whose peak
    allocated memory is at most 5% above the peer's; a row of ours that peaks higher, failed, ran on several GPUs
    or trained another shape does not count; none left says so in the table."""
    from qlora_lab.bench import compare_peer

    G = 2**30

    def row(path, tok, gib, seq=512, batch=8, **kw):
        return {"preset": "llama2-7b", "path": path, "seq_len": seq, "batch_size": batch, "status": "ok",
                "median_step_s": 1.0, "tokens_per_s": tok, "peak_allocated_bytes": int(gib * G),
                "losses": [2.0, 1.9, 1.8], **kw}

    rows = [row("ours", 14000, 19.0), row("ours[offload]", 10000, 6.25, peak_reserved_bytes=int(7.5 * G)),
            row("ours[offload-eager]", 9500, 5.9),
            row("ours[ckpt-all]", 11000, 6.31), row("ours[dp]", 30000, 3.0, world_size=2),
            row("ours[budget15]", 50000, 5.0, seq=2048, batch=2), {**row("ours[oom]", 0, 0), "status": "oom"},
            row("baseline", 20000, 5.0),
            row("unsloth[gc=unsloth]", 9000, 6.0, losses=[2.0, 1.9, 1.8 * 1.001], peak_reserved_bytes=6 * G),
            row("unsloth[gc=off]", 14500, 20.0), row("unsloth[gc=unsloth]", 8000, 5.0, seq=1024, batch=4),
            row("unsloth[gc=unsloth]", 40000, 4.0, seq=2048, batch=2)]
    low, off, alone, above = compare_peer(rows)
    assert (low["ours"], low["ours_tokens_per_s"], low["peer"]) == ("ours[offload]", 10000, "unsloth[gc=unsloth]")
    assert low["speedup"] == pytest.approx(10000 / 9000) and low["peak_ratio"] == pytest.approx(6.25 / 6.0, rel=1e-6)
    assert low["loss_max_rel_diff"] == pytest.approx(0.001 / 1.001, rel=1e-3) and low["loss_steps"] == 3
    assert (off["ours"], off["speedup"]) == ("ours", pytest.approx(14000 / 14500))
    assert low["reserved_ratio"] == pytest.approx(7.5 / 6) and "reserved_ratio" not in off  # the peer's unknown
    assert alone["ours"] is None and alone["seq_len"] == 1024 and "speedup" not in alone and "closest" not in alone
    # A shape where ours all peak too high: the lowest of them named, with by how much it misses
    assert above["ours"] is None and above["closest"] == {"path": "ours[budget15]", "speedup": 50000 / 40000,
                                                          "peak_ratio": pytest.approx(5.0 / 4.0)}
    report = {"env": {}, "comparisons": [], "steps": 20, "warmup_steps": 5, "rows": rows,
              "peer_comparisons": [low, off, alone, above]}
    table = markdown(report)
    assert ("| llama2-7b | 8x512 | unsloth[gc=unsloth] | 9000 | 6.0 | ours[offload] | 10000 | 6.2 | 1.11x | +4.2% "
            "| +25.0% | 0.10% over 3 steps |") in table
    assert "| llama2-7b | 8x512 | unsloth[gc=off] | 14500 | 20.0 | ours | 14000 | 19.0 | 0.97x | -5.0% |  | 0.00% over 3 steps |" in table
    assert "| llama2-7b | 4x1024 | unsloth[gc=unsloth] | 8000 | 5.0 | none peaks that low | |" in table
    assert ("| llama2-7b | 2x2048 | unsloth[gc=unsloth] | 40000 | 4.0 | none peaks that low (lowest: ours[budget15], "
            "1.25x at +25.0%) |") in table
    assert "At each peer row" not in markdown({**report, "peer_comparisons": []})
