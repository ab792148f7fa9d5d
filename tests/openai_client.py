"""Drives the server with the official `openai` client, unchanged: models, chat,
completions, streaming with usage, and an error. Usage: openai_client.py BASE_URL"""
import sys

import openai

client = openai.OpenAI(base_url=sys.argv[1], api_key="sk-test", max_retries=0)
model = client.models.list().data[0].id
assert model == "synthetic:tiny", model

chat = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0)
assert chat.choices[0].finish_reason == "length", chat
assert chat.usage.completion_tokens == 5, chat.usage

comp = client.completions.create(model=model, prompt="Once", max_tokens=4, temperature=0)
assert comp.usage.completion_tokens == 4, comp.usage
assert isinstance(comp.choices[0].text, str)

pieces, usage, finish = [], None, None
for chunk in client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0,
        stream=True, stream_options={"include_usage": True}):
    if chunk.usage:
        usage = chunk.usage
    for c in chunk.choices:
        pieces.append(c.delta.content or "")
        finish = c.finish_reason or finish
assert finish == "length" and usage.completion_tokens == 5, (finish, usage)
assert "".join(pieces) == chat.choices[0].message.content, (pieces, chat.choices[0].message.content)

streamed = "".join(c.choices[0].text for c in client.completions.create(
    model=model, prompt="Once", max_tokens=4, temperature=0, stream=True) if c.choices)
assert streamed == comp.choices[0].text, (streamed, comp.choices[0].text)

try:
    client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], max_tokens=10**6)
    raise SystemExit("expected a 400")
except openai.BadRequestError as e:
    assert "max_tokens" in str(e), e

try:
    openai.OpenAI(base_url=sys.argv[1], api_key="wrong", max_retries=0).models.list()
    raise SystemExit("expected a 401")
except openai.AuthenticationError:
    pass

print("openai client: ok")
