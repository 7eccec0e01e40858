#!/usr/bin/env python3
"""Multi-token prediction measured (DeepSeek-V3, section 2.2): on the default corpus, with the
same seed, steps and tokens, trains the `small` MoE without and with MTP modules (`--mtp D`,
weight 0.3) and compares the main model's validation loss and the training speed; then times
greedy generation with and without `--speculative` on the MTP model (and on a briefly trained
`medium` one, where decoding reads more weights per token), reporting the drafts' acceptance
and the speed-up. Writes a table and a plot in docs/results/.

    bench/mtp.py [--moe build/release/moe] [--steps 3000] [--medium-steps 200] [--out out/mtp]
"""
import argparse
import os
import re
import subprocess
import sys

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from moe_vs_dense import read_log, svg  # noqa: E402

PROMPTS = ["The ", "Der ", "Il ", "Un homme ", "Q: "]


def run(cmd):
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)


def timed_generate(moe, model, prompt, n, speculative, repeats):
    """Best-of-repeats seconds, the text, and the speculative counts (accepted, drafted,
    passes) from one `moe generate` setting."""
    best, text, counts = None, None, None
    for _ in range(repeats):
        cmd = [moe, "generate", "-m", model, "-p", prompt, "-n", str(n), "--temp", "0"]
        if speculative:
            cmd.append("--speculative")
        r = subprocess.run(cmd, check=True, capture_output=True)  # bytes: any text the model makes
        err = r.stderr.decode("utf-8", "replace")
        secs = float(re.search(r"tokens in ([0-9.]+) s", err).group(1))
        best = secs if best is None else min(best, secs)
        text = r.stdout
        m = re.search(r"speculative: (\d+) of (\d+) drafted tokens accepted.*?(\d+) passes", err)
        if m:
            counts = tuple(int(g) for g in m.groups())
    return best, text, counts


def speed(args, model):
    """Per prompt: plain and speculative seconds, the acceptance; checks the texts agree."""
    rows = []
    for p in PROMPTS:
        plain_s, plain_text, _ = timed_generate(args.moe, model, p, args.tokens, False,
                                                args.repeats)
        spec_s, spec_text, (acc, drafted, passes) = timed_generate(args.moe, model, p,
                                                                   args.tokens, True,
                                                                   args.repeats)
        assert spec_text == plain_text, f"{model}, prompt {p!r}: the texts differ"
        rows.append((p, plain_s, spec_s, acc, drafted, passes))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--moe", default="build/release/moe")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--depth", type=int, default=1)
    ap.add_argument("--weight", type=float, default=0.3)
    ap.add_argument("--medium-steps", type=int, default=200)
    ap.add_argument("--dense-steps", type=int, default=3000,
                    help="also train small-dense with the modules (0: not)")
    ap.add_argument("--tokens", type=int, default=400, help="tokens generated per prompt")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default="out/mtp")
    ap.add_argument("--results", default="docs/results")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.results, exist_ok=True)
    common = ["--eval-every", str(args.eval_every), "--save-every", "0", "--sample", "0",
              "--seed", str(args.seed)]
    mtp = ["--mtp", str(args.depth), "--mtp-weight", str(args.weight)]
    label_mtp = f"small + MTP (D={args.depth}, λ={args.weight})"
    runs = [("small", "plain", ["--preset", "small", "--steps", str(args.steps)]),
            (label_mtp, "mtp", ["--preset", "small", "--steps", str(args.steps), *mtp])]
    if args.medium_steps > 0:
        runs.append((f"medium + MTP, {args.medium_steps} steps", "medium_mtp",
                     ["--preset", "medium", "--steps", str(args.medium_steps), *mtp]))
    if args.dense_steps > 0:
        runs.append((f"small-dense, {args.dense_steps} steps", "dense",
                     ["--preset", "small-dense", "--steps", str(args.dense_steps)]))
        runs.append((f"small-dense + MTP, {args.dense_steps} steps", "dense_mtp",
                     ["--preset", "small-dense", "--steps", str(args.dense_steps), *mtp]))
    curves, rows = {}, {}
    for label, name, flags in runs:
        log = os.path.join(args.out, name + ".jsonl")
        if not os.path.exists(os.path.join(args.out, name, "latest")):
            run([args.moe, "train", *flags, *common, "--out", os.path.join(args.out, name),
                 "--log", log])
        steps, vals, last = read_log(log)
        rows[label] = (vals[-1], last.get("mtp_loss", 0.0), last.get("tokens_per_s", 0))
        if name in ("plain", "mtp"):
            curves[label] = (steps, vals)
    svg(curves, os.path.join(args.results, "mtp.svg"),
        {"small": "#444444", label_mtp: "#2ca02c"})
    spec = {"small": speed(args, os.path.join(args.out, "mtp"))}
    if args.medium_steps > 0:
        spec["medium"] = speed(args, os.path.join(args.out, "medium_mtp"))
    if args.dense_steps > 0:
        spec["small-dense"] = speed(args, os.path.join(args.out, "dense_mtp"))

    tokens = args.steps * 16 * 128
    path = os.path.join(args.results, "mtp.md")
    with open(path, "w") as f:
        f.write(f"# Multi-token prediction ({args.steps} steps, {tokens / 1e6:.1f}M tokens, "
                f"seed {args.seed})\n\n")
        f.write("| run | final val loss (main model) | MTP modules' loss | tokens/s |\n"
                "|---|---|---|---|\n")
        for label, (val, m, tps) in rows.items():
            f.write(f"| {label} | {val:.4f} | {m:.4f} | {tps:.0f} |\n")
        plain, with_mtp = rows["small"][0], rows[label_mtp][0]
        f.write(f"\nWith the modules the MoE's validation loss changes by "
                f"{with_mtp - plain:+.4f} nats (negative: better); a step costs "
                f"{rows['small'][2] / max(1, rows[label_mtp][2]):.2f}x the time.")
        if args.dense_steps > 0:
            d0 = rows[f"small-dense, {args.dense_steps} steps"]
            d1 = rows[f"small-dense + MTP, {args.dense_steps} steps"]
            f.write(f" The dense model's changes by {d1[0] - d0[0]:+.4f} nats, its step costing "
                    f"{d0[2] / max(1, d1[2]):.2f}x the time.")
        f.write("\n\n")
        f.write("![validation loss](mtp.svg)\n\n")
        f.write(f"## Self-speculative decoding (greedy, {args.tokens} tokens per prompt, best of "
                f"{args.repeats})\n\n")
        f.write("| model | prompt | plain s | speculative s | speed-up | accepted | "
                "tokens per pass |\n|---|---|---|---|---|---|---|\n")
        for model, prompt_rows in spec.items():
            tot_plain = tot_spec = 0.0
            tot_acc = tot_drafted = tot_passes = 0
            for p, ps, ss, acc, drafted, passes in prompt_rows:
                f.write(f"| {model} | `{p}` | {ps:.3f} | {ss:.3f} | {ps / ss:.2f}x | "
                        f"{acc}/{drafted} ({100 * acc / max(1, drafted):.0f}%) | "
                        f"{(args.tokens - 1) / max(1, passes):.2f} |\n")
                tot_plain += ps
                tot_spec += ss
                tot_acc += acc
                tot_drafted += drafted
                tot_passes += passes
            f.write(f"| **{model}** | all | {tot_plain:.3f} | {tot_spec:.3f} | "
                    f"**{tot_plain / tot_spec:.2f}x** | {100 * tot_acc / max(1, tot_drafted):.0f}% "
                    f"| {(len(prompt_rows) * (args.tokens - 1)) / max(1, tot_passes):.2f} |\n")
        f.write("\nEvery speculative text is the plain greedy text, byte for byte (the script "
                "checks).\n")
    print(open(path).read())


if __name__ == "__main__":
    main()
