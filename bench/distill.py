#!/usr/bin/env python3
"""Distillation measured (Switch Transformer, section 5): on the default corpus, with the same
seed, steps and tokens, trains (a) the `small` MoE (the teacher), (b) the `small-dense` model of
its active size alone, (c) the same dense model distilled from (a) with `moe distill`
(soft-target weight 0.25), and (d) the control: the same dense model distilled from (b), a
teacher of its own size (self-distillation), which separates what the soft targets give by
themselves from what the MoE teacher adds; reports how much of the MoE's gain over (b) the
student keeps, (b - c) / (b - a) in validation loss (the paper: about 30%), in a table and a
plot in docs/results/.

    bench/distill.py [--moe build/release/moe] [--steps 3000] [--out out/distill]
"""
import argparse
import json
import os
import subprocess
import sys

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from moe_vs_dense import read_log, svg  # noqa: E402

COLORS = {"teacher (MoE)": "#1f77b4", "dense": "#444444", "distilled dense": "#2ca02c",
          "self-distilled dense": "#ff7f0e"}


def run(cmd):
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--moe", default="build/release/moe")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--soft-weight", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default="out/distill")
    ap.add_argument("--results", default="docs/results")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.results, exist_ok=True)
    common = ["--steps", str(args.steps), "--eval-every", str(args.eval_every), "--save-every",
              "0", "--sample", "0", "--seed", str(args.seed)]
    teacher = os.path.join(args.out, "teacher")
    soft = ["--student", "small-dense", "--soft-weight", str(args.soft_weight)]
    runs = [
        ("teacher (MoE)", "teacher", ["train", "--preset", "small"]),
        ("dense", "dense", ["train", "--preset", "small-dense"]),
        ("distilled dense", "distilled", ["distill", "--teacher", teacher, *soft]),
        ("self-distilled dense", "self_distilled",
         ["distill", "--teacher", os.path.join(args.out, "dense"), *soft]),
    ]
    curves, rows = {}, {}
    for label, name, flags in runs:
        log = os.path.join(args.out, name + ".jsonl")
        if not os.path.exists(os.path.join(args.out, name, "latest")):
            run([args.moe, *flags, *common, "--out", os.path.join(args.out, name), "--log", log])
        steps, vals, last = read_log(log)
        params = json.loads(subprocess.run(
            [args.moe, "params", "-m", os.path.join(args.out, name), "--json"],
            check=True, capture_output=True, text=True).stdout)
        curves[label] = (steps, vals)
        rows[label] = (params["total_params"], params["active_params"], vals[-1],
                       last.get("tokens_per_s", 0))
    t, d, s, c = (rows[k][2] for k in ("teacher (MoE)", "dense", "distilled dense",
                                       "self-distilled dense"))
    kept = (d - s) / (d - t) if d != t else float("nan")
    svg(curves, os.path.join(args.results, "distill.svg"), COLORS)
    tokens = args.steps * 16 * 128
    path = os.path.join(args.results, "distill.md")
    with open(path, "w") as f:
        f.write(f"# Distilling the small MoE into a dense model ({args.steps} steps, "
                f"{tokens / 1e6:.1f}M tokens each, seed {args.seed})\n\n")
        f.write("| model | total params | active params | final val loss | tokens/s |\n"
                "|---|---|---|---|---|\n")
        for label, r in rows.items():
            f.write(f"| {label} | {r[0]:,} | {r[1]:,} | {r[2]:.4f} | {r[3]:.0f} |\n")
        f.write(f"\nThe MoE's gain over the dense model: {d - t:.4f} nats; the distilled student's "
                f"gain: {d - s:.4f} nats, **{100 * kept:.0f}% of the MoE's** (soft-target weight "
                f"{args.soft_weight}; the Switch Transformer paper reports about 30%). The "
                f"control, the same student distilled from the dense model: {d - c:.4f} nats; "
                f"the MoE teacher adds {c - s:.4f} nats over it.\n\n"
                "![validation loss](distill.svg)\n")
    print(open(path).read())


if __name__ == "__main__":
    main()
