// tok/tok.h: the tokenizer loaders behind load_tokenizer (see moe/tokenizer.h).
#pragma once

#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "moe/tokenizer.h"

namespace moe {

struct GgufFile;

namespace tok {

// A HuggingFace tokenizers file (tokenizer.json) with a BPE model (bpe.cpp).
std::unique_ptr<Tokenizer> load_hf_tokenizer(const std::string& path);
// The same from the file's text (no tokenizer_config.json is looked for); `name` names it in
// errors.
std::unique_ptr<Tokenizer> parse_hf_tokenizer(const std::string& text, const std::string& name);

// A tokenizer.json with a BPE model given as its parts rather than as text (gguf_vocab.cpp builds
// them from a GGUF file's metadata): `doc` is the document without model.vocab and model.merges,
// `tokens[id]` the vocabulary, `merges` the merges (left, right) in rank order. Errors name `name`,
// and the vocabulary and the merges as `tokens_key` and `merges_key`.
struct BpeParts {
  nlohmann::json doc;
  std::vector<std::string> tokens;
  std::vector<std::pair<std::string, std::string>> merges;
  std::string tokens_key = "model.vocab", merges_key = "model.merges";
};
std::unique_ptr<Tokenizer> make_bpe_tokenizer(BpeParts parts, const std::string& name);

// A SentencePiece model file (tokenizer.model), through libsentencepiece (sentencepiece.cpp).
std::unique_ptr<Tokenizer> load_sentencepiece(const std::string& path);

// The tokenizer of a GGUF file's metadata, tokenizer.ggml.* (gguf_vocab.cpp).
std::unique_ptr<Tokenizer> gguf_tokenizer(const GgufFile& f);
// The tokenizer.ggml.pre names whose pre-tokenizer gguf_tokenizer knows, sorted.
std::vector<std::string> gguf_pre_tokenizer_names();
// The tokenizer.ggml.pre name of a byte-level BPE pre-tokenizer given as its split regexes, in
// order (a tokenizer.json's Split patterns), and whether words that are tokens skip the merges
// (tokenizer.json's ignore_merges): the first of llama.cpp's names for the same regexes; empty
// when none has them.
std::string gguf_pre_tokenizer_for(const std::vector<std::string>& regexes, bool ignore_merges);

}  // namespace tok

}  // namespace moe
