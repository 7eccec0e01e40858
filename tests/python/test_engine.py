#!/usr/bin/python3
"""moe_cpp's engine from Python against what we did not write: transformers' checkpoints
(tests/fixtures/hf: logits within 1e-5 of transformers', every token's experts those of
transformers' router logits, greedy generation transformers' ids) and llama.cpp's GGUF file
(tests/fixtures/gguf: the tokenizer's ids, the logits no further from the float32 result than
llama.cpp's own run); the routing trace's shapes and loads; errors as moe_cpp.Error; training
through moe_cpp.train, and the checkpoint it writes loaded back.

    PYTHONPATH=build/release/python /usr/bin/python3 tests/python/test_engine.py WORKDIR
"""
import json
import os
import struct
import sys

import numpy as np

import moe_cpp
from checks import check, raises, status

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "..", "fixtures")


def read_safetensors(path):
    """Every tensor of a safetensors file as a numpy array (the format's header and bytes)."""
    kinds = {"F32": np.float32, "F64": np.float64, "I64": np.int64, "I32": np.int32}
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, t in header.items():
        if name == "__metadata__" or t["dtype"] not in kinds:
            continue
        a, b = t["data_offsets"]
        out[name] = np.frombuffer(data[a:b], dtype=kinds[t["dtype"]]).reshape(t["shape"])
    return out


def rel(a, b):
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64)))


def test_hf(arch):
    d = os.path.join(FIX, "hf", arch)
    m = moe_cpp.load(d)
    ref = read_safetensors(os.path.join(d, "reference.safetensors"))
    ids = ref["input_ids"]
    got = np.stack([m.logits(row) for row in ids])
    err = rel(got, ref["logits"])
    check(err < 1e-5, f"{arch}: logits within 1e-5 of transformers'", f"{err:.2g}")
    # every token's experts: the top-k of transformers' router logits, where they are apart
    top_k = m.config["moe"]["top_k"]
    routings = [m.routing(row) for row in ids]
    compared = differ = 0
    for layer in range(len(routings[0])):
        name = f"router_logits.{layer}"
        if name not in ref:
            continue
        r = ref[name].reshape(ids.shape[0], ids.shape[1], -1)
        for b, routing in enumerate(routings):
            experts = routing.experts_by_token()[layer]
            for t in range(ids.shape[1]):
                order = np.argsort(-r[b, t], kind="stable")
                s = np.sort(r[b, t])[::-1]
                if s[top_k - 1] - s[top_k] < 1e-4:
                    continue  # a near tie: float32 may choose either
                compared += 1
                differ += set(order[:top_k].tolist()) != set(experts[t].tolist())
    if any(k.startswith("router_logits.") for k in ref):
        check(compared > 0 and differ == 0,
              f"{arch}: every token's experts are the top-{top_k} of transformers' router logits",
              f"{compared} tokens x layers, {differ} differ")
    with open(os.path.join(d, "reference.json")) as f:
        r = json.load(f)
    prompt, want = r["greedy_prompt"], r["greedy_ids"]
    gen = [t.id for t in m.generate(prompt, max_tokens=len(want) - len(prompt), temperature=0,
                                    stop_at_eos=False)]
    check(prompt + gen == want, f"{arch}: greedy generation gives transformers' ids")


def test_gguf():
    name = "olmoe-Q4_K_M"
    m = moe_cpp.load(os.path.join(FIX, "gguf", name + ".gguf"))
    with open(os.path.join(FIX, "gguf", name + ".reference.json")) as f:
        r = json.load(f)
    ok = all(m.tokenizer.encode(c["text"]) == c["ids"] for c in r["tokenize"])
    check(ok, f"{name}: the tokenizer gives llama.cpp's ids for {len(r['tokenize'])} texts")
    ok = all(m.tokenizer.decode(c["ids"]) == c["text"] for c in r["tokenize"])
    check(ok, f"{name}: decoding gives the texts back")
    ref = read_safetensors(os.path.join(FIX, "gguf", name + ".reference.safetensors"))
    got = m.logits(ref["input_ids"])
    exact = ref["logits_dequantized_f32"]
    ours = np.median([rel(got[i], exact[i]) for i in range(len(got))])
    theirs = np.median([rel(ref["logits"][i], exact[i]) for i in range(len(got))])
    check(ours < 1.1 * theirs, f"{name}: logits no further from the float32 result than "
          "llama.cpp's own run (medians over positions)", f"{ours:.3g} against {theirs:.3g}")


def test_trace_and_errors(work):
    out = os.path.join(work, "py_train")
    latest = moe_cpp.train(preset="tiny", steps=4, batch=2, seq_len=32, eval_every=0, sample=0,
                           out=out, data=os.path.join(HERE, "..", "..", "README.md"))
    check(os.path.isfile(os.path.join(latest, "model.safetensors")),
          "moe_cpp.train writes a checkpoint", latest)
    m = moe_cpp.load(latest)
    text = "The router sends each token to a few experts."
    trace = m.routing(text)
    T, L = len(m.tokenizer.encode(text)), m.config["n_layers"]
    E, K = m.config["moe"]["n_experts"], m.config["moe"]["top_k"]
    ex, w = trace.experts_by_token(), trace.weights_by_token()
    check(ex.shape == (L, T, K) and w.shape == (L, T, K) and trace.load().shape == (L, E) and
          (trace.load().sum(axis=1) == T * K).all() and np.allclose(w.sum(axis=2), 1, atol=1e-5),
          "a routing trace: [layers, tokens, k] experts and weights (summing to 1), loads [layers, "
          "experts] summing to tokens x k", f"{ex.shape}")
    check((trace[0]["top_expert"] == ex[0][np.arange(T), np.argmax(w[0], axis=1)]).all(),
          "each token's top expert is its highest-weight one")
    toks = list(m.generate("The ", max_tokens=12, temperature=0.8, seed=3))
    again = list(m.generate("The ", max_tokens=12, temperature=0.8, seed=3))
    check(len(toks) == 12 and toks == again and
          "".join(t.text for t in toks) == m.tokenizer.decode([t.id for t in toks]),
          "generate: an iterator of tokens, the same for the same seed, whose texts join to the "
          "decoded text")

    raises(lambda: m.logits([m.vocab_size]), "outside the vocabulary", "a token past the vocabulary")
    raises(lambda: m.logits([1] * (m.max_seq_len + 1)), "exceed the model's",
           "more tokens than the model's positions")
    raises(lambda: moe_cpp.load(os.path.join(work, "nothing")), "is not a checkpoint",
           "a missing checkpoint, named")
    raises(lambda: moe_cpp.train(preset="nope", steps=1, out=os.path.join(work, "x")),
           "unknown preset 'nope'", "moe_cpp.train: an unknown preset, named")
    raises(lambda: moe_cpp.train(stepz=1), "stepz", "moe_cpp.train: an unknown option, named")


def main():
    work = sys.argv[1] if len(sys.argv) > 1 else "/tmp/moe_cpp_test_engine"
    os.makedirs(work, exist_ok=True)
    for arch in ("olmoe", "mixtral", "qwen3_moe", "deepseek_v3"):
        test_hf(arch)
    test_gguf()
    test_trace_and_errors(work)
    return status()


if __name__ == "__main__":
    sys.exit(main())
