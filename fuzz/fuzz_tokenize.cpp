// libFuzzer target: arbitrary text (any bytes) through the test fixtures' tokenizer.json files
// (byte-level BPE, and Metaspace BPE with byte fallback): encoding never fails on any input, its
// ids are inside the vocabulary, and decoding them never fails. The byte-level tokenizer gives
// valid UTF-8 back exactly.
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "moe/error.h"
#include "tok/tok.h"

namespace {

std::vector<std::unique_ptr<moe::Tokenizer>>& tokenizers() {
  static std::vector<std::unique_ptr<moe::Tokenizer>> t = [] {
    std::vector<std::unique_ptr<moe::Tokenizer>> v;
    for (const char* name : {"bytelevel_bpe", "metaspace_bpe"})
      v.push_back(moe::tok::load_hf_tokenizer(std::string(MOE_FUZZ_FIXTURES) + "/tokenizers/" +
                                              name + "/tokenizer.json"));
    return v;
  }();
  return t;
}

// Whether s is valid UTF-8 (the only text HuggingFace tokenizers take; other bytes are encoded
// too, but need not come back as they were).
bool valid_utf8(const std::string& s) {
  size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    const size_t n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    if (n == 0 || i + n > s.size()) return false;
    uint32_t cp = n == 1 ? c : c & (0x7f >> n);
    for (size_t k = 1; k < n; ++k) {
      const auto d = static_cast<unsigned char>(s[i + k]);
      if ((d >> 6) != 2) return false;
      cp = (cp << 6) | (d & 0x3f);
    }
    const uint32_t min[5] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < min[n] || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return false;
    i += n;
  }
  return true;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  bool first = true;
  for (auto& tok : tokenizers()) {
    const std::vector<int32_t> ids = tok->encode(text);
    for (int32_t id : ids)
      if (id < 0 || id >= tok->vocab_size()) std::abort();  // an id outside the vocabulary
    const std::string back = tok->decode(ids);
    if (first && valid_utf8(text) && back != text) std::abort();  // byte-level BPE loses nothing
    first = false;
  }
  return 0;
}
