// Wall-clock timing for the CLI: the median of repeated runs after warm-up.
#pragma once

#include <algorithm>
#include <chrono>
#include <functional>
#include <vector>

#include "moe/kernels.h"

namespace moe::cli {

// Runs fn() `warmup` times untimed, then `reps` times; returns the median in milliseconds.
template <class Fn>
double median_ms(int warmup, int reps, Fn&& fn) {
  for (int i = 0; i < warmup; ++i) fn();
  std::vector<double> ms;
  for (int i = 0; i < reps; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    const auto t1 = std::chrono::steady_clock::now();
    ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

// Times several functions round-robin (one run of each per round), so that drift in the
// machine's speed affects all of them alike; returns each one's median in milliseconds.
inline std::vector<double> interleaved_median_ms(int warmup, int reps,
                                                 const std::vector<std::function<void()>>& fns) {
  for (int i = 0; i < warmup; ++i)
    for (const auto& fn : fns) fn();
  std::vector<std::vector<double>> ms(fns.size());
  for (int i = 0; i < reps; ++i)
    for (size_t f = 0; f < fns.size(); ++f) {
      const auto t0 = std::chrono::steady_clock::now();
      fns[f]();
      const auto t1 = std::chrono::steady_clock::now();
      ms[f].push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
    }
  std::vector<double> out;
  for (auto& v : ms) {
    std::sort(v.begin(), v.end());
    out.push_back(v[v.size() / 2]);
  }
  return out;
}

// Read bandwidth (GB/s): cpu::read_bandwidth_gbs on 2 GB.
inline double read_bandwidth_gbs() { return cpu::read_bandwidth_gbs(); }

}  // namespace moe::cli
