#!/usr/bin/env python3
"""Two servers of one model under different decode options must give the same greedy answers,
or part only at near-ties.

Against two running servers (`serve`, same model): A (the reference, e.g. the paths a change
replaces) and B. Each of N prompts of different lengths (short to a few thousand tokens, so
that prefill runs every path a prompt size selects) is asked of A, then of B, greedy, with
log-probabilities. B's answer must equal A's, or part only at a near-tie: where A's top two
log-probabilities at the first difference lie within TOLERANCE nats (kernels that round
differently may pick either of two near-equal tokens; on random weights near-ties are
common). Also reports each prompt's first-token log-probability from both. Prints one JSON
object; exits 1 if any answer parts elsewhere.

    scripts/paths-check.py http://localhost:8000 http://localhost:8001 [N] [MAX_TOKENS]
"""

import sys

from greedy_answers import complete, parting, report


def main():
    args = sys.argv[1:]
    url_a, url_b = args[0].rstrip("/"), args[1].rstrip("/")
    n = int(args[2]) if len(args) > 2 else 6
    max_tokens = int(args[3]) if len(args) > 3 else 32
    # About 20, 200, 600, 1,200, 2,500 and 4,000 tokens: the fused decode layer, the
    # tensor-core paths, and past them the prefill paths.
    repeats = [1, 15, 50, 100, 210, 340, 500, 700]
    prompts = [f"Note {i}. " + "The river runs past the old mill and the town. " * r
               for i, r in enumerate(repeats[:n])]
    answers, ok = [], True
    for i, p in enumerate(prompts):
        a = complete(url_a, p, max_tokens)
        b = complete(url_b, p, max_tokens)
        at, g, verdict = parting(a, b)
        ok = ok and verdict != "DIFFERS" and len(a["tokens"]) > 0
        answers.append({"prompt": i, "prompt_tokens": a["prompt_tokens"], "verdict": verdict,
                        "first_difference": at, "a_gap_nats": g,
                        "first_token_logprob_a": (a["token_logprobs"][:1] or [None])[0],
                        "first_token_logprob_b": (b["token_logprobs"][:1] or [None])[0],
                        "seconds_a": round(a["seconds"], 3), "seconds_b": round(b["seconds"], 3)})
    report(answers, ok, prompts=len(prompts), max_tokens=max_tokens)

if __name__ == "__main__":
    main()
