// libFuzzer target: the safetensors reader on arbitrary bytes. Every input either loads, and then
// every tensor reads back as the dtype says (conversions included), or is refused with
// moe::Error; anything else (a crash, a sanitizer report, another exception) is a finding.
#include <cstdint>
#include <cstring>
#include <memory>

#include "moe/error.h"
#include "moe/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::shared_ptr<char[]> bytes(new char[size + 1]);
  if (size > 0) std::memcpy(bytes.get(), data, size);
  try {
    const moe::SafetensorsFile f = moe::parse_safetensors(bytes.get(), size, bytes, "fuzz");
    double sum = 0;
    for (const auto& [name, t] : f.stored) {
      const moe::Tensor& x = f.at(name);
      if (x.dtype() == moe::DType::F32 && x.numel() > 0) sum += x.data<float>()[x.numel() - 1];
      f.drop(name);
    }
    volatile double sink = sum;
    (void)sink;
  } catch (const moe::Error&) {
  }
  return 0;
}
