#!/usr/bin/env python3
"""Greedy answers alone and inside a decode batch of mixed lengths must agree.

Against a running server (`serve`): each of N prompts of different token lengths is first
asked alone, then all N at once, greedy, with log-probabilities. A stream's batched tokens
must equal its solo tokens, or part only at a near-tie: where the solo run's top two
log-probabilities at the first difference lie within TOLERANCE nats (batched decode runs
other kernels than one-stream decode, so rounding may pick either of two near-equal tokens).
Prints one JSON object; exits 1 if any stream parts elsewhere.

    scripts/mixed-batch-check.py http://localhost:8000 [N] [MAX_TOKENS] [--same-length]

`--same-length` is the control: prompts of one token count, so every batch is uniform. Its
near-tie rate is what batching alone does to greedy text; mixed lengths should match it.
"""

import sys
import threading

from greedy_answers import complete, parting, report


def main():
    same = "--same-length" in sys.argv
    args = [a for a in sys.argv[1:] if a != "--same-length"]
    url = args[0].rstrip("/")
    n = int(args[1]) if len(args) > 1 else 16
    max_tokens = int(args[2]) if len(args) > 2 else 48
    letters = "abcdefghijklmnopqrstuvwxyz"
    if same:
        # One length for all: stream i differs only in one letter word.
        prompts = [f"Stream {letters[i % 26]}: " + "the river runs on " * 8 for i in range(n)]
    else:
        # Lengths differ by several tokens per stream: every decode step mixes lengths.
        prompts = [f"Stream {i}: " + "the river runs on " * (2 + 3 * i) for i in range(n)]
    solo = [complete(url, p, max_tokens) for p in prompts]
    batched = [None] * n
    errors = []

    def run(i):
        try:
            batched[i] = complete(url, prompts[i], max_tokens)
        except Exception as e:  # reported, not raised: the other streams still count
            errors.append(f"stream {i}: {e}")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    streams, ok = [], not errors
    for i, (a, b) in enumerate(zip(solo, batched)):
        if b is None:
            ok = False
            continue
        at, g, verdict = parting(a, b)
        ok = ok and verdict != "DIFFERS"
        streams.append({"stream": i, "verdict": verdict, "first_difference": at, "solo_gap_nats": g})
    report(streams, ok, same_length=same, streams=n, max_tokens=max_tokens,
           prompt_lengths=sorted({a["prompt_tokens"] for a in solo}), errors=errors)

if __name__ == "__main__":
    main()
