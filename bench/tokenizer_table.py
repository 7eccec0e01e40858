#!/usr/bin/python3
"""Tokenizers' loading time and encoding speed on the default corpus (the fortunes): the four
real tokenizer.json files (fetched by tests/fetch_tokenizers.sh), the test fixtures' small
byte-level and Metaspace BPE files, and the fixtures' SentencePiece model through
libsentencepiece (the peer: Metaspace BPE of the same vocabulary size, encoded by the library
SentencePiece models ship with). Writes docs/results/tokenizers.md.

    /usr/bin/python3 bench/tokenizer_table.py [--moe build/release/moe]
        [--real build/release/real_tokenizers] [--reps 3]
"""
import argparse
import json
import os
import subprocess
import sys


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--moe", default=os.path.join(root, "build/release/moe"))
    p.add_argument("--real", default=os.path.join(root, "build/release/real_tokenizers"))
    p.add_argument("--reps", type=int, default=3, help="runs per tokenizer (the best is kept)")
    p.add_argument("--out", default=os.path.join(root, "docs/results/tokenizers.md"))
    a = p.parse_args()
    fixtures = os.path.join(root, "tests/fixtures/tokenizers")
    rows = [
        ("Qwen3", "tokenizer.json: byte-level BPE, NFC", os.path.join(a.real, "qwen3")),
        ("DeepSeek-V3", "tokenizer.json: byte-level BPE", os.path.join(a.real, "deepseek_v3")),
        ("Llama 2", "tokenizer.json: Metaspace BPE, byte fallback", os.path.join(a.real, "llama2")),
        ("gpt-oss", "tokenizer.json: byte-level BPE", os.path.join(a.real, "gptoss")),
        ("fixture", "tokenizer.json: byte-level BPE", os.path.join(fixtures, "bytelevel_bpe")),
        ("fixture", "tokenizer.json: Metaspace BPE", os.path.join(fixtures, "metaspace_bpe")),
        ("fixture", "tokenizer.model: libsentencepiece",
         os.path.join(fixtures, "sentencepiece_bpe/tokenizer.model")),
    ]
    for _, _, path in rows:
        if not os.path.exists(path):
            sys.exit(f"{path} is missing (bash tests/fetch_tokenizers.sh {a.real})")
    best = {}
    for rep in range(a.reps):
        print(f"run {rep + 1} of {a.reps} ...", file=sys.stderr)
        out = subprocess.run([a.moe, "bench", "tokenize", "--json", "-m"] + [r[2] for r in rows],
                             capture_output=True, text=True, check=True).stdout
        for r in json.loads(out):
            b = best.get(r["tokenizer"])
            if b is None or r["encode_s"] < b["encode_s"]:
                r["load_s"] = min(r["load_s"], b["load_s"]) if b else r["load_s"]
                best[r["tokenizer"]] = r
            else:
                b["load_s"] = min(b["load_s"], r["load_s"])
    first = best[rows[0][2]]
    lines = [
        "# Tokenizers: loading and encoding speed",
        "",
        f"Written by `bench/tokenizer_table.py`: `moe bench tokenize` on the default corpus (the"
        f" fortunes, {first['text_mb']:.2f} MB of text in five languages, encoded as one text),"
        f" best of {a.reps} runs. The file sizes are the tokenizer files'.",
        "",
        "| tokenizer | kind | file (MB) | vocabulary | load (s) | ids | bytes per id |"
        " encode (MB/s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, kind, path in rows:
        r = best[path]
        f = path if os.path.isfile(path) else os.path.join(path, "tokenizer.json")
        lines.append(
            f"| {name} | {kind} | {os.path.getsize(f) / 1e6:.1f} | {r['vocab_size']} |"
            f" {r['load_s']:.3f} | {r['ids']} | {r['bytes_per_id']:.2f} |"
            f" {r['encode_mb_per_s']:.2f} |")
    lines.append("")
    with open(a.out, "w") as fh:
        fh.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
