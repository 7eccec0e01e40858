// Routing statistics of a model over tagged text, and their pictures (see moe/inspect.h).
#include "moe/inspect.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>

namespace moe {

double normalized_mutual_information(const std::vector<std::vector<int64_t>>& joint) {
  double n = 0;
  std::vector<double> pa(joint.size(), 0.0), pb;
  for (size_t a = 0; a < joint.size(); ++a) {
    if (pb.size() < joint[a].size()) pb.resize(joint[a].size(), 0.0);
    for (size_t b = 0; b < joint[a].size(); ++b) {
      const auto c = static_cast<double>(joint[a][b]);
      pa[a] += c;
      pb[b] += c;
      n += c;
    }
  }
  if (n == 0) return 0;
  auto entropy = [&](const std::vector<double>& p) {
    double h = 0;
    for (double c : p)
      if (c > 0) h -= c / n * std::log(c / n);
    return h;
  };
  double mi = 0;
  for (size_t a = 0; a < joint.size(); ++a)
    for (size_t b = 0; b < joint[a].size(); ++b) {
      const auto c = static_cast<double>(joint[a][b]);
      if (c > 0) mi += c / n * std::log(c * n / (pa[a] * pb[b]));
    }
  const double ha = entropy(pa), hb = entropy(pb);
  return ha + hb > 0 && ha > 0 && hb > 0 ? 2 * mi / (ha + hb) : 0;
}

RoutingReport inspect_routing(Model& model, const TokenStream& stream,
                              const std::vector<std::string>& languages, int64_t batches,
                              int64_t batch, int64_t seq_len) {
  MOE_CHECK(!model.moe_layers().empty(), "inspect", "the model has no MoE layer");
  const int64_t W = seq_len + 1;
  const int64_t windows = (static_cast<int64_t>(stream.ids.size()) - 1) / seq_len;
  MOE_CHECK(windows >= 1, "inspect", "the text is shorter than one window of {}", W);
  model.set_training(false);
  RoutingReport r;
  r.languages = languages;
  const ModelConfig& cfg = model.config();
  const int64_t E = cfg.moe.n_experts, L = static_cast<int64_t>(languages.size());
  for (int64_t i = 0; i < cfg.n_layers; ++i)
    if (cfg.is_moe_layer(i)) {
      LayerRouting lr;
      lr.layer = i;
      lr.tokens_per_expert.assign(static_cast<size_t>(E), 0);
      lr.lang_expert.assign(static_cast<size_t>(L), std::vector<int64_t>(static_cast<size_t>(E)));
      r.layers.push_back(lr);
    }
  // Per layer: pairs routed, pairs dropped, tokens that reached no expert.
  std::vector<double> pairs(r.layers.size(), 0), dropped(r.layers.size(), 0),
      unrouted(r.layers.size(), 0);
  std::vector<std::vector<std::vector<int64_t>>> top_joint(
      r.layers.size(), std::vector<std::vector<int64_t>>(
                           static_cast<size_t>(L), std::vector<int64_t>(static_cast<size_t>(E))));
  // Windows evenly spaced over the whole stream, so that every part of the corpus (and every
  // language, when documents are grouped by language) is visited.
  const int64_t wanted = std::min(windows, batches * batch);
  Arena arena;
  int64_t done = 0, runs = 0;
  for (; done < wanted; ++runs) {
    const int64_t b = std::min(batch, wanted - done);
    Tensor tok = Tensor::empty({b, W}, DType::I32);
    std::vector<int32_t> lang(static_cast<size_t>(b * seq_len));
    for (int64_t i = 0; i < b; ++i) {
      const auto start = static_cast<size_t>((done + i) * windows / wanted * seq_len);
      int32_t* row = tok.data<int32_t>() + i * W;
      for (int64_t j = 0; j < W; ++j) row[j] = stream.ids[start + static_cast<size_t>(j)];
      for (int64_t j = 0; j < seq_len; ++j)
        lang[static_cast<size_t>(i * seq_len + j)] = stream.lang[start + static_cast<size_t>(j)];
    }
    done += b;
    arena.reset();
    const ModelOutput out = model.forward(tok, arena);
    for (size_t l = 0; l < r.layers.size(); ++l) {
      LayerRouting& lr = r.layers[l];
      lr.router_entropy += out.routing[l].router_entropy;
      for (size_t e = 0; e < out.routing[l].routed.size(); ++e) {
        pairs[l] += static_cast<double>(out.routing[l].routed[e]);
        dropped[l] += static_cast<double>(out.routing[l].routed[e] - out.routing[l].kept[e]);
      }
      const int64_t* off = out.plan_offsets[l].data<int64_t>();
      const int32_t* ex = out.plan_experts[l].data<int32_t>();
      const int32_t* top = out.top_expert[l].data<int32_t>();
      for (int64_t t = 0; t < b * seq_len; ++t) {
        const auto lg = static_cast<size_t>(lang[static_cast<size_t>(t)]);
        for (int64_t p = off[t]; p < off[t + 1]; ++p) {
          ++lr.tokens_per_expert[static_cast<size_t>(ex[p])];
          ++lr.lang_expert[lg][static_cast<size_t>(ex[p])];
        }
        if (top[t] >= 0) ++top_joint[l][lg][static_cast<size_t>(top[t])];
        if (top[t] < 0) unrouted[l] += 1;
      }
    }
    r.tokens += b * seq_len;
  }
  for (size_t l = 0; l < r.layers.size(); ++l) {
    LayerRouting& lr = r.layers[l];
    lr.router_entropy /= static_cast<double>(std::max<int64_t>(1, runs));
    lr.dropped = pairs[l] > 0 ? dropped[l] / pairs[l] : 0;
    lr.unrouted = r.tokens > 0 ? unrouted[l] / static_cast<double>(r.tokens) : 0;
    int64_t total = 0, most = 0;
    for (int64_t c : lr.tokens_per_expert) {
      total += c;
      most = std::max(most, c);
      lr.dead_experts += c == 0;
    }
    lr.load_imbalance =
        total > 0 ? static_cast<double>(most) * static_cast<double>(E) / static_cast<double>(total)
                  : 0;
    lr.nmi = normalized_mutual_information(top_joint[l]);
  }
  return r;
}

std::string load_svg(const RoutingReport& r) {
  const int64_t E =
      r.layers.empty() ? 0 : static_cast<int64_t>(r.layers[0].tokens_per_expert.size());
  const int W = 60 + static_cast<int>(E) * 40 + 40, row = 160;
  const int H = 40 + static_cast<int>(r.layers.size()) * row + 20;
  std::string s = fmt::format(
      "<svg xmlns='http://www.w3.org/2000/svg' width='{}' height='{}' font-family='sans-serif' "
      "font-size='11'>\n<rect width='100%' height='100%' fill='white'/>\n"
      "<text x='10' y='20' font-size='14'>Tokens per expert, by layer (dashed: a perfectly "
      "balanced load)</text>\n",
      W, H);
  for (size_t l = 0; l < r.layers.size(); ++l) {
    const LayerRouting& lr = r.layers[l];
    const int top = 40 + static_cast<int>(l) * row;
    const int64_t most = std::max<int64_t>(
        1, *std::max_element(lr.tokens_per_expert.begin(), lr.tokens_per_expert.end()));
    int64_t total = 0;
    for (int64_t c : lr.tokens_per_expert) total += c;
    s += fmt::format("<text x='10' y='{}'>layer {}: imbalance {:.2f}, {} dead, NMI {:.3f}</text>\n",
                     top + 12, lr.layer, lr.load_imbalance, lr.dead_experts, lr.nmi);
    const double scale = 110.0 / static_cast<double>(most);
    for (int64_t e = 0; e < E; ++e) {
      const double h = static_cast<double>(lr.tokens_per_expert[static_cast<size_t>(e)]) * scale;
      s += fmt::format(
          "<rect x='{}' y='{:.1f}' width='30' height='{:.1f}' fill='#377eb8'/>"
          "<text x='{}' y='{}'>{}</text>\n",
          60 + e * 40, top + 130 - h, h, 70 + e * 40, top + 145, e);
    }
    const double mean = static_cast<double>(total) / static_cast<double>(std::max<int64_t>(1, E));
    s += fmt::format(
        "<line x1='55' x2='{}' y1='{:.1f}' y2='{:.1f}' stroke='black' "
        "stroke-dasharray='4,3'/>\n",
        60 + E * 40, top + 130 - mean * scale, top + 130 - mean * scale);
  }
  return s + "</svg>\n";
}

std::string language_svg(const RoutingReport& r) {
  const int64_t E =
      r.layers.empty() ? 0 : static_cast<int64_t>(r.layers[0].tokens_per_expert.size());
  const int64_t L = static_cast<int64_t>(r.languages.size());
  const int cell = 28, panel_w = 70 + static_cast<int>(E) * cell + 30;
  const int W = panel_w * static_cast<int>(std::max<size_t>(1, r.layers.size())) + 20;
  const int H = 60 + static_cast<int>(L) * cell + 40;
  std::string s = fmt::format(
      "<svg xmlns='http://www.w3.org/2000/svg' width='{}' height='{}' font-family='sans-serif' "
      "font-size='11'>\n<rect width='100%' height='100%' fill='white'/>\n"
      "<text x='10' y='20' font-size='14'>Share of each language's tokens sent to each expert "
      "(darker: larger), by layer</text>\n",
      W, H);
  for (size_t l = 0; l < r.layers.size(); ++l) {
    const LayerRouting& lr = r.layers[l];
    const int left = 10 + static_cast<int>(l) * panel_w;
    s += fmt::format("<text x='{}' y='45'>layer {} (NMI {:.3f})</text>\n", left + 60, lr.layer,
                     lr.nmi);
    for (int64_t a = 0; a < L; ++a) {
      const auto& row = lr.lang_expert[static_cast<size_t>(a)];
      int64_t total = 0;
      for (int64_t c : row) total += c;
      s += fmt::format("<text x='{}' y='{}'>{}</text>\n", left, 70 + a * cell + 14,
                       r.languages[static_cast<size_t>(a)]);
      for (int64_t e = 0; e < E; ++e) {
        const double share = total > 0 ? static_cast<double>(row[static_cast<size_t>(e)]) /
                                             static_cast<double>(total)
                                       : 0;
        // Darkness: the share relative to the uniform 1/E, saturating at three times it.
        const double v = std::min(1.0, share * static_cast<double>(E) / 3.0);
        const int g = static_cast<int>(255 * (1 - v));
        s += fmt::format(
            "<rect x='{}' y='{}' width='{}' height='{}' fill='rgb({},{},255)' "
            "stroke='white'><title>{} to expert {}: {:.1f}%</title></rect>\n",
            left + 30 + e * cell, 60 + a * cell, cell, cell, g, g,
            r.languages[static_cast<size_t>(a)], e, 100 * share);
      }
    }
    for (int64_t e = 0; e < E; ++e)
      s += fmt::format("<text x='{}' y='{}'>{}</text>\n", left + 38 + e * cell, 60 + L * cell + 14,
                       e);
  }
  return s + "</svg>\n";
}

}  // namespace moe
