#!/usr/bin/env bash
# Compile-check the CUDA side of advcal._C without a GPU (CI runs this on CPU machines):
#   1. `nvcc -c` of every csrc/*.cu for sm_80 and sm_90, warnings as errors. The .cu files
#      include only CUDA's headers (torch's CUDA headers are not usable on CPU machines), so
#      this needs nothing but nvcc (~6 s per arch).
#   2. csrc/selftest/: the L-inf kernels' per-thread code run on the host for a simulated grid
#      against a scalar reference (work split, head/tail, chunking, NaN, Philox draws).
#   3. `g++ -fsyntax-only -DADVCAL_WITH_CUDA` of csrc/pgd_step_cuda.cpp (the torch glue)
#      against torch's headers plus CUDA's, with a stub for c10/cuda/impl/cuda_cmake_macros.h,
#      which CPU wheels of torch do not ship (~15 s). Skipped with a message when torch or one
#      of the headers the glue includes is absent.
# Exits 0 with a message when nvcc is absent; non-zero when any check fails.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
NVCC=${NVCC:-$(command -v nvcc || true)}
if [ -z "$NVCC" ] && [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then
  NVCC="$CUDA_HOME/bin/nvcc"
fi
if [ -z "$NVCC" ]; then
  echo "check_cuda_compile: nvcc not found (PATH, \$NVCC, \$CUDA_HOME); skipping the CUDA checks"
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# CUDA's include dir as nvcc itself sees it (nvcc may be a wrapper script)
: >"$tmp/empty.cu"
CUDA_INC=$("$NVCC" --dryrun -c "$tmp/empty.cu" -o "$tmp/empty.o" 2>&1 |
  sed -n 's/^#\$ INCLUDES="-I\([^"]*\)".*/\1/p' | head -n 1 || true)
CUDA_INC=${CUDA_INC:-${CUDA_HOME:-/usr/local/cuda}/include}
echo "check_cuda_compile: $("$NVCC" --version | tail -n 1)"

# 1. every kernel file, both data-centre architectures
shopt -s nullglob
sources=(csrc/*.cu)
for src in "${sources[@]}"; do
  for arch in 80 90; do
    out="$tmp/$(basename "$src" .cu).sm_$arch.o"
    echo "  nvcc -c $src -> sm_$arch"
    "$NVCC" -std=c++17 -O3 -lineinfo -Werror all-warnings -Icsrc \
      -gencode "arch=compute_$arch,code=sm_$arch" -c "$src" -o "$out"
  done
done
echo "check_cuda_compile: ${#sources[@]} .cu file(s) x 2 archs compiled OK"

# 2. host self-tests of the kernels' per-thread code
for src in csrc/selftest/*.cu; do
  exe="$tmp/$(basename "$src" .cu)"
  echo "  nvcc $src (host self-test)"
  "$NVCC" -std=c++17 -O2 -Werror all-warnings -Xcompiler -ffp-contract=off -Icsrc \
    -gencode arch=compute_80,code=sm_80 "$src" -o "$exe"
  "$exe"
done

# 3. the torch glue, syntax only
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=$(command -v python3 || true); fi
fi
torch_inc=$([ -n "$PY" ] && "$PY" -c \
  "import torch.utils.cpp_extension as c; print(' '.join(c.include_paths()))" 2>/dev/null || true)
py_inc=$([ -n "$PY" ] && "$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])" \
  2>/dev/null || true)
if [ -z "$torch_inc" ]; then
  echo "check_cuda_compile: torch not importable; skipping the syntax check of csrc/pgd_step_cuda.cpp"
  exit 0
fi
missing=()
for h in ATen/cuda/CUDAGeneratorImpl.h c10/cuda/CUDAGuard.h c10/cuda/CUDAStream.h; do
  found=0
  for d in $torch_inc; do [ -f "$d/$h" ] && found=1; done
  [ $found -eq 1 ] || missing+=("$h")
done
[ -f "$CUDA_INC/cuda_runtime.h" ] || missing+=("$CUDA_INC/cuda_runtime.h")
if [ ${#missing[@]} -gt 0 ]; then
  echo "check_cuda_compile: skipping the syntax check of csrc/pgd_step_cuda.cpp:" \
    "missing ${missing[*]}"
  exit 0
fi
mkdir -p "$tmp/stub/c10/cuda/impl"
have_macros=0
for d in $torch_inc; do [ -f "$d/c10/cuda/impl/cuda_cmake_macros.h" ] && have_macros=1; done
if [ $have_macros -eq 0 ]; then
  # what torch's CMake writes into this header for a shared-library build
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' \
    >"$tmp/stub/c10/cuda/impl/cuda_cmake_macros.h"
fi
isys=(-isystem "$tmp/stub" -isystem "$CUDA_INC")
for d in $torch_inc; do isys+=(-isystem "$d"); done
[ -n "$py_inc" ] && isys+=(-isystem "$py_inc")
echo "  g++ -fsyntax-only -DADVCAL_WITH_CUDA csrc/pgd_step_cuda.cpp"
"${CXX:-g++}" -std=c++17 -fsyntax-only -Wall -Wextra -Werror -DADVCAL_WITH_CUDA -Icsrc \
  "${isys[@]}" csrc/pgd_step_cuda.cpp
echo "check_cuda_compile: all CUDA checks passed"
