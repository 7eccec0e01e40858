// moe_cpp._core: the C++ side of the Python module (python/moe_cpp/__init__.py wraps it as
// torch modules). The MoE layer computes on memory Python owns: its parameters, their gradients,
// the input and the output are views of torch tensors' storage (addresses passed as integers),
// so nothing is copied on the way in or out. The GIL is released while the layer computes; an
// engine error (moe::Error) arrives in Python as moe_cpp.Error with the same message.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "commands.h"
#include "moe/arena.h"
#include "moe/error.h"
#include "moe/generate.h"
#include "moe/model.h"
#include "moe/moe_layer.h"
#include "moe/rng.h"
#include "moe/threading.h"
#include "moe/tokenizer.h"
#include "moe/trainer.h"

namespace py = pybind11;

namespace moe::python {
namespace {

DType parse_dtype(const std::string& s) {
  if (s == "float32") return DType::F32;
  if (s == "float64") return DType::F64;
  throw_error("moe_cpp", fmt::format("the MoE layer computes in float32 or float64, not {}", s));
}

void* address(uintptr_t p) { return reinterpret_cast<void*>(p); }

template <class T>
py::array_t<T> to_array(const Tensor& t) {
  py::array_t<T> a(static_cast<py::ssize_t>(t.numel()));
  if (t.numel() > 0) std::memcpy(a.mutable_data(), t.data<T>(), sizeof(T) * t.numel());
  return a;
}

// A routing as numpy arrays: each token's (expert, weight) pairs as a CSR (offsets [n + 1],
// experts, weights) and its top-1 expert.
py::dict routing_of(const Tensor& offsets, const Tensor& experts, const Tensor& weights,
                    const Tensor& top_expert) {
  py::dict r;
  r["offsets"] = to_array<int64_t>(offsets);
  r["experts"] = to_array<int32_t>(experts);
  r["weights"] = to_array<float>(weights.to(DType::F32));
  r["top_expert"] = to_array<int32_t>(top_expert);
  return r;
}

// One MoE layer whose tensors are views of Python's. Forward and backward are paired by the id
// forward returns: backward of the layer's latest forward uses the activations that forward
// kept; of an earlier one (another forward ran in between, as gradcheck's numerical Jacobian
// does, or a second backward of the same forward), it first runs that forward again from its
// input and its saved random stream, which gives the same routing and values.
class Layer {
 public:
  Layer(const std::string& config_json, const std::string& dtype, uint64_t seed)
      : dtype_(parse_dtype(dtype)) {
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(config_json);
    } catch (const nlohmann::json::exception& e) {
      throw_error("moe_cpp", fmt::format("the layer's configuration is not JSON: {}", e.what()));
    }
    const MoeConfig cfg = j.get<MoeConfig>();
    layer_ = std::make_unique<MoeLayer>(cfg, dtype_);
    Rng rng(seed);
    layer_->init(rng);
  }

  std::string config_json() const { return nlohmann::json(layer_->config()).dump(); }
  int64_t d_model() const { return layer_->config().d_model; }

  // (name, shape) of every parameter, in the layer's order.
  std::vector<std::pair<std::string, std::vector<int64_t>>> params() const {
    std::vector<std::pair<std::string, std::vector<int64_t>>> out;
    layer_->params().for_each([&](const std::string& name, const Tensor& t) {
      out.emplace_back(name, std::vector<int64_t>(t.shape().begin(), t.shape().end()));
    });
    return out;
  }

  // Copies the layer's current values (its init) into Python's buffers, in params() order.
  void copy_params_to(const std::vector<uintptr_t>& ptrs) {
    size_t i = 0;
    layer_->params().for_each([&](const std::string&, Tensor& t) {
      std::memcpy(address(at(ptrs, i++)), t.raw(), t.nbytes());
    });
  }

  // Makes every parameter a view of Python's buffer (params() order); called before each use,
  // so that a tensor moved or replaced on the Python side is followed.
  void bind(const std::vector<uintptr_t>& ptrs) { bind_into(layer_->params(), ptrs); }

  // y = layer(x) for x [n, D] at address x into y [n, D]; returns (id, random stream before,
  // aux loss, z loss, routing).
  py::tuple forward(uintptr_t x, int64_t n, uintptr_t y, bool training) {
    Rng before = layer_->noise_rng();
    double aux = 0, z = 0;
    {
      py::gil_scoped_release free;
      run_forward(x, n, training);
      std::memcpy(address(y), out_.y.raw(), out_.y.nbytes());
      aux = out_.aux_loss;
      z = out_.z_loss;
    }
    last_ = ++forwards_;
    return py::make_tuple(last_, before, aux, z, routing());
  }

  // The gradients of sum(y dy) + d_aux aux + d_z z for forward `id` (whose input was x and whose
  // random stream started at `before`): dx into dx, each parameter's into Python's zeroed
  // buffers `grads` (params() order).
  void backward(int64_t id, const Rng& before, uintptr_t x, int64_t n, bool training, uintptr_t dy,
                uintptr_t dx, double d_aux, double d_z, const std::vector<uintptr_t>& grads) {
    py::gil_scoped_release free;
    if (id != last_) {
      layer_->noise_rng() = before;
      run_forward(x, n, training);
      last_ = id;
    }
    bind_into(layer_->grads(), grads);
    const int64_t D = d_model();
    const Tensor dy_t = Tensor::view(address(dy), {n, D}, dtype_);
    Tensor dx_t = Tensor::view(address(dx), {n, D}, dtype_);
    layer_->backward(dy_t, dx_t, arena_, d_aux, d_z);
    last_ = 0;  // the backward used the kept activations up: another one runs the forward again
  }

  // Router state updates once per optimizer step (DeepSeek-V3's bias), as MoeLayer::after_step.
  void after_step() {
    py::gil_scoped_release free;
    layer_->after_step();
  }

 private:
  static uintptr_t at(const std::vector<uintptr_t>& ptrs, size_t i) {
    MOE_CHECK(i < ptrs.size(), "moe_cpp", "{} addresses for more parameters", ptrs.size());
    return ptrs[i];
  }

  void bind_into(MoeParams& p, const std::vector<uintptr_t>& ptrs) {
    size_t i = 0;
    p.for_each([&](const std::string&, Tensor& t) {
      const uintptr_t a = at(ptrs, i++);
      if (t.raw() != address(a)) t = Tensor::view(address(a), t.shape(), dtype_);
    });
    MOE_CHECK(i == ptrs.size(), "moe_cpp", "{} addresses for {} parameters", ptrs.size(), i);
  }

  void run_forward(uintptr_t x, int64_t n, bool training) {
    MOE_CHECK(n >= 0, "moe_cpp", "{} rows", n);
    layer_->set_training(training);
    arena_.reset();
    const Tensor x_t = Tensor::view(address(x), {n, d_model()}, dtype_);
    layer_->forward(x_t, arena_, out_);
  }

  // The routing of the latest forward (routing_of) with the layer's statistics.
  py::dict routing() const {
    py::dict r =
        routing_of(out_.plan_offsets, out_.plan_experts, out_.plan_weights, out_.top_expert);
    const RoutingStats& s = out_.stats;
    r["routed"] = s.routed;
    r["kept"] = s.kept;
    r["capacity"] = s.capacity;
    r["dropped_fraction"] = s.dropped_fraction;
    r["load_imbalance"] = s.load_imbalance;
    r["router_entropy"] = s.router_entropy;
    return r;
  }

  DType dtype_;
  std::unique_ptr<MoeLayer> layer_;
  Arena arena_;
  MoeOutput out_;
  int64_t forwards_ = 0, last_ = 0;
};

// A checkpoint (a folder of this engine or HuggingFace's, or a GGUF file) with its tokenizer.
class LoadedModel {
 public:
  LoadedModel(const std::string& path, const std::string& weights) : path_(path) {
    MOE_CHECK(weights == "stored" || weights == "f32", "moe_cpp",
              "weights must be 'stored' or 'f32', got '{}'", weights);
    py::gil_scoped_release free;
    model_ = load_model(path, weights == "f32" ? WeightsAs::float32 : WeightsAs::stored);
    model_->set_training(false);
    try {
      tok_ = load_tokenizer(path);
    } catch (const Error& e) {
      tok_error_ = e.what();
    }
  }

  std::string config_json() const { return nlohmann::json(model_->config()).dump(); }
  int64_t vocab_size() const { return model_->config().vocab_size; }
  int64_t max_seq_len() const { return model_->config().max_seq_len; }

  // Logits of every position of ids: [T, V].
  py::array_t<float> logits(const std::vector<int32_t>& ids) {
    const auto T = static_cast<int64_t>(ids.size());
    const int64_t V = vocab_size();
    check_ids(ids);
    py::array_t<float> out({T, V});
    float* dst = out.mutable_data();
    {
      py::gil_scoped_release free;
      Arena arena;
      KvCache cache = model_->make_cache(1, std::max<int64_t>(1, T));
      const Tensor logits = model_->decode(tokens(ids), cache, arena);
      const Tensor f = logits.to(DType::F32);
      std::memcpy(dst, f.raw(), sizeof(float) * static_cast<size_t>(T * V));
    }
    return out;
  }

  // Each MoE layer's routing of ids (one pass): a list of dicts of numpy arrays.
  py::list routing(const std::vector<int32_t>& ids) {
    check_ids(ids);
    Arena arena;
    ModelOutput r;
    {
      py::gil_scoped_release free;
      KvCache cache = model_->make_cache(1, std::max<int64_t>(1, static_cast<int64_t>(ids.size())));
      model_->decode(tokens(ids), cache, arena, {}, nullptr, Model::LogitRows::none, &r);
    }
    py::list layers;
    for (size_t l = 0; l < r.plan_offsets.size(); ++l)
      layers.append(
          routing_of(r.plan_offsets[l], r.plan_experts[l], r.plan_weights[l], r.top_expert[l]));
    return layers;
  }

  std::vector<int32_t> encode(const std::string& text) const { return tokenizer().encode(text); }
  py::bytes decode(const std::vector<int32_t>& ids) const {
    return py::bytes(tokenizer().decode(ids));
  }
  bool has_tokenizer() const { return tok_ != nullptr; }
  std::optional<int32_t> eos_id() const { return tok_ ? tok_->eos_id() : std::nullopt; }

  Model& model() { return *model_; }
  void check_ids(const std::vector<int32_t>& ids) const {
    MOE_CHECK(!ids.empty(), "moe_cpp", "no token ids");
    MOE_CHECK(static_cast<int64_t>(ids.size()) <= max_seq_len(), "moe_cpp",
              "{} tokens exceed the model's {} positions", ids.size(), max_seq_len());
    for (size_t i = 0; i < ids.size(); ++i)
      MOE_CHECK(ids[i] >= 0 && ids[i] < vocab_size(), "moe_cpp",
                "token {} at position {} is outside the vocabulary [0, {})", ids[i], i,
                vocab_size());
  }
  static Tensor tokens(const std::vector<int32_t>& ids) {
    Tensor t = Tensor::empty({1, static_cast<int64_t>(ids.size())}, DType::I32);
    std::copy(ids.begin(), ids.end(), t.data<int32_t>());
    return t;
  }

 private:
  const Tokenizer& tokenizer() const {
    MOE_CHECK(tok_ != nullptr, "moe_cpp", "{} has no tokenizer ({})", path_, tok_error_);
    return *tok_;
  }

  std::string path_;
  std::unique_ptr<Model> model_;
  std::unique_ptr<Tokenizer> tok_;
  std::string tok_error_;
};

// Generation one token at a time (Python's iterator): the prompt in one pass, then a decode
// step per token, sampled as moe generate samples (temperature, top-k, top-p, seed).
class Generation {
 public:
  Generation(LoadedModel& m, const std::vector<int32_t>& prompt, int64_t max_tokens,
             const SamplingConfig& s, bool stop_at_eos)
      : m_(m), s_(s), rng_(s.seed), left_(max_tokens) {
    m.check_ids(prompt);
    MOE_CHECK(max_tokens >= 0, "moe_cpp", "max_tokens must be >= 0, got {}", max_tokens);
    const auto T = static_cast<int64_t>(prompt.size());
    MOE_CHECK(T + max_tokens <= m.max_seq_len(), "moe_cpp",
              "a {}-token prompt and {} new tokens exceed the model's {} positions", T, max_tokens,
              m.max_seq_len());
    cache_ = m.model().make_cache(1, T + max_tokens + 1);
    if (stop_at_eos) eos_ = m.eos_id();
    pending_ = LoadedModel::tokens(prompt);
  }

  // The next token id, or none when done.
  std::optional<int32_t> next() {
    if (left_ <= 0) return std::nullopt;
    int32_t tok = 0;
    {
      py::gil_scoped_release free;
      arena_.reset();
      const Tensor logits =
          m_.model().decode(pending_, cache_, arena_, {}, nullptr, Model::LogitRows::last);
      const Tensor f = logits.to(DType::F32);
      tok = sample_token(f.data<float>(), m_.vocab_size(), s_, rng_);
    }
    --left_;
    if (eos_ && tok == *eos_) left_ = 0;
    pending_ = LoadedModel::tokens({tok});
    return tok;
  }
  // Whether the latest token was the last.
  bool done() const { return left_ <= 0; }

 private:
  LoadedModel& m_;
  SamplingConfig s_;
  Rng rng_;
  int64_t left_;
  std::optional<int32_t> eos_;
  KvCache cache_;
  Arena arena_;
  Tensor pending_;
};

// `moe ARGS...` in this process (the Python module's train): the command's own options and
// checks; an error arrives as moe_cpp.Error, a usage error with CLI11's message.
int run_cli(const std::vector<std::string>& args) {
  std::unique_ptr<cli::Cli> c = cli::make_cli();
  std::vector<std::string> all = {"moe"};
  all.insert(all.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (std::string& a : all) argv.push_back(a.data());
  try {
    c->app.parse(static_cast<int>(argv.size()), argv.data());
  } catch (const CLI::CallForHelp&) {
    py::print(c->app.help());
    return 0;
  } catch (const CLI::ParseError& e) {
    throw_error("moe_cpp", fmt::format("moe {}: {}", args.empty() ? "" : args[0], e.what()));
  }
  py::gil_scoped_release free;
  for (auto& [sub, run] : c->commands)
    if (sub->parsed()) return run();
  throw_error("moe_cpp", "no command given");
}

}  // namespace
}  // namespace moe::python

PYBIND11_MODULE(_core, m) {
  using moe::python::Layer;
  m.doc() = "moe.cpp's C++ side (see the moe_cpp package)";
  py::register_exception<moe::Error>(m, "Error", PyExc_RuntimeError);
  py::class_<moe::Rng>(m, "Rng");
  py::class_<Layer>(m, "Layer")
      .def(py::init<const std::string&, const std::string&, uint64_t>(), py::arg("config_json"),
           py::arg("dtype"), py::arg("seed"))
      .def("config_json", &Layer::config_json)
      .def("d_model", &Layer::d_model)
      .def("params", &Layer::params)
      .def("copy_params_to", &Layer::copy_params_to)
      .def("bind", &Layer::bind)
      .def("forward", &Layer::forward)
      .def("backward", &Layer::backward)
      .def("after_step", &Layer::after_step);
  using moe::python::Generation;
  using moe::python::LoadedModel;
  py::class_<LoadedModel>(m, "Model")
      .def(py::init<const std::string&, const std::string&>(), py::arg("path"), py::arg("weights"))
      .def("config_json", &LoadedModel::config_json)
      .def("vocab_size", &LoadedModel::vocab_size)
      .def("max_seq_len", &LoadedModel::max_seq_len)
      .def("logits", &LoadedModel::logits)
      .def("routing", &LoadedModel::routing)
      .def("encode", &LoadedModel::encode)
      .def("decode", &LoadedModel::decode)
      .def("has_tokenizer", &LoadedModel::has_tokenizer)
      .def("eos_id", &LoadedModel::eos_id);
  py::class_<Generation>(m, "Generation")
      .def(py::init([](LoadedModel& model, const std::vector<int32_t>& prompt, int64_t max_tokens,
                       double temperature, int64_t top_k, double top_p, uint64_t seed,
                       bool stop_at_eos) {
             return std::make_unique<Generation>(
                 model, prompt, max_tokens, moe::SamplingConfig{temperature, top_k, top_p, seed},
                 stop_at_eos);
           }),
           py::keep_alive<1, 2>())
      .def("next", &Generation::next)
      .def("done", &Generation::done);
  m.def("run_cli", &moe::python::run_cli, "moe ARGS... in this process; its exit status");
  m.def("set_num_threads", &moe::set_num_threads, "threads of the engine's kernels (0: all cores)");
  m.def("num_threads", &moe::num_threads);
}
