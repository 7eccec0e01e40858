// The transformer language model (see moe/model.h and docs/model.md): parameters, and the
// forward and backward of the whole network over one batch.
#include "moe/model.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <nlohmann/json.hpp>

#include "moe/json_read.h"
#include "moe/kernels.h"
#include "moe/weights.h"
#include "nn/layers.h"
#include "nn/model_impl.h"

namespace moe {

// ---------------------------------------------------------------------------------------------
// Model

template <class T>
void Model::Impl::norm_forward(T* out, T* rstd, const T* x, const Param& g, int64_t n) const {
  if (cfg.norm == NormKind::layer) {
    nn::layernorm_forward<T>(out, x, g.value.data<T>(), n, cfg.d_model, cfg.norm_eps);
  } else {
    nn::rmsnorm_forward<T>(out, rstd, x, g.value.data<T>(), n, cfg.d_model, cfg.norm_eps);
  }
}

template <class T>
void Model::Impl::norm_backward(T* dx, Param& g, const T* dout, const T* x, const T* rstd,
                                int64_t n) const {
  if (cfg.norm == NormKind::layer) {
    nn::layernorm_backward<T>(dx, g.grad.data<T>(), dout, x, g.value.data<T>(), n, cfg.d_model,
                              cfg.norm_eps);
  } else {
    nn::rmsnorm_backward<T>(dx, g.grad.data<T>(), dout, x, g.value.data<T>(), rstd, n, cfg.d_model);
  }
}

template <class T>
T** Model::Impl::joint_aux(ModelOutput& out, int64_t n, bool backward, double scale, Arena& arena) {
  // transformers' load_balancing_loss_func: the router logits of every MoE layer stacked into
  // R = layers * tokens rows; p = softmax per row; f_e = (rows whose top k hold e) / R;
  // P_e = sum of p_e / R; loss = coef * E * sum_e f_e P_e. Its gradient reaches each layer's
  // logits through P only: d loss / d p_te = coef * E * f_e / R.
  const int64_t E = cfg.moe.n_experts, L = static_cast<int64_t>(moe_layers.size());
  if (L == 0) return nullptr;
  std::vector<double> st(static_cast<size_t>(2 * E + 1), 0.0);  // counts E | prob sums E | rows
  T** probs = arena.alloc<T*>(L);
  size_t mi = 0;
  for (Block& blk : blocks) {
    if (!blk.moe) continue;
    const T* logits = blk.moe_out.router_logits.template data<T>();
    T* p = arena.alloc<T>(n * E);
    for (int64_t t = 0; t < n; ++t) {
      const T* z = logits + t * E;
      const T mx = *std::max_element(z, z + E);
      T sum = 0;
      for (int64_t e = 0; e < E; ++e) sum += p[t * E + e] = std::exp(z[e] - mx);
      for (int64_t e = 0; e < E; ++e) {
        p[t * E + e] /= sum;
        st[static_cast<size_t>(E + e)] += static_cast<double>(p[t * E + e]);
      }
    }
    const Tensor& experts = out.plan_experts[mi];
    for (int64_t i = 0; i < experts.numel(); ++i)
      st[static_cast<size_t>(experts.data<int32_t>()[i])] += 1;
    st[static_cast<size_t>(2 * E)] += static_cast<double>(n);
    probs[mi++] = p;
  }
  if (groups) groups->world.sum(st.data(), 2 * E + 1);
  const double rows = st[static_cast<size_t>(2 * E)], coef = cfg.joint_aux_loss_coef;
  double aux = 0;
  for (int64_t e = 0; e < E; ++e)
    aux += st[static_cast<size_t>(e)] / rows * st[static_cast<size_t>(E + e)] / rows;
  out.aux_loss += coef * static_cast<double>(E) * aux;
  if (!backward) return nullptr;
  T** dlogits = arena.alloc<T*>(L);
  std::vector<T> g(static_cast<size_t>(E));
  for (int64_t e = 0; e < E; ++e)
    g[static_cast<size_t>(e)] = static_cast<T>(scale * coef * static_cast<double>(E) *
                                               st[static_cast<size_t>(e)] / (rows * rows));
  for (int64_t l = 0; l < L; ++l) {
    T* d = dlogits[l] = arena.alloc<T>(n * E);
    for (int64_t t = 0; t < n; ++t) {
      const T* p = probs[l] + t * E;
      T dot = 0;
      for (int64_t e = 0; e < E; ++e) dot += p[e] * g[static_cast<size_t>(e)];
      for (int64_t e = 0; e < E; ++e) d[t * E + e] = p[e] * (g[static_cast<size_t>(e)] - dot);
    }
  }
  return dlogits;
}

template <class T>
T* Model::Impl::block_forward(Block& blk, T* h, int64_t B, int64_t Tn, const int64_t* pos,
                              Arena& arena, ModelOutput& out, size_t& mi) {
  const int64_t D = cfg.d_model, H = cfg.n_heads, N = B * Tn;
  const int64_t KVh = kv_heads(), dk = key_dim(), dv = value_dim();
  BlockSaved& s = blk.saved;
  s = {};
  s.h_in = h;
  T* a = arena.alloc<T>(N * D);
  T* a_rstd = arena.alloc<T>(N);
  norm_forward<T>(a, a_rstd, h, blk.attn_norm, N);
  T* q = arena.alloc<T>(N * H * dk);
  T* k = arena.alloc<T>(N * KVh * dk);
  T* v = arena.alloc<T>(N * KVh * dv);
  qkv_forward<T>(blk, a, N, pos, q, k, v, arena, &s);
  T* probs = arena.alloc<T>(B * H * Tn * Tn);
  T* att = arena.alloc<T>(N * H * dv);
  nn::attention_forward<T>(att, probs, q, k, v, B, Tn, H, KVh, dk, dv, blk.window,
                           cfg.attn_sinks ? blk.sinks.value.data<T>() : nullptr,
                           cfg.attn_scale_mult);
  cpu::bf16_keep(att, N * H * dv);  // saved for the backward
  T* h_mid = arena.alloc<T>(N * D);
  std::memcpy(h_mid, h, static_cast<size_t>(N * D) * sizeof(T));
  if (blk.wo.value.dtype() == dtype_of<T>()) {
    cpu::gemm<T>(false, true, N, D, H * dv, T(1), att, H * dv, blk.wo.value.data<T>(), H * dv, T(1),
                 h_mid, D);
  } else {  // weights as stored (inference only)
    T* o = arena.alloc<T>(N * D);
    cpu::linear<T>(o, att, N, blk.wo.value);
    for (int64_t i = 0; i < N * D; ++i) h_mid[i] += o[i];
  }
  if (cfg.o_bias) {
    const T* bo = blk.b_o.value.data<T>();
    for (int64_t i = 0; i < N; ++i)
      for (int64_t d = 0; d < D; ++d) h_mid[i * D + d] += bo[d];
  }
  T* f = arena.alloc<T>(N * D);
  T* f_rstd = arena.alloc<T>(N);
  norm_forward<T>(f, f_rstd, h_mid, blk.ffn_norm, N);
  Tensor ft = Tensor::view(f, {N, D}, dtype_of<T>());
  Tensor y;
  if (blk.moe) {
    MoeOutput& mo = blk.moe_out;
    blk.moe->forward(ft, arena, mo);
    out.aux_loss += mo.aux_loss;
    out.z_loss += mo.z_loss;
    out.routing[mi] = mo.stats;
    out.plan_offsets[mi] = mo.plan_offsets;
    out.plan_experts[mi] = mo.plan_experts;
    out.plan_weights[mi] = mo.plan_weights;
    out.top_expert[mi] = mo.top_expert;
    ++mi;
    y = mo.y;
  } else {
    y = blk.dense->forward(ft, arena);
  }
  T* h_out = arena.alloc<T>(N * D);
  const T* yp = y.data<T>();
  for (int64_t i = 0; i < N * D; ++i) h_out[i] = h_mid[i] + yp[i];
  s.h_mid = h_mid;
  s.a = a;
  s.a_rstd = a_rstd;
  s.f = f;
  s.f_rstd = f_rstd;
  s.q = q;
  s.k = k;
  s.v = v;
  s.probs = probs;
  s.att = att;
  return h_out;
}

template <class T>
BackwardScratch<T> Model::Impl::backward_scratch(int64_t N, int64_t Tn, Arena& arena) const {
  const int64_t D = cfg.d_model, H = cfg.n_heads;
  const int64_t KVh = kv_heads(), dk = key_dim(), dv = value_dim();
  BackwardScratch<T> sc;
  sc.tmp = arena.alloc<T>(N * D);
  sc.dmid = arena.alloc<T>(N * D);
  sc.dq = arena.alloc<T>(N * H * dk);
  sc.dkk = arena.alloc<T>(N * KVh * dk);
  sc.dvv = arena.alloc<T>(N * KVh * dv);
  sc.datt = arena.alloc<T>(N * H * dv);
  sc.scratch = arena.alloc<T>(static_cast<int64_t>(omp_get_max_threads()) * 2 * Tn * Tn);
  return sc;
}

template <class T>
void Model::Impl::block_backward(Block& blk, T* dh, int64_t B, int64_t Tn, const int64_t* pos,
                                 const BackwardScratch<T>& sc, Arena& arena, double scale,
                                 T** joint_dlogits, size_t& mi) {
  const int64_t D = cfg.d_model, H = cfg.n_heads, N = B * Tn;
  const int64_t KVh = kv_heads(), dk = key_dim(), dv = value_dim();
  BlockSaved& s = blk.saved;
  Tensor dh_t = Tensor::view(dh, {N, D}, dtype_of<T>());
  Tensor df_t = Tensor::view(sc.tmp, {N, D}, dtype_of<T>());
  // h_out = h_mid + FFN(norm(h_mid)).
  if (blk.moe) {
    --mi;
    Tensor extra;
    if (joint_dlogits)
      extra = Tensor::view(joint_dlogits[mi], {N, cfg.moe.n_experts}, dtype_of<T>());
    blk.moe->backward(dh_t, df_t, arena, scale, scale, joint_dlogits ? &extra : nullptr);
  } else {
    blk.dense->backward(dh_t, df_t, arena);
  }
  norm_backward<T>(sc.dmid, blk.ffn_norm, sc.tmp, static_cast<T*>(s.h_mid),
                   static_cast<T*>(s.f_rstd), N);
  for (int64_t i = 0; i < N * D; ++i) dh[i] += sc.dmid[i];
  // h_mid = h_in + att W_o^T.
  {
    const cpu::Bf16Kept dh_kept(dh, N * D);  // read by both products, then added to again
    if (!blk.wo.frozen)
      cpu::gemm<T>(true, false, D, H * dv, N, T(1), dh, D, static_cast<T*>(s.att), H * dv, T(1),
                   blk.wo.grad.data<T>(), H * dv);
    cpu::gemm<T>(false, false, N, H * dv, D, T(1), dh, D, blk.wo.value.data<T>(), H * dv, T(0),
                 sc.datt, H * dv);
  }
  if (cfg.o_bias && !blk.b_o.frozen) {  // column sums in row order
    T* db = blk.b_o.grad.data<T>();
    for (int64_t i = 0; i < N; ++i)
      for (int64_t d = 0; d < D; ++d) db[d] += dh[i * D + d];
  }
  nn::attention_backward<T>(
      sc.dq, sc.dkk, sc.dvv, sc.scratch, sc.datt, static_cast<T*>(s.q), static_cast<T*>(s.k),
      static_cast<T*>(s.v), static_cast<T*>(s.probs), B, Tn, H, KVh, dk, dv,
      cfg.attn_sinks && !blk.sinks.frozen ? blk.sinks.grad.data<T>() : nullptr,
      cfg.attn_scale_mult);
  qkv_backward<T>(blk, static_cast<T*>(s.a), N, pos, sc.dq, sc.dkk, sc.dvv, sc.tmp, arena, s);
  norm_backward<T>(sc.dmid, blk.attn_norm, sc.tmp, static_cast<T*>(s.h_in),
                   static_cast<T*>(s.a_rstd), N);
  for (int64_t i = 0; i < N * D; ++i) dh[i] += sc.dmid[i];
}

#define MOE_INSTANTIATE(T)                                                                        \
  template T* Model::Impl::block_forward<T>(Block&, T*, int64_t, int64_t, const int64_t*, Arena&, \
                                            ModelOutput&, size_t&);                               \
  template BackwardScratch<T> Model::Impl::backward_scratch<T>(int64_t, int64_t, Arena&) const;   \
  template void Model::Impl::block_backward<T>(Block&, T*, int64_t, int64_t, const int64_t*,      \
                                               const BackwardScratch<T>&, Arena&, double, T**,    \
                                               size_t&);                                          \
  template void Model::Impl::norm_forward<T>(T*, T*, const T*, const Param&, int64_t) const;      \
  template void Model::Impl::norm_backward<T>(T*, Param&, const T*, const T*, const T*, int64_t)  \
      const;
MOE_INSTANTIATE(float)
MOE_INSTANTIATE(double)
#undef MOE_INSTANTIATE

template <class T>
void Model::Impl::run(const Tensor& tokens, Arena& arena, bool backward, double scale,
                      ModelOutput& out, const SoftTargets* soft) {
  const char* w = "model";
  MOE_CHECK(tokens.ndim() == 2 && tokens.dtype() == DType::I32, w,
            "tokens must be i32[B, T+1], got {}", tokens.str());
  const int64_t B = tokens.size(0), T1 = tokens.size(1);
  MOE_CHECK(B >= 1 && T1 >= 2, w, "need at least one sequence of two tokens, got {}", tokens.str());
  // Positions the network runs: the first T1 - 1 (each predicts the next token), or all T1 with
  // transformers_loss (the last predicts nothing).
  const int64_t Tn = cfg.transformers_loss ? T1 : T1 - 1;
  MOE_CHECK(!backward || !stored, w,
            "this model keeps its weights as the checkpoint stores them (bf16 or f16), which runs "
            "inference only; training loads float32 master weights (moe train --init-from)");
  MOE_CHECK(Tn <= cfg.max_seq_len, w, "sequence length {} exceeds max_seq_len = {}", Tn,
            cfg.max_seq_len);
  const int64_t V = cfg.vocab_size, D = cfg.d_model, N = B * Tn;
  const int64_t Np = B * (T1 - 1);  // predicted tokens
  const int32_t* tok = tokens.data<int32_t>();
  for (int64_t i = 0; i < B * T1; ++i)
    MOE_CHECK(tok[i] >= 0 && tok[i] < V, w,
              "token {} at [{}, {}] is outside the vocabulary [0, {})", tok[i], i / T1, i % T1, V);
  int32_t* inputs = arena.alloc<int32_t>(N);
  int32_t* targets = arena.alloc<int32_t>(Np);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < Tn; ++t) inputs[b * Tn + t] = tok[b * T1 + t];
    for (int64_t t = 0; t + 1 < T1; ++t) targets[b * (T1 - 1) + t] = tok[b * T1 + t + 1];
  }
  int64_t* pos = arena.alloc<int64_t>(N);
  for (int64_t i = 0; i < N; ++i) pos[i] = i % Tn;
  nn::SoftTargetsRef<T> soft_ref;
  if (soft) {
    const Tensor& t = soft->logits;
    MOE_CHECK(t.dtype() == dtype_of<T>() && t.shape() == Shape({B, T1 - 1, V}), w,
              "the soft targets' logits must be {}[{}, {}, {}] for tokens {}, got {}",
              dtype_name(dtype_of<T>()), B, T1 - 1, V, tokens.str(), t.str());
    MOE_CHECK(soft->weight >= 0 && soft->weight <= 1, w,
              "the soft targets' weight must be in [0, 1], got {}", soft->weight);
    soft_ref = {t.data<T>(), soft->weight, arena.alloc<double>(Np), 0};
  }

  // Forward. `out` keeps its vectors' capacity: one entry per MoE layer, assigned in place.
  const size_t n_moe = moe_layers.size();
  out.loss = out.ce_loss = out.soft_loss = out.aux_loss = out.z_loss = 0;
  out.routing.resize(n_moe);
  out.plan_offsets.resize(n_moe);
  out.plan_experts.resize(n_moe);
  out.plan_weights.resize(n_moe);
  out.top_expert.resize(n_moe);
  size_t mi = 0;
  T* h = arena.alloc<T>(N * D);
  embed_rows<T>(h, inputs, N);
  for (Block& blk : blocks) h = block_forward<T>(blk, h, B, Tn, pos, arena, out, mi);
  T* z = arena.alloc<T>(N * D);
  T* z_rstd = arena.alloc<T>(N);
  norm_forward<T>(z, z_rstd, h, final_norm, N);
  Tensor logits = arena.tensor({B, Tn, V}, dtype_of<T>());
  T* lg = logits.data<T>();
  cpu::bf16_keep(z, N * D);  // saved for the backward
  cpu::linear<T>(lg, z, N, lm_head.value);
  // The rows of the predicted tokens: all, or all but each sequence's last position.
  T* lp = lg;
  if (Np != N) {
    lp = arena.alloc<T>(Np * V);
    for (int64_t b = 0; b < B; ++b)
      std::memcpy(lp + b * (T1 - 1) * V, lg + b * Tn * V,
                  static_cast<size_t>((T1 - 1) * V) * sizeof(T));
  }
  T* dlp = backward ? arena.alloc<T>(Np * V) : nullptr;
  nn::SoftTargetsRef<T>* sp = soft ? &soft_ref : nullptr;
  if (groups) {
    // This rank holds Np of the batch's predicted tokens: the loss is the mean over all of them.
    const double nd = static_cast<double>(Np), n_all = groups->world.sum(nd);
    const double ce = nn::cross_entropy<T>(dlp, arena.alloc<double>(Np), lp, targets, Np, V,
                                           scale * nd / n_all, sp);
    out.ce_loss = groups->world.sum(ce * nd) / n_all;
    if (soft) out.soft_loss = groups->world.sum(soft_ref.loss * nd) / n_all;
  } else {
    out.ce_loss = nn::cross_entropy<T>(dlp, arena.alloc<double>(Np), lp, targets, Np, V, scale, sp);
    out.soft_loss = soft_ref.loss;
  }
  T* dlogits = dlp;
  if (backward && Np != N) {
    dlogits = arena.alloc<T>(N * V);
    std::fill_n(dlogits, N * V, T(0));
    for (int64_t b = 0; b < B; ++b)
      std::memcpy(dlogits + b * Tn * V, dlp + b * (T1 - 1) * V,
                  static_cast<size_t>((T1 - 1) * V) * sizeof(T));
  }
  T** joint_dlogits =
      cfg.joint_aux_loss_coef > 0 ? joint_aux<T>(out, N, backward, scale, arena) : nullptr;
  out.mtp_loss = 0;
  out.mtp_ce.clear();
  if (!mtp.empty()) mtp_forward<T>(tok, B, T1, Tn, z, arena, backward, scale, out, mi);
  const double alpha = soft ? soft->weight : 0;
  out.loss = (1 - alpha) * out.ce_loss + alpha * out.soft_loss + out.aux_loss + out.z_loss +
             cfg.mtp_weight * out.mtp_loss;
  if (!backward) return;

  // Backward.
  T* dz = arena.alloc<T>(N * D);
  {
    const cpu::Bf16Kept dlogits_kept(dlogits, N * V);  // read by both products
    if (!lm_head.frozen)
      cpu::gemm<T>(true, false, V, D, N, T(1), dlogits, V, z, D, T(1), lm_head.grad.data<T>(), D);
    cpu::gemm<T>(false, false, N, D, V, T(1), dlogits, V, lm_head.value.data<T>(), D, T(0), dz, D);
  }
  const BackwardScratch<T> sc = backward_scratch<T>(N, Tn, arena);
  if (!mtp.empty()) mtp_backward<T>(B, Tn, dz, sc, arena, scale, mi);
  T* dh = arena.alloc<T>(N * D);
  norm_backward<T>(dh, final_norm, dz, h, z_rstd, N);
  for (size_t li = blocks.size(); li-- > 0;)
    block_backward<T>(blocks[li], dh, B, Tn, pos, sc, arena, scale, joint_dlogits, mi);
  if (!embed.frozen) nn::embedding_backward<T>(embed.grad.data<T>(), dh, inputs, N, D);
}

// ---------------------------------------------------------------------------------------------
// Inference with a key/value cache

template <class T>
Tensor Model::Impl::decode(const Tensor& tokens, KvCache& cache, Arena& arena,
                           const std::vector<int64_t>& slots, std::vector<Tensor>* router_logits,
                           ModelOutput* routing, Model::LogitRows rows, Tensor* hidden) {
  const char* w = "model.decode";
  MOE_CHECK(tokens.ndim() == 2 && tokens.dtype() == DType::I32, w,
            "tokens must be i32[B, T], got {}", tokens.str());
  const int64_t B = tokens.size(0), Tq = tokens.size(1), N = B * Tq;
  const int64_t V = cfg.vocab_size, D = cfg.d_model;
  MOE_CHECK(B >= 1 && Tq >= 1, w, "need at least one token, got {}", tokens.str());
  MOE_CHECK(cache.k.size() == blocks.size() && cache.v.size() == blocks.size(), w,
            "the cache was not made by this model");
  MOE_CHECK(slots.empty() || static_cast<int64_t>(slots.size()) == B, w,
            "{} slots for {} sequences", slots.size(), B);
  int64_t* slot = arena.alloc<int64_t>(B);
  int64_t* start = arena.alloc<int64_t>(B);
  int64_t* pos = arena.alloc<int64_t>(N);
  for (int64_t b = 0; b < B; ++b) {
    slot[b] = slots.empty() ? b : slots[static_cast<size_t>(b)];
    MOE_CHECK(slot[b] >= 0 && slot[b] < cache.slots, w, "slot {} is outside the cache's {} slots",
              slot[b], cache.slots);
    for (int64_t c = 0; c < b; ++c)
      MOE_CHECK(slot[c] != slot[b], w, "slot {} is given twice", slot[b]);
    start[b] = cache.length[static_cast<size_t>(slot[b])];
    MOE_CHECK(start[b] + Tq <= cache.capacity, w,
              "sequence in slot {} would reach {} positions, beyond the cache's {}", slot[b],
              start[b] + Tq, cache.capacity);
    for (int64_t t = 0; t < Tq; ++t) pos[b * Tq + t] = start[b] + t;
  }
  const int32_t* tok = tokens.data<int32_t>();
  for (int64_t i = 0; i < N; ++i)
    MOE_CHECK(tok[i] >= 0 && tok[i] < V, w,
              "token {} at [{}, {}] is outside the vocabulary [0, {})", tok[i], i / Tq, i % Tq, V);
  T* rstd = arena.alloc<T>(N);
  auto norm = [&](T* out, const T* x, const Param& g, int64_t n) {
    norm_forward<T>(out, rstd, x, g, n);
  };
  T* h = arena.alloc<T>(N * D);
  embed_rows<T>(h, tok, N);
  T* a = arena.alloc<T>(N * D);
  T* o = arena.alloc<T>(N * D);
  if (router_logits) router_logits->clear();
  if (routing) {
    const size_t n_moe = n_main_moe;  // decoding runs the main model's layers, not the MTP ones
    routing->aux_loss = routing->z_loss = 0;
    routing->routing.resize(n_moe);
    routing->plan_offsets.resize(n_moe);
    routing->plan_experts.resize(n_moe);
    routing->plan_weights.resize(n_moe);
    routing->top_expert.resize(n_moe);
  }
  size_t mi = 0;
  // Each layer's scratch dies with it, unless its routing is handed back (router_logits and
  // routing view the arena): the pass then holds one layer's scratch, not all of them.
  const bool scratch_per_layer = !router_logits && !routing;
  for (size_t li = 0; li < blocks.size(); ++li) {
    const Arena::Mark layer_start = arena.mark();
    Block& blk = blocks[li];
    norm(a, h, blk.attn_norm, N);
    attention_step<T>(blk, a, B, Tq, pos, slot, start, cache.k[li], cache.v[li], cache.capacity, o,
                      arena);
    for (int64_t i = 0; i < N * D; ++i) h[i] += o[i];
    norm(a, h, blk.ffn_norm, N);
    const Tensor at = Tensor::view(a, {N, D}, dtype_of<T>());
    Tensor y;
    if (blk.moe) {
      if (source && source->wants_prefetch())
        for (size_t next = li + 1; next < blocks.size(); ++next)
          if (blocks[next].moe) {
            guess_next_experts<T>(a, N, next, static_cast<int64_t>(mi) + 1, arena);
            break;
          }
      MoeOutput mo = moe_inference(blk, at, arena);
      if (router_logits) router_logits->push_back(mo.router_logits);
      if (routing) {
        routing->aux_loss += mo.aux_loss;
        routing->z_loss += mo.z_loss;
        routing->routing[mi] = mo.stats;
        routing->plan_offsets[mi] = mo.plan_offsets;
        routing->plan_experts[mi] = mo.plan_experts;
        routing->plan_weights[mi] = mo.plan_weights;
        routing->top_expert[mi] = mo.top_expert;
      }
      ++mi;
      y = mo.y;
    } else {
      y = blk.dense->forward(at, arena);
    }
    const T* yp = y.data<T>();
    for (int64_t i = 0; i < N * D; ++i) h[i] += yp[i];
    if (scratch_per_layer) arena.rewind(layer_start);
  }
  for (int64_t b = 0; b < B; ++b) cache.length[static_cast<size_t>(slot[b])] += Tq;
  if (rows == Model::LogitRows::none && !hidden) return Tensor();
  if (rows == Model::LogitRows::last && Tq > 1 && !hidden) {
    // Only each sequence's last position: its row of h, normalized, through the head.
    for (int64_t b = 0; b < B; ++b)
      std::copy(h + (b * Tq + Tq - 1) * D, h + (b * Tq + Tq) * D, o + b * D);
    norm(a, o, final_norm, B);
    Tensor logits = arena.tensor({B, 1, V}, dtype_of<T>());
    cpu::linear<T>(logits.data<T>(), a, B, lm_head.value);
    return logits;
  }
  norm(a, h, final_norm, N);
  Tensor logits = arena.tensor({B, Tq, V}, dtype_of<T>());
  cpu::linear<T>(logits.data<T>(), a, N, lm_head.value);
  if (hidden) *hidden = Tensor::view(a, {N, D}, dtype_of<T>());
  return logits;
}

KvCache Model::make_cache(int64_t slots, int64_t capacity) const {
  MOE_CHECK(slots >= 1 && capacity >= 1 && capacity <= cfg_.max_seq_len, "model.cache",
            "need slots >= 1 and capacity in [1, max_seq_len = {}], got {} and {}",
            cfg_.max_seq_len, slots, capacity);
  return impl_->make_cache(slots, capacity, cfg_.n_layers);
}

KvCache Model::make_mtp_cache(int64_t capacity) const {
  MOE_CHECK(cfg_.mtp_depth > 0, "model.cache", "the model has no MTP module");
  MOE_CHECK(capacity >= 1 && capacity <= cfg_.max_seq_len, "model.cache",
            "need capacity in [1, max_seq_len = {}], got {}", cfg_.max_seq_len, capacity);
  return impl_->make_cache(1, capacity, 1);
}

Tensor Model::decode(const Tensor& tokens, KvCache& cache, Arena& arena,
                     const std::vector<int64_t>& slots, std::vector<Tensor>* router_logits,
                     LogitRows rows, ModelOutput* routing) {
  return impl_->dtype == DType::F64
             ? impl_->decode<double>(tokens, cache, arena, slots, router_logits, routing, rows)
             : impl_->decode<float>(tokens, cache, arena, slots, router_logits, routing, rows);
}

Tensor Model::decode_hidden(const Tensor& tokens, KvCache& cache, Arena& arena, Tensor* hidden) {
  MOE_CHECK(tokens.ndim() == 2 && tokens.size(0) == 1, "model.decode",
            "decode_hidden runs one sequence, i32[1, T]; got {}", tokens.str());
  MOE_CHECK(hidden != nullptr, "model.decode", "decode_hidden needs somewhere to put the states");
  return impl_->dtype == DType::F64 ? impl_->decode<double>(tokens, cache, arena, {}, nullptr,
                                                            nullptr, LogitRows::all, hidden)
                                    : impl_->decode<float>(tokens, cache, arena, {}, nullptr,
                                                           nullptr, LogitRows::all, hidden);
}

Tensor Model::mtp_decode(int64_t module, const Tensor& hidden, const Tensor& tokens, KvCache& cache,
                         Arena& arena, Tensor* hidden_out) {
  return impl_->dtype == DType::F64
             ? impl_->mtp_decode<double>(module, hidden, tokens, cache, arena, hidden_out)
             : impl_->mtp_decode<float>(module, hidden, tokens, cache, arena, hidden_out);
}

Model::Model(const ModelConfig& cfg, DType dtype, bool routed_experts)
    : cfg_(cfg), impl_(std::make_unique<Impl>(cfg, dtype, routed_experts)) {}
Model::Model(const ModelConfig& cfg, DType dtype, const dist::ExpertGroups& groups)
    : cfg_(cfg), impl_(std::make_unique<Impl>(cfg, dtype, true, &groups)) {}
Model::~Model() = default;
Model::Model(Model&&) noexcept = default;
Model& Model::operator=(Model&&) noexcept = default;

DType Model::dtype() const { return impl_->dtype; }
std::vector<NamedParam>& Model::params() { return impl_->named; }

int64_t Model::n_params() const {
  int64_t n = 0;
  for (const NamedParam& p : impl_->named) n += p.value.numel();
  return n;
}

void Model::init(Rng& rng) {
  for (NamedParam& p : impl_->named) {
    if (p.name.find("norm") != std::string::npos) {
      p.value.fill(1.0);
    } else if (p.name.find(".b_") != std::string::npos) {
      p.value.fill(0.0);
    } else if (p.routed && p.value.size(0) < cfg_.moe.n_experts) {
      // A rank's share of the experts: the draws of the whole tensor, this share's kept.
      const int64_t row = p.value.size(0) > 0 ? p.value.numel() / p.value.size(0) : 0;
      rng.fill_normal_part(p.value, 0, cfg_.init_std, p.first_expert * row,
                           (cfg_.moe.n_experts - p.first_expert - p.value.size(0)) * row);
    } else {
      rng.fill_normal(p.value, 0, cfg_.init_std);
    }
  }
  for (MoeLayer* m : moe_layers()) {
    Rng stream(rng.next_u64());
    // Seeds the layer's routing noise stream without touching its weights.
    m->reseed_noise(stream.next_u64());
  }
}

void Model::zero_grad() {
  for (NamedParam& p : impl_->named) p.grad.fill(0.0);
}

void Model::set_experts_only(bool on) {
  Impl& m = *impl_;
  m.embed.frozen = m.lm_head.frozen = on;
  auto freeze = [on](Impl::Block& b) {
    for (Param* p : {&b.wq, &b.wq_a, &b.wq_b, &b.wk, &b.wv, &b.wkv_a, &b.wkv_b, &b.b_q, &b.b_k,
                     &b.b_v, &b.wo, &b.b_o, &b.sinks})
      p->frozen = on;
  };
  for (auto& b : m.blocks) freeze(b);
  for (auto& mod : m.mtp) {
    freeze(mod.block);
    mod.eh_proj.frozen = on;
  }
}

void Model::set_training(bool training) {
  for (MoeLayer* m : moe_layers()) m->set_training(training);
}

const std::vector<MoeLayer*>& Model::moe_layers() { return impl_->moe_layers; }

void Model::set_expert_parallel(const dist::ExpertGroups& groups) {
  MOE_CHECK(!impl_->groups, "model", "the model is already split over ranks");
  for (MoeLayer* m : impl_->moe_layers) m->set_expert_parallel(groups);
  impl_->groups = std::make_shared<const dist::ExpertGroups>(groups);
  impl_->name_params();
}

const dist::ExpertGroups* Model::expert_parallel() const { return impl_->groups.get(); }

void Model::set_expert_source(const std::shared_ptr<ExpertSource>& source) {
  for (size_t i = 0; i < impl_->moe_layers.size(); ++i)
    impl_->moe_layers[i]->set_expert_source(source, static_cast<int64_t>(i));
  impl_->source = source;
  impl_->name_params();
}

Tensor* Model::Impl::weight_slot(const std::string& name, bool* matrix) {
  Impl& m = *this;
  *matrix = false;
  if (name == "embed.weight" || name == "lm_head.weight" || name == "norm.weight") {
    Param& p = name == "embed.weight" ? m.embed : name == "norm.weight" ? m.final_norm : m.lm_head;
    *matrix = name != "norm.weight";
    return &p.value;
  }
  if (name.rfind("layers.", 0) != 0) return nullptr;
  const size_t dot = name.find('.', 7);  // layers.<i>.<rest>
  if (dot == std::string::npos) return nullptr;
  const auto i = static_cast<size_t>(std::stoll(name.substr(7, dot - 7)));
  const std::string rest = name.substr(dot + 1);
  if (i < m.blocks.size()) return block_slot(m.blocks[i], rest, matrix);
  if (i - m.blocks.size() >= m.mtp.size()) return nullptr;
  MtpModule& mod = m.mtp[i - m.blocks.size()];
  if (rest == "enorm.weight") return &mod.enorm.value;
  if (rest == "hnorm.weight") return &mod.hnorm.value;
  if (rest == "shared_head.norm.weight") return &mod.norm.value;
  if (rest == "eh_proj.weight") {
    *matrix = true;
    return &mod.eh_proj.value;
  }
  return block_slot(mod.block, rest, matrix);
}

Tensor* Model::Impl::block_slot(Block& blk, const std::string& rest, bool* matrix) {
  for (const BlockParam& bp : kAttentionParams)
    if (rest == bp.name) {
      *matrix = bp.matrix;
      return &(blk.*bp.member).value;
    }
  if (rest == "attn_norm.weight") return &blk.attn_norm.value;
  if (rest == "ffn_norm.weight") return &blk.ffn_norm.value;
  if (blk.dense && rest.rfind("ffn.w_", 0) == 0) {
    ExpertWeights& fw = blk.dense->params();
    *matrix = true;
    return rest == "ffn.w_gate" ? &fw.w_gate : rest == "ffn.w_up" ? &fw.w_up : &fw.w_down;
  }
  Tensor* slot = nullptr;
  if (blk.moe && rest.rfind("moe.", 0) == 0)
    blk.moe->params().for_each([&](const std::string& n, Tensor& x) {
      if ("moe." + n != rest) return;
      slot = &x;
      *matrix = n.rfind("experts.w_", 0) == 0 || n.rfind("shared.w_", 0) == 0;
    });
  return slot;
}

bool Model::is_weight_matrix(const std::string& name) {
  bool matrix = false;
  return impl_->weight_slot(name, &matrix) != nullptr && matrix;
}

void Model::set_weight(const std::string& name, const Tensor& t) {
  Impl& m = *impl_;
  const char* w = "model.set_weight";
  const auto it = std::find_if(m.named.begin(), m.named.end(),
                               [&](const NamedParam& p) { return p.name == name; });
  MOE_CHECK(it != m.named.end(), w, "the model has no parameter {}", name);
  const Shape want = it->value.shape();
  const bool stored =
      t.dtype() == DType::BF16 || t.dtype() == DType::F16 || dtype_quantized(t.dtype());
  MOE_CHECK(t.dtype() == m.dtype || (stored && m.dtype == DType::F32), w,
            "{} is {}: a {} model takes {} weights{}", name, t.str(), dtype_name(m.dtype),
            dtype_name(m.dtype),
            m.dtype == DType::F32 ? " or bf16 / f16 / quantized weight matrices" : "");
  // Its shape, up to leading dimensions of 1 ([1, F, D] for [F, D]).
  auto squeeze = [](const Shape& s) {
    Shape o;
    size_t i = 0;
    while (i + 1 < s.size() && s[i] == 1) ++i;
    for (; i < s.size(); ++i) o.push_back(s[i]);
    return o;
  };
  MOE_CHECK(squeeze(t.shape()) == squeeze(want), w, "{} must be {}, got {}", name, shape_str(want),
            t.str());
  MOE_CHECK(t.raw() != nullptr || t.numel() == 0, w, "{} has no data", name);
  bool matrix = false;
  Tensor* slot = m.weight_slot(name, &matrix);
  MOE_CHECK(slot != nullptr, w, "{} cannot be replaced", name);
  MOE_CHECK(!stored || matrix, w,
            "{} is {}: only weight matrices may stay bf16 / f16 / quantized (norms, biases and "
            "the router compute in the model's dtype)",
            name, t.str());
  const Tensor v = t.reshaped(slot->shape());
  if (slot == &m.embed.value && m.cfg.tie_embeddings) m.lm_head.value = v;
  *slot = v;
  m.stored = m.stored || stored;
  m.name_params();
}

bool Model::weights_stored() const { return impl_->stored; }

ExpertView Model::expert(int64_t layer, int64_t e) {
  // Layers n_layers + k are the MTP modules' blocks.
  MOE_CHECK(layer >= 0 && layer < cfg_.n_layers + cfg_.mtp_depth, "model",
            "layer {} is not an MoE layer", layer);
  Impl::Block& blk = layer < cfg_.n_layers
                         ? impl_->blocks[static_cast<size_t>(layer)]
                         : impl_->mtp[static_cast<size_t>(layer - cfg_.n_layers)].block;
  MOE_CHECK(blk.moe != nullptr, "model", "layer {} is not an MoE layer", layer);
  return blk.moe->expert(e);
}

ModelOutput Model::forward(const Tensor& tokens, Arena& arena, const SoftTargets* soft) {
  ModelOutput out;
  if (impl_->dtype == DType::F64) {
    impl_->run<double>(tokens, arena, false, 1, out, soft);
  } else {
    impl_->run<float>(tokens, arena, false, 1, out, soft);
  }
  return out;
}

void Model::forward_backward(const Tensor& tokens, Arena& arena, double grad_scale,
                             ModelOutput& out, const SoftTargets* soft) {
  if (impl_->dtype == DType::F64) {
    impl_->run<double>(tokens, arena, true, grad_scale, out, soft);
  } else {
    impl_->run<float>(tokens, arena, true, grad_scale, out, soft);
  }
}

ModelOutput Model::forward_backward(const Tensor& tokens, Arena& arena, double grad_scale,
                                    const SoftTargets* soft) {
  ModelOutput out;
  forward_backward(tokens, arena, grad_scale, out, soft);
  return out;
}

Tensor Model::logits(const Tensor& tokens, Arena& arena, std::vector<Tensor>* router_logits) {
  MOE_CHECK(tokens.ndim() == 2, "model", "tokens must be i32[B, T], got {}", tokens.str());
  KvCache cache = make_cache(tokens.size(0), std::max<int64_t>(1, tokens.size(1)));
  return decode(tokens, cache, arena, {}, router_logits);
}

}  // namespace moe
