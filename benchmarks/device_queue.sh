#!/usr/bin/env bash
# A queue of gpu_suite.sh jobs for one warm device machine, spread over several calls: each call
# runs, in order, the jobs not yet done on this machine while its budget leaves room for a job's
# estimate, so that a call cut short or a machine kept warm between calls loses nothing. Rows
# accumulate in /tmp/bench_results across the calls (gpu_suite.sh's own rule), and Unsloth's saved
# models are removed after each job (an M2 directory is ~47 GB of a 64 GB disk).
#
# Usage (device tool, carry [".whl/base", ".whl/unsloth", ".whl/tools"] or ".whl"):
#   bash benchmarks/device_queue.sh JOBS BUDGET_S
# JOBS: one job a line, "NAME ESTIMATE_S gpu_suite-arguments...", '#' starts a comment; the
# arguments are split as the shell splits them (quotes hold). A job is done once it has run
# (failed rows included: the report says why); /tmp/queue_done lists the done ones. The first
# call installs the carried wheels once and forgets earlier results (gpu_suite.sh --fresh).
set -uo pipefail
cd "$(dirname "$0")/.."
[ $# -eq 2 ] || { echo "usage: $0 JOBS BUDGET_S" >&2; exit 2; }
JOBS=$1 BUDGET=$2
[ -r "$JOBS" ] || { echo "no jobs file $JOBS" >&2; exit 2; }
START=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - START))); }
export OUT=${OUT:-/tmp/bench_out}
DONE=/tmp/queue_done
mkdir -p "$DONE" "$OUT"
say() { echo "[$(date +%T)] $*" | tee -a "$OUT/suite.log"; }
if [ ! -e "$DONE/.installed" ]; then
  bash benchmarks/gpu_suite.sh --budget 60 --configs none --no-tests --no-kernels --fresh >/dev/null 2>&1
  touch "$DONE/.installed"
fi
while read -r line; do
  line=${line%%#*}
  [ -n "${line// }" ] || continue
  eval "set -- $line"
  name=$1 estimate=$2
  shift 2
  [ -e "$DONE/$name" ] && continue
  if [ "$(left)" -lt "$estimate" ]; then say "skip $name: $(left) s left < $estimate"; continue; fi
  say "job $name"
  bash benchmarks/gpu_suite.sh --budget "$(left)" "$@" </dev/null
  rm -rf "${SLOTH_BENCH_MODEL_DIR:-/tmp/sloth_bench_models}"
  touch "$DONE/$name"
done <"$JOBS"
say "queue: $(left) s left; done: $(ls "$DONE" | tr '\n' ' ')"
