#!/usr/bin/python3
"""Runs the speed benchmarks with their PyTorch peers on one machine, same thread count, and
writes the tables to docs/results/speed.md:
- `moe bench layer` (two shapes) against the dense FFN of the same active FLOPs, the machine's
  large-GEMM throughput, and transformers' Mixtral block in PyTorch (bench/torch_layer.py);
- `moe bench train` (the main job's model) against the same model in PyTorch
  (bench/torch_train.py);
- `moe bench decode` (batch 1, experts of 1.6 GB) against the memory-bandwidth floor.

    /usr/bin/python3 bench/speed_table.py [--moe build/release/moe] [-t 2] [--reps 7]
"""
import argparse
import json
import os
import platform
import subprocess
import sys

SHAPES = [  # (tokens, dim, ffn, experts, top_k)
    (2048, 512, 1408, 8, 2),
    (2048, 512, 352, 64, 8),
]


def run_json(cmd):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--moe", default=os.path.join(root, "build/release/moe"))
    p.add_argument("-t", "--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--out", default=os.path.join(root, "docs/results/speed.md"))
    a = p.parse_args()
    rows = []
    for n, d, f, e, k in SHAPES:
        print(f"N={n} D={d} F={f} E={e} k={k} ...", file=sys.stderr)
        ours = run_json([a.moe, "bench", "layer", "--tokens", str(n), "--dim", str(d), "--ffn", str(f),
                         "--experts", str(e), "--top-k", str(k), "-t", str(a.threads),
                         "--reps", str(a.reps), "--json"])
        torch = run_json([sys.executable, os.path.join(here, "torch_layer.py"), "--tokens", str(n),
                          "--dim", str(d), "--ffn", str(f), "--experts", str(e), "--top-k", str(k),
                          "-t", str(a.threads), "--reps", str(max(3, a.reps // 2))])
        rows.append((n, d, f, e, k, ours, torch))
    print("training step ...", file=sys.stderr)
    train = run_json([a.moe, "bench", "train", "-t", str(a.threads), "--json"])
    torch_train = run_json([sys.executable, os.path.join(here, "torch_train.py"), "-t",
                            str(a.threads)])
    print("decoding ...", file=sys.stderr)
    decode = run_json([a.moe, "bench", "decode", "-t", str(a.threads), "--json"])
    lines = [
        "# Speed",
        "",
        f"Written by `bench/speed_table.py` on {cpu_name()}, {a.threads} threads.",
        "",
        "## The MoE layer against its limit and its peer",
        "",
        "Times are medians"
        " (ms) after warm-up; the dense FFN is a SwiGLU FFN with the same active FLOPs on the same"
        " engine (the limit); PyTorch runs transformers' Mixtral block (a loop over the experts).",
        "",
        "| N | D | F | E | k | MoE fwd | MoE fwd+bwd | dense fwd | dense fwd+bwd | MoE/dense fwd+bwd"
        " | PyTorch fwd | PyTorch fwd+bwd | PyTorch/MoE fwd+bwd | dense GFLOP/s | GEMM peak GFLOP/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, d, f, e, k, o, t in rows:
        lines.append(
            f"| {n} | {d} | {f} | {e} | {k} | {o['moe_fwd_ms']:.1f} | {o['moe_fwdbwd_ms']:.1f} |"
            f" {o['dense_fwd_ms']:.1f} | {o['dense_fwdbwd_ms']:.1f} | {o['fwdbwd_ratio']:.3f} |"
            f" {t['torch_fwd_ms']:.1f} | {t['torch_fwdbwd_ms']:.1f} |"
            f" {t['torch_fwdbwd_ms'] / o['moe_fwdbwd_ms']:.2f} | {o['dense_fwdbwd_gflops']:.0f} |"
            f" {o['gemm_peak_gflops']:.0f} |")
    lines += [
        "",
        "## A training step of the main job's model",
        "",
        f"Preset `{train['preset']}` ({train['total_params'] / 1e6:.2f}M parameters,"
        f" {train['active_params'] / 1e6:.2f}M active), {train['batch']} x {train['seq_len']}"
        " tokens per step, AdamW with clipping; PyTorch runs the same model (bench/torch_train.py).",
        "",
        "| engine | step (ms) | tokens/s |",
        "|---|---|---|",
        f"| moe.cpp | {train['step_ms']:.1f} | {train['tokens_per_s']:.0f} |",
        f"| PyTorch | {torch_train['torch_step_ms']:.1f} | {torch_train['torch_tokens_per_s']:.0f} |",
        "",
        f"moe.cpp / PyTorch tokens/s: {train['tokens_per_s'] / torch_train['torch_tokens_per_s']:.2f}",
        "",
        "## Decoding one token at a time",
        "",
        f"An MoE model with {decode['experts_gb']:.2f} GB of experts (batch 1, greedy): the floor is"
        " the bytes of the weights one token reads divided by the measured read bandwidth.",
        "",
        "| weights read per token | read bandwidth | floor | measured | ratio to the floor |",
        "|---|---|---|---|---|",
        f"| {decode['bytes_per_token'] / 1e6:.0f} MB | {decode['read_bandwidth_gbs']:.1f} GB/s |"
        f" {decode['floor_ms']:.2f} ms | {decode['decode_ms_per_token']:.2f} ms |"
        f" {decode['ratio_to_floor']:.3f} |",
        "",
        "## What the targets against PyTorch ask of this machine",
        "",
        "PyTorch's own dense FFN (same active multiply-adds) and its per-expert loop run here at"
        " nearly the machine's float32 GEMM throughput, so a given speed-up over PyTorch asks for"
        " matrix products at the throughput in the last columns. The layer counts 18 N k D F"
        " FLOPs forward+backward; the training step counts its matrix products (the active"
        " parameters that multiply, the output head, causal attention) three times forward.",
        "",
        "| target | PyTorch MoE / PyTorch dense | PyTorch (ms) | speed-up asked | time asked (ms)"
        " | GFLOP | GFLOP/s asked | float32 GEMM peak GFLOP/s | asked / peak |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (n, d, f, e, k, o, t), want in zip(rows, (2.5, 4.0)):
        gflop = 18.0 * n * k * d * f / 1e9
        asked_ms = t["torch_fwdbwd_ms"] / want
        need = gflop / asked_ms * 1e3
        lines.append(
            f"| layer E={e}, k={k} | {t['torch_fwdbwd_ms'] / t['torch_dense_fwdbwd_ms']:.2f} |"
            f" {t['torch_fwdbwd_ms']:.1f} | {want:.1f}x | {asked_ms:.1f} | {gflop:.1f} |"
            f" {need:.0f} | {o['gemm_peak_gflops']:.0f} | {need / o['gemm_peak_gflops']:.2f} |")
    asked_ms = torch_train["torch_step_ms"] / 3.0
    need = train["matmul_gflop_per_step"] / asked_ms * 1e3
    lines += [
        f"| training step | - | {torch_train['torch_step_ms']:.1f} | 3.0x | {asked_ms:.1f} |"
        f" {train['matmul_gflop_per_step']:.1f} | {need:.0f} | {train['gemm_peak_gflops']:.0f} |"
        f" {need / train['gemm_peak_gflops']:.2f} |",
        "",
        f"The training step's floor (its matrix products alone at the peak):"
        f" {train['floor_ms']:.1f} ms; moe.cpp's step is {train['ratio_to_floor']:.2f}x that.",
        "",
        f"PyTorch {rows[0][6]['torch_version']} (Debian's python3-torch); PyTorch's own GEMM"
        f" throughput here: {rows[0][6]['torch_gemm_gflops']:.0f} GFLOP/s.",
    ]
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
