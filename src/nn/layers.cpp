// Transformer pieces, forward and backward (see layers.h). Row-parallel loops write disjoint
// rows; every reduction runs in a fixed order, so results do not depend on the thread count.
#include "nn/layers.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "moe/kernels.h"
#include "moe/threading.h"

namespace moe::nn {

template <class T>
void embedding_forward(T* out, const int32_t* tokens, const T* table, int64_t n, int64_t d) {
#pragma omp parallel for schedule(static) if (n * d > kParallelMin)
  for (int64_t i = 0; i < n; ++i)
    std::memcpy(out + i * d, table + static_cast<int64_t>(tokens[i]) * d,
                static_cast<size_t>(d) * sizeof(T));
}

template <class T>
void embedding_backward(T* dtable, const T* dout, const int32_t* tokens, int64_t n, int64_t d) {
  for (int64_t i = 0; i < n; ++i) {
    T* row = dtable + static_cast<int64_t>(tokens[i]) * d;
    for (int64_t j = 0; j < d; ++j) row[j] += dout[i * d + j];
  }
}

template <class T>
void rmsnorm_forward(T* out, T* rstd, const T* x, const T* g, int64_t n, int64_t d, double eps) {
#pragma omp parallel for schedule(static) if (n * d > kParallelMin)
  for (int64_t i = 0; i < n; ++i) {
    const T* xi = x + i * d;
    T ss = 0;
    for (int64_t j = 0; j < d; ++j) ss += xi[j] * xi[j];
    const T r = T(1) / std::sqrt(ss / static_cast<T>(d) + static_cast<T>(eps));
    rstd[i] = r;
    for (int64_t j = 0; j < d; ++j) out[i * d + j] = xi[j] * r * g[j];
  }
}

template <class T>
void rmsnorm_backward(T* dx, T* dg, const T* dout, const T* x, const T* g, const T* rstd, int64_t n,
                      int64_t d) {
#pragma omp parallel for schedule(static) if (n * d > kParallelMin)
  for (int64_t i = 0; i < n; ++i) {
    const T* xi = x + i * d;
    const T* dy = dout + i * d;
    const T r = rstd[i];
    T dot = 0;  // mean over j of xhat_j * g_j * dy_j
    for (int64_t j = 0; j < d; ++j) dot += xi[j] * r * g[j] * dy[j];
    dot /= static_cast<T>(d);
    for (int64_t j = 0; j < d; ++j) dx[i * d + j] = r * (g[j] * dy[j] - xi[j] * r * dot);
  }
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < d; ++j) dg[j] += dout[i * d + j] * x[i * d + j] * rstd[i];
}

template <class T>
void rope_tables(T* cos, T* sin, int64_t max_len, const std::vector<double>& inv_freq,
                 double mscale) {
  const auto half = static_cast<int64_t>(inv_freq.size());
  for (int64_t p = 0; p < max_len; ++p)
    for (int64_t i = 0; i < half; ++i) {
      const double a = static_cast<double>(p) * inv_freq[static_cast<size_t>(i)];
      cos[p * half + i] = static_cast<T>(std::cos(a) * mscale);
      sin[p * half + i] = static_cast<T>(std::sin(a) * mscale);
    }
}

template <class T>
void attention_forward(T* out, T* probs, const T* q, const T* k, const T* v, int64_t b, int64_t t,
                       int64_t h, int64_t kv, int64_t dk, int64_t dv, int64_t window,
                       const T* sinks, double scale_mult) {
  const int64_t group = h / kv;
  const T scale = static_cast<T>(scale_mult / std::sqrt(static_cast<double>(dk)));
#pragma omp parallel for schedule(static) if (b * h * t * t * (dk + dv) > kParallelMin)
  for (int64_t task = 0; task < b * h; ++task) {
    const int64_t bi = task / h, hh = task % h, g = hh / group;
    const T* qb = q + (bi * t * h + hh) * dk;  // row stride h * dk
    const T* kb = k + (bi * t * kv + g) * dk;  // row stride kv * dk
    const T* vb = v + (bi * t * kv + g) * dv;  // row stride kv * dv
    T* p = probs + task * t * t;
    cpu::gemm<T>(false, true, t, t, dk, scale, qb, h * dk, kb, kv * dk, T(0), p, t);
    for (int64_t i = 0; i < t; ++i) {
      T* row = p + i * t;
      const int64_t lo = window > 0 ? std::max<int64_t>(0, i - window + 1) : 0;
      T mx = row[lo];
      for (int64_t j = lo + 1; j <= i; ++j) mx = std::max(mx, row[j]);
      if (sinks) mx = std::max(mx, sinks[hh]);
      T sum = cpu::exp_shifted(row + lo, row + lo, i - lo + 1, mx);
      if (sinks) sum += std::exp(sinks[hh] - mx);
      for (int64_t j = 0; j < t; ++j) row[j] = (j >= lo && j <= i) ? row[j] / sum : T(0);
    }
    cpu::gemm<T>(false, false, t, dv, t, T(1), p, t, vb, kv * dv, T(0),
                 out + (bi * t * h + hh) * dv, h * dv);
  }
}

template <class T>
void attention_backward(T* dq, T* dk, T* dv, T* scratch, const T* dout, const T* q, const T* k,
                        const T* v, const T* probs, int64_t b, int64_t t, int64_t h, int64_t kv,
                        int64_t dkw, int64_t dvw, T* dsinks, double scale_mult) {
  const int64_t group = h / kv;
  const T scale = static_cast<T>(scale_mult / std::sqrt(static_cast<double>(dkw)));
  // One task per (sequence, KV head): its query heads in order, so the KV gradients of a group
  // are summed in a fixed order by one thread. Masked entries have probability 0, so their
  // score gradients P (dP - rowsum(dP P)) are 0 too. The sinks' gradients go to one entry per
  // (sequence, head), summed over the sequences in order afterwards.
  std::vector<T> sink_part(dsinks ? static_cast<size_t>(b * h) : 0, T(0));
#pragma omp parallel for schedule(static) if (b * h * t * t * (dkw + dvw) > kParallelMin)
  for (int64_t task = 0; task < b * kv; ++task) {
    const int64_t bi = task / kv, g = task % kv;
    T* dp = scratch + static_cast<int64_t>(omp_get_thread_num()) * 2 * t * t;
    const T* kb = k + (bi * t * kv + g) * dkw;
    const T* vb = v + (bi * t * kv + g) * dvw;
    T* dkb = dk + (bi * t * kv + g) * dkw;
    T* dvb = dv + (bi * t * kv + g) * dvw;
    for (int64_t i = 0; i < t; ++i) {
      std::fill_n(dkb + i * kv * dkw, dkw, T(0));
      std::fill_n(dvb + i * kv * dvw, dvw, T(0));
    }
    for (int64_t hh = g * group; hh < (g + 1) * group; ++hh) {
      const T* p = probs + (bi * h + hh) * t * t;
      const T* dob = dout + (bi * t * h + hh) * dvw;
      const T* qb = q + (bi * t * h + hh) * dkw;
      T* dqb = dq + (bi * t * h + hh) * dkw;
      // dV += P^T dO; dP = dO V^T; dS = P (dP - rowsum(dP P)).
      cpu::gemm<T>(true, false, t, dvw, t, T(1), p, t, dob, h * dvw, T(1), dvb, kv * dvw);
      cpu::gemm<T>(false, true, t, t, dvw, T(1), dob, h * dvw, vb, kv * dvw, T(0), dp, t);
      for (int64_t i = 0; i < t; ++i) {
        T* row = dp + i * t;
        const T* pr = p + i * t;
        T dot = 0;
        for (int64_t j = 0; j <= i; ++j) dot += row[j] * pr[j];
        for (int64_t j = 0; j <= i; ++j) row[j] = pr[j] * (row[j] - dot);
        if (dsinks) {
          T mass = 0;
          for (int64_t j = 0; j <= i; ++j) mass += pr[j];
          sink_part[static_cast<size_t>(bi * h + hh)] -= (T(1) - mass) * dot;
        }
        for (int64_t j = i + 1; j < t; ++j) row[j] = 0;
      }
      // S = scale Q K^T: dQ = scale dS K, dK += scale dS^T Q.
      cpu::gemm<T>(false, false, t, dkw, t, scale, dp, t, kb, kv * dkw, T(0), dqb, h * dkw);
      cpu::gemm<T>(true, false, t, dkw, t, scale, dp, t, qb, h * dkw, T(1), dkb, kv * dkw);
    }
  }
  if (dsinks)
    for (int64_t bi = 0; bi < b; ++bi)
      for (int64_t hh = 0; hh < h; ++hh) dsinks[hh] += sink_part[static_cast<size_t>(bi * h + hh)];
}

// A row's mean and 1 / sqrt(var + eps), for LayerNorm.
template <class T>
void row_moments(const T* xi, int64_t d, double eps, T& mean, T& r) {
  mean = 0;
  for (int64_t j = 0; j < d; ++j) mean += xi[j];
  mean /= static_cast<T>(d);
  T var = 0;
  for (int64_t j = 0; j < d; ++j) var += (xi[j] - mean) * (xi[j] - mean);
  r = T(1) / std::sqrt(var / static_cast<T>(d) + static_cast<T>(eps));
}

template <class T>
void layernorm_forward(T* out, const T* x, const T* g, int64_t n, int64_t d, double eps) {
#pragma omp parallel for schedule(static) if (n * d > kParallelMin)
  for (int64_t i = 0; i < n; ++i) {
    const T* xi = x + i * d;
    T mean, r;
    row_moments(xi, d, eps, mean, r);
    for (int64_t j = 0; j < d; ++j) out[i * d + j] = (xi[j] - mean) * r * g[j];
  }
}

template <class T>
void layernorm_backward(T* dx, T* dg, const T* dout, const T* x, const T* g, int64_t n, int64_t d,
                        double eps) {
#pragma omp parallel for schedule(static) if (n * d > kParallelMin)
  for (int64_t i = 0; i < n; ++i) {
    const T* xi = x + i * d;
    const T* dy = dout + i * d;
    T mean, r;
    row_moments(xi, d, eps, mean, r);
    // xhat = (x - mean) r; dx = r (dxhat - mean(dxhat) - xhat mean(dxhat xhat)), dxhat = g dy.
    T m1 = 0, m2 = 0;
    for (int64_t j = 0; j < d; ++j) {
      const T dxh = g[j] * dy[j];
      m1 += dxh;
      m2 += dxh * (xi[j] - mean) * r;
    }
    m1 /= static_cast<T>(d);
    m2 /= static_cast<T>(d);
    for (int64_t j = 0; j < d; ++j) {
      const T xh = (xi[j] - mean) * r;
      dx[i * d + j] = r * (g[j] * dy[j] - m1 - xh * m2);
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    const T* xi = x + i * d;
    T mean, r;
    row_moments(xi, d, eps, mean, r);
    for (int64_t j = 0; j < d; ++j) dg[j] += dout[i * d + j] * (xi[j] - mean) * r;
  }
}

template <class T>
void rope_at(T* x, const T* cos, const T* sin, const int64_t* pos, int64_t rows, int64_t heads,
             int64_t stride, int64_t off, int64_t rd, bool interleave, bool inverse) {
  const int64_t half = rd / 2;
  const T sign = inverse ? T(-1) : T(1);
#pragma omp parallel for schedule(static) if (rows * heads * rd > kParallelMin)
  for (int64_t r = 0; r < rows; ++r) {
    const T* c = cos + pos[r] * half;
    const T* s = sin + pos[r] * half;
    for (int64_t hh = 0; hh < heads; ++hh) {
      T* v = x + (r * heads + hh) * stride + off;
      for (int64_t i = 0; i < half; ++i) {
        T& a = interleave ? v[2 * i] : v[i];
        T& bb = interleave ? v[2 * i + 1] : v[i + half];
        const T a0 = a, b0 = bb;
        const T si = sign * s[i];
        a = a0 * c[i] - b0 * si;
        bb = b0 * c[i] + a0 * si;
      }
    }
  }
}

template <class T>
void attention_cached(T* out, const T* q, const T* kc, const T* vc, const int64_t* slot,
                      const int64_t* start, int64_t b, int64_t tq, int64_t h, int64_t kv,
                      int64_t dk, int64_t dv, int64_t cap, int64_t window, double scale,
                      const T* sinks) {
  // Every query row on its own (cpu::attend_row): its result does not depend on the rows, the
  // step or the thread it runs with, and a decoding step of a few rows runs on one thread.
  const int64_t group = h / kv;
  int64_t work = 0;
  for (int64_t bi = 0; bi < b; ++bi) work += h * tq * (start[bi] + tq) * (dk + dv);
#pragma omp parallel if (work > kParallelMin)
  {
    std::vector<T> p;
#pragma omp for schedule(static)
    for (int64_t task = 0; task < b * h; ++task) {
      const int64_t bi = task / h, hh = task % h, g = hh / group;
      const T* kb = kc + (slot[bi] * cap * kv + g) * dk;  // row stride kv * dk
      const T* vb = vc + (slot[bi] * cap * kv + g) * dv;  // row stride kv * dv
      p.resize(static_cast<size_t>(start[bi] + tq));
      for (int64_t i = 0; i < tq; ++i) {
        const int64_t at = start[bi] + i;
        const int64_t lo = window > 0 ? std::max<int64_t>(0, at - window + 1) : 0;
        const int64_t row = (bi * tq + i) * h + hh;
        cpu::attend_row<T>(out + row * dv, q + row * dk, kb, kv * dk, dk, vb, kv * dv, dv, lo,
                           at + 1, static_cast<T>(scale), sinks ? sinks + hh : nullptr, p.data());
      }
    }
  }
}

template <class T>
double cross_entropy(T* dlogits, double* row_loss, const T* logits, const int32_t* targets,
                     int64_t n, int64_t v, double scale, SoftTargetsRef<T>* soft) {
  // Per-row losses summed afterwards in row order: the same sum for any thread count.
  const T g = static_cast<T>(scale / static_cast<double>(n));
  const T alpha = soft ? static_cast<T>(soft->weight) : T(0);
#pragma omp parallel for schedule(static) if (n * v > kParallelMin)
  for (int64_t i = 0; i < n; ++i) {
    const T* z = logits + i * v;
    T mx = z[0];
    for (int64_t j = 1; j < v; ++j) mx = std::max(mx, z[j]);
    // The exponentials go to the row of dlogits (or a scratch row), written again below.
    thread_local std::vector<T> scratch;
    const bool need_scratch = !dlogits || soft;
    if (need_scratch && static_cast<int64_t>(scratch.size()) < v)
      scratch.resize(static_cast<size_t>(v));
    T* e = dlogits ? dlogits + i * v : scratch.data();
    const T sum = cpu::exp_shifted(e, z, v, mx);
    const T lse = mx + std::log(sum);
    row_loss[i] = static_cast<double>(lse - z[targets[i]]);
    T* p = nullptr;  // the teacher's distribution of row i
    if (soft) {
      const T* zt = soft->logits + i * v;
      T mt = zt[0];
      for (int64_t j = 1; j < v; ++j) mt = std::max(mt, zt[j]);
      p = scratch.data();
      const T st = cpu::exp_shifted(p, zt, v, mt);
      T dot = 0;  // sum_j p_j z_j
      for (int64_t j = 0; j < v; ++j) {
        p[j] /= st;
        dot += p[j] * z[j];
      }
      soft->row_loss[i] = static_cast<double>(lse - dot);
    }
    if (dlogits) {
      T* dl = dlogits + i * v;
      cpu::exp_shifted(dl, z, v, lse);
      if (p) {
        for (int64_t j = 0; j < v; ++j) dl[j] = g * (dl[j] - alpha * p[j]);
        dl[targets[i]] -= g * (T(1) - alpha);
      } else {
        for (int64_t j = 0; j < v; ++j) dl[j] *= g;
        dl[targets[i]] -= g;
      }
    }
  }
  double loss = 0;
  for (int64_t i = 0; i < n; ++i) loss += row_loss[i];
  if (soft) {
    double s = 0;
    for (int64_t i = 0; i < n; ++i) s += soft->row_loss[i];
    soft->loss = s / static_cast<double>(n);
  }
  return loss / static_cast<double>(n);
}

#define MOE_INSTANTIATE(T)                                                                       \
  template void embedding_forward<T>(T*, const int32_t*, const T*, int64_t, int64_t);            \
  template void embedding_backward<T>(T*, const T*, const int32_t*, int64_t, int64_t);           \
  template void rmsnorm_forward<T>(T*, T*, const T*, const T*, int64_t, int64_t, double);        \
  template void rmsnorm_backward<T>(T*, T*, const T*, const T*, const T*, const T*, int64_t,     \
                                    int64_t);                                                    \
  template void rope_tables<T>(T*, T*, int64_t, const std::vector<double>&, double);             \
  template void attention_forward<T>(T*, T*, const T*, const T*, const T*, int64_t, int64_t,     \
                                     int64_t, int64_t, int64_t, int64_t, int64_t, const T*,      \
                                     double);                                                    \
  template void attention_backward<T>(T*, T*, T*, T*, const T*, const T*, const T*, const T*,    \
                                      const T*, int64_t, int64_t, int64_t, int64_t, int64_t,     \
                                      int64_t, T*, double);                                      \
  template void layernorm_forward<T>(T*, const T*, const T*, int64_t, int64_t, double);          \
  template void layernorm_backward<T>(T*, T*, const T*, const T*, const T*, int64_t, int64_t,    \
                                      double);                                                   \
  template void rope_at<T>(T*, const T*, const T*, const int64_t*, int64_t, int64_t, int64_t,    \
                           int64_t, int64_t, bool, bool);                                        \
  template void attention_cached<T>(T*, const T*, const T*, const T*, const int64_t*,            \
                                    const int64_t*, int64_t, int64_t, int64_t, int64_t, int64_t, \
                                    int64_t, int64_t, int64_t, double, const T*);                \
  template double cross_entropy<T>(T*, double*, const T*, const int32_t*, int64_t, int64_t,      \
                                   double, SoftTargetsRef<T>*);
MOE_INSTANTIATE(float)
MOE_INSTANTIATE(double)
#undef MOE_INSTANTIATE

}  // namespace moe::nn
