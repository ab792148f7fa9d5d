#!/usr/bin/env bash
# One traced benchmark on a GPU machine: where a decode step's time goes at 1 and 32 streams.
# ZOPILOT_STEP_TRACE=1 (--step-trace) prints one line per engine step: sequences in the
# batch, input building, the host's time to queue the forward (launch), forward time (with a
# device sync, so GPU time included; launch close to forward = host-bound), the logits
# copy to the host and the whole step; the rest is sampling, responses and host work.
# Results in $OUT (default ./gpu-profile). Per-kernel GPU time: ncu, ranked by
# scripts/ncu-summary.py; docs/decode.md reads the results.
#
#   scripts/gpu-profile.sh path/to/zopilot-gpu [extra env, e.g. ZOPILOT_MIXTRAL_PATH=upstream]
set -u
B=${1:?usage: gpu-profile.sh BINARY [VAR=value ...]}
shift
OUT=${OUT:-./gpu-profile}
mkdir -p "$OUT"
[ -d /tmp/mx8 ] || "$B" synth --preset mixtral-8x7b --layers 8 --out /tmp/mx8 > "$OUT/synth.log" 2>&1
env "$@" ZOPILOT_STEP_TRACE=1 timeout 300 "$B" bench --model /tmp/mx8 --prompt-tokens 512 \
  --max-tokens 128 --concurrency 1,32 --json > "$OUT/bench.json" 2> "$OUT/bench.log"
echo "bench exit $?"
grep zopilot-step "$OUT/bench.log" > "$OUT/steps.txt"
python3 - "$OUT/steps.txt" <<'PY'
import collections, re, sys
g = collections.defaultdict(list)
pat = (r'seqs=(\d+) prompt=(\w+) inputs_us=(\d+) launch_us=(\d+) forward_us=(\d+) '
       r'copy_us=(\d+) total_us=(\d+)')
for line in open(sys.argv[1]):
    m = re.search(pat, line)
    if m:
        g[(int(m[1]), m[2])].append(tuple(int(m[i]) for i in range(3, 8)))
for (seqs, prompt), v in sorted(g.items()):
    v.sort(key=lambda x: x[4])
    i, l, f, c, t = v[len(v) // 2]
    print(f"seqs={seqs} prompt={prompt} steps={len(v)} median inputs_us={i} launch_us={l} forward_us={f} "
          f"copy_us={c} total_us={t} (other host work {t - i - f - c} us)")
PY
