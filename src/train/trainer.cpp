// The trainer (see moe/trainer.h).
#include "moe/trainer.h"

#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>

#include "moe/hf.h"
#include "moe/json_read.h"
#include "moe/kernels.h"
#include "moe/safetensors.h"
#include "moe/threading.h"
#include "train/checkpoint_names.h"

namespace moe {

namespace fs = std::filesystem;

// ---------------------------------------------------------------------------------------------
// Config

void TrainConfig::validate() const {
  const char* w = "train.config";
  MOE_CHECK(batch >= 1 && seq_len >= 1, w, "batch and seq_len must be >= 1, got {} and {}", batch,
            seq_len);
  MOE_CHECK(steps >= 1 && grad_accum >= 1, w, "steps and grad_accum must be >= 1, got {} and {}",
            steps, grad_accum);
  MOE_CHECK(std::isfinite(lr) && lr > 0 && std::isfinite(min_lr) && min_lr >= 0 &&
                (min_lr <= lr || schedule == "constant"),
            w, "need 0 <= min_lr <= lr, got lr {} and min_lr {}", lr, min_lr);
  MOE_CHECK(warmup >= 0, w, "warmup must be >= 0, got {}", warmup);
  MOE_CHECK(weight_decay >= 0 && clip >= 0, w, "weight_decay and clip must be >= 0");
  MOE_CHECK(std::isfinite(eps) && eps > 0, w, "eps must be > 0, got {}", eps);
  MOE_CHECK(beta1 >= 0 && beta1 < 1 && beta2 >= 0 && beta2 < 1, w,
            "beta1 and beta2 must be in [0, 1), got {} and {}", beta1, beta2);
  MOE_CHECK(schedule == "cosine" || schedule == "constant", w,
            "schedule must be cosine or constant, got '{}'", schedule);
  MOE_CHECK(eval_every >= 0 && eval_batches >= 1 && save_every >= 0 && keep >= 1, w,
            "eval_every, save_every >= 0 and eval_batches, keep >= 1 required");
  MOE_CHECK(val_every >= 2, w, "val_every must be >= 2, got {}", val_every);
  MOE_CHECK(expert_parallel >= 1, w, "expert_parallel must be >= 1, got {}", expert_parallel);
  MOE_CHECK(dtype == "f32" || dtype == "bf16" || dtype == "auto", w,
            "dtype must be f32, bf16 or auto, got '{}'", dtype);
  MOE_CHECK(std::isfinite(soft_weight) && soft_weight >= 0 && soft_weight <= 1, w,
            "soft_weight must be in [0, 1], got {}", soft_weight);
  MOE_CHECK(router_warmup >= 0, w, "router_warmup must be >= 0, got {}", router_warmup);
}

std::string TrainConfig::matmul_dtype() const {
  if (dtype == "auto") return cpu::bf16_native() ? "bf16" : "f32";
  return dtype;
}

double TrainConfig::lr_at(int64_t step) const {
  if (schedule == "constant") return lr;
  if (step < warmup) return lr * static_cast<double>(step + 1) / static_cast<double>(warmup);
  const double span = static_cast<double>(std::max<int64_t>(1, steps - warmup));
  const double progress = std::min(1.0, static_cast<double>(step - warmup) / span);
  return min_lr + 0.5 * (lr - min_lr) * (1 + std::cos(M_PI * progress));
}

void to_json(nlohmann::json& j, const TrainConfig& c) {
  j = {{"batch", c.batch},
       {"seq_len", c.seq_len},
       {"steps", c.steps},
       {"grad_accum", c.grad_accum},
       {"lr", c.lr},
       {"min_lr", c.min_lr},
       {"warmup", c.warmup},
       {"weight_decay", c.weight_decay},
       {"beta1", c.beta1},
       {"beta2", c.beta2},
       {"eps", c.eps},
       {"decay_all", c.decay_all},
       {"schedule", c.schedule},
       {"only_experts", c.only_experts},
       {"clip", c.clip},
       {"eval_every", c.eval_every},
       {"eval_batches", c.eval_batches},
       {"save_every", c.save_every},
       {"keep", c.keep},
       {"val_every", c.val_every},
       {"seed", c.seed},
       {"expert_parallel", c.expert_parallel},
       {"dtype", c.dtype},
       {"teacher", c.teacher},
       {"soft_weight", c.soft_weight},
       {"router_warmup", c.router_warmup}};
}

void from_json(const nlohmann::json& j, TrainConfig& c) {
  const nlohmann::json defaults = TrainConfig{};
  for (const auto& [key, value] : j.items())
    MOE_CHECK(defaults.contains(key), "train.config", "unknown key '{}'", key);
  try {
    c = TrainConfig{};
    json_into(j, "batch", c.batch, "train.config");
    json_into(j, "seq_len", c.seq_len, "train.config");
    json_into(j, "steps", c.steps, "train.config");
    json_into(j, "grad_accum", c.grad_accum, "train.config");
    json_into(j, "lr", c.lr, "train.config");
    json_into(j, "min_lr", c.min_lr, "train.config");
    json_into(j, "warmup", c.warmup, "train.config");
    json_into(j, "weight_decay", c.weight_decay, "train.config");
    json_into(j, "beta1", c.beta1, "train.config");
    json_into(j, "beta2", c.beta2, "train.config");
    json_into(j, "eps", c.eps, "train.config");
    json_into(j, "decay_all", c.decay_all, "train.config");
    json_into(j, "schedule", c.schedule, "train.config");
    json_into(j, "only_experts", c.only_experts, "train.config");
    json_into(j, "clip", c.clip, "train.config");
    json_into(j, "eval_every", c.eval_every, "train.config");
    json_into(j, "eval_batches", c.eval_batches, "train.config");
    json_into(j, "save_every", c.save_every, "train.config");
    json_into(j, "keep", c.keep, "train.config");
    json_into(j, "val_every", c.val_every, "train.config");
    json_into(j, "seed", c.seed, "train.config");
    json_into(j, "expert_parallel", c.expert_parallel, "train.config");
    json_into(j, "dtype", c.dtype, "train.config");
    json_into(j, "teacher", c.teacher, "train.config");
    json_into(j, "soft_weight", c.soft_weight, "train.config");
    json_into(j, "router_warmup", c.router_warmup, "train.config");
  } catch (const nlohmann::json::exception& e) {
    throw_error("train.config", fmt::format("bad value: {}", e.what()));
  }
}

// ---------------------------------------------------------------------------------------------
// Trainer

Rng Trainer::setup() {
  cfg_.validate();
  bf16_ = cfg_.matmul_dtype() == "bf16";
  MOE_CHECK(cfg_.seq_len <= mcfg_.max_train_len(), "train",
            "seq_len {} exceeds the model's max_seq_len {}{}", cfg_.seq_len, mcfg_.max_seq_len,
            mcfg_.transformers_loss
                ? " less one (transformers' loss also runs the window's last token)"
                : "");
  MOE_CHECK(cfg_.seq_len > mcfg_.mtp_depth, "train",
            "seq_len {} leaves no position for the model's {} MTP modules: module k predicts the "
            "token k + 1 ahead, so seq_len must exceed {}",
            cfg_.seq_len, mcfg_.mtp_depth, mcfg_.mtp_depth);
  // A distributed run: each rank allocates its own experts only, initialized as one process
  // initializes the whole model, and takes its share of each batch.
  const dist::Comm world = dist::Comm::world();
  int64_t ranks = 1, rank = 0;
  if (world.size() > 1 || cfg_.expert_parallel > 1) {
    ranks = world.size();
    rank = world.rank();
    MOE_CHECK(cfg_.batch % ranks == 0, "train",
              "the batch of {} sequences does not split evenly over {} ranks", cfg_.batch, ranks);
    groups_ = std::make_unique<dist::ExpertGroups>(
        dist::make_expert_groups(world, static_cast<int>(cfg_.expert_parallel)));
    model_ = std::make_unique<Model>(mcfg_, DType::F32, *groups_);
  } else {
    model_ = std::make_unique<Model>(mcfg_, DType::F32);
  }
  Rng rng(cfg_.seed);
  model_->init(rng);
  model_->set_experts_only(cfg_.only_experts);
  if (cfg_.router_warmup > 0)  // refused now, not at the first step, where it cannot apply
    for (MoeLayer* m : model_->moe_layers()) m->set_dense_routing(true);
  opt_ = std::make_unique<AdamW>(
      AdamWConfig{cfg_.lr, cfg_.beta1, cfg_.beta2, cfg_.eps, cfg_.weight_decay});
  // Frozen tensors are left out of the optimizer (no update, no weight decay); frozen experts
  // are rows of the routed tensors it skips.
  for (NamedParam& p : model_->params()) {
    if (frozen(p)) continue;
    std::vector<int64_t> rows;
    if (p.routed)
      for (int64_t e : mcfg_.moe.frozen_experts)
        if (e >= p.first_expert && e < p.first_expert + p.value.size(0))
          rows.push_back(e - p.first_expert);
    opt_->add(p.name, p.value, p.grad, p.decay || cfg_.decay_all, rows);
  }
  const int64_t W = cfg_.seq_len + 1, local = cfg_.batch / ranks;
  full_batch_ = Tensor::empty({cfg_.batch, W}, DType::I32);
  batch_ = Tensor::view(full_batch_.data<int32_t>() + rank * local * W, {local, W}, DType::I32);
  if (!cfg_.teacher.empty())
    set_teacher(load_model(cfg_.teacher, WeightsAs::stored), "the teacher " + cfg_.teacher);
  return rng;
}

void Trainer::set_teacher(std::unique_ptr<Model> teacher, const std::string& name) {
  teacher_ = std::move(teacher);
  if (!teacher_) return;
  const ModelConfig& t = teacher_->config();
  MOE_CHECK(t.vocab_size == mcfg_.vocab_size, "distill",
            "{} has a vocabulary of {} tokens and the student one of {}: distillation matches "
            "their distributions token for token, so they must read the same tokens",
            name, t.vocab_size, mcfg_.vocab_size);
  MOE_CHECK(cfg_.seq_len <= t.max_seq_len, "distill",
            "{} reads at most {} positions, the student's sequences are {} long", name,
            t.max_seq_len, cfg_.seq_len);
  const int64_t student = count_params(mcfg_).total, teacher_n = count_params(t).total;
  MOE_CHECK(student <= teacher_n, "distill",
            "the student ({:.2f}M parameters) is larger than {} ({:.2f}M): distillation "
            "compresses a model into a smaller one",
            static_cast<double>(student) / 1e6, name, static_cast<double>(teacher_n) / 1e6);
  teacher_->set_training(false);
  soft_.weight = cfg_.soft_weight;
}

Trainer::Trainer(const ModelConfig& model, const TrainConfig& cfg,
                 const std::vector<std::vector<int32_t>>& batch)
    : mcfg_(model), cfg_(cfg) {
  MOE_CHECK(!batch.empty() && batch[0].size() >= 2, "train",
            "the token batch needs at least one sequence of two tokens");
  for (size_t b = 0; b < batch.size(); ++b) {
    MOE_CHECK(batch[b].size() == batch[0].size(), "train",
              "sequences of the token batch must have equal lengths: {} and {}", batch[0].size(),
              batch[b].size());
    for (int32_t id : batch[b])
      MOE_CHECK(id >= 0 && id < mcfg_.vocab_size, "train",
                "token {} of sequence {} is outside the vocabulary [0, {})", id, b,
                mcfg_.vocab_size);
  }
  cfg_.batch = static_cast<int64_t>(batch.size());
  cfg_.seq_len = static_cast<int64_t>(batch[0].size()) - 1;
  setup();
  for (size_t b = 0; b < batch.size(); ++b)
    std::copy(batch[b].begin(), batch[b].end(),
              full_batch_.data<int32_t>() + static_cast<int64_t>(b) * (cfg_.seq_len + 1));
}

Trainer::Trainer(const ModelConfig& model, const TrainConfig& cfg, const Corpus& corpus,
                 const Tokenizer* tok)
    : mcfg_(model), cfg_(cfg), tok_(tok) {
  MOE_CHECK(tok || mcfg_.vocab_size >= ByteTokenizer::kVocabSize, "train",
            "the byte tokenizer needs vocab_size >= {}, the model has {}",
            ByteTokenizer::kVocabSize, mcfg_.vocab_size);
  Rng rng = setup();
  split_corpus(corpus, cfg_.val_every, train_, val_, tok);
  if (tok) {
    // A tokenizer may know more ids than the model's embedding holds (added tokens).
    for (const TokenStream* s : {&train_, &val_})
      for (int32_t id : s->ids)
        MOE_CHECK(id >= 0 && id < mcfg_.vocab_size, "train",
                  "the tokenizer gives id {}, outside the model's vocabulary [0, {})", id,
                  mcfg_.vocab_size);
  }
  const auto window = static_cast<size_t>(cfg_.seq_len + 1);
  if (val_.ids.size() <= window) {
    // Too few documents to hold some out: validate on the last tenth of the text instead.
    const size_t cut = train_.ids.size() - std::max(train_.ids.size() / 10, window + 1);
    MOE_CHECK(cut > window, "train", "the corpus has {} tokens, too few for windows of {}",
              train_.ids.size(), window);
    val_.ids.insert(val_.ids.end(), train_.ids.begin() + static_cast<int64_t>(cut),
                    train_.ids.end());
    val_.lang.insert(val_.lang.end(), train_.lang.begin() + static_cast<int64_t>(cut),
                     train_.lang.end());
    train_.ids.resize(cut);
    train_.lang.resize(cut);
  }
  sampler_ = std::make_unique<BatchSampler>(train_, cfg_.batch, cfg_.seq_len, rng.next_u64());
}

Trainer::~Trainer() = default;

int64_t Trainer::train_tokens() const {
  return sampler_ ? static_cast<int64_t>(train_.ids.size()) : full_batch_.numel();
}
int64_t Trainer::val_tokens() const { return static_cast<int64_t>(val_.ids.size()); }

namespace {

// Sum of squares in double, over fixed chunks summed in order: the same bits on any number of
// threads. The chunk sums live on the stack (at most kChunks; larger tensors use bigger chunks).
// Each tensor's sum of squares (in float64), all tensors in one parallel region: each is cut into
// at most 64 chunks (of at least 4096 values, fixed by its size), a chunk summed in eight running
// sums (the compiler keeps them in vector lanes) added in a fixed order, then the chunks in order:
// the same bits on any thread count.
// `sums` receives them; the scratch is kept from step to step (a step allocates nothing).
void sums_of_squares(const std::vector<Tensor*>& tensors, std::vector<double>& sums) {
  constexpr int64_t kChunks = 64;
  struct Chunk {
    const float* g;
    int64_t n;
  };
  thread_local std::vector<Chunk> chunks;
  thread_local std::vector<size_t> first;
  thread_local std::vector<double> part;
  chunks.clear();
  first.assign(tensors.size() + 1, 0);
  int64_t total = 0;
  for (size_t t = 0; t < tensors.size(); ++t) {
    first[t] = chunks.size();
    const float* g = tensors[t]->data<float>();
    const int64_t n = tensors[t]->numel();
    const int64_t chunk = std::max<int64_t>(4096, (n + kChunks - 1) / kChunks);
    for (int64_t i = 0; i < n; i += chunk) chunks.push_back({g + i, std::min(chunk, n - i)});
    total += n;
  }
  first[tensors.size()] = chunks.size();
  part.assign(chunks.size(), 0.0);
  // The workers see this thread's scratch through these (their own thread_locals are others).
  const Chunk* const chunk_at = chunks.data();
  double* const part_at = part.data();
  const auto count = static_cast<int64_t>(chunks.size());
#pragma omp parallel for schedule(static) if (total > kParallelMin)
  for (int64_t c = 0; c < count; ++c) {
    constexpr int64_t kLanes = 8;
    double lane[kLanes] = {};
    const float* g = chunk_at[c].g;
    const int64_t n = chunk_at[c].n;
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes)
      for (int64_t j = 0; j < kLanes; ++j) lane[j] += static_cast<double>(g[i + j]) * g[i + j];
    for (int64_t j = 0; i < n; ++i, ++j) lane[j] += static_cast<double>(g[i]) * g[i];
    double s = 0;
    for (const double v : lane) s += v;
    part_at[c] = s;
  }
  sums.assign(tensors.size(), 0.0);
  for (size_t t = 0; t < tensors.size(); ++t)
    for (size_t c = first[t]; c < first[t + 1]; ++c) sums[t] += part[c];
}

// g *= scale for every tensor, in one parallel region.
void scale_all(const std::vector<Tensor*>& tensors, float scale) {
  constexpr int64_t kChunk = int64_t{1} << 14;
  thread_local std::vector<std::pair<float*, int64_t>> chunks;
  chunks.clear();
  int64_t total = 0;
  for (Tensor* t : tensors) {
    float* g = t->data<float>();
    for (int64_t i = 0; i < t->numel(); i += kChunk)
      chunks.emplace_back(g + i, std::min(kChunk, t->numel() - i));
    total += t->numel();
  }
  const auto count = static_cast<int64_t>(chunks.size());
  const std::pair<float*, int64_t>* const chunk_at = chunks.data();  // this thread's scratch
#pragma omp parallel for schedule(static) if (total > kParallelMin)
  for (int64_t c = 0; c < count; ++c) {
    const auto [g, n] = chunk_at[c];
    for (int64_t i = 0; i < n; ++i) g[i] *= scale;
  }
}

}  // namespace

std::string Trainer::first_nonfinite(bool grads) const {
  for (const NamedParam& p : model_->params()) {
    const Tensor& t = grads ? p.grad : p.value;
    const float* v = t.data<float>();
    for (int64_t i = 0; i < t.numel(); ++i)
      if (!std::isfinite(v[i]))
        return fmt::format("the {} {} holds {} at index {}", grads ? "gradient of" : "weight",
                           p.name, v[i], i);
  }
  return "";
}

StepLog Trainer::train_step() {
  const auto t0 = std::chrono::steady_clock::now();
  StepLog log;
  log.step = step_ + 1;
  model_->zero_grad();
  model_->set_training(true);
  for (MoeLayer* m : model_->moe_layers()) m->set_dense_routing(step_ < cfg_.router_warmup);
  double imbalance = 0;
  int64_t moe_layers = 0;
  for (int64_t micro = 0; micro < cfg_.grad_accum; ++micro) {
    if (sampler_) sampler_->next(full_batch_);  // else the fixed token batch; batch_ is our part
    arena_.reset();
    ModelOutput& out = out_;
    try {
      if (teacher_) {  // the teacher's logits of the positions the student predicts
        const int64_t B = batch_.size(0), T = batch_.size(1) - 1;
        Tensor inputs = arena_.tensor({B, T}, DType::I32);
        for (int64_t b = 0; b < B; ++b)
          std::copy_n(batch_.data<int32_t>() + b * (T + 1), T, inputs.data<int32_t>() + b * T);
        soft_.logits = teacher_->logits(inputs, arena_);
      }
      const cpu::Bf16Operands mixed(bf16_, &bf16_store_);
      if (bf16_)  // the weights hold still for the step: rounded once, read by every product
        for (const NamedParam& p : model_->params())
          cpu::bf16_keep(p.value.data<float>(), p.value.numel());
      model_->forward_backward(batch_, arena_, 1.0 / static_cast<double>(cfg_.grad_accum), out,
                               teacher_ ? &soft_ : nullptr);
    } catch (const Error& e) {
      // A layer's own guard (a NaN reaching an MoE layer, say) stops the step too; a weight that
      // is not finite is named as the cause.
      const std::string weight = first_nonfinite(false);
      throw_error("train", fmt::format("step {}: {}{}", log.step, e.what(),
                                       weight.empty() ? "" : "; cause: " + weight));
    }
    if (!std::isfinite(out.loss)) {
      const std::string weight = first_nonfinite(false);
      throw_error("train",
                  fmt::format("step {}: the loss is not finite ({}; cross-entropy {}, aux {}, z "
                              "{}); {}",
                              log.step, out.loss, out.ce_loss, out.aux_loss, out.z_loss,
                              weight.empty() ? "every weight is finite" : "cause: " + weight));
    }
    const double n = static_cast<double>(cfg_.grad_accum);
    log.loss += out.loss / n;
    log.ce_loss += out.ce_loss / n;
    log.soft_loss += out.soft_loss / n;
    log.mtp_loss += out.mtp_loss / n;
    log.aux_loss += out.aux_loss / n;
    log.z_loss += out.z_loss / n;
    routed_.resize(out.routing.size());
    for (size_t l = 0; l < out.routing.size(); ++l) {
      const RoutingStats& s = out.routing[l];
      imbalance += s.load_imbalance;
      ++moe_layers;
      log.remote_rows += s.remote_rows;
      log.remote_tokens += s.remote_tokens;
      routed_[l].resize(s.routed.size());
      if (micro == 0) std::fill(routed_[l].begin(), routed_[l].end(), 0);
      for (size_t e = 0; e < s.routed.size(); ++e) routed_[l][e] += s.routed[e];
    }
    log.routed = &routed_;
  }
  reduce_gradients();
  // Frozen tensors' gradients take no part (in the norm, the clip or the checks).
  for (NamedParam& p : model_->params())
    if (frozen(p)) p.grad.fill(0.0);
  if (gradient_hook_) gradient_hook_(*model_, log.step);
  // Gradient norm, with the guard: a non-finite gradient stops the step before any update (on
  // every rank, the one holding the tensor naming it).
  double sq = 0, sq_routed = 0;
  std::string bad;
  grads_.clear();
  for (NamedParam& p : model_->params()) grads_.push_back(&p.grad);
  sums_of_squares(grads_, grad_sums_);
  for (size_t i = 0; i < grads_.size(); ++i) {
    const NamedParam& p = model_->params()[i];
    if (!std::isfinite(grad_sums_[i]) && bad.empty()) bad = p.name;
    (p.routed ? sq_routed : sq) += grad_sums_[i];
  }
  const bool any_bad = groups_ ? groups_->world.max(bad.empty() ? 0.0 : 1.0) > 0 : !bad.empty();
  MOE_CHECK(!any_bad, "train", "step {}: {}; no weight was updated", log.step,
            bad.empty() ? std::string("the gradient of an expert on another rank is not finite")
            : first_nonfinite(true).empty() ? fmt::format("the gradient of {} is not finite", bad)
                                            : first_nonfinite(true));
  if (groups_) sq_routed = groups_->ep.sum(sq_routed);  // the experts are split over the group
  log.grad_norm = std::sqrt(sq + sq_routed);
  if (cfg_.clip > 0 && log.grad_norm > cfg_.clip)
    scale_all(grads_, static_cast<float>(cfg_.clip / log.grad_norm));
  log.lr = cfg_.lr_at(step_);
  opt_->step(log.lr);
  for (MoeLayer* m : model_->moe_layers()) m->after_step();
  ++step_;
  log.load_imbalance = moe_layers > 0 ? imbalance / static_cast<double>(moe_layers) : 0;
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  log.tokens_per_s =
      static_cast<double>(cfg_.batch * cfg_.seq_len * cfg_.grad_accum) / std::max(secs, 1e-9);
  return log;
}

void Trainer::reduce_gradients() {
  if (!groups_) return;
  // The gradients packed into buckets of up to kBucket values, one sum per bucket: the routed
  // experts' over their data-parallel replicas, the others' over every rank. The sums are
  // elementwise, so the packing changes no bit.
  constexpr int64_t kBucket = int64_t(4) << 20;  // 16 MB of float32
  for (const bool routed : {false, true}) {
    const dist::Comm& comm = routed ? groups_->dp : groups_->world;
    std::vector<std::pair<float*, int64_t>> parts;  // (data, count) of the current bucket
    int64_t filled = 0;
    auto flush = [&] {
      if (filled == 0) return;
      float* b = bucket_.data();
      for (const auto& [data, n] : parts) b = std::copy_n(data, n, b);
      comm.sum(bucket_.data(), filled);
      b = bucket_.data();
      for (const auto& [data, n] : parts) {
        std::copy_n(b, n, data);
        b += n;
      }
      parts.clear();
      filled = 0;
    };
    for (NamedParam& p : model_->params()) {
      if (p.routed != routed) continue;
      float* g = p.grad.data<float>();
      const int64_t n = p.grad.numel();
      if (n >= kBucket) {  // large enough alone
        flush();
        comm.sum(g, n);
        continue;
      }
      if (filled + n > kBucket) flush();
      if (bucket_.size() < static_cast<size_t>(filled + n))
        bucket_.resize(
            static_cast<size_t>(std::min(kBucket, std::max<int64_t>(filled + n, 1 << 16))));
      parts.emplace_back(g, n);
      filled += n;
    }
    flush();
  }
}

double Trainer::evaluate() {
  model_->set_training(false);
  if (!sampler_) {  // the fixed token batch
    arena_.reset();
    const double loss = model_->forward(batch_, arena_).ce_loss;
    model_->set_training(true);
    return loss;
  }
  BatchSampler sampler(val_, cfg_.batch, cfg_.seq_len, cfg_.seed + 12345);
  double total = 0;
  for (int64_t b = 0; b < cfg_.eval_batches; ++b) {
    sampler.next(full_batch_);
    arena_.reset();
    total += model_->forward(batch_, arena_).ce_loss;
  }
  model_->set_training(true);
  return total / static_cast<double>(cfg_.eval_batches);
}

bool Trainer::frozen(const NamedParam& p) const {
  if (cfg_.only_experts) return !p.routed;
  return mcfg_.moe.freeze_router && p.name.find(".moe.router.") != std::string::npos;
}

std::string Trainer::sample(const std::string& prompt, int64_t n, double temperature,
                            uint64_t seed) {
  model_->set_training(false);
  Rng rng(seed);
  // Documents start with <bos> (the tokenizer's, when it has one) and end with <eos>.
  std::vector<int32_t> ids;
  std::optional<int32_t> eos = ByteTokenizer::kEos;
  if (tok_) {
    // Without a <bos>, the stream's documents are separated by <eos>: start after one.
    eos = tok_->eos_id();
    if (auto start = tok_->bos_id() ? tok_->bos_id() : eos) ids.push_back(*start);
    for (int32_t t : tok_->encode(prompt)) ids.push_back(t);
  } else {
    ids.push_back(ByteTokenizer::kBos);
    for (int32_t b : ByteTokenizer::encode(prompt)) ids.push_back(b);
  }
  MOE_CHECK(!ids.empty(), "sample", "an empty prompt needs a tokenizer with <bos> or <eos>");
  std::vector<int32_t> out;
  const int64_t V = mcfg_.vocab_size;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t start =
        std::max<int64_t>(0, static_cast<int64_t>(ids.size()) - mcfg_.max_seq_len);
    const int64_t T = static_cast<int64_t>(ids.size()) - start;
    Tensor tok = Tensor::empty({1, T}, DType::I32);
    std::copy(ids.begin() + start, ids.end(), tok.data<int32_t>());
    Arena arena;
    const Tensor logits = model_->logits(tok, arena);
    const float* last = logits.data<float>() + (T - 1) * V;
    std::vector<double> p(static_cast<size_t>(V));
    double mx = last[0], sum = 0;
    for (int64_t v = 1; v < V; ++v) mx = std::max(mx, static_cast<double>(last[v]));
    for (int64_t v = 0; v < V; ++v) {
      p[static_cast<size_t>(v)] = std::exp((last[v] - mx) / std::max(temperature, 1e-6));
      sum += p[static_cast<size_t>(v)];
    }
    double u = rng.uniform() * sum;
    int32_t next = static_cast<int32_t>(V - 1);
    for (int64_t v = 0; v < V; ++v) {
      u -= p[static_cast<size_t>(v)];
      if (u <= 0) {
        next = static_cast<int32_t>(v);
        break;
      }
    }
    if (eos && next == *eos) break;
    ids.push_back(next);
    out.push_back(next);
  }
  model_->set_training(true);
  return tok_ ? tok_->decode(out) : ByteTokenizer::decode(out);
}

}  // namespace moe
