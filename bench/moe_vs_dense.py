#!/usr/bin/env python3
"""The MoE claim, measured: an MoE against a dense model of the same active parameters, on the
default corpus, the same seed and the same tokens.

Three phases, each resumable (a finished run is read back, not trained again):

1. Search (--search-steps, 4.1M tokens by default): MoE shapes at the dense model's active FFN
   width (512 per token: 8 x 256 top-2 is the `small` preset; more experts, fine-grained experts
   of width 128 or 64 with top-4 or top-8, a shared expert), then the best shape's routing with
   other routers. The lowest validation loss wins. Finished runs are kept in bench/runs/ (their
   validation curves), so the script goes on from them on a fresh checkout.
2. The long runs (--steps, 20.5M tokens by default): the dense model, the `small` MoE and the
   winner, at equal tokens (--no-timing stops here: these losses do not depend on the machine's
   load, the timing does).
3. Timing: a short clean run of the dense model and of the winner (--timing-steps, alone on the
   machine, all its cores) gives each one's tokens/s; then the winner trained for as long as the
   dense model trains (its steps scaled by the ratio of the two speeds, with its own full
   schedule): the comparison at equal wall-clock time.

Writes docs/results/moe_vs_dense.md with the tables and two plots (validation loss by tokens and
by time). Independent runs go --jobs at a time (results do not depend on the thread count).

    bench/moe_vs_dense.py [--moe build/release/moe] [--steps 10000] [--search-steps 2000]
                          [--jobs 2] [--out out/moe_vs_dense]
"""
import argparse
import concurrent.futures
import json
import os
import shutil
import statistics
import subprocess
import sys

TOKENS_PER_STEP = 16 * 128

# name, description, MoE config changes over the small preset's (same active FFN width: 512)
SHAPES = [
    ("8x256-top2", "8 experts of width 256, top-2 (the `small` preset)", {}),
    ("32x256-top2", "32 experts of width 256, top-2", {"n_experts": 32}),
    ("32x128-top4", "32 experts of width 128, top-4 (fine-grained)",
     {"n_experts": 32, "top_k": 4, "d_ffn": 128}),
    ("64x128-top4", "64 experts of width 128, top-4 (fine-grained)",
     {"n_experts": 64, "top_k": 4, "d_ffn": 128}),
    ("64x64-top8", "64 experts of width 64, top-8 (fine-grained)",
     {"n_experts": 64, "top_k": 8, "d_ffn": 64}),
    ("shared+48x128-top3", "1 shared expert of width 128 + 48 of width 128, top-3 (DeepSeekMoE)",
     {"n_experts": 48, "top_k": 3, "d_ffn": 128, "n_shared": 1, "d_shared_ffn": 128}),
]
# routers tried on the best shape: name suffix, description, changes
ROUTERS = [
    ("noisy", "noisy top-k (Shazeer 2017), importance + load losses", {"router": "noisy_topk"}),
]
COLORS = {"dense": "#444444", "small MoE": "#aec7e8", "best MoE": "#1f77b4",
          "best MoE, dense's wall-clock": "#2ca02c"}


def read_log(path):
    """Validation (steps, losses) and the last step's record of a training log. A run resumed
    from a checkpoint logs again from there: a step's last record wins."""
    val, last = {}, {}
    with open(path) as f:
        for line in f:
            j = json.loads(line)
            if "val_loss" in j:
                val[j["step"]] = j["val_loss"]
            elif j.get("step", 0) >= last.get("step", 0):
                last = j
    steps = sorted(val)
    return steps, [val[s] for s in steps], last


def svg(curves, path, colors=None, xlabel="step", title="Validation loss (nats per byte) by step"):
    """A line plot of curves {name: (xs, ys)}; x runs from 0 to the largest x."""
    colors = colors or COLORS
    w, h, pad = 720, 420, 60
    all_x = [s for c in curves.values() for s in c[0]]
    all_vals = [v for c in curves.values() for v in c[1]]
    x_max, y_min, y_max = max(all_x), min(all_vals), max(all_vals)
    sx = lambda s: pad + (w - 2 * pad) * s / x_max
    sy = lambda v: h - pad - (h - 2 * pad) * (v - y_min) / max(1e-9, y_max - y_min)
    x_end = f"{x_max:g}" if isinstance(x_max, int) else f"{x_max:.3g}"
    out = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' "
           "font-family='sans-serif' font-size='12'>",
           "<rect width='100%' height='100%' fill='white'/>",
           f"<text x='{pad}' y='25' font-size='14'>{title}</text>",
           f"<line x1='{pad}' y1='{h - pad}' x2='{w - pad}' y2='{h - pad}' stroke='black'/>",
           f"<line x1='{pad}' y1='{pad}' x2='{pad}' y2='{h - pad}' stroke='black'/>",
           f"<text x='{w - pad}' y='{h - pad + 20}' text-anchor='end'>{xlabel} {x_end}</text>",
           f"<text x='5' y='{sy(y_min):.0f}'>{y_min:.3f}</text>",
           f"<text x='5' y='{sy(y_max):.0f}'>{y_max:.3f}</text>"]
    for i, (name, (xs, vals)) in enumerate(curves.items()):
        pts = " ".join(f"{sx(s):.1f},{sy(v):.1f}" for s, v in zip(xs, vals))
        out.append(f"<polyline points='{pts}' fill='none' stroke='{colors[name]}' "
                   "stroke-width='2'/>")
        out.append(f"<text x='{w - pad - 230}' y='{pad + 18 * i}' fill='{colors[name]}'>"
                   f"{name}: {vals[-1]:.4f}</text>")
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def run(cmd, **kw):
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    return subprocess.run(cmd, check=True, **kw)


class Bench:
    def __init__(self, args):
        self.args = args
        base_dir = os.path.join(args.out, "base")
        if not os.path.exists(os.path.join(base_dir, "config.json")):
            run([args.moe, "init", "--preset", "small", "--out", base_dir],
                stdout=subprocess.DEVNULL)
        with open(os.path.join(base_dir, "config.json")) as f:
            self.base = json.load(f)["moe_cpp"]

    def config(self, name, change):
        """Writes the small preset's config with these MoE changes; returns train flags."""
        if change is None:
            return ["--preset", "small-dense"]
        cfg = json.loads(json.dumps(self.base))
        cfg["moe"].update(change)
        path = os.path.join(self.args.out, name + ".json")
        with open(path, "w") as f:
            json.dump(cfg, f)
        return ["--config", path]

    def train(self, name, change, steps, threads):
        """Trains (unless done); returns (steps, val losses, last step's log, params). A finished
        run's validations and last record are kept in --saved (committed with the results), so a
        later run of the script, on a fresh checkout, reads them instead of training again."""
        out = os.path.join(self.args.out, name)
        log = out + ".jsonl"
        saved = os.path.join(self.args.saved, name + ".jsonl")
        flags = self.config(name, change)
        if not os.path.exists(log) and os.path.exists(saved):
            shutil.copyfile(saved, log)
        done = os.path.exists(log) and read_log(log)[2].get("step") == steps
        if not done:
            # Checkpoints every --save-every steps: a run cut short resumes where it was.
            resume = ["--resume", out] if os.path.exists(os.path.join(out, "latest")) else []
            run([self.args.moe, "train", *flags, *resume, "--steps", str(steps), "--eval-every",
                 str(self.args.eval_every), "--save-every", str(self.args.save_every),
                 "--sample", "0", "--seed", str(self.args.seed), "--threads", str(threads),
                 "--out", out, "--log", log], stdout=subprocess.DEVNULL)
        params = json.loads(run([self.args.moe, "params", *flags, "--json"],
                                capture_output=True, text=True).stdout)
        steps_, vals, last = read_log(log)
        if not os.path.exists(saved):
            os.makedirs(self.args.saved, exist_ok=True)
            keep = {k: v for k, v in last.items() if k != "routed"}
            with open(saved, "w") as f:
                for s, v in zip(steps_, vals):
                    f.write(json.dumps({"step": s, "val_loss": v}) + "\n")
                f.write(json.dumps(keep) + "\n")
        return steps_, vals, last, params

    def train_all(self, jobs):
        """jobs: [(name, change, steps)], run --jobs at a time; returns {name: result}."""
        threads = max(1, (os.cpu_count() or 1) // self.args.jobs)
        with concurrent.futures.ThreadPoolExecutor(self.args.jobs) as pool:
            futures = {}
            for name, change, steps in jobs:
                if name not in futures:  # the same run twice (its steps equal) trains once
                    futures[name] = pool.submit(self.train, name, change, steps, threads)
            return {name: f.result() for name, f in futures.items()}

    def tokens_per_s(self, name, change):
        """Median tokens/s of a short run alone on the machine (warm-up steps left out)."""
        path = os.path.join(self.args.out, "timing-" + name + ".json")
        if not os.path.exists(path):
            out = os.path.join(self.args.out, "timing-" + name)
            log = out + ".jsonl"
            if os.path.exists(log):
                os.remove(log)
            run([self.args.moe, "train", *self.config(name, change), "--steps",
                 str(self.args.timing_steps), "--eval-every", "0", "--save-every", "0",
                 "--sample", "0", "--seed", str(self.args.seed), "--out", out, "--log", log],
                stdout=subprocess.DEVNULL)
            with open(log) as f:
                rates = [json.loads(line).get("tokens_per_s") for line in f]
            rates = [r for r in rates if r][20:]
            with open(path, "w") as f:
                json.dump({"tokens_per_s": statistics.median(rates)}, f)
        with open(path) as f:
            return json.load(f)["tokens_per_s"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--moe", default="build/release/moe")
    ap.add_argument("--steps", type=int, default=10000)
    ap.add_argument("--search-steps", type=int, default=2000)
    ap.add_argument("--timing-steps", type=int, default=150)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--save-every", type=int, default=500)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time")
    ap.add_argument("--skip-small", action="store_true",
                    help="leave out the long run of the small preset")
    ap.add_argument("--no-timing", action="store_true",
                    help="stop after the runs at equal tokens (for a machine that is not quiet: "
                    "the timing and the equal wall-clock run come later)")
    ap.add_argument("--out", default="out/moe_vs_dense")
    ap.add_argument("--results", default="docs/results")
    ap.add_argument("--saved", default="bench/runs/moe_vs_dense",
                    help="finished runs' validation curves, read instead of training again")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.results, exist_ok=True)
    b = Bench(args)
    S = args.search_steps

    # 1. Search: shapes, then routers on the best shape.
    found = b.train_all([(f"search-{S}-dense", None, S)] +
                        [(f"search-{S}-{n}", c, S) for n, _, c in SHAPES])
    best_shape = min(SHAPES, key=lambda s: found[f"search-{S}-{s[0]}"][1][-1])
    tried = [(n, what, c) for n, what, c in SHAPES]
    for suffix, what, change in ROUTERS:
        tried.append((f"{best_shape[0]}-{suffix}", f"{best_shape[1]}; {what}",
                      {**best_shape[2], **change}))
    found.update(b.train_all([(f"search-{S}-{n}", c, S) for n, _, c in tried[len(SHAPES):]]))
    best = min(tried, key=lambda s: found[f"search-{S}-{s[0]}"][1][-1])

    # 2. The long runs at equal tokens: their losses do not depend on the machine's load.
    L = args.steps
    equal = [("dense", f"dense-{L}", None), ("small MoE", f"small-{L}", {}),
             ("best MoE", f"{best[0]}-{L}", best[2])]
    if args.skip_small:
        del equal[1]
    long = b.train_all([(key, change, L) for _, key, change in equal])
    if args.no_timing:
        for label, key, _ in equal:
            print(f"{label}: {long[key][1][-1]:.4f} after {L} steps")
        return

    # 3. Timing, alone on the machine, then the best MoE for the dense model's wall-clock time.
    tps_dense = b.tokens_per_s("dense", None)
    tps_best = b.tokens_per_s(best[0], best[2])
    tps_small = None if args.skip_small else b.tokens_per_s("8x256-top2", {})
    steps_eq = min(L, round(L * tps_best / tps_dense))
    long.update(b.train_all([(f"{best[0]}-{steps_eq}", best[2], steps_eq)]))
    tps = {"dense": tps_dense, "small MoE": tps_small, "best MoE": tps_best}
    runs = [(label, key, tps[label]) for label, key, _ in equal]
    runs.append(("best MoE, dense's wall-clock", f"{best[0]}-{steps_eq}", tps_best))

    by_tokens = {label: ([s * TOKENS_PER_STEP / 1e6 for s in long[key][0]], long[key][1])
                 for label, key, _ in runs}
    by_time = {label: ([s * TOKENS_PER_STEP / tps / 60 for s in long[key][0]], long[key][1])
               for label, key, tps in runs}
    svg(by_tokens, os.path.join(args.results, "moe_vs_dense.svg"), xlabel="million tokens",
        title="Validation loss (nats per byte) by tokens seen")
    svg(by_time, os.path.join(args.results, "moe_vs_dense_time.svg"), xlabel="minutes",
        title="Validation loss (nats per byte) by wall-clock time (2 cores, this machine)")

    dense_loss = long[f"dense-{L}"][1][-1]
    path = os.path.join(args.results, "moe_vs_dense.md")
    with open(path, "w") as f:
        f.write(f"# MoE against dense at equal active parameters ({L} steps, "
                f"{L * TOKENS_PER_STEP / 1e6:.1f}M tokens, seed {args.seed})\n\n"
                f"`bench/moe_vs_dense.py`, the default corpus (fortunes in five languages), "
                f"batches of 16 x 128 bytes, cosine schedule to each run's last step.\n\n"
                f"## Search ({S} steps, {S * TOKENS_PER_STEP / 1e6:.1f}M tokens)\n\n"
                "Every shape has the dense model's active FFN width (512 per token) and its "
                "attention; only the routed experts' count and width, top-k, shared experts and "
                "router change.\n\n"
                "| MoE | total params | active params | val loss | against dense |\n"
                "|---|---|---|---|---|\n")
        d = found[f"search-{S}-dense"]
        f.write(f"| dense (`small-dense`) | {d[3]['total_params']:,} | "
                f"{d[3]['active_params']:,} | {d[1][-1]:.4f} | – |\n")
        for n, what, _ in tried:
            r = found[f"search-{S}-{n}"]
            mark = "**" if n == best[0] else ""
            f.write(f"| {mark}{what}{mark} | {r[3]['total_params']:,} | "
                    f"{r[3]['active_params']:,} | {r[1][-1]:.4f} | {r[1][-1] - d[1][-1]:+.4f} |\n")
        f.write(f"\n## The long runs\n\nBest configuration: {best[1]}. Tokens/s measured alone "
                f"on the machine ({args.timing_steps}-step runs, median, all cores); the "
                f"wall-clock run trains {steps_eq} steps, the dense model's {L} scaled by "
                f"{tps_best:.0f} / {tps_dense:.0f} tokens/s.\n\n"
                "| run | steps | tokens | total params | active params | tokens/s | "
                "final val loss | against dense | load imbalance |\n"
                "|---|---|---|---|---|---|---|---|---|\n")
        for label, key, tps in runs:
            steps, vals, last, params = long[key]
            f.write(f"| {label} | {steps[-1]} | {steps[-1] * TOKENS_PER_STEP / 1e6:.1f}M | "
                    f"{params['total_params']:,} | {params['active_params']:,} | {tps:.0f} | "
                    f"{vals[-1]:.4f} | {vals[-1] - dense_loss:+.4f} | "
                    f"{last.get('load_imbalance', 0):.2f} |\n")
        f.write("\n![validation loss by tokens](moe_vs_dense.svg)\n\n"
                "![validation loss by time](moe_vs_dense_time.svg)\n")
    print(open(path).read())


if __name__ == "__main__":
    main()
