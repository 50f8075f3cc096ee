#!/usr/bin/env python3
"""Shape-faithful stand-ins for the card's models, whose weights no registry carries.

TinyLlama-1.1B-Chat and bge-small/base-en-v1.5 are written here with their real
vocabularies, shapes, metadata and file formats, and seeded random weights, so that the
code paths a user's real files take (SentencePiece tokenization, llama.cpp's mixed K-quant
files, sentence-transformers' folder formats) are exercised without the weights:

  standins.py tinyllama OUT_DIR --vocab VOCAB.gguf [--layers 22] [--types q4_k_m,q8_0] [--seed 1]
      TinyLlama-1.1B-Chat-v1.0's shape (2048 wide, 5632 FFN, 32 heads / 4 KV heads, context
      2048, 22 layers unless --layers says fewer), its Llama SentencePiece vocabulary (copied
      from VOCAB.gguf: llama.cpp's ggml-vocab-llama-spm.gguf, tests/fixtures/vocab/) and its
      Zephyr chat template. Types: f16, q8_0, q4_k_m, q5_k_m. For the K-quant mixes the tensor
      types follow llama.cpp's rules (llama-quant.cpp): Q4_K (Q5_K) everywhere, Q6_K for the
      output, and for attn_v and ffn_down on the layers `use_more_bits` picks. Q8_0 blocks are
      gguf-py's quantizer's; the K-quant blocks are written here in GGML's layouts and checked
      against gguf-py's own dequantizer before the file is written. Prints each file's path.

  standins.py bge OUT_DIR --tokenizer TOKENIZER.json [--shape small|base] [--layers 12]
                  [--pooling-format legacy|current] [--prompts] [--seed 1]
      A sentence-transformers folder shaped as BAAI/bge-small-en-v1.5 (384 wide, 12 heads,
      1536 FFN) or bge-base-en-v1.5 (768 wide, 12 heads, 3072 FFN): BERT, 512 positions, CLS
      pooling, a Normalize module, the BERT uncased WordPiece vocabulary (TOKENIZER.json: the
      default MiniLM model's, which is the same vocabulary, with bge's 512-token truncation).
      `--pooling-format legacy` writes the boolean `pooling_mode_cls_token` keys (as the
      published bge files do), `current` writes `"pooling_mode": "cls"` (as sentence-
      transformers 5+ saves). `--prompts` adds bge's query instruction as the named prompt
      `query` in config_sentence_transformers.json. The weights come from PCG64's raw stream
      (stable across NumPy versions), so the same arguments always write the same bytes.

Needs numpy and gguf (`pip install numpy gguf`).
"""
import argparse
import json
import os
import struct
import sys

import numpy as np

# ----------------------------------------------------------------------------------------
# Seeded weights: uniform in [-a, a] from PCG64's raw 64-bit outputs, which NumPy keeps
# stable across versions (its distributions are not guaranteed to be).


class Weights:
    def __init__(self, seed):
        self.bits = np.random.PCG64(seed)

    def uniform(self, shape, std):
        n = int(np.prod(shape))
        raw = self.bits.random_raw(n)
        u = (raw >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
        a = std * np.sqrt(3.0)
        return ((u * 2.0 - 1.0) * a).astype(np.float32).reshape(shape)

    def around_one(self, n, spread):
        return (1.0 + self.uniform((n,), spread)).astype(np.float32)


# ----------------------------------------------------------------------------------------
# GGML K-quant blocks (256 values per super-block), in the byte layouts of ggml-common.h.


def _safe(x):
    return np.where(x > 0, x, 1.0)


def _pack_k_scales(sc, m):
    """The 12 bytes of 6-bit scales and mins Q4_K and Q5_K share (get_scale_min_k4)."""
    out = np.zeros((sc.shape[0], 12), np.uint8)
    for k in range(4):
        out[:, k] = (sc[:, k] & 63) | ((sc[:, k + 4] >> 4) << 6)
        out[:, k + 4] = (m[:, k] & 63) | ((m[:, k + 4] >> 4) << 6)
        out[:, k + 8] = (sc[:, k + 4] & 0xF) | ((m[:, k + 4] & 0xF) << 4)
    return out


def _k_scales(x, levels):
    """Per sub-block of 32: value ≈ d·sc·q − dmin·m with q in 0..levels."""
    xb = x.reshape(-1, 8, 32)
    lo = np.minimum(xb.min(-1), 0.0)
    scale = (xb.max(-1) - lo) / levels
    mins = -lo
    d = (scale.max(-1) / 63).astype(np.float16)
    dmin = (mins.max(-1) / 63).astype(np.float16)
    df, dminf = d.astype(np.float32), dmin.astype(np.float32)
    sc = np.clip(np.round(scale / _safe(df)[:, None]), 0, 63).astype(np.uint8)
    m = np.clip(np.round(mins / _safe(dminf)[:, None]), 0, 63).astype(np.uint8)
    eff_d = df[:, None] * sc
    eff_m = dminf[:, None] * m
    q = np.clip(np.round((xb + eff_m[..., None]) / _safe(eff_d)[..., None]), 0, levels).astype(np.uint8)
    head = np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), _pack_k_scales(sc, m)], axis=1)
    return head, q


def q4_k(x):
    head, q = _k_scales(x, 15)
    qs = np.concatenate([q[:, 2 * c] | (q[:, 2 * c + 1] << 4) for c in range(4)], axis=1)
    return np.concatenate([head, qs], axis=1)  # 144 bytes


def q5_k(x):
    head, q = _k_scales(x, 31)
    qh = np.zeros((q.shape[0], 32), np.uint8)
    for j in range(8):
        qh |= ((q[:, j] >> 4) & 1) << j
    low = q & 0xF
    qs = np.concatenate([low[:, 2 * c] | (low[:, 2 * c + 1] << 4) for c in range(4)], axis=1)
    return np.concatenate([head, qh, qs], axis=1)  # 176 bytes


def q6_k(x):
    xb = x.reshape(-1, 16, 16)
    s = np.abs(xb).max(-1) / 31
    d = (s.max(-1) / 127).astype(np.float16)
    df = d.astype(np.float32)
    sc = np.clip(np.round(s / _safe(df)[:, None]), -128, 127).astype(np.int8)
    eff = df[:, None] * sc.astype(np.float32)
    q = (np.clip(np.round(xb / _safe(eff)[..., None]), -32, 31) + 32).astype(np.uint8).reshape(-1, 256)
    ql = np.zeros((q.shape[0], 128), np.uint8)
    qh = np.zeros((q.shape[0], 64), np.uint8)
    for n in range(2):
        part = [q[:, n * 128 + 32 * k : n * 128 + 32 * k + 32] for k in range(4)]
        ql[:, n * 64 : n * 64 + 32] = (part[0] & 0xF) | ((part[2] & 0xF) << 4)
        ql[:, n * 64 + 32 : n * 64 + 64] = (part[1] & 0xF) | ((part[3] & 0xF) << 4)
        qh[:, n * 32 : n * 32 + 32] = (part[0] >> 4) | ((part[1] >> 4) << 2) | ((part[2] >> 4) << 4) | ((part[3] >> 4) << 6)
    return np.concatenate([ql, qh, sc.view(np.uint8), d.view(np.uint8).reshape(-1, 2)], axis=1)  # 210 bytes


def quantize(values, kind):
    """`values` (rows × cols, f32) as GGML `kind` blocks: a (rows, bytes per row) uint8 array."""
    import gguf

    qtype = getattr(gguf.GGMLQuantizationType, kind)
    rows, cols = values.shape
    if kind in ("F32", "F16"):
        return values.astype(np.float32 if kind == "F32" else np.float16), qtype
    if kind == "Q8_0":
        return gguf.quants.quantize(values, qtype), qtype
    blocks = {"Q4_K": q4_k, "Q5_K": q5_k, "Q6_K": q6_k}[kind](values.reshape(-1, 256))
    data = blocks.reshape(rows, -1)
    # Our layouts against gguf-py's own dequantizer, on the first rows: a wrong bit
    # position would show as an error far beyond the format's step.
    sample = values[: min(rows, 4)]
    back = gguf.quants.dequantize(data[: sample.shape[0]], qtype)
    step = np.abs(sample).max() / {"Q4_K": 7, "Q5_K": 15, "Q6_K": 31}[kind]
    err = np.abs(back - sample).max()
    if not err <= step:
        sys.exit(f"{kind} blocks do not round-trip through gguf's dequantizer: error {err} > {step}")
    return data, qtype


# ----------------------------------------------------------------------------------------
# TinyLlama-1.1B-Chat-v1.0

TINYLLAMA = dict(hidden=2048, ffn=5632, heads=32, kv_heads=4, context=2048, layers=22, rms_eps=1e-5, rope_base=10000.0)
# TinyLlama-1.1B-Chat-v1.0's own chat template (its tokenizer_config.json), as its GGUF
# conversions carry it.
TINYLLAMA_TEMPLATE = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)
# llama.cpp's file types (llama_ftype) and each mix's default tensor type.
FILE_TYPES = {"f16": (1, "F16"), "q8_0": (7, "Q8_0"), "q4_k_m": (15, "Q4_K"), "q5_k_m": (17, "Q5_K")}


def use_more_bits(i, n):
    """llama.cpp's choice of layers that get more bits in the _M mixes."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensor_type(mix, name, layer, layers):
    default = FILE_TYPES[mix][1]
    if mix in ("q4_k_m", "q5_k_m"):
        if name == "output.weight":
            return "Q6_K"
        if name.endswith(("attn_v.weight", "ffn_down.weight")) and use_more_bits(layer, layers):
            return "Q6_K"
    return default


def read_vocab(path):
    import gguf

    r = gguf.GGUFReader(path)
    f = lambda k: r.fields[k].contents()  # noqa: E731
    if f("tokenizer.ggml.model") != "llama":
        sys.exit(f"{path}: not a Llama SentencePiece vocabulary")
    return f("tokenizer.ggml.tokens"), f("tokenizer.ggml.scores"), f("tokenizer.ggml.token_type")


def tinyllama(args):
    import gguf

    tokens, scores, types = read_vocab(args.vocab)
    c = dict(TINYLLAMA, layers=args.layers)
    h, ffn, hd = c["hidden"], c["ffn"], c["hidden"] // c["heads"]
    kv = c["kv_heads"] * hd
    # Every tensor in llama.cpp's order and GGUF naming, rows × cols as stored.
    shapes = [("token_embd.weight", (len(tokens), h), None)]
    for i in range(c["layers"]):
        p = f"blk.{i}."
        shapes += [
            (p + "attn_norm.weight", (h,), i),
            (p + "attn_q.weight", (h, h), i),
            (p + "attn_k.weight", (kv, h), i),
            (p + "attn_v.weight", (kv, h), i),
            (p + "attn_output.weight", (h, h), i),
            (p + "ffn_norm.weight", (h,), i),
            (p + "ffn_gate.weight", (ffn, h), i),
            (p + "ffn_up.weight", (ffn, h), i),
            (p + "ffn_down.weight", (h, ffn), i),
        ]
    shapes += [("output_norm.weight", (h,), None), ("output.weight", (len(tokens), h), None)]
    os.makedirs(args.out, exist_ok=True)
    for mix in args.types.split(","):
        if mix not in FILE_TYPES:
            sys.exit(f"unknown type {mix!r}: one of {', '.join(FILE_TYPES)}")
        w = Weights(args.seed)  # the same weights in every file
        path = os.path.join(args.out, f"tinyllama-1.1b-chat-standin-{c['layers']}l.{mix.upper()}.gguf")
        out = gguf.GGUFWriter(path, "llama")
        out.add_name("TinyLlama-1.1B-Chat-v1.0 shape-faithful stand-in (random weights)")
        out.add_context_length(c["context"])
        out.add_embedding_length(h)
        out.add_block_count(c["layers"])
        out.add_feed_forward_length(ffn)
        out.add_rope_dimension_count(hd)
        out.add_head_count(c["heads"])
        out.add_head_count_kv(c["kv_heads"])
        out.add_layer_norm_rms_eps(c["rms_eps"])
        out.add_rope_freq_base(c["rope_base"])
        out.add_vocab_size(len(tokens))
        out.add_file_type(FILE_TYPES[mix][0])
        out.add_quantization_version(2)
        out.add_tokenizer_model("llama")
        out.add_tokenizer_pre("default")
        out.add_token_list(tokens)
        out.add_token_scores(scores)
        out.add_token_types(types)
        out.add_bos_token_id(1)
        out.add_eos_token_id(2)
        out.add_unk_token_id(0)
        out.add_pad_token_id(2)
        out.add_add_bos_token(True)
        out.add_add_eos_token(False)
        out.add_chat_template(TINYLLAMA_TEMPLATE)
        for name, shape, layer in shapes:
            if len(shape) == 1:
                out.add_tensor(name, w.around_one(shape[0], 0.1))
                continue
            values = w.uniform(shape, 0.02)
            kind = tensor_type(mix, name, layer if layer is not None else 0, c["layers"])
            data, qtype = quantize(values, kind)
            out.add_tensor(name, data, raw_dtype=qtype)
        out.write_header_to_file()
        out.write_kv_data_to_file()
        out.write_tensors_to_file()
        out.close()
        print(path)


# ----------------------------------------------------------------------------------------
# bge-small / bge-base

BGE = {"small": dict(hidden=384, heads=12, ffn=1536), "base": dict(hidden=768, heads=12, ffn=3072)}
BGE_QUERY = "Represent this sentence for searching relevant passages: "


def write_safetensors(path, tensors):
    header, offset, blobs = {}, 0, []
    for name in sorted(tensors):
        b = np.ascontiguousarray(tensors[name], dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensors[name].shape), "data_offsets": [offset, offset + len(b)]}
        offset += len(b)
        blobs.append(b)
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)


def write_json(path, value):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(value, f, indent=2)
        f.write("\n")


def bge(args):
    s = BGE[args.shape]
    h, ffn, vocab, positions = s["hidden"], s["ffn"], 30522, 512
    w = Weights(args.seed)
    t = {}
    # A fixed order (sorted names) so the weights never depend on dict order.
    names = ["embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight", "embeddings.token_type_embeddings.weight",
             "embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias"]
    shapes = {"embeddings.word_embeddings.weight": (vocab, h), "embeddings.position_embeddings.weight": (positions, h),
              "embeddings.token_type_embeddings.weight": (2, h), "embeddings.LayerNorm.weight": (h,), "embeddings.LayerNorm.bias": (h,)}
    for i in range(args.layers):
        p = f"encoder.layer.{i}."
        for n, shape in [("attention.self.query", (h, h)), ("attention.self.key", (h, h)), ("attention.self.value", (h, h)),
                         ("attention.output.dense", (h, h)), ("intermediate.dense", (ffn, h)), ("output.dense", (h, ffn))]:
            shapes[p + n + ".weight"], shapes[p + n + ".bias"] = shape, (shape[0],)
        for n in ["attention.output.LayerNorm", "output.LayerNorm"]:
            shapes[p + n + ".weight"], shapes[p + n + ".bias"] = (h,), (h,)
    shapes["pooler.dense.weight"], shapes["pooler.dense.bias"] = (h, h), (h,)
    names += sorted(n for n in shapes if n not in names)
    for n in names:
        if n.endswith("LayerNorm.weight"):
            t[n] = w.around_one(shapes[n][0], 0.1)
        elif n.endswith(".bias"):
            t[n] = w.uniform(shapes[n], 0.02)
        else:
            t[n] = w.uniform(shapes[n], 0.05)
    out = args.out
    os.makedirs(out, exist_ok=True)
    write_safetensors(os.path.join(out, "model.safetensors"), t)
    write_json(os.path.join(out, "config.json"), {
        "_name_or_path": f"BAAI/bge-{args.shape}-en-v1.5 (shape-faithful stand-in, random weights)",
        "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "classifier_dropout": None,
        "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "hidden_size": h, "initializer_range": 0.02,
        "intermediate_size": ffn, "layer_norm_eps": 1e-12, "max_position_embeddings": positions, "model_type": "bert",
        "num_attention_heads": s["heads"], "num_hidden_layers": args.layers, "pad_token_id": 0,
        "position_embedding_type": "absolute", "type_vocab_size": 2, "use_cache": True, "vocab_size": vocab,
    })
    with open(args.tokenizer) as f:
        tok = json.load(f)
    tok["truncation"] = {"direction": "Right", "max_length": positions, "strategy": "LongestFirst", "stride": 0}
    tok["padding"] = None
    if len(tok["model"]["vocab"]) != vocab:
        sys.exit(f"{args.tokenizer}: expected BERT's uncased vocabulary of {vocab} tokens")
    write_json(os.path.join(out, "tokenizer.json"), tok)
    write_json(os.path.join(out, "tokenizer_config.json"), {
        "clean_up_tokenization_spaces": True, "cls_token": "[CLS]", "do_basic_tokenize": True, "do_lower_case": True,
        "mask_token": "[MASK]", "model_max_length": positions, "pad_token": "[PAD]", "sep_token": "[SEP]",
        "strip_accents": None, "tokenize_chinese_chars": True, "tokenizer_class": "BertTokenizer", "unk_token": "[UNK]",
    })
    write_json(os.path.join(out, "special_tokens_map.json"), {
        "cls_token": "[CLS]", "mask_token": "[MASK]", "pad_token": "[PAD]", "sep_token": "[SEP]", "unk_token": "[UNK]"})
    write_json(os.path.join(out, "sentence_bert_config.json"), {"max_seq_length": positions, "do_lower_case": True})
    write_json(os.path.join(out, "modules.json"), [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ])
    if args.pooling_format == "legacy":
        pooling = {"word_embedding_dimension": h, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False,
                   "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}
    else:
        pooling = {"embedding_dimension": h, "pooling_mode": "cls", "include_prompt": True}
    write_json(os.path.join(out, "1_Pooling/config.json"), pooling)
    os.makedirs(os.path.join(out, "2_Normalize"), exist_ok=True)
    st = {"__version__": {"sentence_transformers": "2.2.2"}, "prompts": {}, "default_prompt_name": None}
    if args.prompts:
        st["prompts"] = {"query": BGE_QUERY, "document": ""}
    write_json(os.path.join(out, "config_sentence_transformers.json"), st)
    print(out)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="model", required=True)
    t = sub.add_parser("tinyllama")
    t.add_argument("out")
    t.add_argument("--vocab", required=True)
    t.add_argument("--layers", type=int, default=TINYLLAMA["layers"])
    t.add_argument("--types", default="q4_k_m,q8_0")
    t.add_argument("--seed", type=int, default=1)
    b = sub.add_parser("bge")
    b.add_argument("out")
    b.add_argument("--tokenizer", required=True)
    b.add_argument("--shape", choices=sorted(BGE), default="small")
    b.add_argument("--layers", type=int, default=12)
    b.add_argument("--pooling-format", choices=["legacy", "current"], default="legacy")
    b.add_argument("--prompts", action="store_true")
    b.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    {"tinyllama": tinyllama, "bge": bge}[args.model](args)


if __name__ == "__main__":
    main()
