// tok/tok.h: the tokenizer loaders behind load_tokenizer (see moe/tokenizer.h).
#pragma once

#include <memory>
#include <string>

#include "moe/tokenizer.h"

namespace moe::tok {

// A HuggingFace tokenizers file (tokenizer.json) with a BPE model (bpe.cpp).
std::unique_ptr<Tokenizer> load_hf_tokenizer(const std::string& path);

// A SentencePiece model file (tokenizer.model), through libsentencepiece (sentencepiece.cpp).
std::unique_ptr<Tokenizer> load_sentencepiece(const std::string& path);

}  // namespace moe::tok
