"""Drives a running edgenode with the official `openai` Python package.

Usage: openai_client.py BASE_URL   (e.g. http://127.0.0.1:8080/v1)
Exits non-zero, with the exception printed, on any error.
"""
import sys

from openai import OpenAI

client = OpenAI(base_url=sys.argv[1], api_key="not-needed")

models = client.models.list()
ids = [m.id for m in models.data]
assert "smollm2" in ids and "minilm" in ids, ids

chat = client.chat.completions.create(
    model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}],
    max_tokens=16, temperature=0)
assert chat.choices[0].message.content, chat
assert chat.usage.completion_tokens > 0, chat

pieces = []
usage = None
for chunk in client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=16, temperature=0, stream=True, stream_options={"include_usage": True}):
    if chunk.choices and chunk.choices[0].delta.content:
        pieces.append(chunk.choices[0].delta.content)
    if chunk.usage:
        usage = chunk.usage
assert "".join(pieces) == chat.choices[0].message.content, (pieces, chat)
assert usage is not None and usage.completion_tokens == chat.usage.completion_tokens

completion = client.completions.create(model="smollm2", prompt="The sky is", max_tokens=8, temperature=0)
assert completion.choices[0].text is not None and completion.usage.completion_tokens == 8, completion

emb = client.embeddings.create(model="minilm", input=["hello world", "edge inference"])
assert len(emb.data) == 2 and len(emb.data[0].embedding) == 384, emb
assert emb.usage.prompt_tokens > 0

print("openai client: ok")
