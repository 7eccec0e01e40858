// libFuzzer target: arbitrary bytes as a chat template (what a checkpoint's tokenizer_config.json
// or a GGUF file's tokenizer.chat_template holds), read and rendered over a conversation with a
// system prompt, tool definitions, a tool call and its result. Reading either accepts the
// template or refuses it with moe::Error; rendering either gives text within the engine's output
// bound or fails with moe::Error (the template's own raise_exception included). Anything else
// (another exception, a crash, a sanitizer report, a hang past libFuzzer's timeout) is a finding.
#include <cstdint>
#include <cstdlib>
#include <string>

#include "moe/error.h"
#include "moe/jinja.h"

namespace {

const moe::jinja::Json& context() {
  static const moe::jinja::Json c = moe::jinja::Json::parse(R"({
    "messages": [
      {"role": "system", "content": "You are terse."},
      {"role": "user", "content": "Weather in Paris? Réponds en français."},
      {"role": "assistant", "content": null, "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
      {"role": "tool", "content": "18 C, sunny"},
      {"role": "assistant", "content": "<think>\nEasy.\n</think>\n\nIl fait 18 C."},
      {"role": "user", "content": "Merci"}],
    "tools": [{"type": "function", "function": {"name": "get_weather",
      "description": "Weather of a city", "parameters": {"type": "object",
      "properties": {"city": {"type": "string"}}, "required": ["city"]}}}],
    "add_generation_prompt": true, "bos_token": "<s>", "eos_token": "</s>"
  })");
  return c;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string source(reinterpret_cast<const char*>(data), size);
  try {
    const moe::jinja::Template t(source);
    const std::string out = t.render(context());
    if (out.size() > (size_t{64} << 20)) std::abort();  // past the engine's output bound
  } catch (const moe::Error&) {
    // refused or failed with a message: what bad input should get
  }
  return 0;
}
