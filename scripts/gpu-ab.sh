#!/usr/bin/env bash
# Two builds on one GPU, same call: are they the same product, and is B faster? For a change
# that must not move a token (a refactor, a kernel that replaces others with the same
# arithmetic): the kernel bench's --check (kernels/ with the shipped flags), greedy text of
# each build on the same 8-layer Mixtral for a short and a ~600-token prompt (equal or not),
# the self-test of B, the benchmark alternating A B A B (decode at 512-token prompts, then
# prefill of 4,096-token prompts; figures with their spread across processes), and each
# build's mixed load (16 streams while 4,096-token prompts arrive). Results land in $OUT
# (default ./gpu-ab): summary.txt and the decode reports.
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
# Working files; only the summary and the JSON reports land in $OUT (the device tool
# returns 8 files).
W=$(mktemp -d)
S="$OUT/summary.txt"
here=$(cd "$(dirname "$0")" && pwd)
log() { echo "== $(date +%T) $*" | tee -a "$S"; }
run() { "$@" >> "$S" 2>&1; echo "exit $?" >> "$S"; }

nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv,noheader >> "$S"
if command -v nvcc > /dev/null; then
  log "kernel bench --check (kernels/, the shipped nvcc flags)"
  cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)
  source "$here/kernel-flags.sh"
  if nvcc "${KERNEL_FLAGS[@]}" -arch=sm_"$cc" -o /tmp/kbench "$here/q4k-kernel-bench.cu" > "$W/kbench-build.log" 2>&1; then
    run /tmp/kbench --check 1 4 32 64
    run /tmp/kbench --check --dense 1 4 32
    run /tmp/kbench --check --attention
    run /tmp/kbench --check --chain
  else
    echo "kernel bench did not build ($W/kbench-build.log)" >> "$S"
  fi
fi

M=/tmp/mx8q
log "synth 8 layers, Q4_K"
run "$A" synth --preset mixtral-8x7b --layers 8 --quantized q4k --out $M

# A short prompt, and one of ~600 tokens (prefill attention in three 256-row chunks).
SHORT="The history of the river begins"
LONG="$(for i in $(seq 1 60); do printf 'The river %d runs past the old mill and the town. ' $i; done)"
for case in short long; do
  prompt=$SHORT; [ $case = long ] && prompt=$LONG
  for who in A B; do
    bin=$A; [ $who = B ] && bin=$B
    log "greedy text, $case prompt, $who"
    timeout 300 "$bin" generate --model $M --prompt "$prompt" --max-tokens 64 \
      > "$W/greedy-$case-$who.txt" 2> /dev/null
    echo "exit $?" >> "$S"
  done
  if cmp -s "$W/greedy-$case-A.txt" "$W/greedy-$case-B.txt" && [ -s "$W/greedy-$case-A.txt" ]; then
    echo "greedy text, $case prompt: EQUAL ($(wc -c < "$W/greedy-$case-A.txt") bytes)" >> "$S"
  else
    echo "greedy text, $case prompt: DIFFERENT" >> "$S"
  fi
done

log "selftest, B"
timeout 300 "$B" selftest --json > "$W/selftest-B.json" 2> /dev/null
echo "exit $?" >> "$S"

# A B A B: each process's figures, so the spread between processes of one build is seen
# beside the difference between builds. Decode at 512-token prompts, then prefill alone:
# 4,096-token prompts, 2 new tokens, one and four at once.
for round in 1 2; do
  for who in A B; do
    bin=$A; [ $who = B ] && bin=$B
    log "bench round $round, $who"
    timeout 240 "$bin" bench --model $M --prompt-tokens 512 --max-tokens 128 \
      --concurrency 1,4,16,32 --distinct-prompts --json > "$OUT/bench-$who-$round.json" 2> /dev/null
    echo "exit $?" >> "$S"
    timeout 240 "$bin" bench --model $M --prompt-tokens 4096 --max-tokens 2 \
      --concurrency 1,4 --distinct-prompts --json > "$W/prefill-$who-$round.json" 2> /dev/null
    echo "prefill exit $?" >> "$S"
    python3 - "$OUT/bench-$who-$round.json" "$W/prefill-$who-$round.json" >> "$S" << 'EOF'
import json, sys
for path in sys.argv[1:]:
    try:
        r = json.load(open(path))
    except Exception as e:
        print(f"  no report ({path}): {e}")
        continue
    print(f"  prompt {r['prompt_tokens']} tokens, {r['max_tokens']} new")
    for lv in r.get("levels", []):
        print(f"  c={lv['concurrency']:>2}  decode {lv['decode_tokens_per_second_per_stream']:8.1f} tok/s/stream"
              f"  aggregate {lv['decode_aggregate_tokens_per_second']:8.1f}"
              f"  ITL p50 {lv['inter_token']['p50_ms']:.2f} ms  TTFT p50 {lv['ttft']['p50_ms']:.1f} ms"
              f"  prompt {lv['prompt_tokens_per_second']:.0f} tok/s")
EOF
  done
done

# Mixed load: 16 streams decoding while 4,096-token prompts arrive (MIXED_A=0 leaves A out,
# for an A without the mode).
for who in A B; do
  [ $who = A ] && [ "${MIXED_A:-1}" = 0 ] && continue
  bin=$A; [ $who = B ] && bin=$B
  log "mixed load, $who: 16 streams, four 4,096-token prompts"
  timeout 240 "$bin" bench --model $M --prompt-tokens 512 --max-tokens 128 --concurrency 16 \
    --distinct-prompts --long-prompt-tokens 4096 --long-prompts 4 > "$W/mixed-$who.txt" 2> /dev/null
  echo "exit $?" >> "$S"
  grep -E "with|^ *16 " "$W/mixed-$who.txt" >> "$S"
done
cat "$S"
