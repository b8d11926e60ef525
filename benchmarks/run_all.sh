#!/usr/bin/env bash
# Every figure of BENCHMARKS.md and the README's reliability table, one after another, on a quiet machine
# (about 30 minutes on 2 cores). Models: the quickstart's (quick profile; speed does not depend on quality).
#
#   bash benchmarks/run_all.sh [WORK=/tmp/bench] [OUT=docs/benchmarks]
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/bench}
OUT=${2:-docs/benchmarks}
mkdir -p "$OUT"
[ -d "$WORK/model_repository" ] || genserve quickstart --workdir "$WORK"
REPO=$WORK/model_repository
log() { echo "[run_all $(date -u +%H:%M:%S), load $(cut -d' ' -f1-3 /proc/loadavg)] $*" >&2; }

log "a. dynamic batching on vs off"
python -m benchmarks.ratios batching --repo "$REPO" --out-dir "$OUT"
log "b. server at saturation vs the in-process ceiling"
python -m benchmarks.ratios ceiling --repo "$REPO" --out-dir "$OUT"
log "c. ONNX Runtime vs PyTorch eager"
python -m benchmarks.ratios ort-torch --repo "$REPO" --checkpoints "$WORK/checkpoints" --out-dir "$OUT"
log "d. arrnn step graph vs prefix; samples/s"
python -m benchmarks.ratios sampling --repo "$REPO" --clients 8 --out-dir "$OUT"
for model in realnvp vae; do
  log "sweep: digits-$model 1-row LogLikelihood"
  python -m benchmarks.run --repo "$REPO" --model "digits-$model" --operation log_likelihood --rows 1 \
    --concurrency 1,2,4,8,16,32,64 --processes 2 --max-batch-size 64 \
    --out "$OUT/sweep-$model-loglik.json" --plot "$OUT/sweep-$model-loglik.png"
done
for ms in 5 0.2; do
  log "switch interval $ms ms: digits-realnvp 1-row LogLikelihood, 64 clients"
  python -m benchmarks.run --repo "$REPO" --model digits-realnvp --operation log_likelihood --rows 1 \
    --concurrency 64 --processes 2 --max-batch-size 64 --switch-interval-ms "$ms" --out "$OUT/switch-$ms.json"
done
log "soak: 64 clients, 20000 requests over every operation of every model"
python scripts/soak.py --repo "$REPO" --requests 20000 --json "$OUT/soak.json"
log "done"
