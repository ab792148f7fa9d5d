#!/usr/bin/env bash
# Cold start and full depth on a GPU machine, in one call of the device tool. Results land
# in $OUT (default ./gpu-cold-start).
#
#   scripts/gpu-cold-start.sh BINARY full
#       The GPU self-test three times (a fresh machine, again, and with the driver's JIT
#       cache off) to tell first-use costs apart; `synth --quantized q4k` writes the whole
#       Mixtral-8x7B (32 layers, Q4_K GGUF, no bf16); then, page cache dropped where the
#       machine allows: `serve --model DIR` at the defaults timed to /ping 200, greedy text,
#       and the full-depth benchmark against it over HTTP (512-token distinct prompts, 128 new
#       tokens, 1/4/16/32 streams) with the GPU's memory sampled throughout; last a load under
#       a 16 GiB host-memory cap (cgroup v2) where the machine allows one.
#   scripts/gpu-cold-start.sh BINARY equal LAYERS
#       A bf16 synthetic model of LAYERS layers loaded with ISQ Q4K (writing the
#       quantized-weights cache), then from the cache: load times and greedy texts, which
#       must be equal.
#
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

# Starts `serve` with "$@", waits for /ping 200, records the seconds; leaves $pid running.
serve_timed() {
  local name=$1; shift
  local t0; t0=$(date +%s%N)
  "$@" > "$W/$name.log" 2>&1 &
  pid=$!
  local code=000
  for _ in $(seq 1 6000); do
    code=$(curl -s -o /dev/null -w "%{http_code}" localhost:8123/ping)
    [ "$code" = 200 ] && break
    kill -0 $pid 2> /dev/null || break
    sleep 0.1
  done
  echo "$name: /ping $code after $(( ($(date +%s%N) - t0) / 1000000 )) ms" >> "$S"
}

stop() {
  kill -TERM "$pid" 2> /dev/null
  wait "$pid" 2> /dev/null
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >> "$S"

if [ "$MODE" = full ]; then
  for run in first again no-jit-cache; do
    envs=X=1
    [ $run = no-jit-cache ] && envs=CUDA_CACHE_DISABLE=1
    t0=$(date +%s%N)
    env $envs "$B" selftest --json > /dev/null 2> "$W/selftest-$run.log"
    echo "selftest ($run): exit $? in $(( ($(date +%s%N) - t0) / 1000000 )) ms" >> "$S"
  done

  M=/tmp/mixtral-q4k
  log "synth --preset mixtral-8x7b --quantized q4k (32 layers)"
  /usr/bin/time -v "$B" synth --preset mixtral-8x7b --quantized q4k --out $M > "$W/synth.json" 2> "$W/synth.time"
  cat "$W/synth.json" >> "$S"; grep -E "Elapsed|Maximum resident" "$W/synth.time" >> "$S"
  ls -la $M >> "$S"; df -h /tmp >> "$S"

  log "serve the whole model at the defaults, cold page cache; benchmark over HTTP"
  drop_caches
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$W/mem-serve.csv" &
  smi=$!
  serve_timed serve "$B" serve --model $M --port 8123
  grep -E "self-test passed|model ready|PASS  memory|host_memory" "$W/serve.log" | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-240 >> "$S"
  curl -s localhost:8123/prompt -d "$PROMPT" > "$W/greedy.json"; cat "$W/greedy.json" >> "$S"; echo >> "$S"
  echo "peak GPU memory, loaded and one request done (MiB): $(sort -n "$W/mem-serve.csv" | tail -1)" >> "$S"
  timeout 300 "$B" bench --url http://localhost:8123 --model $M --distinct-prompts --prompt-tokens 512 \
    --max-tokens 128 --concurrency 1,4,16,32 --json > "$OUT/bench-serve-defaults.json" 2> "$W/bench.log"
  echo "bench exit $?" >> "$S"
  stop; kill $smi
  echo "peak GPU memory at the defaults through the benchmark (MiB): $(sort -n "$W/mem-serve.csv" | tail -1)" >> "$S"

  log "serve under a 16 GiB host-memory cap, cold page cache"
  if mkdir -p /sys/fs/cgroup/zcap 2> /dev/null && echo 16G > /sys/fs/cgroup/zcap/memory.max 2> /dev/null; then
    drop_caches
    serve_timed serve-capped sh -c "echo \$\$ > /sys/fs/cgroup/zcap/cgroup.procs && exec $B serve --model $M --port 8123"
    echo "cgroup memory.peak: $(cat /sys/fs/cgroup/zcap/memory.peak 2> /dev/null) events: $(tr '\n' ' ' < /sys/fs/cgroup/zcap/memory.events)" >> "$S"
    curl -s localhost:8123/prompt -d "$PROMPT" > "$W/greedy-capped.json"
    cmp -s "$W/greedy.json" "$W/greedy-capped.json" \
      && echo "capped greedy answer identical" >> "$S" || echo "capped greedy answer DIFFERS" >> "$S"
    stop
    grep -E "self-test passed|model ready" "$W/serve-capped.log" | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-200 >> "$S"
  else
    echo "no cgroup v2 memory controller here: cap not tried" >> "$S"
  fi
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
  python3 - "$W/greedy-isq.json" "$W/greedy-cached.json" >> "$S" << 'EOF'
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
ta, tb = a.get("text"), b.get("text")
print("greedy text from the cache", "EQUALS" if ta == tb and ta else "DIFFERS FROM", "the ISQ load's")
EOF
fi
tar czf "$OUT/logs-$MODE.tgz" -C "$W" .
cat "$S"
