#!/usr/bin/env bash
# Reproduce the paper's MNIST result, in one go or in pieces, and file the outcome with the results.
#
#   usage: bash scripts/reproduce_mnist.sh TAG [train flags, e.g. --precision tf32 --cuda-graph --time-limit 560]
#
# A --preset among the flags replaces paper-mnist (e.g. --preset released-mnist: the authors' released config).
#
# The run lives in $RUNS_DIR/reproduce_mnist_TAG (default runs/). A first call starts
# `python -m nice_ext.train --preset paper-mnist`; a later call resumes the run from its last.pt (a run
# stopped by --time-limit inside an epoch goes on exactly where it stopped), so a 1500-epoch run can be
# made in pieces of any length. After each call the inpainting grid of best.pt is drawn (once an epoch has
# finished) and the run's result.json (status, test log-likelihood, device, commit, command, ...) is copied
# to $RESULTS_DIR/reproduce_mnist_TAG.json with metrics.csv, the PNGs and the log in
# $RESULTS_DIR/reproduce_mnist_TAG/ (default benchmarks/results). Also: DATA_DIR (default data),
# PYTHON (default python3), INPAINT_STEPS (default 10000, as the inpaint tool's).
set -euo pipefail
if [ $# -lt 1 ] || [[ "$1" == -* ]]; then
  sed -n 4p "$0" | sed 's/^# *//' >&2
  exit 2
fi
tag=$1
shift
python=${PYTHON:-python3}
data_dir=${DATA_DIR:-data}
run_dir=${RUNS_DIR:-runs}/reproduce_mnist_$tag
results=${RESULTS_DIR:-benchmarks/results}

# The paper's setup unless the flags name a preset of their own.
preset=(--preset paper-mnist)
for flag in "$@"; do
  if [[ "$flag" == --preset || "$flag" == --preset=* ]]; then preset=(); fi
done

# train LOG_MODE ARGS...: python -m nice_ext.train ARGS, its output shown and written to train.log (LOG_MODE
# -a appends). Training runs as a child the script waits on, not in a pipeline, so that a SIGTERM sent to
# the script (a job scheduler's notice) is passed on: training stops at its next step, keeps its place in
# last.pt, and the script ends with its status (128 + the signal) without filing anything. Ctrl-C in a
# terminal signals the whole foreground group, training included; the script and tee only wait for it.
train() {
  local log_mode=$1
  shift
  local log pid="" term_pending="" status
  exec {log}> >(trap '' INT TERM; exec tee $log_mode "$run_dir/train.log")
  local tee_pid=$!
  trap 'if [ -n "$pid" ]; then kill -TERM "$pid" 2>/dev/null || true; else term_pending=1; fi' TERM
  trap ':' INT
  # A background child starts with SIGINT ignored unless it is reset (an ignored one the script itself
  # was started with stays ignored).
  ( trap - INT TERM; exec "$python" -m nice_ext.train "$@" ) >&"$log" &
  pid=$!
  exec {log}>&-
  if [ -n "$term_pending" ]; then kill -TERM "$pid" 2>/dev/null || true; fi
  while :; do  # a trapped signal ends `wait` early; wait again until training has exited
    wait "$pid" && status=0 || status=$?
    kill -0 "$pid" 2>/dev/null || break
  done
  trap - TERM INT
  wait "$tee_pid" || true  # the log is complete before anything is filed
  return "$status"
}

mkdir -p "$run_dir"
if [ -f "$run_dir/last.pt" ]; then
  echo "== resuming $run_dir/last.pt"
  train -a --resume "$run_dir/last.pt" --data-dir "$data_dir" "$@"
else
  echo "== starting $run_dir"
  train "" "${preset[@]}" --data-dir "$data_dir" --out-dir "$run_dir" --eval-draws 3 "$@"
fi
if [ -f "$run_dir/best.pt" ]; then
  "$python" -m nice_ext.inpaint "$run_dir/best.pt" --data-dir "$data_dir" --out "$run_dir/inpaint.png" \
    --steps "${INPAINT_STEPS:-10000}"
else
  echo "== no epoch has finished yet, so there is no best.pt to inpaint with"
fi

mkdir -p "$results/reproduce_mnist_$tag"
cp "$run_dir/result.json" "$results/reproduce_mnist_$tag.json"
for name in metrics.csv samples.png curve.png spectrum.png inpaint.png train.log; do
  if [ -f "$run_dir/$name" ]; then cp "$run_dir/$name" "$results/reproduce_mnist_$tag/"; fi
done
echo "== $(grep -o '"status": "[^"]*"' "$results/reproduce_mnist_$tag.json")"
echo "== filed in $results/reproduce_mnist_$tag.json and $results/reproduce_mnist_$tag/"
