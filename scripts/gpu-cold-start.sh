#!/usr/bin/env bash
# Cold start and full depth on a GPU machine, in one call of the device tool. Results land
# in $OUT (default ./gpu-cold-start).
#
#   scripts/gpu-cold-start.sh BINARY full
#       `synth --quantized q4k` writes the whole Mixtral-8x7B (32 layers, Q4_K GGUF, no
#       bf16); then, page cache dropped where the machine allows: `serve --model DIR` at the
#       defaults timed to /ping 200 (the CUDA driver's JIT cache empty), greedy text, greedy
#       answers alone against the same in a decode batch of mixed lengths
#       (scripts/mixed-batch-check.py), and the full-depth benchmark over HTTP (512-token
#       distinct prompts, 128 new tokens, 1/4/16/32 streams) with the GPU's memory sampled
#       throughout; last a start under a 16 GiB host-memory cap (cgroup v2) where the machine
#       allows one, its JIT cache now filled by the first start.
#   scripts/gpu-cold-start.sh BINARY fit5090
#       The whole model at the defaults on a card cut down to an RTX 5090's memory: a
#       ballast process (torch) holds all but 32,100 MiB, what a 5090 (32,607 MiB) leaves
#       free. Then the same greedy text, mixed-length batch check (and its same-length
#       control), benchmark and long prompts as `full`, with this process's own GPU memory
#       sampled; an out-of-memory error would fail the requests. NO_CONTROL=1 leaves the
#       same-length control out.
#   scripts/gpu-cold-start.sh BINARY equal LAYERS
#       A bf16 synthetic model of LAYERS layers loaded with ISQ Q4K (writing the
#       quantized-weights cache), then from the cache: load times and greedy texts, which
#       must be equal.
#
# Every start's peak anonymous memory (RssAnon, sampled every 0.2 s until /ping answers)
# is reported beside its time: what loading holds beyond the page cache.
# The binary needs its zopilot-stubs/ beside it; on the device machine run with
# LD_LIBRARY_PATH=/usr/local/cuda/lib64.
set -u
B=${1:?usage: gpu-cold-start.sh BINARY full|equal [LAYERS]}
MODE=${2:?full or equal}
OUT=${OUT:-./gpu-cold-start}
mkdir -p "$OUT"
# Logs go to W and come back as one archive (the device tool returns at most 8 files).
W=/tmp/gpu-cold-start
mkdir -p "$W"
S="$OUT/summary.txt"
log() { echo "== $(date +%T) $*" | tee -a "$S"; }
PROMPT='{"prompt":"The history of the river begins","max_tokens":32,"temperature":0}'

drop_caches() {
  sync
  if echo 3 > /proc/sys/vm/drop_caches 2> /dev/null; then
    echo "page cache dropped" >> "$S"
  else
    echo "page cache NOT dropped (not permitted here)" >> "$S"
  fi
}

# The largest RssAnon (kB) of the serving process (the newest zopilot-gpu under $1's tree).
anon_kb() {
  local p; p=$(pgrep -n -f "zopilot-gpu serve" || echo "$1")
  awk '/^RssAnon/ {print $2}' "/proc/$p/status" 2> /dev/null || echo 0
}

# Starts `serve` with "$@", waits for /ping 200, records the seconds and the peak anonymous
# memory until then; leaves $pid running.
serve_timed() {
  local name=$1; shift
  local t0; t0=$(date +%s%N)
  "$@" > "$W/$name.log" 2>&1 &
  pid=$!
  local code=000 peak=0 kb
  for _ in $(seq 1 3000); do
    kb=$(anon_kb $pid); [ "${kb:-0}" -gt "$peak" ] && peak=$kb
    code=$(curl -s -o /dev/null -w "%{http_code}" localhost:8123/ping)
    [ "$code" = 200 ] && break
    kill -0 $pid 2> /dev/null || break
    sleep 0.2
  done
  echo "$name: /ping $code after $(( ($(date +%s%N) - t0) / 1000000 )) ms; peak RssAnon while loading $((peak / 1024)) MiB, at ready $(( $(anon_kb $pid) / 1024 )) MiB" >> "$S"
}

# "EQUALS" or "DIFFERS FROM" for two /prompt answers' texts.
same_text() {
  python3 -c 'import json,sys; a,b=(json.load(open(p)).get("text") for p in sys.argv[1:3]); print("EQUALS" if a and a == b else "DIFFERS FROM")' "$1" "$2"
}

# Peak of the GPU memory samples taken since the last call (MiB), labelled.
mark=1
mem_since() {
  echo "peak GPU memory, $1 (MiB): $(tail -n +$mark "$W/mem-serve.csv" | sort -n | tail -1)" >> "$S"
  mark=$(( $(wc -l < "$W/mem-serve.csv") + 1 ))
}

# N concurrent requests of a ~TOKENS-token prompt, 16 new tokens each; prints their HTTP codes.
long_prompts() {
  local n=$1 tokens=$2
  python3 - "$n" "$tokens" << 'EOF2'
import json, sys, threading, urllib.request
n, tokens = int(sys.argv[1]), int(sys.argv[2])
codes = []
def one(i):
    body = {"prompt": f"{i} " + "a " * (tokens - 2), "max_tokens": 16, "temperature": 0}
    req = urllib.request.Request("http://localhost:8123/v1/completions", json.dumps(body).encode(),
                                 {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            codes.append((r.status, json.load(r)["usage"]["prompt_tokens"]))
    except Exception as e:
        codes.append((getattr(e, "code", str(e)), None))
ts = [threading.Thread(target=one, args=(i,)) for i in range(n)]
[t.start() for t in ts]; [t.join() for t in ts]
print(sorted(codes, key=str))
EOF2
}

# Against the server on :8123 serving $M: the full-depth benchmark into $OUT/$1, then one
# and four ~7,900-token prompts, each phase's peak GPU memory after it.
bench_and_long_prompts() {
  timeout 300 "$B" bench --url http://localhost:8123 --model $M --distinct-prompts --prompt-tokens 512 \
    --max-tokens 128 --concurrency 1,4,16,32 --json > "$OUT/$1" 2> "$W/bench.log"
  echo "bench exit $?" >> "$S"
  mem_since "benchmark at the defaults (and what ran since the last figure)"
  log "long prompts at the defaults: one, then four at once (~7900 tokens each)"
  echo "one: $(long_prompts 1 7900)" >> "$S"
  mem_since "one long prompt"
  echo "four: $(long_prompts 4 7900)" >> "$S"
  mem_since "four long prompts at once"
}

stop() {
  kill -TERM "$pid" 2> /dev/null
  wait "$pid" 2> /dev/null
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >> "$S"

if [ "$MODE" = full ]; then
  QC=/tmp/quant-cache-full
  M=/tmp/mixtral-q4k
  log "synth --preset mixtral-8x7b --quantized q4k (32 layers)"
  /usr/bin/time -v "$B" synth --preset mixtral-8x7b --quantized q4k --out $M > "$W/synth.json" 2> "$W/synth.time"
  cat "$W/synth.json" >> "$S"; grep -E "Elapsed|Maximum resident" "$W/synth.time" >> "$S"
  ls -la $M >> "$S"; df -h /tmp >> "$S"

  "$B" check --model $M --quant-cache $QC >> "$S" 2>&1
  log "serve the whole model at the defaults, cold page cache; benchmark over HTTP"
  drop_caches
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$W/mem-serve.csv" &
  smi=$!
  serve_timed serve "$B" serve --model $M --port 8123 --quant-cache $QC
  grep -E "self-test passed|model ready|PASS  memory|host_memory" "$W/serve.log" | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-240 >> "$S"
  curl -s localhost:8123/prompt -d "$PROMPT" > "$W/greedy.json"; cat "$W/greedy.json" >> "$S"; echo >> "$S"
  mem_since "loaded and one request done"
  log "greedy alone and in a decode batch of mixed lengths"
  timeout 240 python3 "$(dirname "$0")/mixed-batch-check.py" http://localhost:8123 16 48 > "$OUT/mixed-batch.json"
  echo "mixed-batch check exit $?: $(head -c 300 "$OUT/mixed-batch.json")" >> "$S"
  bench_and_long_prompts bench-serve-defaults.json
  stop; kill $smi

  log "serve under a 16 GiB host-memory cap, cold page cache"
  if mkdir -p /sys/fs/cgroup/zcap 2> /dev/null && echo 16G > /sys/fs/cgroup/zcap/memory.max 2> /dev/null; then
    drop_caches
    serve_timed serve-capped sh -c "echo \$\$ > /sys/fs/cgroup/zcap/cgroup.procs && exec $B serve --model $M --port 8123 --quant-cache $QC"
    echo "cgroup memory.peak: $(cat /sys/fs/cgroup/zcap/memory.peak 2> /dev/null) events: $(tr '\n' ' ' < /sys/fs/cgroup/zcap/memory.events)" >> "$S"
    curl -s localhost:8123/prompt -d "$PROMPT" > "$W/greedy-capped.json"
    echo "capped greedy text $(same_text "$W/greedy.json" "$W/greedy-capped.json") the first start's" >> "$S"
    du -sh $QC/cuda-jit >> "$S" 2>&1
    stop
    grep -E "self-test passed|model ready" "$W/serve-capped.log" | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-200 >> "$S"
  else
    echo "no cgroup v2 memory controller here: cap not tried" >> "$S"
  fi
fi

if [ "$MODE" = fit5090 ]; then
  M=/tmp/mixtral-q4k
  log "synth --preset mixtral-8x7b --quantized q4k (32 layers)"
  "$B" synth --preset mixtral-8x7b --quantized q4k --out $M > "$W/synth.json" 2>&1
  python3 - 32100 > "$W/ballast.log" 2>&1 << 'EOF2' &
import sys, time, torch
keep = int(sys.argv[1]) << 20
free, total = torch.cuda.mem_get_info()
x = torch.empty(free - keep, dtype=torch.uint8, device="cuda")
print(f"ballast {x.numel() >> 20} MiB of {total >> 20}; free now {torch.cuda.mem_get_info()[0] >> 20} MiB", flush=True)
time.sleep(3600)
EOF2
  ballast=$!
  for _ in $(seq 1 300); do grep -q "free now" "$W/ballast.log" && break; sleep 0.2; done
  cat "$W/ballast.log" >> "$S"
  "$B" check --model $M >> "$S" 2>&1
  # The card's memory in use less what it used with the ballast alone (containers hide
  # per-process figures from nvidia-smi).
  base=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
  echo "in use with the ballast alone: $base MiB" >> "$S"
  # One nvidia-smi a sample: its -lms output into a pipe is block-buffered and never came.
  (while true; do
    echo $(( $(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1) - base ))
    sleep 0.1
  done) > "$W/mem-serve.csv" &
  smi=$!
  serve_timed serve "$B" serve --model $M --port 8123 --quant-cache off
  grep -E "PASS  memory|FAIL|model ready" "$W/serve.log" | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-240 >> "$S"
  curl -s localhost:8123/prompt -d "$PROMPT" >> "$S"; echo >> "$S"
  mem_since "loaded and one request done"
  controls=("" --same-length)
  [ -n "${NO_CONTROL:-}" ] && controls=("")
  for mode in "${controls[@]}"; do
    timeout 240 python3 "$(dirname "$0")/mixed-batch-check.py" http://localhost:8123 16 48 $mode > "$W/mixed$mode.json"
    echo "mixed-batch check $mode exit $?: $(head -c 420 "$W/mixed$mode.json")" >> "$S"
  done
  cp "$W"/mixed*.json "$OUT/"
  bench_and_long_prompts bench-serve-5090.json
  grep -ciE "out of memory|CUDA_ERROR_OUT_OF_MEMORY" "$W/serve.log" | sed 's/^/out-of-memory lines in the log: /' >> "$S"
  stop; kill $smi $ballast 2> /dev/null
fi

if [ "$MODE" = equal ]; then
  L=${3:?layers}
  M=/tmp/mixtral-bf16-$L
  C=/tmp/quant-cache
  log "synth --preset mixtral-8x7b --layers $L (bf16)"
  rm -rf /tmp/mixtral-q4k
  "$B" synth --preset mixtral-8x7b --layers "$L" --out $M >> "$S" 2>&1
  df -h /tmp >> "$S"
  log "ISQ load, writing the cache"
  serve_timed isq "$B" serve --model $M --port 8123 --quant-cache $C
  curl -s localhost:8123/prompt -d "$PROMPT" > "$W/greedy-isq.json"; cat "$W/greedy-isq.json" >> "$S"; echo >> "$S"
  stop
  grep -iE "quantized-weights" "$W/isq.log" >> "$S"
  ls -la $C >> "$S"
  log "load from the cache, cold page cache"
  drop_caches
  serve_timed cached "$B" serve --model $M --port 8123 --quant-cache $C
  curl -s localhost:8123/prompt -d "$PROMPT" > "$W/greedy-cached.json"; cat "$W/greedy-cached.json" >> "$S"; echo >> "$S"
  stop
  grep -iE "quantized-weights" "$W/cached.log" >> "$S"
  echo "greedy text from the cache $(same_text "$W/greedy-isq.json" "$W/greedy-cached.json") the ISQ load's" >> "$S"
fi
tar czf "$OUT/logs-$MODE.tgz" -C "$W" .
cat "$S"
