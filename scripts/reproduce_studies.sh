#!/usr/bin/env bash
# Reproduce assets/studies/ on one GPU without a model hub: random-weight models of the real 7B shapes
# (time and memory real, generated text gibberish) trained on synthetic corpora of OASST1's and LIMA's
# real size and token lengths, through the same code as the notebooks (qlora_lab/studies.py).
#
#   bash scripts/reproduce_studies.sh [ASSETS_DIR] [WORK_DIR]
#   LLAMA_STEPS=100 BUDGET_STEPS=30 bash scripts/reproduce_studies.sh      # shorter Llama arms (stated in the results)
#   With real weights and data (a network): qlora-lab study NAME -o DIR (no --offline).
set -euo pipefail
ASSETS=${1:-assets/studies}
WORK=${2:-runs/studies}
LLAMA_STEPS=${LLAMA_STEPS:-}        # empty: the config's 300 steps
BUDGET_STEPS=${BUDGET_STEPS:-}      # steps of the 15 GiB (T4-class) run of each QLoRA arm; empty: as the arm
GPUS=${GPUS:-}                      # e.g. 0,1: a study's runs side by side, one per GPU; empty: one after another
Q=(python3 -m qlora_lab.cli study --offline --work-dir "$WORK" --memory-budget 15 --no-progress)
[ -n "$BUDGET_STEPS" ] && Q+=(--budget-steps "$BUDGET_STEPS")
[ -n "$GPUS" ] && Q+=(--gpus "$GPUS")

"${Q[@]}" falcon7b_oasst1 -o "$ASSETS/falcon7b_oasst1"
"${Q[@]}" llama2_7b_lima -o "$ASSETS/llama2_7b_lima" ${LLAMA_STEPS:+--steps "$LLAMA_STEPS"}

# Run folders without weights (adapters and checkpoints stay out of the repo).
for run in "$WORK"/*/*/; do
  [ -f "$run/config.yaml" ] || continue
  name=$(basename "$run")
  mkdir -p "$ASSETS/runs/$name"
  for f in config.yaml metrics.jsonl model_summary.json train_summary.json plan.json env.json data_stats.json status.json; do
    [ -f "$run/$f" ] && cp "$run/$f" "$ASSETS/runs/$name/"
  done
done
echo "results under $ASSETS"
