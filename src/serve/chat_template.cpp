// Where a checkpoint keeps its chat template (see moe/chat_template.h).
#include "moe/chat_template.h"

#include <fmt/core.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "moe/error.h"
#include "moe/gguf.h"

namespace moe::serve {

namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

std::string read_file(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  MOE_CHECK(f.good(), "chat template", "cannot read {}", p.string());
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// tokenizer_config.json writes a special token as a string or as {"content": ...}.
std::string token_text(const json& j) {
  if (j.is_string()) return j.get<std::string>();
  if (j.is_object() && j.contains("content") && j["content"].is_string())
    return j["content"].get<std::string>();
  return "";
}

ChatTemplateSource from_gguf(const std::string& path) {
  const GgufFile f = load_gguf(path);
  ChatTemplateSource out;
  MOE_CHECK(f.has("tokenizer.chat_template"), "chat template", "{} has no tokenizer.chat_template",
            path);
  out.source = f.get_string("tokenizer.chat_template");
  out.origin = path + " (tokenizer.chat_template)";
  if (f.has("tokenizer.ggml.tokens")) {
    const std::vector<std::string> tokens = f.get_array_strings("tokenizer.ggml.tokens");
    auto text = [&](const char* key) -> std::string {
      if (!f.has(key)) return "";
      const uint64_t id = f.get_u64(key);
      return id < tokens.size() ? tokens[id] : "";
    };
    out.bos_token = text("tokenizer.ggml.bos_token_id");
    out.eos_token = text("tokenizer.ggml.eos_token_id");
  }
  return out;
}

}  // namespace

ChatTemplateSource find_chat_template(const std::string& model_path) {
  const fs::path p(model_path);
  if (fs::is_regular_file(p)) return from_gguf(model_path);
  ChatTemplateSource out;
  json cfg;
  const fs::path tc = p / "tokenizer_config.json";
  if (fs::exists(tc)) {
    try {
      cfg = json::parse(read_file(tc));
    } catch (const json::parse_error& e) {
      throw Error(fmt::format("chat template: {} is not valid JSON: {}", tc.string(), e.what()));
    }
    if (cfg.contains("bos_token")) out.bos_token = token_text(cfg["bos_token"]);
    if (cfg.contains("eos_token")) out.eos_token = token_text(cfg["eos_token"]);
  }
  if (fs::exists(p / "chat_template.jinja")) {
    out.source = read_file(p / "chat_template.jinja");
    out.origin = (p / "chat_template.jinja").string();
    return out;
  }
  if (cfg.is_object() && cfg.contains("chat_template")) {
    const json& t = cfg["chat_template"];
    if (t.is_string()) {
      out.source = t.get<std::string>();
    } else if (t.is_array()) {  // named templates: the "default" one, else the first
      for (const json& e : t)
        if (e.is_object() && e.value("name", "") == "default" && e.contains("template") &&
            e["template"].is_string())
          out.source = e["template"].get<std::string>();
      if (out.source.empty() && !t.empty() && t[0].is_object() && t[0].contains("template") &&
          t[0]["template"].is_string())
        out.source = t[0]["template"].get<std::string>();
    }
    out.origin = tc.string() + " (chat_template)";
  }
  MOE_CHECK(!out.source.empty(), "chat template",
            "{} has no chat template (neither chat_template.jinja nor a chat_template in "
            "tokenizer_config.json)",
            model_path);
  return out;
}

}  // namespace moe::serve
