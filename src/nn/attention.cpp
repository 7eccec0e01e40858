// Attention of every supported architecture, forward and backward (docs/model.md): the q, k, v
// projections with their variants (biases, clip_qkv, q/k RMSNorm per head or over the whole
// projection, multi-head latent attention with or without a q compression, rotary embeddings on
// the two halves or on interleaved pairs), shared by training (Model::Impl::run) and decoding
// with a key/value cache (attention_step).
#include <algorithm>
#include <cmath>
#include <cstring>

#include "moe/kernels.h"
#include "moe/weights.h"
#include "nn/layers.h"
#include "nn/model_impl.h"

namespace moe {

namespace {

// y [n, d] = x [n, k] W^T (+ b), W [d, k] (in T, or as stored for float32: moe/weights.h).
template <class T>
void linear(T* y, const T* x, const Tensor& w, const Tensor* b, int64_t n) {
  const int64_t d = w.size(0);
  cpu::bf16_keep(x, n * w.size(1));  // training saves x for the backward: it holds still
  cpu::linear<T>(y, x, n, w);
  if (b && b->defined()) {
    const T* bp = b->data<T>();
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < d; ++j) y[i * d + j] += bp[j];
  }
}

// Backward of linear: dW [d, k] += dy^T x, db [d] += column sums of dy (when defined; neither
// when frozen), dx [n, k] = dy W (accumulate: += instead of =).
template <class T>
void linear_backward(T* dx, bool accumulate, Param& w, Param* b, const T* dy, const T* x,
                     int64_t n) {
  const int64_t d = w.value.size(0), k = w.value.size(1);
  const cpu::Bf16Kept dy_kept(dy, n * d);  // read by both products
  if (!w.frozen) cpu::gemm<T>(true, false, d, k, n, T(1), dy, d, x, k, T(1), w.grad.data<T>(), k);
  if (b && b->value.defined() && !b->frozen) {
    T* db = b->grad.data<T>();
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < d; ++j) db[j] += dy[i * d + j];
  }
  cpu::gemm<T>(false, false, n, k, d, T(1), dy, d, w.value.data<T>(), k, accumulate ? T(1) : T(0),
               dx, k);
}

template <class T>
T* copy_of(const T* x, int64_t n, Arena& arena) {
  T* c = arena.alloc<T>(n);
  std::memcpy(c, x, static_cast<size_t>(n) * sizeof(T));
  return c;
}

// clip_qkv's clamp to [-c, c]; its backward passes the gradient where -c <= x <= c (as
// torch.clamp does) and zeroes it elsewhere.
template <class T>
void clamp(T* x, int64_t n, double c) {
  const T cc = static_cast<T>(c);
  for (int64_t i = 0; i < n; ++i) x[i] = std::clamp(x[i], -cc, cc);
}
template <class T>
void clamp_backward(T* dx, const T* x, int64_t n, double c) {
  const T cc = static_cast<T>(c);
  for (int64_t i = 0; i < n; ++i)
    if (x[i] < -cc || x[i] > cc) dx[i] = 0;
}

}  // namespace

template <class T>
void Model::Impl::qkv_forward(Block& blk, const T* a, int64_t n, const int64_t* pos, T* q, T* k,
                              T* v, Arena& arena, BlockSaved* sv) {
  const int64_t H = cfg.n_heads, KVh = kv_heads(), dk = key_dim(), dv = value_dim();
  const T* cosp = rope_cos.data<T>();
  const T* sinp = rope_sin.data<T>();
  const double eps = cfg.norm_eps;
  if (cfg.mla()) {
    // DeepSeek-V2 (DeepSeek-AI 2024, section 2.1): q from x or from its low-rank compression;
    // [c_kv, k_rope] = x W_kv_a^T; [k_nope, v] per head = RMSNorm(c_kv) W_kv_b^T; k_rope is
    // one rotated head shared by all heads.
    const int64_t nope = cfg.qk_nope_dim, rd = cfg.qk_rope_dim, r = cfg.kv_lora_rank;
    if (cfg.q_lora_rank > 0) {
      const int64_t rq = cfg.q_lora_rank;
      T* cq = arena.alloc<T>(n * rq);
      T* cqn = arena.alloc<T>(n * rq);
      T* rstd = arena.alloc<T>(n);
      linear<T>(cq, a, blk.wq_a.value, nullptr, n);
      nn::rmsnorm_forward<T>(cqn, rstd, cq, blk.q_a_norm.value.data<T>(), n, rq, eps);
      linear<T>(q, cqn, blk.wq_b.value, nullptr, n);
      if (sv) {
        sv->cq = cq;
        sv->cqn = cqn;
        sv->cq_rstd = rstd;
      }
    } else {
      linear<T>(q, a, blk.wq.value, nullptr, n);
    }
    T* ckv = arena.alloc<T>(n * (r + rd));
    linear<T>(ckv, a, blk.wkv_a.value, nullptr, n);
    T* c = arena.alloc<T>(n * r);
    T* cn = arena.alloc<T>(n * r);
    T* rstd = arena.alloc<T>(n);
    for (int64_t i = 0; i < n; ++i)
      std::memcpy(c + i * r, ckv + i * (r + rd), static_cast<size_t>(r) * sizeof(T));
    nn::rmsnorm_forward<T>(cn, rstd, c, blk.kv_a_norm.value.data<T>(), n, r, eps);
    T* kvb = arena.alloc<T>(n * H * (nope + dv));
    linear<T>(kvb, cn, blk.wkv_b.value, nullptr, n);
    nn::rope_at<T>(ckv, cosp, sinp, pos, n, 1, r + rd, r, rd, cfg.rope_interleave);
    nn::rope_at<T>(q, cosp, sinp, pos, n, H, dk, nope, rd, cfg.rope_interleave);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t hh = 0; hh < H; ++hh) {
        const T* src = kvb + (i * H + hh) * (nope + dv);
        T* kd = k + (i * H + hh) * dk;
        std::memcpy(kd, src, static_cast<size_t>(nope) * sizeof(T));
        std::memcpy(kd + nope, ckv + i * (r + rd) + r, static_cast<size_t>(rd) * sizeof(T));
        std::memcpy(v + (i * H + hh) * dv, src + nope, static_cast<size_t>(dv) * sizeof(T));
      }
    if (sv) {
      sv->c = c;
      sv->cn = cn;
      sv->c_rstd = rstd;
    }
    return;
  }
  linear<T>(q, a, blk.wq.value, &blk.b_q.value, n);
  linear<T>(k, a, blk.wk.value, &blk.b_k.value, n);
  linear<T>(v, a, blk.wv.value, &blk.b_v.value, n);
  if (cfg.clip_qkv > 0) {
    if (sv) {
      sv->q_lin = copy_of(q, n * H * dk, arena);
      sv->k_lin = copy_of(k, n * KVh * dk, arena);
      sv->v_lin = copy_of(v, n * KVh * dv, arena);
    }
    clamp(q, n * H * dk, cfg.clip_qkv);
    clamp(k, n * KVh * dk, cfg.clip_qkv);
    clamp(v, n * KVh * dv, cfg.clip_qkv);
  }
  if (cfg.qk_norm != QkNorm::none) {
    // Per head: rows of dk (one weight shared by the heads); full: rows of the whole projection.
    const bool full = cfg.qk_norm == QkNorm::full;
    const int64_t qrows = full ? n : n * H, krows = full ? n : n * KVh;
    const int64_t qw = full ? H * dk : dk, kw = full ? KVh * dk : dk;
    T* q_pre = copy_of(q, n * H * dk, arena);
    T* k_pre = copy_of(k, n * KVh * dk, arena);
    T* q_rstd = arena.alloc<T>(qrows);
    T* k_rstd = arena.alloc<T>(krows);
    nn::rmsnorm_forward<T>(q, q_rstd, q_pre, blk.q_norm.value.data<T>(), qrows, qw, eps);
    nn::rmsnorm_forward<T>(k, k_rstd, k_pre, blk.k_norm.value.data<T>(), krows, kw, eps);
    if (sv) {
      sv->q_pre = q_pre;
      sv->k_pre = k_pre;
      sv->q_rstd = q_rstd;
      sv->k_rstd = k_rstd;
    }
  }
  nn::rope_at<T>(q, cosp, sinp, pos, n, H, dk, 0, dk, cfg.rope_interleave);
  nn::rope_at<T>(k, cosp, sinp, pos, n, KVh, dk, 0, dk, cfg.rope_interleave);
}

template <class T>
void Model::Impl::qkv_backward(Block& blk, const T* a, int64_t n, const int64_t* pos, T* dq, T* dk,
                               T* dv, T* da, Arena& arena, const BlockSaved& sv) {
  const int64_t H = cfg.n_heads, KVh = kv_heads(), dkw = key_dim(), dvw = value_dim();
  const T* cosp = rope_cos.data<T>();
  const T* sinp = rope_sin.data<T>();
  if (cfg.mla()) {
    const int64_t nope = cfg.qk_nope_dim, rd = cfg.qk_rope_dim, r = cfg.kv_lora_rank;
    // Queries: rotate the rope part's gradient back, then through the projections.
    nn::rope_at<T>(dq, cosp, sinp, pos, n, H, dkw, nope, rd, cfg.rope_interleave, true);
    if (cfg.q_lora_rank > 0) {
      const int64_t rq = cfg.q_lora_rank;
      T* dcqn = arena.alloc<T>(n * rq);
      T* dcq = arena.alloc<T>(n * rq);
      linear_backward<T>(dcqn, false, blk.wq_b, nullptr, dq, static_cast<const T*>(sv.cqn), n);
      nn::rmsnorm_backward<T>(dcq, blk.q_a_norm.grad.data<T>(), dcqn, static_cast<const T*>(sv.cq),
                              blk.q_a_norm.value.data<T>(), static_cast<const T*>(sv.cq_rstd), n,
                              rq);
      linear_backward<T>(da, false, blk.wq_a, nullptr, dcq, a, n);
    } else {
      linear_backward<T>(da, false, blk.wq, nullptr, dq, a, n);
    }
    // Keys and values: [k_nope, v] per head came from W_kv_b; k_rope, shared by the heads,
    // from the last rd columns of a W_kv_a^T.
    T* dkvb = arena.alloc<T>(n * H * (nope + dvw));
    T* dckv = arena.alloc<T>(n * (r + rd));
    for (int64_t i = 0; i < n; ++i) {
      T* drope = dckv + i * (r + rd) + r;
      std::fill_n(drope, rd, T(0));
      for (int64_t hh = 0; hh < H; ++hh) {
        const T* dkh = dk + (i * H + hh) * dkw;
        T* dst = dkvb + (i * H + hh) * (nope + dvw);
        std::memcpy(dst, dkh, static_cast<size_t>(nope) * sizeof(T));
        std::memcpy(dst + nope, dv + (i * H + hh) * dvw, static_cast<size_t>(dvw) * sizeof(T));
        for (int64_t j = 0; j < rd; ++j) drope[j] += dkh[nope + j];
      }
    }
    nn::rope_at<T>(dckv, cosp, sinp, pos, n, 1, r + rd, r, rd, cfg.rope_interleave, true);
    T* dcn = arena.alloc<T>(n * r);
    T* dc = arena.alloc<T>(n * r);
    linear_backward<T>(dcn, false, blk.wkv_b, nullptr, dkvb, static_cast<const T*>(sv.cn), n);
    nn::rmsnorm_backward<T>(dc, blk.kv_a_norm.grad.data<T>(), dcn, static_cast<const T*>(sv.c),
                            blk.kv_a_norm.value.data<T>(), static_cast<const T*>(sv.c_rstd), n, r);
    for (int64_t i = 0; i < n; ++i)
      std::memcpy(dckv + i * (r + rd), dc + i * r, static_cast<size_t>(r) * sizeof(T));
    linear_backward<T>(da, true, blk.wkv_a, nullptr, dckv, a, n);
    return;
  }
  nn::rope_at<T>(dq, cosp, sinp, pos, n, H, dkw, 0, dkw, cfg.rope_interleave, true);
  nn::rope_at<T>(dk, cosp, sinp, pos, n, KVh, dkw, 0, dkw, cfg.rope_interleave, true);
  if (cfg.qk_norm != QkNorm::none) {
    const bool full = cfg.qk_norm == QkNorm::full;
    const int64_t qrows = full ? n : n * H, krows = full ? n : n * KVh;
    const int64_t qw = full ? H * dkw : dkw, kw = full ? KVh * dkw : dkw;
    T* dq_pre = arena.alloc<T>(n * H * dkw);
    T* dk_pre = arena.alloc<T>(n * KVh * dkw);
    nn::rmsnorm_backward<T>(dq_pre, blk.q_norm.grad.data<T>(), dq, static_cast<const T*>(sv.q_pre),
                            blk.q_norm.value.data<T>(), static_cast<const T*>(sv.q_rstd), qrows,
                            qw);
    nn::rmsnorm_backward<T>(dk_pre, blk.k_norm.grad.data<T>(), dk, static_cast<const T*>(sv.k_pre),
                            blk.k_norm.value.data<T>(), static_cast<const T*>(sv.k_rstd), krows,
                            kw);
    std::memcpy(dq, dq_pre, static_cast<size_t>(n * H * dkw) * sizeof(T));
    std::memcpy(dk, dk_pre, static_cast<size_t>(n * KVh * dkw) * sizeof(T));
  }
  if (cfg.clip_qkv > 0) {
    clamp_backward(dq, static_cast<const T*>(sv.q_lin), n * H * dkw, cfg.clip_qkv);
    clamp_backward(dk, static_cast<const T*>(sv.k_lin), n * KVh * dkw, cfg.clip_qkv);
    clamp_backward(dv, static_cast<const T*>(sv.v_lin), n * KVh * dvw, cfg.clip_qkv);
  }
  linear_backward<T>(da, false, blk.wq, &blk.b_q, dq, a, n);
  linear_backward<T>(da, true, blk.wk, &blk.b_k, dk, a, n);
  linear_backward<T>(da, true, blk.wv, &blk.b_v, dv, a, n);
}

template <class T>
void Model::Impl::attention_step(Block& blk, const T* a, int64_t B, int64_t Tq, const int64_t* pos,
                                 const int64_t* slot, const int64_t* start, Tensor& kc, Tensor& vc,
                                 int64_t cap, T* out, Arena& arena) {
  const int64_t N = B * Tq, H = cfg.n_heads;
  const int64_t KVh = kv_heads(), dk = key_dim(), dv = value_dim();
  T* q = arena.alloc<T>(N * H * dk);
  T* k = arena.alloc<T>(N * KVh * dk);
  T* v = arena.alloc<T>(N * KVh * dv);
  qkv_forward<T>(blk, a, N, pos, q, k, v, arena, nullptr);
  // Append the new keys and values to the cache, then attend.
  T* kcp = kc.data<T>();
  T* vcp = vc.data<T>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < Tq; ++t) {
      const int64_t row = (slot[b] * cap + start[b] + t) * KVh;
      std::memcpy(kcp + row * dk, k + (b * Tq + t) * KVh * dk,
                  static_cast<size_t>(KVh * dk) * sizeof(T));
      std::memcpy(vcp + row * dv, v + (b * Tq + t) * KVh * dv,
                  static_cast<size_t>(KVh * dv) * sizeof(T));
    }
  T* att = arena.alloc<T>(N * H * dv);
  nn::attention_cached<T>(att, q, kcp, vcp, slot, start, B, Tq, H, KVh, dk, dv, cap, blk.window,
                          cfg.attn_scale_mult / std::sqrt(static_cast<double>(dk)),
                          cfg.attn_sinks ? blk.sinks.value.data<T>() : nullptr);
  linear<T>(out, att, blk.wo.value, cfg.o_bias ? &blk.b_o.value : nullptr, N);
}

#define MOE_INSTANTIATE(T)                                                                         \
  template void Model::Impl::qkv_forward<T>(Block&, const T*, int64_t, const int64_t*, T*, T*, T*, \
                                            Arena&, BlockSaved*);                                  \
  template void Model::Impl::qkv_backward<T>(Block&, const T*, int64_t, const int64_t*, T*, T*,    \
                                             T*, T*, Arena&, const BlockSaved&);                   \
  template void Model::Impl::attention_step<T>(Block&, const T*, int64_t, int64_t, const int64_t*, \
                                               const int64_t*, const int64_t*, Tensor&, Tensor&,   \
                                               int64_t, T*, Arena&);
MOE_INSTANTIATE(float)
MOE_INSTANTIATE(double)
#undef MOE_INSTANTIATE

}  // namespace moe
