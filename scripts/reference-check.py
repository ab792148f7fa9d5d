#!/usr/bin/env python3
"""The product against Hugging Face transformers on the same synthetic Mixtral weights,
unquantized bf16 on one GPU: prompt ids, greedy continuations and log-probabilities.

    python3 scripts/reference-check.py --binary path/to/zopilot-gpu [--layers 2] [--tokens 48]

Writes `zopilot-gpu synth --preset mixtral-8x7b --layers N` (bf16 safetensors), serves it with
`--isq none`, and for each prompt compares:
- the prompt ids of `/tokenize` with transformers' `apply_chat_template`;
- the greedy continuation (`/v1/chat/completions`, temperature 0, token ids through vLLM's
  `return_tokens_as_token_ids`) with transformers' greedy `generate` in bf16 and in f32,
  reported as the number of leading tokens that agree, beside how far transformers' own bf16
  and f32 runs agree with each other (the yardstick: past a near-tie, bf16 rounding decides);
- the product's top-5 log-probabilities at each step with transformers' f32 log-softmax on
  the product's own tokens (teacher-forced), as the largest absolute difference, beside the
  same difference between transformers' own bf16 and f32 runs;
- where the product's greedy path leaves transformers' f32 one, how close the two tokens
  were in f32 (the log-probability gap: a near-tie is decided by rounding).

Needs torch, transformers and a CUDA GPU (the GPU host has them); the binary needs a CUDA
build. Prints a JSON report (also written to --out).
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPTS = [
    [{"role": "user", "content": "Name three rivers."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a mixture of experts?"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "And 3+3, naïvely?"}],
]


def post(url, body):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.load(r)


def serve(binary, model, port, log):
    proc = subprocess.Popen(
        [binary, "serve", "--model", model, "--isq", "none", "--port", str(port),
         "--max-model-len", "2048", "--skip-selftest"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 900
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server exited with {proc.returncode}; see its log")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as r:
                if r.status == 200:
                    return proc
        except Exception:
            pass
        time.sleep(1)
    sys.exit("the server did not become ready")


def agree(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def hf_ids(tok, messages):
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def load(model, dtype):
    try:
        m = AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
    except TypeError:
        m = AutoModelForCausalLM.from_pretrained(model, torch_dtype=dtype)
    return m.to("cuda").eval()


@torch.no_grad()
def greedy(m, ids, n):
    x = torch.tensor([ids], device="cuda")
    out = m.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n,
                     min_new_tokens=n, pad_token_id=0)
    return [int(t) for t in out[0, len(ids):]]


@torch.no_grad()
def logprobs_along(m, ids, continuation):
    x = torch.tensor([ids + continuation], device="cuda")
    logits = m(x).logits[0].float()
    lp = torch.log_softmax(logits, dim=-1)
    # Position len(ids) - 1 + k predicts continuation token k.
    return lp[len(ids) - 1: len(ids) - 1 + len(continuation)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", required=True)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--port", type=int, default=8391)
    ap.add_argument("--out", default="reference-check.json")
    a = ap.parse_args()

    work = tempfile.mkdtemp(prefix="reference-check-")
    model = os.path.join(work, "model")
    subprocess.run([a.binary, "synth", "--preset", "mixtral-8x7b", "--layers", str(a.layers),
                    "--out", model], check=True, stdout=subprocess.DEVNULL)
    tok = AutoTokenizer.from_pretrained(model)

    product = []
    with open(os.path.join(work, "serve.log"), "w") as log:
        proc = serve(a.binary, model, a.port, log)
        base = f"http://127.0.0.1:{a.port}"
        try:
            for messages in PROMPTS:
                ids = post(f"{base}/tokenize", {"messages": messages})["tokens"]
                r = post(f"{base}/v1/chat/completions", {
                    "messages": messages, "max_tokens": a.tokens, "temperature": 0,
                    "logprobs": True, "top_logprobs": 5, "return_tokens_as_token_ids": True})
                steps = r["choices"][0]["logprobs"]["content"]
                out = [int(s["token"].split(":")[1]) for s in steps]
                top = [[(int(t["token"].split(":")[1]), t["logprob"]) for t in s["top_logprobs"]]
                       for s in steps]
                product.append({"prompt_ids": ids, "greedy": out, "top": top,
                                "text": r["choices"][0]["message"]["content"]})
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)

    report = {"layers": a.layers, "tokens": a.tokens, "torch": torch.__version__,
              "transformers": __import__("transformers").__version__,
              "gpu": torch.cuda.get_device_name(0), "prompts": []}
    m16 = load(model, torch.bfloat16)
    ref16 = [greedy(m16, hf_ids(tok, p), a.tokens) for p in PROMPTS]
    lp16 = [logprobs_along(m16, hf_ids(tok, p), ours["greedy"]) for p, ours in zip(PROMPTS, product)]
    del m16
    torch.cuda.empty_cache()
    m32 = load(model, torch.float32)
    ok = True
    for p, ours, r16, l16 in zip(PROMPTS, product, ref16, lp16):
        ids = hf_ids(tok, p)
        r32 = greedy(m32, ids, a.tokens)
        lp = logprobs_along(m32, ids, ours["greedy"])
        diff = max(abs(float(lp[k, t]) - v) for k, step in enumerate(ours["top"]) for t, v in step)
        diff16 = max(abs(float(lp[k, t]) - float(l16[k, t])) for k, step in enumerate(ours["top"]) for t, _ in step)
        split = agree(ours["greedy"], r32)
        gap = None
        if split < len(ours["greedy"]) and split < len(r32):
            gap = float(lp[split, r32[split]] - lp[split, ours["greedy"][split]])
        row = {
            "prompt_ids_equal": ours["prompt_ids"] == ids,
            "prompt_tokens": len(ids),
            "agree_with_bf16": agree(ours["greedy"], r16),
            "agree_with_f32": agree(ours["greedy"], r32),
            "bf16_vs_f32": agree(r16, r32),
            "max_abs_logprob_diff_vs_f32": diff,
            "hf_bf16_max_abs_logprob_diff_vs_f32": diff16,
            "f32_gap_where_paths_part": gap,
            "top1_logprob_f32_first_steps": [round(float(lp[k].max()), 3) for k in range(min(4, len(lp)))],
            "per_step_max_diff": [round(max(abs(float(lp[k, t]) - v) for t, v in step), 3)
                                  for k, step in enumerate(ours["top"])],
            "per_step_hf_bf16_max_diff": [round(max(abs(float(lp[k, t]) - float(l16[k, t])) for t, _ in step), 3)
                                          for k, step in enumerate(ours["top"])],
        }
        row["ok"] = row["prompt_ids_equal"] and max(row["agree_with_bf16"], row["agree_with_f32"]) >= row["bf16_vs_f32"]
        ok = ok and row["ok"]
        report["prompts"].append(row)
    report["ok"] = ok
    text = json.dumps(report, indent=2)
    print(text)
    with open(a.out, "w") as f:
        f.write(text)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
