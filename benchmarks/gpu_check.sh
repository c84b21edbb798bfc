#!/usr/bin/env bash
# One device call (<= 150 s wall on an H100): inference (reference procedure vs ours, eager + TorchScript, ONNX
# Runtime only where onnxruntime has the CUDA provider) and training-step throughput (fp32 / bf16 / channels_last)
# on CUDA, JSON + logs into "$OUT". Every benchmark runs under `timeout` and writes its JSON after each
# configuration, so a timeout keeps what was measured; a failure does not stop the next benchmark.
#
#   bash benchmarks/gpu_check.sh                 # random-weight paper-preset model
#   bash benchmarks/gpu_check.sh RUN_DIR         # a trained run (its architecture and weights; synthetic images
#                                                # unless the run's data path is readable there)
#
# Needs torch (CUDA), numpy, scipy; pydantic only with RUN_DIR (the lead carries wheels and sets PYTHONPATH).
# Budget: inference <= 95 s, training <= 40 s, plus start-up.
# GPU_CHECK_DRY=1: the same plumbing on the CPU with the tiny preset and small sizes (a local check of the script).
set -u
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
RUN=${1:-}
T0=$(date +%s)

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >"$OUT/nvidia_smi.txt" 2>&1 || true
python -c "import torch, sys; print(torch.__version__, torch.cuda.get_device_name(0))" 2>&1 | tee -a "$OUT/nvidia_smi.txt"

DEV=cuda; PRESET=paper; SIZES=(512 2048); KS=(1 16 50); TRAIN_PRESETS=(small paper)
if [ "${GPU_CHECK_DRY:-0}" = 1 ]; then DEV=cpu; PRESET=tiny; SIZES=(128 256); KS=(1 4); TRAIN_PRESETS=(tiny); fi
if [ -n "$RUN" ]; then MODEL=(--run "$RUN"); else MODEL=(--preset "$PRESET"); fi
# ORT: bench_inference drops the onnx variants itself when onnxruntime or its CUDA provider is missing
timeout -k 5 95 python benchmarks/bench_inference.py "${MODEL[@]}" --device "$DEV" --sizes "${SIZES[@]}" \
    --samples "${KS[@]}" --variants ref eager torchscript onnx --time-limit 4 --isolate no \
    --json "$OUT/inference_cuda.json" >"$OUT/inference_cuda.log" 2>&1
echo "bench_inference rc=$? after $(( $(date +%s) - T0 )) s" | tee -a "$OUT/inference_cuda.log"
tail -n 45 "$OUT/inference_cuda.log"

timeout -k 5 40 python benchmarks/bench_training.py --presets "${TRAIN_PRESETS[@]}" --device "$DEV" --steps 10 --warmup 3 \
    --isolate no --json "$OUT/training_cuda.json" >"$OUT/training_cuda.log" 2>&1
echo "bench_training rc=$? after $(( $(date +%s) - T0 )) s" | tee -a "$OUT/training_cuda.log"
tail -n 16 "$OUT/training_cuda.log"
echo "gpu_check done in $(( $(date +%s) - T0 )) s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
