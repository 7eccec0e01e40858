// moe/jinja.h: chat templates. The Jinja2 subset that checkpoints' chat templates use (the
// tokenizer_config.json `chat_template`, a GGUF file's tokenizer.chat_template), rendered as
// transformers renders them: Python's jinja2 with trim_blocks, lstrip_blocks and loop controls,
// its own tojson and the globals raise_exception and strftime_now. Written here because no
// Debian package renders Jinja from C++; docs/serve.md lists what is supported, and a template
// using anything else is refused when it is read, naming the construct and its line.
#pragma once

#include <memory>
#include <nlohmann/json.hpp>
#include <string>

namespace moe::jinja {

using Json = nlohmann::ordered_json;

class Template {
 public:
  // Parses the template; throws moe::Error on a syntax error or an unsupported construct.
  explicit Template(const std::string& source);
  ~Template();
  Template(Template&&) noexcept;
  Template& operator=(Template&&) noexcept;
  // Renders with the context's keys as variables (JSON objects become dicts that keep their
  // key order, as Python's do). Throws moe::Error on a runtime error, or with the template's
  // own message when it calls raise_exception.
  std::string render(const Json& context) const;

  struct Node;

 private:
  std::shared_ptr<const Node> root_;
};

}  // namespace moe::jinja
