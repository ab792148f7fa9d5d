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

import json
import sys
import threading
import time
import urllib.request

TOLERANCE = 1.5  # nats, as scripts/mixed-batch-check.py


def complete(url, prompt, max_tokens, logprobs=True):
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    if logprobs:
        body["logprobs"] = 2
    req = urllib.request.Request(
        f"{url}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    started = time.monotonic()
    with urllib.request.urlopen(req, timeout=600) as r:
        answer = json.load(r)
    elapsed = time.monotonic() - started
    choice = answer["choices"][0]
    lp = choice.get("logprobs") or {}
    return {"tokens": lp.get("tokens", []), "top": lp.get("top_logprobs", []),
            "token_logprobs": lp.get("token_logprobs", []),
            "prompt_tokens": answer["usage"]["prompt_tokens"], "seconds": elapsed}


def gap(top):
    """Top-1 minus top-2 log-probability of one step's `top_logprobs` entry."""
    vals = sorted(top.values(), reverse=True)
    return vals[0] - vals[1] if len(vals) > 1 else None


def main():
    args = sys.argv[1:]
    url = args[0].rstrip("/")
    n = int(args[1]) if len(args) > 1 else 3
    max_tokens = int(args[2]) if len(args) > 2 else 32
    n_streams = int(args[3]) if len(args) > 3 else 8
    # Lengths that end mid-chunk and mid-block: 1,000 to 3,000 tokens or so.
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
        at = next((k for k, (x, y) in enumerate(zip(a["tokens"], b["tokens"])) if x != y), None)
        if at is None and len(a["tokens"]) != len(b["tokens"]):
            at = min(len(a["tokens"]), len(b["tokens"]))
        g = gap(a["top"][at]) if at is not None and at < len(a["top"]) else None
        verdict = "equal" if at is None else ("near-tie" if g is not None and g <= TOLERANCE else "DIFFERS")
        ok = ok and verdict != "DIFFERS" and len(a["tokens"]) > 0
        first = (a["token_logprobs"][:1] or [None])[0], (b["token_logprobs"][:1] or [None])[0]
        answers.append({"prompt": i, "prompt_tokens": a["prompt_tokens"], "verdict": verdict,
                        "first_difference": at, "whole_gap_nats": g,
                        "first_token_logprob_whole": first[0],
                        "first_token_logprob_chunked": first[1],
                        "seconds_whole": round(a["seconds"], 3),
                        "seconds_chunked": round(b["seconds"], 3)})
    out = {
        "prompts": n,
        "max_tokens": max_tokens,
        "decoding_streams": n_streams,
        "equal": sum(a["verdict"] == "equal" for a in answers),
        "near_tie": sum(a["verdict"] == "near-tie" for a in answers),
        "differs": sum(a["verdict"] == "DIFFERS" for a in answers),
        "errors": errors,
        "detail": answers,
        "passed": ok,
    }
    print(json.dumps(out))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
