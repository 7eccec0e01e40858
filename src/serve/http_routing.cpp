// `moe serve`'s routing endpoint and page: POST /v1/routing runs a text's tokens through the
// model once (a prompt-only request: no token is generated) and answers each position's experts
// and weights; GET / serves the page that draws them (src/serve/page.html, embedded at build
// time by cmake/embed.cmake).
#include <fmt/core.h>

#include "http_internal.h"
#include "moe/error.h"

namespace moe::embedded {
extern const unsigned char page_html[];
extern const size_t page_html_size;
}  // namespace moe::embedded

namespace moe::serve {

using namespace http_detail;

void HttpServer::Impl::page(httplib::Response& res) {
  res.set_content(reinterpret_cast<const char*>(embedded::page_html), embedded::page_html_size,
                  "text/html; charset=utf-8");
}

// {"text": "...", "model": optional} -> {"object": "routing", "model", "tokens": [text of each
// position], "routing": {"from": 0, "experts": [token][layer][k], "weights": [token][layer][k]},
// "usage": {"prompt_tokens"}}. The text is tokenized as a completion's prompt is (after the BOS).
void HttpServer::Impl::routing(const httplib::Request& req, httplib::Response& res) {
  const json j = parse_object(req.body);
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& k = it.key();
    if (k == "model") {
      if (!it->is_string() && !it->is_null())
        throw bad_request("'model' must be a string", "invalid_type");
    } else if (k == "text") {
      if (!it->is_string()) throw bad_request("'text' must be a string", "invalid_type");
      if (it->get_ref<const std::string&>().empty())
        throw bad_request("'text' must not be empty", "invalid_value");
    } else {
      throw bad_request(fmt::format("unknown field '{}'", k), "unknown_field");
    }
  }
  if (!j.contains("text")) throw bad_request("'text' is required", "missing_field");
  Request r;
  r.prompt = text_prompt(j["text"].get<std::string>());
  const auto T = static_cast<int64_t>(r.prompt.size());
  if (T > engine.ctx())
    throw bad_request(fmt::format("the text has {} tokens; the context holds {}", T, engine.ctx()),
                      "context_length_exceeded");
  r.max_tokens = 0;  // the prompt's pass alone
  r.routing = true;
  std::shared_ptr<Stream> stream = submit(r, res);
  if (!stream) return;
  // As a plain completion does: the body at the end, a space every half second until then.
  auto ids = std::make_shared<std::vector<int32_t>>(r.prompt);
  res.set_chunked_content_provider(
      "application/json",
      [this, stream, ids, T](size_t, httplib::DataSink& sink) {
        Clock::time_point last_write = Clock::now();
        Event ev;
        while (!stream->next(ev, std::chrono::milliseconds(100)))
          if (!keep_alive(sink, last_write, " ")) return false;
        std::string body;
        if (ev.finish == Finish::error) {
          body = error_body(ev.error, "server_error", "generation_failed");
        } else {
          body = dumps(json{{"object", "routing"},
                            {"model", opt.model_name},
                            {"tokens", token_texts(tok, *ids, 0, ids->size())},
                            {"routing", routing_json(ev, tok, nullptr)},
                            {"usage", {{"prompt_tokens", T}}}});
        }
        if (!sink.write(body.data(), body.size())) return false;
        sink.done();
        return true;
      },
      [stream](bool) { stream->cancel(); });
}

}  // namespace moe::serve
