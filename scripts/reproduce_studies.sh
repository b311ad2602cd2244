#!/usr/bin/env bash
# Reproduce assets/studies/: both studies on one GPU with random-weight models of the real 7B shapes.
# No hub needed: the data are the project's own files in the real OASST1 / LIMA formats (tests/fixtures).
# Time and memory figures are real for these shapes; the generated text is gibberish (random weights).
#
#   bash scripts/reproduce_studies.sh [ASSETS_DIR] [WORK_DIR]
#   FALCON=tiny-falcon LLAMA=tiny-llama LLAMA_STEPS=4 FALCON_STEPS=4 MAX_NEW=8 bash scripts/reproduce_studies.sh /tmp/a /tmp/w   # CPU smoke run
set -euo pipefail
ASSETS=${1:-assets/studies}
WORK=${2:-runs/studies}
FALCON=${FALCON:-falcon-7b}
LLAMA=${LLAMA:-llama2-7b}
FALCON_STEPS=${FALCON_STEPS:-200}   # the study's 200 steps
LLAMA_STEPS=${LLAMA_STEPS:-60}      # the config's 300 are for real LIMA; 60 shows the curves' shape
MAX_NEW=${MAX_NEW:-500}             # the study's sampling: 500 new tokens, T=0.8, top-p 0.9
Q=(python3 -m qlora_lab.cli)
mkdir -p "$WORK" "$ASSETS"

"${Q[@]}" data oasst1 tests/fixtures/oasst1_messages.jsonl -o "$WORK/oasst1.jsonl"
"${Q[@]}" data lima tests/fixtures/lima_sample.jsonl -o "$WORK/lima.jsonl"

common=(--set model.name_or_path=null --set logging.report_to=none --set data.eval_file=null
        --set data.eval_size=2 --set train.save_steps=100000 --set train.eval_steps=20
        --set generation.max_new_tokens="$MAX_NEW")

# Study 1: Falcon-7B, QLoRA, lr 2e-4, 200 steps.
"${Q[@]}" train configs/falcon7b_oasst1_qlora.yaml "${common[@]}" --set model.random_init="$FALCON" \
  --set data.train_file="$WORK/oasst1.jsonl" --set train.max_steps="$FALCON_STEPS" \
  --output-dir "$WORK/falcon7b_oasst1_qlora"
"${Q[@]}" compare "$WORK/falcon7b_oasst1_qlora" --prompts oasst1_levels --no-progress \
  --set generation.max_new_tokens="$MAX_NEW" -o "$ASSETS/falcon7b_oasst1" \
  --title "Falcon-7B shape (random weights) + QLoRA on OASST1-format data"
"${Q[@]}" plot "$WORK/falcon7b_oasst1_qlora" -o "$ASSETS/falcon7b_oasst1/loss.png"

# Study 2: Llama-2-7B on LIMA, QLoRA and plain 16-bit LoRA from the same seed and batches.
for method in qlora lora; do
  "${Q[@]}" train "configs/llama2_7b_lima_$method.yaml" "${common[@]}" --set model.random_init="$LLAMA" \
    --set data.train_file="$WORK/lima.jsonl" --set train.max_steps="$LLAMA_STEPS" \
    --output-dir "$WORK/llama2_7b_lima_$method"
done
"${Q[@]}" compare "$WORK/llama2_7b_lima_qlora" "$WORK/llama2_7b_lima_lora" --prompts lima_examples --no-progress \
  --set generation.max_new_tokens="$MAX_NEW" -o "$ASSETS/llama2_7b_lima" \
  --title "Llama-2-7B shape (random weights): base vs QLoRA vs LoRA on LIMA-format data"
"${Q[@]}" plot "$WORK/llama2_7b_lima_qlora" "$WORK/llama2_7b_lima_lora" -o "$ASSETS/llama2_7b_lima/loss.png"

# Run folders without weights (adapters and checkpoints stay out of the repo).
for run in "$WORK"/*/; do
  name=$(basename "$run")
  mkdir -p "$ASSETS/runs/$name"
  for f in config.yaml metrics.jsonl model_summary.json train_summary.json plan.json env.json data_stats.json status.json; do
    [ -f "$run/$f" ] && cp "$run/$f" "$ASSETS/runs/$name/"
  done
done
echo "results under $ASSETS"
