"""Baseline: ONNX Runtime on the CPU, in-process, on the same sentence-transformers folder that
edgenode serves, measured the way sentence_transformers_bench.py measures PyTorch.

Usage: onnxruntime_bench.py MODEL_DIR SENTENCES.txt [--threads N] [--cache DIR] [--int8]

The folder's transformer is exported once with torch.onnx.export (fp32, opset 17, dynamic
batch and sequence axes) into --cache (default ~/.cache/edgenode/onnx/<folder name>), and run
by an InferenceSession with every graph optimization on (ORT_ENABLE_ALL) and N intra-op
threads. What is timed is everything an in-process user runs: the folder's own tokenizer.json
(the `tokenizers` library, truncation to the folder's max_seq_length, padding to the longest
input), the session, and the folder's pooling (mean or CLS) and Normalize in numpy.

--int8 also measures onnxruntime.quantization.quantize_dynamic's model of the same export
(int8 weights per output channel, activations quantized per call) and its smallest cosine to
the fp32 vectors over the sentences: the quantized baseline for edgenode's int8 encoder.

Prints key=value lines: batch32_throughput_sent_per_s (the sentences under 200 characters
cycled to 512 texts, batches of 32, best of 3), single_p50_ms and single_p99_ms (one
sentence per call, 200 calls); with --int8, the same keys prefixed int8_ and int8_min_cosine.
"""
import argparse
import json
import os
import time

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer


def folder_config(model_dir):
    """Pooling mode, Normalize and max length, from the sentence-transformers folder."""
    pooling = {"pooling_mode_mean_tokens": True}
    modules = []
    max_len = 512
    for name in os.listdir(model_dir):
        if name.endswith("_Pooling") and os.path.exists(os.path.join(model_dir, name, "config.json")):
            pooling = json.load(open(os.path.join(model_dir, name, "config.json")))
    if os.path.exists(os.path.join(model_dir, "modules.json")):
        modules = [m["type"] for m in json.load(open(os.path.join(model_dir, "modules.json")))]
    if os.path.exists(os.path.join(model_dir, "sentence_bert_config.json")):
        max_len = json.load(open(os.path.join(model_dir, "sentence_bert_config.json"))).get("max_seq_length", max_len)
    cls = pooling.get("pooling_mode_cls_token") or pooling.get("pooling_mode") == "cls"
    normalize = any(m.endswith("Normalize") for m in modules)
    return ("cls" if cls else "mean"), normalize, max_len


def export(model_dir, path):
    import torch
    from transformers import AutoModel

    class Hidden(torch.nn.Module):
        """The transformer with named inputs and its last hidden state as the one output."""

        def __init__(self):
            super().__init__()
            self.bert = AutoModel.from_pretrained(model_dir).eval()

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state

    model = Hidden().eval()
    ids = torch.ones((2, 8), dtype=torch.long)
    axes = {0: "batch", 1: "sequence"}
    torch.onnx.export(
        model,
        (ids, torch.ones_like(ids), torch.zeros_like(ids)),
        path,
        input_names=["input_ids", "attention_mask", "token_type_ids"],
        output_names=["last_hidden_state"],
        dynamic_axes={"input_ids": axes, "attention_mask": axes, "token_type_ids": axes, "last_hidden_state": axes},
        opset_version=17,
        dynamo=False,
    )


class Encoder:
    def __init__(self, model_path, tokenizer, mode, normalize, threads):
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(model_path, opts, providers=["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.session.get_inputs()}
        self.tokenizer, self.mode, self.normalize = tokenizer, mode, normalize

    def encode(self, texts):
        enc = self.tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in enc], dtype=np.int64)
        mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
        feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        hidden = self.session.run(None, {k: v for k, v in feed.items() if k in self.inputs})[0]
        if self.mode == "cls":
            out = hidden[:, 0]
        else:
            m = mask[..., None].astype(np.float32)
            out = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
        if self.normalize:
            out = out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out


def measure(enc, corpus, short):
    enc.encode(corpus[:64])  # warm-up
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for i in range(0, len(corpus), 32):
            enc.encode(corpus[i:i + 32])
        best = min(best, time.perf_counter() - t0)
    lat = []
    for i in range(200):
        t0 = time.perf_counter()
        enc.encode([short[i % len(short)]])
        lat.append((time.perf_counter() - t0) * 1000)
    lat.sort()
    return len(corpus) / best, lat[100], lat[197]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("sentences")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--cache", default=None)
    p.add_argument("--int8", action="store_true")
    a = p.parse_args()

    model_dir = os.path.abspath(a.model)
    cache = a.cache or os.path.join(os.path.expanduser("~/.cache/edgenode/onnx"), os.path.basename(model_dir.rstrip("/")))
    os.makedirs(cache, exist_ok=True)
    fp32 = os.path.join(cache, "model.onnx")
    # Re-export when the weights change (the stand-ins are rewritten in place).
    stamp = os.path.join(cache, "weights.mtime")
    weights = os.path.join(model_dir, "model.safetensors")
    mtime = str(os.path.getmtime(weights)) if os.path.exists(weights) else ""
    if not os.path.exists(fp32) or not os.path.exists(stamp) or open(stamp).read() != mtime:
        export(model_dir, fp32)
        open(stamp, "w").write(mtime)
        for stale in ("model.int8.onnx",):
            if os.path.exists(os.path.join(cache, stale)):
                os.remove(os.path.join(cache, stale))

    mode, normalize, max_len = folder_config(model_dir)
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    tok.enable_truncation(max_len)
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    short = [line.strip() for line in open(a.sentences, encoding="utf-8") if line.strip() and len(line.strip()) < 200]
    corpus = [short[i % len(short)] for i in range(512)]

    enc = Encoder(fp32, tok, mode, normalize, a.threads)
    tput, p50, p99 = measure(enc, corpus, short)
    print(f"onnxruntime {ort.__version__} fp32 ORT_ENABLE_ALL opset 17 threads={a.threads} pooling={mode} normalize={normalize}")
    print(f"batch32_throughput_sent_per_s={tput:.1f} single_p50_ms={p50:.2f} single_p99_ms={p99:.2f}")

    if a.int8:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        int8 = os.path.join(cache, "model.int8.onnx")
        if not os.path.exists(int8):
            quantize_dynamic(fp32, int8, weight_type=QuantType.QInt8, per_channel=True)
        q = Encoder(int8, tok, mode, normalize, a.threads)
        ref, got = enc.encode(short), q.encode(short)
        cos = (ref * got).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
        tput, p50, p99 = measure(q, corpus, short)
        print(f"int8_batch32_throughput_sent_per_s={tput:.1f} int8_single_p50_ms={p50:.2f} int8_single_p99_ms={p99:.2f} "
              f"int8_min_cosine={cos.min():.5f}")


if __name__ == "__main__":
    main()
