#!/usr/bin/python3
"""What quantized experts cost and buy: writes docs/results/quantize.md.

1. Trained models (the default small MoE after `moe train`, and the test fixture trained_tiny):
   validation loss and perplexity on the default corpus with float32, bf16 and int8 experts
   (`moe quantize`, `moe eval`), and how many of 64 sampled tokens stay the same.
2. transformers' tiny checkpoints of every architecture: the logits' relative error against
   transformers' own, as tests/test_quantize.cpp measures it (its printout, parsed).
3. The 6.64 GB-expert random model of bench/offload_table.py, quantized, generated from through
   a 512 MB expert cache read from the disk: tokens/s, hits, bytes read, peak resident memory.

    /usr/bin/python3 bench/quantize_table.py [--moe build/release/moe]
        [--tests build/release/tests/moe_tests] [--trained OUT_DIR_OF_MOE_TRAIN]
        [--offload-work /tmp/moe_offload] [--cache-mb 512]
"""
import argparse
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from offload_table import drop_from_page_cache, parse, run  # noqa: E402


def file_mb(d):
    if os.path.exists(os.path.join(d, "latest")):  # a training output folder
        with open(os.path.join(d, "latest")) as f:
            d = os.path.join(d, f.read().strip())
    return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d)
               if f.startswith("model") and f.endswith(".safetensors")) / 1e6


def quantize(moe, src, dst, fmt):
    if not os.path.exists(os.path.join(dst, "config.json")):
        print(f"moe quantize --to {fmt} {src} ...", file=sys.stderr)
        run([moe, "quantize", "-m", src, "-o", dst, "--to", fmt])
    return dst


def eval_loss(moe, d, threads):
    out, _ = run([moe, "eval", "-m", d, "-t", str(threads)])
    m = re.search(r"loss ([\d.]+)\s+perplexity ([\d.]+)", out)
    return float(m.group(1)), float(m.group(2))


def greedy_ids(moe, d, threads):
    out, _ = run([moe, "generate", "-m", d, "--prompt-ids", "84,104,101,32", "-n", "64",
                  "--temp", "0", "--ids", "-t", str(threads)])
    return out.strip()


def trained_rows(moe, name, src, work, threads):
    rows = []
    base_loss, base_ppl = eval_loss(moe, src, threads)
    base_ids = greedy_ids(moe, src, threads)
    for fmt in ("float32", "bf16", "int8"):
        d = src if fmt == "float32" else quantize(moe, src, os.path.join(work, f"{name}_{fmt}"), fmt)
        loss, ppl = (base_loss, base_ppl) if fmt == "float32" else eval_loss(moe, d, threads)
        ids = greedy_ids(moe, d, threads)
        a, b = base_ids.strip("[]").split(","), ids.strip("[]").split(",")
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) - 4
        rows.append(f"| {name} | {fmt} | {file_mb(d):.2f} | {loss:.5f} | {ppl:.4f} |"
                    f" {100 * (ppl / base_ppl - 1):+.3f}% | {same} of 64 |")
    return rows


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--moe", default=os.path.join(root, "build/release/moe"))
    p.add_argument("--tests", default=os.path.join(root, "build/release/tests/moe_tests"))
    p.add_argument("--trained", default="out/train", help="a `moe train` output folder")
    p.add_argument("--work", default="/tmp/moe_quantize")
    p.add_argument("--offload-work", default="/tmp/moe_offload",
                   help="bench/offload_table.py's folder (its model is made there if missing)")
    p.add_argument("--cache-mb", type=int, default=512)
    p.add_argument("-t", "--threads", type=int, default=2)
    p.add_argument("--out", default=os.path.join(root, "docs/results/quantize.md"))
    a = p.parse_args()
    os.makedirs(a.work, exist_ok=True)

    # 1. trained models
    trained = []
    if os.path.exists(a.trained):
        trained += trained_rows(a.moe, "small (moe train)", a.trained, a.work, a.threads)
    trained += trained_rows(a.moe, "trained_tiny", os.path.join(root, "tests/fixtures/trained_tiny"),
                            a.work, a.threads)

    # 2. transformers' logits, from the test's own measurement
    out, _ = run([a.tests, "--gtest_filter=Fixtures/QuantizedHf.*"])
    errors = {}
    for m in re.finditer(r"(\w+) (bf16|int8) experts: logits relative error against transformers"
                         r" ([\d.e+-]+) \(float32: ([\d.e+-]+)\)", out):
        errors.setdefault(m.group(1), {"float32": m.group(4)})[m.group(2)] = m.group(3)

    # 3. the large model through a cache
    model = os.path.join(a.offload_work, "model")
    if not os.path.exists(os.path.join(model, "model.safetensors")):
        run([sys.executable, os.path.join(here, "offload_table.py"), "--moe", a.moe, "--work",
             a.offload_work, "--cache-mb", str(a.cache_mb), "--out", "/dev/null"])
    offload = []
    prompt = ["--prompt-ids", "1,84,104,101,32,109,111,100,101,108", "-n", "64", "--temp", "1",
              "--seed", "1", "--ids", "-t", str(a.threads)]
    f32_ids = None
    for fmt in ("float32", "bf16", "int8"):
        d = model if fmt == "float32" else quantize(a.moe, model, os.path.join(a.work, f"big_{fmt}"),
                                                    fmt)
        print(f"{fmt}: every expert in memory, then a {a.cache_mb} MB cache ...", file=sys.stderr)
        gen = [a.moe, "generate", "-m", d] + prompt
        ids, _ = run(gen)
        f32_ids = f32_ids or ids
        weights = [os.path.join(d, f) for f in os.listdir(d) if f.endswith(".safetensors")]
        for w in weights:
            drop_from_page_cache(w)
        got, err = run(gen + ["--expert-cache-mb", str(a.cache_mb), "--cache-policy", "routing",
                              "--no-prefetch"])
        r = parse(err)
        slots = re.search(r"expert cache: (\d+) slots of ([\d.]+) MB", err)
        n = r["hits"] + r["misses"]
        a_ids, b_ids = f32_ids.strip().strip("[]").split(","), got.strip().strip("[]").split(",")
        same = next((i for i, (x, y) in enumerate(zip(a_ids, b_ids)) if x != y), len(a_ids)) - 10
        offload.append(
            f"| {fmt} | {file_mb(d) / 1e3:.2f} | {slots.group(1)} of {slots.group(2)} MB |"
            f" {'yes' if got == ids else 'NO'} | {same} of 64 | {r['tokens_per_s']:.2f} |"
            f" {100 * r['hits'] / n:.1f}% | {r['read_mb']:.0f} | {r['stall_s']:.2f} |"
            f" {r['peak_mb']:.0f} |")

    lines = [
        "# Quantized experts",
        "",
        "Written by `bench/quantize_table.py`. `moe quantize` stores the routed experts' weight"
        " matrices as bf16 (round to nearest even) or as int8 with one float32 scale per row"
        " (max |w| / 127, symmetric); every other tensor is kept as it was. The experts are read"
        " back to float32 and compute in float32.",
        "",
        "## Trained models: validation loss on the default corpus",
        "",
        "`moe eval` (256 windows of 128 bytes of the validation split). Same tokens: how many of 64"
        " greedy tokens after \"The \" match the float32 model's before the first difference.",
        "",
        "| model | experts | weight files (MB) | loss | perplexity | perplexity change |"
        " same tokens |",
        "|---|---|---|---|---|---|---|",
    ] + trained + [
        "",
        "## transformers' checkpoints: logits against transformers' own",
        "",
        "Relative error ||ours - theirs|| / ||theirs|| of the logits of the fixtures' reference"
        " input (tests/test_quantize.cpp, which bounds them: bf16 under 5e-3, int8 under 6e-2)."
        " These are random tiny models, so the errors show the formats' resolution and where a"
        " later layer's choice of experts flips.",
        "",
        "| architecture | float32 | bf16 experts | int8 experts |",
        "|---|---|---|---|",
    ] + [f"| {k} | {v['float32']} | {v.get('bf16', '-')} | {v.get('int8', '-')} |"
         for k, v in errors.items()] + [
        "",
        f"## A model larger than memory, quantized, through a {a.cache_mb} MB cache",
        "",
        "The random model of docs/results/offload.md (8 layers of 96 experts, 6.64 GB of float32"
        " experts), 64 tokens sampled after a 10-token prompt, routing policy, no read-ahead, the"
        " files' pages dropped from the page cache before each cache run. Same tokens: the cache"
        " run against the same format fully loaded (bit-identical logits, so the same tokens), and"
        " against the float32 model's tokens before the first difference. A random model's"
        " next-token distribution is nearly flat, so sampling from it follows any change in the"
        " logits at once; the trained models above show the change that matters.",
        "",
        "| experts | weight files (GB) | cache slots | same tokens as loaded | same as float32 |"
        " tokens/s | hit rate | read (MB) | stalled (s) | peak resident (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ] + offload + [""]
    with open(a.out, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
