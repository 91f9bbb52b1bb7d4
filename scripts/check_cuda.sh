#!/usr/bin/env bash
# Build nice_ext in place on a CUDA machine (no pip, no network needed), run the test suite, then the CUDA op tests under compute-sanitizer
# (memcheck, racecheck, initcheck). Logs go to $LOG_DIR (default runs/cuda-check).
#   usage: bash scripts/check_cuda.sh [pytest -k expression for the sanitizer runs]
set -uo pipefail
LOG_DIR=${LOG_DIR:-runs/cuda-check}
mkdir -p "$LOG_DIR"
PYTHON=${PYTHON:-python3}
SANITIZE_K=${1:-"cuda and not compile"}
status=0

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$LOG_DIR/gpu.txt"
echo "== build"
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
  "$PYTHON" setup.py build_ext --inplace > "$LOG_DIR/build.log" 2>&1 || { tail -40 "$LOG_DIR/build.log"; exit 1; }
"$PYTHON" -c "import nice_ext, torch; print('cuda kernels built:', nice_ext.cuda_kernels_built(), torch.__version__)"

echo "== tests"
"$PYTHON" -m pytest tests -q -x -p no:cacheprovider 2>&1 | tee "$LOG_DIR/pytest.log" | tail -15 || status=1

for tool in memcheck racecheck initcheck; do
  echo "== compute-sanitizer --tool $tool"
  compute-sanitizer --tool "$tool" --error-exitcode 99 --print-limit 20 \
    "$PYTHON" -m pytest tests/test_op_coupling.py tests/test_op_affine_coupling.py tests/test_op_scale_prior.py -q -x \
    -p no:cacheprovider \
    -k "$SANITIZE_K" > "$LOG_DIR/sanitizer_$tool.log" 2>&1
  rc=$?
  grep -E "ERROR SUMMARY|passed|failed" "$LOG_DIR/sanitizer_$tool.log" | tail -3
  [ $rc -eq 0 ] || { echo "$tool: exit $rc"; status=1; }
done
exit $status
