// `moe train`: trains an MoE language model; with no arguments, the default small MoE model on
// the multilingual fortunes corpus, in about five minutes on two cores.
#include <fmt/core.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>

#include "commands.h"
#include "moe/cpu.h"
#include "moe/dist.h"
#include "moe/gguf.h"
#include "moe/kernels.h"
#include "moe/threading.h"
#include "moe/trainer.h"

namespace moe::cli {

namespace fs = std::filesystem;

namespace {

struct TrainArgs {
  std::string preset = "small";
  std::string config;
  std::vector<std::string> data;
  std::string tokens;
  std::string out = "out/train";
  std::string resume;
  std::string init_from;
  std::string log;
  std::string router;
  int64_t experts = 0, top_k = 0;
  double aux_coef = -1, z_coef = -1, device_aux_coef = -1;
  int64_t devices = 0;
  int64_t mtp = -1;
  double mtp_weight = -1;
  bool global_balance = false;
  bool freeze_router = false;
  std::vector<int64_t> freeze_experts;
  int threads = 0;
  int64_t sample = 300;
  TrainConfig train;
};

std::string hms(double seconds) {
  const auto s = static_cast<int64_t>(seconds + 0.5);
  return s >= 3600 ? fmt::format("{}:{:02d}:{:02d}", s / 3600, s / 60 % 60, s % 60)
                   : fmt::format("{}:{:02d}", s / 60, s % 60);
}

// The progress line: redrawn in place on a terminal, printed every few steps otherwise.
class Progress {
 public:
  explicit Progress(int64_t total) : total_(total), tty_(isatty(STDERR_FILENO) != 0) {}
  void update(const StepLog& s, double elapsed, int64_t done_here) {
    const double per_step = elapsed / static_cast<double>(std::max<int64_t>(1, done_here));
    const double eta = per_step * static_cast<double>(total_ - s.step);
    const int width = 24;
    const int filled = static_cast<int>(width * s.step / std::max<int64_t>(1, total_));
    const std::string line = fmt::format(
        "step {:>5}/{} [{}{}] loss {:.4f} aux {:.4f}{} imbalance {:.2f} | {:.0f} tok/s | ETA {}",
        s.step, total_, std::string(static_cast<size_t>(filled), '#'),
        std::string(static_cast<size_t>(width - filled), '-'), s.loss, s.aux_loss,
        s.mtp_loss > 0 ? fmt::format(" mtp {:.4f}", s.mtp_loss) : std::string(), s.load_imbalance,
        s.tokens_per_s, hms(eta));
    if (tty_) {
      fmt::print(stderr, "\r{}\x1b[K", line);
    } else if (s.step == 1 || s.step % std::max<int64_t>(1, total_ / 40) == 0 || s.step == total_) {
      fmt::print(stderr, "{}\n", line);
    }
  }
  void message(const std::string& m) { fmt::print(stderr, "{}{}\n", tty_ ? "\r\x1b[K" : "", m); }

 private:
  int64_t total_;
  bool tty_;
};

// The MoE options given on the command line, over the model's own.
void apply_overrides(const TrainArgs& a, ModelConfig& mcfg) {
  if (!a.router.empty()) mcfg.moe.router = parse_router_kind(a.router);
  if (a.experts > 0) mcfg.moe.n_experts = a.experts;
  if (a.top_k > 0) mcfg.moe.top_k = a.top_k;
  // A HuggingFace model's balancing loss is the joint one (ModelConfig::joint_aux_loss_coef).
  if (a.aux_coef >= 0)
    (mcfg.joint_aux_loss_coef > 0 ? mcfg.joint_aux_loss_coef : mcfg.moe.aux_loss_coef) = a.aux_coef;
  if (a.z_coef >= 0) mcfg.moe.z_loss_coef = a.z_coef;
  if (a.device_aux_coef >= 0) mcfg.moe.device_aux_loss_coef = a.device_aux_coef;
  if (a.devices > 0) mcfg.moe.n_devices = a.devices;
  if (a.global_balance) mcfg.moe.global_balance = true;
  if (a.mtp >= 0) mcfg.mtp_depth = a.mtp;
  if (a.mtp_weight >= 0) mcfg.mtp_weight = a.mtp_weight;
  // The devices of the device-level loss are the expert-parallel ranks unless given.
  if (mcfg.moe.device_aux_loss_coef > 0 && mcfg.moe.n_devices == 0)
    mcfg.moe.n_devices = a.train.expert_parallel;
  mcfg.validate();
}

// The model config of --preset or --config, with the MoE overrides.
ModelConfig model_config(const TrainArgs& a) {
  ModelConfig mcfg = model_preset(a.preset);
  if (!a.config.empty()) {
    std::ifstream f(a.config);
    MOE_CHECK(f.good(), "train", "cannot read --config {}", a.config);
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(f);
    } catch (const nlohmann::json::exception& e) {
      throw_error("train", fmt::format("--config {} is not valid JSON: {}", a.config, e.what()));
    }
    mcfg = j.get<ModelConfig>();
  }
  apply_overrides(a, mcfg);
  return mcfg;
}

int run_train(TrainArgs& a) {
  // Ranks sharing a machine share its cores.
  set_num_threads(a.threads > 0 ? a.threads
                                : std::max(1, num_cores() / dist::ranks_on_this_machine()));
  ModelConfig mcfg = model_config(a);
  std::unique_ptr<Model> start;
  std::optional<HfOrigin> origin;
  if (!a.init_from.empty()) {
    MOE_CHECK(a.config.empty(), "train", "give --config or --init-from, not both");
    start = load_model(a.init_from);
    mcfg = start->config();
    apply_overrides(a, mcfg);
    // A GGUF file's model is written in this engine's layout.
    const CheckpointInfo info = is_gguf_file(a.init_from) ? CheckpointInfo{{}, mcfg, "gguf", true}
                                                          : read_checkpoint_info(a.init_from);
    // A HuggingFace checkpoint fine-tuned as it is comes out in its own layout; overrides that
    // change the architecture leave this engine's.
    if (!info.ours) {
      if (nlohmann::json(mcfg) == nlohmann::json(start->config())) {
        origin = hf_origin(info.dir);
      } else {
        fmt::print(
            "note: the overrides change the {} architecture; checkpoints are written in "
            "this engine's layout\n",
            info.model_type);
      }
    }
  }
  if (a.init_from.empty() && a.config.empty() && !a.resume.empty()) {
    // Resuming alone: the model is the checkpoint's, and a fine-tuned HuggingFace checkpoint
    // stays in its own layout.
    const CheckpointInfo info = read_checkpoint_info(a.resume);
    mcfg = info.config;
    apply_overrides(a, mcfg);
    if (!info.ours) origin = hf_origin(info.dir);
  }
  // Fine-tuning switches: training choices, not the architecture.
  mcfg.moe.freeze_router = mcfg.moe.freeze_router || a.freeze_router;
  if (!a.freeze_experts.empty()) mcfg.moe.frozen_experts = a.freeze_experts;
  mcfg.validate();
  // Text is read through the starting checkpoint's own tokenizer when it ships one, else as
  // bytes (this engine's models).
  std::unique_ptr<Tokenizer> tokenizer;
  if (!a.init_from.empty() && a.tokens.empty()) tokenizer = checkpoint_tokenizer(a.init_from);
  if (!a.resume.empty() && a.tokens.empty() && !tokenizer)
    tokenizer = checkpoint_tokenizer(a.resume);
  // A student reads the text as its teacher does.
  if (!a.train.teacher.empty() && a.tokens.empty() && !tokenizer && !is_gguf_file(a.train.teacher))
    tokenizer = checkpoint_tokenizer(resolve_checkpoint(a.train.teacher));
  std::unique_ptr<Trainer> made;
  Corpus corpus;
  if (!a.tokens.empty()) {
    MOE_CHECK(a.data.empty(), "train", "give --data or --tokens, not both");
    made = std::make_unique<Trainer>(mcfg, a.train, parse_id_lists(a.tokens, "--tokens"));
  } else {
    corpus = a.data.empty() ? load_fortunes() : load_text(a.data);
    made = std::make_unique<Trainer>(mcfg, a.train, corpus, tokenizer.get());
  }
  Trainer& trainer = *made;
  if (start) trainer.init_from(*start);
  if (origin) trainer.set_hf_origin(*origin);
  if (!a.resume.empty()) trainer.resume(a.resume);
  Model& model = trainer.model();
  // In a distributed job every rank trains; rank 0 alone prints and writes the log.
  const bool writer = trainer.is_writer();
  if (!writer) {
    if (!std::freopen("/dev/null", "w", stdout)) throw_error("train", "cannot silence rank output");
    a.log.clear();
  }
  if (const dist::ExpertGroups* g = trainer.groups())
    fmt::print(
        "distributed: {} ranks, {} expert-parallel x {} data-parallel; {} of {} experts per "
        "rank, {} of {} sequences per rank\n",
        g->world.size(), g->ep_size(), g->dp_size(), mcfg.moe.n_experts / g->ep_size(),
        mcfg.moe.n_experts, trainer.config().batch / g->world.size(), trainer.config().batch);
  fmt::print("moe {}: {} layers, d_model {}, {} MoE layers ({}), {:.2f}M parameters{}\n",
             trainer.teacher() ? "distill" : "train", mcfg.n_layers, mcfg.d_model,
             model.moe_layers().size(),
             model.moe_layers().empty() ? std::string("dense") : mcfg.moe.summary(),
             static_cast<double>(model.n_params()) / 1e6,
             mcfg.mtp_depth > 0 ? fmt::format("; {} MTP module{} (loss weight {})", mcfg.mtp_depth,
                                              mcfg.mtp_depth > 1 ? "s" : "", mcfg.mtp_weight)
                                : std::string());
  if (Model* t = trainer.teacher()) {
    const ParamCount n = count_params(t->config());
    fmt::print(
        "teacher: {} ({:.2f}M parameters, {:.2f}M active); targets {} of its distribution, {} "
        "of the next token\n",
        a.train.teacher, static_cast<double>(n.total) / 1e6, static_cast<double>(n.active) / 1e6,
        a.train.soft_weight, 1 - a.train.soft_weight);
  }
  if (a.tokens.empty()) {
    fmt::print("data: {} documents in {} languages, {} training and {} validation tokens ({})\n",
               corpus.docs.size(), corpus.languages.size(), trainer.train_tokens(),
               trainer.val_tokens(), tokenizer ? "the checkpoint's tokenizer" : "bytes");
  } else {
    fmt::print("data: one fixed batch of {} x {} tokens (--tokens), every step\n",
               trainer.config().batch, trainer.config().seq_len + 1);
  }
  const std::string schedule =
      a.train.schedule == "constant"
          ? "constant"
          : fmt::format("warmup {}, cosine to {}", a.train.warmup, a.train.min_lr);
  fmt::print("training: {} steps of {} x {} tokens, lr {} ({}), {} threads{}\n", a.train.steps,
             trainer.config().batch * a.train.grad_accum, trainer.config().seq_len, a.train.lr,
             schedule, num_threads(),
             trainer.step() > 0 ? fmt::format(", resumed at step {}", trainer.step()) : "");
  if (trainer.config().matmul_dtype() == "bf16")
    fmt::print("matrix products: bf16 operands, float32 accumulation and master weights ({})\n",
               cpu::gemm_bf16_backend_info());
  else if (a.train.dtype == "auto")
    fmt::print("matrix products: float32 (this CPU has no bf16 arithmetic on path {})\n",
               cpu_path_name(cpu_path()));
  std::fflush(stdout);
  std::ofstream log;
  if (!a.log.empty()) {
    if (const fs::path dir = fs::path(a.log).parent_path(); !dir.empty())
      fs::create_directories(dir);
    log.open(a.log, trainer.step() > 0 ? std::ios::app : std::ios::trunc);
    MOE_CHECK(log.good(), "train", "cannot write --log {}", a.log);
  }
  Progress progress(a.train.steps);
  const auto t0 = std::chrono::steady_clock::now();
  const int64_t first = trainer.step();
  while (trainer.step() < a.train.steps) {
    const StepLog s = trainer.train_step();
    if (log.is_open())
      log << nlohmann::json{{"step", s.step},
                            {"loss", s.loss},
                            {"aux_loss", s.aux_loss},
                            {"z_loss", s.z_loss},
                            {"ce_loss", s.ce_loss},
                            {"soft_loss", s.soft_loss},
                            {"mtp_loss", s.mtp_loss},
                            {"lr", s.lr},
                            {"grad_norm", s.grad_norm},
                            {"tokens_per_s", s.tokens_per_s},
                            {"load_imbalance", s.load_imbalance},
                            {"routed", *s.routed}}
                 .dump()
          << "\n";
    const double elapsed =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (writer) progress.update(s, elapsed, s.step - first);
    const bool last = s.step == a.train.steps;
    if ((a.train.eval_every > 0 && s.step % a.train.eval_every == 0) || last) {
      const double val = trainer.evaluate();
      if (writer)
        progress.message(fmt::format("step {:>5}: validation loss {:.4f} ({:.3f} bits per {})",
                                     s.step, val, val / std::log(2.0),
                                     tokenizer || !a.tokens.empty() ? "token" : "byte"));
      if (log.is_open()) log << nlohmann::json{{"step", s.step}, {"val_loss", val}}.dump() << "\n";
    }
    if ((a.train.save_every > 0 && s.step % a.train.save_every == 0) || last) trainer.save(a.out);
    if (log.is_open()) log.flush();
  }
  fmt::print("checkpoint: {}/{}\n", a.out, fmt::format("step-{:06d}", trainer.step()));
  if (a.sample > 0 && tokenizer && !tokenizer->bos_id() && !tokenizer->eos_id()) {
    fmt::print("no sample: the tokenizer has neither <bos> nor <eos> to start one\n");
  } else if (a.sample > 0) {
    fmt::print("\nsample:\n{}\n", trainer.sample("", a.sample, 0.8, a.train.seed));
  }
  return 0;
}

// `moe init`: a randomly initialized model, saved as a checkpoint (for benchmarks, offloading
// and tests that need a model of a given shape without training one).
int run_init(const TrainArgs& a, int64_t d_ffn) {
  set_num_threads(a.threads);
  ModelConfig mcfg = model_config(a);
  if (d_ffn > 0) mcfg.moe.d_ffn = d_ffn;
  mcfg.validate();
  Model model(mcfg, DType::F32);
  Rng rng(a.train.seed);
  model.init(rng);
  save_model(model, a.out);
  const ParamCount n = count_params(mcfg);
  fmt::print("{}: {:.2f}M parameters ({:.2f}M active), routed experts {:.1f} MB\n", a.out,
             static_cast<double>(n.total) / 1e6, static_cast<double>(n.active) / 1e6,
             static_cast<double>(n.routed_experts) * 4 / 1e6);
  return 0;
}

// The fine-tuning switches (docs/training.md), shared by train and init.
void add_finetune_switches(CLI::App* cmd, TrainArgs& a) {
  cmd->add_flag("--freeze-router", a.freeze_router,
                "fine-tuning: keep every router as it is (no gradient, no update)");
  cmd->add_option("--freeze-experts", a.freeze_experts,
                  "fine-tuning: keep these routed experts (of every MoE layer) as they are, e.g. "
                  "0,3")
      ->delimiter(',');
  cmd->add_flag("--train-only-experts", a.train.only_experts,
                "fine-tuning: update the routed experts only; everything else stays as it is");
}

// The options of a training run, shared by train and distill.
void add_training_options(CLI::App* cmd, TrainArgs& a) {
  cmd->add_option("--config", a.config, "model config JSON (overrides --preset)");
  cmd->add_option("--data", a.data, "text files or folders (default: the fortunes in 5 languages)");
  cmd->add_option("--tokens", a.tokens,
                  "train on this one batch of token ids, e.g. 1,2,3;4,5,6 (equal lengths), every "
                  "step");
  cmd->add_option("--out", a.out, "checkpoint folder")->capture_default_str();
  cmd->add_option("--resume", a.resume, "continue from this checkpoint (or its folder)");
  cmd->add_option("--init-from", a.init_from,
                  "start from this checkpoint's model and weights (fresh optimizer): this "
                  "engine's or a HuggingFace folder (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3, "
                  "DBRX, gpt-oss), whose tokenizer then reads --data and whose layout is kept "
                  "(gpt-oss's MXFP4 experts are saved unquantized); or a GGUF file (its tensors "
                  "dequantized to float32; saved in this engine's layout)");
  cmd->add_option("--log", a.log, "write one JSON object per step and per validation");
  cmd->add_option("--steps", a.train.steps, "optimizer steps")->capture_default_str();
  cmd->add_option("--batch", a.train.batch, "sequences per micro-batch")->capture_default_str();
  cmd->add_option("--seq-len", a.train.seq_len, "tokens per sequence")->capture_default_str();
  cmd->add_option("--grad-accum", a.train.grad_accum, "micro-batches per step")
      ->capture_default_str();
  cmd->add_option("--lr", a.train.lr, "peak learning rate")->capture_default_str();
  cmd->add_option("--min-lr", a.train.min_lr, "final learning rate")->capture_default_str();
  cmd->add_option("--warmup", a.train.warmup, "warmup steps")->capture_default_str();
  cmd->add_option("--weight-decay", a.train.weight_decay, "AdamW weight decay")
      ->capture_default_str();
  cmd->add_option("--beta1", a.train.beta1, "AdamW beta1")->capture_default_str();
  cmd->add_option("--beta2", a.train.beta2, "AdamW beta2")->capture_default_str();
  cmd->add_option("--eps", a.train.eps, "AdamW epsilon")->capture_default_str();
  cmd->add_flag("--decay-all", a.train.decay_all,
                "weight decay on every tensor, norms and biases too (torch.optim.AdamW's default "
                "when given all the parameters)");
  cmd->add_option("--schedule", a.train.schedule,
                  "learning rate: cosine (warmup, then down to --min-lr) or constant (--lr)")
      ->check(CLI::IsMember({"cosine", "constant"}))
      ->capture_default_str();
  cmd->add_option("--dtype", a.train.dtype,
                  "matrix products: f32, bf16 (bf16 operands, float32 accumulation, float32 "
                  "master weights and optimizer) or auto (bf16 where the CPU has AVX512-BF16 or "
                  "AMX)")
      ->check(CLI::IsMember({"f32", "bf16", "auto"}))
      ->capture_default_str();
  cmd->add_option("--clip,--grad-clip", a.train.clip, "gradient-norm clip (0: none)")
      ->capture_default_str();
  cmd->add_option("--eval-every", a.train.eval_every, "steps between validations")
      ->capture_default_str();
  cmd->add_option("--save-every", a.train.save_every, "steps between checkpoints")
      ->capture_default_str();
  cmd->add_option("--router", a.router, "override the MoE routing method");
  cmd->add_option("--experts", a.experts, "override the number of experts");
  cmd->add_option("--top-k", a.top_k, "override experts per token");
  cmd->add_option("--aux-coef", a.aux_coef, "override the load-balancing loss coefficient");
  cmd->add_option("--z-coef", a.z_coef, "override the router z-loss coefficient");
  cmd->add_option("--router-warmup", a.train.router_warmup,
                  "route every token to every expert (softmax weights) for the first N steps, "
                  "then sparsely as configured")
      ->capture_default_str();
  cmd->add_option("--device-aux-coef", a.device_aux_coef,
                  "DeepSeek-V2's device-level balance loss coefficient (0.05 in the paper; topk "
                  "and switch routers)");
  cmd->add_flag("--global-balance", a.global_balance,
                "balancing losses count the choices of the whole step (every micro-batch so far "
                "and every rank), not of each micro-batch alone (topk and switch routers)");
  cmd->add_option("--devices", a.devices,
                  "devices of the device-level loss: groups of consecutive experts (default: the "
                  "--expert-parallel ranks)");
  add_finetune_switches(cmd, a);
  cmd->add_option("--mtp", a.mtp,
                  "multi-token prediction modules (DeepSeek-V3): module k also predicts the token "
                  "k + 1 ahead; saved with the model, used by generate --speculative");
  cmd->add_option("--mtp-weight", a.mtp_weight,
                  "weight of the MTP modules' mean cross-entropy in the loss (default 0.3)");
  cmd->add_option("--seed", a.train.seed, "random seed")->capture_default_str();
  cmd->add_option("--expert-parallel", a.train.expert_parallel,
                  "under mpirun -np P: split each MoE layer's experts over EP ranks (P / EP "
                  "data-parallel replicas; the batch is split over all P)")
      ->capture_default_str();
  cmd->add_option("-t,--threads", a.threads, "threads (0: all cores)")->capture_default_str();
  cmd->add_option("--sample", a.sample, "tokens to generate at the end (0: none)")
      ->capture_default_str();
}

}  // namespace

Run add_train(CLI::App& app) {
  auto a = std::make_shared<TrainArgs>();
  a->train.steps = 1800;  // about five minutes on two cores
  a->train.eval_every = 300;
  auto* cmd = app.add_subcommand(
      "train",
      "train an MoE language model (default: the small MoE preset on the fortunes corpus)");
  cmd->add_option("--preset", a->preset,
                  "model preset: tiny, small, small-dense, medium (trainable)")
      ->capture_default_str();
  add_training_options(cmd, *a);
  return [a] { return run_train(*a); };
}

Run add_distill(CLI::App& app) {
  auto a = std::make_shared<TrainArgs>();
  auto student = std::make_shared<std::string>();
  a->preset = "small-dense";
  a->out = "out/distill";
  a->train.steps = 1800;
  a->train.eval_every = 300;
  auto* cmd = app.add_subcommand(
      "distill",
      "train a smaller (dense) student on a teacher's distributions (Switch Transformer, "
      "section 5): each position's target is --soft-weight of the teacher's next-token "
      "distribution and the rest of the true next token; validation reports the student's plain "
      "cross-entropy. Takes every option of moe train");
  cmd->add_option("--teacher", a->train.teacher,
                  "the teacher: a checkpoint folder or GGUF file with the student's vocabulary "
                  "(its weights as stored; run on each batch without gradients)")
      ->required();
  cmd->add_option("--soft-weight", a->train.soft_weight,
                  "weight of the teacher's distribution in the targets (the paper's 0.25)")
      ->check(CLI::Range(0.0, 1.0))
      ->capture_default_str();
  cmd->add_option("--student", *student,
                  "the student: a preset name, or a model config JSON file (*.json); the same as "
                  "--preset or --config");
  cmd->add_option("--preset", a->preset, "the student's preset (see moe params --help)")
      ->capture_default_str();
  add_training_options(cmd, *a);
  return [a, student] {
    if (!student->empty()) {
      MOE_CHECK(a->config.empty(), "distill", "give --student or --config, not both");
      (student->size() > 5 && student->substr(student->size() - 5) == ".json" ? a->config
                                                                              : a->preset) =
          *student;
    }
    return run_train(*a);
  };
}

Run add_init(CLI::App& app) {
  auto a = std::make_shared<TrainArgs>();
  auto d_ffn = std::make_shared<int64_t>(0);
  auto* cmd = app.add_subcommand("init", "write a randomly initialized model as a checkpoint");
  cmd->add_option("--preset", a->preset, "model preset (see moe params --help)")
      ->capture_default_str();
  cmd->add_option("--config", a->config, "model config JSON (overrides --preset)");
  cmd->add_option("--experts", a->experts, "override the number of experts");
  cmd->add_option("--top-k", a->top_k, "override experts per token");
  cmd->add_option("--expert-ffn", *d_ffn, "override the experts' hidden width");
  cmd->add_option("--router", a->router, "override the MoE routing method");
  add_finetune_switches(cmd, *a);
  cmd->add_option("--seed", a->train.seed, "random seed")->capture_default_str();
  cmd->add_option("--out", a->out, "checkpoint folder to write")->required();
  cmd->add_option("-t,--threads", a->threads, "threads (0: all cores)")->capture_default_str();
  return [a, d_ffn] { return run_init(*a, *d_ffn); };
}

}  // namespace moe::cli
