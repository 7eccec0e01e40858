// moe/tokenizer.h: text to token ids and back, for the checkpoints people have.
//
// - HuggingFace tokenizer.json: byte-level BPE with its pre-tokenizer split regexes (Qwen,
//   DeepSeek, OLMoE, gpt-oss; run with PCRE2, which knows the Unicode classes \p{L}, \p{N}, ...)
//   and metaspace BPE with byte fallback (Llama 2, Mistral, Mixtral); added/special tokens
//   written in the text are matched as such; normalizers NFC and the metaspace replacement.
// - SentencePiece tokenizer.model, through libsentencepiece.
// - A GGUF file's vocabulary (tokenizer.ggml.*, llama.cpp's "gpt2" byte-level BPE with its named
//   pre-tokenizer, and its "llama" SentencePiece-style vocabulary), as llama.cpp tokenizes it.
// - The project's own byte tokenizer (UTF-8 bytes plus <bos>, <eos>, <pad>).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace moe {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  // Ids of `text`, without adding special tokens (special tokens written in the text are
  // recognized).
  virtual std::vector<int32_t> encode(const std::string& text) const = 0;
  // Text of `ids` (special tokens included as their text, as transformers' decode does with
  // skip_special_tokens=False). Throws moe::Error on an id outside the vocabulary.
  virtual std::string decode(const std::vector<int32_t>& ids) const = 0;
  virtual int64_t vocab_size() const = 0;
  virtual std::optional<int32_t> bos_id() const { return std::nullopt; }
  virtual std::optional<int32_t> eos_id() const { return std::nullopt; }
  // The chat template (Jinja) the tokenizer's file carries, for a server to render: a GGUF
  // file's tokenizer.chat_template.
  virtual std::optional<std::string> chat_template() const { return std::nullopt; }
};

struct GgufFile;

// From a file (tokenizer.json, tokenizer.model, or a GGUF model file: named *.gguf or starting
// with "GGUF") or a folder holding tokenizer.json or tokenizer.model; a folder of this engine's
// checkpoint without either gives the byte tokenizer. Every malformed file gets a clear
// moe::Error.
std::unique_ptr<Tokenizer> load_tokenizer(const std::string& path);

// The tokenizer a GGUF file's metadata describes (docs/gguf.md); a missing or malformed
// tokenizer.ggml.* entry gets a moe::Error that names the key.
std::unique_ptr<Tokenizer> gguf_tokenizer(const GgufFile& file);

// The project's own byte-level tokenizer behind the same interface.
std::unique_ptr<Tokenizer> make_byte_tokenizer();

// Length of the longest prefix of s that ends on a whole UTF-8 character: the text to show of
// tokens decoded so far, while a character's bytes are still coming in later tokens.
size_t complete_utf8_prefix(const std::string& s);

}  // namespace moe
