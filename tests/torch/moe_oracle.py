#!/usr/bin/env python3
"""moe_oracle.py: the PyTorch reference for the MoE layer, written from the math alone.

Computes, in float64 with autograd, the forward output, the two balancing losses and every
gradient of the objective L = sum(y * dy) + d_aux * aux + d_z * z for a list of small cases, and
writes them as JSON for test_torch_oracle.cpp to compare against. Every routing method of
docs/routing.md is here, written from that document and the papers it cites. The random draws of
the training-mode methods (jitter, noisy top-k, GShard's second-expert sampling, exploration) are
drawn here and written with the case; the layer replays them (MoeLayer::set_noise).

Usage: /usr/bin/python3 moe_oracle.py OUT.json
"""

import json
import math
import sys

import torch
import torch.nn.functional as F

torch.set_default_dtype(torch.float64)

# The float32 layer is compared too, so every discrete decision (which experts win, which pairs
# an expert over capacity keeps, which ReLU units fire) must sit far enough from its boundary
# that float32 rounding cannot flip it. A case whose draw comes closer is re-drawn.
ROUTING_MARGIN = 1e-4  # relative gap between the deciding scores (or draw and threshold)
RELU_MARGIN = 1e-4  # |pre-activation| of every ReLU unit that contributes
MAX_DRAWS = 200

DEFAULTS = {
    "expert_bias": False,
    "renormalize": True,
    "n_shared": 0,
    "d_shared_ffn": 0,
    "shared_gate": False,
    "capacity_factor": 0.0,
    "drop_policy": "position",
    "aux_loss_coef": 0.01,
    "z_loss_coef": 0.001,
    "device_aux_loss_coef": 0.0,
    "n_devices": 0,
    "global_balance": False,
    "router": "topk",
    "jitter_eps": 0.0,
    "explore_prob": 0.0,
    "freeze_router": False,
    "frozen_experts": [],
    "capacity_group": 0,
    "hme_groups": 0,
    "hme_group_k": 0,
    "hme_expert_k": 0,
    "n_group": 1,
    "topk_group": 1,
    "routed_scaling_factor": 1.0,
    "bias_update_rate": 0.001,
    "seq_len": 0,
}


def full_config(**kw):
    cfg = dict(DEFAULTS)
    cfg.update(kw)
    return cfg


def fine_grained(cfg, m):
    """DeepSeekMoE segmentation: each expert of width F becomes m experts of width F/m, and each
    token picks m*K of them; shared experts split the same way."""
    shared_width = cfg["d_shared_ffn"] if cfg["d_shared_ffn"] > 0 else cfg["d_ffn"]
    assert cfg["d_ffn"] % m == 0
    assert cfg["n_shared"] == 0 or shared_width % m == 0
    out = dict(cfg)
    out["n_experts"] = cfg["n_experts"] * m
    out["top_k"] = cfg["top_k"] * m
    out["d_ffn"] = cfg["d_ffn"] // m
    out["n_shared"] = cfg["n_shared"] * m
    out["d_shared_ffn"] = shared_width // m if cfg["n_shared"] > 0 else 0
    return out


def router_rows(cfg):
    """Rows of the router weight: 2E for noisy top-k (gate, then noise), G + E for the
    hierarchical router (group gates, then experts), E otherwise."""
    E = cfg["n_experts"]
    if cfg["router"] == "noisy_topk":
        return 2 * E
    if cfg["router"] == "hierarchical":
        return cfg["hme_groups"] + E
    return E


def param_shapes(cfg):
    D, F_, E = cfg["d_model"], cfg["d_ffn"], cfg["n_experts"]
    swiglu = cfg["act"] == "swiglu"
    bias = cfg["expert_bias"]
    shapes = {"router.weight": [router_rows(cfg), D]}

    def experts(prefix, X, W):
        if swiglu:
            shapes[prefix + ".w_gate"] = [X, W, D]
        shapes[prefix + ".w_up"] = [X, W, D]
        shapes[prefix + ".w_down"] = [X, D, W]
        if bias:
            if swiglu:
                shapes[prefix + ".b_gate"] = [X, W]
            shapes[prefix + ".b_up"] = [X, W]
            shapes[prefix + ".b_down"] = [X, D]

    experts("experts", E, F_)
    S = cfg["n_shared"]
    if S > 0:
        experts("shared", S, cfg["d_shared_ffn"] if cfg["d_shared_ffn"] > 0 else F_)
        if cfg["shared_gate"]:
            shapes["shared.gate"] = [1, D]
    return shapes


def ffn_all(cfg, prefix, P, x):
    """Every expert of one kind applied to every token: returns out [N, X, D] and the
    pre-activations [N, X, W] that decide ReLU units (None for smooth activations)."""
    bias = cfg["expert_bias"]
    up = torch.einsum("nd,xwd->nxw", x, P[prefix + ".w_up"])
    if bias:
        up = up + P[prefix + ".b_up"][None]
    relu_pre = None
    if cfg["act"] == "swiglu":
        gate = torch.einsum("nd,xwd->nxw", x, P[prefix + ".w_gate"])
        if bias:
            gate = gate + P[prefix + ".b_gate"][None]
        h = F.silu(gate) * up
    elif cfg["act"] == "relu":
        h = torch.relu(up)
        relu_pre = up
    elif cfg["act"] == "gelu":
        h = F.gelu(up)  # the exact erf form
    else:
        raise ValueError(cfg["act"])
    out = torch.einsum("nxw,xdw->nxd", h, P[prefix + ".w_down"])
    if bias:
        out = out + P[prefix + ".b_down"][None]
    return out, relu_pre


# ---- random draws ----


class Draws:
    """The routing noise of one forward: fixed lists consumed in order, as the layer replays
    them (MoeLayer::set_noise)."""

    def __init__(self, normal, uniform):
        self.lists = {"normal": normal, "uniform": uniform}
        self.used = {"normal": 0, "uniform": 0}

    def take(self, kind, n):
        i = self.used[kind]
        assert i + n <= len(self.lists[kind]), "not enough %s draws" % kind
        self.used[kind] = i + n
        return self.lists[kind][i:i + n].clone()

    def uniform(self, n):
        return self.take("uniform", n)

    def normal(self, n):
        return self.take("normal", n)


def draw_counts(cfg, N, training):
    """How many (normal, uniform) draws one forward makes: the doc's list per method."""
    if not training:
        return 0, 0
    E, K, D = cfg["n_experts"], cfg["top_k"], cfg["d_model"]
    normal = N * E if cfg["router"] == "noisy_topk" else 0
    uniform = 0
    if cfg["jitter_eps"] > 0:
        uniform += N * D
    if cfg["router"] == "gshard":
        uniform += N
    if cfg["explore_prob"] > 0 and cfg["router"] in ("topk", "switch"):
        uniform += 2 * N * K
    return normal, uniform


# ---- margins: how far a decision sits from its boundary ----


def rel_gap(a, b):
    """Relative gap of two positive scores, a >= b (probabilities)."""
    return (a - b) / a


def abs_gap(a, b):
    """Gap of two scores of either sign, relative to their size but at least to 1."""
    return (a - b) / max(1.0, abs(a), abs(b))


def to_float_list(t):
    return [float(v) for v in t]


# ---- the routers: logits l [N, R] -> pairs (token, expert, slot), weights, losses ----
#
# Each returns a dict: tok, exp, slot (python ints, one per pair, grouped by token), w (the
# differentiable weight of every pair), score (the priority for dropping by score), aux, z,
# checks (name, margin) of every discrete decision, K (the nominal pairs per token, for the
# capacity) and anything a case inspects.


# The router z-loss (ST-MoE) is the squared log-partition of a softmax over router logits, so
# it applies where the probabilities are softmax(l): top-k, Switch, GShard, expert choice, soft
# gating and both levels of the hierarchical router. Noisy top-k (its softmax is over the noisy
# top K only) and DeepSeek-V3 (sigmoid gates) have none, as in their papers; docs/routing.md
# says "the z-loss applies" for expert choice, soft and hierarchical and is silent on the rest.
def z_loss(cfg, l):
    return cfg["z_loss_coef"] * (torch.logsumexp(l, dim=1) ** 2).mean()


def pairs_from_idx(idx, w, score):
    N, K = idx.shape
    tok = [t for t in range(N) for _ in range(K)]
    slot = [j for _ in range(N) for j in range(K)]
    return tok, idx.flatten().tolist(), slot, w.flatten(), score.flatten()


def route_topk(cfg, l, draws, training, bias, prior=None):
    """Softmax top-k (Shazeer 2017 without noise, Switch, Mixtral), with exploration. prior =
    (counts [E], tokens) of the step's earlier micro-batches, which global_balance adds to f."""
    N, E = l.shape
    K = cfg["top_k"]
    if cfg["router"] == "switch":
        assert K == 1 and not cfg["renormalize"], "switch: K = 1, no renormalization"
    p = torch.softmax(l, dim=1)
    pd = p.detach()
    order = torch.sort(pd, dim=1, descending=True, stable=True).indices
    idx = order[:, :K].clone()
    checks = []
    if K < E:
        s = pd.gather(1, order)
        gap = (s[:, K - 1] - s[:, K]) / s[:, K - 1]
        checks.append(("K-th and (K+1)-th probabilities", float(gap.min())))
    explored = 0
    # picks that would differ had the unused experts been counted from the original top K (a
    # later slot then sees the earlier slots' replacements, and never picks one twice)
    sequential_matters = 0
    q = cfg["explore_prob"]
    if training and q > 0:
        # 2NK uniforms: every slot's deciding u, then every slot's pick r
        u = draws.uniform(N * K)
        r = draws.uniform(N * K)
        for t in range(N):
            for j in range(K):
                k = t * K + j
                checks.append(("exploration draw u at its probability", abs(float(u[k]) - q) / q))
                if float(u[k]) < q:
                    # the unused experts now, with this slot's current expert still in use
                    used = set(idx[t].tolist())
                    unused = [e for e in range(E) if e not in used]
                    assert len(unused) == E - K
                    v = float(r[k]) * (E - K)
                    near = round(v)
                    if 1 <= near <= E - K - 1:
                        checks.append(("exploration pick r at an index boundary", abs(v - near)))
                    idx[t, j] = unused[int(math.floor(v))]
                    explored += 1
                    original = set(order[t, :K].tolist())
                    unused_orig = [e for e in range(E) if e not in original]
                    sequential_matters += unused_orig[int(math.floor(v))] != int(idx[t, j])
    psel = p.gather(1, idx)
    w = psel / psel.sum(dim=1, keepdim=True) if cfg["renormalize"] else psel
    counts, tokens = torch.bincount(idx.flatten(), minlength=E).to(l.dtype), N
    if cfg["global_balance"] and training and prior is not None:
        counts, tokens = counts + torch.tensor(prior[0], dtype=l.dtype), tokens + prior[1]
    f = counts / (tokens * K)
    aux = cfg["aux_loss_coef"] * E * (f * p.mean(dim=0)).sum()
    if cfg["device_aux_loss_coef"] > 0:
        # DeepSeek-V2 eq. 14-16: f'_d = mean of the group's f_i (f_i = E / (K N) * count_i),
        # P'_d = sum of the group's mean probabilities
        D = cfg["n_devices"]
        fd = (E * f).reshape(D, E // D).mean(dim=1)
        pdv = p.mean(dim=0).reshape(D, E // D).sum(dim=1)
        aux = aux + cfg["device_aux_loss_coef"] * (fd * pdv).sum()
    tok, exp, slot, w, score = pairs_from_idx(idx, w, pd.gather(1, idx))
    return {"tok": tok, "exp": exp, "slot": slot, "w": w, "score": score, "aux": aux,
            "z": z_loss(cfg, l), "checks": checks, "K": K, "explored": explored,
            "sequential_matters": sequential_matters}


def normal_cdf(v):
    return 0.5 * (1 + torch.erf(v / math.sqrt(2)))


def cv_squared(v):
    return v.var(unbiased=False) / (v.mean() ** 2 + 1e-10)


def route_noisy_topk(cfg, l, draws, training, bias):
    """Noisy top-k gating, Shazeer et al. 2017, section 2.1 and appendix A."""
    N = l.shape[0]
    E, K = cfg["n_experts"], cfg["top_k"]
    assert l.shape[1] == 2 * E and K < E
    c, n = l[:, :E], l[:, E:]
    sigma = F.softplus(n)
    if training:
        eps = draws.normal(N * E).view(N, E)
    else:
        eps = torch.zeros(N, E)
    H = c + eps * sigma
    Hd = H.detach()
    order = torch.sort(Hd, dim=1, descending=True, stable=True).indices
    idx = order[:, :K]
    s = Hd.gather(1, order)
    checks = [("K-th and (K+1)-th noisy logits H",
               min(abs_gap(float(s[t, K - 1]), float(s[t, K])) for t in range(N)))]
    G = torch.softmax(H.gather(1, idx), dim=1)  # softmax over the top K only
    importance = torch.zeros(N, E).scatter(1, idx, G).sum(dim=0)
    in_top = torch.zeros(N, E, dtype=torch.bool).scatter(1, idx, True)
    kth = H.gather(1, order[:, K - 1:K])  # K-th largest H_t
    k1th = H.gather(1, order[:, K:K + 1])  # (K+1)-th largest H_t
    theta = torch.where(in_top, k1th, kth)  # the K-th largest excluding i
    load = normal_cdf((c - theta) / sigma).sum(dim=0)
    aux = cfg["aux_loss_coef"] * (cv_squared(importance) + cv_squared(load))
    tok, exp, slot, w, score = pairs_from_idx(idx, G, G.detach())
    return {"tok": tok, "exp": exp, "slot": slot, "w": w, "score": score, "aux": aux,
            "z": torch.zeros(()), "checks": checks, "K": K}  # no z-loss: see z_loss()


def route_gshard(cfg, l, draws, training, bias):
    """GShard top-2, Lepikhin et al. 2021, Algorithm 1."""
    N, E = l.shape
    assert cfg["top_k"] == 2 and E >= 2
    p = torch.softmax(l, dim=1)
    pd = p.detach()
    order = torch.sort(pd, dim=1, descending=True, stable=True).indices
    s = pd.gather(1, order)
    checks = [("first and second probabilities", float(((s[:, 0] - s[:, 1]) / s[:, 0]).min()))]
    if E > 2:
        checks.append(("second and third probabilities",
                       float(((s[:, 1] - s[:, 2]) / s[:, 1]).min())))
    e1, e2 = order[:, 0], order[:, 1]
    p1, p2 = p.gather(1, e1[:, None])[:, 0], p.gather(1, e2[:, None])[:, 0]
    w1, w2 = p1 / (p1 + p2), p2 / (p1 + p2)
    second = [True] * N
    if training:
        u = draws.uniform(N)
        for t in range(N):
            thr = 2 * float(w2[t])
            checks.append(("sampling draw u at 2 w2", abs(float(u[t]) - thr) / thr))
            second[t] = float(u[t]) < thr
    tok, exp, slot, ws, score = [], [], [], [], []
    for t in range(N):
        tok.append(t), exp.append(int(e1[t])), slot.append(0), ws.append(w1[t])
        score.append(float(pd[t, e1[t]]))
        if second[t]:
            tok.append(t), exp.append(int(e2[t])), slot.append(1), ws.append(w2[t])
            score.append(float(pd[t, e2[t]]))
    # the auxiliary loss per group, top-1 choices only, averaged over the groups
    terms = []
    for g0, g1 in groups(cfg, N):
        S_g = g1 - g0
        c = torch.bincount(e1[g0:g1], minlength=E).to(l.dtype)
        m = p[g0:g1].mean(dim=0)
        terms.append(E * ((c / S_g) * m).sum())
    aux = cfg["aux_loss_coef"] * torch.stack(terms).mean()
    return {"tok": tok, "exp": exp, "slot": slot, "w": torch.stack(ws),
            "score": torch.tensor(score), "aux": aux, "z": z_loss(cfg, l), "checks": checks,
            "K": 2, "unsampled": second.count(False)}


def route_expert_choice(cfg, l, draws, training, bias):
    """Expert choice, Zhou et al. 2022, section 3.1: each expert takes its C best tokens."""
    N, E = l.shape
    cf = cfg["capacity_factor"]
    assert cf > 0
    C = min(N, math.ceil(N * cf / E))
    S = torch.softmax(l, dim=1)
    Sd = S.detach()
    chosen = torch.zeros(N, E, dtype=torch.bool)
    checks = []
    for i in range(E):
        order = torch.sort(Sd[:, i], descending=True, stable=True).indices  # ties: lower token
        chosen[order[:C], i] = True
        if C < N:
            a, b = float(Sd[order[C - 1], i]), float(Sd[order[C], i])
            checks.append(("C-th and (C+1)-th scores of an expert", rel_gap(a, b)))
    tok, exp, slot, ws = [], [], [], []
    for t in range(N):
        j = 0
        for i in range(E):
            if chosen[t, i]:
                tok.append(t), exp.append(i), slot.append(j), ws.append(S[t, i])
                j += 1
    w = torch.stack(ws)
    return {"tok": tok, "exp": exp, "slot": slot, "w": w, "score": w.detach(),
            "aux": torch.zeros(()), "z": z_loss(cfg, l), "checks": checks, "K": None,
            "tokens_per_expert": C}


def route_soft(cfg, l, draws, training, bias):
    """Dense soft gating, Jacobs et al. 1991: every expert on every token."""
    N, E = l.shape
    p = torch.softmax(l, dim=1)
    idx = torch.arange(E)[None].expand(N, E)
    tok, exp, slot, w, score = pairs_from_idx(idx, p, p.detach())
    return {"tok": tok, "exp": exp, "slot": slot, "w": w, "score": score,
            "aux": torch.zeros(()), "z": z_loss(cfg, l), "checks": [], "K": E}


def route_hierarchical(cfg, l, draws, training, bias):
    """Two-level hierarchical mixture of experts, Jordan and Jacobs 1994."""
    N = l.shape[0]
    E, G = cfg["n_experts"], cfg["hme_groups"]
    assert G > 0 and E % G == 0 and l.shape[1] == G + E
    M = E // G
    gl, el = l[:, :G], l[:, G:].reshape(N, G, M)
    q = torch.softmax(gl, dim=1)
    r = torch.softmax(el, dim=2)
    qd, rd = q.detach(), r.detach()
    gk = cfg["hme_group_k"] if cfg["hme_group_k"] > 0 else G
    ek = cfg["hme_expert_k"] if cfg["hme_expert_k"] > 0 else M
    renorm = cfg["renormalize"]
    checks = []
    tok, exp, slot, ws = [], [], [], []
    for t in range(N):
        gorder = torch.sort(qd[t], descending=True, stable=True).indices
        if gk < G:
            checks.append(("gk-th and (gk+1)-th group probabilities",
                           rel_gap(float(qd[t, gorder[gk - 1]]), float(qd[t, gorder[gk]]))))
        kept_groups = sorted(gorder[:gk].tolist())
        qsum = q[t, kept_groups].sum()
        j = 0
        for g in kept_groups:
            eorder = torch.sort(rd[t, g], descending=True, stable=True).indices
            if ek < M:
                checks.append(("ek-th and (ek+1)-th expert probabilities in a group",
                               rel_gap(float(rd[t, g, eorder[ek - 1]]),
                                       float(rd[t, g, eorder[ek]]))))
            kept_experts = sorted(eorder[:ek].tolist())
            rsum = r[t, g, kept_experts].sum()
            wq = q[t, g] / qsum if renorm else q[t, g]
            for m in kept_experts:
                wr = r[t, g, m] / rsum if renorm else r[t, g, m]
                tok.append(t), exp.append(g * M + m), slot.append(j), ws.append(wq * wr)
                j += 1
    # the z-loss of both levels: the root's softmax and every group's softmax
    lse2 = torch.logsumexp(gl, dim=1) ** 2 + (torch.logsumexp(el, dim=2) ** 2).sum(dim=1)
    z = cfg["z_loss_coef"] * lse2.mean()
    w = torch.stack(ws)
    return {"tok": tok, "exp": exp, "slot": slot, "w": w, "score": w.detach(),
            "aux": torch.zeros(()), "z": z, "checks": checks, "K": None}


def deepseek_select(cfg, sb):
    """DeepSeek-V3's group-limited top-K of the biased affinities sb [N, E]: idx [N, K] and
    the margins of the decisions."""
    N, E = sb.shape
    K, ng, tg = cfg["top_k"], cfg["n_group"], cfg["topk_group"]
    checks = []
    masked = sb
    if ng > 1:
        assert E % ng == 0 and E // ng >= 2 and tg < ng
        gscore = sb.view(N, ng, E // ng).topk(2, dim=2).values.sum(dim=2)  # [N, ng]
        gorder = torch.sort(gscore, dim=1, descending=True, stable=True).indices
        gs = gscore.gather(1, gorder)
        checks.append(("topk_group-th and next group scores",
                       min(abs_gap(float(gs[t, tg - 1]), float(gs[t, tg])) for t in range(N))))
        keep = torch.zeros(N, ng, dtype=torch.bool).scatter(1, gorder[:, :tg], True)
        keep = keep[:, :, None].expand(N, ng, E // ng).reshape(N, E)
        masked = sb.masked_fill(~keep, -math.inf)
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices
    ms = masked.gather(1, order)
    for t in range(N):
        if K < E and math.isfinite(float(ms[t, K])):  # -inf: the kept groups hold just K
            checks.append(("K-th and (K+1)-th s + b", abs_gap(float(ms[t, K - 1]),
                                                               float(ms[t, K]))))
    return order[:, :K], checks


def route_deepseek(cfg, l, draws, training, bias):
    """DeepSeek-V3, section 2.1.2: sigmoid affinities, bias-steered group-limited top-K,
    scaled weights and the sequence-wise balance loss."""
    N, E = l.shape
    K = cfg["top_k"]
    s = torch.sigmoid(l)
    sd = s.detach()
    idx, checks = deepseek_select(cfg, sd + bias[None])
    idx_nobias, _ = deepseek_select(cfg, sd)
    ssel = s.gather(1, idx)
    w = ssel / ssel.sum(dim=1, keepdim=True) if cfg["renormalize"] else ssel
    w = cfg["routed_scaling_factor"] * w
    T = cfg["seq_len"] if cfg["seq_len"] > 0 else N
    assert N % T == 0
    terms = []
    for t0 in range(0, N, T):
        ss = s[t0:t0 + T]
        Pi = (ss / ss.sum(dim=1, keepdim=True)).mean(dim=0)
        f = (E / (K * T)) * torch.bincount(idx[t0:t0 + T].flatten(), minlength=E).to(l.dtype)
        terms.append((f * Pi).sum())
    aux = cfg["aux_loss_coef"] * torch.stack(terms).mean()
    tok, exp, slot, w, score = pairs_from_idx(idx, w, sd.gather(1, idx))
    return {"tok": tok, "exp": exp, "slot": slot, "w": w, "score": score, "aux": aux,
            "z": torch.zeros(()), "checks": checks, "K": K,  # no z-loss: see z_loss()
            "bias_changes_selection": not bool((idx == idx_nobias).all())}


ROUTERS = {
    "topk": route_topk,
    "switch": route_topk,
    "noisy_topk": route_noisy_topk,
    "gshard": route_gshard,
    "expert_choice": route_expert_choice,
    "soft": route_soft,
    "hierarchical": route_hierarchical,
    "deepseek": route_deepseek,
}


# ---- capacity: applied by the layer to the router's pairs ----


def groups(cfg, N):
    """The token ranges of the capacity groups (capacity_group tokens each; 0: one group)."""
    size = cfg["capacity_group"] if cfg["capacity_group"] > 0 else N
    return [(g0, min(N, g0 + size)) for g0 in range(0, N, size)]


def apply_capacity(cfg, rt, N):
    """Which pairs each expert keeps, per capacity group of C = ceil(CF * N_g * K / E) pairs.
    Returns kept (a list of bools), the capacity and the margins of score-based drops."""
    E = cfg["n_experts"]
    n_pairs = len(rt["tok"])
    kept = [True] * n_pairs
    cf = cfg["capacity_factor"]
    if cf <= 0:
        return kept, 0, []
    K = rt["K"]
    policy = cfg["drop_policy"]
    checks = []
    caps = set()
    for g0, g1 in groups(cfg, N):
        C = math.ceil(cf * (g1 - g0) * K / E)
        caps.add(C)
        for e in range(E):
            pairs = [k for k in range(n_pairs) if g0 <= rt["tok"][k] < g1 and rt["exp"][k] == e]
            if policy == "position":
                pairs.sort(key=lambda k: rt["tok"][k])
            elif policy == "score":
                # Python's sort is stable: equal scores keep token order
                pairs.sort(key=lambda k: -float(rt["score"][k]))
                if len(pairs) > C:
                    a, b = float(rt["score"][pairs[C - 1]]), float(rt["score"][pairs[C]])
                    checks.append(("C-th and (C+1)-th scores of an over-capacity expert",
                                   rel_gap(a, b)))
            elif policy == "slot":
                pairs.sort(key=lambda k: (rt["slot"][k], rt["tok"][k]))
            else:
                raise ValueError(policy)
            for k in pairs[C:]:
                kept[k] = False
    assert len(caps) == 1, "the cases keep every capacity group the same size"
    return kept, caps.pop(), checks


def moe_forward(cfg, P, x, draws, training, bias, prior=None):
    N, D = x.shape
    E = cfg["n_experts"]
    xr = x
    if training and cfg["jitter_eps"] > 0:
        # multiplicative jitter on the router input only; its N*D uniforms come first
        eps = cfg["jitter_eps"]
        xr = x * (1 - eps + 2 * eps * draws.uniform(N * D).view(N, D))
    logits = xr @ P["router.weight"].T
    if prior is not None:
        rt = ROUTERS[cfg["router"]](cfg, logits, draws, training, bias, prior=prior)
    else:
        rt = ROUTERS[cfg["router"]](cfg, logits, draws, training, bias)

    if cfg["router"] == "expert_choice":
        # C tokens per expert by construction: the layer's capacity step does not apply
        kept, capacity, cap_checks = [True] * len(rt["tok"]), 0, []
    else:
        kept, capacity, cap_checks = apply_capacity(cfg, rt, N)
    tok = torch.tensor(rt["tok"], dtype=torch.int64)
    exp = torch.tensor(rt["exp"], dtype=torch.int64)
    kept_t = torch.tensor(kept, dtype=torch.bool)

    out_all, relu_pre = ffn_all(cfg, "experts", P, x)  # [N, E, D]
    contrib = (rt["w"] * kept_t.to(x.dtype))[:, None] * out_all[tok, exp]
    y = torch.zeros(N, D).index_add(0, tok, contrib)

    relu_values = []
    if relu_pre is not None:
        relu_values.append(relu_pre[tok, exp][kept_t].detach().flatten())

    if cfg["n_shared"] > 0:
        shared_out, shared_pre = ffn_all(cfg, "shared", P, x)
        s = shared_out.sum(dim=1)
        if cfg["shared_gate"]:
            g = torch.sigmoid(x @ P["shared.gate"][0])
            s = g[:, None] * s
        y = y + s
        if shared_pre is not None:
            relu_values.append(shared_pre.detach().flatten())

    info = dict(rt)
    info.update({
        "n_tokens": N,
        "routed": torch.bincount(exp, minlength=E).tolist(),
        "kept": torch.bincount(exp[kept_t], minlength=E).tolist(),
        "n_dropped": len(kept) - sum(kept),
        "capacity": capacity,
        "checks": rt["checks"] + cap_checks,
        "relu": torch.cat(relu_values) if relu_values else torch.zeros(0),
    })
    return y, rt["aux"], rt["z"], info


def draw(cfg, N, seed, special, training):
    torch.manual_seed(seed)
    P = {}
    for name, shape in param_shapes(cfg).items():
        P[name] = 0.5 * torch.randn(*shape)
    x = torch.randn(N, cfg["d_model"])
    dy = torch.randn(N, cfg["d_model"])
    n_normal, n_uniform = draw_counts(cfg, N, training)
    noise = {"normal": torch.randn(n_normal), "uniform": torch.rand(n_uniform)}
    bias = None
    if cfg["router"] == "deepseek":
        bias = 0.1 * torch.randn(cfg["n_experts"])
    if special is not None:
        special(cfg, P, x)
    return P, x, dy, noise, bias


def routing_problems(cfg, info, ties):
    """Why this draw is unfit for the float32 comparison, or None."""
    if not ties:
        for what, margin in info["checks"]:
            if margin < ROUTING_MARGIN:
                return "%s too close (%.3g)" % (what, margin)
    if info["relu"].numel() > 0 and float(info["relu"].abs().min()) < RELU_MARGIN:
        return "a ReLU pre-activation too close to 0"
    return None


def tensor_json(t):
    t = t.detach()
    return {"shape": list(t.shape), "data": t.flatten().tolist()}


def make_case(name, cfg, N, seed, d_aux=1.0, d_z=1.0, special=None, require=None, ties=False,
              extra=None, training=True, earlier=0):
    """Draws seed, seed+1, ... until the draw satisfies the margins and `require`. earlier > 0:
    the layer first runs a micro-batch of that many tokens (earlier_x), whose routing counts
    global_balance adds to f."""
    why = None
    for attempt in range(MAX_DRAWS):
        s = seed + attempt
        P, x, dy, noise, bias = draw(cfg, N, s, special, training)
        prior = None
        if earlier > 0:
            earlier_x = torch.randn(earlier, cfg["d_model"])
            with torch.no_grad():
                _, _, _, info0 = moe_forward(cfg, P, earlier_x, Draws([], []), training, bias)
            prior = (info0["routed"], earlier)
            why = routing_problems(cfg, info0, ties)
            if why is not None:
                continue
        with torch.no_grad():
            draws = Draws(noise["normal"], noise["uniform"])
            _, _, _, info = moe_forward(cfg, P, x, draws, training, bias, prior)
        # the draws are exactly those the doc lists for this method
        assert draws.used == {k: len(v) for k, v in noise.items()}, (name, draws.used)
        why = routing_problems(cfg, info, ties)
        if why is None and require is not None:
            why = require(cfg, info)
        if why is None:
            break
    else:
        raise AssertionError("case %s: no fit draw in %d seeds: %s" % (name, MAX_DRAWS, why))

    x = x.clone().requires_grad_(True)
    for t in P.values():
        t.requires_grad_(True)
    y, aux, z, info = moe_forward(cfg, P, x, Draws(noise["normal"], noise["uniform"]), training,
                                  bias, prior)
    L = (y * dy).sum() + d_aux * aux + d_z * z
    L.backward()
    grads = {k: v.grad.detach().clone() for k, v in P.items()}
    # fine-tuning switches: frozen weights get no gradient, the input gradient is unchanged
    if cfg["freeze_router"]:
        grads["router.weight"].zero_()
    for e in cfg["frozen_experts"]:
        for k in grads:
            if k.startswith("experts."):
                grads[k][e].zero_()

    case = {
        "name": name,
        "seed": s,
        "config": cfg,
        "training": training,
        "noise": {k: to_float_list(v) for k, v in noise.items()},
        "d_aux": d_aux,
        "d_z": d_z,
        "x": tensor_json(x),
        "dy": tensor_json(dy),
        "earlier_x": tensor_json(earlier_x) if earlier > 0 else None,
        "params": {k: tensor_json(v) for k, v in P.items()},
        "y": tensor_json(y),
        "aux_loss": float(aux),
        "z_loss": float(z),
        "routed": info["routed"],
        "kept": info["kept"],
        "capacity": info["capacity"],
        "tokens_per_expert": info.get("tokens_per_expert", 0),
        "explored": info.get("explored", 0),
        "unsampled": info.get("unsampled", 0),
        "dx": tensor_json(x.grad),
        "grads": {k: tensor_json(v) for k, v in grads.items()},
    }
    if bias is not None:
        # DeepSeek's auxiliary-loss-free update from this forward's routed counts
        case["selection_bias"] = to_float_list(bias)
        after = to_float_list(bias)
        if not cfg["freeze_router"]:
            load = info["routed"]
            mean = sum(load) / cfg["n_experts"]
            for i, n in enumerate(load):
                sign = (mean > n) - (mean < n)
                after[i] = after[i] + cfg["bias_update_rate"] * sign
        case["selection_bias_after_step"] = after
    if extra:
        case.update(extra)
    return case


# ---- the properties some cases exist to exercise ----


def require_empty_expert(cfg, info):
    return None if 0 in info["routed"] else "every expert receives a token"


def require_drops(cfg, info):
    return None if info["n_dropped"] > 0 else "no pair is dropped"


def require_explored(cfg, info):
    if info["explored"] == 0:
        return "no slot was explored"
    if info["sequential_matters"] == 0:
        return "no pick depends on an earlier slot's replacement"
    return None


def require_gshard_sampling(cfg, info):
    """Some second experts left out by the sampling and some pairs dropped, in a draw where each
    group's capacity is the same whether it counts the group's pairs before the sampling (the
    paper's 2 N / (G E)) or after it (the doc's P_g could be either)."""
    if info["unsampled"] == 0:
        return "every second expert was sampled"
    if info["n_dropped"] == 0:
        return "no pair is dropped"
    E, cf = cfg["n_experts"], cfg["capacity_factor"]
    for g0, g1 in groups(cfg, info["n_tokens"]):
        sampled = sum(1 for t in info["tok"] if g0 <= t < g1)
        if math.ceil(cf * sampled / E) != math.ceil(cf * 2 * (g1 - g0) / E):
            return "the group capacity depends on counting pairs before or after the sampling"
    return None


def require_unchosen_token(cfg, info):
    chosen = set(info["tok"])
    return None if len(chosen) < info["n_tokens"] else "every token has an expert"


def require_bias_matters(cfg, info):
    return None if info["bias_changes_selection"] else "the bias changes no selection"


def starve_last_expert(cfg, P, x):
    """Points the last expert's router row against the tokens' common direction, so it never
    makes anybody's top K."""
    D = cfg["d_model"]
    u = torch.ones(D) / math.sqrt(D)
    x.add_(1.5 * u)
    P["router.weight"][-1] = -4.0 * u + 0.1 * P["router.weight"][-1]


def zero_router(cfg, P, x):
    P["router.weight"].zero_()


def build_cases():
    cases = []

    def add(*a, **kw):
        cases.append(make_case(*a, **kw))

    add("mixtral_top2_swiglu",
        full_config(d_model=8, d_ffn=6, n_experts=8, top_k=2, act="swiglu"), N=32, seed=101)
    # global-batch balancing: f counts an earlier micro-batch of the step too; with the
    # device-level loss, whose f'_d does as well
    add("top2_global_balance",
        full_config(d_model=8, d_ffn=5, n_experts=6, top_k=2, act="swiglu", aux_loss_coef=0.1,
                    global_balance=True, device_aux_loss_coef=0.05, n_devices=3),
        N=16, seed=121, d_aux=2.0, earlier=20)
    # DeepSeek-V2's device-level balance loss: 8 experts on 4 devices, alpha_2 = 0.05
    add("top2_device_balance",
        full_config(d_model=8, d_ffn=5, n_experts=8, top_k=2, act="swiglu",
                    device_aux_loss_coef=0.05, n_devices=4),
        N=24, seed=111, d_aux=2.0)
    add("switch_top1_relu_no_renorm",
        full_config(d_model=6, d_ffn=8, n_experts=4, top_k=1, act="relu", renormalize=False),
        N=24, seed=202, d_aux=0.7)
    # the routed weight is exactly 1, so the router learns only through the two losses
    add("top1_renorm_gelu",
        full_config(d_model=6, d_ffn=5, n_experts=4, top_k=1, act="gelu",
                    aux_loss_coef=0.1, z_loss_coef=0.01),
        N=20, seed=303, d_aux=3.0, d_z=0.7)
    add("all_experts_gelu",
        full_config(d_model=5, d_ffn=4, n_experts=4, top_k=4, act="gelu"), N=16, seed=404)
    add("all_experts_no_renorm_relu",
        full_config(d_model=5, d_ffn=4, n_experts=3, top_k=3, act="relu", renormalize=False),
        N=12, seed=414)
    add("gelu_bias",
        full_config(d_model=7, d_ffn=5, n_experts=5, top_k=2, act="gelu", expert_bias=True),
        N=20, seed=505, d_aux=0.7, d_z=3.0)
    add("swiglu_bias",
        full_config(d_model=8, d_ffn=4, n_experts=4, top_k=2, act="swiglu", expert_bias=True),
        N=18, seed=606)
    add("relu_bias",
        full_config(d_model=6, d_ffn=6, n_experts=6, top_k=3, act="relu", expert_bias=True,
                    renormalize=False),
        N=20, seed=707, d_aux=3.0)
    add("single_expert",
        full_config(d_model=4, d_ffn=3, n_experts=1, top_k=1, act="swiglu",
                    aux_loss_coef=0.1, z_loss_coef=0.01),
        N=9, seed=808, d_z=3.0)
    add("single_token",
        full_config(d_model=6, d_ffn=5, n_experts=4, top_k=2, act="swiglu", n_shared=1),
        N=1, seed=909)
    add("empty_expert",
        full_config(d_model=6, d_ffn=4, n_experts=6, top_k=2, act="gelu",
                    aux_loss_coef=0.1, z_loss_coef=0.01),
        N=16, seed=1001, special=starve_last_expert, require=require_empty_expert, d_aux=0.7)
    # all logits zero: p is exactly uniform in any precision and experts 0..K-1 win every token
    add("exact_ties",
        full_config(d_model=5, d_ffn=4, n_experts=5, top_k=2, act="swiglu",
                    aux_loss_coef=0.1, z_loss_coef=0.01),
        N=8, seed=1101, special=zero_router, ties=True,
        require=lambda cfg, info: None if info["exp"] == list(range(cfg["top_k"])) * info[
            "n_tokens"] else "ties not to lowest")
    add("shared1_no_gate",
        full_config(d_model=6, d_ffn=4, n_experts=4, top_k=2, act="swiglu", n_shared=1),
        N=14, seed=1201)
    add("shared2_gate_width",
        full_config(d_model=6, d_ffn=4, n_experts=4, top_k=2, act="gelu", n_shared=2,
                    d_shared_ffn=5, shared_gate=True, expert_bias=True),
        N=14, seed=1301, d_aux=0.7, d_z=3.0)
    add("shared2_gate_relu",
        full_config(d_model=5, d_ffn=3, n_experts=3, top_k=1, act="relu", n_shared=2,
                    d_shared_ffn=6, shared_gate=True, renormalize=False),
        N=10, seed=1351)
    add("capacity_half_position",
        full_config(d_model=6, d_ffn=4, n_experts=4, top_k=2, act="swiglu", capacity_factor=0.5,
                    drop_policy="position"),
        N=20, seed=1401, require=require_drops)
    add("capacity_half_score",
        full_config(d_model=6, d_ffn=4, n_experts=4, top_k=2, act="swiglu", capacity_factor=0.5,
                    drop_policy="score"),
        N=20, seed=1501, require=require_drops, d_aux=3.0)
    add("capacity_half_score_top1_relu",
        full_config(d_model=5, d_ffn=6, n_experts=3, top_k=1, act="relu", capacity_factor=0.5,
                    drop_policy="score", renormalize=False, expert_bias=True),
        N=15, seed=1551, require=require_drops)
    add("capacity_one",
        full_config(d_model=6, d_ffn=4, n_experts=4, top_k=2, act="gelu", capacity_factor=1.0),
        N=24, seed=1601, d_z=0.7)
    add("capacity_one_score_no_renorm",
        full_config(d_model=6, d_ffn=4, n_experts=5, top_k=2, act="swiglu", capacity_factor=1.0,
                    drop_policy="score", renormalize=False, n_shared=1, shared_gate=True),
        N=25, seed=1651, require=require_drops)
    base = full_config(d_model=8, d_ffn=8, n_experts=4, top_k=2, act="swiglu", n_shared=1,
                       d_shared_ffn=6)
    add("fine_grained_m2", fine_grained(base, 2), N=16, seed=1701,
        extra={"fine_grained": {"base": base, "m": 2}})
    base3 = full_config(d_model=6, d_ffn=9, n_experts=2, top_k=1, act="gelu")
    add("fine_grained_m3", fine_grained(base3, 3), N=12, seed=1751,
        extra={"fine_grained": {"base": base3, "m": 3}})
    add("losses_strong",
        full_config(d_model=6, d_ffn=4, n_experts=6, top_k=2, act="swiglu",
                    aux_loss_coef=0.1, z_loss_coef=0.01),
        N=20, seed=1801, d_aux=3.0, d_z=0.7)
    add("losses_zero",
        full_config(d_model=6, d_ffn=4, n_experts=6, top_k=2, act="swiglu",
                    aux_loss_coef=0.0, z_loss_coef=0.0),
        N=20, seed=1901)
    add("large",
        full_config(d_model=12, d_ffn=10, n_experts=8, top_k=2, act="swiglu", expert_bias=True,
                    n_shared=1, d_shared_ffn=7, shared_gate=True, capacity_factor=1.25,
                    drop_policy="score", aux_loss_coef=0.05, z_loss_coef=0.005),
        N=40, seed=2001, d_aux=0.7, d_z=3.0)

    # ---- routing methods (docs/routing.md, "Routing methods") ----
    add("jitter_top2",
        full_config(d_model=6, d_ffn=4, n_experts=6, top_k=2, act="swiglu", jitter_eps=0.1),
        N=16, seed=2101, d_aux=3.0, d_z=0.7)
    add("switch_jitter_capacity",
        full_config(d_model=6, d_ffn=5, n_experts=4, top_k=1, act="gelu", router="switch",
                    renormalize=False, jitter_eps=0.05, capacity_factor=1.0),
        N=20, seed=2201, require=require_drops, d_aux=3.0)
    add("exploration",
        full_config(d_model=6, d_ffn=4, n_experts=6, top_k=2, act="swiglu", explore_prob=0.4),
        N=16, seed=2301, require=require_explored, d_aux=3.0)
    add("exploration_no_renorm_relu",
        full_config(d_model=5, d_ffn=6, n_experts=6, top_k=2, act="relu", explore_prob=0.4,
                    jitter_eps=0.05, renormalize=False, capacity_factor=1.0,
                    drop_policy="score"),
        N=18, seed=2351, require=require_explored)
    add("frozen_router",
        full_config(d_model=6, d_ffn=4, n_experts=4, top_k=2, act="swiglu", freeze_router=True),
        N=16, seed=2401, d_aux=3.0, d_z=0.7)
    add("frozen_experts_bias",
        full_config(d_model=6, d_ffn=4, n_experts=5, top_k=2, act="gelu", expert_bias=True,
                    frozen_experts=[0, 2], n_shared=1),
        N=16, seed=2501)
    add("noisy_topk_train",
        full_config(d_model=6, d_ffn=4, n_experts=6, top_k=2, act="swiglu", router="noisy_topk",
                    aux_loss_coef=0.1, z_loss_coef=0.01),
        N=16, seed=2601, d_aux=3.0)
    add("noisy_topk_eval",
        full_config(d_model=6, d_ffn=4, n_experts=6, top_k=2, act="gelu", router="noisy_topk",
                    aux_loss_coef=0.1, z_loss_coef=0.01),
        N=16, seed=2651, d_aux=0.7, training=False)
    add("noisy_top1_jitter_train",
        full_config(d_model=5, d_ffn=4, n_experts=4, top_k=1, act="swiglu", router="noisy_topk",
                    jitter_eps=0.1),
        N=12, seed=2681, d_aux=3.0)
    add("gshard_train_groups",
        full_config(d_model=6, d_ffn=4, n_experts=4, top_k=2, act="swiglu", router="gshard",
                    capacity_factor=1.0, capacity_group=8, drop_policy="slot"),
        N=16, seed=2701, require=require_gshard_sampling, d_aux=3.0)
    add("gshard_eval",
        full_config(d_model=6, d_ffn=4, n_experts=4, top_k=2, act="gelu", router="gshard",
                    capacity_factor=1.0, drop_policy="slot"),
        N=16, seed=2751, require=require_drops, training=False)
    add("expert_choice_cf2",
        full_config(d_model=6, d_ffn=4, n_experts=4, top_k=1, act="swiglu",
                    router="expert_choice", capacity_factor=2.0),
        N=16, seed=2801, d_z=3.0)
    add("expert_choice_cf1",
        full_config(d_model=6, d_ffn=4, n_experts=8, top_k=1, act="relu",
                    router="expert_choice", capacity_factor=1.0, n_shared=1),
        N=24, seed=2851, require=require_unchosen_token)
    add("expert_choice_uneven",
        full_config(d_model=5, d_ffn=4, n_experts=4, top_k=1, act="gelu",
                    router="expert_choice", capacity_factor=1.0),
        N=10, seed=2881, d_z=0.7)
    add("soft",
        full_config(d_model=6, d_ffn=4, n_experts=4, top_k=4, act="swiglu", router="soft",
                    z_loss_coef=0.01),
        N=12, seed=2901, d_z=3.0)
    add("hierarchical_dense",
        full_config(d_model=6, d_ffn=4, n_experts=6, top_k=2, act="swiglu",
                    router="hierarchical", hme_groups=2, z_loss_coef=0.01),
        N=12, seed=3001, d_z=3.0)
    add("hierarchical_sparse",
        full_config(d_model=6, d_ffn=4, n_experts=8, top_k=2, act="swiglu",
                    router="hierarchical", hme_groups=2, hme_group_k=1, hme_expert_k=2,
                    renormalize=True),
        N=16, seed=3101, d_z=0.7)
    add("hierarchical_sparse_no_renorm",
        full_config(d_model=6, d_ffn=4, n_experts=8, top_k=2, act="gelu",
                    router="hierarchical", hme_groups=2, hme_group_k=1, hme_expert_k=2,
                    renormalize=False, z_loss_coef=0.01),
        N=16, seed=3151, d_z=3.0)
    add("deepseek_groups",
        full_config(d_model=8, d_ffn=4, n_experts=8, top_k=2, act="swiglu", router="deepseek",
                    n_group=4, topk_group=2, routed_scaling_factor=2.5, renormalize=True,
                    aux_loss_coef=0.01, seq_len=8, n_shared=1),
        N=16, seed=3201, require=require_bias_matters, d_aux=3.0)
    add("deepseek_flat",
        full_config(d_model=6, d_ffn=4, n_experts=6, top_k=2, act="gelu", router="deepseek",
                    n_group=1, topk_group=1, renormalize=False, aux_loss_coef=0.05),
        N=16, seed=3301, require=require_bias_matters, d_aux=0.7)
    add("deepseek_frozen_router",
        full_config(d_model=6, d_ffn=4, n_experts=8, top_k=2, act="swiglu", router="deepseek",
                    n_group=4, topk_group=2, freeze_router=True, aux_loss_coef=0.01),
        N=16, seed=3401, require=require_bias_matters)
    return cases


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: moe_oracle.py OUT.json")
    cases = build_cases()
    names = [c["name"] for c in cases]
    assert len(set(names)) == len(names)
    with open(sys.argv[1], "w") as f:
        json.dump({"torch_version": torch.__version__, "cases": cases}, f)


if __name__ == "__main__":
    main()
