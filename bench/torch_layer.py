#!/usr/bin/python3
"""The PyTorch peer of `moe bench layer`: transformers' Mixtral sparse MoE block (softmax top-k,
renormalized, then a loop over the experts that gathers each expert's tokens with index_select
and adds its output back with index_add_), forward and forward+backward, medians after warm-up,
on the same shape and thread count; also PyTorch's dense SwiGLU FFN with the same active
multiply-adds, and its large-GEMM throughput. Prints one JSON object.

    /usr/bin/python3 bench/torch_layer.py --tokens 2048 --dim 512 --ffn 1408 --experts 8 --top-k 2 -t 2
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F


class Expert(torch.nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.w1 = torch.nn.Linear(d, f, bias=False)  # gate
        self.w3 = torch.nn.Linear(d, f, bias=False)  # up
        self.w2 = torch.nn.Linear(f, d, bias=False)  # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class SparseMoeBlock(torch.nn.Module):
    """transformers' MixtralSparseMoeBlock, without jitter."""

    def __init__(self, d, f, e, k):
        super().__init__()
        self.k = k
        self.gate = torch.nn.Linear(d, e, bias=False)
        self.experts = torch.nn.ModuleList(Expert(d, f) for _ in range(e))

    def forward(self, x):
        logits = self.gate(x)
        probs = F.softmax(logits, dim=1, dtype=torch.float)
        weights, selected = torch.topk(probs, self.k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        mask = F.one_hot(selected, num_classes=len(self.experts)).permute(2, 1, 0)
        for e, expert in enumerate(self.experts):
            slot, token = torch.where(mask[e])
            if token.numel() == 0:
                continue
            y = expert(x[token]) * weights[token, slot, None]
            out.index_add_(0, token, y)
        return out


class DenseFfn(torch.nn.Module):
    """A SwiGLU FFN of width k * F: the same multiply-adds per token as the MoE block's experts."""

    def __init__(self, d, f):
        super().__init__()
        self.ffn = Expert(d, f)

    def forward(self, x):
        return self.ffn(x)


def median_ms(fn, warmup, reps):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--ffn", type=int, default=1408)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("-t", "--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=10)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    block = SparseMoeBlock(a.dim, a.ffn, a.experts, a.top_k)
    x = torch.randn(a.tokens, a.dim)
    dy = torch.randn(a.tokens, a.dim)
    xg = x.clone().requires_grad_(True)

    def fwd():
        with torch.no_grad():
            block(x)

    def fwdbwd():
        block.zero_grad(set_to_none=False)
        xg.grad = None
        block(xg).backward(dy)

    dense = DenseFfn(a.dim, a.ffn * a.top_k)

    def dense_fwdbwd():
        dense.zero_grad(set_to_none=False)
        xg.grad = None
        dense(xg).backward(dy)

    n = 2048
    ga, gb = torch.randn(n, n), torch.randn(n, n)
    gemm_ms = median_ms(lambda: ga @ gb, 1, 5)
    out = {
        "torch_version": torch.__version__,
        "threads": a.threads,
        "tokens": a.tokens,
        "torch_fwd_ms": median_ms(fwd, a.warmup, a.reps),
        "torch_fwdbwd_ms": median_ms(fwdbwd, a.warmup, a.reps),
        "torch_dense_fwdbwd_ms": median_ms(dense_fwdbwd, a.warmup, a.reps),
        "torch_gemm_gflops": 2.0 * n**3 / gemm_ms / 1e6,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
