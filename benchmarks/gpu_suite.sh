#!/usr/bin/env bash
# GPU checks and benchmarks in one call (built for the device tool: under 10 minutes on one
# H100), from anywhere in the repo:
#
#   bash benchmarks/gpu_suite.sh [OUT_DIR]
#
# 1. builds the extensions in place (the CUDA one needs a CUDA torch and nvcc);
# 2. runs the GPU tests with compiled triton (TRITON_INTERPRET=0, pytest -m gpu);
# 3. runs `unlearn-fast bench SUITE --out OUT_DIR` suite by suite (GPU shapes: each suite
#    picks its CUDA case list; rows, summary.md and plots merge into OUT_DIR after every
#    suite, so a suite cut off by the time budget leaves the earlier ones' results);
# 4. profiles the dual masked KL once (Chrome trace + the ncu command line).
#
# OUT_DIR defaults to $OUT/<gpu>-<UTC date> under the device tool (its $OUT comes back),
# else benchmarks/results/<gpu>-<UTC date>/.  It holds env.txt (nvidia-smi, unlearn-fast
# info), build.log, pytest_gpu.log, bench_<suite>.log, bench.json, bench.csv, summary.md,
# the plots and profile/.  Commit it under benchmarks/results/ (device name and date in
# the folder name).
#
# Knobs (environment):
#   SUITES="dmk linear ..."  suites in order (default: dmk linear saliency multidelete e2e eval)
#   BENCH_FLAGS="..."        extra `unlearn-fast bench` flags (default: --no-compile: torch.compile
#                            of eager recompiles per shape, dtype and mode -- tens of minutes)
#   COMPILE=1                drop --no-compile from the default flags
#   BUDGET_S=570             wall-clock budget of the whole script in seconds; every step gets
#                            what is left (a suite that would start with < 30 s left is skipped)
#   SKIP_BUILD=1 / SKIP_TESTS=1
#   PYTHON=...               the interpreter (default: python3, the one that holds torch on the
#                            device image, which has no plain `python`; else python)
set -uo pipefail
start=$(date +%s)
budget=${BUDGET_S:-570}
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_INTERPRET=0 TOKENIZERS_PARALLELISM=false

PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
left() { local s=$(( budget - ($(date +%s) - start) )); echo $(( s > 1 ? s : 1 )); }

device=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '_'))") || {
  echo "gpu_suite.sh: no CUDA device visible to torch" >&2; exit 2; }
default_out=benchmarks/results/${device}-$(date -u +%Y%m%d)
[ -n "${OUT:-}" ] && default_out=$OUT/${device}-$(date -u +%Y%m%d)
out=${1:-$default_out}
mkdir -p "$out"
echo "gpu_suite.sh: results in $out (budget ${budget} s)"
status=0

if [ "${SKIP_BUILD:-0}" != 1 ]; then
  timeout "$(left)" "$PYTHON" setup.py -q build_ext --inplace > "$out/build.log" 2>&1 || {
    echo "build failed (see $out/build.log)"; tail -30 "$out/build.log"; exit 1; }
  echo "built in $(( $(date +%s) - start )) s"
fi
{ nvidia-smi || true; "$PYTHON" -m unlearn_fast info; } > "$out/env.txt" 2>&1

if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout "$(left)" "$PYTHON" -m pytest -q -ra -m gpu tests/ > "$out/pytest_gpu.log" 2>&1 || status=1
  tail -5 "$out/pytest_gpu.log"
  echo "GPU tests done at $(( $(date +%s) - start )) s"
fi

flags=${BENCH_FLAGS:-$([ "${COMPILE:-0}" = 1 ] || echo --no-compile)}
for suite in ${SUITES:-dmk linear saliency multidelete e2e eval}; do
  if [ "$(left)" -lt 30 ]; then
    echo "bench $suite: skipped, the time budget is spent" | tee -a "$out/bench_skipped.txt"; status=1; continue
  fi
  # shellcheck disable=SC2086
  timeout --signal=INT "$(left)" "$PYTHON" -m unlearn_fast bench "$suite" --out "$out" $flags \
    > "$out/bench_$suite.log" 2>&1 || { echo "bench $suite: failed or cut off (see bench_$suite.log)"; status=1; }
  echo "bench $suite done at $(( $(date +%s) - start )) s"
done

if [ "$(left)" -gt 20 ]; then
  timeout "$(left)" "$PYTHON" -m unlearn_fast profile dmk --tokens 4096 --vocab 32000 --dtype bfloat16 \
    --out "$out/profile" > "$out/profile_dmk.log" 2>&1 || status=1
fi
[ -f "$out/summary.md" ] && tail -40 "$out/summary.md"
echo "gpu_suite.sh: $(( $(date +%s) - start )) s, results in $out, status $status"
exit $status
