#!/usr/bin/python3
"""A small PyTorch training loop with moe_cpp's MoE layer, and the same loop with transformers'
Mixtral block (its per-expert loop, as bench/torch_layer.py writes it), from the same weights on
the same data: the losses side by side and the time per step of each, on this machine.

    PYTHONPATH=build/release/python /usr/bin/python3 examples/train_layer.py \
        [--tokens 2048] [--dim 512] [--ffn 1408] [--experts 8] [--top-k 2] [--steps 20] [-t 2]

The model: x -> MoE -> y, fit to a fixed random teacher (a tanh of a linear map) by mean squared
error with Adam; no balancing loss, so that both compute the same function.
"""
import argparse
import os
import statistics
import sys
import time

import torch

import moe_cpp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
from torch_layer import SparseMoeBlock  # noqa: E402  (transformers' Mixtral block)


def copy_weights(ours, theirs):
    """theirs <- ours: router and every expert's gate, up and down projections."""
    with torch.no_grad():
        theirs.gate.weight.copy_(ours.router_weight)
        for e, expert in enumerate(theirs.experts):
            expert.w1.weight.copy_(ours.experts_w_gate[e])
            expert.w3.weight.copy_(ours.experts_w_up[e])
            expert.w2.weight.copy_(ours.experts_w_down[e])


def train(layer, batches, targets, lr):
    opt = torch.optim.Adam(layer.parameters(), lr=lr)
    losses, times = [], []
    for x, want in zip(batches, targets):
        t0 = time.perf_counter()
        loss = torch.nn.functional.mse_loss(layer(x), want)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    return losses, times


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--ffn", type=int, default=1408)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("-t", "--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    moe_cpp.set_num_threads(a.threads)
    torch.manual_seed(0)
    ours = moe_cpp.MoeLayer(d_model=a.dim, d_ffn=a.ffn, n_experts=a.experts, top_k=a.top_k,
                            aux_loss_coef=0.0, z_loss_coef=0.0, seed=1)
    theirs = SparseMoeBlock(a.dim, a.ffn, a.experts, a.top_k)
    copy_weights(ours, theirs)
    teacher = torch.nn.Linear(a.dim, a.dim)
    batches = [torch.randn(a.tokens, a.dim) for _ in range(a.steps)]
    with torch.no_grad():
        targets = [torch.tanh(teacher(x)) for x in batches]
    with torch.no_grad():
        gap = float((ours(batches[0]) - theirs(batches[0])).abs().max())
    ours_loss, ours_t = train(ours, batches, targets, a.lr)
    theirs_loss, theirs_t = train(theirs, batches, targets, a.lr)
    skip = min(3, a.steps - 1)  # warm-up steps are not timed
    ms_ours = 1e3 * statistics.median(ours_t[skip:])
    ms_theirs = 1e3 * statistics.median(theirs_t[skip:])
    print(f"{a.tokens} tokens x D {a.dim}, {a.experts} experts of F {a.ffn}, top-{a.top_k}, "
          f"{a.threads} threads, torch {torch.__version__}")
    print(f"same weights: outputs within {gap:.2g} before training")
    print("step   moe_cpp loss   Mixtral block loss")
    for i in range(0, a.steps, max(1, a.steps // 10)):
        print(f"{i:4d}   {ours_loss[i]:.6f}       {theirs_loss[i]:.6f}")
    print(f"time per step (median after {skip}): moe_cpp {ms_ours:.1f} ms, transformers' "
          f"per-expert loop {ms_theirs:.1f} ms: {ms_theirs / ms_ours:.2f}x")
    worst = max(abs(o - t) / abs(t) for o, t in zip(ours_loss, theirs_loss))
    print(f"largest relative difference of the two losses over the steps: {worst:.2g}")
    if worst > 1e-3:  # the same function from the same weights: only float32's rounding differs
        sys.exit("the two training runs diverged")


if __name__ == "__main__":
    main()
