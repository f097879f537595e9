#!/usr/bin/env bash
# GPU checks and benchmarks, on a CUDA machine, from anywhere in the repo:
#
#   bash benchmarks/gpu_suite.sh [OUT_DIR]          # SUITES="dmk linear" to pick suites
#
# Builds the extensions in place (the CUDA one included: needs a CUDA torch and nvcc),
# runs the GPU tests with compiled triton (TRITON_INTERPRET=0), then the benchmark
# suites.  Everything lands in OUT_DIR (default benchmarks/results/<gpu>-<UTC date>/):
# env.txt (nvidia-smi, unlearn-fast info), pytest_gpu.log, bench.log, bench.json,
# bench.csv and plots.  Commit that folder with the device name and date.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python setup.py -q build_ext --inplace
device=$(python -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '_'))")
out=${1:-benchmarks/results/${device}-$(date -u +%Y%m%d)}
mkdir -p "$out"
{ nvidia-smi || true; python -m unlearn_fast info; } > "$out/env.txt" 2>&1
status=0
TRITON_INTERPRET=0 python -m pytest -q -ra -m gpu tests/ 2>&1 | tee "$out/pytest_gpu.log" || status=1
for suite in ${SUITES:-dmk}; do
  TRITON_INTERPRET=0 python -m unlearn_fast bench "$suite" --out "$out" 2>&1 | tee -a "$out/bench.log" || status=1
done
echo "results in $out"
exit $status
