// moe/data.h: text corpora, the byte-level tokenizer of the project's own models, and batches.
//
// A corpus is a list of documents, each tagged with a language (so that routing by language can
// be measured). The default corpus is the fortune cookies of Debian's fortunes packages in five
// languages; --data takes any text files or folders.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "moe/rng.h"
#include "moe/tensor.h"

namespace moe {

class Tokenizer;

struct Document {
  std::string text;
  int32_t lang = 0;  // index into Corpus::languages
};

struct Corpus {
  std::vector<std::string> languages;
  std::vector<Document> docs;
  int64_t bytes() const;
};

// The fortunes under root (Debian: /usr/share/games/fortunes): regular files at the top level
// are English, the folders de, es, it, ru their languages; folders named off are skipped, as are
// links (duplicates of files in the language folders) and the .dat index files. Each fortune
// (text between lines holding a single %) is a document.
Corpus load_fortunes(const std::string& root = "/usr/share/games/fortunes");

// Text files, or folders searched recursively for files; each file is one document, tagged with
// the name of the folder given on the command line (or "text" for single files).
Corpus load_text(const std::vector<std::string>& paths);

// Byte-level tokenizer: the UTF-8 bytes of the text (ids 0..255) and a few special tokens.
struct ByteTokenizer {
  static constexpr int32_t kBos = 256;  // start of a document
  static constexpr int32_t kEos = 257;  // end of a document
  static constexpr int32_t kPad = 258;
  static constexpr int64_t kVocabSize = 259;
  static std::vector<int32_t> encode(const std::string& text);
  // Bytes back to text; special tokens are dropped, invalid UTF-8 is passed through as is.
  static std::string decode(const std::vector<int32_t>& ids);
};

// A tokenized split: one stream of ids with the language of every position. Documents are
// written as <bos> bytes <eos>.
struct TokenStream {
  std::vector<int32_t> ids;
  std::vector<int32_t> lang;
  void append(const Document& doc);
  // With a model's own tokenizer: its ids, between its bos and eos when it has them.
  void append(const Document& doc, const Tokenizer& tok);
};

// Splits the documents: every `val_every`-th document (by index) goes to validation.
void split_corpus(const Corpus& corpus, int64_t val_every, TokenStream& train, TokenStream& val,
                  const Tokenizer* tok = nullptr);

// Batches of B windows of T+1 consecutive tokens at positions drawn from a seeded stream; the
// state (the draws so far) is one Rng, saved and restored with checkpoints.
class BatchSampler {
 public:
  BatchSampler(const TokenStream& stream, int64_t batch, int64_t seq_len, uint64_t seed);
  // tokens i32 [B, T+1]; langs (optional) i32 [B, T+1] the language of every token.
  void next(Tensor& tokens, Tensor* langs = nullptr);
  Rng& rng() { return rng_; }

 private:
  const TokenStream& stream_;
  int64_t batch_, seq_len_;
  Rng rng_;
};

}  // namespace moe
