#!/usr/bin/python3
"""moe.cpp against llama.cpp on the same quantized GGUF file, and both against the bandwidth floor,
in one run: writes docs/results/gguf_inference.md.

The files: quantizations of the 6-layer Qwen3-30B-A3B-shaped model of bench/cpu_inference.py
(`llama-quantize qwen3moe6-bf16.gguf qwen3moe6-Q4_K_M.gguf Q4_K_M 2`, llama.cpp 0.5.0, built by
../shared/tools/llamacpp/build.sh), and the gpt-oss-20b-shaped MXFP4 file of
bench/make_gpt_oss_gguf.py (`--model` and `--describe` say which). Each round measures, one after
the other, 2 threads:

- decoding 64 tokens: `moe bench decode -m FILE -n 64` with int8 activations (the default, as
  llama.cpp's products) and with float32 ones, against `llama-bench -p 0 -n 64`; the floor is the
  bytes one token reads (from the file's tensor sizes) over the read bandwidth `moe bench decode`
  measures;
- a 512-token prompt in one pass: `moe bench prefill -m FILE -n 512` against `llama-bench -p 512`
  (reported as failed where llama-bench fails);
- peak resident memory (llama.cpp's through /usr/bin/time).

    /usr/bin/python3 bench/gguf_inference.py --gguf FILE --llama LLAMA_BUILD_BIN
        [--moe build/release/moe] [--rounds 2] [--out docs/results/gguf_inference.md]
        [--model "gpt-oss-20b-shaped, 24 layers" --describe "experts MXFP4, other matrices BF16"]
"""
import argparse
import json
import os
import re
import subprocess
import sys


def run(cmd):
    p = subprocess.run(cmd, capture_output=True, text=True)
    return p.returncode, p.stdout, p.stderr


def moe_json(moe, args):
    rc, out, err = run([moe] + args + ["--json"])
    if rc != 0:
        sys.exit(f"{' '.join(args)} failed:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def llama_bench(llama_bin, gguf, prompt, tokens):
    """tokens/s of one llama-bench test and its peak resident MB, or (None, error text)."""
    rc, out, err = run(["/usr/bin/time", "-v", os.path.join(llama_bin, "llama-bench"), "-m", gguf,
                        "-t", "2", "-p", str(prompt), "-n", str(tokens), "-r", "3", "-o", "json"])
    if rc != 0:
        sig = re.search(r"Command terminated by signal (\d+)", err)
        return None, f"failed (signal {sig.group(1)})" if sig else f"failed (exit {rc})"
    rss = float(re.search(r"Maximum resident set size \(kbytes\): (\d+)", err).group(1)) / 1024
    rows = json.loads(out)
    return rows[0]["avg_ts"], rss


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--llama", required=True, help="llama.cpp's build/bin")
    ap.add_argument("--moe", default="build/release/moe")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="docs/results/gguf_inference.md")
    ap.add_argument("--model", default="Qwen3-30B-A3B-shaped, 6 layers",
                    help="the model's shape, for the page")
    ap.add_argument("--describe", default="Q4_K with Q6_K for half of the expert down projections "
                    "and the output head", help="what the file's tensors are, for the page")
    a = ap.parse_args()

    rounds = []
    for r in range(a.rounds):
        got = {}
        got["int8"] = moe_json(a.moe, ["bench", "decode", "-m", a.gguf, "-n", "64", "-t", "2"])
        got["f32"] = moe_json(a.moe, ["bench", "decode", "-m", a.gguf, "-n", "64", "-t", "2",
                                      "--activations", "f32"])
        got["llama_decode"], got["llama_decode_rss"] = llama_bench(a.llama, a.gguf, 0, 64)
        got["prefill"] = moe_json(a.moe, ["bench", "prefill", "-m", a.gguf, "-n", "512", "-t", "2"])
        got["llama_prefill"], got["llama_prefill_rss"] = llama_bench(a.llama, a.gguf, 512, 0)
        rounds.append(got)
        print(f"round {r + 1}: moe {got['int8']['tokens_per_s']:.2f} (int8) "
              f"{got['f32']['tokens_per_s']:.2f} (f32), llama.cpp {got['llama_decode']} tokens/s; "
              f"prefill moe {got['prefill']['tokens_per_s']:.1f}, llama.cpp {got['llama_prefill']}",
              flush=True)

    last = rounds[-1]["int8"]
    cpu = "unknown CPU"
    with open("/proc/cpuinfo") as f:
        info = f.read()
    name = re.search(r"model name\s*:\s*(.*)", info)
    model = re.search(r"^model\s*:\s*(\d+)", info, re.M)
    if name:
        cpu = name.group(1).strip() + (f" (model {model.group(1)})" if model else "")
    lines = [
        f"# moe.cpp against llama.cpp on {os.path.basename(a.gguf)}",
        "",
        "Written by `bench/gguf_inference.py` (its docstring says how the file was made). The",
        f"file: {os.path.basename(a.gguf)}, {last['checkpoint_mb']:.0f} MB, {a.model}",
        f"({a.describe}).",
        f"{last['threads']} threads on {cpu}, kernel path {last['path']}; each round runs both engines one",
        "after the other (this machine's speed varies by up to 30% from minute to minute).",
        "",
        "| round | moe.cpp decode, int8 activations | moe.cpp, float32 activations | llama.cpp decode | "
        "moe.cpp / llama.cpp | floor | moe.cpp 512-token prefill | llama.cpp prefill |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, g in enumerate(rounds):
        ours, f32 = g["int8"]["tokens_per_s"], g["f32"]["tokens_per_s"]
        theirs = g["llama_decode"]
        ratio = f"{ours / theirs:.2f}x" if theirs else "-"
        lp = f"{g['llama_prefill']:.1f} tokens/s" if isinstance(g["llama_prefill"], float) else \
            g["llama_prefill_rss"]
        lines.append(
            f"| {i + 1} | {ours:.2f} tokens/s ({100 * g['int8']['of_floor']:.0f}% of the floor) | "
            f"{f32:.2f} tokens/s ({100 * g['f32']['of_floor']:.0f}%) | "
            f"{theirs:.2f} tokens/s ({100 * theirs / g['int8']['floor_tokens_per_s']:.0f}%) | "
            f"{ratio} | {g['int8']['floor_tokens_per_s']:.1f} tokens/s "
            f"({g['int8']['bytes_per_token_mb']:.0f} MB per token at "
            f"{g['int8']['read_bandwidth_gbs']:.1f} GB/s) | "
            f"{g['prefill']['tokens_per_s']:.1f} tokens/s | {lp} |")
    g = rounds[-1]
    lines += [
        "",
        f"Peak resident memory: moe.cpp {g['int8']['peak_rss_mb']:.0f} MB decoding "
        f"({g['int8']['rss_of_checkpoint']:.2f}x the file), {g['prefill']['peak_rss_mb']:.0f} MB "
        f"after the 512-token prompt; llama.cpp {g['llama_decode_rss']:.0f} MB decoding. "
        f"Load: {g['int8']['load_s']:.2f} s (the file mapped, its pages read in).",
        "",
    ]
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
