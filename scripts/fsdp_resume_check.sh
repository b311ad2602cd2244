#!/usr/bin/env bash
# Sharded QLoRA through `qlora-lab train` on 2 GPUs: train a random-weight Llama-2-7B shape with FSDP,
# SIGKILL it after a checkpoint, --resume to the end, then load the adapter with stock peft.
# Records what it saw under OUT (default fsdp-check/). Needs 2 CUDA GPUs, accelerate, bitsandbytes, peft.
#
#   bash scripts/fsdp_resume_check.sh [OUT]
set -uo pipefail
OUT=${1:-fsdp-check}
W=$(mktemp -d)
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 QLORA_LAB_CACHE=${QLORA_LAB_CACHE:-$W/cache}
Q=(python3 -m qlora_lab.cli)
"${Q[@]}" data synth lima -o "$W/lima_raw.jsonl" -n 200 && "${Q[@]}" data lima "$W/lima_raw.jsonl" -o "$W/lima.jsonl" || exit 1
python3 -c "from qlora_lab.presets import cached_model; cached_model('llama2-7b')" || exit 1  # written once, before the ranks start
train=(accelerate launch --config_file configs/accelerate/fsdp_qlora.yaml -m qlora_lab.cli train
       configs/llama2_7b_lima_qlora.yaml --set model.name_or_path=null --set model.random_init=llama2-7b
       --set data.train_file="$W/lima.jsonl" --set data.eval_size=0 --set logging.report_to=none
       --set train.max_steps=8 --set train.save_steps=2 --set train.eval_steps=null --set data.max_length=512
       --set train.per_device_train_batch_size=2 --set train.gradient_accumulation_steps=1
       --output-dir "$W/run")
t0=$(date +%s)
setsid "${train[@]}" >"$OUT/first.log" 2>&1 &
pid=$!
while kill -0 $pid 2>/dev/null && [ ! -f "$W/run/checkpoints/checkpoint-4/qlora_lab_state.json" ]; do sleep 0.2; done
# the launcher and its workers (torchrun starts them in sessions of their own)
pkill -9 -f -- "--output-dir $W/run" ; kill -9 -- -$pid 2>/dev/null; wait $pid; echo "first run killed after checkpoint-4 ($(( $(date +%s) - t0 )) s)" | tee "$OUT/summary.txt"
ls -R "$W/run/checkpoints" > "$OUT/checkpoints_after_kill.txt"
cat "$W/run/status.json" >> "$OUT/summary.txt"
"${train[@]}" --resume >"$OUT/resume.log" 2>&1; echo "resume exit $?" | tee -a "$OUT/summary.txt"
cp "$W/run/metrics.jsonl" "$W/run/status.json" "$W/run/train_summary.json" "$W/run/plan.json" "$OUT/" 2>/dev/null
python3 - "$W/run" >>"$OUT/summary.txt" 2>&1 <<'PY'
# The adapter a user gets: stock transformers + peft, no qlora_lab.
import json, sys, warnings, torch
from pathlib import Path
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM
from qlora_lab.presets import cached_model
run = Path(sys.argv[1])
last = sorted(run.glob("checkpoints/checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
for name, d in (("run adapter", run / "adapter"), (last.name, last)):
    f = d / "adapter_model.safetensors"
    if not f.is_file():
        print(name, "no adapter_model.safetensors"); continue
    with safe_open(str(f), "pt") as t:
        keys = sorted(t.keys())
        b = max((t.get_tensor(k).float().abs().max().item() for k in keys if "lora_B" in k), default=None)
    print(f"{name}: {len(keys)} tensors, e.g. {keys[:2]}, max |lora_B| {b}")
base = AutoModelForCausalLM.from_pretrained(cached_model("llama2-7b"), dtype=torch.bfloat16, device_map={"": 0})
x = torch.randint(4, 30000, (1, 32), device="cuda")
with torch.no_grad():
    before = base(input_ids=x).logits.float()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    model = PeftModel.from_pretrained(base, str(run / "adapter"))
missing = [str(w.message)[:120] for w in caught if "missing" in str(w.message).lower()]
with torch.no_grad():
    after = model(input_ids=x).logits.float()
change = (after - before).abs().max().item()
print("stock PeftModel.from_pretrained:", "missing keys: " + missing[0] if missing else "all adapter keys found",
      "| logits finite", bool(after.isfinite().all()), "| max change from base", round(change, 4))
rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
print("steps logged", [r["step"] for r in rows if "loss" in r], "losses", [round(r["loss"], 4) for r in rows if "loss" in r])
print("ADAPTER", "OK" if not missing and change > 0 else "FAIL")
PY
cat "$OUT/summary.txt"
