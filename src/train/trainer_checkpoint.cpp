// The trainer's checkpoints (see moe/trainer.h and docs/training.md): saving them atomically
// (streamed tensor by tensor under expert parallelism), resuming bit for bit, starting from
// another model's weights, and the resharding of routed tensors between a rank's share and the
// whole.
#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "moe/hf.h"
#include "moe/json_read.h"
#include "moe/safetensors.h"
#include "moe/trainer.h"
#include "train/checkpoint_names.h"

namespace moe {

namespace fs = std::filesystem;

namespace {

nlohmann::json rng_json(const Rng& r) {
  const RngState s = r.state();
  return {{"s", {s.s[0], s.s[1], s.s[2], s.s[3]}}, {"has_spare", s.has_spare}, {"spare", s.spare}};
}

void rng_from_json(const nlohmann::json& j, Rng& r) {
  RngState s{};
  for (int i = 0; i < 4; ++i)
    s.s[i] = json_as<uint64_t>(j.at("s").at(static_cast<size_t>(i)), "checkpoint", "s");
  s.has_spare = j.at("has_spare").get<bool>();
  s.spare = j.at("spare").get<double>();
  r.set_state(s);
}

std::string step_name(int64_t step) { return fmt::format("step-{:06d}", step); }

}  // namespace

const NamedParam& Trainer::param(const std::string& name) {
  for (const NamedParam& p : model_->params())
    if (p.name == name) return p;
  throw_error("train", fmt::format("the model has no parameter {}", name));
}

Tensor Trainer::whole(const NamedParam& p, const Tensor& part) const {
  if (!groups_ || !p.routed || groups_->ep_size() == 1) return part;
  Shape shape = part.shape();
  shape[0] *= groups_->ep_size();
  Tensor out = Tensor::empty(shape, part.dtype());
  groups_->ep.allgather(part.raw(), out.raw(), static_cast<int64_t>(part.nbytes()));
  return out;
}

Tensor Trainer::part(const NamedParam& p, const Tensor& whole) const {
  if (!groups_ || !p.routed || groups_->ep_size() == 1) return whole;
  const int64_t local = p.value.size(0);
  MOE_CHECK(whole.ndim() >= 1 && whole.size(0) == local * groups_->ep_size(), "checkpoint",
            "{} has {} experts, the model {}", p.name, whole.ndim() >= 1 ? whole.size(0) : 0,
            local * groups_->ep_size());
  Shape shape = whole.shape();
  shape[0] = local;
  const size_t row = whole.nbytes() / static_cast<size_t>(whole.size(0));
  return Tensor::view(const_cast<char*>(static_cast<const char*>(whole.raw())) +
                          static_cast<size_t>(p.first_expert) * row,
                      shape, whole.dtype());
}

std::vector<std::pair<std::string, Tensor>> Trainer::whole_params() {
  std::vector<std::pair<std::string, Tensor>> out;
  for (NamedParam& p : model_->params()) out.emplace_back(p.name, whole(p, p.value));
  return out;
}

void Trainer::copy_from(Model& src) {
  std::vector<NamedParam>& to = model_->params();
  std::vector<NamedParam>& from = src.params();
  // Tensors by name. The MTP modules may differ (--mtp adds fresh ones to a model trained
  // without, or leaves a model's out); everything else must be there on both sides.
  const int64_t L = model_->config().n_layers;
  const auto mtp_module = [L](const std::string& name) {
    if (name.rfind("layers.", 0) != 0) return false;
    return std::stoll(name.substr(7, name.find('.', 7) - 7)) >= L;
  };
  std::map<std::string, const NamedParam*> by_name;
  for (const NamedParam& p : from) by_name[p.name] = &p;
  MOE_CHECK(src.config().n_layers == L, "train", "the model to start from has {} layers, not {}",
            src.config().n_layers, L);
  for (NamedParam& p : to) {
    const auto it = by_name.find(p.name);
    if (it == by_name.end()) {
      MOE_CHECK(mtp_module(p.name), "train", "the model to start from has no tensor {}", p.name);
      continue;  // a new MTP module keeps its initialization
    }
    const Tensor t = part(p, it->second->value);
    t.expect("init-from", p.name.c_str(), p.value.shape(), p.value.dtype());
    std::memcpy(p.value.raw(), t.raw(), p.value.nbytes());
    by_name.erase(it);
  }
  for (const auto& [name, p] : by_name)
    MOE_CHECK(mtp_module(name), "train", "the model to start from has a tensor {} this one lacks",
              name);
  const std::vector<MoeLayer*>&a = model_->moe_layers(), &b = src.moe_layers();
  for (size_t i = 0; i < a.size() && i < b.size(); ++i)
    if (std::vector<double>* bias = a[i]->router().selection_bias())
      *bias = *b[i]->router().selection_bias();
}

std::string Trainer::save(const std::string& out_dir) {
  const std::string name = step_name(step_);
  const fs::path final_dir = fs::path(out_dir) / name;
  // A distributed run writes the checkpoint of the whole model, the same files one process
  // writes: rank 0 writes them tensor by tensor, each routed tensor gathered from its
  // expert-parallel ranks as its turn comes (every rank takes part), so that no rank holds the
  // whole model. A HuggingFace layout (fine-tuning) is written from a gathered copy.
  const bool streamed = groups_ && !hf_origin_;
  const GatherExperts gather = [this](const NamedParam& p, const Tensor& t) { return whole(p, t); };
  const AdamW::Reshard gather_moment = [this](const std::string& n, const Tensor& t) {
    return whole(param(n), t);
  };
  const auto moment_shape = [this](const std::string& n, const Shape& s) {
    Shape out = s;
    if (param(n).routed) out[0] = mcfg_.moe.n_experts;
    return out;
  };
  std::unique_ptr<Model> gathered;
  std::vector<std::pair<std::string, Tensor>> opt_state;
  if (streamed && !is_writer()) {
    save_model_streamed(*model_, "", gather, false);
    opt_->save_streamed("", gather_moment, moment_shape, false);
    groups_->world.barrier();  // until the checkpoint is written
    return final_dir.string();
  }
  if (groups_ && !streamed) {
    std::vector<std::pair<std::string, Tensor>> params = whole_params();
    opt_state = opt_->state(gather_moment);
    if (!is_writer()) {
      groups_->world.barrier();  // until the checkpoint is written
      return final_dir.string();
    }
    gathered = std::make_unique<Model>(mcfg_, DType::F32);
    std::vector<NamedParam>& to = gathered->params();
    for (size_t i = 0; i < to.size(); ++i)
      std::memcpy(to[i].value.raw(), params[i].second.raw(), to[i].value.nbytes());
    const std::vector<MoeLayer*>&a = gathered->moe_layers(), &b = model_->moe_layers();
    for (size_t i = 0; i < a.size(); ++i)
      if (std::vector<double>* bias = a[i]->router().selection_bias())
        *bias = *b[i]->router().selection_bias();
  } else if (!streamed) {
    opt_state = opt_->state();
  }
  Model& model = gathered ? *gathered : *model_;
  fs::create_directories(out_dir);
  // Written in a temporary folder, renamed into place, then `latest` moved to it: a crash or a
  // full disk at any moment leaves the previous checkpoint whole and `latest` naming it.
  const fs::path tmp_dir = fs::path(out_dir) / ("." + name + ".tmp");
  try {
    fs::remove_all(tmp_dir);
    fs::create_directories(tmp_dir);
    if (streamed) {
      save_model_streamed(model, tmp_dir.string(), gather, true);
      opt_->save_streamed((tmp_dir / "optimizer.safetensors").string(), gather_moment, moment_shape,
                          true);
    } else {
      if (hf_origin_) {
        save_hf_model(model, *hf_origin_, tmp_dir.string());
      } else {
        save_model(model, tmp_dir.string());
      }
      save_safetensors((tmp_dir / "optimizer.safetensors").string(), opt_state,
                       {{"step", std::to_string(opt_->steps())}});
    }
    nlohmann::json state = {{"step", step_},
                            {"train", cfg_},
                            {"data_rng", sampler_ ? rng_json(sampler_->rng()) : nlohmann::json()},
                            {"moe_layers", nlohmann::json::array()},
                            {"files", nlohmann::json::object()}};
    for (MoeLayer* m : model_->moe_layers()) {
      nlohmann::json layer = {{"noise_rng", rng_json(m->noise_rng())}};
      if (const std::vector<double>* b = m->router().selection_bias()) layer["selection_bias"] = *b;
      state["moe_layers"].push_back(layer);
    }
    for (const char* file : {"config.json", "model.safetensors", "optimizer.safetensors"}) {
      const FileCheck c = check_file((tmp_dir / file).string());
      state["files"][file] = {{"bytes", c.bytes}, {"crc32", c.crc32}};
    }
    write_file_atomic((tmp_dir / "trainer_state.json").string(), state.dump(2) + "\n");
    fs::remove_all(final_dir);
    fs::rename(tmp_dir, final_dir);
  } catch (const std::exception& e) {
    std::error_code ignored;
    fs::remove_all(tmp_dir, ignored);
    const std::string what = e.what();
    throw_error("checkpoint", fmt::format("cannot save step {} in {} ({}); the checkpoint before "
                                          "it is unchanged",
                                          step_, out_dir, what));
  }
  write_file_atomic((fs::path(out_dir) / "latest").string(), name + "\n");
  // Keep the newest cfg_.keep checkpoints.
  std::vector<std::string> steps;
  for (const auto& e : fs::directory_iterator(out_dir)) {
    const std::string n = e.path().filename().string();
    if (e.is_directory() && n.rfind("step-", 0) == 0) steps.push_back(n);
  }
  std::sort(steps.begin(), steps.end());
  for (size_t i = 0; i + static_cast<size_t>(cfg_.keep) < steps.size(); ++i)
    fs::remove_all(fs::path(out_dir) / steps[i]);
  if (groups_) groups_->world.barrier();
  return final_dir.string();
}

WindowLoss window_loss(Model& model, const TokenStream& text, int64_t seq_len, int64_t batch,
                       int64_t max_windows) {
  MOE_CHECK(seq_len >= 1 && batch >= 1, "eval", "seq_len and batch must be positive");
  const int64_t W = seq_len + 1;
  WindowLoss out;
  out.windows = std::min(max_windows, (static_cast<int64_t>(text.ids.size()) - 1) / seq_len);
  MOE_CHECK(out.windows >= 1, "eval", "the text ({} tokens) is shorter than one window of {}",
            text.ids.size(), W);
  model.set_training(false);
  Arena arena;
  double total = 0;
  for (int64_t done = 0; done < out.windows;) {
    const int64_t b = std::min(batch, out.windows - done);
    Tensor tok = Tensor::empty({b, W}, DType::I32);
    for (int64_t i = 0; i < b; ++i)
      std::copy_n(text.ids.begin() + (done + i) * seq_len, W, tok.data<int32_t>() + i * W);
    arena.reset();
    total += model.forward(tok, arena).ce_loss * static_cast<double>(b);
    done += b;
  }
  out.loss = total / static_cast<double>(out.windows);
  return out;
}

void Trainer::resume(const std::string& dir) {
  const fs::path ckpt = resolve_checkpoint(dir);
  MOE_CHECK(fs::exists(ckpt / "trainer_state.json"), "resume",
            "{} has no trainer_state.json to resume from", ckpt.string());
  verify_checkpoint_files(ckpt.string());
  if (groups_) {
    // Any checkpoint holds the whole model: this rank reads its own experts from it (whatever
    // EP it was saved with), nothing else of theirs.
    load_checkpoint_weights(*model_, read_checkpoint_info(ckpt.string()));
    opt_->load((ckpt / "optimizer.safetensors").string(),
               [&](const std::string& n, const Tensor& t) { return part(param(n), t); });
  } else {
    load_checkpoint_weights(*model_, read_checkpoint_info(ckpt.string()));
    opt_->load((ckpt / "optimizer.safetensors").string());
  }
  std::ifstream f(ckpt / "trainer_state.json");
  nlohmann::json state;
  try {
    state = nlohmann::json::parse(f);
    step_ = json_at<int64_t>(state, "step", "checkpoint");
    if (sampler_) rng_from_json(state.at("data_rng"), sampler_->rng());
    const std::vector<MoeLayer*>& layers = model_->moe_layers();
    const auto& ls = state.at("moe_layers");
    MOE_CHECK(ls.size() == layers.size(), "resume",
              "the checkpoint has {} MoE layers, the model {}", ls.size(), layers.size());
    for (size_t i = 0; i < layers.size(); ++i) {
      rng_from_json(ls[i].at("noise_rng"), layers[i]->noise_rng());
      if (std::vector<double>* b = layers[i]->router().selection_bias())
        *b = json_as<std::vector<double>>(ls[i].at("selection_bias"), "resume", "selection_bias");
    }
  } catch (const nlohmann::json::exception& e) {
    throw_error("resume", fmt::format("bad trainer_state.json in {}: {}", ckpt.string(), e.what()));
  }
}

void Trainer::init_from(Model& src) { copy_from(src); }

}  // namespace moe
