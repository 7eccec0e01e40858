// tok/tok.h: the tokenizer loaders behind load_tokenizer (see moe/tokenizer.h).
#pragma once

#include <memory>
#include <string>

#include "moe/tokenizer.h"

namespace moe::tok {

// A HuggingFace tokenizers file (tokenizer.json) with a BPE model (bpe.cpp).
std::unique_ptr<Tokenizer> load_hf_tokenizer(const std::string& path);
// The same from the file's text (no tokenizer_config.json is looked for); `name` names it in
// errors.
std::unique_ptr<Tokenizer> parse_hf_tokenizer(const std::string& text, const std::string& name);

// A SentencePiece model file (tokenizer.model), through libsentencepiece (sentencepiece.cpp).
std::unique_ptr<Tokenizer> load_sentencepiece(const std::string& path);

}  // namespace moe::tok
