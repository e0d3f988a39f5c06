#!/usr/bin/env bash
# Compile-check every CUDA kernel of advcal._C without a GPU: `nvcc -c` of csrc/*.cu for sm_80
# and sm_90 into a temp dir. The .cu files include only CUDA's headers (torch's CUDA headers are
# not usable on CPU machines), so this needs nothing but nvcc. Exits 0 with a message when nvcc
# is absent; non-zero when a kernel fails to compile.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
NVCC=${NVCC:-$(command -v nvcc || true)}
if [ -z "$NVCC" ] && [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then
  NVCC="$CUDA_HOME/bin/nvcc"
fi
if [ -z "$NVCC" ]; then
  echo "check_cuda_compile: nvcc not found; skipping the CUDA compile check"
  exit 0
fi
shopt -s nullglob
sources=(csrc/*.cu)
if [ ${#sources[@]} -eq 0 ]; then
  echo "check_cuda_compile: no csrc/*.cu files"
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "check_cuda_compile: $("$NVCC" --version | tail -n 1)"
for src in "${sources[@]}"; do
  for arch in 80 90; do
    out="$tmp/$(basename "$src" .cu).sm_$arch.o"
    echo "  nvcc -c $src -> sm_$arch"
    "$NVCC" -std=c++17 -O3 -lineinfo -Werror all-warnings -Icsrc \
      -gencode "arch=compute_$arch,code=sm_$arch" -c "$src" -o "$out"
  done
done
echo "check_cuda_compile: ${#sources[@]} file(s) x 2 archs compiled OK"
