// Writing this engine's checkpoints (see moe/trainer.h and docs/training.md): the model's
// weights in its layout (Mixtral's for a Mixtral-shaped model, else one tensor per parameter)
// with the routers' state, streamed tensor by tensor; under expert parallelism each routed
// tensor is gathered from its ranks as its turn comes, so no rank ever holds the whole model.
#include <filesystem>
#include <nlohmann/json.hpp>

#include "moe/hf.h"
#include "moe/safetensors.h"
#include "moe/trainer.h"
#include "train/checkpoint_names.h"

namespace moe {

namespace fs = std::filesystem;

std::string bias_name(const Model& model, size_t moe_index) {
  size_t k = 0;
  for (int64_t i = 0; i < model.config().n_layers + model.config().mtp_depth; ++i)
    if (model.config().is_moe_layer(i) && k++ == moe_index)
      return fmt::format("layers.{}.moe.router.selection_bias", i);
  return "";
}

namespace {

// A parameter's shape in the whole model (a rank holds a block of a routed tensor's experts).
Shape whole_shape(const ModelConfig& cfg, const NamedParam& p) {
  Shape s = p.value.shape();
  if (p.routed) s[0] = cfg.moe.n_experts;
  return s;
}

}  // namespace

void save_model_streamed(Model& model, const std::string& dir, const GatherExperts& whole,
                         bool writer) {
  // A Mixtral-shaped model is written in Mixtral's layout, so that transformers loads it; the
  // engine's own config rides along under "moe_cpp".
  const ModelConfig& cfg = model.config();
  const bool hf = is_mixtral(cfg);
  std::vector<SafetensorsWriter::Entry> entries;
  for (NamedParam& p : model.params()) {
    const Shape s = whole_shape(cfg, p);
    if (hf) {
      for (auto& [name, shape] : mixtral_entries(p.name, s))
        entries.push_back({name, st_dtype(p.value.dtype()), shape});
    } else {
      entries.push_back({p.name, st_dtype(p.value.dtype()), s});
    }
  }
  const std::vector<MoeLayer*>& layers = model.moe_layers();
  std::vector<Tensor> biases;
  for (size_t i = 0; i < layers.size(); ++i)
    if (std::vector<double>* b = layers[i]->router().selection_bias()) {
      Tensor t = Tensor::empty({static_cast<int64_t>(b->size())}, DType::F64);
      std::copy(b->begin(), b->end(), t.data<double>());
      entries.push_back({bias_name(model, i), "F64", t.shape()});
      biases.push_back(t);
    }
  std::unique_ptr<SafetensorsWriter> w;
  if (writer) {
    fs::create_directories(dir);
    nlohmann::json config = hf ? mixtral_config(cfg) : nlohmann::json{{"model_type", "moe_cpp"}};
    config["moe_cpp"] = cfg;
    write_file_atomic((fs::path(dir) / "config.json").string(), config.dump(2) + "\n");
    w = std::make_unique<SafetensorsWriter>((fs::path(dir) / "model.safetensors").string(),
                                            std::move(entries),
                                            std::map<std::string, std::string>{{"format", "pt"}});
  }
  // One tensor at a time: a routed one is gathered (every rank takes part), written, dropped.
  for (NamedParam& p : model.params()) {
    const Tensor t = p.routed && whole ? whole(p, p.value) : p.value;
    if (w) w->write(t.raw(), t.nbytes());
  }
  if (!w) return;
  for (const Tensor& t : biases) w->write(t.raw(), t.nbytes());
  w->commit();
}

void save_model(Model& model, const std::string& dir) { save_model_streamed(model, dir, {}, true); }

}  // namespace moe
