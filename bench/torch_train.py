#!/usr/bin/python3
"""The PyTorch peer of `moe bench train`: the same decoder-only MoE language model (docs/model.md:
RMSNorm, rotary grouped-query attention, SwiGLU experts behind a softmax top-k router as in
transformers' Mixtral block, the Switch balancing loss and the z-loss), the same shape and batch,
trained with torch.optim.AdamW and gradient clipping. Prints tokens per second (the median step)
as one JSON object.

    /usr/bin/python3 bench/torch_train.py [--preset small] [--batch 16] [--seq-len 128] [-t 2]
"""
import argparse
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F

PRESETS = {  # d_model, layers, heads, kv_heads, experts, top_k, expert_ffn, vocab
    "tiny": (64, 2, 4, 2, 4, 2, 128, 259),
    "small": (128, 4, 4, 2, 8, 2, 256, 259),
}


class RMSNorm(torch.nn.Module):
    def __init__(self, d, eps=1e-5):
        super().__init__()
        self.g = torch.nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.g


def rope(x, cos, sin):  # x [B, T, H, hd], rotate-half layout
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Attention(torch.nn.Module):
    def __init__(self, d, heads, kv):
        super().__init__()
        self.h, self.kv, self.hd = heads, kv, d // heads
        self.wq = torch.nn.Linear(d, heads * self.hd, bias=False)
        self.wk = torch.nn.Linear(d, kv * self.hd, bias=False)
        self.wv = torch.nn.Linear(d, kv * self.hd, bias=False)
        self.wo = torch.nn.Linear(heads * self.hd, d, bias=False)

    def forward(self, x, cos, sin, mask):
        B, T, _ = x.shape
        q = rope(self.wq(x).view(B, T, self.h, self.hd), cos, sin)
        k = rope(self.wk(x).view(B, T, self.kv, self.hd), cos, sin)
        v = self.wv(x).view(B, T, self.kv, self.hd)
        rep = self.h // self.kv
        k = k.repeat_interleave(rep, dim=2)
        v = v.repeat_interleave(rep, dim=2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        s = (q @ k.transpose(-1, -2)) / math.sqrt(self.hd) + mask
        o = F.softmax(s, dim=-1) @ v
        return self.wo(o.transpose(1, 2).reshape(B, T, -1))


class Expert(torch.nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.w1 = torch.nn.Linear(d, f, bias=False)
        self.w3 = torch.nn.Linear(d, f, bias=False)
        self.w2 = torch.nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoE(torch.nn.Module):
    """transformers' Mixtral block, plus the Switch balancing loss and the z-loss."""

    def __init__(self, d, f, e, k, aux=0.01, z=0.001):
        super().__init__()
        self.k, self.e, self.aux, self.z = k, e, aux, z
        self.gate = torch.nn.Linear(d, e, bias=False)
        self.experts = torch.nn.ModuleList(Expert(d, f) for _ in range(e))

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.gate(x)
        probs = F.softmax(logits, dim=-1)
        w, sel = torch.topk(probs, self.k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        mask = F.one_hot(sel, self.e).permute(2, 1, 0)
        for i, expert in enumerate(self.experts):
            slot, tok = torch.where(mask[i])
            if tok.numel():
                out.index_add_(0, tok, expert(x[tok]) * w[tok, slot, None])
        frac = mask.sum(dim=(1, 2)).float() / (x.shape[0] * self.k)
        loss = self.aux * self.e * (frac * probs.mean(0)).sum()
        loss = loss + self.z * torch.logsumexp(logits, -1).pow(2).mean()
        return out.view(shape), loss


class Model(torch.nn.Module):
    def __init__(self, d, layers, heads, kv, e, k, f, vocab, seq):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d)
        self.blocks = torch.nn.ModuleList()
        for _ in range(layers):
            self.blocks.append(torch.nn.ModuleDict({
                "n1": RMSNorm(d), "attn": Attention(d, heads, kv), "n2": RMSNorm(d),
                "moe": MoE(d, f, e, k)}))
        self.norm = RMSNorm(d)
        self.head = torch.nn.Linear(d, vocab, bias=False)
        hd = d // heads
        inv = 10000.0 ** (-torch.arange(0, hd // 2).float() * 2 / hd)
        ang = torch.arange(seq).float()[:, None] * inv[None, :]
        self.register_buffer("cos", ang.cos()[None, :, None, :])
        self.register_buffer("sin", ang.sin()[None, :, None, :])
        self.register_buffer("mask", torch.full((seq, seq), float("-inf")).triu(1))

    def forward(self, tokens):
        x, y = tokens[:, :-1], tokens[:, 1:]
        T = x.shape[1]
        h = self.embed(x)
        extra = 0.0
        for b in self.blocks:
            h = h + b["attn"](b["n1"](h), self.cos[:, :T], self.sin[:, :T], self.mask[:T, :T])
            m, l = b["moe"](b["n2"](h))
            h = h + m
            extra = extra + l
        logits = self.head(self.norm(h))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)) + extra


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="small", choices=sorted(PRESETS))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("-t", "--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    d, layers, heads, kv, e, k, f, vocab = PRESETS[a.preset]
    model = Model(d, layers, heads, kv, e, k, f, vocab, a.seq_len)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(1)
    times = []
    for step in range(a.warmup + a.steps):
        tokens = torch.randint(0, vocab, (a.batch, a.seq_len + 1), generator=g)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = model(tokens)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step >= a.warmup:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    print(json.dumps({"torch_version": torch.__version__, "threads": a.threads,
                      "preset": a.preset, "batch": a.batch, "seq_len": a.seq_len,
                      "torch_step_ms": step_s * 1e3,
                      "torch_tokens_per_s": a.batch * a.seq_len / step_s,
                      "final_loss": float(loss)}))


if __name__ == "__main__":
    main()
