#!/usr/bin/env bash
# The nvcc flags the product's build gives our kernels (vendor/mistralrs-core/build.rs), as
# the array KERNEL_FLAGS, for every script that compiles them with nvcc: kernels-compile.sh
# (CI, every GPU family) and gpu-verify.sh (the kernel bench, whose --check must validate the
# compilation that ships). Source it; it fails when build.rs no longer passes one of them.
# (kernels-nvrtc.py keeps the subset NVRTC accepts.)
KERNEL_FLAGS=(-std=c++17 -O3 -U__CUDA_NO_HALF_OPERATORS__ -U__CUDA_NO_HALF_CONVERSIONS__
  -U__CUDA_NO_HALF2_OPERATORS__ -U__CUDA_NO_BFLOAT16_CONVERSIONS__ --expt-relaxed-constexpr
  --expt-extended-lambda --use_fast_math)
kernel_flags_build_rs="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/vendor/mistralrs-core/build.rs"
for f in "${KERNEL_FLAGS[@]}"; do
  if ! grep -qF -- "\"$f\"" "$kernel_flags_build_rs"; then
    echo "flag $f is no longer in $kernel_flags_build_rs: update scripts/kernel-flags.sh" >&2
    return 1 2> /dev/null || exit 1
  fi
done
