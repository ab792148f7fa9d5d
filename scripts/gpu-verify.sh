#!/usr/bin/env bash
# Verifies a CUDA build on a GPU machine in one go (the device tool forgets everything
# between calls): start-up checks, the driver hidden, the self-test, our Q4K kernels against
# their references (scripts/q4k-kernel-bench.cu --check, when nvcc is there), serving from
# the GPU, and the 8-layer Mixtral-shape benchmark. Results land in $OUT (default
# ./gpu-verify).
#
#   scripts/gpu-verify.sh path/to/zopilot-gpu [--bench]
#
# The binary needs its zopilot-stubs/ directory beside it (build.rs makes it; see
# src/preflight/driver.rs). On the device machine run with
# LD_LIBRARY_PATH=/usr/local/cuda/lib64 for the toolkit's libraries.
set -u
B=${1:?usage: gpu-verify.sh BINARY [--bench]}
OUT=${OUT:-./gpu-verify}
mkdir -p "$OUT"
log() { echo "== $*" | tee -a "$OUT/summary.txt"; }
run() { "$@" >> "$OUT/summary.txt" 2>&1; echo "exit $?" >> "$OUT/summary.txt"; }

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
log "check"; run "$B" check --model synthetic:tiny
"$B" check --model synthetic:tiny --json > "$OUT/check.json" 2>/dev/null
log "check, driver hidden"
cuda=$(ldconfig -p | awk '/libcuda.so.1 /{print $NF; exit}')
nvml=$(ldconfig -p | awk '/libnvidia-ml.so.1 /{print $NF; exit}')
run unshare -m sh -c "mount --bind /dev/null $(readlink -f "$cuda") && mount --bind /dev/null $(readlink -f "$nvml") && $B check --model synthetic:tiny"
log "selftest"; timeout 300 "$B" selftest --json > "$OUT/selftest.json" 2> "$OUT/selftest.log"; echo "exit $?" >> "$OUT/summary.txt"
if command -v nvcc > /dev/null; then
  log "kernels against their references (q4k-kernel-bench --check)"
  cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)
  here=$(dirname "$0")
  source "$here/kernel-flags.sh"
  # The product's flags: --check validates the compilation that ships.
  if nvcc "${KERNEL_FLAGS[@]}" -arch=sm_"$cc" -o /tmp/q4k-kernel-bench "$here/q4k-kernel-bench.cu" > "$OUT/kbench-build.log" 2>&1; then
    run /tmp/q4k-kernel-bench --check 1 4 32 64
    run /tmp/q4k-kernel-bench --check --dense 1 4 32
    run /tmp/q4k-kernel-bench --check --attention
    run /tmp/q4k-kernel-bench --check --chain
  else
    echo "kernel bench did not build (see kbench-build.log)" >> "$OUT/summary.txt"
  fi
fi
log "serve synthetic:tiny (self-test on)"
"$B" serve --model synthetic:tiny --port 8123 > "$OUT/serve.log" 2>&1 &
pid=$!
for i in $(seq 1 300); do
  code=$(curl -s -o /dev/null -w "%{http_code}" localhost:8123/ping)
  [ "$code" = 200 ] || [ "$code" = 503 ] && break
  sleep 0.5
done
echo "ping: $code after $i polls" >> "$OUT/summary.txt"
curl -s localhost:8123/prompt -d '{"prompt":"Hello from the GPU","max_tokens":16,"temperature":0}' >> "$OUT/summary.txt"
echo >> "$OUT/summary.txt"
kill -TERM $pid; wait $pid; echo "serve exit $?" >> "$OUT/summary.txt"
if [ "${2:-}" = "--bench" ]; then
  log "bench: Mixtral-8x7B shapes, 8 layers, Q4K"
  "$B" synth --preset mixtral-8x7b --layers 8 --out /tmp/mx8 >> "$OUT/summary.txt" 2>&1
  timeout 420 "$B" bench --model /tmp/mx8 --prompt-tokens 512 --max-tokens 128 \
    --concurrency 1,4,16,32 --json > "$OUT/bench8.json" 2> "$OUT/bench8.log"
  echo "exit $?" >> "$OUT/summary.txt"
fi
cat "$OUT/summary.txt"
