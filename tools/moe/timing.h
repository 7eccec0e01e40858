// Wall-clock timing for the CLI: the median of repeated runs after warm-up.
#pragma once

#include <algorithm>
#include <chrono>
#include <vector>

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

}  // namespace moe::cli
