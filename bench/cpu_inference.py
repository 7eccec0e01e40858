#!/usr/bin/python3
"""moe.cpp against llama.cpp on the same weights, and both against the machine's limits, in one
run: writes docs/results/cpu_inference.md.

The model is ../shared/tools/llamacpp/make_qwen3moe.py's Qwen3-30B-A3B-shaped checkpoint cut to 6
layers (8.7 GB of bf16 safetensors) and its GGUF made by llama.cpp's own converter
(../shared/tools/gguf/convert_gguf.py --outtype bf16); llama.cpp 0.5.0 built by
../shared/tools/llamacpp/build.sh. Measured on the same machine, one after the other, 2 threads:

- the machine: read bandwidth (llama.cpp's tools/readbw and `moe bench decode`'s own), FMA peak
  and GEMM figures (`moe bench gemm --json`);
- decoding 64 tokens: `moe bench decode -m DIR -n 64` against `llama-bench -n 64`, both against
  the bandwidth floor (the bytes one token reads over the read bandwidth);
- a 512-token prompt in one pass: `moe bench prefill -m DIR -n 512` against `llama-bench -p 512`;
- loading time and peak resident memory (llama.cpp's through /usr/bin/time).

    /usr/bin/python3 bench/cpu_inference.py --hf DIR --gguf FILE --llama LLAMA_BUILD_BIN
        [--moe build/release/moe] [--rounds 2] [--out docs/results/cpu_inference.md]
"""
import argparse
import json
import os
import re
import subprocess
import sys


def run(cmd, env=None):
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    return p.stdout, p.stderr


def timed(cmd, env=None):
    """Runs cmd under /usr/bin/time -v: (stdout, peak resident MB, wall seconds)."""
    out, err = run(["/usr/bin/time", "-v"] + cmd, env)
    rss = float(re.search(r"Maximum resident set size \(kbytes\): (\d+)", err).group(1)) / 1024
    return out, rss


def readbw(llama_bin):
    env = dict(os.environ, OMP_NUM_THREADS="2")
    out, _ = run([os.path.join(llama_bin, "readbw"), "2048", "10"], env)
    return float(re.search(r"([\d.]+) GB/s", out).group(1))


def llama_bench(llama_bin, gguf):
    out, rss = timed([os.path.join(llama_bin, "llama-bench"), "-m", gguf, "-t", "2", "-p", "512",
                      "-n", "64", "-r", "3", "-o", "json"])
    rows = json.loads(out)
    got = {"peak_rss_mb": rss}
    for r in rows:
        key = "prefill" if r["n_prompt"] > 0 else "decode"
        got[key] = r["avg_ts"]
    return got


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hf", required=True)
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--llama", required=True, help="llama.cpp's build/bin")
    ap.add_argument("--moe", default="build/release/moe")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="docs/results/cpu_inference.md")
    a = ap.parse_args()

    gemm = json.loads(run([a.moe, "bench", "gemm", "--json"])[0])
    rounds = []
    for i in range(a.rounds):
        print(f"round {i + 1} of {a.rounds}", file=sys.stderr)
        bw = readbw(a.llama)
        dec = json.loads(run([a.moe, "bench", "decode", "-m", a.hf, "-n", "64", "--json"])[0])
        pre = json.loads(run([a.moe, "bench", "prefill", "-m", a.hf, "-n", "512", "--json"])[0])
        ll = llama_bench(a.llama, a.gguf)
        rounds.append(dict(readbw=bw, dec=dec, pre=pre, llama=ll))

    mb_per_token = rounds[0]["dec"]["bytes_per_token_mb"]
    lines = ["# CPU inference: moe.cpp and llama.cpp on the same bf16 weights", "",
             "Written by `bench/cpu_inference.py` (its docstring says how the model, the GGUF file and",
             "llama.cpp are made). Qwen3-30B-A3B's shape cut to 6 layers: 4.36B parameters, "
             f"{rounds[0]['dec']['checkpoint_mb'] / 1e3:.2f} GB of bf16 safetensors; "
             f"one decoded token reads {mb_per_token:.0f} MB of weights.",
             "",
             f"Machine: {gemm['cpu']}, {gemm['threads']} threads, kernel path `{gemm['path']}`; "
             f"FMA peak {gemm['fma_peak_gflops']:.0f} GFLOP/s; float32 GEMM: {gemm['f32_backend']}.",
             "Each round runs every measurement once, one after the other; the floor uses the read "
             "bandwidth measured in the same round.",
             "",
             "| round | read GB/s (readbw / moe) | floor tokens/s | moe decode | llama.cpp decode | "
             "moe / llama.cpp | moe of floor | llama.cpp of floor | moe prefill 512 | llama.cpp prefill 512 | "
             "moe / llama.cpp |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rounds):
        floor = r["readbw"] * 1e3 / mb_per_token
        d, p, ll = r["dec"], r["pre"], r["llama"]
        lines.append(
            f"| {i + 1} | {r['readbw']:.1f} / {d['read_bandwidth_gbs']:.1f} | {floor:.2f} | "
            f"{d['tokens_per_s']:.2f} | {ll['decode']:.2f} | {d['tokens_per_s'] / ll['decode']:.2f} | "
            f"{d['tokens_per_s'] / floor:.0%} | {ll['decode'] / floor:.0%} | {p['tokens_per_s']:.1f} | "
            f"{ll['prefill']:.1f} | {p['tokens_per_s'] / ll['prefill']:.2f} |")
    last = rounds[-1]
    lines += ["",
              "| | moe.cpp | llama.cpp |", "|---|---|---|",
              f"| load | {last['dec']['load_s']:.2f} s (files mapped) | (inside llama-bench) |",
              f"| peak resident, decode run | {last['dec']['peak_rss_mb']:.0f} MB "
              f"({last['dec']['rss_of_checkpoint']:.2f}x the checkpoint) | |",
              f"| peak resident, prefill run | {last['pre']['peak_rss_mb']:.0f} MB "
              f"({last['pre']['rss_of_checkpoint']:.2f}x the checkpoint) | |",
              f"| peak resident, llama-bench (both tests) | | {last['llama']['peak_rss_mb']:.0f} MB |",
              "",
              "The floor is the bytes one token reads (attention, router, norms, one embedding row, "
              "the output head, and the 8 routed experts of each layer) over the read bandwidth "
              "(llama.cpp's readbw, 2 threads, 2 GB). Loading maps every weight's pages into the "
              "process (the checkpoint fits in the available memory), so resident memory is about "
              "the checkpoint's weight bytes from the start and no token stops at a page fault.",
              "",
              "GEMM on this machine (`moe bench gemm`, GFLOP/s):", "",
              "| dtype | shape | engine | library | of library | of FMA peak |", "|---|---|---|---|---|---|"]
    for s in gemm["shapes"]:
        lines.append(f"| {s['dtype']} | {s['shape']} ({s['m']} x {s['n']} x {s['k']}) | {s['gflops']:.1f} | "
                     f"{s['library_gflops']:.1f} | {s['of_library']:.0%} | {s['of_peak']:.0%} |")
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
