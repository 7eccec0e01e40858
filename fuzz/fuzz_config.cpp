// libFuzzer target: a checkpoint's config.json (this engine's, under "moe_cpp", or any
// supported HuggingFace architecture's) mapped to a model config. Every input gives a config
// that passes its own validation, or moe::Error.
#include <cstdint>
#include <string>

#include "moe/error.h"
#include "moe/trainer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  try {
    const moe::CheckpointInfo info = moe::parse_checkpoint_config(text, "fuzz/config.json");
    info.config.validate();  // what was accepted must be a valid config
  } catch (const moe::Error&) {
  }
  return 0;
}
