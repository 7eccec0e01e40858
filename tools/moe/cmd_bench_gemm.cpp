// `moe bench gemm`: the matrix products the engine runs, per dtype and shape class, against the
// machine's limits measured in the same run: its FMA peak and the best library's own threaded
// GEMM on the same shape.
#include <fmt/core.h>

#include <algorithm>
#include <nlohmann/json.hpp>

#include "commands.h"
#include "moe/cpu.h"
#include "moe/gguf.h"
#include "moe/kernels.h"
#include "moe/rng.h"
#include "moe/tensor.h"
#include "moe/threading.h"
#include "moe/weights.h"
#include "timing.h"

namespace moe::cli {

namespace {

struct BenchGemm {
  int threads = 0;
  int reps = 5;
  bool json = false;
};

// A shape class: C[m, n] = op(A) op(B) as the engine calls it.
struct Shape3 {
  const char* name;
  const char* what;
  bool trans_a, trans_b;
  int64_t m, n, k;
};

const Shape3 kShapes[] = {
    {"square", "2048 x 2048 x 2048", false, true, 2048, 2048, 2048},
    {"train_ffn", "small model FFN forward: 2048 tokens x 512 <- 128", false, true, 2048, 512, 128},
    {"train_dw", "small model weight gradient: 512 x 128 over 2048 tokens", true, false, 512, 128,
     2048},
    {"expert_rows", "Qwen3-30B-A3B expert on 32 prompt rows: 32 x 768 <- 2048", false, true, 32,
     768, 2048},
    {"gemv", "one token through a 2048 x 2048 weight", false, true, 1, 2048, 2048},
};

// The shape classes with float32 operands (the engine's gemm) or bf16 operands (gemm_bf16; not
// the one-row product, which decoding runs on its weights' own kernels), each against the float32
// library on the same shape: GFLOP/s per shape, a row of `rows` each.
nlohmann::json run_shapes(bool bf16, const BenchGemm& b, double peak, Rng& rng,
                          nlohmann::json& rows) {
  nlohmann::json by_shape = nlohmann::json::object();
  for (const Shape3& s : kShapes) {
    if (bf16 && s.m == 1) continue;
    const int64_t ra = s.trans_a ? s.k : s.m, ca = s.trans_a ? s.m : s.k;
    const int64_t rb = s.trans_b ? s.n : s.k, cb = s.trans_b ? s.k : s.n;
    Tensor a = Tensor::empty({ra, ca}, DType::F32), bm = Tensor::empty({rb, cb}, DType::F32),
           c = Tensor::empty({s.m, s.n}, DType::F32);
    rng.fill_normal(a, 0, 1);
    rng.fill_normal(bm, 0, 1);
    std::vector<uint16_t> ha, hb;
    if (bf16) {
      ha.resize(static_cast<size_t>(ra * ca));
      hb.resize(static_cast<size_t>(rb * cb));
      cpu::round_to_bf16(a.data<float>(), 1, ra * ca, 0, ha.data());
      cpu::round_to_bf16(bm.data<float>(), 1, rb * cb, 0, hb.data());
    }
    const double flop = 2.0 * static_cast<double>(s.m * s.n * s.k);
    // Enough calls per timing that each takes some milliseconds.
    const int calls = static_cast<int>(std::max<double>(1, 2e8 / flop));
    const std::vector<double> ms = interleaved_median_ms(
        1, b.reps,
        {[&] {
           for (int i = 0; i < calls; ++i) {
             if (bf16)
               cpu::gemm_bf16(s.trans_a, s.trans_b, s.m, s.n, s.k, 1.0f, ha.data(), ca, hb.data(),
                              cb, 0.0f, c.data<float>(), s.n);
             else
               cpu::gemm<float>(s.trans_a, s.trans_b, s.m, s.n, s.k, 1.0f, a.data<float>(), ca,
                                bm.data<float>(), cb, 0.0f, c.data<float>(), s.n);
           }
         },
         [&] {
           for (int i = 0; i < calls; ++i)
             cpu::gemm_f32_library(s.trans_a, s.trans_b, s.m, s.n, s.k, 1.0f, a.data<float>(), ca,
                                   bm.data<float>(), cb, 0.0f, c.data<float>(), s.n);
         }});
    const double engine = flop * calls / ms[0] / 1e6, library = flop * calls / ms[1] / 1e6;
    by_shape[s.name] = engine;
    rows.push_back({{"dtype", bf16 ? "bf16_operands" : "f32"},
                    {"shape", s.name},
                    {"what", s.what},
                    {"m", s.m},
                    {"n", s.n},
                    {"k", s.k},
                    {"gflops", engine},
                    {"library_gflops", library},
                    {"of_library", engine / library},
                    {"of_peak", engine / peak}});
    if (!b.json)
      fmt::print("{:<18} {:>6} {:>6} {:>6} {:>11.1f} {:>11.1f} {:>8.0f}% {:>7.0f}%\n", s.name, s.m,
                 s.n, s.k, engine, library, 100 * engine / library, 100 * engine / peak);
  }
  return by_shape;
}

int run_bench_gemm(const BenchGemm& b) {
  MOE_CHECK(b.reps >= 1, "bench", "--reps must be >= 1");
  set_num_threads(b.threads);
  const CpuFeatures& f = cpu_features();
  const double peak = cpu::fma_peak_gflops();
  const std::string backend = cpu::gemm_f32_backend_info();
  nlohmann::json rows = nlohmann::json::array();
  nlohmann::json f32;
  if (!b.json) {
    fmt::print("CPU: {} ({})\n", f.brand.empty() ? "unknown" : f.brand, f.vendor);
    fmt::print("features: {}\n", f.str());
    fmt::print("kernel path: {} (best here: {}; cap with MOE_CPU_PATH or --cpu-path)\n",
               cpu_path_name(cpu_path()), cpu_path_name(f.best()));
    fmt::print("float32 GEMM: {}\n", backend);
    fmt::print("weight kernels (bf16, f16, int8; float32 rows <= {}): Highway {}\n",
               cpu::kMatvecMaxRows, cpu::weight_kernel_target());
    fmt::print("threads: {}   FMA peak: {:.1f} GFLOP/s\n\n", num_threads(), peak);
    fmt::print("{:<18} {:>6} {:>6} {:>6} {:>11} {:>11} {:>9} {:>8}\n", "f32 shape", "m", "n", "k",
               "engine", "library", "of lib", "of peak");
  }
  Rng rng(1);
  f32 = run_shapes(false, b, peak, rng, rows);
  // Weights in their stored formats: y = x W^T from bf16, f16 and int8 weights (moe/weights.h),
  // against the float32 library on the same shape with the weights already float32.
  const struct {
    const char* name;
    const char* what;
    int64_t n, rows, cols;
  } kWeightShapes[] = {
      {"gemv", "one token through a 2048 x 2048 weight", 1, 2048, 2048},
      {"gemv4", "four tokens through a 2048 x 2048 weight", 4, 2048, 2048},
      {"expert_rows", "Qwen3-30B-A3B expert on 32 prompt rows", 32, 768, 2048},
      {"prompt", "512 prompt rows through a 4096 x 2048 weight", 512, 4096, 2048},
  };
  nlohmann::json by_type = nlohmann::json::object();
  if (!b.json)
    fmt::print("\n{:<18} {:>6} {:>6} {:>6} {:>11} {:>11} {:>9} {:>8} {:>9}\n", "weights", "n",
               "rows", "cols", "engine", "f32 lib", "of lib", "of peak", "GB/s of W");
  for (WType t : {WType::bf16, WType::f16, WType::i8}) {
    for (const auto& s : kWeightShapes) {
      const int64_t cells = s.rows * s.cols;
      Tensor wf = Tensor::empty({s.rows, s.cols}, DType::F32),
             x = Tensor::empty({s.n, s.cols}, DType::F32),
             y = Tensor::empty({s.n, s.rows}, DType::F32);
      rng.fill_normal(wf, 0, 1);
      rng.fill_normal(x, 0, 1);
      std::vector<uint16_t> h(static_cast<size_t>(cells));
      std::vector<int8_t> q(static_cast<size_t>(cells));
      std::vector<float> scale(static_cast<size_t>(s.rows), 0.01f);
      const float* wp = wf.data<float>();
      for (int64_t i = 0; i < cells; ++i) {
        h[static_cast<size_t>(i)] = t == WType::f16 ? f32_to_f16(wp[i]) : f32_to_bf16(wp[i]);
        q[static_cast<size_t>(i)] = static_cast<int8_t>(static_cast<int>(wp[i] * 30) % 127);
      }
      const WeightMatrix w{t, t == WType::i8 ? static_cast<const void*>(q.data()) : h.data(),
                           s.rows, s.cols, t == WType::i8 ? scale.data() : nullptr};
      const double flop = 2.0 * static_cast<double>(s.n * cells);
      const int calls = static_cast<int>(std::max<double>(1, 2e8 / flop));
      const std::vector<double> ms = interleaved_median_ms(
          1, b.reps,
          {[&] {
             for (int i = 0; i < calls; ++i)
               cpu::matmul_wt(w, x.data<float>(), s.cols, s.n, y.data<float>(), s.rows);
           },
           [&] {
             for (int i = 0; i < calls; ++i)
               cpu::gemm_f32_library(false, true, s.n, s.rows, s.cols, 1.0f, x.data<float>(),
                                     s.cols, wp, s.cols, 0.0f, y.data<float>(), s.rows);
           }});
      const double engine = flop * calls / ms[0] / 1e6, library = flop * calls / ms[1] / 1e6;
      const double gbs = static_cast<double>(w.bytes()) * calls / ms[0] / 1e6;
      by_type[wtype_name(t)][s.name] = engine;
      rows.push_back({{"dtype", wtype_name(t)},
                      {"shape", s.name},
                      {"what", s.what},
                      {"m", s.n},
                      {"n", s.rows},
                      {"k", s.cols},
                      {"gflops", engine},
                      {"library_gflops", library},
                      {"of_library", engine / library},
                      {"of_peak", engine / peak},
                      {"weight_gb_per_s", gbs}});
      if (!b.json)
        fmt::print("{:<18} {:>6} {:>6} {:>6} {:>11.1f} {:>11.1f} {:>8.0f}% {:>7.0f}% {:>9.1f}\n",
                   fmt::format("{} {}", wtype_name(t), s.name), s.n, s.rows, s.cols, engine,
                   library, 100 * engine / library, 100 * engine / peak, gbs);
    }
  }
  // GGUF's block-quantized weights, one token at a time as decoding runs them (x rounded to int8
  // per block where the type has integer products): a weight that stays in the cache (the
  // kernel's arithmetic) and one that streams from memory, against the read bandwidth measured
  // here (a token's products can go no faster than their weights' bytes arrive).
  const double bw = cpu::read_bandwidth_gbs();
  if (!b.json)
    fmt::print("\n{:<18} {:>6} {:>6} {:>6} {:>11} {:>11} {:>14}\n", "quantized weights", "n",
               "rows", "cols", "GFLOP/s", "GB/s of W", "of read bw");
  nlohmann::json by_quant = nlohmann::json::object();
  const struct {
    const char* name;
    const char* what;
    int64_t rows, cols;
  } kDecodeShapes[] = {
      {"gemv", "one token through a 2048 x 2048 weight (in cache)", 2048, 2048},
      {"gemv_stream", "one token through a 65536 x 2048 weight (from memory)", 65536, 2048},
  };
  for (WType t : {WType::q8_0, WType::q6_k, WType::q4_k, WType::mxfp4}) {
    const GgmlType g = ggml_type_of(wtype_dtype(t));
    for (const auto& s : kDecodeShapes) {
      const size_t row_bytes = ggml_row_bytes(g, s.cols);
      std::vector<uint8_t> bytes(row_bytes * static_cast<size_t>(s.rows));
      std::vector<float> src(static_cast<size_t>(s.cols));
      // 64 rows quantized, then repeated (the speed does not depend on the values).
      for (int64_t r = 0; r < s.rows; ++r) {
        uint8_t* at = bytes.data() + static_cast<size_t>(r) * row_bytes;
        if (r >= 64) {
          std::copy_n(at - 64 * row_bytes, row_bytes, at);
          continue;
        }
        for (float& v : src) v = static_cast<float>(0.02 * rng.normal());
        quantize_row(g, src.data(), at, s.cols);
      }
      Tensor x = Tensor::empty({1, s.cols}, DType::F32), y = Tensor::empty({1, s.rows}, DType::F32);
      rng.fill_normal(x, 0, 1);
      const WeightMatrix w{t, bytes.data(), s.rows, s.cols};
      const double flop = 2.0 * static_cast<double>(s.rows * s.cols);
      const int calls = static_cast<int>(std::max<double>(1, 2e8 / flop));
      const double ms = interleaved_median_ms(1, b.reps, {[&] {
                                                for (int i = 0; i < calls; ++i)
                                                  cpu::matmul_wt(w, x.data<float>(), s.cols, 1,
                                                                 y.data<float>(), s.rows);
                                              }})[0];
      const double gflops = flop * calls / ms / 1e6;
      const double gbs = static_cast<double>(bytes.size()) * calls / ms / 1e6;
      by_quant[wtype_name(t)][s.name] = gflops;
      rows.push_back({{"dtype", wtype_name(t)},
                      {"shape", s.name},
                      {"what", s.what},
                      {"m", 1},
                      {"n", s.rows},
                      {"k", s.cols},
                      {"gflops", gflops},
                      {"weight_gb_per_s", gbs},
                      {"of_read_bandwidth", gbs / bw},
                      {"activations", cpu::activation_block(t) != 0 ? "int8" : "f32"}});
      if (!b.json)
        fmt::print("{:<18} {:>6} {:>6} {:>6} {:>11.1f} {:>11.1f} {:>13.0f}%\n",
                   fmt::format("{} {}", wtype_name(t), s.name), 1, s.rows, s.cols, gflops, gbs,
                   100 * gbs / bw);
    }
  }
  if (!b.json) fmt::print("read bandwidth: {:.1f} GB/s\n", bw);
  // Mixed precision (`moe train --dtype bf16`): the same shape classes with bf16 operands and
  // float32 accumulation, against the float32 library on the same shape.
  nlohmann::json bf16_ops;
  const std::string bf16_backend = cpu::gemm_bf16_backend_info();
  if (!b.json)
    fmt::print("\nbf16 operands: {}\n{:<18} {:>6} {:>6} {:>6} {:>11} {:>11} {:>9} {:>8}\n",
               bf16_backend, "bf16 x bf16 shape", "m", "n", "k", "engine", "f32 lib", "of lib",
               "of peak");
  bf16_ops = run_shapes(true, b, peak, rng, rows);
  if (b.json) {
    nlohmann::json gf = by_type;
    gf.update(by_quant);
    gf["f32"] = f32;
    gf["bf16_operands"] = bf16_ops;
    const nlohmann::json j = {{"cpu", f.brand},
                              {"features", f.str()},
                              {"path", cpu_path_name(cpu_path())},
                              {"best_path", cpu_path_name(f.best())},
                              {"f32_backend", backend},
                              {"bf16_backend", bf16_backend},
                              {"threads", num_threads()},
                              {"fma_peak_gflops", peak},
                              {"read_bandwidth_gbs", bw},
                              {"weight_kernels", cpu::weight_kernel_target()},
                              {"gflops", gf},
                              {"shapes", rows}};
    fmt::print("{}\n", j.dump());
  } else {
    fmt::print(
        "\nengine: the engine's GEMM (tiles fixed by the shape: the same bits on any thread "
        "count);\nlibrary: one call of the same library threaded its own way.\n");
  }
  return 0;
}

}  // namespace

std::pair<CLI::App*, Run> add_bench_gemm(CLI::App& bench) {
  auto b = std::make_shared<BenchGemm>();
  auto* gemm = bench.add_subcommand(
      "gemm", "matrix products per dtype and shape class against the FMA peak and the library");
  gemm->add_option("-t,--threads", b->threads, "threads (0: all cores)")->capture_default_str();
  gemm->add_option("--reps", b->reps, "timed runs (the median is reported)")->capture_default_str();
  gemm->add_flag("--json", b->json,
                 "print one JSON object (path, fma_peak_gflops, gflops per dtype and shape, ...)");
  return {gemm, [b] { return run_bench_gemm(*b); }};
}

}  // namespace moe::cli
