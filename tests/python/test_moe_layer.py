#!/usr/bin/python3
"""moe_cpp.MoeLayer, the C++ layer as a torch.nn.Module, against PyTorch: for every router, its
forward (float64, and float32 within float32's reach) against the PyTorch reference of
tests/torch/moe_oracle.py on the same parameters; torch.autograd.gradcheck in float64 on the
input and every parameter; the backward of an earlier forward (recomputed from its input and
random stream) equal to the backward run right after it; parameters shared with the C++ layer
(changed in place, the layer sees it); errors as moe_cpp.Error; the GIL released while it
computes; a small training loop that learns.

    PYTHONPATH=build/release/python /usr/bin/python3 tests/python/test_moe_layer.py
"""
import os
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "torch"))
import moe_oracle as O  # noqa: E402
import moe_cpp  # noqa: E402
from checks import check, raises, status  # noqa: E402

torch.set_default_dtype(torch.float32)  # the oracle sets float64 for itself (see reference)



# One configuration per router (the oracle's cases, eval mode: no random draws).
ROUTERS = {
    "topk": dict(d_model=8, d_ffn=6, n_experts=8, top_k=2, act="swiglu"),
    "switch": dict(d_model=6, d_ffn=8, n_experts=4, top_k=1, act="gelu", router="switch",
                   renormalize=False, capacity_factor=1.0),
    "noisy_topk": dict(d_model=6, d_ffn=4, n_experts=6, top_k=2, act="gelu", router="noisy_topk",
                       aux_loss_coef=0.1, z_loss_coef=0.01),
    "gshard": dict(d_model=6, d_ffn=4, n_experts=4, top_k=2, act="gelu", router="gshard",
                   capacity_factor=1.0, drop_policy="slot"),
    "expert_choice": dict(d_model=6, d_ffn=4, n_experts=4, top_k=1, act="swiglu",
                          router="expert_choice", capacity_factor=2.0),
    "soft": dict(d_model=6, d_ffn=4, n_experts=4, top_k=4, act="swiglu", router="soft",
                 z_loss_coef=0.01),
    "hierarchical": dict(d_model=6, d_ffn=4, n_experts=8, top_k=2, act="swiglu",
                         router="hierarchical", hme_groups=2, hme_group_k=1, hme_expert_k=2),
    "deepseek": dict(d_model=8, d_ffn=4, n_experts=8, top_k=2, act="swiglu", router="deepseek",
                     n_group=4, topk_group=2, routed_scaling_factor=2.5, aux_loss_coef=0.01,
                     n_shared=1),
}


def reference(layer, cfg, x):
    """The oracle's y, aux, z on the layer's own parameters (eval mode)."""
    P = {name: getattr(layer, moe_cpp._name(name)).detach().double()
         for name, _ in layer._core.params()}
    full = O.full_config(**cfg)
    bias = torch.zeros(cfg["n_experts"], dtype=torch.float64)
    torch.set_default_dtype(torch.float64)
    try:
        y, aux, z, _ = O.moe_forward(full, P, x.detach().double(), O.Draws([], []), False, bias)
    finally:
        torch.set_default_dtype(torch.float32)
    return y, float(aux), float(z)


def rel(a, b):
    return float((a - b).abs().max() / max(1e-30, float(b.abs().max())))


def test_router(name, cfg):
    torch.manual_seed(1)
    layer = moe_cpp.MoeLayer(cfg, dtype=torch.float64, seed=11).eval()
    x = torch.randn(10, cfg["d_model"], dtype=torch.float64, requires_grad=True)
    y = layer(x)
    y_ref, aux_ref, z_ref = reference(layer, cfg, x)
    check(rel(y.detach(), y_ref) < 1e-12 and abs(float(layer.aux_loss) - aux_ref) < 1e-12 and
          abs(float(layer.z_loss) - z_ref) < 1e-12,
          f"{name}: float64 forward and losses equal PyTorch's reference",
          f"y {rel(y.detach(), y_ref):.1e}")
    # float32: the same parameters rounded, within float32's reach of the reference
    l32 = moe_cpp.MoeLayer(cfg, dtype=torch.float32, seed=11).eval()
    with torch.no_grad():
        for (n64, p64), (n32, p32) in zip(layer.named_parameters(), l32.named_parameters()):
            p32.copy_(p64)
    y32 = l32(x.detach().float())
    y32_ref, _, _ = reference(l32, cfg, x.detach().float().double())
    check(rel(y32.double(), y32_ref) < 1e-5, f"{name}: float32 forward within 1e-5 of the reference",
          f"{rel(y32.double(), y32_ref):.1e}")
    # gradcheck: the input and every parameter, all three outputs
    params = [p for p in layer.parameters()]
    fn = lambda xx, *ps: moe_cpp._MoeFunction.apply(xx, layer, *ps)  # noqa: E731
    inputs = (x.detach().clone().requires_grad_(True),
              *[p.detach().clone().requires_grad_(True) for p in params])
    try:
        ok = torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)
        detail = ""
    except Exception as e:  # gradcheck raises with the mismatch
        ok, detail = False, str(e).splitlines()[0]
    check(ok, f"{name}: gradcheck (float64, input and {len(params)} parameters)", detail)
    return layer


def test_recompute():
    """The backward of an earlier forward (noisy top-k in training: random draws) equals the
    backward run right after it, to the bit."""
    cfg = ROUTERS["noisy_topk"]
    layer = moe_cpp.MoeLayer(cfg, dtype=torch.float64, seed=3).train()
    x = torch.randn(12, cfg["d_model"], dtype=torch.float64, requires_grad=True)
    y = layer(x)
    loss = y.square().sum() + 3.0 * layer.aux_loss + layer.z_loss
    wrt = [x, *layer.parameters()]
    direct = torch.autograd.grad(loss, wrt, retain_graph=True)
    layer(torch.randn(7, cfg["d_model"], dtype=torch.float64))  # another forward in between
    again = torch.autograd.grad(loss, wrt)
    check(all(torch.equal(a, b) for a, b in zip(direct, again)),
          "the backward of an earlier forward (recomputed from its input and random stream) "
          "equals the one right after it")
    y2 = layer(x)
    check(not torch.equal(y2, y), "a new forward in training draws new noise")


def test_shared_parameters():
    """The parameters are the C++ layer's memory: changed in place, the layer computes with the
    new values; an optimizer's step moves what the layer computes."""
    cfg = ROUTERS["topk"]
    layer = moe_cpp.MoeLayer(cfg, dtype=torch.float64, seed=5).eval()
    x = torch.randn(9, cfg["d_model"], dtype=torch.float64)
    ptr = layer.experts_w_up.data_ptr()
    with torch.no_grad():
        layer.experts_w_up.mul_(1.5)
        layer.router_weight.add_(0.01)
    y = layer(x)
    y_ref, _, _ = reference(layer, cfg, x)
    check(layer.experts_w_up.data_ptr() == ptr and rel(y.detach(), y_ref) < 1e-12,
          "parameters changed in place: the layer computes with them (no copy)")


def test_errors():
    cfg = ROUTERS["topk"]
    raises(lambda: moe_cpp.MoeLayer(cfg, routr="topk"), "unknown key 'routr'",
           "an unknown option: moe_cpp.Error naming it")
    raises(lambda: moe_cpp.MoeLayer(cfg, top_k=9), "top_k", "top_k past the experts: refused")
    raises(lambda: moe_cpp.MoeLayer(cfg, router="fancy"), "unknown router 'fancy'",
           "an unknown router: refused, with the known ones")
    raises(lambda: moe_cpp.MoeLayer(cfg, dtype=torch.float16), "float32 or float64",
           "float16: refused")
    layer = moe_cpp.MoeLayer(cfg)
    raises(lambda: layer(torch.randn(3, 5)), "x must be [..., 8]", "a wrong width: refused")
    raises(lambda: layer(torch.randn(3, 8, dtype=torch.float64)), "x must be a CPU tensor of",
           "a wrong dtype: refused")
    x = torch.randn(4, 8)
    x[2, 3] = float("nan")
    raises(lambda: layer(x), "non-finite", "a NaN in x: named")


def test_gil_released():
    """Another Python thread runs while the layer computes (the layer on one thread, so that the
    other has a core): it counts at least half as fast as when it runs alone, where a held GIL
    would stop it but for the interpreter's switches between the calls."""
    moe_cpp.set_num_threads(1)
    layer = moe_cpp.MoeLayer(d_model=256, d_ffn=512, n_experts=8, top_k=2)
    x = torch.randn(4096, 256)
    layer(x)
    ticks, done = [0], [False]

    def spin():
        while not done[0]:
            ticks[0] += 1
    t = threading.Thread(target=spin)
    t.start()
    t0, c0 = time.perf_counter(), ticks[0]
    time.sleep(0.2)  # the main thread sleeps: the other runs alone
    alone = (ticks[0] - c0) / (time.perf_counter() - t0)
    t0, c0 = time.perf_counter(), ticks[0]
    for _ in range(3):
        layer(x)
    during = (ticks[0] - c0) / (time.perf_counter() - t0)
    done[0] = True
    t.join()
    moe_cpp.set_num_threads(0)
    check(during > 0.5 * alone, "the GIL is released while the layer computes (another thread "
          f"counts {during / alone:.2f}x as fast as alone)")


def test_training_loop():
    """A small regression trained with torch.optim.Adam through the layer: the loss falls."""
    torch.manual_seed(0)
    layer = moe_cpp.MoeLayer(d_model=16, d_ffn=32, n_experts=4, top_k=2, seed=1)
    target = torch.nn.Linear(16, 16)
    opt = torch.optim.Adam(layer.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        x = torch.randn(64, 16)
        with torch.no_grad():
            want = torch.tanh(target(x))
        loss = torch.nn.functional.mse_loss(layer(x), want) + layer.aux_loss + layer.z_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        layer.after_step()
        losses.append(float(loss))
    check(sum(losses[-5:]) < 0.5 * sum(losses[:5]),
          f"a training loop with Adam learns (loss {losses[0]:.3f} -> {losses[-1]:.3f})")


def main():
    torch.set_num_threads(1)
    for name, cfg in ROUTERS.items():
        test_router(name, cfg)
    test_recompute()
    test_shared_parameters()
    test_errors()
    test_gil_released()
    test_training_loop()
    return status()


if __name__ == "__main__":
    sys.exit(main())
