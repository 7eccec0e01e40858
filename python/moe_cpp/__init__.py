"""moe.cpp from Python (docs/python.md).

    import torch, moe_cpp
    layer = moe_cpp.MoeLayer(d_model=64, d_ffn=128, n_experts=8, top_k=2)
    y = layer(torch.randn(10, 64))           # [10, 64]; layer.aux_loss, layer.z_loss
    (y.square().mean() + layer.aux_loss).backward()
    layer.routing["experts"]                 # every token's experts, as numpy arrays

The layer is moe.cpp's C++ MoE layer (every router and option of moe/moe_config.h) as a
torch.nn.Module: its parameters are torch Parameters whose memory the C++ layer computes on, the
input and output are torch tensors passed by address, and a torch.autograd.Function pairs its
forward and backward. Engine errors arrive as moe_cpp.Error, with the engine's message.
"""
import json

import torch

from . import _core

Error = _core.Error
set_num_threads = _core.set_num_threads
num_threads = _core.num_threads

_DTYPES = {torch.float32: "float32", torch.float64: "float64"}


def _name(param):  # "experts.w_gate" -> "experts_w_gate" (a Module's names have no dots)
    return param.replace(".", "_")


class _MoeFunction(torch.autograd.Function):
    """y, aux, z = layer(x) with x [N, D]; the backward of sum(y dy) + d_aux aux + d_z z."""

    @staticmethod
    def forward(ctx, x, layer, *params):
        core = layer._core
        core.bind([p.data_ptr() for p in params])
        y = torch.empty_like(x)
        fid, before, aux, z, routing = core.forward(x.data_ptr(), x.shape[0], y.data_ptr(),
                                                    layer.training)
        ctx.save_for_backward(x, *params)
        ctx.layer, ctx.fid, ctx.before, ctx.training = layer, fid, before, layer.training
        layer.routing = routing
        return y, x.new_tensor(aux), x.new_tensor(z)

    @staticmethod
    def backward(ctx, dy, d_aux, d_z):
        x, *params = ctx.saved_tensors
        core = ctx.layer._core
        core.bind([p.data_ptr() for p in params])
        dy = dy.contiguous()
        dx = torch.empty_like(x)
        grads = [torch.zeros_like(p) for p in params]
        core.backward(ctx.fid, ctx.before, x.data_ptr(), x.shape[0], ctx.training, dy.data_ptr(),
                      dx.data_ptr(), float(d_aux), float(d_z), [g.data_ptr() for g in grads])
        return (dx, None, *grads)


class MoeLayer(torch.nn.Module):
    """moe.cpp's MoE layer: x [..., D] -> y [..., D].

    The configuration is moe/moe_config.h's, as keyword arguments or a dict (the keys of
    `moe params --json`'s "moe" object): d_model, d_ffn, n_experts, top_k, router ("topk",
    "switch", "noisy_topk", "gshard", "expert_choice", "soft", "hierarchical", "deepseek"),
    act, capacity_factor, aux_loss_coef, z_loss_coef, n_shared, ... An unknown key or an invalid
    combination raises moe_cpp.Error naming it. dtype: torch.float32 or torch.float64. The
    parameters start from the engine's initialisation, drawn from `seed`.

    After each call, `aux_loss` and `z_loss` hold the balancing losses (scalar tensors in the
    graph: add them to the loss to train the router) and `routing` the routing of the call as
    numpy arrays: "offsets" [N + 1], "experts" and "weights" (token t's pairs are
    offsets[t]:offsets[t + 1]), "top_expert" [N], and the counts "routed" and "kept" per expert
    with "load_imbalance", "dropped_fraction", "router_entropy".
    """

    def __init__(self, config=None, *, dtype=torch.float32, seed=0, **kw):
        super().__init__()
        cfg = dict(config or {})
        cfg.update(kw)
        if dtype not in _DTYPES:
            raise Error(f"[moe_cpp] the MoE layer computes in float32 or float64, not {dtype}")
        self._core = _core.Layer(json.dumps(cfg), _DTYPES[dtype], seed)
        self.config = json.loads(self._core.config_json())
        self._names = []
        for name, shape in self._core.params():
            p = torch.nn.Parameter(torch.empty(shape, dtype=dtype))
            self._names.append(_name(name))
            self.register_parameter(_name(name), p)
        with torch.no_grad():
            self._core.copy_params_to([p.data_ptr() for p in self._param_list()])
        self.aux_loss = self.z_loss = None
        self.routing = None

    def _param_list(self):
        return [getattr(self, n) for n in self._names]

    def forward(self, x):
        D = self.config["d_model"]
        if x.shape[-1] != D:
            raise Error(f"[moe_cpp] x must be [..., {D}], got {list(x.shape)}")
        params = self._param_list()
        if x.dtype != params[0].dtype or x.device.type != "cpu":
            raise Error(f"[moe_cpp] x must be a CPU tensor of {params[0].dtype}, got "
                        f"{x.dtype} on {x.device}")
        if any(not p.is_contiguous() or p.dtype != params[0].dtype for p in params):
            raise Error("[moe_cpp] the parameters must stay contiguous, of the layer's dtype")
        flat = x.reshape(-1, D).contiguous()
        y, self.aux_loss, self.z_loss = _MoeFunction.apply(flat, self, *params)
        return y.view(x.shape)

    def after_step(self):
        """Router state updates, once per optimizer step (DeepSeek-V3's bias)."""
        self._core.after_step()

    def extra_repr(self):
        c = self.config
        return (f"d_model={c['d_model']}, d_ffn={c['d_ffn']}, n_experts={c['n_experts']}, "
                f"top_k={c['top_k']}, router={c['router']}")
