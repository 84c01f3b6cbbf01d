#!/usr/bin/env bash
# One device call: install carried wheels, run the test suite ($PYTEST_ARGS: CPU tests
# under the GPU machine's torch, plus the GPU tests), the quantize microbenchmark
# ($QUANT_ARGS, when set), the attention microbenchmark ($ATTN_ARGS, when set), the Triton
# attention kernel's launch-config sweep ($SWEEP_ARGS, when set), the benchmark rows
# named in $BENCH_ARGS, then bench_offload.py once per mode in $OFFLOAD_MODES (one process
# each: peak memory is per process) with $OFFLOAD_ARGS, rows into $OUT/offload.json, then
# bench_parallel.py over every GPU of the machine with $PARALLEL_ARGS (when set).
# Tests and microbenchmark stop at their *_TIMEOUT so the later stages still run.
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "editable install failed"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, torchao, diffusers; print('torch', torch.__version__, 'torchao', torchao.__version__, 'diffusers', diffusers.__version__)" 2>&1 | tail -1 | tee -a "$OUT/gpu.txt"
if [ "${RUN_TESTS:-1}" = 1 ]; then
  timeout "${TEST_TIMEOUT:-400}" python3 -m pytest -q -p no:cacheprovider ${PYTEST_ARGS:-tests} > "$OUT/pytest.txt" 2>&1
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/pytest.txt" | tail -40
fi
if [ -n "${QUANT_ARGS+set}" ]; then
  timeout "${QUANT_TIMEOUT:-200}" python3 benchmarks/bench_quantize.py $QUANT_ARGS --out "$OUT/quantize.json" 2>&1 \
    | grep --line-buffered -v -i "warning" | tee "$OUT/quantize.txt"
fi
if [ -n "${ATTN_ARGS+set}" ]; then
  timeout "${ATTN_TIMEOUT:-240}" python3 benchmarks/bench_attention.py $ATTN_ARGS --out "$OUT/attention.json" 2>&1 \
    | grep --line-buffered -v -i "warning" | tee "$OUT/attention.txt"
fi
if [ -n "${SWEEP_ARGS+set}" ]; then  # the Triton attention kernel's launch configs
  timeout "${SWEEP_TIMEOUT:-180}" python3 benchmarks/bench_attention.py --sweep $SWEEP_ARGS 2>&1 \
    | grep --line-buffered -v -i "warning" | tee "$OUT/sweep.txt"
fi
if [ -n "${BENCH_ARGS:-}" ]; then
  python3 benchmarks/bench_wan.py $BENCH_ARGS --out "$OUT/results.json" --log "$OUT/bench_kernels.log" 2>&1 \
    | grep --line-buffered -v -i "warning\|register_constant\|Configuration class" | tee "$OUT/bench.txt"
fi
for mode in ${OFFLOAD_MODES:-}; do
  timeout "${OFFLOAD_TIMEOUT:-300}" python3 benchmarks/bench_offload.py --mode "$mode" ${OFFLOAD_ARGS:-} \
    --json "$OUT/offload.json" > "$OUT/offload_$mode.txt" 2>&1
  echo "offload $mode: rc $?"; grep -E '"(peak_gib|step_s|switch_s|idle_gib|stranded_fp8_copies_gib)"' -A2 "$OUT/offload_$mode.txt" | head -20
done
if [ -n "${PARALLEL_ARGS+set}" ]; then  # one process per GPU (one GPU: its one-GPU rows only)
  timeout "${PARALLEL_TIMEOUT:-540}" python3 -m torch.distributed.run --nproc-per-node "$(nvidia-smi -L | wc -l)" \
    benchmarks/bench_parallel.py $PARALLEL_ARGS --out "$OUT/parallel.json" 2>&1 \
    | grep --line-buffered -v -i "warning" | tee "$OUT/parallel.txt" | grep -E '^\{|Error|error' | cut -c1-400
fi
