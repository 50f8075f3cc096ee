"""OpenAI's dialect, exactly, through the official `openai` Python package.

Usage: openai_fidelity.py BASE_URL MODEL   (e.g. http://127.0.0.1:8080/v1 smollm2)

Structured output (validated with `jsonschema`, a validator nobody here wrote),
log-probabilities, penalties, logit_bias, seeds, and the 400s a client must get instead
of a 200 that quietly did something else. Exits non-zero with the failure printed.
"""
import json
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
from openai import OpenAI

BASE, MODEL = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=BASE, api_key="not-needed", max_retries=0, timeout=120)
USER = [{"role": "user", "content": "Describe a person as JSON."}]


def post(path, body):
    """A plain JSON POST to one of the node's own routes (outside /v1)."""
    root = BASE[: -len("/v1")] if BASE.endswith("/v1") else BASE
    req = urllib.request.Request(root + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def bad_request(param, **kwargs):
    """The request must fail with OpenAI's 400 naming `param`."""
    try:
        client.chat.completions.create(model=MODEL, messages=kwargs.pop("messages", USER), max_tokens=8, **kwargs)
    except openai.BadRequestError as e:
        body = e.body if isinstance(e.body, dict) else {}
        got = body.get("param") or ""
        assert got == param or got.startswith(param), (param, e.body)
        return e
    raise AssertionError(f"expected a 400 naming {param}, got a 200 for {kwargs}")


# ---- structured output: every document of every schema validates

# Every schema bounds its documents (lengths, item counts, numeric ranges), so a document
# always ends within max_tokens and "only valid documents" is a fair demand.
SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}}, "required": ["name"], "additionalProperties": False},
    {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 120}}, "required": ["age"], "additionalProperties": False},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3}},
     "required": ["tags"], "additionalProperties": False},
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16}, "age": {"type": "integer", "minimum": 0, "maximum": 99}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9},
     "y": {"type": "integer", "minimum": -9, "maximum": 9}}, "required": ["x", "y"], "additionalProperties": False}},
     "required": ["point"], "additionalProperties": False},
    {"type": "object", "properties": {"kind": {"const": "user"}, "id": {"type": "integer", "minimum": 1, "maximum": 1000}},
     "required": ["kind", "id"], "additionalProperties": False},
    {"type": "object", "properties": {"value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "boolean"}]}},
     "required": ["value"], "additionalProperties": False},
    {"type": "object", "properties": {"note": {"type": ["string", "null"], "maxLength": 12}}, "required": ["note"], "additionalProperties": False},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}}, "required": ["code"], "additionalProperties": False},
    {"type": "object", "properties": {"scores": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 10}, "minItems": 1, "maxItems": 4}},
     "required": ["scores"], "additionalProperties": False},
    # A number needs `multipleOf` to be finite: unbounded, a small model writes 1.0000… to max_tokens.
    {"type": "object", "properties": {"ratio": {"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.01}}, "required": ["ratio"],
     "additionalProperties": False},
    {"type": "object", "properties": {"first": {"type": "string", "maxLength": 8}, "last": {"type": "string", "maxLength": 8},
     "admin": {"type": "boolean"}}, "required": ["first", "last", "admin"], "additionalProperties": False},
    {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
     "required": ["n"], "additionalProperties": False}, "maxItems": 2}}, "required": ["items"], "additionalProperties": False},
    {"type": "object", "properties": {"status": {"enum": ["open", "closed"]}, "count": {"type": "integer", "minimum": 0, "maximum": 50}},
     "required": ["status", "count"], "additionalProperties": False},
    {"type": "object", "properties": {"email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"}}, "required": ["email"],
     "additionalProperties": False},
    {"type": "object", "properties": {"pair": {"type": "array", "prefixItems": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "boolean"}],
     "items": False, "minItems": 2}}, "required": ["pair"], "additionalProperties": False},
    {"type": "object", "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 14}, "population": {"type": "integer", "minimum": 0,
     "maximum": 99999999}}, "required": ["city", "population"], "additionalProperties": False},
    {"type": "object", "properties": {"flags": {"type": "object", "properties": {"a": {"type": "boolean"}, "b": {"type": "boolean"}},
     "required": ["a", "b"], "additionalProperties": False}, "level": {"enum": [1, 2, 3]}}, "required": ["flags", "level"], "additionalProperties": False},
]
assert len(SCHEMAS) == 20
SAMPLES = int(sys.argv[3]) if len(sys.argv) > 3 else 50


def structured(i, schema, seed):
    r = client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=200, temperature=1.0, seed=seed,
        response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema, "strict": True}})
    choice = r.choices[0]
    assert choice.finish_reason == "stop", (i, seed, choice.finish_reason, choice.message.content)
    doc = json.loads(choice.message.content)
    jsonschema.validate(doc, schema)
    return doc


jobs = [(i, s, seed) for i, s in enumerate(SCHEMAS) for seed in range(SAMPLES)]
with ThreadPoolExecutor(max_workers=8) as pool:
    docs = list(pool.map(lambda j: structured(*j), jobs))
distinct = len({json.dumps(d, sort_keys=True) for d in docs})
assert distinct > len(SCHEMAS), f"sampling should vary the documents: {distinct} distinct of {len(docs)}"
print(f"structured output: {len(docs)} documents over {len(SCHEMAS)} schemas, all valid ({distinct} distinct)")

# "Any JSON object" bounds nothing, so a small model may ramble to max_tokens; every answer
# that ends by itself is an object.
objects = [client.chat.completions.create(model=MODEL, messages=USER, max_tokens=300, temperature=0.7, seed=s,
                                          response_format={"type": "json_object"}).choices[0] for s in range(8)]
finished = [c for c in objects if c.finish_reason == "stop"]
assert finished and all(isinstance(json.loads(c.message.content), dict) for c in finished), objects
bad_request("response_format", response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}})
bad_request("response_format.type", response_format={"type": "yaml"})

# ---- log-probabilities

r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Name three colors."}], max_tokens=12,
                                   temperature=0, logprobs=True, top_logprobs=3)
content = r.choices[0].logprobs.content
assert len(content) == r.usage.completion_tokens or (r.choices[0].finish_reason == "stop" and len(content) == r.usage.completion_tokens - 1), \
    (len(content), r.usage)
assert "".join(t.token for t in content) == r.choices[0].message.content, ([t.token for t in content], r.choices[0].message.content)
for t in content:
    assert len(t.top_logprobs) == 3 and t.logprob <= 0, t
    assert [x.logprob for x in t.top_logprobs] == sorted((x.logprob for x in t.top_logprobs), reverse=True), t
    # Greedy: the picked token is the most likely one.
    assert t.top_logprobs[0].token == t.token and abs(t.top_logprobs[0].logprob - t.logprob) < 1e-5, t
    assert bytes(t.bytes).decode("utf-8", "replace") == t.token

streamed = []
for chunk in client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Name three colors."}], max_tokens=12,
                                            temperature=0, logprobs=True, top_logprobs=3, stream=True):
    if chunk.choices and chunk.choices[0].logprobs and chunk.choices[0].logprobs.content:
        streamed.extend(chunk.choices[0].logprobs.content)
assert [(t.token, round(t.logprob, 4)) for t in streamed] == [(t.token, round(t.logprob, 4)) for t in content]

legacy = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=6, temperature=0, logprobs=2)
lp = legacy.choices[0].logprobs
assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6, lp
assert "".join(lp.tokens) == legacy.choices[0].text and all(len(t) == 2 for t in lp.top_logprobs), lp
bad_request("top_logprobs", top_logprobs=3)  # without logprobs=True
bad_request("top_logprobs", logprobs=True, top_logprobs=21)
print("logprobs: ok")

# ---- penalties, logit_bias, seed

LOOP = [{"role": "user", "content": "Say the word hello again and again."}]


def tokens(extra=None, **kw):
    # 40 tokens whatever the model says (greedy small models loop; that is the point).
    r = client.chat.completions.create(model=MODEL, messages=LOOP, max_tokens=40, temperature=0, logprobs=True,
                                       extra_body={"ignore_eos": True, **(extra or {})}, **kw)
    # By bytes: the pieces of a split emoji all print as U+FFFD but are different tokens.
    out = [tuple(t.bytes) for t in r.choices[0].logprobs.content]
    assert len(out) == 40, out
    return out


def most_repeated(toks):
    return max(toks.count(t) for t in set(toks))


plain = tokens()
for penalized in [tokens(frequency_penalty=2.0, presence_penalty=2.0), tokens({"repetition_penalty": 1.5})]:
    assert len(set(penalized)) > len(set(plain)) and most_repeated(penalized) < most_repeated(plain), (plain, penalized)
assert tokens(frequency_penalty=0.0) == plain, "a zero penalty changes nothing"

first = client.chat.completions.create(model=MODEL, messages=LOOP, max_tokens=1, temperature=0, logprobs=True, top_logprobs=2)
top = first.choices[0].logprobs.content[0].top_logprobs
second_id = post("/tokenize", {"content": top[1].token, "add_special": False, "model": MODEL})["tokens"][0]
biased = client.chat.completions.create(model=MODEL, messages=LOOP, max_tokens=1, temperature=0, logprobs=True,
                                        logit_bias={str(second_id): 100})
assert biased.choices[0].logprobs.content[0].token == top[1].token, (top, biased)
bad_request("logit_bias", logit_bias={"99999999": 5})
bad_request("logit_bias.abc", logit_bias={"abc": 5})
bad_request("frequency_penalty", frequency_penalty=3)

def sampled(seed):
    return client.chat.completions.create(model=MODEL, messages=USER, max_tokens=24, temperature=1.0, seed=seed).choices[0].message.content


assert sampled(7) == sampled(7)
assert len({sampled(s) for s in range(4)}) > 1
print("penalties, logit_bias, seed: ok")

# ---- what the local model cannot do is a 400 naming it, never a quiet 200

tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
bad_request("tools", tools=[tool])
bad_request("tool_choice", tool_choice="required")
bad_request("messages[1]", messages=[{"role": "user", "content": "hi"}, {"role": "tool", "content": "42", "tool_call_id": "c1"}])
bad_request("messages[0].name", messages=[{"role": "user", "content": "hi", "name": "bob"}])
bad_request("n", n=2)
bad_request("frobnicate", extra_body={"frobnicate": 1})
bad_request("audio", extra_body={"audio": {"voice": "alloy", "format": "wav"}})
bad_request("reasoning_effort", reasoning_effort="high")
e = None
try:
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "word " * 20000}], max_tokens=8)
except openai.BadRequestError as err:
    e = err
assert e is not None and e.status_code == 400 and e.body.get("code") == "context_length_exceeded", e
# Accepted and recorded, not refused: user, metadata, store=false, service_tier=auto.
ok = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=4, user="user-42", metadata={"team": "edge"},
                                    store=False, service_tier="auto", parallel_tool_calls=False, prompt_cache_key="k")
assert ok.choices[0].message.content is not None
print("refusals: ok")
print("openai fidelity: ok")
