#!/usr/bin/env bash
# The nvcc flags our kernels ship with (kernels/nvcc-flags.txt, which kernels/build.rs
# passes), as the array KERNEL_FLAGS, for every other nvcc of them: kernels-compile.sh (CI,
# every GPU family) and gpu-verify.sh (the kernel bench, whose --check must validate the
# compilation that ships). Source it. (kernels-nvrtc.py keeps the subset NVRTC accepts.)
kernel_flags_file="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/kernels/nvcc-flags.txt"
mapfile -t KERNEL_FLAGS < <(grep -v '^\s*\(#\|$\)' "$kernel_flags_file")
if [ ${#KERNEL_FLAGS[@]} -eq 0 ]; then
  echo "no flags read from $kernel_flags_file" >&2
  return 1 2> /dev/null || exit 1
fi
