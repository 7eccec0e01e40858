#!/usr/bin/env python3
"""The MoE claim, measured: trains, on the default corpus with the same tokens and steps,
(a) a dense model, (b) an MoE model with the same active parameters (8 experts, top-2), and
(c) the same MoE without any balancing loss; writes a table and a validation-loss plot to
docs/results/.

    bench/moe_vs_dense.py [--moe build/release/moe] [--steps 10000] [--out out/experiment]
"""
import argparse
import json
import os
import subprocess
import sys

RUNS = [
    ("dense", ["--preset", "small-dense"]),
    ("moe", ["--preset", "small"]),
    ("moe-unbalanced", ["--preset", "small", "--aux-coef", "0", "--z-coef", "0"]),
]
COLORS = {"dense": "#444444", "moe": "#1f77b4", "moe-unbalanced": "#d62728"}


def read_log(path):
    steps, vals, last = [], [], {}
    with open(path) as f:
        for line in f:
            j = json.loads(line)
            if "val_loss" in j:
                steps.append(j["step"])
                vals.append(j["val_loss"])
            else:
                last = j
    return steps, vals, last


def svg(curves, path, colors=None):
    colors = colors or COLORS
    w, h, pad = 720, 420, 60
    all_steps = [s for c in curves.values() for s in c[0]]
    all_vals = [v for c in curves.values() for v in c[1]]
    x_max, y_min, y_max = max(all_steps), min(all_vals), max(all_vals)
    sx = lambda s: pad + (w - 2 * pad) * s / x_max
    sy = lambda v: h - pad - (h - 2 * pad) * (v - y_min) / max(1e-9, y_max - y_min)
    out = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' "
           "font-family='sans-serif' font-size='12'>",
           "<rect width='100%' height='100%' fill='white'/>",
           f"<text x='{pad}' y='25' font-size='14'>Validation loss (nats per byte) by step</text>",
           f"<line x1='{pad}' y1='{h - pad}' x2='{w - pad}' y2='{h - pad}' stroke='black'/>",
           f"<line x1='{pad}' y1='{pad}' x2='{pad}' y2='{h - pad}' stroke='black'/>",
           f"<text x='{w - pad}' y='{h - pad + 20}' text-anchor='end'>step {x_max}</text>",
           f"<text x='5' y='{sy(y_min):.0f}'>{y_min:.3f}</text>",
           f"<text x='5' y='{sy(y_max):.0f}'>{y_max:.3f}</text>"]
    for i, (name, (steps, vals)) in enumerate(curves.items()):
        pts = " ".join(f"{sx(s):.1f},{sy(v):.1f}" for s, v in zip(steps, vals))
        out.append(f"<polyline points='{pts}' fill='none' stroke='{colors[name]}' "
                   "stroke-width='2'/>")
        out.append(f"<text x='{w - pad - 150}' y='{pad + 18 * i}' fill='{colors[name]}'>"
                   f"{name}: {vals[-1]:.4f}</text>")
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--moe", default="build/release/moe")
    ap.add_argument("--steps", type=int, default=10000)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--out", default="out/experiment")
    ap.add_argument("--results", default="docs/results")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.results, exist_ok=True)
    curves, rows = {}, []
    for name, flags in RUNS:
        log = os.path.join(args.out, name + ".jsonl")
        cmd = [args.moe, "train", *flags, "--steps", str(args.steps), "--eval-every",
               str(args.eval_every), "--save-every", "0", "--sample", "0",
               "--out", os.path.join(args.out, name), "--log", log]
        print("+", " ".join(cmd), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True)
        steps, vals, last = read_log(log)
        params = json.loads(subprocess.run(
            [args.moe, "params", "-m", os.path.join(args.out, name), "--json"],
            check=True, capture_output=True, text=True).stdout)
        curves[name] = (steps, vals)
        rows.append((name, params["total_params"], params["active_params"], vals[-1],
                     last.get("tokens_per_s", 0), last.get("load_imbalance", 0)))
    svg(curves, os.path.join(args.results, "moe_vs_dense.svg"))
    tokens = args.steps * 16 * 128
    with open(os.path.join(args.results, "moe_vs_dense.md"), "w") as f:
        f.write(f"# Dense vs MoE on the fortunes corpus ({args.steps} steps, {tokens / 1e6:.1f}M "
                "tokens each)\n\n")
        f.write("| model | total params | active params | final val loss | tokens/s | "
                "load imbalance |\n|---|---|---|---|---|---|\n")
        for r in rows:
            f.write(f"| {r[0]} | {r[1]:,} | {r[2]:,} | {r[3]:.4f} | {r[4]:.0f} | {r[5]:.2f} |\n")
        f.write("\n![validation loss](moe_vs_dense.svg)\n")
    print(open(os.path.join(args.results, "moe_vs_dense.md")).read())


if __name__ == "__main__":
    main()
