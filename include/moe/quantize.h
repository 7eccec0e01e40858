// moe/quantize.h: routed experts stored in fewer bytes. A quantized checkpoint is the same folder
// (this engine's layout or a HuggingFace one, every tensor under its own name and shape) with
// the routed experts' weight matrices stored as bfloat16, or as int8 with one float32 scale per
// row ("<name>_scale"; see StoredTensor). Everything else is kept as it was. Loading reads them
// back as float32 (they compute in float32); offloading keeps them in the cache as stored, so a
// cache of M MB holds 2x (bf16) or about 4x (int8) the experts of a float32 one, and reads as
// many fewer bytes.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

namespace moe {

enum class ExpertFormat { bf16, int8 };
ExpertFormat parse_expert_format(const std::string& s);
const char* to_string(ExpertFormat f);

// Whether a checkpoint tensor is a routed expert's weight matrix: named under ".experts." (one
// tensor per expert, transformers' fused gate_up_proj / down_proj, DBRX's w1 / v1 / w2, this
// engine's w_gate / w_up / w_down), at least two-dimensional, not a bias. Shared experts
// ("shared_expert", "shared_experts") and routers are not.
bool is_routed_expert_weight(const std::string& name, int64_t ndim);

struct QuantizeReport {
  int64_t tensors = 0;  // expert matrices converted
  int64_t values = 0;
  int64_t bytes_before = 0, bytes_after = 0;  // of those matrices (after: scales included)
  // Relative error of the values read back, ||x' - x|| / ||x||: the worst matrix's and over all.
  double worst_rel_error = 0, rel_error = 0;
  std::string str() const;
};

// Writes `out_dir` (created; never the input folder) from the checkpoint in `in_dir` (a folder,
// or a training output folder with `latest`): its weight files with the routed experts converted,
// its index, config and tokenizer files copied; a training state (optimizer, trainer_state.json)
// is not carried over: a quantized checkpoint is for inference. Experts already stored in fewer
// bytes than `format` are refused. `progress(done, total)` follows the expert matrices.
QuantizeReport quantize_checkpoint(const std::string& in_dir, const std::string& out_dir,
                                   ExpertFormat format,
                                   const std::function<void(int64_t, int64_t)>& progress = {});

}  // namespace moe
