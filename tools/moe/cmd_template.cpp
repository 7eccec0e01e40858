// `moe template`: render a chat template, the checkpoint's or a file's, as `moe serve` renders
// it for /v1/chat/completions (and as transformers' apply_chat_template does).
#include <fmt/core.h>

#include <cstdio>
#include <fstream>
#include <sstream>

#include "commands.h"
#include "moe/chat_template.h"
#include "moe/error.h"
#include "moe/jinja.h"

namespace moe::cli {

namespace {

struct TemplateArgs {
  std::string model, file, messages, context;
  bool no_generation_prompt = false;
};

std::string read_text(const std::string& path, const char* what) {
  std::ifstream f(path, std::ios::binary);
  MOE_CHECK(f.good(), "template", "cannot read {} {}", what, path);
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

jinja::Json read_json(const std::string& path, const char* what) {
  try {
    return jinja::Json::parse(read_text(path, what));
  } catch (const jinja::Json::parse_error& e) {
    throw Error(fmt::format("template: {} {} is not valid JSON: {}", what, path, e.what()));
  }
}

int run_template(const TemplateArgs& a) {
  MOE_CHECK(a.model.empty() != a.file.empty(), "template",
            "give exactly one of -m MODEL and --template FILE");
  MOE_CHECK(a.messages.empty() != a.context.empty(), "template",
            "give exactly one of --messages FILE.json and --context FILE.json");
  serve::ChatTemplateSource src;
  if (!a.model.empty()) {
    src = serve::find_chat_template(a.model);
  } else {
    src.source = read_text(a.file, "the template");
  }
  const jinja::Template tpl(src.source);
  jinja::Json ctx;
  if (!a.context.empty()) {
    ctx = read_json(a.context, "the context");
    MOE_CHECK(ctx.is_object(), "template", "the context must be a JSON object");
  } else {
    ctx = {{"messages", read_json(a.messages, "the messages")},
           {"add_generation_prompt", !a.no_generation_prompt},
           {"bos_token", src.bos_token},
           {"eos_token", src.eos_token},
           {"tools", nullptr}};
  }
  const std::string out = tpl.render(ctx);
  std::fwrite(out.data(), 1, out.size(), stdout);
  return 0;
}

}  // namespace

Run add_template(CLI::App& app) {
  auto a = std::make_shared<TemplateArgs>();
  auto* cmd = app.add_subcommand(
      "template",
      "render a chat template (the checkpoint's, from tokenizer_config.json, chat_template.jinja "
      "or the GGUF file, or a file's) with a list of messages, as moe serve renders "
      "/v1/chat/completions prompts; prints the text");
  cmd->add_option("-m,--model", a->model, "checkpoint folder or GGUF file whose template to use");
  cmd->add_option("--template", a->file, "a Jinja template file instead");
  cmd->add_option("--messages", a->messages,
                  "JSON file: a list of {\"role\", \"content\"} messages (with the checkpoint's "
                  "bos_token and eos_token, and add_generation_prompt unless "
                  "--no-generation-prompt)");
  cmd->add_option("--context", a->context, "JSON file: every variable of the template, as given");
  cmd->add_flag("--no-generation-prompt", a->no_generation_prompt,
                "do not open the assistant's turn at the end");
  return [a] { return run_template(*a); };
}

}  // namespace moe::cli
