"""Baseline: llama.cpp (through llama-cpp-python, CPU) on one GGUF file, measured the way
benches/edge.rs measures edgenode, with the same prompts (benches/prompts.json).

Usage: llama_cpp_bench.py MODEL.gguf --template chatml|zephyr [--threads N] [--long-repeats N]

Prints one line of key=value figures:
  decode_tok_per_s   greedy tokens/s after the story prompt, 128 tokens, end of sequence
                     ignored, timed from the first token on; best of 3
  prompt_tok_per_s   the long prompt (long_sentence repeated) evaluated in one go; best of 3
  prompt_tokens      its length in tokens
  ttft_ms_p50        time to the first token of the short prompt; median of 5
  weight_bytes_per_token  bytes of the tensors a decode step reads (all but token_embd)
"""
import argparse
import json
import os
import time

from llama_cpp import Llama

p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("--template", required=True)
p.add_argument("--threads", type=int, default=os.cpu_count())
p.add_argument("--long-repeats", type=int, default=60)
p.add_argument("--tokens", type=int, default=128)
a = p.parse_args()

prompts = json.load(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "prompts.json")))
t = prompts["templates"][a.template]
llm = Llama(model_path=a.model, n_ctx=2048, n_threads=a.threads, n_threads_batch=a.threads, n_batch=512, verbose=False, seed=0)
add_bos = llm.metadata.get("tokenizer.ggml.add_bos_token", "false") == "true"


def tokens(text):
    # The model's own BOS rule (add_bos_token), special tokens recognized: what a server does.
    return llm.tokenize(text.encode(), add_bos=add_bos, special=True)


story = tokens(t["story"])


def decode_rate():
    count, t0 = 0, None
    for _ in llm.generate(story, top_k=1, top_p=1.0, temp=0.0, reset=True):
        if t0 is None:
            t0 = time.perf_counter()  # the first token is out: prefill is done
        else:
            count += 1
        if count >= a.tokens:
            break
    return count / (time.perf_counter() - t0)


decode_rate()  # warm-up
decode = max(decode_rate() for _ in range(3))

long = tokens(" ".join([prompts["long_sentence"]] * a.long_repeats))
pp = 0.0
for _ in range(3):
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(long)
    pp = max(pp, len(long) / (time.perf_counter() - t0))

short = tokens(t["short"])
ttft = []
for _ in range(5):
    llm.reset()
    t0 = time.perf_counter()
    next(iter(llm.generate(short, top_k=1, temp=0.0, reset=True)))
    ttft.append((time.perf_counter() - t0) * 1000)
ttft.sort()

try:
    from gguf import GGUFReader

    per_token = sum(int(x.n_bytes) for x in GGUFReader(a.model).tensors if x.name != "token_embd.weight")
except ImportError:
    per_token = 0
print(f"llama.cpp (llama-cpp-python {__import__('llama_cpp').__version__}) threads={a.threads}")
print(
    f"decode_tok_per_s={decode:.2f} prompt_tok_per_s={pp:.1f} prompt_tokens={len(long)} ttft_ms_p50={ttft[2]:.1f} "
    f"weight_bytes_per_token={per_token}"
)
