#!/usr/bin/env bash
# The several-GPU mode in one device call: install, then `python -m benchmarks.distributed` on one
# configuration for hf_ddp, sloth_fx_ddp and sloth_fx_fsdp2 (each system: N processes, 1 process on
# the per-GPU batch, 1 process on the global batch), each torchrun launch its own subprocess with
# its own timeout, the whole bounded by --budget. $OUT gets distributed.md (the summary table),
# dist.log and dist_results.tar.gz (every JSON row and launch log).
#
# Usage (device tool, kind nvidia-h200-x2, nothing to carry):
#   bash benchmarks/gpu_dist.sh --budget 500
#   bash benchmarks/gpu_dist.sh --budget 300 --layers 2 --steps 4     (smoke run)
# Options:
#   --budget S       seconds for the whole script (default 500; keep it under the call's limit)
#   --config C       default E1          --systems LIST  default hf_ddp,sloth_fx_ddp,sloth_fx_fsdp2
#   --gpus N         processes of the several-GPU run (default: every visible GPU)
#   --layers N       override model depth (smoke runs)    --steps N  steps per run (default 6, 3 warm-up)
#   --timeout S      per launch at most (default 180)     --no-loss-check  skip the 1-process global-batch runs
set -uo pipefail
cd "$(dirname "$0")/.."

BUDGET=500 CONFIG=E1 SYSTEMS=hf_ddp,sloth_fx_ddp,sloth_fx_fsdp2 GPUS="" LAYERS="" STEPS=6 TIMEOUT=180 EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --budget) BUDGET=$2; shift ;;
    --config) CONFIG=$2; shift ;;
    --systems) SYSTEMS=$2; shift ;;
    --gpus) GPUS=$2; shift ;;
    --layers) LAYERS=$2; shift ;;
    --steps) STEPS=$2; shift ;;
    --timeout) TIMEOUT=$2; shift ;;
    --no-loss-check) EXTRA+=(--no-loss-check) ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done

START=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - START))); }
OUT=${OUT:-/tmp/dist_out}
RES=/tmp/dist_results
rm -rf "$RES"
mkdir -p "$OUT" "$RES"
LOG=$OUT/dist.log
# NVLink multicast (NVLS) stays off on the lent machines.
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
PY=python3
say() { echo "[$(date +%H:%M:%S) +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

[ -n "$GPUS" ] || GPUS=$(nvidia-smi --list-gpus 2>/dev/null | wc -l)
say "distributed: config=$CONFIG systems=$SYSTEMS gpus=$GPUS layers=${LAYERS:-full} steps=$STEPS budget=${BUDGET}s"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
nvidia-smi topo -m >>"$LOG" 2>&1

$PY -m pip install -q --no-deps --no-build-isolation -e . >>"$LOG" 2>&1 || say "WARNING: editable install failed"
say "installed; $($PY -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__, "nccl", torch.cuda.nccl.version())' 2>&1 | tail -n 1)"

B=$(( $(left) - 15 ))
say "benchmarks.distributed (budget ${B}s, at most ${TIMEOUT}s a launch)"
$PY -m benchmarks.distributed --config "$CONFIG" --systems "$SYSTEMS" --gpus "$GPUS" --steps "$STEPS" \
    --results "$RES" --budget-s "$B" --timeout "$TIMEOUT" ${LAYERS:+--layers "$LAYERS"} "${EXTRA[@]}" 2>&1 | tee -a "$LOG"

cp "$RES/distributed.md" "$OUT/" 2>/dev/null || say "no distributed.md"
tar -czf "$OUT/dist_results.tar.gz" -C "$RES" . 2>>"$LOG"
say "done; $(ls "$OUT" | tr '\n' ' ')"
