#!/usr/bin/env python3
"""A long prompt's greedy answer prefilled whole and prefilled in chunks must agree.

Against a running server (`serve`, chunked prefill on): each of N long prompts is first asked
alone (nothing decodes, so it is prefilled in one step), then again while STREAMS other
requests decode (so it is prefilled a chunk a step, alternating with their decode steps),
greedy, with log-probabilities. The chunked answer must equal the whole one, or part only at
a near-tie: where the whole run's top two log-probabilities at the first difference lie within
TOLERANCE nats (the chunks run other kernels than one whole prefill: the first tokens' KV is
read back from the paged cache, and chunks of up to 64 tokens take the tensor-core path).
Also reports each prompt's first-token log-probability in both runs. Prints one JSON object;
exits 1 if any answer parts elsewhere.

    scripts/chunked-prefill-check.py http://localhost:8000 [N] [MAX_TOKENS] [STREAMS]
"""

import sys
import threading
import time

from greedy_answers import complete, parting, report


def main():
    args = sys.argv[1:]
    url = args[0].rstrip("/")
    n = int(args[1]) if len(args) > 1 else 3
    max_tokens = int(args[2]) if len(args) > 2 else 32
    n_streams = int(args[3]) if len(args) > 3 else 8
    # Lengths that end mid-chunk and mid-block: about 2,000, 4,000 and 6,000 tokens.
    prompts = [f"Document {i}. " + "The river runs past the old mill and the town. " * (90 + 87 * i)
               for i in range(n)]
    whole = [complete(url, p, max_tokens) for p in prompts]

    stop = threading.Event()
    errors = []

    def decode(i):
        p = f"Stream {i}: " + "the bell rings over the square " * 6
        while not stop.is_set():
            try:
                complete(url, p, 256, logprobs=False)
            except Exception as e:  # reported, not raised
                errors.append(f"stream {i}: {e}")
                return

    threads = [threading.Thread(target=decode, args=(i,)) for i in range(n_streams)]
    for t in threads:
        t.start()
    time.sleep(2.0)  # every stream past its prompt, decoding
    chunked = [complete(url, p, max_tokens) for p in prompts]
    stop.set()
    for t in threads:
        t.join()

    answers, ok = [], not errors
    for i, (a, b) in enumerate(zip(whole, chunked)):
        at, g, verdict = parting(a, b)
        ok = ok and verdict != "DIFFERS" and len(a["tokens"]) > 0
        first = (a["token_logprobs"][:1] or [None])[0], (b["token_logprobs"][:1] or [None])[0]
        answers.append({"prompt": i, "prompt_tokens": a["prompt_tokens"], "verdict": verdict,
                        "first_difference": at, "whole_gap_nats": g,
                        "first_token_logprob_whole": first[0],
                        "first_token_logprob_chunked": first[1],
                        "seconds_whole": round(a["seconds"], 3),
                        "seconds_chunked": round(b["seconds"], 3)})
    report(answers, ok, prompts=n, max_tokens=max_tokens, decoding_streams=n_streams,
           errors=errors)

if __name__ == "__main__":
    main()
