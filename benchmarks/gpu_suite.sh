#!/usr/bin/env bash
# The whole GPU suite in one device call: install, GPU tests, end-to-end runs, kernel
# microbenchmarks, optional E6 bisection, report. Everything lands under $OUT (at most 8 files:
# report.md, suite.log, tokens_per_s.png, peak_memory.png and results.tar.gz with every JSON row,
# log and plot). Each stage is bounded by what is left of --budget; each e2e system/config runs in
# its own subprocess with its own timeout, so a crash or hang costs one row, never the call.
#
# Usage (device tool, carry [".whl"]; fetch the wheels first with benchmarks/fetch_wheels.sh):
#   bash benchmarks/gpu_suite.sh --budget 540 --configs E1,E2,E3
#   bash benchmarks/gpu_suite.sh --budget 300 --configs S2 --layers 2 --no-kernels
# Options:
#   --budget S          seconds for the whole script (default 540; keep it under the call's limit)
#   --configs LIST      e2e configurations (default E1,E2,E3; "none" skips e2e)
#   --systems LIST      default hf,liger,compile,unsloth,sloth_fx
#   --layers N          override model depth (smoke runs)     --steps N  steps per run (default 8)
#   --e2e-timeout S     per run at most (default 240)
#   --no-tests | --tests-timeout S (default 180)   --no-kernels | --kernels-timeout S (default 150)
#                       (326 GPU tests took 64 s on an H200 on 2026-11-30; on a cold machine 325 once needed over 110 s)
#   --tests-workers N   pytest-xdist processes for the GPU tests when xdist is installed (default 8:
#                       the tests are mostly compile time, which is host work)
#   --profile CONFIG[:SYSTEMS]  before e2e: GPU busy share, kernels and host functions of a step
#   --ab CONFIG:MODULE.NAME=V1,V2  before e2e: sloth_fx in one process, blocks alternating the values
#   --kernel-ops LIST   subset of ops
#   --maxlen LO:HI:GRAN[:SYSTEMS[:CONFIG]]  run E6's bisection (CONFIG: E6, Llama-2-7B nf4, or E6L3, Llama-3-8B nf4)
#   --ladder            E6 climbs LO, LO+GRAN, ... in one worker per system (one model build) instead of bisecting
#   --memory-cap GIB    cap PyTorch's allocator in every run once its model is built (a smaller GPU on this one)
#   --sft SYSTEMS[:CONFIG]  after e2e: TRL's SFTTrainer with padding_free=True (CONFIG default R1)
#   --lora-plans        per projection: PEFT vs each fused LoRA form, with the cost model's prediction
#   --unsloth-offload   Unsloth's offloaded checkpointing instead of plain
#   --stacks LIST       transformers stacks to run the GPU tests and e2e under, one after the other
#                       (default image: the GPU image's own); another name S installs the wheels of
#                       .whl/stack-S/ (group [stack-S] of wheels.txt) into /tmp/site-S, put first on
#                       the path for that stack's runs. Each stack's rows land in their own results
#                       folder and report (report-S.md); profile, ab, sft, kernels and maxlen run
#                       under the image's stack
#   --fresh             forget earlier results on this (warm) machine; by default rows of earlier
#                       calls to the same machine stay in /tmp/bench_results and join the report
#                       (one table can be filled over several calls to one warm machine)
set -uo pipefail
cd "$(dirname "$0")/.."

BUDGET=540 CONFIGS=E1,E2,E3 SYSTEMS=hf,liger,compile,unsloth,sloth_fx LAYERS="" STEPS=8
STACKS=image LORA_PLANS=0 FRESH=0 E2E_TIMEOUT=240 TESTS=1 TESTS_TIMEOUT=180 TESTS_WORKERS=8 PROFILE="" AB="" KERNELS=1 KERNELS_TIMEOUT=150 KOPS="" MAXLEN="" SFT="" EXTRA=() MAXLEN_ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --budget) BUDGET=$2; shift ;;
    --configs) CONFIGS=$2; shift ;;
    --systems) SYSTEMS=$2; shift ;;
    --layers) LAYERS=$2; shift ;;
    --steps) STEPS=$2; shift ;;
    --e2e-timeout) E2E_TIMEOUT=$2; shift ;;
    --no-tests) TESTS=0 ;;
    --tests-timeout) TESTS_TIMEOUT=$2; shift ;;
    --tests-workers) TESTS_WORKERS=$2; shift ;;
    --profile) PROFILE=$2; shift ;;
    --ab) AB=$2; shift ;;
    --no-kernels) KERNELS=0 ;;
    --kernels-timeout) KERNELS_TIMEOUT=$2; shift ;;
    --kernel-ops) KOPS=$2; shift ;;
    --maxlen) MAXLEN=$2; shift ;;
    --sft) SFT=$2; shift ;;
    --lora-plans) LORA_PLANS=1 ;;
    --unsloth-offload) EXTRA+=(--unsloth-offload) ;;
    --memory-cap) EXTRA+=(--memory-cap-gib "$2"); shift ;;
    --ladder) MAXLEN_ARGS+=(--ladder) ;;
    --stacks) STACKS=$2; shift ;;
    --fresh) FRESH=1 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done

START=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - START))); }
min() { [ "$1" -lt "$2" ] && echo "$1" || echo "$2"; }
OUT=${OUT:-/tmp/bench_out}
RES=/tmp/bench_results
[ "$FRESH" = 1 ] && rm -rf "$RES"
mkdir -p "$OUT" "$RES"
LOG=$OUT/suite.log
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false SLOTH_BENCH_MODEL_DIR=/tmp/sloth_bench_models
PY=python3
say() { echo "[$(date +%H:%M:%S) +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

say "suite: configs=$CONFIGS systems=$SYSTEMS layers=${LAYERS:-full} budget=${BUDGET}s"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"

# 1. Install the project (editable, no network) and the carried wheels into /tmp/site.
$PY -m pip install -q --no-deps --no-build-isolation -e . >>"$LOG" 2>&1 || say "WARNING: editable install failed"
shopt -s nullglob
WHEELS=()
for w in .whl/*.whl .whl/*/*.whl; do
  case "$w" in .whl/stack-*) ;; *) WHEELS+=("$w") ;; esac  # a stack's wheels go on its own path
done
shopt -u nullglob
STAMP=$(stat -c "%n %s" "${WHEELS[@]}" 2>/dev/null | md5sum | cut -c1-16)
if [ ${#WHEELS[@]} -gt 0 ] && [ "$(cat /tmp/site/.stamp 2>/dev/null)" = "$STAMP" ]; then
  say "carried wheels already installed in /tmp/site (warm machine)"
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
elif [ ${#WHEELS[@]} -gt 0 ]; then
  say "installing ${#WHEELS[@]} carried wheels into /tmp/site"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "${WHEELS[@]}" >>"$LOG" 2>&1 && echo "$STAMP" >/tmp/site/.stamp || say "WARNING: wheel install failed (see log)"
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
versions() {  # what this stack runs, into $1/versions.txt and the log
  mkdir -p "$1"
  $PY - >"$1/versions.txt" 2>&1 <<'PY'
from importlib import metadata
for m in ("torch", "triton", "transformers", "kernels", "huggingface_hub", "peft", "bitsandbytes", "liger-kernel",
          "unsloth", "sloth_fx"):
    try:
        print(f"{m}: {metadata.version(m)}")
    except metadata.PackageNotFoundError:
        print(f"{m}: not installed")
PY
  cat "$1/versions.txt" >>"$LOG"
  say "installed; $(tr '\n' ';' <"$1/versions.txt")"
}

# 2. GPU tests, into results folder $1.
gpu_tests() {
  local T XDIST=()
  T=$(min "$TESTS_TIMEOUT" "$(left)")
  $PY -c "import xdist" 2>/dev/null && [ "$TESTS_WORKERS" -gt 1 ] && XDIST=(-n "$TESTS_WORKERS")
  say "pytest -m gpu ${XDIST[*]} (timeout ${T}s)"
  timeout "$T" $PY -m pytest -m gpu tests -q -p no:cacheprovider "${XDIST[@]}" >"$1/pytest_gpu.log" 2>&1
  say "pytest exit $?: $(tail -n 1 "$1/pytest_gpu.log")"
}

# 3. End-to-end runs (the table) into results folder $1, with a share of what is left for each of
# the $2 stacks still to run, leaving room for kernels and the report.
e2e() {
  local RESERVE=$(( KERNELS == 1 ? 90 : 20 )) B
  B=$(( ($(left) - RESERVE) / $2 ))
  say "e2e (budget ${B}s, at most ${E2E_TIMEOUT}s a run)"
  $PY -m benchmarks e2e --configs "$CONFIGS" --systems "$SYSTEMS" --results "$1" --budget-s "$B" \
      --timeout "$E2E_TIMEOUT" --steps "$STEPS" ${LAYERS:+--layers "$LAYERS"} "${EXTRA[@]}" 2>&1 | tee -a "$LOG"
}

# 2-3. Per stack: its wheels on the path, the GPU tests and the e2e table, in its own results folder.
BASE_PYTHONPATH=${PYTHONPATH:-}
IFS=, read -ra STACK_LIST <<<"$STACKS"
for i in "${!STACK_LIST[@]}"; do
  STACK=${STACK_LIST[$i]}
  SRES=$RES
  [ ${#STACK_LIST[@]} -gt 1 ] && SRES=$RES/$STACK
  export PYTHONPATH=$BASE_PYTHONPATH
  if [ "$STACK" != image ]; then
    say "stack $STACK: installing .whl/stack-$STACK into /tmp/site-$STACK"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "/tmp/site-$STACK" \
        .whl/stack-"$STACK"/*.whl >>"$LOG" 2>&1 || say "WARNING: stack $STACK's wheels failed to install (see log)"
    export PYTHONPATH=/tmp/site-$STACK${BASE_PYTHONPATH:+:$BASE_PYTHONPATH}
  fi
  say "stack $STACK"
  versions "$SRES"
  [ "$TESTS" = 1 ] && gpu_tests "$SRES"
  [ "$CONFIGS" != none ] && e2e "$SRES" $(( ${#STACK_LIST[@]} - i ))
  if [ ${#STACK_LIST[@]} -gt 1 ]; then
    $PY -m benchmarks report --results "$SRES" >>"$LOG" 2>&1 && cp "$SRES/report.md" "$OUT/report-$STACK.md"
  fi
done
export PYTHONPATH=$BASE_PYTHONPATH

# 2b. Profile: where one configuration's step goes, per system.
if [ -n "$PROFILE" ]; then
  IFS=: read -r PCFG PSYS <<<"$PROFILE"
  T=$(min 240 $(( $(left) - 60 )))
  say "profile $PCFG (${PSYS:-sloth_fx}; timeout ${T}s)"
  timeout "$T" $PY -m benchmarks profile --config "$PCFG" --systems "${PSYS:-sloth_fx}" --steps 6 --warmup 3 \
      --results "$RES" ${LAYERS:+--layers "$LAYERS"} >>"$LOG" 2>&1
  say "profile exit $?"
fi

# 2c. A/B: one setting's values alternating in one process (one model, the same batches).
if [ -n "$AB" ]; then
  IFS=: read -r ACFG ASPEC <<<"$AB"
  T=$(min 300 $(( $(left) - 60 )))
  say "ab $ACFG $ASPEC (timeout ${T}s)"
  timeout "$T" $PY -m benchmarks ab --config "$ACFG" --set "$ASPEC" --steps 6 --results "$RES" \
      ${LAYERS:+--layers "$LAYERS"} >>"$LOG" 2>&1
  say "ab exit $?"
fi

# 3b. TRL's SFTTrainer, padding-free (the row users read first), leaving room for kernels and the report.
if [ -n "$SFT" ]; then
  IFS=: read -r SSYS SCFG <<<"$SFT"
  B=$(( $(left) - (KERNELS == 1 ? 90 : 20) ))
  say "sft ${SCFG:-R1} ($SSYS; budget ${B}s, at most ${E2E_TIMEOUT}s a run)"
  $PY -m benchmarks sft --config "${SCFG:-R1}" --systems "$SSYS" --results "$RES" --budget-s "$B" \
      --timeout "$E2E_TIMEOUT" --steps "$STEPS" ${LAYERS:+--layers "$LAYERS"} "${EXTRA[@]}" 2>&1 | tee -a "$LOG"
fi

# 4. Kernel microbenchmarks.
if [ "$KERNELS" = 1 ]; then
  T=$(min "$KERNELS_TIMEOUT" $(( $(left) - 20 )))
  if [ "$T" -gt 20 ]; then
    say "kernels (timeout ${T}s)"
    timeout "$T" $PY -m benchmarks kernels --results "$RES" ${KOPS:+--ops "$KOPS"} 2>&1 | tee -a "$LOG"
  else
    say "kernels skipped: budget spent"
  fi
fi

# 4b. LoRA per projection against the cost model.
if [ "$LORA_PLANS" = 1 ]; then
  T=$(( $(left) - 20 ))
  say "lora-plans (timeout ${T}s)"
  timeout "$T" $PY -m benchmarks lora-plans --results "$RES" 2>&1 | tee -a "$LOG"
fi

# 5. E6: longest sequence at batch 1 (optional: it costs a model build per probe).
if [ -n "$MAXLEN" ]; then
  IFS=: read -r LO HI GRAN MSYS MCFG <<<"$MAXLEN"
  B=$(( $(left) - 20 ))
  say "maxlen ${MCFG:-E6} $LO..$HI by $GRAN (budget ${B}s)"
  $PY -m benchmarks maxlen --config "${MCFG:-E6}" --lo "$LO" --hi "$HI" --granularity "$GRAN" --systems "${MSYS:-$SYSTEMS}" \
      --budget-s "$B" --results "$RES" ${LAYERS:+--layers "$LAYERS"} "${EXTRA[@]}" "${MAXLEN_ARGS[@]}" 2>&1 | tee -a "$LOG"
fi

# 6. Report and bundle.
$PY -m benchmarks report --results "$RES" >>"$LOG" 2>&1 || say "report failed"
cp "$RES/report.md" "$OUT/" 2>/dev/null
cp "$RES/tokens_per_s.png" "$RES/peak_memory.png" "$OUT/" 2>/dev/null
tar -czf "$OUT/results.tar.gz" -C "$RES" . 2>>"$LOG"
say "done; $(ls "$OUT" | tr '\n' ' ')"
