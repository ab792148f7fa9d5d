"""Shared by scripts/mixed-batch-check.py, chunked-prefill-check.py and paths-check.py: one
greedy completion with log-probabilities from a running server, where two answers to the
same prompt part — equal, at a near-tie of the reference run, or elsewhere — and the checks'
report."""

import json
import sys
import time
import urllib.request

TOLERANCE = 1.5  # nats: Q4K kernels differ between paths, activations quantized differently


def complete(url, prompt, max_tokens, logprobs=True):
    """`/v1/completions`, temperature 0; with `logprobs`, the top two at each step."""
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
    return {"text": choice["text"], "tokens": lp.get("tokens", []),
            "top": lp.get("top_logprobs", []), "token_logprobs": lp.get("token_logprobs", []),
            "prompt_tokens": answer["usage"]["prompt_tokens"], "seconds": elapsed}


def gap(top):
    """Top-1 minus top-2 log-probability of one step's `top_logprobs` entry."""
    vals = sorted(top.values(), reverse=True)
    return vals[0] - vals[1] if len(vals) > 1 else None


def parting(ref, other):
    """Where `other` parts from `ref` (two `complete` results): (first differing step or
    None, `ref`'s top-2 gap there, verdict "equal" / "near-tie" / "DIFFERS")."""
    at = next((k for k, (x, y) in enumerate(zip(ref["tokens"], other["tokens"])) if x != y), None)
    if at is None and len(ref["tokens"]) != len(other["tokens"]):
        at = min(len(ref["tokens"]), len(other["tokens"]))
    g = gap(ref["top"][at]) if at is not None and at < len(ref["top"]) else None
    verdict = "equal" if at is None else ("near-tie" if g is not None and g <= TOLERANCE else "DIFFERS")
    return at, g, verdict


def report(rows, ok, **fields):
    """Prints a check's JSON object — `fields`, the counts of `rows`' verdicts, the rows as
    "detail" and "passed" — and exits 1 unless `ok`."""
    out = dict(fields)
    out.update(
        equal=sum(r["verdict"] == "equal" for r in rows),
        near_tie=sum(r["verdict"] == "near-tie" for r in rows),
        differs=sum(r["verdict"] == "DIFFERS" for r in rows),
        detail=rows,
        passed=ok,
    )
    print(json.dumps(out))
    sys.exit(0 if ok else 1)
