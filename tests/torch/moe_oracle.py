#!/usr/bin/env python3
"""moe_oracle.py: the PyTorch reference for the MoE layer, written from the math alone.

Computes, in float64 with autograd, the forward output, the two balancing losses and every
gradient of the objective L = sum(y * dy) + d_aux * aux + d_z * z for a list of small cases, and
writes them as JSON for test_torch_oracle.cpp to compare against.

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
ROUTING_MARGIN = 1e-4  # relative gap between the deciding probabilities
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


def param_shapes(cfg):
    D, F_, E = cfg["d_model"], cfg["d_ffn"], cfg["n_experts"]
    swiglu = cfg["act"] == "swiglu"
    bias = cfg["expert_bias"]
    shapes = {"router.weight": [E, D]}

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


def route(cfg, p):
    """Top-K selection (ties to the lowest expert index) and capacity dropping; not
    differentiated. Returns idx [N, K], kept [N, K] bool, capacity (0 when dropless), and the
    per-expert score lists of over-capacity experts under the score policy."""
    N, E = p.shape
    K = cfg["top_k"]
    pd = p.detach()
    order = torch.sort(pd, dim=1, descending=True, stable=True).indices
    idx = order[:, :K]
    kept = torch.ones(N, K, dtype=torch.bool)
    capacity = 0
    over = []
    cf = cfg["capacity_factor"]
    if cf > 0:
        capacity = math.ceil(cf * N * K / E)
        for e in range(E):
            pairs = [(t, j) for t in range(N) for j in range(K) if int(idx[t, j]) == e]
            if cfg["drop_policy"] == "score":
                # Python's sort is stable: equal scores keep token order
                pairs.sort(key=lambda tj: -float(pd[tj[0], e]))
                if len(pairs) > capacity:
                    over.append([float(pd[t, e]) for t, _ in pairs])
            else:
                assert cfg["drop_policy"] == "position"
            for t, j in pairs[capacity:]:
                kept[t, j] = False
    return idx, kept, capacity, over


def moe_forward(cfg, P, x):
    N, D = x.shape
    E, K = cfg["n_experts"], cfg["top_k"]
    logits = x @ P["router.weight"].T
    p = torch.softmax(logits, dim=1)
    lse = torch.logsumexp(logits, dim=1)
    idx, kept, capacity, over = route(cfg, p)

    psel = p.gather(1, idx)
    w = psel / psel.sum(dim=1, keepdim=True) if cfg["renormalize"] else psel

    out_all, relu_pre = ffn_all(cfg, "experts", P, x)  # [N, E, D]
    chosen = out_all.gather(1, idx[:, :, None].expand(N, K, D))  # [N, K, D]
    y = (w * kept.to(x.dtype))[:, :, None].mul(chosen).sum(dim=1)

    relu_values = []
    if relu_pre is not None:
        pre_sel = relu_pre.gather(1, idx[:, :, None].expand(N, K, relu_pre.shape[2]))
        relu_values.append(pre_sel[kept].detach().flatten())

    if cfg["n_shared"] > 0:
        shared_out, shared_pre = ffn_all(cfg, "shared", P, x)
        s = shared_out.sum(dim=1)
        if cfg["shared_gate"]:
            g = torch.sigmoid(x @ P["shared.gate"][0])
            s = g[:, None] * s
        y = y + s
        if shared_pre is not None:
            relu_values.append(shared_pre.detach().flatten())

    f = torch.bincount(idx.flatten(), minlength=E).to(x.dtype) / (N * K)
    P_mean = p.mean(dim=0)
    aux = cfg["aux_loss_coef"] * E * (f * P_mean).sum()
    z = cfg["z_loss_coef"] * (lse**2).mean()
    info = {
        "p": p.detach(),
        "idx": idx,
        "kept": kept,
        "capacity": capacity,
        "over": over,
        "relu": torch.cat(relu_values) if relu_values else torch.zeros(0),
    }
    return y, aux, z, info


def draw(cfg, N, seed, special):
    torch.manual_seed(seed)
    P = {}
    for name, shape in param_shapes(cfg).items():
        P[name] = 0.5 * torch.randn(*shape)
    x = torch.randn(N, cfg["d_model"])
    dy = torch.randn(N, cfg["d_model"])
    if special is not None:
        special(cfg, P, x)
    return P, x, dy


def routing_problems(cfg, info, ties):
    """Why this draw is unfit for the float32 comparison, or None."""
    K, E = cfg["top_k"], cfg["n_experts"]
    if not ties and K < E:
        s = torch.sort(info["p"], dim=1, descending=True).values
        gap = (s[:, K - 1] - s[:, K]) / s[:, K - 1]
        if float(gap.min()) < ROUTING_MARGIN:
            return "K-th and (K+1)-th probabilities too close (%.3g)" % float(gap.min())
    C = info["capacity"]
    for scores in info["over"]:
        if (scores[C - 1] - scores[C]) / scores[C - 1] < ROUTING_MARGIN:
            return "C-th and (C+1)-th scores of an over-capacity expert too close"
    if info["relu"].numel() > 0 and float(info["relu"].abs().min()) < RELU_MARGIN:
        return "a ReLU pre-activation too close to 0"
    return None


def tensor_json(t):
    t = t.detach()
    return {"shape": list(t.shape), "data": t.flatten().tolist()}


def make_case(name, cfg, N, seed, d_aux=1.0, d_z=1.0, special=None, require=None, ties=False,
              extra=None):
    """Draws seed, seed+1, ... until the draw satisfies the margins and `require`."""
    why = None
    for attempt in range(MAX_DRAWS):
        s = seed + attempt
        P, x, dy = draw(cfg, N, s, special)
        with torch.no_grad():
            _, _, _, info = moe_forward(cfg, P, x)
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
    y, aux, z, info = moe_forward(cfg, P, x)
    L = (y * dy).sum() + d_aux * aux + d_z * z
    L.backward()

    case = {
        "name": name,
        "seed": s,
        "config": cfg,
        "d_aux": d_aux,
        "d_z": d_z,
        "x": tensor_json(x),
        "dy": tensor_json(dy),
        "params": {k: tensor_json(v) for k, v in P.items()},
        "y": tensor_json(y),
        "aux_loss": float(aux),
        "z_loss": float(z),
        "top_idx": info["idx"].flatten().tolist(),
        "kept": info["kept"].to(torch.int64).flatten().tolist(),
        "capacity": info["capacity"],
        "dx": tensor_json(x.grad),
        "grads": {k: tensor_json(v.grad) for k, v in P.items()},
    }
    if extra:
        case.update(extra)
    return case


# ---- the properties some cases exist to exercise ----


def require_empty_expert(cfg, info):
    counts = torch.bincount(info["idx"].flatten(), minlength=cfg["n_experts"])
    return None if int((counts == 0).sum()) > 0 else "every expert receives a token"


def require_drops(cfg, info):
    return None if not bool(info["kept"].all()) else "no pair is dropped"


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
        require=lambda cfg, info: None if bool(
            (info["idx"] == torch.arange(cfg["top_k"])[None]).all()) else "ties not to lowest")
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
