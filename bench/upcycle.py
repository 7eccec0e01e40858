#!/usr/bin/env python3
"""Sparse upcycling measured (Komatsuzaki et al. 2022): on the default corpus, trains the
`small-dense` model for S1 steps, then for S2 more steps three ways from the same tokens' worth
of budget: (a) the dense model continued, (b) the dense model upcycled to the `small` MoE's
shape (8 experts of half the FFN's width, top-2, every layer: `moe upcycle --segments 2`, the
fine-grained cut of Qwen1.5-MoE and DeepSeekMoE) and trained on, against (c) the `small` MoE
trained from scratch for S1 + S2 steps. All three see S1 + S2 steps of 16 x 128 tokens. The
second phase starts a fresh optimizer and schedule (another data seed, warmup, cosine over S2 to
the same final rate) peaking at --phase2-lr, by default the first phase's peak (3e-3; starting it
at 1.65e-3, the scratch schedule's rate at step S1, measured worse for both arms: 1.6513 and
1.6296). Writes a table and a plot of validation loss by step in docs/results/.

    bench/upcycle.py [--moe build/release/moe] [--steps1 1500] [--steps2 1500] [--out out/upcycle]
"""
import argparse
import os
import subprocess
import sys

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from moe_vs_dense import read_log, svg  # noqa: E402

COLORS = {"MoE from scratch": "#1f77b4", "dense, continued": "#444444",
          "dense, upcycled to the MoE": "#2ca02c"}


def run(cmd):
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)


def train(args, name, flags, steps, seed, offset=0):
    """Trains (unless done) and returns the validation curve, its steps moved by offset."""
    out = os.path.join(args.out, name)
    log = out + ".jsonl"
    if not os.path.exists(os.path.join(out, "latest")):
        run([args.moe, "train", *flags, "--steps", str(steps), "--eval-every",
             str(args.eval_every), "--save-every", "0", "--sample", "0", "--seed", str(seed),
             "--out", out, "--log", log])
    steps_, vals, last = read_log(log)
    return [s + offset for s in steps_], vals, last


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--moe", default="build/release/moe")
    ap.add_argument("--steps1", type=int, default=1500)
    ap.add_argument("--steps2", type=int, default=1500)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--phase2-lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default="out/upcycle")
    ap.add_argument("--results", default="docs/results")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.results, exist_ok=True)
    s1, s2, seed = args.steps1, args.steps2, args.seed
    scratch = train(args, "moe_scratch", ["--preset", "small"], s1 + s2, seed)
    dense1 = train(args, "dense", ["--preset", "small-dense"], s1, seed)
    dense_ckpt = os.path.join(args.out, "dense")
    phase2 = ["--lr", str(args.phase2_lr)]
    cont = train(args, "dense_continued", ["--init-from", dense_ckpt, *phase2], s2, seed + 1, s1)
    up_dir = os.path.join(args.out, "upcycled_init")
    if not os.path.exists(os.path.join(up_dir, "config.json")):
        run([args.moe, "upcycle", "-m", dense_ckpt, "-o", up_dir, "--experts", "8", "--top-k",
             "2", "--moe-every", "1", "--segments", "2", "--seed", str(seed)])
    up = train(args, "upcycled", ["--init-from", up_dir, *phase2], s2, seed + 1, s1)
    curves = {
        "MoE from scratch": (scratch[0], scratch[1]),
        "dense, continued": (dense1[0] + cont[0], dense1[1] + cont[1]),
        "dense, upcycled to the MoE": (dense1[0] + up[0], dense1[1] + up[1]),
    }
    svg(curves, os.path.join(args.results, "upcycle.svg"), COLORS)
    tps = {"MoE from scratch": scratch[2].get("tokens_per_s", 0),
           "dense, continued": cont[2].get("tokens_per_s", 0),
           "dense, upcycled to the MoE": up[2].get("tokens_per_s", 0)}
    tokens = (s1 + s2) * 16 * 128
    at_s1 = {k: v[1][v[0].index(s1)] if s1 in v[0] else float("nan")
             for k, v in curves.items()}
    path = os.path.join(args.results, "upcycle.md")
    with open(path, "w") as f:
        f.write(f"# Sparse upcycling ({s1} + {s2} steps, {tokens / 1e6:.1f}M tokens each, "
                f"seed {seed})\n\n")
        f.write("| run | val loss at step " + str(s1) + " | final val loss | phase-2 tokens/s |\n"
                "|---|---|---|---|\n")
        for k, (st, vals) in curves.items():
            f.write(f"| {k} | {at_s1[k]:.4f} | {vals[-1]:.4f} | {tps[k]:.0f} |\n")
        d, u, m = (curves[k][1][-1] for k in ("dense, continued", "dense, upcycled to the MoE",
                                               "MoE from scratch"))
        f.write(f"\nAfter the same {s1 + s2} steps the upcycled model is {d - u:+.4f} nats "
                f"better than the dense model continued and {m - u:+.4f} nats better than the MoE "
                f"trained from scratch (negative: worse). The upcycled model has the MoE's "
                f"shape: `moe upcycle --experts 8 --top-k 2 --moe-every 1 --segments 2` cuts "
                f"each dense FFN's 512 hidden units into two runs of 256, expert e holding run "
                f"e % 2. The second phase's schedule: warmup to {args.phase2_lr} and cosine to the "
                f"same final rate.\n\n![validation loss](upcycle.svg)\n")
    print(open(path).read())


if __name__ == "__main__":
    main()
