#!/usr/bin/env bash
# The GPU checks in one prepared run (H100/H200; torch with CUDA, Triton, nvcc on the machine):
#   1. build the extension with its CUDA kernels against the machine's torch
#   2. the GPU tests: Triton kernels vs reference at every shape, CUDA update vs reference,
#      graph capture vs eager (identical adversarial examples), Calibrator with cuda_graph
#   3. every benchmark, JSON into $RESULTS (default benchmarks/results), named after the GPU
# Usage: bash scripts/gpu_checks.sh [quick]   ("quick": tests + the acceptance points only)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
RESULTS=${RESULTS:-benchmarks/results}
mkdir -p "$RESULTS"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'"
gpu=$(python -c "import torch; print(torch.cuda.get_device_name().split()[-1].lower())")
echo "gpu_checks: $(python -c 'import torch; print(torch.cuda.get_device_name(), torch.__version__)')"

ADVCAL_BUILD_CUDA=1 pip install --no-build-isolation --no-deps -q -e .
python -m advcal.cli info

python -m pytest -q -x tests/test_head_ce.py tests/test_infonce.py tests/test_pgd_step.py \
  tests/test_cuda_graph.py tests/test_attacks.py tests/test_calibrate.py -p no:cacheprovider

run() {  # name, args...
  local name=$1
  shift
  echo "== bench_$name $*"
  python "benchmarks/bench_$name.py" "$@" --json "$RESULTS/${name}_${gpu}.json"
}
run pgd_step
run attack --steps 10 --batch 64
run head_ce
run infonce
if [ "${1:-}" != quick ]; then
  run backbone
  run bind_towers
  run fps_knn
fi
echo "gpu_checks: results in $RESULTS"
