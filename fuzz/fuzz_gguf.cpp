// libFuzzer target: the GGUF reader on arbitrary bytes. Every input either loads, and then every
// key reads back through the typed getters and the first and last row of every tensor
// dequantizes, or is refused with moe::Error; anything else (a crash, a sanitizer report, another
// exception) is a finding.
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "moe/error.h"
#include "moe/gguf.h"

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
    volatile double sink = sum;
    (void)sink;
  } catch (const moe::Error&) {
  }
  return 0;
}
