"""Top kernels by total GPU time in an Nsight Compute per-kernel summary (docs/decode.md).

On the GPU host (the driver directory first, or ncu finds our libcuda stand-in):
  LD_LIBRARY_PATH=/usr/local/nvidia/lib64:/usr/lib/x86_64-linux-gnu:/usr/local/cuda/lib64 \
    ncu --cache-control none --clock-control none --metrics gpu__time_duration.sum \
    --print-summary per-kernel --csv zopilot-gpu bench --model /tmp/mx8 --prompt-tokens 32 \
    --max-tokens 32 --concurrency 1 --json > ncu1.csv
Then: python3 scripts/ncu-summary.py ncu1.csv [TOP]   (.csv or .csv.xz)
"""
import csv, io, lzma, sys
raw = lzma.open(sys.argv[1], 'rt').read() if sys.argv[1].endswith('.xz') else open(sys.argv[1]).read()
lines = [l for l in raw.splitlines() if l.startswith('"')]
rows = list(csv.DictReader(io.StringIO("\n".join(lines))))
num = lambda s: float(s.replace(',', ''))
items = []
for r in rows:
    if r['Metric Name'] != 'gpu__time_duration.sum':
        continue
    inv = int(num(r['Invocations'])); avg = num(r['Average']) / 1000
    items.append((inv * avg, r['Kernel Name'][:60], r['Block Size'], r['Grid Size'], inv, avg))
items.sort(reverse=True)
total = sum(i[0] for i in items)
print(f"total {total/1000:.1f} ms over {sum(i[4] for i in items)} launches")
for t, name, b, g, inv, avg in items[:int(sys.argv[2]) if len(sys.argv) > 2 else 30]:
    print(f"{t/1000:8.2f} ms {inv:7d} x {avg:8.2f} us  {name} {b} {g}")
