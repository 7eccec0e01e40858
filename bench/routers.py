#!/usr/bin/env python3
"""Every routing method at equal active compute, measured: on the default corpus, with the same
seed, steps and tokens, trains the `small` preset (4 MoE layers of 8 experts) with each router,
each configured so that a token costs what two experts of width 256 cost (Switch: one expert of
width 512; soft routing: all eight of width 64; expert choice: capacity factor 2), then reads
each checkpoint's routing with `moe inspect`: validation loss, load imbalance, dead experts,
dropped pairs, tokens left without an expert, router entropy and the normalized mutual
information between a token's language and its top expert. Writes a table and a plot of the
validation curves to docs/results/.

    bench/routers.py [--moe build/release/moe] [--steps 1000] [--out out/routers]
"""
import argparse
import json
import os
import subprocess
import sys

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from moe_vs_dense import read_log, svg  # noqa: E402

# name, description, MoE config changes over the small preset's
RUNS = [
    ("topk", "softmax top-2, Switch balancing loss 0.01", {}),
    ("topk-no-balance", "softmax top-2, no balancing loss", {"aux_loss_coef": 0.0}),
    ("switch", "Switch top-1, one expert of width 512",
     {"router": "switch", "top_k": 1, "renormalize": False, "d_ffn": 512}),
    ("noisy_topk", "noisy top-2 (Shazeer 2017), importance + load losses", {"router": "noisy_topk"}),
    ("gshard", "GShard top-2, capacity factor 2 in groups of 512, random second expert",
     {"router": "gshard", "capacity_factor": 2.0, "capacity_group": 512, "drop_policy": "slot"}),
    ("expert_choice", "expert choice, capacity factor 2", {"router": "expert_choice",
                                                          "capacity_factor": 2.0}),
    ("soft", "soft (every expert), eight of width 64", {"router": "soft", "d_ffn": 64,
                                                         "top_k": 8}),
    ("hierarchical", "two-level tree: top-1 of 2 groups, top-2 of its 4 experts",
     {"router": "hierarchical", "hme_groups": 2, "hme_group_k": 1, "hme_expert_k": 2}),
    ("deepseek", "DeepSeek-V3 sigmoid, aux-loss-free bias + sequence loss 1e-4",
     {"router": "deepseek", "aux_loss_coef": 0.0001, "seq_len": 128}),
]
COLORS = ["#1f77b4", "#aec7e8", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
          "#e377c2", "#17becf"]


def run(cmd, **kw):
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    return subprocess.run(cmd, check=True, **kw)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--moe", default="build/release/moe")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default="out/routers")
    ap.add_argument("--results", default="docs/results")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    # The small preset's config, as this build writes it.
    base_dir = os.path.join(args.out, "base")
    if not os.path.exists(os.path.join(base_dir, "config.json")):
        run([args.moe, "init", "--preset", "small", "--out", base_dir], stdout=subprocess.DEVNULL)
    with open(os.path.join(base_dir, "config.json")) as f:
        base = json.load(f)["moe_cpp"]
    curves, rows = {}, []
    for name, what, change in RUNS:
        cfg = json.loads(json.dumps(base))
        cfg["moe"].update(change)
        cfg_path = os.path.join(args.out, name + ".json")
        with open(cfg_path, "w") as f:
            json.dump(cfg, f)
        out = os.path.join(args.out, name)
        log = out + ".jsonl"
        if not os.path.exists(os.path.join(out, "latest")):
            run([args.moe, "train", "--config", cfg_path, "--steps", str(args.steps),
                 "--eval-every", str(args.eval_every), "--save-every", "0", "--sample", "0",
                 "--seed", str(args.seed), "--out", out, "--log", log])
        steps, vals, last = read_log(log)
        rep = json.loads(run([args.moe, "inspect", "-m", out, "--json", "--plots", ""],
                             capture_output=True, text=True).stdout)
        layers = rep["layers"]
        mean = lambda k: sum(l[k] for l in layers) / len(layers)
        curves[name] = (steps, vals)
        rows.append((name, what, vals[-1], mean("load_imbalance"),
                     sum(l["dead_experts"] for l in layers), mean("dropped"), mean("unrouted"),
                     mean("router_entropy"), mean("nmi"), last.get("tokens_per_s", 0)))
    colors = {name: COLORS[i % len(COLORS)] for i, (name, _, _) in enumerate(RUNS)}
    svg(curves, os.path.join(args.results, "routers.svg"), colors)
    tokens = args.steps * 16 * 128
    path = os.path.join(args.results, "routers.md")
    with open(path, "w") as f:
        f.write(f"# Every routing method at equal active compute ({args.steps} steps, "
                f"{tokens / 1e6:.1f}M tokens each, seed {args.seed})\n\n"
                "The `small` preset (4 layers, every one MoE with 8 experts) on the default "
                "corpus; routing read by `moe inspect` on the validation text (means over the "
                "layers; dead experts summed).\n\n"
                "| router | configuration | val loss | load imbalance | dead experts | "
                "pairs dropped | tokens without an expert | router entropy (nats) | "
                "NMI(language; expert) | tokens/s |\n"
                "|---|---|---|---|---|---|---|---|---|---|\n")
        for r in rows:
            f.write(f"| {r[0]} | {r[1]} | {r[2]:.4f} | {r[3]:.2f} | {r[4]} | {100 * r[5]:.1f}% "
                    f"| {100 * r[6]:.1f}% | {r[7]:.3f} | {r[8]:.3f} | {r[9]:.0f} |\n")
        f.write("\n![validation loss](routers.svg)\n")
    print(open(path).read())


if __name__ == "__main__":
    main()
