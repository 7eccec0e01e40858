// libFuzzer target: tokenizer.json loading, then encoding and decoding a few texts with what
// loaded. Every input loads or is refused with moe::Error; a tokenizer that loads gives ids
// inside its vocabulary.
#include <cstdint>
#include <cstdlib>
#include <string>

#include "moe/error.h"
#include "tok/tok.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  std::unique_ptr<moe::Tokenizer> tok;
  try {
    tok = moe::tok::parse_hf_tokenizer(text, "fuzz/tokenizer.json");
  } catch (const moe::Error&) {
    return 0;
  }
  for (const char* s : {"Hello, world! 123", " \t\n  x", "héllo wörld ünïcödé 日本語 🙂",
                        "<s>special</s><|endoftext|>", "", "\xff\xfe bad utf-8 \xc3"}) {
    try {
      const std::vector<int32_t> ids = tok->encode(s);
      for (int32_t id : ids)
        if (id < 0 || id >= tok->vocab_size()) std::abort();  // an id outside the vocabulary
      (void)tok->decode(ids);
    } catch (const moe::Error&) {
    }
  }
  return 0;
}
