#!/usr/bin/python3
"""A random GGUF model of gpt-oss-20b's shape, stored as llama.cpp's converter stores the real one
(experts MXFP4, the other matrices BF16, norms, biases, sinks and the router F32), for measuring
decoding and prefill on a file of the real size (about 13.7 GB at 24 layers) without the checkpoint.

    /usr/bin/python3 bench/make_gpt_oss_gguf.py OUT.gguf [--layers 24] [--seed 0]

Shape (openai/gpt-oss-20b's config.json): 24 layers, hidden 2880, 64 query heads and 8 key-value
heads of 64, 32 experts of width 2880, 4 per token, vocabulary 201088, sliding window 128 on every
other layer, rope theta 150000 with YaRN (factor 32 over 4096 positions), clamped SwiGLU.

Values: BF16 matrices N(0, 0.02); MXFP4 blocks with uniformly random codes and scales 2^-9..2^-6
(values up to about 0.09); biases N(0, 0.02), sinks N(0, 1), router N(0, 0.02), norms 1. The
tokenizer is the gpt_oss fixture's (tests/fixtures/gguf/gpt_oss-MXFP4.gguf: byte-level BPE, 3000
tokens with their merges), its vocabulary padded with control tokens to 201088 so that the
embedding and the output head have the real size. Speed and memory do not depend on the values.

The file is GGUF version 3 (ggml's docs/gguf.md), written streaming to OUT.tmp and renamed when
complete.
"""
import argparse
import os
import struct
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from gguf_repeat_layers import ARRAY, FIXED, STRING, Reader  # noqa: E402

FIXTURE = os.path.join(HERE, "..", "tests", "fixtures", "gguf", "gpt_oss-MXFP4.gguf")
F32, BF16, MXFP4 = 0, 30, 39  # ggml_type
U32, I32, F32V, BOOL = 4, 5, 6, 7  # GGUF metadata value types
ALIGN = 32


def s(x):
    b = x.encode()
    return struct.pack("<Q", len(b)) + b


def fixture_tokenizer():
    """The fixture's tokenizer.* key-value pairs as (key, type, raw bytes), tokens and types parsed."""
    out = {}
    with open(FIXTURE, "rb") as f:
        r = Reader(f)
        if r.read(4) != b"GGUF":
            sys.exit(f"{FIXTURE} is not a GGUF file")
        r.unpack("I")
        _, n_kv = r.unpack("Q"), r.unpack("Q")
        for _ in range(n_kv):
            key = r.string().decode()
            t = r.unpack("I")
            if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type"):
                et, n = r.unpack("I"), r.unpack("Q")
                if et == STRING:
                    out[key] = [r.string().decode() for _ in range(n)]
                else:
                    out[key] = [r.unpack(FIXED[et]) for _ in range(n)]
                continue
            raw = r.value_bytes(t)
            if key.startswith("tokenizer."):
                out[key] = (t, raw)
    return out


def metadata(layers, vocab):
    a = "gpt-oss"
    kv = [("general.architecture", STRING, s(a)),
          ("general.type", STRING, s("model")),
          ("general.name", STRING, s("random gpt-oss-20b-shaped")),
          ("general.file_type", U32, struct.pack("<I", 38)),  # LLAMA_FTYPE_MOSTLY_MXFP4_MOE
          ("general.quantization_version", U32, struct.pack("<I", 2))]
    u32 = {"block_count": layers, "context_length": 131072, "embedding_length": 2880,
           "feed_forward_length": 2880, "expert_feed_forward_length": 2880,
           "attention.head_count": 64, "attention.head_count_kv": 8, "attention.key_length": 64,
           "attention.value_length": 64, "attention.sliding_window": 128, "expert_count": 32,
           "expert_used_count": 4, "rope.scaling.original_context_length": 4096}
    f32 = {"rope.freq_base": 150000.0, "attention.layer_norm_rms_epsilon": 1e-5,
           "rope.scaling.factor": 32.0}
    kv += [(f"{a}.{k}", U32, struct.pack("<I", v)) for k, v in u32.items()]
    kv += [(f"{a}.{k}", F32V, struct.pack("<f", v)) for k, v in f32.items()]
    kv.append((f"{a}.rope.scaling.type", STRING, s("yarn")))
    tok = fixture_tokenizer()
    tokens, types = tok.pop("tokenizer.ggml.tokens"), tok.pop("tokenizer.ggml.token_type")
    pad = vocab - len(tokens)
    if pad < 0:
        sys.exit(f"the fixture's vocabulary ({len(tokens)}) is larger than {vocab}")
    tokens += [f"<|reserved_{i}|>" for i in range(pad)]
    types += [3] * pad  # CONTROL
    kv.append(("tokenizer.ggml.tokens", ARRAY,
                struct.pack("<IQ", STRING, vocab) + b"".join(s(t) for t in tokens)))
    kv.append(("tokenizer.ggml.token_type", ARRAY,
               struct.pack("<IQ", I32, vocab) + np.asarray(types, "<i4").tobytes()))
    for k, (t, raw) in tok.items():
        kv.append((k, t, raw))
    return kv


def tensors(layers, vocab):
    """(name, ne, type, kind) in the order written; ne is ggml's (innermost first)."""
    D, F, E, H, KV, HD = 2880, 2880, 32, 64, 8, 64
    out = [("token_embd.weight", [D, vocab], BF16, "w"), ("output_norm.weight", [D], F32, "one"),
           ("output.weight", [D, vocab], BF16, "w")]
    for i in range(layers):
        b = f"blk.{i}."
        out += [(b + "attn_norm.weight", [D], F32, "one"),
                (b + "attn_q.weight", [D, H * HD], BF16, "w"), (b + "attn_q.bias", [H * HD], F32, "b"),
                (b + "attn_k.weight", [D, KV * HD], BF16, "w"), (b + "attn_k.bias", [KV * HD], F32, "b"),
                (b + "attn_v.weight", [D, KV * HD], BF16, "w"), (b + "attn_v.bias", [KV * HD], F32, "b"),
                (b + "attn_output.weight", [H * HD, D], BF16, "w"),
                (b + "attn_output.bias", [D], F32, "b"), (b + "attn_sinks.weight", [H], F32, "sink"),
                (b + "post_attention_norm.weight", [D], F32, "one"),
                (b + "ffn_gate_inp.weight", [D, E], F32, "b"), (b + "ffn_gate_inp.bias", [E], F32, "b"),
                (b + "ffn_gate_exps.weight", [D, F, E], MXFP4, "q"),
                (b + "ffn_gate_exps.bias", [F, E], F32, "b"),
                (b + "ffn_up_exps.weight", [D, F, E], MXFP4, "q"), (b + "ffn_up_exps.bias", [F, E], F32, "b"),
                (b + "ffn_down_exps.weight", [F, D, E], MXFP4, "q"),
                (b + "ffn_down_exps.bias", [D, E], F32, "b")]
    return out


def nbytes(ne, t):
    n = int(np.prod(ne))
    return n * 4 if t == F32 else n * 2 if t == BF16 else n // 32 * 17


def chunks(ne, t, kind, rng, bf16_table):
    """The tensor's bytes, in pieces of at most about 64 MB."""
    n = int(np.prod(ne))
    if t == MXFP4:
        blocks = n // 32
        step = (64 << 20) // 17
        for b0 in range(0, blocks, step):
            m = min(step, blocks - b0)
            blk = np.empty((m, 17), np.uint8)
            blk[:, 0] = rng.integers(118, 122, m, dtype=np.uint8)  # 2^(e - 127): 2^-9 .. 2^-6
            blk[:, 1:] = np.frombuffer(rng.bytes(16 * m), np.uint8).reshape(m, 16)
            yield blk.tobytes()
        return
    step = 16 << 20
    for i0 in range(0, n, step):
        m = min(step, n - i0)
        if t == BF16:
            yield bf16_table[rng.integers(0, bf16_table.size, m)].tobytes()
        elif kind == "one":
            yield np.ones(m, "<f4").tobytes()
        else:
            sd = 1.0 if kind == "sink" else 0.02
            yield (rng.standard_normal(m, np.float32) * sd).astype("<f4").tobytes()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=24, help="blocks (gpt-oss-20b has 24)")
    ap.add_argument("--vocab", type=int, default=201088, help="vocabulary size (201088)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if a.layers < 1:
        sys.exit("--layers must be at least 1")
    rng = np.random.default_rng(a.seed)
    # N(0, 0.02) rounded to bf16 (to nearest, ties to even), drawn from a table of 2^20 values.
    f = (rng.standard_normal(1 << 20, np.float32) * 0.02).view(np.uint32)
    bf16_table = ((f + 0x7FFF + ((f >> 16) & 1)) >> 16).astype("<u2")
    kv = metadata(a.layers, a.vocab)
    ts = tensors(a.layers, a.vocab)
    total = sum(nbytes(ne, t) for _, ne, t, _ in ts)
    tmp = a.out + ".tmp"
    t0 = time.time()
    with open(tmp, "wb") as o:
        o.write(b"GGUF" + struct.pack("<IQQ", 3, len(ts), len(kv)))
        for key, t, raw in kv:
            o.write(s(key) + struct.pack("<I", t) + raw)
        offset = 0
        for name, ne, t, _ in ts:
            o.write(s(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", d) for d in ne))
            o.write(struct.pack("<IQ", t, offset))
            offset = (offset + nbytes(ne, t) + ALIGN - 1) // ALIGN * ALIGN
        o.write(b"\0" * (-o.tell() % ALIGN))
        done = 0
        for i, (name, ne, t, kind) in enumerate(ts):
            for c in chunks(ne, t, kind, rng, bf16_table):
                o.write(c)
            done += nbytes(ne, t)
            o.write(b"\0" * (-o.tell() % ALIGN))
            if i % 20 == 0 or i == len(ts) - 1:
                print(f"\r{done / 1e9:6.2f} / {total / 1e9:.2f} GB, {time.time() - t0:.0f} s",
                      end="", file=sys.stderr, flush=True)
    os.replace(tmp, a.out)
    print(f"\nwrote {a.out}: {len(ts)} tensors, {total / 1e9:.2f} GB of weights", file=sys.stderr)


if __name__ == "__main__":
    main()
