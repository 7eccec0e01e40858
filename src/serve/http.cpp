// `moe serve`'s HTTP side (see moe/serve_http.h): requests validated field by field, answered
// in OpenAI's shapes, errors as {"error": {"message", "type", "code"}}. The routing endpoint and
// page are in http_routing.cpp.
#include <fmt/core.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <algorithm>

#include "http_internal.h"
#include "moe/error.h"
#include "moe/tokenizer.h"

namespace moe::serve {

namespace http_detail {

std::string dumps(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

std::string error_body(const std::string& message, const std::string& type,
                       const std::string& code) {
  json e = {{"message", message}, {"type", type}, {"code", nullptr}};
  if (!code.empty()) e["code"] = code;
  return dumps(json{{"error", e}});
}

void send_error(httplib::Response& res, int status, const std::string& message,
                const std::string& type, const std::string& code) {
  res.status = status;
  res.set_content(error_body(message, type, code), "application/json");
}

json parse_object(const std::string& body) {
  json j;
  try {
    j = json::parse(body);
  } catch (const json::parse_error& e) {
    throw bad_request(fmt::format("the body is not valid JSON: {}", e.what()), "invalid_json");
  }
  if (!j.is_object()) throw bad_request("the body must be a JSON object", "invalid_json");
  return j;
}

bool keep_alive(httplib::DataSink& sink, Clock::time_point& last_write, const std::string& ping) {
  if (Clock::now() - last_write <= std::chrono::milliseconds(500)) return true;
  last_write = Clock::now();
  return sink.write(ping.data(), ping.size());
}

json token_texts(const Tokenizer& tok, const std::vector<int32_t>& ids, size_t from, size_t n) {
  json out = json::array();
  for (size_t i = from; i < from + n; ++i) out.push_back(tok.decode({ids.at(i)}));
  return out;
}

json routing_json(const Event& ev, const Tokenizer& tok, const std::vector<int32_t>* ids) {
  json experts = json::array(), weights = json::array();
  for (const TokenRouting& r : ev.routing) {
    experts.push_back(r.experts);
    json w = json::array();
    for (const auto& layer : r.weights) {
      json lw = json::array();
      for (float x : layer) lw.push_back(std::round(x * 1e4) / 1e4);
      w.push_back(lw);
    }
    weights.push_back(w);
  }
  json out = {{"from", ev.routed_from}};
  if (ids)
    out["tokens"] = token_texts(tok, *ids, static_cast<size_t>(ev.routed_from), ev.routing.size());
  out["experts"] = experts;
  out["weights"] = weights;
  return out;
}

}  // namespace http_detail

namespace {

using namespace http_detail;

// The fields a completion request may carry. Fields OpenAI defines that this server does not
// implement are accepted only at their neutral values, so a client never gets silently less
// than it asked for.
struct CompletionParams {
  bool chat = false;  // /v1/chat/completions: messages instead of a prompt
  nlohmann::ordered_json messages, tools;
  std::vector<int32_t> prompt_ids;
  std::string prompt_text;
  bool prompt_is_text = true;
  int64_t max_tokens = 16;
  SamplingConfig sampling;
  std::vector<std::string> stop;
  bool stream = false;
  bool include_usage = false;
  bool routing = false;
};

double number_field(const json& j, const char* name, double lo, double hi) {
  const json& v = j.at(name);
  if (!v.is_number()) throw bad_request(fmt::format("'{}' must be a number", name), "invalid_type");
  const double x = v.get<double>();
  if (!(x >= lo && x <= hi))
    throw bad_request(fmt::format("'{}' must be in [{}, {}], got {}", name, lo, hi, x),
                      "invalid_value");
  return x;
}

int64_t int_field(const json& j, const char* name, int64_t lo, int64_t hi) {
  const json& v = j.at(name);
  if (!v.is_number_integer() && !v.is_number_unsigned())
    throw bad_request(fmt::format("'{}' must be an integer", name), "invalid_type");
  const auto x = v.is_number_unsigned() ? static_cast<int64_t>(std::min<uint64_t>(
                                              v.get<uint64_t>(), static_cast<uint64_t>(INT64_MAX)))
                                        : v.get<int64_t>();
  if (x < lo || x > hi)
    throw bad_request(fmt::format("'{}' must be in [{}, {}], got {}", name, lo, hi, x),
                      "invalid_value");
  return x;
}

bool bool_field(const json& j, const char* name) {
  const json& v = j.at(name);
  if (!v.is_boolean())
    throw bad_request(fmt::format("'{}' must be a boolean", name), "invalid_type");
  return v.get<bool>();
}

// A chat message: a role and content (a string, null, or a list of {"type": "text", "text"}
// parts, joined); other keys (tool_calls, name, tool_call_id, reasoning_content) go to the
// template as they are.
nlohmann::ordered_json chat_message(const nlohmann::ordered_json& m, size_t i) {
  if (!m.is_object())
    throw bad_request(fmt::format("messages[{}] must be an object", i), "invalid_type");
  if (!m.contains("role") || !m["role"].is_string())
    throw bad_request(fmt::format("messages[{}] needs a string 'role'", i), "invalid_type");
  nlohmann::ordered_json out = m;
  if (m.contains("content") && m["content"].is_array()) {
    std::string text;
    for (const auto& part : m["content"]) {
      if (!part.is_object() || part.value("type", "") != "text" || !part.contains("text") ||
          !part["text"].is_string())
        throw bad_request(fmt::format("messages[{}]: only text content parts are supported", i),
                          "unsupported_value");
      text += part["text"].get<std::string>();
    }
    out["content"] = text;
  } else if (m.contains("content") && !m["content"].is_string() && !m["content"].is_null()) {
    throw bad_request(
        fmt::format("messages[{}].content must be a string, null or a list of parts", i),
        "invalid_type");
  } else if (!m.contains("content")) {
    out["content"] = nullptr;
  }
  return out;
}

CompletionParams parse_completion(const std::string& body, int64_t vocab, bool chat) {
  const json j = parse_object(body);
  CompletionParams p;
  p.chat = chat;
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& k = it.key();
    const nlohmann::ordered_json& v = it.value();
    if (k == "model" || k == "user") {
      if (!v.is_string() && !v.is_null())
        throw bad_request(fmt::format("'{}' must be a string", k), "invalid_type");
    } else if (chat && k == "messages") {
      if (!v.is_array() || v.empty())
        throw bad_request("'messages' must be a non-empty array", "invalid_type");
      p.messages = nlohmann::ordered_json::array();
      for (size_t i = 0; i < v.size(); ++i) p.messages.push_back(chat_message(v[i], i));
    } else if (chat && k == "tools") {
      if (!v.is_array() && !v.is_null())
        throw bad_request("'tools' must be an array", "invalid_type");
      p.tools = v;
    } else if (chat && (k == "tool_choice" || k == "parallel_tool_calls")) {
      // The tools reach the template; calling them is the client's reading of the text.
      if (k == "tool_choice" && !v.is_null() && !(v.is_string() && (v == "auto" || v == "none")))
        throw bad_request("'tool_choice' may only be \"auto\" or \"none\"", "unsupported_value");
    } else if (chat && k == "response_format") {
      if (!v.is_null() && !(v.is_object() && v.value("type", "") == "text" && v.size() == 1))
        throw bad_request("'response_format' may only be {\"type\": \"text\"}",
                          "unsupported_value");
    } else if (!chat && k == "prompt") {
      if (v.is_string()) {
        p.prompt_text = v.get<std::string>();
      } else if (v.is_array() && !v.empty() && v.front().is_number_integer()) {
        p.prompt_is_text = false;
        for (const json& id : v) {
          if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() >= vocab)
            throw bad_request(fmt::format("'prompt' token ids must be integers in [0, {})", vocab),
                              "invalid_value");
          p.prompt_ids.push_back(static_cast<int32_t>(id.get<int64_t>()));
        }
      } else if (v.is_array() && v.size() == 1 && v.front().is_string()) {
        p.prompt_text = v.front().get<std::string>();
      } else {
        throw bad_request("'prompt' must be a string, or an array of token ids (one prompt: n = 1)",
                          "invalid_type");
      }
    } else if (k == "max_tokens" || k == "max_completion_tokens") {
      if (!v.is_null()) p.max_tokens = int_field(j, k.c_str(), 1, INT32_MAX);
    } else if (k == "temperature") {
      if (!v.is_null()) p.sampling.temperature = number_field(j, "temperature", 0, 2);
    } else if (k == "top_p") {
      if (!v.is_null()) p.sampling.top_p = number_field(j, "top_p", 1e-9, 1);
    } else if (k == "top_k") {
      if (!v.is_null()) p.sampling.top_k = int_field(j, "top_k", 0, INT32_MAX);
    } else if (k == "seed") {
      if (!v.is_null())
        p.sampling.seed = static_cast<uint64_t>(int_field(j, "seed", INT64_MIN, INT64_MAX));
    } else if (k == "stop") {
      if (v.is_string()) {
        p.stop.push_back(v.get<std::string>());
      } else if (v.is_array() && v.size() <= 4) {
        for (const json& s : v) {
          if (!s.is_string()) throw bad_request("'stop' must hold strings", "invalid_type");
          p.stop.push_back(s.get<std::string>());
        }
      } else if (!v.is_null()) {
        throw bad_request("'stop' must be a string or an array of up to 4 strings", "invalid_type");
      }
      for (const std::string& s : p.stop)
        if (s.empty()) throw bad_request("'stop' strings must not be empty", "invalid_value");
    } else if (k == "stream") {
      if (!v.is_null()) p.stream = bool_field(j, "stream");
    } else if (k == "stream_options") {
      if (v.is_null()) continue;
      if (!v.is_object()) throw bad_request("'stream_options' must be an object", "invalid_type");
      for (auto o = v.begin(); o != v.end(); ++o) {
        if (o.key() != "include_usage")
          throw bad_request(fmt::format("unknown field 'stream_options.{}'", o.key()),
                            "unknown_field");
        p.include_usage = bool_field(v, "include_usage");
      }
    } else if (k == "n" || k == "best_of") {
      if (!v.is_null() && int_field(j, k.c_str(), 1, 1) != 1)
        throw bad_request(fmt::format("'{}' must be 1", k));
    } else if (k == "presence_penalty" || k == "frequency_penalty") {
      if (!v.is_null() && number_field(j, k.c_str(), -2, 2) != 0)
        throw bad_request(fmt::format("'{}' is not supported (only 0)", k), "unsupported_value");
    } else if (k == "logprobs" || k == "echo" || k == "logit_bias" || k == "suffix" ||
               k == "top_logprobs") {
      const bool neutral = v.is_null() || (v.is_boolean() && !v.get<bool>()) ||
                           (v.is_object() && v.empty()) ||
                           (v.is_string() && v.get<std::string>().empty());
      if (!neutral) throw bad_request(fmt::format("'{}' is not supported", k), "unsupported_value");
    } else if (k == "routing") {  // this server's extension: each token's experts
      if (!v.is_null()) p.routing = bool_field(j, "routing");
    } else {
      throw bad_request(fmt::format("unknown field '{}'", k), "unknown_field");
    }
  }
  if (!chat && !j.contains("prompt")) throw bad_request("'prompt' is required", "missing_field");
  if (chat && !j.contains("messages")) throw bad_request("'messages' is required", "missing_field");
  if (p.include_usage && !p.stream)
    throw bad_request("'stream_options' is only allowed with 'stream': true");
  return p;
}

int64_t now_s() {
  return std::chrono::duration_cast<std::chrono::seconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// Turns a stream's tokens into text, stopping at the request's stop strings: text() grows
// by whole UTF-8 characters, held back while it could still be the start of a stop string.
class TextStream {
 public:
  TextStream(const Tokenizer& tok, std::vector<std::string> stop)
      : tok_(tok), stop_(std::move(stop)) {}
  // Adds a token; returns the text that became final (may be empty). stopped() tells whether
  // a stop string was found (the text then ends before it).
  std::string add(int32_t id) {
    ids_.push_back(id);
    const std::string all = tok_.decode(ids_);
    const std::string whole = all.substr(0, complete_utf8_prefix(all));
    for (const std::string& s : stop_) {
      const size_t from = sent_ > s.size() ? sent_ - s.size() : 0;
      const size_t at = whole.find(s, from);
      if (at != std::string::npos) {
        stopped_ = true;
        return take(whole, std::max(at, sent_));
      }
    }
    // Hold back the longest tail that begins some stop string.
    size_t keep = whole.size();
    for (const std::string& s : stop_)
      for (size_t n = std::min(s.size() - 1, whole.size()); n > 0; --n)
        if (whole.compare(whole.size() - n, n, s, 0, n) == 0) {
          keep = std::min(keep, whole.size() - n);
          break;
        }
    return take(whole, std::max(keep, sent_));
  }
  // At the end: whatever was held back (no stop string came).
  std::string flush() {
    if (stopped_) return {};
    const std::string all = tok_.decode(ids_);
    return take(all, all.size());
  }
  bool stopped() const { return stopped_; }

 private:
  std::string take(const std::string& text, size_t upto) {
    std::string out = text.substr(sent_, upto - sent_);
    sent_ = upto;
    return out;
  }
  const Tokenizer& tok_;
  std::vector<std::string> stop_;
  std::vector<int32_t> ids_;
  size_t sent_ = 0;
  bool stopped_ = false;
};

}  // namespace

HttpServer::Impl::Impl(Engine& e, const Tokenizer& t, const HttpOptions& o)
    : engine(e), tok(t), opt(o) {
  if (auto eos = tok.eos_id()) stop_tokens.push_back(*eos);
  if (!opt.chat_template.source.empty()) {
    chat_source = opt.chat_template;
    chat_template =
        std::make_unique<jinja::Template>(chat_source.source);  // refuses what it cannot render
    const std::vector<int32_t> ids =
        chat_source.eos_token.empty() ? std::vector<int32_t>{} : tok.encode(chat_source.eos_token);
    if (ids.size() == 1 &&
        std::find(stop_tokens.begin(), stop_tokens.end(), ids[0]) == stop_tokens.end())
      stop_tokens.push_back(ids[0]);
  }
}

std::vector<int32_t> HttpServer::Impl::text_prompt(const std::string& text) const {
  std::vector<int32_t> ids = tok.encode(text);
  if (auto bos = tok.bos_id()) ids.insert(ids.begin(), *bos);
  return ids;
}

std::shared_ptr<Stream> HttpServer::Impl::submit(const Request& r, httplib::Response& res) {
  std::shared_ptr<Stream> stream = engine.submit(r);
  if (!stream) {
    res.set_header("Retry-After", "1");
    send_error(res, 503, "the server is busy: every slot is taken and the queue is full",
               "server_error", "overloaded");
  }
  return stream;
}

void HttpServer::Impl::routes() {
  const size_t threads = static_cast<size_t>(engine.parallel()) + 40;
  svr.new_task_queue = [threads] { return new httplib::ThreadPool(threads); };
  svr.set_payload_max_length(opt.max_body);
  svr.set_read_timeout(30, 0);
  svr.set_write_timeout(30, 0);
  svr.set_keep_alive_timeout(5);
  svr.set_pre_routing_handler([this](const httplib::Request& req, httplib::Response& res) {
    // /health and the page itself are open: the page asks for the key and sends it.
    if (opt.api_key.empty() || req.path == "/health" || req.path == "/")
      return httplib::Server::HandlerResponse::Unhandled;
    if (req.get_header_value("Authorization") != "Bearer " + opt.api_key) {
      send_error(res, 401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                 "authentication_error", "invalid_api_key");
      return httplib::Server::HandlerResponse::Handled;
    }
    return httplib::Server::HandlerResponse::Unhandled;
  });
  const httplib::Server::HandlerWithResponse on_error = [](const httplib::Request& req,
                                                           httplib::Response& res) {
    if (!res.body.empty()) return httplib::Server::HandlerResponse::Unhandled;
    const std::string msg = res.status == 404 ? fmt::format("no route {} {}", req.method, req.path)
                            : res.status == 413 ? std::string("the request body is too large")
                                                : fmt::format("HTTP {}", res.status);
    send_error(res, res.status, msg,
               res.status == 404 ? "not_found_error" : "invalid_request_error");
    return httplib::Server::HandlerResponse::Handled;
  };
  svr.set_error_handler(on_error);
  svr.set_exception_handler(
      [](const httplib::Request&, httplib::Response& res, std::exception_ptr ep) {
        std::string msg = "internal error";
        try {
          std::rethrow_exception(ep);
        } catch (const std::exception& e) {
          msg = e.what();
        } catch (...) {
        }
        send_error(res, 500, msg, "server_error");
      });
  svr.set_logger([this](const httplib::Request&, const httplib::Response& res) {
    std::lock_guard<std::mutex> lk(metrics_mu);
    ++responses[res.status];
  });
  svr.Get("/health", [](const httplib::Request&, httplib::Response& res) {
    res.set_content(R"({"status":"ok"})", "application/json");
  });
  svr.Get("/v1/models", [this](const httplib::Request&, httplib::Response& res) {
    // This server's extension `moe`: what a client needs to draw the routing.
    const RoutingShape& shape = engine.routing_shape();
    const json ext = {{"layers", shape.layers},
                      {"experts", shape.experts},
                      {"top_k", shape.top_k},
                      {"context", engine.ctx()},
                      {"chat_template", chat_template != nullptr}};
    const json m = {{"id", opt.model_name},
                    {"object", "model"},
                    {"created", now_s()},
                    {"owned_by", "moe.cpp"},
                    {"moe", ext}};
    res.set_content(dumps(json{{"object", "list"}, {"data", json::array({m})}}),
                    "application/json");
  });
  svr.Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
    res.set_content(metrics(), "text/plain; version=0.0.4");
  });
  // An API handler whose errors become OpenAI's error shape.
  const auto api = [](auto handler) {
    return [handler](const httplib::Request& req, httplib::Response& res) {
      try {
        handler(req, res);
      } catch (const ApiError& e) {
        send_error(res, e.status, e.what(), e.type, e.code);
      } catch (const Error& e) {
        send_error(res, 400, e.what(), "invalid_request_error");
      }
    };
  };
  for (const bool chat : {false, true})
    svr.Post(chat ? "/v1/chat/completions" : "/v1/completions",
             api([this, chat](const httplib::Request& req, httplib::Response& res) {
               completion(req, res, chat);
             }));
  svr.Post("/v1/routing",
           api([this](const httplib::Request& req, httplib::Response& res) { routing(req, res); }));
  svr.Get("/", [this](const httplib::Request&, httplib::Response& res) { page(res); });
}

void HttpServer::Impl::completion(const httplib::Request& req, httplib::Response& res, bool chat) {
  CompletionParams p = parse_completion(req.body, tok.vocab_size(), chat);
  Request r;
  if (chat) {
    // The checkpoint's template renders the conversation, as transformers' apply_chat_template
    // does; its text is tokenized without adding special tokens (the template writes them).
    if (!chat_template)
      throw ApiError(400, "invalid_request_error",
                     "this model has no chat template: use /v1/completions", "no_chat_template");
    const json ctx = {{"messages", p.messages},
                      {"add_generation_prompt", true},
                      {"bos_token", chat_source.bos_token},
                      {"eos_token", chat_source.eos_token},
                      {"tools", p.tools}};
    std::string text;
    try {
      text = chat_template->render(ctx);
    } catch (const Error& e) {
      throw bad_request(e.what(), "chat_template_error");
    }
    r.prompt = tok.encode(text);
  } else if (p.prompt_is_text) {
    r.prompt = text_prompt(p.prompt_text);
  } else {
    r.prompt = p.prompt_ids;
  }
  if (r.prompt.empty()) throw bad_request("the prompt encodes to no tokens", "invalid_value");
  const auto T = static_cast<int64_t>(r.prompt.size());
  if (T >= engine.ctx())
    throw bad_request(
        fmt::format("the prompt has {} tokens; the context holds {}", T, engine.ctx()),
        "context_length_exceeded");
  if (T + p.max_tokens > engine.ctx())
    throw bad_request(fmt::format("the prompt ({} tokens) plus max_tokens ({}) exceed the context "
                                  "of {} tokens",
                                  T, p.max_tokens, engine.ctx()),
                      "context_length_exceeded");
  r.max_tokens = p.max_tokens;
  r.sampling = p.sampling;
  r.routing = p.routing;
  r.stop_tokens = stop_tokens;
  std::shared_ptr<Stream> stream = submit(r, res);
  if (!stream) return;
  const std::string id = fmt::format("{}-{}", chat ? "chatcmpl" : "cmpl", next_id++);
  const char* object = chat ? "chat.completion" : "text_completion";
  const char* chunk_object = chat ? "chat.completion.chunk" : "text_completion";
  const int64_t created = now_s();
  auto text = std::make_shared<TextStream>(tok, p.stop);
  const std::string model = opt.model_name;
  // Both ways run in the provider, on the connection's thread: events become text as they come,
  // and a failed write (the client left) cancels the request, which frees its slot.
  struct State {
    std::vector<int32_t> ids;  // the prompt's, then each new token: the routing's token texts
    int64_t completion_tokens = 0;
    std::string text;
    std::string finish;
    json routing = json::array();
    Clock::time_point last_write = Clock::now();
    bool finished = false;
    bool role_sent = false;
  };
  auto st = std::make_shared<State>();
  st->ids = r.prompt;
  auto usage = [T, st] {
    return json{{"prompt_tokens", T},
                {"completion_tokens", st->completion_tokens},
                {"total_tokens", T + st->completion_tokens}};
  };
  // Reads the next event into the state; returns the text it made final.
  auto advance = [this, stream, text, st](bool& got) -> std::string {
    Event ev;
    got = stream->next(ev, std::chrono::milliseconds(100));
    if (!got) return {};
    std::string piece;
    if (!ev.routing.empty()) st->routing.push_back(routing_json(ev, tok, &st->ids));
    if (ev.token >= 0) {
      st->ids.push_back(ev.token);
      ++st->completion_tokens;
      piece = text->add(ev.token);
      if (text->stopped()) {
        st->finish = "stop";
        stream->cancel();
      }
    }
    if (ev.finish == Finish::error) throw Error(ev.error);
    if (ev.finish != Finish::none || text->stopped()) {
      if (st->finish.empty()) st->finish = ev.finish == Finish::stop ? "stop" : "length";
      if (!text->stopped()) piece += text->flush();
      st->finished = true;
    }
    return piece;
  };
  auto release = [stream](bool) { stream->cancel(); };
  if (!p.stream) {
    // The body is written at the end; until then a space every half second (JSON allows
    // leading whitespace) finds out whether the client is still there.
    res.set_chunked_content_provider(
        "application/json",
        [=](size_t, httplib::DataSink& sink) {
          while (!st->finished) {
            bool got = false;
            try {
              st->text += advance(got);
            } catch (const std::exception& e) {  // the engine failed this request
              const std::string body = error_body(e.what(), "server_error", "generation_failed");
              sink.write(body.data(), body.size());
              sink.done();
              return true;
            }
            if (!keep_alive(sink, st->last_write, " ")) return false;
          }
          json choice = {{"index", 0}};
          if (chat)
            choice["message"] = {{"role", "assistant"}, {"content", st->text}};
          else
            choice["text"] = st->text;
          choice["logprobs"] = nullptr;
          choice["finish_reason"] = st->finish;
          json out = {{"id", id},
                      {"object", object},
                      {"created", created},
                      {"model", model},
                      {"choices", json::array({choice})},
                      {"usage", usage()}};
          if (p.routing) out["routing"] = st->routing;
          const std::string body = dumps(out);
          if (!sink.write(body.data(), body.size())) return false;
          sink.done();
          return true;
        },
        release);
    return;
  }
  const bool include_usage = p.include_usage, with_routing = p.routing;
  res.set_chunked_content_provider(
      "text/event-stream",
      [=](size_t, httplib::DataSink& sink) {
        auto send = [&](const json& chunk) {
          const std::string s = "data: " + dumps(chunk) + "\n\n";
          return sink.write(s.data(), s.size());
        };
        while (!st->finished) {
          bool got = false;
          const size_t routed_before = st->routing.size();
          std::string piece;
          try {
            piece = advance(got);
          } catch (const std::exception& e) {  // the engine failed this request
            const std::string s =
                "data: " + error_body(e.what(), "server_error", "generation_failed") +
                "\n\ndata: [DONE]\n\n";
            sink.write(s.data(), s.size());
            sink.done();
            return true;
          }
          if (!got) {
            if (!keep_alive(sink, st->last_write, ": ping\n\n")) return false;
            continue;
          }
          json choice = {{"index", 0}};
          if (chat) {  // the first chunk names the role, as OpenAI's do
            choice["delta"] = json::object();
            if (!st->role_sent) choice["delta"]["role"] = "assistant";
            st->role_sent = true;
            if (!piece.empty() || !st->finished) choice["delta"]["content"] = piece;
          } else {
            choice["text"] = piece;
          }
          choice["logprobs"] = nullptr;
          choice["finish_reason"] = st->finished ? json(st->finish) : json(nullptr);
          json chunk = {{"id", id},
                        {"object", chunk_object},
                        {"created", created},
                        {"model", model},
                        {"choices", json::array({choice})}};
          if (with_routing && st->routing.size() > routed_before)
            chunk["routing"] = st->routing.back();
          if (!send(chunk)) return false;
          st->last_write = Clock::now();
        }
        if (include_usage) {
          json chunk = {{"id", id},       {"object", chunk_object},   {"created", created},
                        {"model", model}, {"choices", json::array()}, {"usage", usage()}};
          if (!send(chunk)) return false;
        }
        if (!sink.write("data: [DONE]\n\n", 14)) return false;
        sink.done();
        return true;
      },
      release);
}

std::string HttpServer::Impl::metrics() {
  const EngineStats s = engine.stats();
  std::string out;
  auto metric = [&](const char* name, const char* type, const char* help, double value) {
    out += fmt::format("# HELP {} {}\n# TYPE {} {}\n{} {}\n", name, help, name, type, name, value);
  };
  metric("moe_requests_total", "counter", "Generation requests accepted.",
         static_cast<double>(s.requests));
  metric("moe_requests_rejected_total", "counter", "Requests refused with 503 (queue full).",
         static_cast<double>(s.rejected));
  metric("moe_requests_cancelled_total", "counter",
         "Requests ended early by their clients (gone, or a stop string reached).",
         static_cast<double>(s.cancelled));
  metric("moe_requests_active", "gauge", "Requests in the decode batch.",
         static_cast<double>(s.active));
  metric("moe_queue_length", "gauge", "Requests waiting for a slot.",
         static_cast<double>(s.queued));
  metric("moe_prompt_tokens_total", "counter", "Prompt tokens run through the model.",
         static_cast<double>(s.prompt_tokens));
  metric("moe_generated_tokens_total", "counter", "Tokens generated.",
         static_cast<double>(s.generated_tokens));
  metric("moe_decode_steps_total", "counter", "Batched decode steps.",
         static_cast<double>(s.steps));
  metric("moe_busy_seconds_total", "counter", "Time spent computing.", s.busy_s);
  {
    // Tokens per second since the previous scrape (at least a second apart).
    std::lock_guard<std::mutex> lk(metrics_mu);
    const double t = std::chrono::duration<double>(Clock::now() - start).count();
    if (t - last_time >= 1) {
      last_rate = static_cast<double>(s.generated_tokens - last_generated) / (t - last_time);
      last_time = t;
      last_generated = s.generated_tokens;
    }
    metric("moe_tokens_per_second", "gauge",
           "Tokens generated per second between the last two scrapes.", last_rate);
    out +=
        "# HELP moe_http_responses_total HTTP responses by status.\n"
        "# TYPE moe_http_responses_total counter\n";
    for (const auto& [code, n] : responses)
      out += fmt::format("moe_http_responses_total{{code=\"{}\"}} {}\n", code, n);
  }
  out +=
      "# HELP moe_expert_tokens_total Tokens routed to each expert of each MoE layer.\n"
      "# TYPE moe_expert_tokens_total counter\n";
  for (size_t l = 0; l < s.expert_tokens.size(); ++l)
    for (size_t e = 0; e < s.expert_tokens[l].size(); ++e)
      out += fmt::format("moe_expert_tokens_total{{layer=\"{}\",expert=\"{}\"}} {}\n", l, e,
                         s.expert_tokens[l][e]);
  return out;
}

HttpServer::HttpServer(Engine& engine, const Tokenizer& tokenizer, const HttpOptions& opt)
    : impl_(std::make_unique<Impl>(engine, tokenizer, opt)) {
  impl_->routes();
}

HttpServer::~HttpServer() { stop(); }

namespace {

// cpp-httplib (Debian's 0.11, compiled into its own library) listens with a backlog of 5
// connections; beyond those, a burst of clients is dropped or, with SYN cookies, reset (200
// clients at once were, in the tests, on a loaded machine). Listening again on the same socket
// sets a longer backlog (POSIX allows it; Linux caps it at net.core.somaxconn): the server's
// socket is the one of this process that listens on `port`.
void widen_backlog(int port, int backlog) {
  for (int fd = 0; fd < 1024; ++fd) {
    int listening = 0;
    socklen_t len = sizeof(listening);
    if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &len) != 0 || !listening) continue;
    sockaddr_storage addr{};
    socklen_t alen = sizeof(addr);
    if (getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &alen) != 0) continue;
    int bound = -1;
    if (addr.ss_family == AF_INET) bound = ntohs(reinterpret_cast<sockaddr_in*>(&addr)->sin_port);
    if (addr.ss_family == AF_INET6)
      bound = ntohs(reinterpret_cast<sockaddr_in6*>(&addr)->sin6_port);
    if (bound == port) ::listen(fd, backlog);
  }
}

}  // namespace

int HttpServer::bind() {
  const HttpOptions& o = impl_->opt;
  MOE_CHECK(o.port >= 0 && o.port <= 65535, "serve", "--port must be in [0, 65535], got {}",
            o.port);
  if (o.port == 0) {
    impl_->port = impl_->svr.bind_to_any_port(o.host);
  } else {
    impl_->port = impl_->svr.bind_to_port(o.host, o.port) ? o.port : -1;
  }
  MOE_CHECK(impl_->port > 0, "serve", "cannot listen on {}:{} (in use, or not an address here)",
            o.host, o.port);
  widen_backlog(impl_->port, 1024);
  return impl_->port;
}

void HttpServer::serve() { impl_->svr.listen_after_bind(); }

void HttpServer::stop() {
  if (impl_->svr.is_running()) impl_->svr.stop();
}

int HttpServer::port() const { return impl_->port; }

}  // namespace moe::serve
