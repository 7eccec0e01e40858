// `moe eval`: validation loss and perplexity of a checkpoint, over consecutive windows of the
// validation split (every val_every-th document) of the default corpus or of --data.
#include <fmt/core.h>

#include <algorithm>
#include <cmath>

#include "commands.h"
#include "moe/threading.h"
#include "moe/tokenizer.h"
#include "moe/trainer.h"

namespace moe::cli {

namespace {

struct EvalArgs {
  std::string model_dir;
  std::vector<std::string> data;
  int64_t seq_len = 0;  // 0: 128, or the model's longest when shorter
  int64_t batch = 16;
  int64_t max_windows = 256;
  int64_t val_every = 20;
  int threads = 0;
  std::string weights = "stored";
};

int run_eval(const EvalArgs& a) {
  set_num_threads(a.threads);
  std::unique_ptr<Model> model = load_model(a.model_dir, weights_as(a.weights));
  const int64_t longest = model->config().max_train_len();
  // The default window: 128 tokens, or the model's longest when it is shorter.
  const int64_t seq_len = a.seq_len == 0 ? std::min<int64_t>(128, longest) : a.seq_len;
  MOE_CHECK(seq_len >= 1 && seq_len <= longest, "eval",
            "--seq-len must be in [1, {}] for this model, got {}", longest, seq_len);
  const Corpus corpus = a.data.empty() ? load_fortunes() : load_text(a.data);
  // A model folder with a tokenizer file reads text through it; otherwise (this engine's
  // models) the text is bytes.
  const std::unique_ptr<Tokenizer> tokenizer = checkpoint_tokenizer(a.model_dir);
  TokenStream train, val;
  split_corpus(corpus, a.val_every, train, val, tokenizer.get());
  if (val.ids.size() <= static_cast<size_t>(seq_len + 1)) val = train;  // tiny corpora
  const WindowLoss r = window_loss(*model, val, seq_len, a.batch, a.max_windows);
  const double loss = r.loss;
  const int64_t windows = r.windows;
  fmt::print(
      "validation: {} windows of {} tokens\nloss {:.5f}  perplexity {:.4f}  bits per token "
      "{:.4f}\n",
      windows, seq_len, loss, std::exp(loss), loss / std::log(2.0));
  return 0;
}

}  // namespace

Run add_eval(CLI::App& app) {
  auto a = std::make_shared<EvalArgs>();
  auto* cmd = app.add_subcommand("eval", "validation loss and perplexity of a checkpoint");
  cmd->add_option("-m,--model", a->model_dir,
                  "checkpoint folder (or a training --out folder) or GGUF file")
      ->required();
  cmd->add_option("--data", a->data, "text files or folders (default: the fortunes)");
  cmd->add_option("--seq-len", a->seq_len,
                  "tokens per window (default: 128, or the model's longest when shorter)");
  cmd->add_option("--batch", a->batch, "windows per batch")->capture_default_str();
  cmd->add_option("--max-windows", a->max_windows, "windows evaluated at most")
      ->capture_default_str();
  cmd->add_option("-t,--threads", a->threads, "threads (0: all cores)")->capture_default_str();
  add_weights_option(cmd, a->weights);
  return [a] { return run_eval(*a); };
}

}  // namespace moe::cli
