"""text-embeddings-inference's dialect, checked against TEI's own OpenAPI document, and
OpenAI's embeddings as LangChain and the `openai` client send them.

Usage: tei_client.py BASE_URL OPENAPI_JSON   (e.g. http://127.0.0.1:8080 tests/fixtures/tei_openapi.json)

Every answer of a TEI route is validated with `jsonschema` against the response schema
TEI publishes for it. Exits non-zero with the failure printed.
"""
import json
import sys
import urllib.error
import urllib.request

import jsonschema
from openapi_schema import component_schema
import openai
from openai import OpenAI

BASE, SPEC = sys.argv[1], json.load(open(sys.argv[2]))


def schema(name):
    return component_schema(SPEC, name)


def call(method, path, body=None):
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(BASE + path, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            raw = r.read()
            return r.status, (json.loads(raw) if raw else None)
    except urllib.error.HTTPError as e:
        raw = e.read()
        return e.code, (json.loads(raw) if raw else None)


def ok(path, body, response_schema):
    status, answer = call("POST", path, body)
    assert status == 200, (path, body, status, answer)
    jsonschema.validate(answer, schema(response_schema))
    return answer


def tei_error(path, body, status, error_type):
    got, answer = call("POST", path, body)
    assert got == status, (path, body, got, answer)
    jsonschema.validate(answer, schema("ErrorResponse"))
    assert answer["error_type"] == error_type, (path, answer)
    return answer


# ---- answers, validated against TEI's response schemas

vectors = ok("/embed", {"inputs": ["edge inference", "a second input"]}, "EmbedResponse")
assert len(vectors) == 2 and len(vectors[0]) == 384
one = ok("/embed", {"inputs": "edge inference"}, "EmbedResponse")
assert len(one) == 1 and max(abs(a - b) for a, b in zip(one[0], vectors[0])) < 1e-5
short = ok("/embed", {"inputs": "edge inference", "dimensions": 64}, "EmbedResponse")
assert len(short[0]) == 64 and abs(sum(x * x for x in short[0]) - 1) < 1e-4
raw = ok("/embed", {"inputs": "edge inference", "dimensions": 64, "normalize": False}, "EmbedResponse")
assert len(raw[0]) == 64

long_text = "edge " * 2000
cut = ok("/embed", {"inputs": long_text}, "EmbedResponse")  # auto_truncate: cut, as TEI 1.9
left = ok("/embed", {"inputs": long_text + "tail words differ", "truncation_direction": "Left"}, "EmbedResponse")
right = ok("/embed", {"inputs": long_text + "tail words differ", "truncation_direction": "Right"}, "EmbedResponse")
assert right[0] == cut[0] and left[0] != right[0], "Left keeps the end, Right the beginning"

tokens = ok("/tokenize", {"inputs": "edge nodes"}, "TokenizeResponse")
first = tokens[0]
assert first[0]["special"] and first[0]["start"] is None and first[-1]["special"], first
assert [t["text"] for t in first if not t["special"]] == ["edge", "nodes"], first
assert all("edge nodes"[t["start"]:t["stop"]] == t["text"] for t in first if not t["special"]), first
plain = ok("/tokenize", {"inputs": ["edge nodes"], "add_special_tokens": False}, "TokenizeResponse")
assert not any(t["special"] for t in plain[0])
ids = [t["id"] for t in first]
assert ok("/decode", {"ids": ids}, "DecodeResponse") == ["edge nodes"]
assert ok("/decode", {"ids": [ids, ids], "skip_special_tokens": False}, "DecodeResponse")[0].startswith("[CLS]")

# /embed_all: every token's state; mean-pooled and normalized, it is /embed's vector (MiniLM pools by mean).
states = ok("/embed_all", {"inputs": ["edge inference", "a second input"]}, "EmbedAllResponse")
n_tokens = len(ok("/tokenize", {"inputs": "edge inference"}, "TokenizeResponse")[0])
assert len(states) == 2 and len(states[0]) == n_tokens and all(len(t) == 384 for t in states[0]), [len(x) for x in states]
mean = [sum(col) / n_tokens for col in zip(*states[0])]
norm = sum(x * x for x in mean) ** 0.5
assert max(abs(a / norm - b) for a, b in zip(mean, vectors[0])) < 1e-4, "mean of /embed_all is /embed"

scores = ok("/predict", {"inputs": "What's the capital of Italy?"}, "PredictResponse")
assert abs(sum(s["score"] for s in scores) - 1) < 1e-4 and scores == sorted(scores, key=lambda s: -s["score"])
# A batch is a list of lists on /predict (a list of two strings is one sentence pair there).
batch = ok("/predict", {"inputs": [["hi"], ["Write an essay on monetary policy."]]}, "PredictResponse")
assert len(batch) == 2 and all(len(row) == 2 for row in batch), batch
tei_error("/predict", {"inputs": ["hi", "there"]}, 422, "Validation")  # a pair, and the router reads texts only

# /similarity: the cosine of the source sentence's embedding with each sentence's.
sims = ok("/similarity", {"inputs": {"source_sentence": "edge inference", "sentences": ["edge inference", "a second input"]}}, "SimilarityResponse")
assert len(sims) == 2 and abs(sims[0] - 1) < 1e-4, sims
assert abs(sims[1] - sum(a * b for a, b in zip(vectors[0], vectors[1]))) < 1e-4, sims
tei_error("/similarity", {"inputs": {"source_sentence": "x", "sentences": []}}, 400, "Empty")
tei_error("/similarity", {"inputs": {"source_sentence": "x", "sentences": ["y"], "extra": 1}}, 422, "Validation")

status, info = call("GET", "/info")
assert status == 200
for field in ["model_id", "model_dtype", "model_type", "max_concurrent_requests", "max_input_length", "max_batch_tokens",
              "max_client_batch_size", "auto_truncate", "tokenization_workers", "version"]:
    assert field in info, (field, sorted(info))
assert info["max_input_length"] == 256 and info["max_client_batch_size"] == 2048 and info["auto_truncate"] is True, info
assert info["model_type"] == {"embedding": {"pooling": "mean"}}, info["model_type"]
status, health = call("GET", "/health")
assert status == 200 and health is None
print("tei answers: ok")

# ---- errors in TEI's shape, with TEI 1.9's statuses (its document still says 413 for validation)

tei_error("/embed", {"inputs": []}, 400, "Empty")
tei_error("/embed", {"inputs": ""}, 400, "Empty")
tei_error("/embed", {"inputs": long_text, "truncate": False}, 422, "Validation")
tei_error("/embed", {"inputs": ["x"] * 2049}, 422, "Validation")
tei_error("/embed", {"inputs": "x", "frobnicate": True}, 422, "Validation")
tei_error("/embed", {"inputs": "x", "dimensions": 4096}, 422, "Validation")
tei_error("/embed", {"inputs": "x", "truncation_direction": "Middle"}, 422, "Validation")
msg = tei_error("/embed", {"inputs": [[101, 2054, 102]]}, 422, "Validation")["error"]
assert "token ids" in msg and "check_embedding_ctx_length=False" in msg, msg
tei_error("/embed", b"{not json", 400, "Validation")
tei_error("/decode", {"ids": [999999999]}, 422, "Validation")
tei_error("/tokenize", {"inputs": []}, 400, "Empty")
tei_error("/predict", {"inputs": "x", "model": "no-such-model"}, 404, "Validation")
print("tei errors: ok")

# ---- OpenAI's embeddings as clients send them: 1,000 inputs in one request

client = OpenAI(base_url=BASE + "/v1", api_key="not-needed", max_retries=0, timeout=300)
texts = [f"document number {i} about edge inference and small models" for i in range(1000)]
big = client.embeddings.create(model="minilm", input=texts)
assert [d.index for d in big.data] == list(range(1000)) and len(big.data[0].embedding) == 384
solo = client.embeddings.create(model="minilm", input=texts[737]).data[0].embedding
assert max(abs(a - b) for a, b in zip(solo, big.data[737].embedding)) < 1e-4, "the 738th vector is the 738th input's"
try:
    client.embeddings.create(model="minilm", input=[[1, 2, 3]])
    raise AssertionError("token ids must be refused")
except openai.BadRequestError as e:
    assert "check_embedding_ctx_length=False" in str(e), e

from langchain_openai import OpenAIEmbeddings  # noqa: E402

lc = OpenAIEmbeddings(base_url=BASE + "/v1", api_key="not-needed", model="minilm", check_embedding_ctx_length=False, chunk_size=1000)
lc_vectors = lc.embed_documents(texts)
assert len(lc_vectors) == 1000 and max(abs(a - b) for a, b in zip(lc_vectors[737], solo)) < 1e-4
print("openai and langchain embeddings: ok")
print("tei fidelity: ok")
