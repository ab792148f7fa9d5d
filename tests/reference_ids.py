"""Prompt token ids as Hugging Face transformers computes them: the independent reference
for tests/http_api's prompt-id test. A chat goes through `apply_chat_template` (the template
in tokenizer_config.json, rendered by transformers' Jinja), raw text through the tokenizer
with its special tokens, exactly as transformers users feed Mixtral.

    python3 tests/reference_ids.py MODEL_DIR < cases.json > ids.json

cases.json: a list of {"messages": [...]} or {"prompt": "..."}; ids.json: a list of id lists.
"""
import json
import sys

from transformers import AutoTokenizer


def main() -> None:
    tok = AutoTokenizer.from_pretrained(sys.argv[1])
    out = []
    for case in json.load(sys.stdin):
        if "messages" in case:
            ids = tok.apply_chat_template(case["messages"], add_generation_prompt=True, tokenize=True)
            # transformers 5 returns a BatchEncoding here; 4.x a plain list.
            if hasattr(ids, "keys"):
                ids = ids["input_ids"]
        else:
            ids = tok(case["prompt"])["input_ids"]
        out.append([int(i) for i in ids])
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
