#!/usr/bin/env bash
# The checks that need a CUDA GPU, in stages, so that each fits in a limited call on a lent machine:
#
#   usage: bash scripts/check_cuda.sh [STAGE ...]      (no stage: all of them, in this order)
#     build       compile nice_ext in place (no pip, no network) and say what was built
#     report      python -m nice_ext: the build, the versions and the GPU, and the fused ops checked against
#                 the reference on the CPU and on each GPU (a quick first look at a new machine or build)
#     bad-input   scripts/repro_bad_input.py: do bad arguments with CUDA tensors raise, or crash the process?
#     cuda-tests  the tests whose names say cuda (the CUDA variants of the op, model and training tests),
#                 with each op's default CUDA row kernels (nice_ext.ops.default_cuda_kernel_versions); not
#                 tests/test_cuda_emulation.py, which runs the kernels compiled for the host on CPU tensors
#                 (minutes of compiling and CPU work that CI does anyway)
#     cuda-tests-v1 cuda-tests-v2
#                 the same with version 1 or version 2 of the row kernels for both ops
#                 (NICE_EXT_CUDA_KERNELS=1 or 2; set it for the whole script and every stage runs those
#                 versions: give them their own LOG_DIR)
#     tests       the whole suite
#     memcheck racecheck initcheck synccheck
#                 scripts/sanitize_kernels.py (every path of every CUDA kernel, both versions, compared with
#                 the CPU kernels) under compute-sanitizer, without PyTorch's caching allocator so that
#                 memcheck sees past the end of each tensor; SANITIZE_ARGS=--quick for a shorter run, and
#                 SANITIZE_ARGS="--quick --versions 1" (or 2) for one generation of the kernels
#     sanitizers  the four side by side, each version of the kernels in a process of its own (8 processes;
#                 logs sanitizer_TOOL_vN.log), for a call with a time limit; SANITIZE_ARGS as above
#     memcheck-tests  the CUDA op tests under memcheck (SANITIZE_K: their pytest -k expression; long)
#     ncu         benchmarks/profile_kernels.py under Nsight Compute: time, DRAM bytes, L1/L2 hit rates and
#                 occupancy of each CUDA kernel at 65536 rows, both versions (ncu.csv, and ncu.md summarised)
#     versions    benchmarks/compare_kernel_versions.py: version 1 against version 2 of each op's row kernels,
#                 timed in turns in one process, with each op's faster version (the evidence for the defaults
#                 in csrc/nice_ext.h); results into LOG_DIR/versions
#     bench bench-v1 bench-v2
#                 benchmarks/bench_coupling.py with the default CUDA row kernels, or version 1 or 2 for both
#                 ops; results (JSON, table, plot) into LOG_DIR/bench (the versions stage compares the
#                 two generations in a fraction of the time of bench-v1 and bench-v2)
#     profile-step
#                 benchmarks/profile_step.py: the paper model's training step at batch 200 under
#                 torch.profiler, graphed TF32 with each setting of the coupling networks (overlap, fused
#                 bias + ReLU), with every GEMM through cuBLASLt, and eager: kernels per step, their time,
#                 the GPU's busy and idle time
#                 (LOG_DIR/profile_step.md)
#
# Durations seen on an H100 machine (16 cores, 2026-11-24): build 130-170 s, cuda-tests with either version
# about 180-195 s (8 pytest workers), bench 190-240 s per version, bad-input under a minute.
# On an H200 machine (16 cores, 2026-12-04): bench 200 s; versions about 3.5 minutes (19 of its 36 entries
# in 110 s); report and bad-input under 15 s. With the four sanitizers and cuda-tests (then with the
# emulation tests) side by side, none finished in 240 s: cuda-tests had run 70 % of its tests, and the
# sanitizers 1460 of the 3888 calls of --quick (synccheck in 29 s, initcheck 71 s, memcheck 92 s,
# racecheck 162 s), so give each sanitizer a call of its own or one version per process. Alone, later that
# day: cuda-tests reached 99 % in 210 s (14 workers; what was left: the tests that start child processes);
# sanitizers with --quick did the first 1460 calls of each version in 42-145 s and had not finished its
# last size at 170 s; versions --ops coupling,affine_coupling with four sizes took 72 s; ncu 20 s.
# The test stages log one line per test (pytest -v), so that a stage stopped by a time limit still names
# the tests that failed before it stopped.
#
# Every stage after build needs the in-place build (run build first, in the same call or an earlier one on
# the same machine). One log per stage goes to LOG_DIR (default: runs/cuda-check).
# Tests that read MNIST look in $NICE_EXT_DATA_DIR, ../shared/data and data/ (copy the files into data/,
# which git ignores, where ../shared does not exist). The status is non-zero when any stage failed.
set -uo pipefail
LOG_DIR=${LOG_DIR:-runs/cuda-check}
mkdir -p "$LOG_DIR"
PYTHON=${PYTHON:-python3}
SANITIZE_K=${SANITIZE_K:-"cuda and not compile"}
OP_TESTS=(tests/test_op_coupling.py tests/test_op_affine_coupling.py tests/test_op_scale_prior.py)
ALL_STAGES=(build report bad-input cuda-tests cuda-tests-v1 cuda-tests-v2 tests memcheck racecheck initcheck synccheck
            memcheck-tests ncu versions bench bench-v1 bench-v2 profile-step)
# not in ALL_STAGES (it repeats the four above): sanitizers
status=0

# pytest-xdist, where installed, spreads the (non-sanitizer) tests over the machine's cores.
parallel=()
"$PYTHON" -c "import xdist" 2>/dev/null && parallel=(-n "${PYTEST_WORKERS:-8}")

# run_pytest LOG [ARGS...]: the suite with ARGS, one line per test in LOG_DIR/LOG; shows the failures so
# far and the summary.
run_pytest() {
  local log=$LOG_DIR/$1 rc=0
  shift
  "$PYTHON" -m pytest tests -v -rfE -p no:cacheprovider "${parallel[@]}" "$@" > "$log" 2>&1 || rc=$?
  grep -E "(FAILED|ERROR) tests/" "$log" | sort -u | head -20
  tail -3 "$log"
  return "$rc"
}

# sanitize TOOL LOG [ARGS...]: scripts/sanitize_kernels.py ARGS under compute-sanitizer's TOOL, into
# LOG_DIR/LOG; shows the error summary and the script's verdict.
sanitize() {
  local tool=$1 log=$LOG_DIR/$2 rc=0
  shift 2
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" --error-exitcode 99 --print-limit 20 \
    "$PYTHON" scripts/sanitize_kernels.py "$@" > "$log" 2>&1 || rc=$?
  echo "$tool ${log##*/}: $(grep -E "ERROR SUMMARY|calls on|mismatch|error" "$log" | tail -3 | tr '\n' ' ')"
  return "$rc"
}

run_stage() {
  local stage=$1 rc=0
  echo "== $stage"
  case $stage in
    build)
      nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$LOG_DIR/build.log" 2>&1
      TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
        "$PYTHON" setup.py build_ext --inplace >> "$LOG_DIR/build.log" 2>&1 || { tail -40 "$LOG_DIR/build.log"; return 1; }
      "$PYTHON" -c "import nice_ext, torch; print('cuda kernels built:', nice_ext.cuda_kernels_built(), torch.__version__,
                    torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU visible')" \
        2>&1 | tee -a "$LOG_DIR/build.log" | tail -1
      ;;
    report)
      "$PYTHON" -m nice_ext > "$LOG_DIR/report.log" 2>&1 || rc=$?
      cat "$LOG_DIR/report.log"
      ;;
    bad-input)
      "$PYTHON" scripts/repro_bad_input.py > "$LOG_DIR/bad_input.log" 2>&1 || rc=$?
      cat "$LOG_DIR/bad_input.log"
      ;;
    cuda-tests)
      run_pytest pytest_cuda.log -k "cuda and not emulation" || rc=$?
      ;;
    cuda-tests-v1|cuda-tests-v2)
      NICE_EXT_CUDA_KERNELS=${stage#cuda-tests-v} run_pytest "pytest_cuda_v${stage#cuda-tests-v}.log" -k "cuda and not emulation" || rc=$?
      ;;
    tests)
      run_pytest pytest.log || rc=$?
      ;;
    memcheck|racecheck|initcheck|synccheck)
      # shellcheck disable=SC2086  # SANITIZE_ARGS: words for the script
      sanitize "$stage" "sanitizer_$stage.log" ${SANITIZE_ARGS:-} || rc=$?
      ;;
    sanitizers)
      local pids=() tool version threads
      # Each process compares every call with the CPU kernels, whose OpenMP threads would each take every
      # core: eight processes of 16 threads on 16 cores spin against each other (the likely reason the
      # largest --quick size, 5 x 9000, had not finished in two minutes on the H200). A share each.
      threads=$(( $(nproc) / 8 )); [ "$threads" -ge 1 ] || threads=1
      for tool in memcheck racecheck initcheck synccheck; do
        for version in 1 2; do
          # shellcheck disable=SC2086
          OMP_NUM_THREADS=${OMP_NUM_THREADS:-$threads} \
            sanitize "$tool" "sanitizer_${tool}_v$version.log" ${SANITIZE_ARGS:-} --versions "$version" &
          pids+=($!)
        done
      done
      for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
      ;;
    memcheck-tests)
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 99 --print-limit 20 \
        "$PYTHON" -m pytest "${OP_TESTS[@]}" -q -x -p no:cacheprovider -k "$SANITIZE_K" \
        > "$LOG_DIR/sanitizer_memcheck_tests.log" 2>&1 || rc=$?
      grep -E "ERROR SUMMARY|passed|failed" "$LOG_DIR/sanitizer_memcheck_tests.log" | tail -3
      ;;
    ncu)
      ncu --profile-from-start off --clock-control none --nvtx --csv --log-file "$LOG_DIR/ncu.csv" \
        --metrics "$("$PYTHON" benchmarks/profile_kernels.py --metrics)" \
        "$PYTHON" benchmarks/profile_kernels.py > "$LOG_DIR/ncu.log" 2>&1 || rc=$?
      { cat "$LOG_DIR/ncu.log"; "$PYTHON" benchmarks/profile_kernels.py --summarize "$LOG_DIR/ncu.csv"; } \
        > "$LOG_DIR/ncu.md" 2>&1 || rc=$?
      tail -40 "$LOG_DIR/ncu.md"
      ;;
    versions)
      "$PYTHON" benchmarks/compare_kernel_versions.py --out "$LOG_DIR/versions" > "$LOG_DIR/versions.log" 2>&1 || rc=$?
      tail -8 "$LOG_DIR/versions.log"
      ;;
    bench|bench-v1|bench-v2)
      local versions=()
      [ "$stage" = bench ] || versions=(--cuda-kernels "${stage#bench-v}")
      "$PYTHON" benchmarks/bench_coupling.py --device cuda --min-run-time 0.1 "${versions[@]}" \
        --out "$LOG_DIR/bench" > "$LOG_DIR/$stage.log" 2>&1 || rc=$?
      tail -4 "$LOG_DIR/$stage.log"
      ;;
    profile-step)
      "$PYTHON" benchmarks/profile_step.py --device cuda --out "$LOG_DIR/profile_step.md" \
        > "$LOG_DIR/profile_step.log" 2>&1 || rc=$?
      grep -A8 "^| variant" "$LOG_DIR/profile_step.log" || tail -5 "$LOG_DIR/profile_step.log"
      ;;
    *)
      echo "unknown stage '$stage'; the stages are: ${ALL_STAGES[*]}" >&2
      return 2
      ;;
  esac
  [ "$rc" -eq 0 ] || echo "$stage: exit $rc"
  return "$rc"
}

stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=("${ALL_STAGES[@]}")
for stage in "${stages[@]}"; do
  run_stage "$stage" || status=1
done
exit $status
