#!/usr/bin/env bash
# Every GPU benchmark of the training-speed issue, in one go (~10 min on one H200).
# Run from the repository root on a CUDA host:  bash bench/gpu_all.sh [python]
# Results: bench/results/*_cuda*.json (commit them); logs: bench/results/gpu_all.log.
set -uo pipefail
PY=${1:-python}
R=bench/results
mkdir -p "$R"
LOG=$R/gpu_all.log
: > "$LOG"
run() {  # name, command...: a failure is logged and the next benchmark still runs
  local name=$1; shift
  echo "=== $name: $* ($(date -u +%H:%M:%S))" | tee -a "$LOG"
  "$@" > /dev/null 2>> "$LOG" || echo "!!! $name failed (exit $?)" | tee -a "$LOG"
}
# ViT-B/16 224 bf16 batch 128: ours eager/compiled/noclip, microsoft's formulation, lightly's recipe
# fp32 and bf16, plain timm eager and compiled; eager-vs-compiled loss check (5 steps).
run vit_b128 "$PY" bench/train_step.py --out "$R/train_step_cuda.json"
# batch 256: the fast configs only
run vit_b256 "$PY" bench/train_step.py --batch-size 256 --rounds 2 --loss-check-steps 0 \
  --configs ours_compiled,lightly_recipe_bf16,timm_plain_compiled --out "$R/train_step_cuda_b256.json"
run swin "$PY" bench/train_step.py --suite swin --rounds 2 --out "$R/train_step_cuda_swin.json"
run convnets "$PY" bench/train_step.py --suite convnets --rounds 2 --out "$R/train_step_cuda_convnets.json"
run embed "$PY" bench/train_step.py --suite embed --out "$R/embed_speed_cuda.json"
run max_batch "$PY" bench/train_step.py --find-max-batch vit_base_patch16_224,vit_large_patch16_224 \
  --batch-size 256 --max-batch-tolerance 0.15 --out "$R/train_step_cuda_max_batch.json"
run input_pipeline "$PY" bench/input_pipeline.py --steps 100 --out "$R/input_pipeline_cuda.json"
echo "done ($(date -u +%H:%M:%S)); results:" | tee -a "$LOG"
ls -l "$R"/*cuda*.json | tee -a "$LOG"
