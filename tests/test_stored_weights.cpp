// Checkpoints computed from as they are stored (WeightsAs::stored): transformers' tiny
// checkpoints of every architecture, as written (float32) and rounded to bf16 or f16, against
// the same weights read into float32.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>

#include "hf_test_util.h"
#include "moe/expert_ffn.h"
#include "moe/generate.h"
#include "moe/hf.h"
#include "moe/quantize.h"
#include "moe/rng.h"
#include "moe/trainer.h"

namespace moe {

namespace {

namespace fs = std::filesystem;

class StoredWeights : public ::testing::TestWithParam<const char*> {};

// bf16 and int8 weights: a prompt's products (more than cpu::kMatvecMaxRows rows) take their
// activations rounded to bf16 (moe/weights.h), so logits move by bf16's resolution (measured: 1e-4
// to 9e-3 relative on these models, 3.9e-2 on DBRX's, where it changes a later layer's choice of
// experts); decoding's one-row products stay exact in float32.
constexpr double kBf16Prompt = 5e-2;
// f16 weights widened to float32: float32 rounding only.
constexpr double kWidened = 2e-6;

// The fixture with every tensor of two or more dimensions stored as `dtype` (bf16: rounded to
// nearest even; f16: through f32_to_f16), in a folder of its own.
std::string rounded_copy(const std::string& name, DType dtype) {
  const std::string src = hf_fixture(name);
  const fs::path dir = fs::temp_directory_path() / ("moe_stored_" + name + "_" + dtype_name(dtype) +
                                                    "_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  fs::copy_file(src + "/config.json", dir / "config.json");
  const SafetensorsFile all = load_safetensors(src + "/model.safetensors");
  std::vector<std::pair<std::string, Tensor>> out;
  for (const auto& [n, st] : all.stored) {
    const Tensor& t = all.at(n);
    if (t.ndim() < 2 || t.dtype() != DType::F32) {
      out.emplace_back(n, t);
    } else {
      out.emplace_back(n, t.to(dtype));
    }
  }
  save_safetensors((dir / "model.safetensors").string(), out);
  return dir.string();
}

Tensor logits_of(Model& m, const Tensor& ids) {
  Arena arena;
  return m.logits(ids, arena).clone();
}

}  // namespace

// Float32 files kept as stored run the same code on the same numbers: the same bits. DBRX's
// experts' w2, stored with its input rows, is multiplied in that orientation (x W rather than the
// copy's x W^T), so there the sums differ in order: float32 rounding.
TEST_P(StoredWeights, FloatFilesGiveTheSameBits) {
  const std::string dir = hf_fixture(GetParam());
  const Tensor ids = as_i32(load_safetensors(dir + "/reference.safetensors").at("input_ids"));
  std::unique_ptr<Model> copied = load_model(dir), kept = load_model(dir, WeightsAs::stored);
  const Tensor a = logits_of(*copied, ids), b = logits_of(*kept, ids);
  ASSERT_EQ(a.shape(), b.shape());
  if (GetParam() == std::string("dbrx")) {
    EXPECT_LT(relative_error(b, a), 1e-6);
  } else {
    EXPECT_EQ(std::memcmp(a.raw(), b.raw(), a.nbytes()), 0);
  }
}

// bf16 and f16 checkpoints computed from their stored bytes agree with the same weights widened
// to float32 (f16: up to float32 rounding, the kernels sum in another order; bf16: up to the
// rounding of a prompt's activations to bf16), and decode greedily to the same ids; a model
// holding stored weights refuses to train.
TEST_P(StoredWeights, HalfPrecisionFilesMatchTheirFloat32Copy) {
  const std::string name = GetParam();
  const Tensor ids =
      as_i32(load_safetensors(hf_fixture(name) + "/reference.safetensors").at("input_ids"));
  for (DType d : {DType::BF16, DType::F16}) {
    const std::string dir = rounded_copy(name, d);
    std::unique_ptr<Model> copied = load_model(dir), kept = load_model(dir, WeightsAs::stored);
    EXPECT_FALSE(copied->weights_stored());
    EXPECT_TRUE(kept->weights_stored()) << name;
    const Tensor a = logits_of(*copied, ids), b = logits_of(*kept, ids);
    const double err = relative_error(b, a);
    std::printf("%s %s: stored against float32 copy, logits relative error %.3g\n", name.c_str(),
                dtype_name(d), err);
    EXPECT_LT(err, d == DType::BF16 ? kBf16Prompt : kWidened) << dtype_name(d);
    SamplingConfig greedy;
    greedy.temperature = 0;
    const std::vector<std::vector<int32_t>> prompt = {{1, 5, 9, 2}};
    EXPECT_EQ(generate(*copied, prompt, 8, greedy), generate(*kept, prompt, 8, greedy))
        << dtype_name(d);
    if (kept->weights_stored()) {
      Arena arena;
      EXPECT_THROW(kept->forward_backward(ids, arena), Error);
    }
    fs::remove_all(dir);
  }
}

// Experts quantized by moe quantize (int8 with row scales, and bf16) are computed from their
// stored bytes: the same logits as the quantized checkpoint read into float32, up to the
// rounding of the prompt's activations to bf16, and the same greedy ids.
TEST_P(StoredWeights, QuantizedExpertsComputeAsStored) {
  const std::string name = GetParam();
  const Tensor ids =
      as_i32(load_safetensors(hf_fixture(name) + "/reference.safetensors").at("input_ids"));
  for (ExpertFormat f : {ExpertFormat::int8, ExpertFormat::bf16}) {
    const fs::path dir = fs::temp_directory_path() /
                         ("moe_stored_q_" + name + "_" + to_string(f) + std::to_string(::getpid()));
    fs::remove_all(dir);
    quantize_checkpoint(hf_fixture(name), dir.string(), f);
    std::unique_ptr<Model> copied = load_model(dir.string()),
                           kept = load_model(dir.string(), WeightsAs::stored);
    const double err = relative_error(logits_of(*kept, ids), logits_of(*copied, ids));
    std::printf("%s %s experts: stored against float32 copy, logits relative error %.3g\n",
                name.c_str(), to_string(f), err);
    EXPECT_LT(err, kBf16Prompt) << to_string(f);
    SamplingConfig greedy;
    greedy.temperature = 0;
    const std::vector<std::vector<int32_t>> prompt = {{1, 5, 9, 2}};
    EXPECT_EQ(generate(*copied, prompt, 8, greedy), generate(*kept, prompt, 8, greedy));
    fs::remove_all(dir);
  }
}

namespace {

// The same weights read into float32 and kept as stored: the same logits up to float32 rounding
// (bit for bit where the files are float32) and the same greedy ids; and the stored model's
// routed experts are views of the file (its layers hold none).
void expect_stored_like_float32(const std::string& dir, const Tensor& ids, bool float_file,
                                double tolerance = kWidened) {
  std::unique_ptr<Model> copied = load_model(dir), kept = load_model(dir, WeightsAs::stored);
  ASSERT_FALSE(kept->moe_layers().empty());
  EXPECT_EQ(kept->moe_layers()[0]->params().experts.w_up.size(0), 0)
      << "the routed experts were copied";
  const Tensor a = logits_of(*copied, ids), b = logits_of(*kept, ids);
  if (float_file) {
    EXPECT_EQ(std::memcmp(a.raw(), b.raw(), a.nbytes()), 0);
  } else {
    const double err = relative_error(b, a);
    std::printf("%s: stored against float32 copy, logits relative error %.3g\n", dir.c_str(), err);
    EXPECT_LT(err, tolerance);
  }
  SamplingConfig greedy;
  greedy.temperature = 0;
  const std::vector<std::vector<int32_t>> prompt = {{1, 5, 9, 2}};
  EXPECT_EQ(generate(*copied, prompt, 8, greedy), generate(*kept, prompt, 8, greedy));
}

}  // namespace

// This engine's own checkpoints (stacked experts "layers.<i>.moe.experts.w_up" [E, F, D], here
// with expert biases) are computed from as stored too: float32, and quantized to int8 and bf16.
TEST(StoredWeights, OwnCheckpointsKeepTheirStackedExperts) {
  ModelConfig c = model_preset("tiny");
  c.moe.router = RouterKind::noisy_topk;  // not Mixtral's layout: saved under our own names
  c.moe.expert_bias = true;
  Model m(c);
  Rng rng(9);
  m.init(rng);
  for (NamedParam& p : m.params())
    if (p.name.find("experts.b_") != std::string::npos)
      for (int64_t i = 0; i < p.value.numel(); ++i)
        p.value.data<float>()[i] = static_cast<float>(0.1 * rng.normal());
  const fs::path dir = fs::temp_directory_path() / ("moe_stored_own_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  save_model(m, (dir / "f32").string());
  ASSERT_TRUE(
      load_safetensors((dir / "f32/model.safetensors").string()).has("layers.0.moe.experts.b_up"));
  Tensor ids = Tensor::empty({2, 9}, DType::I32);
  for (int64_t i = 0; i < ids.numel(); ++i)
    ids.data<int32_t>()[i] = static_cast<int32_t>(3 + 7 * i % 250);
  expect_stored_like_float32((dir / "f32").string(), ids, true);
  for (ExpertFormat f : {ExpertFormat::int8, ExpertFormat::bf16}) {
    SCOPED_TRACE(to_string(f));
    const fs::path q = dir / to_string(f);
    quantize_checkpoint((dir / "f32").string(), q.string(), f);
    expect_stored_like_float32(q.string(), ids, false, kBf16Prompt);
  }
  fs::remove_all(dir);
}

// transformers' fused expert layout (gate_up_proj [E, 2F, D], down_proj [E, D, F]) quantized to
// int8 keeps its row scales beside the fused tensors ([E, 2F], [E, D]) and is computed from as
// stored.
TEST(StoredWeights, FusedInt8ExpertsComputeAsStored) {
  const std::string src = hf_fixture("qwen3_moe");
  const Tensor ids = as_i32(load_safetensors(src + "/reference.safetensors").at("input_ids"));
  const fs::path dir =
      fs::temp_directory_path() / ("moe_stored_fused_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir / "fused");
  fs::copy_file(src + "/config.json", dir / "fused/config.json");
  std::unique_ptr<Model> m = load_model(src);
  save_safetensors((dir / "fused/model.safetensors").string(),
                   hf_tensors(*m, "qwen3_moe", /*fused_experts=*/true));
  quantize_checkpoint((dir / "fused").string(), (dir / "int8").string(), ExpertFormat::int8);
  const SafetensorsFile q = load_safetensors((dir / "int8/model.safetensors").string());
  ASSERT_TRUE(q.has("model.layers.0.mlp.experts.gate_up_proj_scale"));
  EXPECT_EQ(q.stored.at("model.layers.0.mlp.experts.gate_up_proj").dtype, "I8");
  expect_stored_like_float32((dir / "int8").string(), ids, false, kBf16Prompt);
  fs::remove_all(dir);
}

// The fused expert kernel (a token's experts, or a prompt's, in two parallel regions) gives each
// expert's results of running it alone, bit for bit, for bf16, f16 and int8 experts and row
// counts from 0 to 37.
TEST(StoredExperts, FusedKernelEqualsOneExpertAtATime) {
  const int64_t D = 72, F = 136;
  Rng rng(4);
  for (DType d : {DType::BF16, DType::F16, DType::I8}) {
    std::vector<ExpertView> experts;
    std::vector<Tensor> keep;
    for (int e = 0; e < 6; ++e) {
      ExpertView v;
      for (auto [t, shape] :
           {std::pair<Tensor*, Shape>{&v.w_gate, {F, D}}, {&v.w_up, {F, D}}, {&v.w_down, {D, F}}}) {
        Tensor f = Tensor::empty(shape, DType::F32);
        rng.fill_normal(f, 0, 0.1);
        if (d == DType::I8) {  // int8 values with a scale per row
          Tensor q = Tensor::empty(shape, DType::I8), sc = Tensor::empty({shape[0]}, DType::F32);
          for (int64_t i = 0; i < f.numel(); ++i)
            static_cast<int8_t*>(q.raw())[i] = static_cast<int8_t>(std::lround(std::fmax(
                -127.0, std::fmin(127.0, 400.0 * static_cast<double>(f.data<float>()[i])))));
          for (int64_t r = 0; r < shape[0]; ++r)
            sc.data<float>()[r] = 0.0025f * (1.0f + 0.1f * static_cast<float>(r % 5));
          *t = q;
          (t == &v.w_gate ? v.s_gate : t == &v.w_up ? v.s_up : v.s_down) = sc;
        } else {
          *t = f.to(d);
        }
      }
      experts.push_back(v);
    }
    // Decoding's few rows, and a prompt's blocks (the grouped GEMM's panels).
    const std::vector<int64_t> rows = {1, 0, 4, 2, 9, 37};
    std::vector<std::vector<float>> x(6), y1(6), y2(6), g(6), u(6), h(6);
    std::vector<ExpertRun> runs;
    for (size_t e = 0; e < 6; ++e) {
      const int64_t n = rows[e];
      x[e].resize(static_cast<size_t>(n * D));
      for (float& v : x[e]) v = static_cast<float>(rng.normal());
      y1[e].assign(static_cast<size_t>(n * D), 0);
      y2[e].assign(static_cast<size_t>(n * D), 0);
      g[e].resize(static_cast<size_t>(n * F));
      u[e].resize(static_cast<size_t>(n * F));
      h[e].resize(static_cast<size_t>(n * F));
      ffn_forward_stored(ExpertAct::swiglu, experts[e], n, D, F, x[e].data(), y1[e].data(),
                         g[e].data(), u[e].data(), h[e].data());
      runs.push_back(
          {experts[e], n, x[e].data(), y2[e].data(), g[e].data(), u[e].data(), h[e].data()});
    }
    ffn_forward_stored_fused(ExpertAct::swiglu, runs, D, F);
    for (size_t e = 0; e < 6; ++e) {
      EXPECT_EQ(y1[e], y2[e]) << dtype_name(d) << " expert " << e;
      double norm = 0;
      for (float v : y2[e]) norm += std::fabs(v);
      EXPECT_TRUE(rows[e] == 0 || norm > 0);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, StoredWeights,
                         ::testing::Values("mixtral", "mixtral_top1_e4", "qwen2_moe", "qwen3_moe",
                                           "olmoe", "deepseek_v2", "deepseek_v3", "dbrx"));

}  // namespace moe
