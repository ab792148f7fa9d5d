#!/usr/bin/env bash
# Two builds on one GPU, same call: are they the same product? For a change that must not
# move a token (a refactor, a kernel moved between files): the kernel bench's --check
# (kernels/ with the shipped flags), greedy text of each build on the same 8-layer Mixtral
# (equal or not), the self-test of B, and the benchmark alternating A B A B (tok/s with its
# spread across processes); last B's mixed-load figures (16 streams while 4,096-token prompts
# arrive). Results land in $OUT (default ./gpu-ab).
#
#   scripts/gpu-ab.sh BINARY_A BINARY_B
#
# The model is `synth --preset mixtral-8x7b --layers 8 --quantized q4k` (Q4_K GGUF, no bf16,
# loads in seconds). Each binary needs its zopilot-stubs/ beside it; on the device machine
# run with LD_LIBRARY_PATH=/usr/local/cuda/lib64.
set -u
A=${1:?usage: gpu-ab.sh BINARY_A BINARY_B}
B=${2:?usage: gpu-ab.sh BINARY_A BINARY_B}
OUT=${OUT:-./gpu-ab}
mkdir -p "$OUT"
S="$OUT/summary.txt"
here=$(cd "$(dirname "$0")" && pwd)
log() { echo "== $(date +%T) $*" | tee -a "$S"; }
run() { "$@" >> "$S" 2>&1; echo "exit $?" >> "$S"; }

nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv,noheader >> "$S"
if command -v nvcc > /dev/null; then
  log "kernel bench --check (kernels/, the shipped nvcc flags)"
  cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)
  source "$here/kernel-flags.sh"
  if nvcc "${KERNEL_FLAGS[@]}" -arch=sm_"$cc" -o /tmp/kbench "$here/q4k-kernel-bench.cu" > "$OUT/kbench-build.log" 2>&1; then
    run /tmp/kbench --check 1 4 32 64
    run /tmp/kbench --check --dense 1 4 32
    run /tmp/kbench --check --attention
    run /tmp/kbench --check --chain
  else
    echo "kernel bench did not build (kbench-build.log)" >> "$S"
  fi
fi

M=/tmp/mx8q
log "synth 8 layers, Q4_K"
run "$A" synth --preset mixtral-8x7b --layers 8 --quantized q4k --out $M

PROMPT="The history of the river begins"
for who in A B; do
  bin=$A; [ $who = B ] && bin=$B
  log "greedy text, $who"
  timeout 300 "$bin" generate --model $M --prompt "$PROMPT" --max-tokens 64 \
    > "$OUT/greedy-$who.txt" 2> /dev/null
  echo "exit $?" >> "$S"
done
if cmp -s "$OUT/greedy-A.txt" "$OUT/greedy-B.txt" && [ -s "$OUT/greedy-A.txt" ]; then
  echo "greedy text: EQUAL ($(wc -c < "$OUT/greedy-A.txt") bytes)" >> "$S"
else
  echo "greedy text: DIFFERENT" >> "$S"
fi

log "selftest, B"
timeout 300 "$B" selftest --json > "$OUT/selftest-B.json" 2> /dev/null
echo "exit $?" >> "$S"

# A B A B: each process's figures, so the spread between processes of one build is seen
# beside the difference between builds.
for round in 1 2; do
  for who in A B; do
    bin=$A; [ $who = B ] && bin=$B
    log "bench round $round, $who"
    timeout 240 "$bin" bench --model $M --prompt-tokens 512 --max-tokens 128 \
      --concurrency 1,4,16,32 --distinct-prompts --json > "$OUT/bench-$who-$round.json" 2> /dev/null
    echo "exit $?" >> "$S"
    python3 - "$OUT/bench-$who-$round.json" >> "$S" << 'EOF'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except Exception as e:
    print(f"  no report: {e}")
    sys.exit()
for lv in r.get("levels", []):
    print(f"  c={lv['concurrency']:>2}  decode {lv['decode_tokens_per_second_per_stream']:8.1f} tok/s/stream"
          f"  aggregate {lv['decode_aggregate_tokens_per_second']:8.1f}"
          f"  ITL p50 {lv['inter_token']['p50_ms']:.2f} ms  TTFT p50 {lv['ttft']['p50_ms']:.1f} ms")
EOF
  done
done

# Mixed load with B (no comparison): 16 streams decoding while 4,096-token prompts arrive.
log "mixed load, B: 16 streams, four 4,096-token prompts"
timeout 240 "$B" bench --model $M --prompt-tokens 512 --max-tokens 128 --concurrency 16 \
  --distinct-prompts --long-prompt-tokens 4096 --long-prompts 4 > "$OUT/bench-mixed-B.txt" 2> /dev/null
echo "exit $?" >> "$S"
cat "$OUT/bench-mixed-B.txt" >> "$S"
cat "$S"
