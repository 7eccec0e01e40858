// moe/chat_template.h: where a checkpoint keeps its chat template (moe/jinja.h renders it).
#pragma once

#include <string>

namespace moe::serve {

struct ChatTemplateSource {
  std::string source;                // the Jinja text
  std::string bos_token, eos_token;  // the tokens' text, as templates name them
  std::string origin;                // the file it came from
};

// A HuggingFace folder's chat_template.jinja, or its tokenizer_config.json's chat_template (the
// "default" one of a list), with that file's bos_token and eos_token; a GGUF file's
// tokenizer.chat_template. Throws moe::Error when the checkpoint has none.
ChatTemplateSource find_chat_template(const std::string& model_path);

}  // namespace moe::serve
