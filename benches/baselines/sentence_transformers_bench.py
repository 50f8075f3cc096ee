"""Baseline: sentence-transformers (PyTorch, CPU, float32, or bfloat16 with --bf16) on one
model folder, measured the way benches/edge.rs measures edgenode's /embed.

Usage: sentence_transformers_bench.py MODEL_DIR SENTENCES.txt [--threads N] [--bf16]

With --bf16 the model runs in torch.bfloat16 (oneDNN's AVX-512 BF16 or AMX kernels, where
the CPU has them), as `model_kwargs={"torch_dtype": torch.bfloat16}` does.

Prints one line of key=value figures: batch32_throughput_sent_per_s (the sentences under
200 characters cycled to 512 texts, batches of 32, best of 3), single_p50_ms and
single_p99_ms (one sentence per call, 200 calls).
"""
import argparse
import os
import time

import torch
from sentence_transformers import SentenceTransformer

p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("sentences")
p.add_argument("--threads", type=int, default=os.cpu_count())
p.add_argument("--bf16", action="store_true")
a = p.parse_args()
torch.set_num_threads(a.threads)
kwargs = {"model_kwargs": {"torch_dtype": torch.bfloat16}} if a.bf16 else {}
st = SentenceTransformer(a.model, device="cpu", **kwargs)
short = [l.strip() for l in open(a.sentences, encoding="utf-8") if l.strip() and len(l.strip()) < 200]
corpus = [short[i % len(short)] for i in range(512)]
st.encode(corpus[:64], batch_size=32)  # warm-up
best = float("inf")
for _ in range(3):
    t0 = time.perf_counter()
    st.encode(corpus, batch_size=32)
    best = min(best, time.perf_counter() - t0)
lat = []
for i in range(200):
    t0 = time.perf_counter()
    st.encode([short[i % len(short)]])
    lat.append((time.perf_counter() - t0) * 1000)
lat.sort()
print(f"sentence-transformers {__import__('sentence_transformers').__version__} torch {torch.__version__} threads={a.threads} dtype={'bfloat16' if a.bf16 else 'float32'}")
print(f"batch32_throughput_sent_per_s={len(corpus) / best:.1f} single_p50_ms={lat[100]:.2f} single_p99_ms={lat[197]:.2f}")
