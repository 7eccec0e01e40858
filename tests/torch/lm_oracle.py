#!/usr/bin/env python3
"""lm_oracle.py: the PyTorch reference for the language model, written from docs/model.md alone.

For a few small models (dense, MoE in every layer, dense-then-MoE, MoE every other layer with a
shared expert and a capacity, one learning from a teacher's logits as distillation does, and one
with DeepSeek-V3's multi-token prediction modules) it computes in float64 with autograd the loss
of one batch, its parts (cross-entropy, balancing loss, z-loss, the cross-entropy against the
teacher, the MTP modules' mean cross-entropy) and the gradient of the loss with respect to
every parameter, and a 10-step torch.optim.AdamW trajectory from the same weights; it writes them
as JSON for test_lm_oracle.cpp to compare against. The MoE layer inside is moe_oracle.py's
(docs/routing.md), which moe_torch_tests already holds our layer to.

The float32 model is compared too, so every routing decision must sit far from its boundary:
a draw whose top-K and (K+1)-th router probabilities come closer than ROUTING_MARGIN (relative)
for any token of any MoE layer, in the first forward or at any step of the trajectory, is
re-drawn with the next seed.

Before writing, every case is checked against a second forward written as per-token loops
(attention, rotation, norms and cross-entropy element by element) and its gradient against
central finite differences along random directions. `--self-check` adds torch.autograd.gradcheck
on a tiny model (slow).

Usage: /usr/bin/python3 lm_oracle.py OUT.json [--self-check]
"""

import json
import math
import os
import sys

sys.dont_write_bytecode = True  # the import below must leave no cache in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from moe_oracle import Draws, full_config, moe_forward, tensor_json  # noqa: E402
from moe_oracle import param_shapes as moe_param_shapes  # noqa: E402

torch.set_default_dtype(torch.float64)

ROUTING_MARGIN = 1e-4  # relative gap between the K-th and (K+1)-th router probabilities
MAX_DRAWS = 200
WEIGHT_STD = 0.2  # every matrix N(0, 0.2^2): router logits of order 1, so wide margins
NORM_STD = 0.1  # norm weights 1 + N(0, 0.1^2)

ADAMW = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1}
ADAMW_STEPS = 10


def model_config(moe, **kw):
    cfg = {
        "vocab_size": 0,
        "d_model": 0,
        "n_layers": 0,
        "n_heads": 0,
        "n_kv_heads": 0,
        "head_dim": 0,
        "d_ffn": 0,
        "max_seq_len": 0,
        "rope_theta": 10000.0,
        "norm_eps": 1e-5,
        "tie_embeddings": False,
        "moe_every": 1,
        "first_dense": 0,
        "init_std": 0.02,
    }
    for k in kw:
        assert k in cfg or k in ("mtp_depth", "mtp_weight"), k
    cfg.update(kw)
    assert moe["d_model"] == cfg["d_model"]
    cfg["moe"] = moe
    return cfg


def head_size(cfg):
    return cfg["head_dim"] if cfg["head_dim"] > 0 else cfg["d_model"] // cfg["n_heads"]


def is_moe_layer(cfg, i):
    """Layer i (from 0) is MoE when i >= first_dense and (i + 1) % moe_every == 0."""
    return cfg["moe_every"] > 0 and i >= cfg["first_dense"] and (i + 1) % cfg["moe_every"] == 0


def param_table(cfg):
    """docs/model.md's parameter table: name -> (shape, weight decay), in the table's order."""
    V, D, L = cfg["vocab_size"], cfg["d_model"], cfg["n_layers"]
    H, KV, dh, Fd = cfg["n_heads"], cfg["n_kv_heads"], head_size(cfg), cfg["d_ffn"]
    table = {"embed.weight": ([V, D], True)}

    def block(i, p):
        table[p + "attn_norm.weight"] = ([D], False)
        table[p + "attn.wq"] = ([H * dh, D], True)
        table[p + "attn.wk"] = ([KV * dh, D], True)
        table[p + "attn.wv"] = ([KV * dh, D], True)
        table[p + "attn.wo"] = ([D, H * dh], True)
        table[p + "ffn_norm.weight"] = ([D], False)
        if is_moe_layer(cfg, i):
            for name, shape in moe_param_shapes(cfg["moe"]).items():
                table[p + "moe." + name] = (shape, True)
        else:
            table[p + "ffn.w_gate"] = ([Fd, D], True)
            table[p + "ffn.w_up"] = ([Fd, D], True)
            table[p + "ffn.w_down"] = ([D, Fd], True)

    for i in range(L):
        block(i, "layers.%d." % i)
    table["norm.weight"] = ([D], False)
    if not cfg["tie_embeddings"]:
        table["lm_head.weight"] = ([V, D], True)
    # multi-token prediction modules, numbered after the main layers (DeepSeek-V3's layout)
    for k in range(cfg.get("mtp_depth", 0)):
        p = "layers.%d." % (L + k)
        table[p + "enorm.weight"] = ([D], False)
        table[p + "hnorm.weight"] = ([D], False)
        table[p + "eh_proj.weight"] = ([D, 2 * D], True)
        block(L + k, p)
        table[p + "shared_head.norm.weight"] = ([D], False)
    return table


# ---- the model, vectorized ----


def rms_norm(x, g, eps):
    return x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps) * g


def rotate(x, theta):
    """Rotary embedding, "rotate half" layout, of x [B, T, heads, d_h] at positions 0..T-1."""
    T, dh = x.shape[1], x.shape[3]
    half = dh // 2
    inv = theta ** (-2.0 * torch.arange(half, dtype=torch.float64) / dh)  # theta_i
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None, :]  # [T, half]
    c, s = torch.cos(ang)[None, :, None, :], torch.sin(ang)[None, :, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def attention(cfg, P, p, a):
    """a [B, T, D] -> [B, T, D]: causal grouped-query attention with rotary embeddings."""
    B, T, _ = a.shape
    H, KV, dh = cfg["n_heads"], cfg["n_kv_heads"], head_size(cfg)
    q = (a @ P[p + "attn.wq"].T).view(B, T, H, dh)
    k = (a @ P[p + "attn.wk"].T).view(B, T, KV, dh)
    v = (a @ P[p + "attn.wv"].T).view(B, T, KV, dh)
    q, k = rotate(q, cfg["rope_theta"]), rotate(k, cfg["rope_theta"])
    group = torch.arange(H) // (H // KV)  # head h attends with KV head floor(h / (H / KV))
    k, v = k[:, :, group], v[:, :, group]
    s = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(dh)
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    s = s.masked_fill(future, -math.inf)
    o = torch.einsum("bhts,bshd->bthd", torch.softmax(s, dim=-1), v).reshape(B, T, H * dh)
    return o @ P[p + "attn.wo"].T


def dense_ffn(P, p, f):
    return (F.silu(f @ P[p + "ffn.w_gate"].T) * (f @ P[p + "ffn.w_up"].T)) @ P[p + "ffn.w_down"].T


def moe_ffn(cfg, P, p, f):
    """The MoE layer on the B*T tokens in row-major (b, t) order."""
    B, T, D = f.shape
    sub = {k[len(p + "moe."):]: v for k, v in P.items() if k.startswith(p + "moe.")}
    y, aux, z, info = moe_forward(cfg["moe"], sub, f.reshape(B * T, D), Draws([], []),
                                  True, None)
    return y.view(B, T, D), aux, z, info


def forward(cfg, P, tokens, ffn_override=None, soft=None):
    """tokens [B, T+1] -> (loss, ce, aux, z, routing, soft_ce): routing lists, per MoE layer,
    its decisions' margins and its per-expert counts. soft = (teacher logits [B, T, V], weight)
    mixes the teacher's distributions into the targets (distillation, docs/model.md): the loss
    then holds (1 - weight) ce + weight soft_ce, soft_ce the cross-entropy against them."""
    x, target = tokens[:, :-1], tokens[:, 1:]
    eps = cfg["norm_eps"]
    h = P["embed.weight"][x]
    aux = torch.zeros(())
    z = torch.zeros(())
    routing = []

    def block(i, h):
        nonlocal aux, z
        p = "layers.%d." % i
        h = h + attention(cfg, P, p, rms_norm(h, P[p + "attn_norm.weight"], eps))
        f = rms_norm(h, P[p + "ffn_norm.weight"], eps)
        if is_moe_layer(cfg, i):
            y, a_l, z_l, info = moe_ffn(cfg, P, p, f)
            aux, z = aux + a_l, z + z_l
            routing.append({"layer": i, "checks": info["checks"], "routed": info["routed"],
                            "kept": info["kept"], "capacity": info["capacity"],
                            "n_dropped": info["n_dropped"]})
        else:
            y = dense_ffn(P, p, f)
        return h + y

    L = cfg["n_layers"]
    for i in range(L):
        h = block(i, h)
    w_out = P["embed.weight"] if cfg["tie_embeddings"] else P["lm_head.weight"]
    hn = rms_norm(h, P["norm.weight"], eps)
    logits = hn @ w_out.T
    V = cfg["vocab_size"]
    ce = F.cross_entropy(logits.reshape(-1, V), target.reshape(-1))
    # Multi-token prediction (DeepSeek-V3 section 2.2, docs/model.md): module k reads the
    # previous representation at position i (the main model's after its final norm for k = 1)
    # and the embedding of token i + k, and predicts token i + k + 1, over i < T - k.
    depth, T = cfg.get("mtp_depth", 0), x.shape[1]
    mtp = torch.zeros(())
    prev = hn
    for k in range(1, depth + 1):
        p = "layers.%d." % (L + k - 1)
        Tk = T - k
        e = rms_norm(P["embed.weight"][tokens[:, k:k + Tk]], P[p + "enorm.weight"], eps)
        hk = rms_norm(prev[:, :Tk], P[p + "hnorm.weight"], eps)
        xk = torch.cat([e, hk], dim=-1) @ P[p + "eh_proj.weight"].T
        g = rms_norm(block(L + k - 1, xk), P[p + "shared_head.norm.weight"], eps)
        mtp = mtp + F.cross_entropy((g @ w_out.T).reshape(-1, V),
                                    tokens[:, k + 1:k + 1 + Tk].reshape(-1))
        prev = g
    if depth > 0:
        mtp = mtp / depth
    lam = cfg.get("mtp_weight", 0.0)
    if soft is None:
        return ce + aux + z + lam * mtp, ce, aux, z, routing, torch.zeros(()), mtp
    teacher, w = soft
    # torch's cross-entropy against class probabilities
    soft_ce = F.cross_entropy(logits.reshape(-1, V), F.softmax(teacher.reshape(-1, V), dim=-1))
    return (1 - w) * ce + w * soft_ce + aux + z + lam * mtp, ce, aux, z, routing, soft_ce, mtp


# ---- the same model as per-token loops, for the self-check ----


def forward_loops(cfg, P, tokens, soft=None):
    """The forward of docs/model.md written element by element (the MoE layer aside): the
    cross-check of forward()'s reshapes, head grouping, rotation and masking."""
    B, T1 = tokens.shape
    T = T1 - 1
    D, H, KV, dh = cfg["d_model"], cfg["n_heads"], cfg["n_kv_heads"], head_size(cfg)
    eps, theta = cfg["norm_eps"], cfg["rope_theta"]
    half = dh // 2

    def norm(vec, g):
        ms = sum(float(vec[d]) ** 2 for d in range(D)) / D
        return [float(vec[d]) / math.sqrt(ms + eps) * float(g[d]) for d in range(D)]

    def matvec(W, vec):
        return [sum(float(W[r, c]) * vec[c] for c in range(len(vec))) for r in range(W.shape[0])]

    def rot(vec, pos):
        out = list(vec)
        for i in range(half):
            ang = pos * theta ** (-2.0 * i / dh)
            c, s = math.cos(ang), math.sin(ang)
            out[i] = vec[i] * c - vec[i + half] * s
            out[i + half] = vec[i + half] * c + vec[i] * s
        return out

    P = {k: v.detach() for k, v in P.items()}
    h = [[[float(v) for v in P["embed.weight"][int(tokens[b, t])]] for t in range(T)]
         for b in range(B)]
    aux = z = 0.0
    for layer in range(cfg["n_layers"]):
        p = "layers.%d." % layer
        for b in range(B):
            a = [norm(h[b][t], P[p + "attn_norm.weight"]) for t in range(T)]
            q = [matvec(P[p + "attn.wq"], a[t]) for t in range(T)]
            k = [matvec(P[p + "attn.wk"], a[t]) for t in range(T)]
            v = [matvec(P[p + "attn.wv"], a[t]) for t in range(T)]
            for t in range(T):
                o = []
                for hd in range(H):
                    g = hd // (H // KV)
                    qh = rot(q[t][hd * dh:(hd + 1) * dh], t)
                    scores = []
                    for s in range(t + 1):  # causal: positions 0..t
                        kh = rot(k[s][g * dh:(g + 1) * dh], s)
                        scores.append(sum(qh[j] * kh[j] for j in range(dh)) / math.sqrt(dh))
                    m = max(scores)
                    e = [math.exp(sc - m) for sc in scores]
                    tot = sum(e)
                    o += [sum(e[s] / tot * v[s][g * dh + j] for s in range(t + 1))
                          for j in range(dh)]
                out = matvec(P[p + "attn.wo"], o)
                h[b][t] = [h[b][t][d] + out[d] for d in range(D)]
        f = [[norm(h[b][t], P[p + "ffn_norm.weight"]) for t in range(T)] for b in range(B)]
        if is_moe_layer(cfg, layer):
            y, a_l, z_l, _ = moe_ffn(cfg, P, p, torch.tensor(f))
            y = y.tolist()
            aux, z = aux + float(a_l), z + float(z_l)
        else:
            y = []
            for b in range(B):
                row = []
                for t in range(T):
                    gate = matvec(P[p + "ffn.w_gate"], f[b][t])
                    up = matvec(P[p + "ffn.w_up"], f[b][t])
                    hid = [gv / (1 + math.exp(-gv)) * uv for gv, uv in zip(gate, up)]
                    row.append(matvec(P[p + "ffn.w_down"], hid))
                y.append(row)
        h = [[[h[b][t][d] + y[b][t][d] for d in range(D)] for t in range(T)] for b in range(B)]
    w_out = P["embed.weight"] if cfg["tie_embeddings"] else P["lm_head.weight"]
    ce = soft_ce = 0.0
    for b in range(B):
        for t in range(T):
            logits = matvec(w_out, norm(h[b][t], P["norm.weight"]))
            m = max(logits)
            lse = m + math.log(sum(math.exp(lv - m) for lv in logits))
            ce += lse - logits[int(tokens[b, t + 1])]
            if soft is not None:
                tl = [float(v) for v in soft[0][b, t]]
                tm = max(tl)
                tsum = sum(math.exp(v - tm) for v in tl)
                soft_ce += sum(math.exp(tv - tm) / tsum * (lse - lv) for tv, lv in zip(tl, logits))
    ce /= B * T
    soft_ce /= B * T
    w = 0.0 if soft is None else soft[1]
    return (1 - w) * ce + w * soft_ce + aux + z, ce, aux, z, soft_ce


# ---- cases ----


def routing_margin(routing):
    """The smallest margin of any routing decision, or None without MoE layers."""
    margins = [m for r in routing for _, m in r["checks"]]
    return min(margins) if margins else None


def routing_problem(routing, where):
    for r in routing:
        for what, margin in r["checks"]:
            if margin < ROUTING_MARGIN:
                return "%s, layer %d: %s too close (%.3g)" % (where, r["layer"], what, margin)
    return None


def draw(cfg, B, T, seed):
    torch.manual_seed(seed)
    P = {}
    for name, (shape, decay) in param_table(cfg).items():
        if name.endswith("norm.weight"):
            P[name] = 1 + NORM_STD * torch.randn(*shape)
        else:
            P[name] = WEIGHT_STD * torch.randn(*shape)
    tokens = torch.randint(cfg["vocab_size"], (B, T + 1), dtype=torch.int64)
    return P, tokens


def adamw_trajectory(cfg, P0, tokens, soft=None):
    """Losses before each of ADAMW_STEPS full-batch AdamW steps and after the last one, with
    weight decay on the parameters whose table row says so; the routing margins of every
    forward. Returns (losses, problem or None)."""
    table = param_table(cfg)
    P = {k: v.detach().clone().requires_grad_(True) for k, v in P0.items()}
    groups = [
        {"params": [P[k] for k in P if table[k][1]], "weight_decay": ADAMW["weight_decay"]},
        {"params": [P[k] for k in P if not table[k][1]], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=ADAMW["lr"], betas=(ADAMW["beta1"], ADAMW["beta2"]),
                            eps=ADAMW["eps"])
    losses = []
    for step in range(ADAMW_STEPS + 1):
        opt.zero_grad()
        loss, _, _, _, routing, _, _ = forward(cfg, P, tokens, soft=soft)
        why = routing_problem(routing, "trajectory step %d" % step)
        if why is not None:
            return None, why
        losses.append(float(loss))
        if step < ADAMW_STEPS:
            loss.backward()
            opt.step()
    return losses, None


def check_against_loops(name, cfg, P, tokens, values, soft=None):
    """The main model's parts against the loops (the MTP modules are made of the same blocks,
    norms and head; their terms and gradients are held to the finite differences)."""
    if cfg.get("mtp_depth", 0) > 0:
        return
    ref = forward_loops(cfg, P, tokens, soft)
    for what, ours, theirs in zip(("loss", "ce_loss", "aux_loss", "z_loss", "soft_loss"), values,
                                  ref):
        assert abs(ours - theirs) <= 1e-12 * (1 + abs(theirs)), \
            "case %s: %s %.17g, per-token loops %.17g" % (name, what, ours, theirs)


def check_finite_differences(name, cfg, P, tokens, grads, seed, n_dirs=3, h=1e-6, soft=None):
    """Central differences of the loss along random unit directions against the gradient."""
    gen = torch.Generator().manual_seed(seed)
    keys = list(P)
    for _ in range(n_dirs):
        d = {k: torch.randn(P[k].shape, generator=gen) for k in keys}
        norm = math.sqrt(sum(float((v * v).sum()) for v in d.values()))
        d = {k: v / norm for k, v in d.items()}
        with torch.no_grad():
            plus = forward(cfg, {k: P[k] + h * d[k] for k in keys}, tokens, soft=soft)[0]
            minus = forward(cfg, {k: P[k] - h * d[k] for k in keys}, tokens, soft=soft)[0]
        fd = float(plus - minus) / (2 * h)
        ad = sum(float((grads[k] * d[k]).sum()) for k in keys)
        assert abs(fd - ad) <= 1e-7 * (1 + abs(ad)), \
            "case %s: directional derivative %.12g, finite differences %.12g" % (name, ad, fd)


def make_case(name, cfg, B, T, seed, require=None, soft_weight=None):
    """Draws seed, seed+1, ... until every routing margin holds in the first forward and along
    the trajectory, and `require` is met. soft_weight: a distillation case, with teacher logits
    N(0, 2^2) drawn after the weights."""
    assert T <= cfg["max_seq_len"] and head_size(cfg) % 2 == 0
    assert cfg["n_heads"] % cfg["n_kv_heads"] == 0
    why = None
    for attempt in range(MAX_DRAWS):
        s = seed + attempt
        P, tokens = draw(cfg, B, T, s)
        soft = None
        if soft_weight is not None:
            soft = (2.0 * torch.randn(B, T, cfg["vocab_size"]), soft_weight)
        with torch.no_grad():
            routing = forward(cfg, P, tokens, soft=soft)[4]
        why = routing_problem(routing, "first forward")
        if why is None and require is not None:
            why = require(routing)
        if why is None:
            losses, why = adamw_trajectory(cfg, P, tokens, soft)
        if why is None:
            break
    else:
        raise AssertionError("case %s: no fit draw in %d seeds: %s" % (name, MAX_DRAWS, why))

    for t in P.values():
        t.requires_grad_(True)
    loss, ce, aux, z, routing, soft_ce, mtp = forward(cfg, P, tokens, soft=soft)
    loss.backward()
    grads = {k: v.grad.detach().clone() for k, v in P.items()}
    values = (float(loss), float(ce), float(aux), float(z), float(soft_ce), float(mtp))
    assert values[0] == losses[0]
    check_against_loops(name, cfg, P, tokens, values, soft)
    check_finite_differences(name, cfg, {k: v.detach() for k, v in P.items()}, tokens, grads, s,
                             soft=soft)

    table = param_table(cfg)
    return {
        "name": name,
        "seed": s,
        "config": cfg,
        "tokens": tensor_json(tokens),
        "params": {k: tensor_json(v) for k, v in P.items()},
        "decay": {k: table[k][1] for k in P},
        "loss": values[0],
        "ce_loss": values[1],
        "aux_loss": values[2],
        "z_loss": values[3],
        "soft_loss": values[4],
        "mtp_loss": values[5],
        "grads": {k: tensor_json(v) for k, v in grads.items()},
        "routing": [{k: r[k] for k in ("layer", "routed", "kept", "capacity")} for r in routing],
        "min_routing_margin": routing_margin(routing),
        "adamw": dict(ADAMW, steps=ADAMW_STEPS, losses=losses),
        "soft_targets": None if soft is None else {"logits": tensor_json(soft[0]),
                                                   "weight": soft[1]},
    }


def require_drops(routing):
    return None if any(r["n_dropped"] > 0 for r in routing) else "no pair is dropped"


def build_cases():
    cases = []
    # 1. dense, untied, grouped-query attention (4 query heads on 2 KV heads, d_h = D / H = 4)
    moe1 = full_config(d_model=16, d_ffn=8, n_experts=4, top_k=2, act="swiglu")  # unused
    cases.append(make_case(
        "dense_gqa_untied",
        model_config(moe1, vocab_size=32, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2,
                     d_ffn=24, max_seq_len=16, moe_every=0),
        B=2, T=8, seed=11))
    # 2. MoE in every layer, tied embeddings, plain multi-head attention
    moe2 = full_config(d_model=8, d_ffn=6, n_experts=4, top_k=2, act="swiglu", renormalize=True,
                       aux_loss_coef=0.01, z_loss_coef=0.001)
    cases.append(make_case(
        "moe_every_layer_tied",
        model_config(moe2, vocab_size=24, d_model=8, n_layers=2, n_heads=2, n_kv_heads=2,
                     d_ffn=16, max_seq_len=8, tie_embeddings=True, moe_every=1),
        B=3, T=6, seed=21))
    # 3. layer 0 dense, layers 1 and 2 MoE; one KV head; H d_h = 16 != D = 12; small rope_theta
    #    (large angles) and a large norm_eps, so both show in the loss; Switch-style weights
    moe3 = full_config(d_model=12, d_ffn=5, n_experts=5, top_k=2, act="gelu", renormalize=False,
                       aux_loss_coef=0.02, z_loss_coef=0.002)
    cases.append(make_case(
        "first_dense_mqa_head_dim",
        model_config(moe3, vocab_size=40, d_model=12, n_layers=3, n_heads=4, n_kv_heads=1,
                     head_dim=4, d_ffn=20, max_seq_len=12, rope_theta=100.0, norm_eps=1e-2,
                     moe_every=1, first_dense=1),
        B=3, T=5, seed=31))
    # 4. MoE every other layer (layer 1 of 0..2), a shared expert, capacity factor 1 that drops
    moe4 = full_config(d_model=12, d_ffn=6, n_experts=4, top_k=2, act="swiglu", n_shared=1,
                       d_shared_ffn=8, capacity_factor=1.0, drop_policy="position")
    cases.append(make_case(
        "moe_every_2_shared_capacity",
        model_config(moe4, vocab_size=28, d_model=12, n_layers=3, n_heads=3, n_kv_heads=3,
                     d_ffn=18, max_seq_len=7, moe_every=2),
        B=2, T=7, seed=41, require=require_drops))
    # 5. distillation: case 3's model learning from a teacher's distributions, weight 0.25
    #    (Switch Transformer section 5)
    cases.append(make_case(
        "distilled_soft_targets",
        model_config(moe3, vocab_size=40, d_model=12, n_layers=3, n_heads=4, n_kv_heads=1,
                     head_dim=4, d_ffn=20, max_seq_len=12, rope_theta=100.0, norm_eps=1e-2,
                     moe_every=1, first_dense=1),
        B=2, T=6, seed=51, soft_weight=0.25))
    # 6. multi-token prediction: two modules (the first dense, the second MoE as block 3 of a
    #    model whose odd blocks are MoE), weight 0.5, untied head
    cases.append(make_case(
        "mtp_two_modules",
        model_config(moe4, vocab_size=28, d_model=12, n_layers=2, n_heads=3, n_kv_heads=3,
                     d_ffn=18, max_seq_len=7, moe_every=2, mtp_depth=2, mtp_weight=0.5),
        B=2, T=7, seed=61))
    return cases


def self_check():
    """torch.autograd.gradcheck of the loss with respect to every parameter of a tiny model
    with a dense and an MoE layer (the routing margins keep the decisions fixed)."""
    moe = full_config(d_model=8, d_ffn=3, n_experts=3, top_k=2, act="swiglu", n_shared=1,
                      capacity_factor=1.0, aux_loss_coef=0.1, z_loss_coef=0.01)
    cfg = model_config(moe, vocab_size=10, d_model=8, n_layers=2, n_heads=2, n_kv_heads=1,
                       d_ffn=4, max_seq_len=4, rope_theta=50.0, moe_every=2)
    for s in range(1000, 1000 + MAX_DRAWS):
        P, tokens = draw(cfg, 2, 4, s)
        with torch.no_grad():
            if routing_problem(forward(cfg, P, tokens)[4], "gradcheck") is None:
                break
    names = list(P)

    def loss_of(*values):
        return forward(cfg, dict(zip(names, values)), tokens)[0]

    inputs = tuple(P[k].clone().requires_grad_(True) for k in names)
    assert torch.autograd.gradcheck(loss_of, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)
    print("gradcheck: %d parameters, %d values" % (len(names), sum(t.numel() for t in inputs)))


def main():
    args = [a for a in sys.argv[1:] if a != "--self-check"]
    if len(args) != 1:
        sys.exit("usage: lm_oracle.py OUT.json [--self-check]")
    if "--self-check" in sys.argv[1:]:
        self_check()
    cases = build_cases()
    names = [c["name"] for c in cases]
    assert len(set(names)) == len(names)
    with open(args[0], "w") as f:
        json.dump({"torch_version": torch.__version__, "cases": cases}, f)


if __name__ == "__main__":
    main()
