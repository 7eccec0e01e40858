// Softmax top-k router (see topk.cpp).
#pragma once

#include "moe/router.h"

namespace moe::routing {

class TopkRouter : public RouterImpl<TopkRouter> {
 public:
  using RouterImpl::RouterImpl;
  template <class T>
  void fwd(RouterForward<T>& f);
  template <class T>
  void bwd(const T* dweight, double d_aux, double d_z, T* dlogits);

 private:
  template <class T>
  void explore(RoutingPlan<T>& plan, const T* probs, int64_t n, NoiseSource& noise);

  struct Saved {
    int64_t n = 0;
    const void* probs = nullptr;      // [N, E]
    const void* lse = nullptr;        // [N]
    const int32_t* expert = nullptr;  // [N, K]
    const void* top_p = nullptr;      // [N, K]
    const void* weight = nullptr;     // [N, K]
    const int64_t* counts = nullptr;  // [E]
  } saved_;
};

}  // namespace moe::routing
