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
#include <string>
#include <utility>
#include <vector>

#include "moe/arena.h"
#include "moe/error.h"
#include "moe/moe_layer.h"
#include "moe/rng.h"
#include "moe/threading.h"

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
  std::string dtype() const { return dtype_ == DType::F64 ? "float64" : "float32"; }
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

  // The routing of the latest forward: each token's (expert, weight) pairs as a CSR (offsets
  // [n + 1], experts, weights), its top-1 expert, and the layer's statistics.
  py::dict routing() const {
    py::dict r;
    r["offsets"] = to_array<int64_t>(out_.plan_offsets);
    r["experts"] = to_array<int32_t>(out_.plan_experts);
    r["weights"] = to_array<float>(out_.plan_weights.to(DType::F32));
    r["top_expert"] = to_array<int32_t>(out_.top_expert);
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
      .def("dtype", &Layer::dtype)
      .def("d_model", &Layer::d_model)
      .def("params", &Layer::params)
      .def("copy_params_to", &Layer::copy_params_to)
      .def("bind", &Layer::bind)
      .def("forward", &Layer::forward)
      .def("backward", &Layer::backward)
      .def("after_step", &Layer::after_step);
  m.def("set_num_threads", &moe::set_num_threads, "threads of the engine's kernels (0: all cores)");
  m.def("num_threads", &moe::num_threads);
}
