// Multi-token prediction (DeepSeek-V3, Liu et al. 2024, section 2.2; see moe/model.h and
// docs/model.md): the training forward and backward of the MTP modules that follow the main
// model, and their inference step for self-speculative decoding.
//
// Module k (from 1) reads, at each position i of a sequence, the previous module's
// representation h^{k-1}_i (the main model's after its final norm for k = 1) and the embedding
// of token t_{i+k}; it predicts t_{i+k+1}:
//   x = W_eh [norm_e(emb(t_{i+k})); norm_h(h^{k-1}_i)],  h^k = norm_k(Block_k(x)),
//   logits = h^k W_head^T (the model's output head),
// over the positions i < T - k of sequences whose T positions predict tokens 1..T.
#include <algorithm>
#include <cstring>

#include "moe/kernels.h"
#include "moe/weights.h"
#include "nn/layers.h"
#include "nn/model_impl.h"

namespace moe {

template <class T>
void Model::Impl::mtp_forward(const int32_t* tok, int64_t B, int64_t T1, int64_t Tn, const T* z,
                              Arena& arena, bool backward, double scale, ModelOutput& out,
                              size_t& mi) {
  const int64_t D = cfg.d_model, V = cfg.vocab_size, depth = cfg.mtp_depth, Tp = T1 - 1;
  MOE_CHECK(Tp > depth, "model",
            "{} MTP modules need sequences of more than {} predicted tokens, got {} tokens", depth,
            depth, T1);
  const T* prev = z;  // the previous module's representation, rows of prev_len per sequence
  int64_t prev_len = Tn;
  double sum = 0;
  out.mtp_ce.assign(static_cast<size_t>(depth), 0.0);
  for (int64_t k = 1; k <= depth; ++k) {
    MtpModule& m = mtp[static_cast<size_t>(k - 1)];
    MtpSaved& s = m.saved;
    const int64_t Tk = Tp - k, Nk = B * Tk;
    s.Tk = Tk;
    T* h = arena.alloc<T>(Nk * D);
    int32_t* ahead = arena.alloc<int32_t>(Nk);    // t_{i+k}, embedded
    int32_t* targets = arena.alloc<int32_t>(Nk);  // t_{i+k+1}
    int64_t* pos = arena.alloc<int64_t>(Nk);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < Tk; ++i) {
        const int64_t r = b * Tk + i;
        std::memcpy(h + r * D, prev + (b * prev_len + i) * D, static_cast<size_t>(D) * sizeof(T));
        ahead[r] = tok[b * T1 + i + k];
        targets[r] = tok[b * T1 + i + k + 1];
        pos[r] = i;
      }
    T* emb = arena.alloc<T>(Nk * D);
    embed_rows<T>(emb, ahead, Nk);
    // [norm_e(emb); norm_h(h)], row by row.
    T* en = arena.alloc<T>(Nk * D);
    T* hn = arena.alloc<T>(Nk * D);
    T* e_rstd = arena.alloc<T>(Nk);
    T* h_rstd = arena.alloc<T>(Nk);
    norm_forward<T>(en, e_rstd, emb, m.enorm, Nk);
    norm_forward<T>(hn, h_rstd, h, m.hnorm, Nk);
    T* cat = arena.alloc<T>(Nk * 2 * D);
    for (int64_t r = 0; r < Nk; ++r) {
      std::memcpy(cat + r * 2 * D, en + r * D, static_cast<size_t>(D) * sizeof(T));
      std::memcpy(cat + r * 2 * D + D, hn + r * D, static_cast<size_t>(D) * sizeof(T));
    }
    cpu::bf16_keep(cat, Nk * 2 * D);  // saved for the backward
    T* x = arena.alloc<T>(Nk * D);
    cpu::linear<T>(x, cat, Nk, m.eh_proj.value);
    T* y = block_forward<T>(m.block, x, B, Tk, pos, arena, out, mi);
    T* g = arena.alloc<T>(Nk * D);
    T* g_rstd = arena.alloc<T>(Nk);
    norm_forward<T>(g, g_rstd, y, m.norm, Nk);
    cpu::bf16_keep(g, Nk * D);  // saved for the backward
    T* logits = arena.alloc<T>(Nk * V);
    cpu::linear<T>(logits, g, Nk, lm_head.value);
    T* dl = backward ? arena.alloc<T>(Nk * V) : nullptr;
    // Each module's loss is the mean over its rows (over every rank's under expert parallelism),
    // weighted mtp_weight / depth in the total.
    const double w = cfg.mtp_weight / static_cast<double>(depth);
    double ce = 0;
    if (groups) {
      const double nd = static_cast<double>(Nk), n_all = groups->world.sum(nd);
      ce = nn::cross_entropy<T>(dl, arena.alloc<double>(Nk), logits, targets, Nk, V,
                                scale * w * nd / n_all, nullptr);
      ce = groups->world.sum(ce * nd) / n_all;
    } else {
      ce = nn::cross_entropy<T>(dl, arena.alloc<double>(Nk), logits, targets, Nk, V, scale * w,
                                nullptr);
    }
    out.mtp_ce[static_cast<size_t>(k - 1)] = ce;
    sum += ce;
    s.tokens = ahead;
    s.h = h;
    s.emb = emb;
    s.cat = cat;
    s.e_rstd = e_rstd;
    s.h_rstd = h_rstd;
    s.out = y;
    s.g = g;
    s.g_rstd = g_rstd;
    s.dlogits = dl;
    prev = g;
    prev_len = Tk;
  }
  out.mtp_loss = sum / static_cast<double>(depth);
}

template <class T>
void Model::Impl::mtp_backward(int64_t B, int64_t Tn, T* dz, const BackwardScratch<T>& sc,
                               Arena& arena, double scale, size_t& mi) {
  const int64_t D = cfg.d_model, V = cfg.vocab_size, depth = cfg.mtp_depth;
  // dg: d loss / d module k's output g, to which module k + 1 adds its share.
  T* dg = nullptr;
  for (int64_t k = depth; k >= 1; --k) {
    MtpModule& m = mtp[static_cast<size_t>(k - 1)];
    const MtpSaved& s = m.saved;
    const int64_t Tk = s.Tk, Nk = B * Tk;
    T* dgk = arena.alloc<T>(Nk * D);
    {
      const T* dl = static_cast<const T*>(s.dlogits);
      const cpu::Bf16Kept dl_kept(dl, Nk * V);  // read by both products
      if (!lm_head.frozen)
        cpu::gemm<T>(true, false, V, D, Nk, T(1), dl, V, static_cast<const T*>(s.g), D, T(1),
                     lm_head.grad.data<T>(), D);
      cpu::gemm<T>(false, false, Nk, D, V, T(1), dl, V, lm_head.value.data<T>(), D, T(0), dgk, D);
    }
    if (dg) {  // module k + 1 read rows i < Tk - 1 of this one's
      const int64_t Tn1 = Tk - 1;
      for (int64_t b = 0; b < B; ++b)
        for (int64_t i = 0; i < Tn1; ++i)
          for (int64_t d = 0; d < D; ++d) dgk[(b * Tk + i) * D + d] += dg[(b * Tn1 + i) * D + d];
    }
    T* dx = arena.alloc<T>(Nk * D);
    norm_backward<T>(dx, m.norm, dgk, static_cast<const T*>(s.out), static_cast<const T*>(s.g_rstd),
                     Nk);
    int64_t* pos = arena.alloc<int64_t>(Nk);
    for (int64_t r = 0; r < Nk; ++r) pos[r] = r % Tk;
    block_backward<T>(m.block, dx, B, Tk, pos, sc, arena, scale, nullptr, mi);
    // x = cat W_eh^T.
    T* dcat = arena.alloc<T>(Nk * 2 * D);
    {
      const cpu::Bf16Kept dx_kept(dx, Nk * D);
      if (!m.eh_proj.frozen)
        cpu::gemm<T>(true, false, D, 2 * D, Nk, T(1), dx, D, static_cast<const T*>(s.cat), 2 * D,
                     T(1), m.eh_proj.grad.data<T>(), 2 * D);
      cpu::gemm<T>(false, false, Nk, 2 * D, D, T(1), dx, D, m.eh_proj.value.data<T>(), 2 * D, T(0),
                   dcat, 2 * D);
    }
    T* de = arena.alloc<T>(Nk * D);
    T* dh = arena.alloc<T>(Nk * D);
    for (int64_t r = 0; r < Nk; ++r) {
      std::memcpy(de + r * D, dcat + r * 2 * D, static_cast<size_t>(D) * sizeof(T));
      std::memcpy(dh + r * D, dcat + r * 2 * D + D, static_cast<size_t>(D) * sizeof(T));
    }
    T* demb = arena.alloc<T>(Nk * D);
    norm_backward<T>(demb, m.enorm, de, static_cast<const T*>(s.emb),
                     static_cast<const T*>(s.e_rstd), Nk);
    if (!embed.frozen) nn::embedding_backward<T>(embed.grad.data<T>(), demb, s.tokens, Nk, D);
    dg = arena.alloc<T>(Nk * D);
    norm_backward<T>(dg, m.hnorm, dh, static_cast<const T*>(s.h), static_cast<const T*>(s.h_rstd),
                     Nk);
  }
  // Module 1 read rows i < T - 1 of each sequence's Tn rows of z.
  const int64_t T1m = mtp[0].saved.Tk;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < T1m; ++i)
      for (int64_t d = 0; d < D; ++d) dz[(b * Tn + i) * D + d] += dg[(b * T1m + i) * D + d];
}

template <class T>
Tensor Model::Impl::mtp_decode(int64_t module, const Tensor& hidden, const Tensor& tokens,
                               KvCache& cache, Arena& arena, Tensor* hidden_out) {
  const char* w = "model.mtp";
  MOE_CHECK(module >= 0 && module < static_cast<int64_t>(mtp.size()), w,
            "MTP module {} is not one of the model's {}", module, mtp.size());
  MOE_CHECK(hidden_out != nullptr, w, "mtp_decode needs somewhere to put the states");
  const int64_t D = cfg.d_model, V = cfg.vocab_size, n = tokens.numel();
  MOE_CHECK(tokens.dtype() == DType::I32 && n >= 1, w, "tokens must be i32[n >= 1], got {}",
            tokens.str());
  MOE_CHECK(hidden.dtype() == dtype_of<T>() && hidden.numel() == n * D, w,
            "hidden must be {}[{}, {}] for {} tokens, got {}", dtype_name(dtype_of<T>()), n, D, n,
            hidden.str());
  MOE_CHECK(cache.k.size() == 1 && cache.slots == 1, w, "the cache was not made by make_mtp_cache");
  const int64_t start = cache.length[0];
  MOE_CHECK(start + n <= cache.capacity, w, "the module would reach {} positions, beyond its {}",
            start + n, cache.capacity);
  const int32_t* tok = tokens.data<int32_t>();
  for (int64_t i = 0; i < n; ++i)
    MOE_CHECK(tok[i] >= 0 && tok[i] < V, w, "token {} at {} is outside the vocabulary [0, {})",
              tok[i], i, V);
  MtpModule& m = mtp[static_cast<size_t>(module)];
  int64_t* pos = arena.alloc<int64_t>(n);
  for (int64_t i = 0; i < n; ++i) pos[i] = start + i;
  const int64_t slot = 0;
  T* rstd = arena.alloc<T>(n);
  T* emb = arena.alloc<T>(n * D);
  embed_rows<T>(emb, tok, n);
  T* cat = arena.alloc<T>(n * 2 * D);
  T* a = arena.alloc<T>(n * D);
  norm_forward<T>(a, rstd, emb, m.enorm, n);
  for (int64_t r = 0; r < n; ++r) std::copy(a + r * D, a + (r + 1) * D, cat + r * 2 * D);
  norm_forward<T>(a, rstd, hidden.data<T>(), m.hnorm, n);
  for (int64_t r = 0; r < n; ++r) std::copy(a + r * D, a + (r + 1) * D, cat + r * 2 * D + D);
  T* h = arena.alloc<T>(n * D);
  cpu::linear<T>(h, cat, n, m.eh_proj.value);
  // The block, as decode() runs the main ones.
  Block& blk = m.block;
  T* o = arena.alloc<T>(n * D);
  norm_forward<T>(a, rstd, h, blk.attn_norm, n);
  attention_step<T>(blk, a, 1, n, pos, &slot, &start, cache.k[0], cache.v[0], cache.capacity, o,
                    arena);
  for (int64_t i = 0; i < n * D; ++i) h[i] += o[i];
  norm_forward<T>(a, rstd, h, blk.ffn_norm, n);
  const Tensor at = Tensor::view(a, {n, D}, dtype_of<T>());
  const Tensor y = blk.moe ? moe_inference(blk, at, arena).y : blk.dense->forward(at, arena);
  const T* yp = y.data<T>();
  for (int64_t i = 0; i < n * D; ++i) h[i] += yp[i];
  cache.length[0] += n;
  T* g = arena.alloc<T>(n * D);
  norm_forward<T>(g, rstd, h, m.norm, n);
  *hidden_out = Tensor::view(g, {n, D}, dtype_of<T>());
  Tensor logits = arena.tensor({1, V}, dtype_of<T>());
  cpu::linear<T>(logits.data<T>(), g + (n - 1) * D, 1, lm_head.value);
  return logits;
}

#define MOE_INSTANTIATE(T)                                                                       \
  template void Model::Impl::mtp_forward<T>(const int32_t*, int64_t, int64_t, int64_t, const T*, \
                                            Arena&, bool, double, ModelOutput&, size_t&);        \
  template void Model::Impl::mtp_backward<T>(int64_t, int64_t, T*, const BackwardScratch<T>&,    \
                                             Arena&, double, size_t&);                           \
  template Tensor Model::Impl::mtp_decode<T>(int64_t, const Tensor&, const Tensor&, KvCache&,    \
                                             Arena&, Tensor*);
MOE_INSTANTIATE(float)
MOE_INSTANTIATE(double)
#undef MOE_INSTANTIATE

}  // namespace moe
