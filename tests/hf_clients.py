"""Hugging Face's own clients against a running edgenode: text-generation-inference's
dialect checked against TGI's OpenAPI document, then huggingface_hub's InferenceClient and
LangChain's HuggingFaceEndpoint, pointed at each route's URL and at the node's base URL.

Usage: hf_clients.py BASE_URL CLASSIFY_ROOT_URL OPENAPI_JSON

BASE_URL serves the default models (an embedder, the router's classifier and a chat
model); CLASSIFY_ROOT_URL is a node with `server.root_route = "classify"`. Exits non-zero
with the failure printed. Runs with the interpreter scripts/test.sh prepares for these
clients (huggingface_hub, langchain-huggingface, jsonschema).
"""
import json
import math
import re
import sys
import urllib.error
import urllib.request

import jsonschema
from openapi_schema import component_schema
from huggingface_hub import InferenceClient
from huggingface_hub.errors import ValidationError
from langchain_huggingface import HuggingFaceEndpoint

BASE, CLASSIFY_ROOT, SPEC = sys.argv[1], sys.argv[2], json.load(open(sys.argv[3]))
PROMPT = "The capital of France is"


def schema(name):
    return component_schema(SPEC, name)


def call(path, body, base=BASE, method="POST"):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read()


def generate(path, body, base=BASE):
    status, _, raw = call(path, body, base)
    answer = json.loads(raw)
    assert status == 200, (path, body, status, answer)
    if isinstance(answer, list):
        jsonschema.validate(answer, {"type": "array", "items": schema("GenerateResponse")})
        assert len(answer) == 1, answer
        return answer[0]
    jsonschema.validate(answer, schema("GenerateResponse"))
    return answer


def stream(path, body, base=BASE):
    status, ctype, raw = call(path, body, base)
    assert status == 200 and ctype.startswith("text/event-stream"), (path, body, status, raw[:300])
    assert b"[DONE]" not in raw, "TGI's stream ends with its last token event, not OpenAI's [DONE]"
    events = []
    for line in raw.decode().splitlines():
        if line.startswith("data:") and line[5:].strip() != "[DONE]":
            event = json.loads(line[5:])
            jsonschema.validate(event, schema("StreamResponse"))
            events.append(event)
    assert events, raw
    assert [e["index"] for e in events] == list(range(1, len(events) + 1)), events
    assert all(e["generated_text"] is None for e in events[:-1]) and events[-1]["generated_text"] is not None, events
    return events


def tgi_error(path, body, status, needle):
    got, _, raw = call(path, body)
    answer = json.loads(raw)
    assert got == status, (path, body, got, answer)
    jsonschema.validate(answer, schema("ErrorResponse"))
    assert answer["error_type"] == "validation", answer
    assert needle in answer["error"], (needle, answer)
    return answer


def text_of(tokens):
    return "".join(t["text"] for t in tokens if not t["special"])


def check_tgi_routes():
    p = {"max_new_tokens": 12}
    greedy = generate("/generate", {"inputs": PROMPT, "parameters": p})
    assert set(greedy) == {"generated_text"}, greedy
    again = generate("/generate", {"inputs": PROMPT, "parameters": p})
    assert again == greedy, "greedy decoding (no do_sample) is reproducible"
    text = greedy["generated_text"]

    # details: every token with its text, log-probability and alternatives; the prompt's.
    d = generate("/generate", {"inputs": PROMPT, "parameters": {**p, "details": True, "decoder_input_details": True, "top_n_tokens": 2}})
    details = d["details"]
    assert d["generated_text"] == text and details["seed"] is None, d
    assert details["generated_tokens"] == len(details["tokens"]), details
    assert text_of(details["tokens"]) == text, (text_of(details["tokens"]), text)
    assert details["finish_reason"] in ("length", "eos_token"), details
    assert details["prefill"][0]["logprob"] is None and all(isinstance(t["logprob"], float) for t in details["prefill"][1:]), details["prefill"]
    assert len(details["prefill"]) >= 5, details["prefill"]
    assert len(details["top_tokens"]) == len(details["tokens"]) and all(len(t) == 2 for t in details["top_tokens"]), details
    first = details["tokens"][0]
    assert first["id"] == details["top_tokens"][0][0]["id"], "greedy picks the most likely token"

    # Sampling with a seed: reported, and reproducible.
    s = {"max_new_tokens": 12, "do_sample": True, "temperature": 0.9, "top_k": 40, "typical_p": 0.9, "seed": 7, "details": True}
    a, b = generate("/generate", {"inputs": PROMPT, "parameters": s}), generate("/generate", {"inputs": PROMPT, "parameters": s})
    assert a == b and a["details"]["seed"] == 7, (a, b)

    # The stream: one event per token, the text and details on the last.
    events = stream("/generate_stream", {"inputs": PROMPT, "parameters": {**p, "details": True, "top_n_tokens": 1}})
    last = events[-1]
    assert last["generated_text"] == text, (last, text)
    assert text_of([e["token"] for e in events]) == text, events
    assert last["details"]["generated_tokens"] == len(events) and last["details"]["input_length"] > 0, last
    assert all(len(e["top_tokens"]) == 1 for e in events), events
    # `/generate` streams too when asked (InferenceClient posts `stream` to whatever URL it has).
    assert stream("/generate", {"inputs": PROMPT, "parameters": p, "stream": True})[-1]["generated_text"] == text

    # A stop sequence stays in the text, as TGI keeps it, and ends generation there.
    words = re.findall(r"[A-Za-z]{3,}", text)
    if words:
        word = words[min(1, len(words) - 1)]
        cut = generate("/generate", {"inputs": PROMPT, "parameters": {**p, "stop": [word], "details": True}})
        assert word in cut["generated_text"] and text.startswith(cut["generated_text"]), (word, cut, text)
        assert cut["details"]["finish_reason"] == "stop_sequence", cut
        streamed = stream("/generate_stream", {"inputs": PROMPT, "parameters": {**p, "stop": [word]}})
        assert streamed[-1]["generated_text"] == cut["generated_text"], (streamed, cut)

    # POST /: a list, with the prompt in front (TGI's default there for text-generation models).
    full = generate("/", {"inputs": PROMPT, "parameters": p})
    assert full["generated_text"] == PROMPT + text, full
    assert generate("/", {"inputs": PROMPT, "parameters": {**p, "return_full_text": False}})["generated_text"] == text
    assert stream("/", {"inputs": PROMPT, "parameters": p, "stream": True})[-1]["generated_text"] == PROMPT + text

    # Grammars: a JSON schema, and a regular expression.
    person = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    j = generate("/generate", {"inputs": "A person as JSON:", "parameters": {"max_new_tokens": 60, "grammar": {"type": "json", "value": person}, "details": True}})
    jsonschema.validate(json.loads(j["generated_text"]), person)
    assert j["details"]["finish_reason"] == "eos_token", j
    r = generate("/generate", {"inputs": "Is Paris in France? Answer:", "parameters": {"max_new_tokens": 8, "grammar": {"type": "regex", "value": "(yes|no)"}}})
    assert r["generated_text"] in ("yes", "no"), r

    # What we cannot honour is a 400 naming it; what TGI refuses, TGI's 422.
    tgi_error("/generate", {"inputs": PROMPT, "parameters": {"watermark": True}}, 400, "parameters.watermark")
    tgi_error("/generate", {"inputs": PROMPT, "parameters": {"best_of": 2}}, 400, "parameters.best_of")
    tgi_error("/generate", {"inputs": PROMPT, "parameters": {"adapter_id": "my-lora"}}, 400, "parameters.adapter_id")
    tgi_error("/generate", {"inputs": PROMPT, "parameters": {"frobnicate": 1}}, 400, "parameters.frobnicate")
    tgi_error("/generate", {"inputs": PROMPT, "prompt": "x"}, 400, "prompt")
    tgi_error("/generate", {"inputs": PROMPT, "parameters": {"temperature": 0}}, 422, "parameters.temperature")
    tgi_error("/generate", {"inputs": PROMPT, "parameters": {"top_p": 1.0}}, 422, "parameters.top_p")
    tgi_error("/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 0}}, 422, "parameters.max_new_tokens")
    tgi_error("/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 10**6}}, 422, "parameters.max_new_tokens")
    tgi_error("/generate", {"inputs": "", "parameters": {}}, 422, "inputs")
    tgi_error("/generate_stream", {"inputs": PROMPT, "parameters": {"decoder_input_details": True}}, 422, "decoder_input_details")
    tgi_error("/generate", {"inputs": PROMPT, "parameters": {"grammar": {"type": "lark", "value": "x"}}}, 422, "parameters.grammar.type")
    # ... and nothing is held afterwards: the node still answers.
    assert generate("/generate", {"inputs": PROMPT, "parameters": p}) == greedy

    # Our own /generate keeps its dialect beside TGI's.
    status, _, raw = call("/generate", {"prompt": PROMPT, "max_tokens": 4, "temperature": 0})
    native = json.loads(raw)
    assert status == 200 and {"text", "finish_reason", "usage", "model"} <= set(native), native

    # /info: TGI's fields beside TEI's and ours.
    status, _, raw = call("/info", None, method="GET")
    info = json.loads(raw)
    jsonschema.validate(info, schema("Info"))
    assert info["max_total_tokens"] > info["max_input_tokens"] > 0 and info["max_best_of"] == 1, info
    print(f"TGI routes: ok ({len(events)} streamed tokens, schema-valid, errors named)")
    return text


def close(a, b, tol=1e-4):
    return all(math.isclose(x, y, abs_tol=tol) for x, y in zip(a, b)) and len(a) == len(b)


def embed(texts):
    status, _, raw = call("/embed", {"inputs": texts})
    assert status == 200, raw
    return json.loads(raw)


def check_inference_client(text):
    at_route = InferenceClient(model=BASE + "/generate")
    at_base = InferenceClient(model=BASE)
    p = {"max_new_tokens": 12}

    # text_generation at /generate: plain, details, streamed, with a grammar, with stop.
    assert at_route.text_generation(PROMPT, **p) == text
    out = at_route.text_generation(PROMPT, details=True, **p)
    assert out.generated_text == text and out.details.generated_tokens == len(out.details.tokens), out
    assert "".join(at_route.text_generation(PROMPT, stream=True, **p)) == text
    chunks = list(at_route.text_generation(PROMPT, stream=True, details=True, **p))
    assert chunks[-1].generated_text == text and chunks[-1].details is not None, chunks[-1]
    answer = at_route.text_generation("A city as JSON:", max_new_tokens=60,
                                      grammar={"type": "json", "value": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16}}, "required": ["city"]}})
    assert isinstance(json.loads(answer)["city"], str), answer
    words = re.findall(r"[A-Za-z]{3,}", text)
    if words:
        cut = at_route.text_generation(PROMPT, stop=[words[0]], **p)
        assert cut.endswith(words[0]) or words[0] in cut, (cut, words[0])
    try:
        at_route.text_generation(PROMPT, watermark=True, **p)
        raise AssertionError("watermark=True must be refused")
    except ValidationError as e:
        assert "watermark" in str(e), e

    # text_generation with only the base URL: POST / (TGI's compat route, prompt included).
    assert at_base.text_generation(PROMPT, **p) == PROMPT + text
    assert "".join(at_base.text_generation(PROMPT, stream=True, **p)) == text

    # feature_extraction, at /embed and at the base URL.
    reference = embed(["edge inference"])[0]
    for client in (InferenceClient(model=BASE + "/embed"), at_base):
        got = client.feature_extraction("edge inference")
        assert got.shape == (1, len(reference)) and close(list(got[0]), reference), got.shape

    # sentence_similarity, at /similarity and at the base URL: cosines of the embeddings.
    source, others = "A cat sits on the mat.", ["A cat is sitting on a rug.", "Stock markets fell today."]
    vectors = embed([source] + others)
    want = [sum(a * b for a, b in zip(vectors[0], v)) for v in vectors[1:]]
    for client in (InferenceClient(model=BASE + "/similarity"), at_base):
        got = client.sentence_similarity(source, other_sentences=others)
        assert close(got, want), (got, want)
    assert want[0] > want[1], want

    # text_classification, at /classify; at the base URL when the body says classification
    # (function_to_apply), or on a node whose server.root_route is "classify".
    question = "What is the capital of France?"
    labels = InferenceClient(model=BASE + "/classify").text_classification(question)
    assert {l.label for l in labels} == {"edge", "cloud"} and math.isclose(sum(l.score for l in labels), 1, abs_tol=1e-4), labels
    assert len(InferenceClient(model=BASE + "/classify").text_classification(question, top_k=1)) == 1
    sig = InferenceClient(model=BASE + "/classify").text_classification(question, function_to_apply="sigmoid")
    assert all(0 < l.score < 1 for l in sig) and not math.isclose(sum(l.score for l in sig), 1, abs_tol=1e-3), sig
    assert [l.label for l in at_base.text_classification(question, function_to_apply="softmax")] == [l.label for l in labels]
    assert [l.label for l in InferenceClient(model=CLASSIFY_ROOT).text_classification(question)] == [l.label for l in labels]

    # chat_completion, at the route's URL and at the base URL (the client sends model "dummy").
    messages = [{"role": "user", "content": "Say hello."}]
    for client in (InferenceClient(model=BASE + "/v1/chat/completions"), at_base):
        reply = client.chat_completion(messages, max_tokens=8, temperature=0)
        assert reply.choices[0].message.content and reply.choices[0].finish_reason in ("stop", "length"), reply
    fmt = {"type": "json_schema", "json_schema": {"name": "greeting", "schema": {"type": "object", "properties": {"greeting": {"type": "string", "maxLength": 16}}, "required": ["greeting"]}}}
    reply = at_base.chat_completion(messages, max_tokens=40, temperature=0, response_format=fmt)
    assert isinstance(json.loads(reply.choices[0].message.content)["greeting"], str), reply
    status, _, raw = call("/v1/chat/completions", {"model": "no-such-model", "messages": messages})
    assert status == 404, (status, raw)
    print("InferenceClient: ok (text_generation, feature_extraction, sentence_similarity, text_classification, chat_completion; route and base URLs)")


def check_langchain():
    def llm(**kw):
        return HuggingFaceEndpoint(endpoint_url=BASE, max_new_tokens=12, seed=11, **kw)
    said = llm().invoke(PROMPT)
    assert isinstance(said, str) and said and not said.startswith(PROMPT), said
    streamed = "".join(llm(streaming=True).stream(PROMPT))
    assert streamed == said, (streamed, said)
    print(f"LangChain HuggingFaceEndpoint: ok (invoke and stream agree: {said!r})")


text = check_tgi_routes()
check_inference_client(text)
check_langchain()
