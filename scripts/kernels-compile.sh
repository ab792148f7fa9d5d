#!/usr/bin/env bash
# Compiles our CUDA kernels (kernels/cuda/*.cu, launchers and all) with nvcc 13.0 and the
# flags kernels/build.rs gives them (kernels/nvcc-flags.txt), for every GPU family we ship:
# sm_80 (A100), sm_89 (L4/RTX 40), sm_90a (H100/H200), sm_120a (RTX 5090). No GPU needed, so
# CI runs it: a change that breaks one family's build fails here, not in a user's nix build.
# nvcc comes from NVIDIA's wheels through pip (only the compiler, its headers and cudart),
# cached in $KERNELS_TOOLKIT_DIR (default ~/.cache/cuda-pypi-13.0-nvcc).
#
#   scripts/kernels-compile.sh [sm_80 sm_89 sm_90a sm_120a]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
srcs=("$here"/../kernels/cuda/*.cu)
root=${KERNELS_TOOLKIT_DIR:-$HOME/.cache/cuda-pypi-13.0-nvcc}
archs=("$@")
[ ${#archs[@]} -gt 0 ] || archs=(sm_80 sm_89 sm_90a sm_120a)

# The flags the product's build passes to nvcc.
source "$here/kernel-flags.sh"

if [ ! -x "$root/bin/nvcc" ]; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 -d "$work/wheels" \
    'nvidia-cuda-nvcc==13.0.*' 'nvidia-cuda-crt==13.0.*' 'nvidia-nvvm==13.0.*' \
    'nvidia-cuda-runtime==13.0.*' 'nvidia-cuda-cccl==13.0.*'
  for w in "$work"/wheels/*.whl; do python3 -m zipfile -e "$w" "$work/x"; done
  rm -rf "$root" && mkdir -p "$(dirname "$root")"
  mv "$work/x/nvidia/cu13" "$root"
  chmod +x "$root"/bin/* "$root"/nvvm/bin/*
fi
"$root/bin/nvcc" --version | tail -2 | head -1
out=$(mktemp -d)
for arch in "${archs[@]}"; do
  cc=${arch#sm_}
  start=$(date +%s)
  bytes=0
  for src in "${srcs[@]}"; do
    o="$out/$arch-$(basename "$src" .cu).o"
    "$root/bin/nvcc" "${KERNEL_FLAGS[@]}" -c -o "$o" "$src" -gencode "arch=compute_$cc,code=$arch"
    bytes=$((bytes + $(stat -c %s "$o")))
  done
  echo "$arch: ok, ${#srcs[@]} files, $bytes bytes, $(( $(date +%s) - start )) s"
done
rm -rf "$out"
