#!/usr/bin/env bash
# Prefill under each kernel threshold, one GPU, one call: the TTFT of three prompts, one at
# a time, at 512 and 4,096 tokens, with the decode options that move prefill between paths —
# candle's quantized matmul for the dense layers (--dense-cublas-min-tokens 0), our
# tensor-core matmul (--mma-max-tokens), the grouped experts on tensor cores
# (--moe-mma-max-tokens), the experts' f16 GEMM from Q4_K (--moe-gemm-min-tokens) — against
# the defaults (run first and last, for the spread). Then the answers: two servers, the
# defaults against candle's dense path and against the expert GEMM (scripts/paths-check.py).
#
#   scripts/gpu-prefill-knobs.sh BINARY [MODEL]
#
# MODEL defaults to /tmp/mx8q, made if missing (`synth --preset mixtral-8x7b --layers 8
# --quantized q4k`). Appends to $OUT/knobs.txt (default ./gpu-prefill-knobs).
set -u
BIN=${1:?usage: gpu-prefill-knobs.sh BINARY [MODEL]}
M=${2:-/tmp/mx8q}
OUT=${OUT:-./gpu-prefill-knobs}
mkdir -p "$OUT"
K="$OUT/knobs.txt"
W=$(mktemp -d)
[ -e "$M/config.json" ] || [ -n "$(ls "$M"/*.gguf 2> /dev/null)" ] \
  || "$BIN" synth --preset mixtral-8x7b --layers 8 --quantized q4k --out "$M" > /dev/null 2>&1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >> "$K"

one() {  # label, prompt tokens, options...
  local label=$1 n=$2
  shift 2
  timeout 240 "$BIN" bench --model "$M" --prompt-tokens "$n" --max-tokens 2 --concurrency 1,1,1 \
    --distinct-prompts --json "$@" > "$W/r.json" 2> "$W/r.err"
  local rc=$?
  python3 - "$W/r.json" "$label" "$n" "$rc" "$*" >> "$K" << 'EOF'
import json, sys
path, label, n, rc, opts = sys.argv[1:]
try:
    t = [lv["ttft"]["p50_ms"] for lv in json.load(open(path))["levels"]]
    print(f"{label:<14} {n:>5} tokens  TTFT of three prompts {' '.join(f'{x:7.1f}' for x in t)} ms"
          f"  best {int(n) / min(t) * 1e3:8.0f} tok/s  [{opts}]")
except Exception as e:
    print(f"{label:<28} {n:>5} tokens  no report (exit {rc}): {e}")
EOF
  [ $rc = 0 ] || tail -3 "$W/r.err" >> "$K"
}

for n in 512 4096; do
  one defaults "$n"
  one dense-candle "$n" --dense-cublas-min-tokens 0
  one expert-gemm "$n" --moe-gemm-min-tokens 65
  one dense-ours "$n" --mma-max-tokens "$n" --dense-cublas-min-tokens 0
  [ "$n" -le 512 ] && one experts-mma "$n" --moe-mma-max-tokens "$n"
  [ "$n" -le 512 ] && one both "$n" --mma-max-tokens "$n" --moe-mma-max-tokens "$n" \
    --dense-cublas-min-tokens 0
  one defaults "$n"
done

# Answers: servers of the same model under three option sets, greedy, log-probabilities.
here=$(cd "$(dirname "$0")" && pwd)
PIDS=""
for spec in "8191" "8192 --dense-cublas-min-tokens 0" "8193 --moe-gemm-min-tokens 65"; do
  set -- $spec
  port=$1
  shift
  "$BIN" serve --model "$M" --port "$port" --max-num-seqs 8 "$@" > "$W/serve-$port.log" 2>&1 &
  PIDS="$PIDS $!"
done
source "$here/wait-ready.sh"
for port in 8191 8192 8193; do
  wait_ready $port
done
for pair in "8192 candle-dense" "8193 expert-gemm"; do
  set -- $pair
  echo "paths-check: $2 (A) against the defaults (B)" >> "$K"
  timeout 300 python3 "$here/paths-check.py" "http://127.0.0.1:$1" http://127.0.0.1:8191 6 32 \
    >> "$K" 2>&1
  echo "exit $?" >> "$K"
done
kill $PIDS 2> /dev/null
wait 2> /dev/null
cat "$K"
