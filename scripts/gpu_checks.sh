#!/usr/bin/env bash
# The GPU checks in one prepared run on an H100/H200 (torch with CUDA, Triton and nvcc on the
# machine, no network). The default run fits in 8 minutes: a global budget ($BUDGET s, default
# 470) and a time limit per step, so a slow step cannot eat the others' time; a step that
# fails or runs out of time is reported and the run goes on. JSON into $RESULTS (default
# benchmarks/results), named after the GPU:
#   1. build the extension with its CUDA kernels for this GPU's architecture only
#   2. the GPU tests: CUDA update, Triton kernels vs reference at every shape, graph capture
#   3. the machine's limits: copy bandwidth, bf16 / fp32 / tf32 matmul rate  -> limits_<gpu>.json
#   4. the fused ops vs eager and torch.compile at the acceptance points, interleaved rounds
#      with paired ratios: pgd_step fp32 L-inf + L2 at 1e6..1e8 (and the same run's copy of the
#      same bytes), head_ce and infonce fwd+bwd                      -> <op>_<gpu>.json
#   5. the attack benchmark, benchmarks/bench_attacks.py --device cuda (when present)
#                                                                     -> attacks_gpu.json
#   6. what time is left: PGD-10 eager / compiled / CUDA graph (bench_attack), bf16 pgd_step
# Usage: bash scripts/gpu_checks.sh [full]   ("full": also the complete sweeps, well over 8 min)
# Exits non-zero when a step failed or timed out (the summary names them).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
RESULTS=${RESULTS:-benchmarks/results}
BUDGET=${BUDGET:-470}
MODE=${1:-short}
mkdir -p "$RESULTS"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'" || exit 1
gpu=$(python -c "import torch; print(torch.cuda.get_device_name().split()[-1].lower())")
arch=$(python -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
echo "gpu_checks: $(python -c 'import torch; print(torch.cuda.get_device_name(), torch.__version__)')" \
  "sm_${arch/./}, budget ${BUDGET}s, mode $MODE"

start=$SECONDS
report=()
failed=0
step() {  # name, time limit (s), command... ; the limit is cut to what the budget has left
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - (SECONDS - start)))
  if [ "$MODE" != full ] && [ "$left" -lt 20 ]; then
    report+=("$name: NOT RUN (budget spent)")
    echo "== $name: not run, ${left}s of the budget left"
    failed=1
    return
  fi
  [ "$MODE" != full ] && [ "$left" -lt "$limit" ] && limit=$left
  echo "== [$((SECONDS - start))s] $name (limit ${limit}s): $*"
  local t0=$SECONDS rc=0
  timeout --kill-after=10 "$limit" "$@" || rc=$?
  if [ $rc -eq 0 ]; then
    report+=("$name: ok ($((SECONDS - t0))s)")
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    report+=("$name: TIMEOUT after ${limit}s")
    failed=1
  else
    report+=("$name: FAILED (exit $rc, $((SECONDS - t0))s)")
    failed=1
  fi
}
bench() {  # step name, limit, script name, args... (JSON: $RESULTS/<name>_<gpu>.json)
  local name=$1 limit=$2 script=$3
  shift 3
  step "$name" "$limit" python "benchmarks/bench_$script.py" "$@" --json "$RESULTS/${name}_${gpu}.json"
}

# 1-2. build for this GPU only (halves nvcc's time), then the GPU tests
step build 180 env ADVCAL_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" \
  pip install --no-build-isolation --no-deps -q -e .
step info 20 python -m advcal.cli info
# (the Triton-interpreter tests are CPU tests: CI runs them)
step tests 120 python -m pytest -q -x -p no:cacheprovider -k "not interp" tests/test_pgd_step.py \
  tests/test_head_ce.py tests/test_infonce.py tests/test_cuda_graph.py

# 3-4. limits, then the fused ops (one torch.compile per case: the sizes are few on purpose)
bench limits 30 limits
bench pgd_step 90 pgd_step --l2 --sizes 1e6,1e7,1e8 --rounds 5
bench head_ce 75 head_ce --shapes 256x1024x1000,4096x1024x1000 --phases fwd+bwd \
  --arms eager,compile_default,advcal --rounds 3
bench infonce 60 infonce --shapes 4096x1024,16384x1024 --phases fwd+bwd \
  --arms eager,compile_default,advcal --rounds 3

# 5. the attack benchmark of record (the lead's; called as it is when present)
if [ -f benchmarks/bench_attacks.py ]; then
  step attacks 120 python benchmarks/bench_attacks.py --device cuda --json "$RESULTS/attacks_gpu.json"
else
  report+=("attacks: not run (benchmarks/bench_attacks.py is not there yet)")
fi

# 6. with what is left
bench attack_pgd10 60 attack --steps 10 --batch 64
bench pgd_step_bf16 40 pgd_step --dtype bf16 --sizes 1e7,1e8 --rounds 5

if [ "$MODE" = full ]; then  # the complete sweeps (no budget)
  bench pgd_step_full 600 pgd_step --l2
  bench head_ce_full 1800 head_ce
  bench infonce_full 1200 infonce
  bench backbone 900 backbone
  bench bind_towers 900 bind_towers
  bench fps_knn 300 fps_knn
fi

echo "gpu_checks: $((SECONDS - start))s, results in $RESULTS"
printf '  %s\n' "${report[@]}"
exit $failed
