// AdamW, element by element in torch.optim.AdamW's order of operations.
#include "moe/optimizer.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>

#include "kernels/cpu/isa/isa_kernels.h"
#include "moe/safetensors.h"
#include "moe/threading.h"

namespace moe {

AdamW::AdamW(const AdamWConfig& cfg) : cfg_(cfg) {
  MOE_CHECK(std::isfinite(cfg.lr) && cfg.lr >= 0, "adamw", "lr must be finite and >= 0, got {}",
            cfg.lr);
  MOE_CHECK(cfg.beta1 >= 0 && cfg.beta1 < 1 && cfg.beta2 >= 0 && cfg.beta2 < 1, "adamw",
            "betas must be in [0, 1), got {} and {}", cfg.beta1, cfg.beta2);
  MOE_CHECK(cfg.eps > 0, "adamw", "eps must be > 0, got {}", cfg.eps);
  MOE_CHECK(cfg.weight_decay >= 0, "adamw", "weight_decay must be >= 0, got {}", cfg.weight_decay);
}

void AdamW::add(const std::string& name, Tensor param, Tensor grad, bool decay,
                std::vector<int64_t> frozen_rows) {
  MOE_CHECK(param.shape() == grad.shape() && param.dtype() == grad.dtype(), "adamw",
            "gradient of {} is {}, the parameter is {}", name, grad.str(), param.str());
  MOE_CHECK(param.dtype() == DType::F32 || param.dtype() == DType::F64, "adamw",
            "{} must be a float tensor, got {}", name, param.str());
  pieces_.clear();  // made again at the next step
  slots_.push_back({name, param, grad, Tensor::zeros(param.shape(), DType::F64),
                    Tensor::zeros(param.shape(), DType::F64), decay, std::move(frozen_rows)});
  for (int64_t r : slots_.back().frozen_rows)
    MOE_CHECK(param.ndim() >= 1 && r >= 0 && r < param.size(0), "adamw",
              "frozen row {} is outside {}'s {} rows", r, name, param.ndim() ? param.size(0) : 0);
}

namespace {
template <class T>
void update(T* p, const T* g, double* m, double* v, int64_t n, double lr, double wd, double b1,
            double b2, double eps, double bc1, double bc2_sqrt) {
  const double step_size = lr / bc1;
  // Element-wise, so any split gives the same bits (called on a piece inside a parallel region).
  for (int64_t i = 0; i < n; ++i) {
    double pi = static_cast<double>(p[i]);
    const double gi = static_cast<double>(g[i]);
    pi *= 1 - lr * wd;
    m[i] = b1 * m[i] + (1 - b1) * gi;
    v[i] = b2 * v[i] + (1 - b2) * gi * gi;
    const double denom = std::sqrt(v[i]) / bc2_sqrt + eps;
    p[i] = static_cast<T>(pi - step_size * m[i] / denom);
  }
}
}  // namespace

void AdamW::step(double lr) {
  ++t_;
  const double bc1 = 1 - std::pow(cfg_.beta1, static_cast<double>(t_));
  const double bc2_sqrt = std::sqrt(1 - std::pow(cfg_.beta2, static_cast<double>(t_)));
  // Every parameter's pieces, updated in one parallel region (a region per parameter made the
  // threads meet at a barrier some hundred times a step). Blocks of kBlock elements from each
  // run's start: fixed by the shapes, so the bits do not depend on the thread count.
  constexpr int64_t kBlock = 8192;
  const bool make = pieces_.empty();  // once, after the last add()
  for (size_t si = 0; make && si < slots_.size(); ++si) {
    const Slot& s = slots_[si];
    // Runs of rows between frozen ones (all rows when none is frozen).
    const int64_t rows = s.param.ndim() ? s.param.size(0) : 1;
    const int64_t row = rows ? s.param.numel() / rows : 0;
    for (int64_t r0 = 0; r0 < rows;) {
      if (std::find(s.frozen_rows.begin(), s.frozen_rows.end(), r0) != s.frozen_rows.end()) {
        ++r0;
        continue;
      }
      int64_t r1 = r0 + 1;
      while (r1 < rows &&
             std::find(s.frozen_rows.begin(), s.frozen_rows.end(), r1) == s.frozen_rows.end())
        ++r1;
      const int64_t at = r0 * row, n = (r1 - r0) * row;
      for (int64_t i = 0; i < n; i += kBlock)
        pieces_.push_back({si, at + i, std::min(kBlock, n - i)});
      r0 = r1;
    }
  }
  const cpu::IsaKernels& k = cpu::path_kernels();
  int64_t total = 0;
  for (const Piece& q : pieces_) total += q.n;
  const auto count = static_cast<int64_t>(pieces_.size());
#pragma omp parallel for schedule(static) if (total > kParallelMin)
  for (int64_t i = 0; i < count; ++i) {
    const Piece& q = pieces_[static_cast<size_t>(i)];
    Slot& s = slots_[q.slot];
    const double wd = s.decay ? cfg_.weight_decay : 0.0;
    double* m = s.m.data<double>() + q.at;
    double* v = s.v.data<double>() + q.at;
    if (s.param.dtype() == DType::F64) {
      update(s.param.data<double>() + q.at, s.grad.data<double>() + q.at, m, v, q.n, lr, wd,
             cfg_.beta1, cfg_.beta2, cfg_.eps, bc1, bc2_sqrt);
    } else {  // the per-ISA kernel (the vector paths may fuse a multiply and an add)
      const double c[6] = {1 - lr * wd, cfg_.beta1, cfg_.beta2, cfg_.eps, lr / bc1, bc2_sqrt};
      k.adamw_f32(s.param.data<float>() + q.at, s.grad.data<float>() + q.at, m, v, q.n, c);
    }
  }
}

std::vector<std::pair<std::string, Tensor>> AdamW::state(const Reshard& whole) const {
  std::vector<std::pair<std::string, Tensor>> tensors;
  for (const Slot& s : slots_) {
    tensors.emplace_back("m." + s.name, whole ? whole(s.name, s.m) : s.m);
    tensors.emplace_back("v." + s.name, whole ? whole(s.name, s.v) : s.v);
  }
  return tensors;
}

void AdamW::save(const std::string& path) const {
  save_safetensors(path, state(), {{"step", std::to_string(t_)}});
}

void AdamW::save_streamed(
    const std::string& path, const Reshard& whole,
    const std::function<Shape(const std::string& param, const Shape&)>& whole_shape,
    bool writer) const {
  std::unique_ptr<SafetensorsWriter> w;
  if (writer) {
    std::vector<SafetensorsWriter::Entry> entries;
    for (const Slot& s : slots_)
      for (const char* prefix : {"m.", "v."})
        entries.push_back({prefix + s.name, "F64", whole_shape(s.name, s.m.shape())});
    w = std::make_unique<SafetensorsWriter>(
        path, std::move(entries), std::map<std::string, std::string>{{"step", std::to_string(t_)}});
  }
  for (const Slot& s : slots_)
    for (const Tensor* t : {&s.m, &s.v}) {
      const Tensor full = whole(s.name, *t);
      if (w) w->write(full.raw(), full.nbytes());
    }
  if (w) w->commit();
}

void AdamW::load(const std::string& path, const Reshard& part) {
  const SafetensorsFile f = load_safetensors(path);
  for (Slot& s : slots_)
    for (auto [prefix, dst] : {std::pair{"m.", &s.m}, std::pair{"v.", &s.v}}) {
      const Tensor& src = part ? part(s.name, f.at(prefix + s.name)) : f.at(prefix + s.name);
      src.expect("adamw.load", (prefix + s.name).c_str(), dst->shape(), DType::F64);
      std::memcpy(dst->raw(), src.raw(), src.nbytes());
    }
  auto it = f.metadata.find("step");
  MOE_CHECK(it != f.metadata.end(), "adamw.load", "{} has no step count", path);
  t_ = std::stoll(it->second);
}

}  // namespace moe
