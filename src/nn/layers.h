// The transformer's pieces, each a forward and a backward side by side (docs/model.md has the
// equations). Outputs first, then inputs, then sizes; shapes in the first comment line.
// Activation gradients are written, parameter gradients accumulated.
#pragma once

#include <cstdint>
#include <vector>

namespace moe::nn {

// out [N, D] = E[tokens[n]]; tokens [N] already validated to be in [0, V).
template <class T>
void embedding_forward(T* out, const int32_t* tokens, const T* table, int64_t n, int64_t d);
// dtable [V, D] += scatter of dout [N, D] by token (in row order: deterministic).
template <class T>
void embedding_backward(T* dtable, const T* dout, const int32_t* tokens, int64_t n, int64_t d);

// out [N, D] = x / rms(x) * g; rstd [N] = 1 / rms(x) saved for the backward.
template <class T>
void rmsnorm_forward(T* out, T* rstd, const T* x, const T* g, int64_t n, int64_t d, double eps);
// dx [N, D] written; dg [D] accumulated.
template <class T>
void rmsnorm_backward(T* dx, T* dg, const T* dout, const T* x, const T* g, const T* rstd, int64_t n,
                      int64_t d);

// Rotary tables cos, sin [max_len, rd / 2] for theta_i = base^(-2i / rd).
template <class T>
void rope_tables(T* cos, T* sin, int64_t max_len, const std::vector<double>& inv_freq,
                 double mscale);
// Rotates, in every row r of x (rows of `heads` heads, `stride` values apart), the values
// [off, off + rd) of each head to position pos[r]; tables [max_len, rd / 2]. Interleaved pairs
// (x0, x1), (x2, x3), ... when `interleave`, else the two halves. `inverse` rotates back by the
// same angle: the backward of the rotation.
template <class T>
void rope_at(T* x, const T* cos, const T* sin, const int64_t* pos, int64_t rows, int64_t heads,
             int64_t stride, int64_t off, int64_t rd, bool interleave, bool inverse = false);

// Causal grouped-query attention, scores scaled by scale_mult / sqrt(dk). q [B*T, H, dk], k [B*T,
// KV, dk] and v [B*T, KV, dv] (rotated already) -> out [B*T, H, dv]; probs [B, H, T, T] saved (zero
// outside the mask). window > 0 keeps the keys j > i - window only (a sliding window). sinks [H]
// (may be null): each head's sink logit joins every row's softmax as a key without a value
// (gpt-oss), so a row's probabilities sum to less than one.
template <class T>
void attention_forward(T* out, T* probs, const T* q, const T* k, const T* v, int64_t b, int64_t t,
                       int64_t h, int64_t kv, int64_t dk, int64_t dv, int64_t window,
                       const T* sinks = nullptr, double scale_mult = 1.0);
// dq [B*T, H, dk], dk [B*T, KV, dk] and dv [B*T, KV, dv] written; dsinks [H] (may be null)
// accumulates the sinks' gradient: the sink's probability is 1 - sum_j P_ij, and its logit's
// gradient -(1 - sum_j P_ij) sum_j P_ij dP_ij. scratch: threads * 2 * T * T elements.
template <class T>
void attention_backward(T* dq, T* dk, T* dv, T* scratch, const T* dout, const T* q, const T* k,
                        const T* v, const T* probs, int64_t b, int64_t t, int64_t h, int64_t kv,
                        int64_t dkw, int64_t dvw, T* dsinks = nullptr, double scale_mult = 1.0);

// LayerNorm without bias: out = (x - mean) / sqrt(var + eps) * g, rows of width d (DBRX).
template <class T>
void layernorm_forward(T* out, const T* x, const T* g, int64_t n, int64_t d, double eps);
// dx [N, D] written, dg [D] accumulated (the statistics recomputed from x).
template <class T>
void layernorm_backward(T* dx, T* dg, const T* dout, const T* x, const T* g, int64_t n, int64_t d,
                        double eps);

// Inference (forward only).

// Causal attention of tq new queries per sequence against a key/value cache.
// q [B, tq, H, dk]; kc [slots, cap, KV, dk], vc [slots, cap, KV, dv]; sequence b reads cache
// slot slot[b], whose first start[b] + tq positions are filled, and its query i sits at
// position start[b] + i. window > 0 keeps keys j > position - window; sinks as in
// attention_forward. out [B, tq, H, dv].
template <class T>
void attention_cached(T* out, const T* q, const T* kc, const T* vc, const int64_t* slot,
                      const int64_t* start, int64_t b, int64_t tq, int64_t h, int64_t kv,
                      int64_t dk, int64_t dv, int64_t cap, int64_t window, double scale,
                      const T* sinks = nullptr);

// Soft targets mixed into the cross-entropy (distillation, Switch Transformer section 5): row i's
// target distribution becomes q_i = (1 - weight) onehot(target_i) + weight softmax(logits_i),
// logits [N, V] being a teacher's. row_loss [N] is scratch; loss receives the mean of the rows'
// -sum_j softmax(teacher)_j log softmax(student)_j.
template <class T>
struct SoftTargetsRef {
  const T* logits = nullptr;
  double weight = 0;
  double* row_loss = nullptr;
  double loss = 0;
};

// Mean cross-entropy of logits [N, V] against targets [N]; dlogits (may be null) = scale *
// (softmax - onehot) / N. row_loss [N] is scratch (the per-row losses, summed in row order).
// With soft targets, dlogits = scale * (softmax - q) / N, the gradient of
// (1 - weight) * (the returned mean) + weight * soft->loss.
template <class T>
double cross_entropy(T* dlogits, double* row_loss, const T* logits, const int32_t* targets,
                     int64_t n, int64_t v, double scale, SoftTargetsRef<T>* soft = nullptr);

}  // namespace moe::nn
