#!/usr/bin/python3
"""A model's expert load per layer, from a notebook or the shell: the routing of a text through
moe_cpp, drawn as a layer x expert heat map (an SVG, no plotting library needed).

    PYTHONPATH=build/release/python /usr/bin/python3 examples/expert_load.py \
        [--model out/train/latest] [--text FILE] [--out expert_load.svg]

Without --model it trains the `tiny` preset for 300 steps first (out/example_model).
"""
import argparse
import os

import numpy as np

import moe_cpp


def heat_map(load, title, path):
    """load [layers, experts] (token-slots per expert) as an SVG heat map, each row divided by
    its mean: 1 is a perfectly balanced expert, 0 an unused one."""
    L, E = load.shape
    rel = load / np.maximum(load.mean(axis=1, keepdims=True), 1e-9)
    top = max(2.0, float(rel.max()))
    cell, left, head = max(8, min(40, 640 // E)), 70, 50
    w, h = left + E * cell + 90, head + L * cell + 50
    out = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' "
           "font-family='sans-serif' font-size='12'>",
           "<rect width='100%' height='100%' fill='white'/>",
           f"<text x='{left}' y='22' font-size='14'>{title}</text>"]
    for layer in range(L):
        y = head + layer * cell
        out.append(f"<text x='{left - 8}' y='{y + cell * 0.7:.1f}' text-anchor='end'>"
                   f"layer {layer}</text>")
        for e in range(E):
            v = rel[layer, e] / top  # 0 (unused, white) .. 1 (the busiest, dark blue)
            r, g, b = (int(255 - v * (255 - c)) for c in (31, 70, 140))
            out.append(f"<rect x='{left + e * cell}' y='{y}' width='{cell - 1}' "
                       f"height='{cell - 1}' fill='rgb({r},{g},{b})'><title>layer {layer}, "
                       f"expert {e}: {int(load[layer, e])} tokens ({rel[layer, e]:.2f}x the "
                       f"mean)</title></rect>")
    for e in range(0, E, max(1, E // 16)):
        out.append(f"<text x='{left + e * cell + cell / 2:.1f}' y='{head + L * cell + 14}' "
                   f"text-anchor='middle'>{e}</text>")
    out.append(f"<text x='{left + E * cell / 2:.1f}' y='{head + L * cell + 34}' "
               f"text-anchor='middle'>expert (colour: load / mean load, white 0, dark "
               f"{top:.1f})</text>")
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="")
    ap.add_argument("--text", default="", help="a text file (default: a paragraph of README.md)")
    ap.add_argument("--out", default="expert_load.svg")
    ap.add_argument("--train-steps", type=int, default=300)
    args = ap.parse_args()
    here = os.path.dirname(os.path.abspath(__file__))
    model_dir = args.model or moe_cpp.train(preset="tiny", steps=args.train_steps,
                                            eval_every=0, sample=0, out="out/example_model")
    model = moe_cpp.load(model_dir)
    if args.text:
        with open(args.text, encoding="utf-8") as f:
            text = f.read()
    else:
        with open(os.path.join(here, "..", "README.md"), encoding="utf-8") as f:
            text = f.read()[:2000]
    ids = model.tokenizer.encode(text)[: model.max_seq_len]
    trace = model.routing(ids)                    # per MoE layer: experts, weights, top_expert
    load = trace.load()                           # [layers, experts]
    print(model)
    print(f"{len(ids)} tokens; token-slots per expert, layer by layer:")
    for layer, row in enumerate(load):
        print(f"  layer {layer}: {row.tolist()}  (max / mean {row.max() / row.mean():.2f})")
    heat_map(load, f"Expert load of {len(ids)} tokens ({os.path.basename(model_dir)})", args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
