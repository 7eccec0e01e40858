// The classic mixture-of-experts demonstration (see moe/classic.h). Each model is an MoeLayer
// whose input is (x, 1) and whose prediction is the first output component; the loss is the mean
// squared error, minimized by full-batch AdamW.
#include "moe/classic.h"

#include <fmt/format.h>

#include <cmath>

#include "moe/arena.h"
#include "moe/moe_layer.h"
#include "moe/optimizer.h"

namespace moe {

double classic_target(int dims, const double* x) {
  if (dims == 1) {
    const double v = x[0];
    // Four smooth pieces with jumps between them: easy for one expert each, hard for one
    // smooth function across the jumps.
    if (v < -0.5) return -0.6 - 1.2 * (v + 0.75);
    if (v < 0.0) return 0.8 - 4.0 * (v + 0.25) * (v + 0.25);
    if (v < 0.5) return -0.9 + 1.5 * v;
    return 0.6 + 2.0 * (v - 0.75) * (v - 0.75);
  }
  const double a = x[0], b = x[1];
  if (a < 0 && b < 0) return 0.8 * a - 0.5 * b - 0.6;
  if (a >= 0 && b < 0) return std::sin(3 * M_PI * a) * 0.5;
  if (a < 0) return 1.2 * a * b + 0.7;
  return -0.9 + a + b * b;
}

namespace {

struct Data {
  int64_t n = 0, d = 0;
  Tensor x;               // [n, d]: the inputs and a constant 1
  std::vector<double> y;  // [n]
};

Data make_data(int dims, const std::vector<double>& points) {
  Data data;
  data.n = static_cast<int64_t>(points.size()) / dims;
  data.d = dims + 1;
  data.x = Tensor::empty({data.n, data.d}, DType::F32);
  float* xp = data.x.data<float>();
  for (int64_t i = 0; i < data.n; ++i) {
    for (int k = 0; k < dims; ++k) xp[i * data.d + k] = static_cast<float>(points[i * dims + k]);
    xp[i * data.d + dims] = 1.0f;
    data.y.push_back(classic_target(dims, &points[static_cast<size_t>(i * dims)]));
  }
  return data;
}

double mse(const Tensor& y, const Data& data, Tensor* dy) {
  const float* yp = y.data<float>();
  double loss = 0;
  for (int64_t i = 0; i < data.n; ++i) {
    const double err = yp[i * data.d] - data.y[static_cast<size_t>(i)];
    loss += err * err;
    if (dy)
      dy->data<float>()[i * data.d] = static_cast<float>(2 * err / static_cast<double>(data.n));
  }
  return loss / static_cast<double>(data.n);
}

ClassicModel train_model(const std::string& name, const MoeConfig& mc, const ClassicConfig& cfg,
                         const Data& train, const Data& grid,
                         const std::function<void(const std::string&, int64_t, double)>& progress) {
  MoeLayer layer(mc);
  Rng rng(cfg.seed);
  layer.init(rng);
  // Sharp initial gates: each expert starts out owning a part of the input, so the experts
  // specialize instead of all learning the same average function.
  Tensor& wr = layer.params().w_router;
  for (int64_t i = 0; i < wr.numel(); ++i) wr.data<float>()[i] *= 6.0f;
  AdamW opt(AdamWConfig{cfg.lr, 0.9, 0.999, 1e-8, 0.0});
  std::vector<Tensor> grads;
  layer.grads().for_each([&](const std::string&, Tensor& g) { grads.push_back(g); });
  size_t i = 0;
  layer.params().for_each([&](const std::string& n, Tensor& p) { opt.add(n, p, grads[i++]); });
  Arena arena;
  Tensor dy = Tensor::zeros({train.n, train.d}, DType::F32);
  Tensor dx = Tensor::empty({train.n, train.d}, DType::F32);
  ClassicModel m;
  m.name = name;
  m.n_experts = mc.n_experts;
  m.params = layer.params().numel();
  for (int64_t step = 0; step <= cfg.steps; ++step) {
    arena.reset();
    layer.zero_grad();
    MoeOutput out = layer.forward(train.x, arena);
    const double loss = mse(out.y, train, &dy);
    if (step % 100 == 0) {
      m.losses.push_back(loss);
      if (progress) progress(name, step, loss);
    }
    m.train_mse = loss;
    if (step == cfg.steps) break;
    layer.backward(dy, dx, arena, 1.0, 1.0);
    opt.step();
  }
  arena.reset();
  MoeOutput out = layer.forward(grid.x, arena);
  m.test_mse = mse(out.y, grid, nullptr);
  for (int64_t g = 0; g < grid.n; ++g) {
    m.fit.push_back(out.y.data<float>()[g * grid.d]);
    m.region.push_back(out.top_expert.data<int32_t>()[g]);
  }
  return m;
}

}  // namespace

ClassicResult run_classic(
    const ClassicConfig& cfg,
    const std::function<void(const std::string&, int64_t, double)>& progress) {
  MOE_CHECK(cfg.dims == 1 || cfg.dims == 2, "classic", "dims must be 1 or 2, got {}", cfg.dims);
  MOE_CHECK(cfg.n_train >= 8 && cfg.hidden >= 1 && cfg.steps >= 1, "classic",
            "need n_train >= 8, hidden >= 1, steps >= 1");
  Rng rng(cfg.seed + 1);
  std::vector<double> pts;
  for (int64_t i = 0; i < cfg.n_train * cfg.dims; ++i) pts.push_back(rng.uniform(-1, 1));
  const Data train = make_data(cfg.dims, pts);
  ClassicResult r;
  r.dims = cfg.dims;
  r.grid = cfg.dims == 1 ? 400 : 60;
  std::vector<double> gp;
  for (int64_t a = 0; a < (cfg.dims == 1 ? 1 : r.grid); ++a)
    for (int64_t b = 0; b < r.grid; ++b) {
      const double vb = -1 + 2 * (static_cast<double>(b) + 0.5) / static_cast<double>(r.grid);
      if (cfg.dims == 2)
        gp.push_back(-1 + 2 * (static_cast<double>(a) + 0.5) / static_cast<double>(r.grid));
      gp.push_back(vb);
    }
  const Data grid = make_data(cfg.dims, gp);
  r.target = grid.y;

  MoeConfig base;
  base.d_model = cfg.dims + 1;
  base.d_ffn = cfg.hidden;
  base.act = ExpertAct::gelu;
  base.expert_bias = true;
  base.router = RouterKind::soft;
  base.aux_loss_coef = 0;
  base.z_loss_coef = 0;
  MoeConfig single = base;
  single.n_experts = 1;
  MoeConfig mixture = base;
  mixture.n_experts = 4;
  MoeConfig hme = base;
  hme.n_experts = 4;
  hme.router = RouterKind::hierarchical;
  hme.hme_groups = 2;
  r.models.push_back(train_model("single expert", single, cfg, train, grid, progress));
  r.models.push_back(train_model("mixture (1991)", mixture, cfg, train, grid, progress));
  r.models.push_back(train_model("hierarchical (1994)", hme, cfg, train, grid, progress));
  return r;
}

std::string classic_svg(const ClassicResult& r) {
  static const char* colors[] = {"#e41a1c", "#377eb8", "#4daf4a", "#984ea3", "#ff7f00"};
  const int W = 900, panel = 260, pad = 40;
  std::string s = fmt::format(
      "<svg xmlns='http://www.w3.org/2000/svg' width='{}' height='{}' font-family='sans-serif' "
      "font-size='12'>\n<rect width='100%' height='100%' fill='white'/>\n",
      W, 3 * (panel + pad) + pad + 20);
  s += fmt::format("<text x='60' y='{}' fill='#444'>{}</text>\n", 3 * (panel + pad) + pad + 5,
                   r.dims == 1 ? "x from -1 (left) to +1 (right); dashed: target, solid: model; "
                                 "background: the expert with the largest gate weight"
                               : "colour: the expert with the largest gate weight");
  for (size_t mi = 0; mi < r.models.size(); ++mi) {
    const ClassicModel& m = r.models[mi];
    const int top = pad + static_cast<int>(mi) * (panel + pad);
    const int left = 60, width = W - 2 * left;
    s += fmt::format(
        "<text x='{}' y='{}' font-size='14'>{}: {} experts, {} parameters, test MSE "
        "{:.4f}</text>\n",
        left, top - 10, m.name, m.n_experts, m.params, m.test_mse);
    const int64_t g = r.grid;
    if (r.dims == 1) {
      // Background bands: the expert with the largest gate weight; then target and fit.
      for (int64_t i = 0; i < g; ++i) {
        const double x0 = left + width * static_cast<double>(i) / static_cast<double>(g);
        s += fmt::format(
            "<rect x='{:.1f}' y='{}' width='{:.2f}' height='{}' fill='{}' "
            "opacity='0.25'/>\n",
            x0, top, width / static_cast<double>(g) + 0.3, panel,
            colors[std::max(0, m.region[static_cast<size_t>(i)]) % 5]);
      }
      auto path = [&](const std::vector<double>& v, const char* color, const char* dash) {
        std::string d;
        for (int64_t i = 0; i < g; ++i) {
          const double x = left + width * (static_cast<double>(i) + 0.5) / static_cast<double>(g);
          const double y = top + panel / 2.0 - v[static_cast<size_t>(i)] * panel / 4.0;
          d += fmt::format("{}{:.1f},{:.1f} ", i == 0 ? "M" : "L", x, y);
        }
        return fmt::format(
            "<path d='{}' fill='none' stroke='{}' stroke-width='2' "
            "stroke-dasharray='{}'/>\n",
            d, color, dash);
      };
      s += path(r.target, "black", "5,3");
      s += path(m.fit, "#222266", "");
    } else {
      const double cell = static_cast<double>(panel) / static_cast<double>(g);
      for (int64_t a = 0; a < g; ++a)
        for (int64_t b = 0; b < g; ++b) {
          const size_t i = static_cast<size_t>(a * g + b);
          s += fmt::format(
              "<rect x='{:.1f}' y='{:.1f}' width='{:.2f}' height='{:.2f}' "
              "fill='{}'/>\n",
              left + static_cast<double>(a) * cell, top + static_cast<double>(g - 1 - b) * cell,
              cell + 0.2, cell + 0.2, colors[std::max(0, m.region[i]) % 5]);
        }
      s += fmt::format(
          "<text x='{}' y='{}'>x1 across, x2 up; colour = expert with the largest "
          "gate weight</text>\n",
          left + panel + 20, top + panel / 2);
    }
  }
  return s + "</svg>\n";
}

}  // namespace moe
