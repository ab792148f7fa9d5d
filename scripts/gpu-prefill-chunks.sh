#!/usr/bin/env bash
# Chunked prefill on one GPU, one call: what each chunk size does to decoding streams while
# long prompts arrive, and whether a chunked prompt's answer is the whole prompt's.
#
#   scripts/gpu-prefill-chunks.sh BINARY [CHUNKS]     # CHUNKS default "0 64 128 256 512"
#
# OPTS (environment): further flags for every bench and the server (decode options, say);
# CHECK_CHUNK: the server's --prefill-chunk-tokens for the check (default: the default).
# For each chunk size (0 = off): `bench` mixed load — 16 streams (512-token prompts, distinct)
# decoding while four 4,096-token prompts arrive one after another — the streams' ITL without
# prompts and while the prompts load, and the prompts' TTFT. Then `serve` with the default
# chunk and scripts/chunked-prefill-check.py (three ~2,000–6,000-token prompts answered alone
# and while 8 streams decode). Model: `synth --preset mixtral-8x7b --layers 8 --quantized
# q4k`. Results in $OUT (default ./gpu-prefill-chunks): summary.txt, mixed.json, check.json.
# The binary needs its zopilot-stubs/ beside it; on the device machine run with
# LD_LIBRARY_PATH=/usr/local/cuda/lib64.
set -u
BIN=${1:?usage: gpu-prefill-chunks.sh BINARY [CHUNKS]}
CHUNKS=${2:-0 64 128 256 512}
OUT=${OUT:-./gpu-prefill-chunks}
mkdir -p "$OUT"
W=$(mktemp -d)
S="$OUT/summary.txt"
here=$(cd "$(dirname "$0")" && pwd)
log() { echo "== $(date +%T) $*" | tee -a "$S"; }

nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv,noheader >> "$S"
M=/tmp/mx8q
log "synth 8 layers, Q4_K"
"$BIN" synth --preset mixtral-8x7b --layers 8 --quantized q4k --out $M >> "$S" 2>&1
echo "exit $?" >> "$S"

for c in $CHUNKS; do
  log "mixed load, --prefill-chunk-tokens $c"
  timeout 300 "$BIN" bench --model $M --prompt-tokens 512 --max-tokens 128 --concurrency 16 \
    --distinct-prompts --long-prompt-tokens 4096 --long-prompts 4 --prefill-chunk-tokens "$c" \
    ${OPTS:-} --json > "$W/mixed-$c.json" 2> "$W/mixed-$c.err"
  echo "exit $?" >> "$S"
  tail -3 "$W/mixed-$c.err" >> "$S"
done
python3 - "$W" $CHUNKS > "$OUT/mixed.json" 2>> "$S" << 'EOF'
import json, sys
w, rows = sys.argv[1], []
for c in sys.argv[2:]:
    try:
        r = json.load(open(f"{w}/mixed-{c}.json"))
    except Exception as e:
        rows.append({"chunk": int(c), "error": str(e)})
        continue
    lv = r["levels"][0]
    m = lv.get("mixed") or {}
    rows.append({
        "chunk": int(c),
        "itl_p50_ms": lv["inter_token"]["p50_ms"],
        "itl_p99_ms": lv["inter_token"]["p99_ms"],
        "decode_tok_s_per_stream": lv["decode_tokens_per_second_per_stream"],
        "during_prompts_gaps": m.get("gaps_during_prompts"),
        "during_prompts_itl_p50_ms": (m.get("inter_token_during_prompts") or {}).get("p50_ms"),
        "during_prompts_itl_p99_ms": (m.get("inter_token_during_prompts") or {}).get("p99_ms"),
        "long_prompt_ttft_p50_ms": (m.get("long_prompt_ttft") or {}).get("p50_ms"),
        "long_prompt_ttft_p99_ms": (m.get("long_prompt_ttft") or {}).get("p99_ms"),
    })
print(json.dumps({"rows": rows}, indent=1))
EOF
cat "$OUT/mixed.json" >> "$S"

log "serve (chunk ${CHECK_CHUNK:-default}, ${OPTS:-}) + chunked-prefill-check"
PORT=8177
"$BIN" serve --model $M --port $PORT --max-num-seqs 16 ${OPTS:-} \
  ${CHECK_CHUNK:+--prefill-chunk-tokens $CHECK_CHUNK} > "$W/serve.log" 2>&1 &
SERVER=$!
source "$here/wait-ready.sh"
wait_ready $PORT
timeout 300 python3 "$here/chunked-prefill-check.py" "http://127.0.0.1:$PORT" 3 32 8 \
  > "$OUT/check.json" 2>> "$S"
echo "check exit $?" >> "$S"
kill $SERVER
wait $SERVER 2> /dev/null
tail -5 "$W/serve.log" >> "$S"
cat "$OUT/check.json" >> "$S"
cat "$S"
