// moe/trainer.h: training a language model: AdamW with warmup and cosine decay, gradient
// clipping and accumulation, a guard against non-finite values, validation, logs, and atomic
// checkpoints that resume bit for bit.
#pragma once

#include <functional>
#include <memory>
#include <nlohmann/json_fwd.hpp>
#include <string>
#include <vector>

#include "moe/data.h"
#include "moe/hf.h"
#include "moe/kernels.h"
#include "moe/model.h"
#include "moe/optimizer.h"
#include "moe/tokenizer.h"

namespace moe {

struct TrainConfig {
  int64_t batch = 16;      // sequences per micro-batch
  int64_t seq_len = 128;   // tokens per sequence
  int64_t steps = 1000;    // optimizer steps
  int64_t grad_accum = 1;  // micro-batches per step
  double lr = 3e-3;        // peak learning rate
  double min_lr = 3e-4;    // end of the cosine decay
  int64_t warmup = 50;     // linear warmup steps
  double weight_decay = 0.1;
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  // Weight decay on every tensor, norms and biases included (torch.optim.AdamW given all the
  // parameters), instead of the weight matrices only.
  bool decay_all = false;
  std::string schedule = "cosine";  // cosine: warmup then cosine to min_lr; constant: lr
  // Fine-tuning: update the routed experts only (every other tensor stays as it is). The MoE
  // config's freeze_router and frozen_experts freeze the routers and chosen experts.
  bool only_experts = false;
  double clip = 1.0;  // global gradient-norm clip; 0: none
  int64_t eval_every = 100;
  int64_t eval_batches = 8;
  int64_t save_every = 250;  // 0: only at the end
  int64_t keep = 2;          // checkpoints kept
  int64_t val_every = 20;    // every n-th document goes to validation
  uint64_t seed = 0;
  // Ranks (of the MPI job) that split each MoE layer's experts: EP, dividing the job's P ranks
  // into P / EP data-parallel replicas. The global batch (batch sequences) is split evenly
  // over the P ranks. 1 in one process.
  int64_t expert_parallel = 1;
  // The matrix products' operands: "f32", or "bf16" (mixed precision: bf16 operands, float32
  // accumulation, float32 master weights, gradients and optimizer; cpu::Bf16Operands). "auto"
  // is bf16 where the CPU multiplies bf16 in hardware (cpu::bf16_native), f32 elsewhere.
  std::string dtype = "f32";
  // Distillation (Switch Transformer section 5): a checkpoint (folder or GGUF file) whose logits
  // become part of every position's target, with weight soft_weight (SoftTargets); empty: none.
  // The teacher runs inference on each micro-batch (its weights as stored); validation reports
  // the student's plain cross-entropy.
  std::string teacher;
  double soft_weight = 0.25;
  // Router warm-up: the first router_warmup steps route every token to every expert, weighted by
  // the softmax of the router logits (MoeLayer::set_dense_routing); the configured sparse
  // routing follows. 0: none.
  int64_t router_warmup = 0;

  void validate() const;
  // dtype with "auto" resolved on this machine: "f32" or "bf16".
  std::string matmul_dtype() const;
  // The learning rate at step (0-based): linear warmup, then cosine from lr to min_lr; or lr.
  double lr_at(int64_t step) const;
};

void to_json(nlohmann::json& j, const TrainConfig& c);
void from_json(const nlohmann::json& j, TrainConfig& c);

// One optimizer step's numbers (the fields of the --log lines).
struct StepLog {
  int64_t step = 0;  // 1-based: the number of steps done
  double loss = 0, ce_loss = 0, aux_loss = 0, z_loss = 0, lr = 0, grad_norm = 0;
  double soft_loss = 0;  // distillation: cross-entropy against the teacher (ModelOutput)
  double mtp_loss = 0;   // multi-token prediction: the modules' mean cross-entropy (ModelOutput)
  double tokens_per_s = 0, load_imbalance = 0;
  // Per MoE layer, the (token, expert) pairs routed to each expert this step (whole batch);
  // owned by the trainer, valid until its next step.
  const std::vector<std::vector<int64_t>>* routed = nullptr;
  // Expert parallelism, this rank, all MoE layers: RoutingStats' remote_rows and remote_tokens.
  int64_t remote_rows = 0, remote_tokens = 0;
};

class Trainer {
 public:
  // Builds the model (initialized from cfg.seed) and splits the corpus. The text is read through
  // `tok` (a checkpoint's own tokenizer, which must outlive the trainer), or as bytes when null.
  Trainer(const ModelConfig& model, const TrainConfig& cfg, const Corpus& corpus,
          const Tokenizer* tok = nullptr);
  // Trains on one fixed batch of token sequences (equal lengths; every step uses all of them,
  // and validation is the loss on the same batch). cfg's batch and seq_len are taken from it.
  Trainer(const ModelConfig& model, const TrainConfig& cfg,
          const std::vector<std::vector<int32_t>>& batch);
  ~Trainer();

  Model& model() { return *model_; }
  // The process groups of a distributed run (null in one process).
  const dist::ExpertGroups* groups() const { return groups_.get(); }
  // True on the rank that writes files and prints (rank 0; always in one process).
  bool is_writer() const { return !groups_ || groups_->world.rank() == 0; }
  const TrainConfig& config() const { return cfg_; }
  int64_t step() const { return step_; }
  int64_t train_tokens() const;
  int64_t val_tokens() const;

  // One optimizer step. Throws moe::Error naming the tensor and step when the loss or a gradient
  // is not finite; the parameters are then left as they were before the step.
  StepLog train_step();
  // Called in every step after the gradients are computed (and summed over ranks), before they
  // are checked and used: to inspect them, or to inject faults in tests.
  void set_gradient_hook(std::function<void(Model&, int64_t step)> hook) {
    gradient_hook_ = std::move(hook);
  }
  // Mean validation loss over cfg.eval_batches fixed batches.
  double evaluate();

  // Writes out_dir/step-NNNNNN (config.json, model.safetensors, optimizer.safetensors,
  // trainer_state.json) through a temporary folder renamed into place, then points
  // out_dir/latest at it; keeps the newest cfg.keep checkpoints.
  std::string save(const std::string& out_dir);
  // Restores a checkpoint folder (or an out_dir holding `latest`): weights, optimizer, step,
  // data position and every random stream.
  void resume(const std::string& dir);

  // Distillation from an in-memory teacher (what TrainConfig::teacher loads): same vocabulary,
  // context for seq_len, and no fewer parameters than the student; null stops distilling.
  void set_teacher(std::unique_ptr<Model> teacher, const std::string& name = "the teacher");
  Model* teacher() { return teacher_.get(); }

  // Starts from another model's weights (same config), e.g. a checkpoint to fine-tune; the
  // optimizer state stays fresh.
  void init_from(Model& src);
  // Checkpoints are then written as that HuggingFace checkpoint is (save_hf_model): the same
  // config.json, tensor names and layout, and its tokenizer files.
  void set_hf_origin(const HfOrigin& origin) { hf_origin_ = std::make_unique<HfOrigin>(origin); }
  // Every parameter of the whole model as (name, tensor): this rank's own, or under expert
  // parallelism with the routed experts gathered from the group (a collective: every rank
  // calls it).
  std::vector<std::pair<std::string, Tensor>> whole_params();

  // Generates n bytes after the prompt (temperature sampling, seeded), for a look at the model.
  std::string sample(const std::string& prompt, int64_t n, double temperature, uint64_t seed);

 private:
  Rng setup();  // model, initialization and optimizer; returns the seeded stream for the data
  // Sums the gradients over the ranks (expert parallelism): routed experts' over their
  // replicas, the others over every rank.
  void reduce_gradients();
  // Expert parallelism: the whole of a routed tensor from the group's parts, and this rank's
  // part of a whole one (identity for the others).
  Tensor whole(const NamedParam& p, const Tensor& part) const;
  const NamedParam& param(const std::string& name);  // by name; throws when there is none
  // Whether the tensor stays as it is (only_experts, the MoE config's freeze_router).
  bool frozen(const NamedParam& p) const;
  Tensor part(const NamedParam& p, const Tensor& whole) const;
  // Copies a whole model's parameters into this one (this rank's part of the routed experts).
  void copy_from(Model& whole);

  ModelConfig mcfg_;
  TrainConfig cfg_;
  bool bf16_ = false;  // cfg_.matmul_dtype() == "bf16"; set up once
  // bf16: the weights and saved activations of a step, rounded once (cpu::bf16_keep).
  cpu::Bf16Store bf16_store_;
  std::unique_ptr<Model> model_;
  std::unique_ptr<Model> teacher_;  // distillation (set_teacher)
  SoftTargets soft_;                // the teacher's logits of the current micro-batch
  std::unique_ptr<AdamW> opt_;
  TokenStream train_, val_;
  std::function<void(Model&, int64_t)> gradient_hook_;
  // Where a non-finite value first sits among the weights (or gradients): "the weight X holds
  // nan at index i", or empty.
  std::string first_nonfinite(bool grads) const;
  std::unique_ptr<BatchSampler> sampler_;
  Arena arena_;
  ModelOutput out_;                           // reused by every micro-batch
  std::vector<std::vector<int64_t>> routed_;  // StepLog::routed
  std::vector<float> bucket_;                 // reduce_gradients' packed gradients
  std::vector<Tensor*> grads_;                // the step's gradients, and their sums of squares
  std::vector<double> grad_sums_;
  std::unique_ptr<dist::ExpertGroups> groups_;
  Tensor full_batch_;  // [batch, T + 1]: the global batch, as one process would draw it
  Tensor batch_;       // this rank's rows of it (all of it in one process)
  std::unique_ptr<HfOrigin> hf_origin_;  // set_hf_origin
  const Tokenizer* tok_ = nullptr;       // the text's tokenizer (null: bytes)
  int64_t step_ = 0;
};

// The checkpoint folder `dir` names: itself, or the one its `latest` file points at.
std::string resolve_checkpoint(const std::string& dir);
// The tokenizer a checkpoint ships (tokenizer.json or tokenizer.model in its folder), or null when
// it has none: this engine's models read bytes.
std::unique_ptr<Tokenizer> checkpoint_tokenizer(const std::string& dir);
// Writes config.json and model.safetensors of `model` into folder `dir` (created), each
// atomically: Mixtral's layout and config when the model is a Mixtral (with this engine's config
// under "moe_cpp"), else this engine's names.
void save_model(Model& model, const std::string& dir);
// The same for a model split over expert-parallel ranks: every rank calls it, `whole` gathering
// a routed parameter's whole tensor [E, ...] from its share (a collective, called for each
// routed parameter in params() order), and the writer alone writes, one tensor at a time.
using GatherExperts = std::function<Tensor(const NamedParam&, const Tensor&)>;
void save_model_streamed(Model& model, const std::string& dir, const GatherExperts& whole,
                         bool writer);
// How a checkpoint's weights are held: float32 copies (what training needs), or the weight
// matrices kept as the files store them (bf16, f16, f32), mapped and computed from as they are
// (inference; norms, biases and routers still become float32).
enum class WeightsAs { float32, stored };
// Copies every parameter of the model from a safetensors file (names and shapes must match);
// WeightsAs::stored keeps bf16 and f16 weight matrices as views of the mapped file.
void load_weights(Model& model, const std::string& path, WeightsAs as = WeightsAs::float32);
// Loss of `model` (inference mode) over consecutive windows of seq_len + 1 tokens of `text`, at
// most `max_windows` of them, `batch` at a time: the mean of the windows' cross-entropies, as
// `moe eval` reports it. Throws when the text is shorter than one window.
struct WindowLoss {
  double loss = 0;
  int64_t windows = 0;
};
WindowLoss window_loss(Model& model, const TokenStream& text, int64_t seq_len, int64_t batch,
                       int64_t max_windows);

// What a checkpoint folder (or an out_dir with `latest`) holds: its model config, config.json's
// model_type ("moe_cpp" for this engine's own layout), and whether it is one of this engine's
// (its config under "moe_cpp", the weights in Mixtral's layout or under this engine's names).
struct CheckpointInfo {
  std::string dir;  // the checkpoint folder itself
  ModelConfig config;
  std::string model_type;
  bool ours = false;
  // A HuggingFace config's num_nextn_predict_layers (DeepSeek-V3's MTP modules); the config's
  // mtp_depth takes it when the checkpoint holds their tensors.
  int64_t hf_mtp_layers = 0;
};
CheckpointInfo read_checkpoint_info(const std::string& dir);
// A training checkpoint's files against the sizes and CRC-32s its trainer_state.json recorded
// when they were written: throws naming the file that is missing, truncated or corrupted.
// Nothing for folders without that record (HuggingFace checkpoints, quantized ones).
// load_model and Trainer::resume call it; offloading does not (it reads experts lazily).
void verify_checkpoint_files(const std::string& dir);
// The same from config.json's text (`name` names it in errors; `dir` is left empty).
CheckpointInfo parse_checkpoint_config(const std::string& text, const std::string& name);
// Fills every parameter model.params() lists from the checkpoint's files (WeightsAs::stored: a
// HuggingFace model made with routed_experts false gets its experts from views of the files).
void load_checkpoint_weights(Model& model, const CheckpointInfo& info,
                             WeightsAs as = WeightsAs::float32);
// Bytes of a checkpoint folder's weight files: its model.safetensors, or a HuggingFace index's
// shards.
uint64_t checkpoint_weight_bytes(const CheckpointInfo& info);
// A float32 model from a checkpoint folder: one of this engine's or a HuggingFace one; with
// WeightsAs::stored its weight matrices stay as stored (resident memory about the checkpoint's
// bytes, loaded in the time it takes to map the files and, where they fit in the available
// memory, to map their pages in: SafetensorsFile::set_prefault), for inference.
// A GGUF file (llama.cpp's format) in place of the folder: its config from the metadata and its
// tensors (moe/gguf_model.h); WeightsAs::stored computes from the mapped file, quantized blocks
// included.
std::unique_ptr<Model> load_model(const std::string& dir, WeightsAs as = WeightsAs::float32);
std::unique_ptr<Model> load_gguf_model(const std::string& path, WeightsAs as);

// Model presets by name ("tiny", "small", ...); throws listing the names when unknown.
ModelConfig model_preset(const std::string& name);
std::vector<std::string> model_preset_names();

}  // namespace moe
