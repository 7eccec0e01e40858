// RoutingStats: the human-readable report.
#include <fmt/format.h>

#include <algorithm>

#include "moe/moe_layer.h"

namespace moe {

std::string RoutingStats::str() const {
  std::string s = fmt::format(
      "tokens {}  capacity {}  dropped {:.2f}%  load imbalance {:.3f}  router entropy {:.3f} "
      "nats  aux loss {:.5f}  z loss {:.5f}\n",
      n_tokens, capacity > 0 ? std::to_string(capacity) : std::string("none"),
      100.0 * dropped_fraction, load_imbalance, router_entropy, aux_loss, z_loss);
  const int64_t most =
      routed.empty() ? 1 : std::max<int64_t>(1, *std::max_element(routed.begin(), routed.end()));
  for (size_t e = 0; e < routed.size(); ++e) {
    const int bar = static_cast<int>(40 * routed[e] / most);
    s += fmt::format("  expert {:>3}  {:>7} tokens  {:>7} kept  {}\n", e, routed[e], kept[e],
                     std::string(static_cast<size_t>(bar), '#'));
  }
  return s;
}

}  // namespace moe
