// Reading checkpoints: this engine's own (config.json with its "moe_cpp" config beside
// model.safetensors) and HuggingFace folders (src/io/hf_load.cpp), into float32 or kept as the
// files store them (WeightsAs::stored).
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "moe/gguf_model.h"
#include "moe/hf.h"
#include "moe/json_read.h"
#include "moe/safetensors.h"
#include "moe/trainer.h"
#include "train/checkpoint_names.h"

namespace moe {

namespace fs = std::filesystem;

std::unique_ptr<Tokenizer> checkpoint_tokenizer(const std::string& dir) {
  if (is_gguf_file(dir)) return load_tokenizer(dir);
  const fs::path ckpt = resolve_checkpoint(dir);
  if (fs::exists(ckpt / "tokenizer.json") || fs::exists(ckpt / "tokenizer.model"))
    return load_tokenizer(ckpt.string());
  return nullptr;
}

std::string resolve_checkpoint(const std::string& dir) {
  fs::path ckpt(dir);
  if (fs::exists(ckpt / "latest")) {
    std::ifstream f(ckpt / "latest");
    std::string name;
    f >> name;
    ckpt /= name;
  }
  MOE_CHECK(fs::exists(ckpt / "config.json") && (fs::exists(ckpt / "model.safetensors") ||
                                                 fs::exists(ckpt / "model.safetensors.index.json")),
            "checkpoint",
            "{} is not a checkpoint (no config.json with model.safetensors or "
            "model.safetensors.index.json)",
            ckpt.string());
  return ckpt.string();
}

namespace {

// Whether a checkpoint of ours stores its routed experts stacked under our names
// ("layers.<i>.moe.experts.w_up" [E, F, D], ...) in a dtype the experts compute from as stored.
bool stacked_experts_computable(const ModelConfig& c, const SafetensorsFile& f) {
  for (int64_t i = 0; i < c.n_layers; ++i) {
    if (!c.is_moe_layer(i)) continue;
    const std::string name = fmt::format("layers.{}.moe.experts.w_up", i);
    if (!f.has(name)) return false;
    const std::string& d = f.stored.at(name).dtype;
    return d == "F32" || d == "BF16" || d == "F16" || d == "I8";
  }
  return false;  // no MoE layer
}

// Every MoE layer's stacked experts as per-expert views of the mapped file: w_gate, w_up
// [E, F, D] and w_down [E, D, F] (int8 ones with their row scales "<name>_scale" [E, F] and
// [E, D]) and float32 biases [E, F], [E, D] where the config has them.
std::vector<std::vector<ExpertView>> stacked_expert_views(const ModelConfig& c,
                                                          const SafetensorsFile& f,
                                                          const std::string& path) {
  const int64_t E = c.moe.n_experts, F = c.moe.d_ffn, D = c.d_model;
  std::vector<std::vector<ExpertView>> layers;
  for (int64_t i = 0; i < c.n_layers + c.mtp_depth; ++i) {  // the MTP modules' after
    if (!c.is_moe_layer(i)) continue;
    const std::string p = fmt::format("layers.{}.moe.experts.", i);
    // The stacked tensor `name` of shape [E, rows, cols] (absent: an empty tensor), and its
    // scales [E, rows] when int8.
    const auto stacked = [&](const char* name, int64_t rows, int64_t cols, bool matrix,
                             Tensor& scales) {
      if (!f.has(p + name)) return Tensor();
      const Tensor t = f.view(p + name);
      const Shape want = matrix ? Shape{E, rows, cols} : Shape{E, rows};
      MOE_CHECK(t.shape() == want, "checkpoint", "{}: {}{} must be {}, got {}", path, p, name,
                shape_str(want), t.str());
      MOE_CHECK(matrix || t.dtype() == DType::F32, "checkpoint", "{}: {}{} must be F32", path, p,
                name);
      if (t.dtype() == DType::I8) {
        scales = f.view(p + name + "_scale");
        MOE_CHECK(scales.shape() == Shape({E, rows}) && scales.dtype() == DType::F32, "checkpoint",
                  "{}: {}{}_scale must be F32 [{}, {}], got {}", path, p, name, E, rows,
                  scales.str());
      }
      return t;
    };
    Tensor sg, su, sd, none;
    const Tensor g = stacked("w_gate", F, D, true, sg), u = stacked("w_up", F, D, true, su),
                 d = stacked("w_down", D, F, true, sd), bg = stacked("b_gate", F, 0, false, none),
                 bu = stacked("b_up", F, 0, false, none), bd = stacked("b_down", D, 0, false, none);
    MOE_CHECK(u.defined() && d.defined(), "checkpoint", "{} has no {}w_up or w_down", path, p);
    std::vector<ExpertView> experts(static_cast<size_t>(E));
    for (int64_t e = 0; e < E; ++e) {
      ExpertView& v = experts[static_cast<size_t>(e)];
      // Expert e's [rows, cols] matrix (cols = 0: its [rows] vector) of a stacked tensor.
      const auto row = [e](const Tensor& t, int64_t rows, int64_t cols) {
        if (!t.defined()) return Tensor();
        return cols > 0 ? t.view_at(e * rows * cols, {rows, cols}) : t.view_at(e * rows, {rows});
      };
      v.w_gate = row(g, F, D);
      v.w_up = row(u, F, D);
      v.w_down = row(d, D, F);
      v.s_gate = row(sg, F, 0);
      v.s_up = row(su, F, 0);
      v.s_down = row(sd, D, 0);
      v.b_gate = row(bg, F, 0);
      v.b_up = row(bu, F, 0);
      v.b_down = row(bd, D, 0);
    }
    layers.push_back(std::move(experts));
  }
  return layers;
}

// Whether load_model keeps this checkpoint's routed experts as views (the model is then made
// without routed experts of its own).
bool experts_as_views(const CheckpointInfo& info, WeightsAs as) {
  if (as != WeightsAs::stored) return false;
  if (!info.ours) return true;
  const SafetensorsFile f = load_safetensors((fs::path(info.dir) / "model.safetensors").string());
  return !f.has("model.embed_tokens.weight") && stacked_experts_computable(info.config, f);
}

}  // namespace

void load_weights(Model& model, const std::string& path, WeightsAs as) {
  SafetensorsFile weights = load_safetensors(path);
  weights.set_prefault(as == WeightsAs::stored && fits_in_available_memory(fs::file_size(path)));
  if (weights.has("model.embed_tokens.weight")) {
    load_mixtral_tensors(model, weights);
    return;
  }
  if (as == WeightsAs::stored && !model.moe_layers().empty() &&
      model.moe_layers()[0]->params().experts.w_up.size(0) == 0) {
    // A model made without routed experts: they are views of the file, computed from as stored.
    model.set_expert_source(
        stored_expert_source(stacked_expert_views(model.config(), weights, path)));
  }
  std::vector<std::pair<std::string, Tensor>> views;  // installed once the list is walked
  for (NamedParam& p : model.params()) {
    if (as == WeightsAs::stored && weights.has(p.name) && model.is_weight_matrix(p.name)) {
      const std::string& d = weights.stored.at(p.name).dtype;
      if (d == "BF16" || d == "F16") {
        views.emplace_back(p.name, weights.view(p.name));
        continue;
      }
    }
    if (p.routed && p.value.size(0) < model.config().moe.n_experts) {
      // This rank's experts (expert parallelism): their rows of the mapped file, nothing else.
      const Tensor whole = weights.view(p.name);
      Shape want = p.value.shape();
      want[0] = model.config().moe.n_experts;
      MOE_CHECK(whole.shape() == want, "checkpoint", "{}: {} must be {}, got {}", path, p.name,
                shape_str(want), whole.str());
      const size_t row = whole.nbytes() / static_cast<size_t>(want[0]);
      const Tensor rows = Tensor::view(const_cast<char*>(static_cast<const char*>(whole.raw())) +
                                           static_cast<size_t>(p.first_expert) * row,
                                       p.value.shape(), whole.dtype());
      const Tensor f = rows.dtype() == p.value.dtype() ? rows : rows.to(p.value.dtype());
      std::memcpy(p.value.raw(), f.raw(), f.nbytes());
      continue;
    }
    const Tensor& src = weights.at(p.name);
    src.expect(path.c_str(), p.name.c_str(), p.value.shape(), p.value.dtype());
    std::memcpy(p.value.raw(), src.raw(), src.nbytes());
    weights.drop(p.name);
  }
  for (const auto& [name, t] : views) model.set_weight(name, t);
  const std::vector<MoeLayer*>& layers = model.moe_layers();
  for (size_t i = 0; i < layers.size(); ++i) {
    std::vector<double>* b = layers[i]->router().selection_bias();
    if (!b) continue;
    const Tensor& src = weights.at(bias_name(model, i));
    src.expect(path.c_str(), "selection_bias", {static_cast<int64_t>(b->size())}, DType::F64);
    b->assign(src.data<double>(), src.data<double>() + src.numel());
  }
}

CheckpointInfo read_checkpoint_info(const std::string& dir) {
  const fs::path ckpt = resolve_checkpoint(dir);
  std::ifstream f(ckpt / "config.json", std::ios::binary);
  MOE_CHECK(f.good(), "checkpoint", "cannot read {}/config.json", ckpt.string());
  const std::string text((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  CheckpointInfo info = parse_checkpoint_config(text, (ckpt / "config.json").string());
  info.dir = ckpt.string();
  // DeepSeek-V3's multi-token prediction modules, when the checkpoint holds them (released
  // weights do; transformers neither runs nor saves them).
  if (info.hf_mtp_layers > 0 &&
      HfTensors(info.dir).has(fmt::format("model.layers.{}.eh_proj.weight", info.config.n_layers)))
    info.config.mtp_depth = info.hf_mtp_layers;
  return info;
}

CheckpointInfo parse_checkpoint_config(const std::string& text, const std::string& name) {
  CheckpointInfo info;
  try {
    const nlohmann::json j = nlohmann::json::parse(text);
    MOE_CHECK(j.is_object(), "checkpoint", "{} is not a JSON object", name);
    info.model_type = j.value("model_type", std::string());
    info.ours = j.contains("moe_cpp");
    // Ours carries its own config; a HuggingFace checkpoint of a supported architecture, its.
    info.config = info.ours ? j.at("moe_cpp").get<ModelConfig>() : config_from_hf(j);
    if (!info.ours) info.hf_mtp_layers = j.value("num_nextn_predict_layers", int64_t{0});
  } catch (const nlohmann::json::exception& e) {
    throw_error("checkpoint", fmt::format("bad {}: {}", name, e.what()));
  }
  return info;
}

void load_checkpoint_weights(Model& model, const CheckpointInfo& info, WeightsAs as) {
  if (info.ours) {
    load_weights(model, (fs::path(info.dir) / "model.safetensors").string(), as);
  } else {
    HfTensors tensors(info.dir);
    if (as == WeightsAs::stored)
      tensors.set_prefault(fits_in_available_memory(tensors.file_bytes()));
    load_hf_weights(model, info.model_type, tensors, as == WeightsAs::stored);
  }
}

uint64_t checkpoint_weight_bytes(const CheckpointInfo& info) {
  if (info.ours) return fs::file_size(fs::path(info.dir) / "model.safetensors");
  return HfTensors(info.dir).file_bytes();
}

std::unique_ptr<Model> load_model(const std::string& dir, WeightsAs as) {
  if (is_gguf_file(dir)) return load_gguf_model(dir, as);
  const CheckpointInfo info = read_checkpoint_info(dir);
  verify_checkpoint_files(info.dir);
  // Stored weights: the routed experts are views of the files, not the layers' own.
  const bool views = experts_as_views(info, as);
  auto model = std::make_unique<Model>(info.config, DType::F32, /*routed_experts=*/!views);
  load_checkpoint_weights(*model, info, views || info.ours ? as : WeightsAs::float32);
  model->set_training(false);
  return model;
}

std::unique_ptr<Model> load_gguf_model(const std::string& path, WeightsAs as) {
  const GgufFile f = load_gguf(path);
  const bool stored = as == WeightsAs::stored;
  auto model = std::make_unique<Model>(config_from_gguf(f), DType::F32, /*routed_experts=*/!stored);
  // Mapped pages are read in at once where the file fits in memory (as for safetensors).
  if (stored && fits_in_available_memory(f.data_size))
    prefault_mapped_pages(f.data_begin, f.data_size);
  load_gguf_weights(*model, f, stored);
  model->set_training(false);
  return model;
}

void verify_checkpoint_files(const std::string& dir) {
  const fs::path ckpt(dir);
  std::ifstream f(ckpt / "trainer_state.json");
  if (!f) return;  // not a training checkpoint: nothing recorded
  const nlohmann::json state = nlohmann::json::parse(f, nullptr, /*allow_exceptions=*/false);
  MOE_CHECK(state.is_object(), "checkpoint", "{} is not valid JSON: the checkpoint is damaged",
            (ckpt / "trainer_state.json").string());
  if (!state.contains("files") || !state["files"].is_object()) return;  // older checkpoints
  for (const auto& [file, want] : state["files"].items()) {
    const fs::path path = ckpt / file;
    MOE_CHECK(want.is_object(), "checkpoint", "{}: bad record of {}",
              (ckpt / "trainer_state.json").string(), file);
    const auto want_bytes = json_at<uint64_t>(want, "bytes", "checkpoint");
    const auto want_crc = json_at<uint32_t>(want, "crc32", "checkpoint");
    MOE_CHECK(fs::exists(path), "checkpoint", "{} is missing: the checkpoint is damaged",
              path.string());
    const FileCheck got = check_file(path.string());
    MOE_CHECK(got.bytes == want_bytes, "checkpoint",
              "{} has {} bytes, {} were written: the file is truncated or damaged", path.string(),
              got.bytes, want_bytes);
    MOE_CHECK(got.crc32 == want_crc, "checkpoint",
              "{} is corrupted: its CRC-32 is {:08x}, {:08x} was written", path.string(), got.crc32,
              want_crc);
  }
}

}  // namespace moe
