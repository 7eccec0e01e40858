// Rng: xoshiro256** (Blackman and Vigna 2018) seeded with splitmix64.
#include "moe/rng.h"

#include <cmath>

namespace moe {

namespace {
uint64_t splitmix64(uint64_t& x) {
  uint64_t z = (x += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

template <class T>
void fill_with(Tensor& t, Rng& rng, bool normal, double a, double b) {
  T* p = t.data<T>();
  const int64_t n = t.numel();
  for (int64_t i = 0; i < n; ++i)
    p[i] = static_cast<T>(normal ? a + b * rng.normal() : rng.uniform(a, b));
}
}  // namespace

Rng::Rng(uint64_t seed) {
  uint64_t x = seed;
  for (uint64_t& s : s_) s = splitmix64(x);
}

uint64_t Rng::next_u64() {
  const uint64_t result = rotl(s_[1] * 5, 7) * 9;
  const uint64_t t = s_[1] << 17;
  s_[2] ^= s_[0];
  s_[3] ^= s_[1];
  s_[1] ^= s_[2];
  s_[0] ^= s_[3];
  s_[2] ^= t;
  s_[3] = rotl(s_[3], 45);
  return result;
}

double Rng::uniform() { return static_cast<double>(next_u64() >> 11) * 0x1.0p-53; }

double Rng::uniform(double lo, double hi) { return lo + (hi - lo) * uniform(); }

double Rng::normal() {
  if (has_spare_) {
    has_spare_ = false;
    return spare_;
  }
  double u1 = uniform();
  while (u1 <= 0) u1 = uniform();
  const double u2 = uniform();
  const double r = std::sqrt(-2.0 * std::log(u1));
  spare_ = r * std::sin(2 * M_PI * u2);
  has_spare_ = true;
  return r * std::cos(2 * M_PI * u2);
}

int64_t Rng::randint(int64_t lo, int64_t hi) {
  MOE_CHECK(hi > lo, "rng", "empty range [{}, {})", lo, hi);
  return lo + static_cast<int64_t>(next_u64() % static_cast<uint64_t>(hi - lo));
}

void Rng::fill_normal(Tensor& t, double mean, double std) {
  if (t.dtype() == DType::F64) {
    fill_with<double>(t, *this, true, mean, std);
  } else {
    fill_with<float>(t, *this, true, mean, std);
  }
}

void Rng::fill_normal_part(Tensor& t, double mean, double std, int64_t before, int64_t after) {
  MOE_CHECK(before >= 0 && after >= 0, "rng", "negative skips {} and {}", before, after);
  for (int64_t i = 0; i < before; ++i) normal();
  fill_normal(t, mean, std);
  for (int64_t i = 0; i < after; ++i) normal();
}

void Rng::fill_uniform(Tensor& t, double lo, double hi) {
  if (t.dtype() == DType::F64) {
    fill_with<double>(t, *this, false, lo, hi);
  } else {
    fill_with<float>(t, *this, false, lo, hi);
  }
}

RngState Rng::state() const {
  RngState st{};
  for (int i = 0; i < 4; ++i) st.s[i] = s_[i];
  st.has_spare = has_spare_;
  st.spare = spare_;
  return st;
}

void Rng::set_state(const RngState& st) {
  for (int i = 0; i < 4; ++i) s_[i] = st.s[i];
  has_spare_ = st.has_spare;
  spare_ = st.spare;
}

}  // namespace moe
