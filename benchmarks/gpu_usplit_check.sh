#!/usr/bin/env bash
# One device call: does the uSplit baseline behave the same on CUDA, with and without autocast, as on the CPU
# (docs/quality.md: at the small preset it passes the input noise through and scores like input / 2)?
# Trains small-preset uSplit and denoiSplit on W2S 0/2, Gaussian x2, for the same number of steps, evaluates them
# on the 8 test fields with the floors, once with autocast (the default) and once without.
#
#   bash benchmarks/gpu_usplit_check.sh W2S.npz [STEPS]     # results in $OUT/amp, $OUT/no_amp
#
# The W2S file lives outside the repo (../shared/data): copy it into an ignored folder that `carry` names.
# Budget: ~2 x 2 x STEPS training steps (2000 steps of the small preset take ~1 min on an H100) plus evaluation.
set -u
DATA=${1:?usage: gpu_usplit_check.sh W2S.npz [STEPS]}
STEPS=${2:-2000}
OUT=${OUT:-/tmp/gpu_usplit_out}
cd "$(dirname "$0")/.." || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
for amp in amp no-amp; do
  timeout -k 5 280 python benchmarks/bench_quality.py --data "$DATA" --preset small --steps "$STEPS" --pairs 0,2 \
      --gaussian 2 --no-real-noise --losses usplit denoisplit naive no_split --early-stop-patience 100000 \
      --samples 20 --device cuda --"$amp" --out "$OUT/${amp/-/_}" 2>&1 | tail -n 8
done
