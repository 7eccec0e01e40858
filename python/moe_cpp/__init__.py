"""moe.cpp from Python (docs/python.md).

    import torch, moe_cpp
    layer = moe_cpp.MoeLayer(d_model=64, d_ffn=128, n_experts=8, top_k=2)
    y = layer(torch.randn(10, 64))           # [10, 64]; layer.aux_loss, layer.z_loss
    (y.square().mean() + layer.aux_loss).backward()
    layer.routing["experts"]                 # every token's experts, as numpy arrays

    model = moe_cpp.load("out/train/latest")  # a checkpoint folder (ours or HuggingFace's) or GGUF
    ids = model.tokenizer.encode("The cat")
    model.logits(ids)                        # numpy [T, V]
    for tok in model.generate("The ", max_tokens=32, temperature=0.8, seed=1):
        print(tok.text, end="")
    trace = model.routing("Some text")       # every MoE layer's experts and weights per token
    moe_cpp.train(preset="tiny", steps=50, out="out/py")   # the options of `moe train`

The layer is moe.cpp's C++ MoE layer (every router and option of moe/moe_config.h) as a
torch.nn.Module: its parameters are torch Parameters whose memory the C++ layer computes on, the
input and output are torch tensors passed by address, and a torch.autograd.Function pairs its
forward and backward. Engine errors arrive as moe_cpp.Error, with the engine's message.
"""
import codecs
import json
import os
from collections import namedtuple

import numpy as np
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


# ---------------------------------------------------------------------------------------------
# The engine: checkpoints, tokenizers, generation, routing traces, training.

Token = namedtuple("Token", ["id", "text"])


class Tokenizer:
    """The checkpoint's tokenizer (tokenizer.json, SentencePiece, GGUF vocabulary, or this
    engine's bytes): encode(text) -> list of ids, decode(ids) -> text."""

    def __init__(self, core):
        self._core = core

    def encode(self, text):
        return list(self._core.encode(text))

    def decode(self, ids):
        return self._core.decode([int(i) for i in ids]).decode("utf-8", errors="replace")

    def decode_bytes(self, ids):
        return self._core.decode([int(i) for i in ids])


class Routing(list):
    """A text's routing: one entry per MoE layer, each a dict of numpy arrays (offsets [T + 1],
    experts and weights: token t's pairs are offsets[t]:offsets[t + 1]; top_expert [T]).
    `experts_by_token()` and `weights_by_token()` give [layers, T, K] arrays when every token has
    K experts (top-k routers); `load()` the pairs each expert received, [layers, E]."""

    def __init__(self, layers, n_experts, tokens):
        super().__init__(layers)
        self.n_experts = n_experts
        self.tokens = tokens

    def _dense(self, key):
        counts = {int(np.diff(layer["offsets"]).min()) for layer in self} | \
            {int(np.diff(layer["offsets"]).max()) for layer in self}
        if len(counts) != 1:
            raise Error("[moe_cpp] the tokens have different numbers of experts; read the "
                        "offsets instead")
        k = counts.pop()
        return np.stack([layer[key].reshape(-1, k) for layer in self])

    def experts_by_token(self):
        return self._dense("experts")

    def weights_by_token(self):
        return self._dense("weights")

    def load(self):
        return np.stack([np.bincount(layer["experts"][layer["experts"] >= 0],
                                     minlength=self.n_experts) for layer in self])


class Model:
    """A loaded checkpoint. See moe_cpp.load."""

    def __init__(self, path, weights="stored"):
        self._core = _core.Model(os.fspath(path), weights)
        self.path = os.fspath(path)
        self.config = json.loads(self._core.config_json())
        self.vocab_size = self._core.vocab_size()
        self.max_seq_len = self._core.max_seq_len()
        self.tokenizer = Tokenizer(self._core) if self._core.has_tokenizer() else None

    def _ids(self, x):
        if isinstance(x, str):
            if self.tokenizer is None:
                raise Error(f"[moe_cpp] {self.path} has no tokenizer: pass token ids")
            return self.tokenizer.encode(x)
        return [int(i) for i in np.asarray(x).reshape(-1)]

    def logits(self, ids):
        """Logits of every position of `ids` (a list or array of token ids, or a text): a numpy
        array [T, V] (float32)."""
        return self._core.logits(self._ids(ids))

    def routing(self, ids):
        """The routing of a text or of token ids, from one pass: a Routing (per MoE layer)."""
        ids = self._ids(ids)
        moe = self.config.get("moe", {})
        return Routing(self._core.routing(ids), moe.get("n_experts", 0), ids)

    def generate(self, prompt, max_tokens=64, temperature=1.0, top_k=0, top_p=1.0, seed=0,
                 stop_at_eos=True):
        """Yields the generated tokens one at a time as Token(id, text), sampled as `moe
        generate` samples (temperature 0: greedy); text is the token's part of the decoded text
        (a character split across tokens comes with the token that completes it)."""
        ids = self._ids(prompt)
        gen = _core.Generation(self._core, ids, max_tokens, temperature, top_k, top_p, seed,
                               stop_at_eos)
        out, said = [], b""
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        while True:
            tok = gen.next()
            if tok is None:
                return
            out.append(tok)
            text = ""
            if self.tokenizer is not None:
                full = self.tokenizer.decode_bytes(out)
                if full.startswith(said):  # the last token flushes a split character
                    text = utf8.decode(full[len(said):], final=gen.done())
                    said = full
            yield Token(tok, text)

    def __repr__(self):
        c = self.config
        moe = c.get("moe", {})
        return (f"moe_cpp.Model({self.path!r}: {c.get('n_layers')} layers, d_model "
                f"{c.get('d_model')}, {moe.get('n_experts')} experts top-{moe.get('top_k')}, "
                f"vocabulary {self.vocab_size})")


def load(path, weights="stored"):
    """A checkpoint: this engine's folder, a HuggingFace folder (Mixtral, Qwen-MoE, DeepSeek,
    OLMoE, gpt-oss, ...; docs/inference.md) or a GGUF file. weights: "stored" computes from the
    weights as the files store them (mapped), "f32" reads them into float32."""
    return Model(path, weights)


def _cli_args(command, options):
    args = [command]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, (list, tuple)):
            args += [flag, ",".join(str(v) for v in value)]
        else:
            args += [flag, str(value)]
    return args


def train(**options):
    """`moe train` in this process, with its options as keyword arguments (steps=100,
    preset="small", out="out/py", data="corpus.txt", ...: `moe train --help` lists them; a flag
    is True). Returns the folder of the last checkpoint written. Errors raise moe_cpp.Error."""
    rc = _core.run_cli(_cli_args("train", options))
    if rc != 0:
        raise Error(f"[moe_cpp] moe train ended with status {rc}")
    out = options.get("out", "out/train")
    latest = os.path.join(out, "latest")
    if os.path.exists(latest):
        with open(latest) as f:
            return os.path.join(out, f.read().strip())
    return out
