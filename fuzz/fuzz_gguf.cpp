// libFuzzer target: the GGUF reader on arbitrary bytes. Every input either loads, and then every
// key reads back through the typed getters, the first and last row of every tensor dequantizes,
// the model config is read from the metadata (checked against the tensors' sizes) and the
// tokenizer is built from it, or is refused with moe::Error; anything else (a crash, a sanitizer
// report, another exception) is a finding.
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "moe/error.h"
#include "moe/gguf.h"
#include "moe/gguf_model.h"
#include "moe/tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::shared_ptr<char[]> bytes(new char[size + 1]);
  if (size > 0) std::memcpy(bytes.get(), data, size);
  try {
    const moe::GgufFile f = moe::parse_gguf(bytes.get(), size, bytes, "fuzz");
    double sum = 0;
    for (const std::string& key : f.key_order) {  // each getter either answers or throws Error
      try {
        sum += static_cast<double>(f.get_u32(key));
      } catch (const moe::Error&) {
      }
      try {
        sum += f.get_f32(key);
      } catch (const moe::Error&) {
      }
      try {
        sum += static_cast<double>(f.get_array_strings(key).size());
      } catch (const moe::Error&) {
      }
      try {
        sum += static_cast<double>(f.get_array_ints(key).size());
      } catch (const moe::Error&) {
      }
    }
    std::vector<float> row;
    for (const moe::GgufTensor& t : f.tensors) {
      row.resize(static_cast<size_t>(t.ne[0]));
      t.dequantize_rows(0, 1, row.data());
      t.dequantize_rows(t.rows() - 1, 1, row.data());
      sum += row.back();
    }
    try {
      sum += static_cast<double>(moe::config_from_gguf(f).n_layers);
    } catch (const moe::Error&) {
    }
    try {
      const auto tok = moe::gguf_tokenizer(f);
      sum += static_cast<double>(tok->encode("Hello, world 123").size());
    } catch (const moe::Error&) {
    }
    volatile double sink = sum;
    (void)sink;
  } catch (const moe::Error&) {
  }
  return 0;
}
