// Models written as GGUF files (moe/gguf_write.h). Two sources:
// - a GGUF file: requantized as llama-quantize does it (its metadata kept, general.file_type and
//   general.quantization_version set; every tensor converted to the type of the recipe through
//   float32, or its bytes copied when the type stays);
// - a checkpoint folder: the model in float32 (load_model), its config written as llama.cpp's
//   metadata keys of the architecture (the inverse of gguf_model.cpp's mapping), its parameters
//   under llama.cpp's tensor names (gguf_tensor_name) with Mixtral's q/k rows permuted as
//   llama.cpp's converter permutes them, its tokenizer.json as tokenizer.ggml.* (as the
//   converter's get_vocab_base and gguf-py's SpecialVocab write them).
// The file is written tensor by tensor through a temporary file renamed when complete, then read
// back (load_gguf's checks; for a folder, the config the file gives against the model's).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <optional>

#include "moe/error.h"
#include "moe/gguf_model.h"
#include "moe/gguf_write.h"
#include "moe/safetensors.h"
#include "moe/trainer.h"
#include "tok/tok.h"

namespace moe {

namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using Meta = std::vector<std::pair<std::string, GgufValue>>;
const char* const kWhere = "gguf";

// One tensor of the source: its description, and either its stored bytes (of desc.type) or a
// function giving its values as float32 (rows of ne[0], contiguous).
struct Source {
  GgufTensorDesc desc;
  const char* raw = nullptr;
  std::function<Tensor()> values;
  int64_t rows() const {
    int64_t r = 1;
    for (size_t d = 1; d < desc.ne.size(); ++d) r *= desc.ne[d];
    return r;
  }
};

// A key's value set in place, or appended; with `move_last` (as ggml's gguf_set_val_* does)
// removed first, so that it comes last.
void set_value(Meta& meta, const std::string& key, GgufValue v, bool move_last) {
  for (auto it = meta.begin(); it != meta.end(); ++it)
    if (it->first == key) {
      if (!move_last) {
        it->second = std::move(v);
        return;
      }
      meta.erase(it);
      break;
    }
  meta.emplace_back(key, std::move(v));
}

// llama.cpp's order of a model's tensors (llama_model_loader's weight_name_comparer): by layer,
// the tensors outside the layers first, then by name.
void sort_tensors(std::vector<Source>& sources) {
  const auto layer = [](const std::string& n) {
    int l = -1;
    if (std::sscanf(n.c_str(), "blk.%d.", &l) != 1) l = -1;
    return l;
  };
  std::stable_sort(sources.begin(), sources.end(), [&](const Source& a, const Source& b) {
    const int la = layer(a.desc.name), lb = layer(b.desc.name);
    if (la != lb) return la < lb;
    return a.desc.name < b.desc.name;
  });
}

// ---------------------------------------------------------------------------------------------
// The tokenizer: tokenizer.json (byte-level BPE) as tokenizer.ggml.*.

std::optional<json> read_json(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  if (!f.good()) return std::nullopt;
  try {
    return json::parse(f);
  } catch (const json::exception& e) {
    throw_error(kWhere, fmt::format("{}: {}", p.string(), e.what()));
  }
}

// The converter's does_token_look_special: added tokens that are control tokens whatever their
// `special` flag says.
bool looks_special(const std::string& t) {
  const auto starts = [&](const std::string& a) { return t.rfind(a, 0) == 0; };
  const auto ends = [&](const std::string& b) {
    return t.size() >= b.size() && t.compare(t.size() - b.size(), b.size(), b) == 0;
  };
  return t == "<pad>" || t == "<mask>" || t == "<2mass>" || t == "[@BOS@]" ||
         (starts("<|") && ends("|>")) || (starts("<\uff5c") && ends("\uff5c>")) ||
         (starts("<unused") && ends(">"));
}

// The split regexes of a byte-level pre-tokenizer (Split steps then ByteLevel without its own
// regex), or {"gpt-2"} for a lone ByteLevel with GPT-2's regex; refuses other pre-tokenizers.
void collect_splits(const json& pt, std::vector<std::string>& regexes, bool& byte_level,
                    bool& gpt2_regex, const std::string& file) {
  const std::string type = pt.value("type", "");
  if (type == "Sequence") {
    for (const json& step : pt.at("pretokenizers"))
      collect_splits(step, regexes, byte_level, gpt2_regex, file);
  } else if (type == "Split") {
    MOE_CHECK(pt.contains("pattern") && pt["pattern"].contains("Regex"), kWhere,
              "{}: a Split pre-tokenizer without a Regex pattern cannot be written as a "
              "tokenizer.ggml.pre name",
              file);
    regexes.push_back(pt["pattern"]["Regex"].get<std::string>());
  } else if (type == "ByteLevel") {
    byte_level = true;
    gpt2_regex = gpt2_regex || pt.value("use_regex", true);
  } else {
    throw_error(kWhere, fmt::format("{}: pre-tokenizer '{}' is not supported (byte-level BPE "
                                    "with Split regexes and ByteLevel is)",
                                    file, type));
  }
}

// A special token of tokenizer_config.json (a string or {"content": ...}).
std::optional<std::string> config_token(const json& tc, const char* key) {
  if (!tc.contains(key) || tc[key].is_null()) return std::nullopt;
  if (tc[key].is_string()) return tc[key].get<std::string>();
  if (tc[key].is_object() && tc[key].contains("content"))
    return tc[key]["content"].get<std::string>();
  return std::nullopt;
}

void add_tokenizer(Meta& meta, const fs::path& dir, int64_t vocab_size,
                   std::vector<std::string>& notes) {
  const fs::path path = dir / "tokenizer.json";
  const std::optional<json> tj = read_json(path);
  if (!tj) {
    notes.push_back(
        fmt::format("{} has no tokenizer.json: the file has no vocabulary "
                    "(tokenizer.ggml.*), which llama.cpp needs",
                    dir.string()));
    return;
  }
  const std::string file = path.string();
  const json& model = tj->at("model");
  MOE_CHECK(model.value("type", "") == "BPE" && tj->contains("pre_tokenizer") &&
                !(*tj)["pre_tokenizer"].is_null(),
            kWhere,
            "{}: only byte-level BPE tokenizers can be written as GGUF vocabularies yet (this "
            "one: model {}, pre-tokenizer {}); SentencePiece-style ones (Llama 2, Mistral, "
            "Mixtral: llama.cpp's \"llama\" vocabulary) are not",
            file, model.value("type", "?"),
            tj->contains("pre_tokenizer") && (*tj)["pre_tokenizer"].is_object()
                ? (*tj)["pre_tokenizer"].value("type", "?")
                : std::string("none"));
  std::vector<std::string> regexes;
  bool byte_level = false, gpt2_regex = false;
  collect_splits((*tj)["pre_tokenizer"], regexes, byte_level, gpt2_regex, file);
  MOE_CHECK(byte_level, kWhere,
            "{}: a BPE tokenizer without a ByteLevel pre-tokenizer is not "
            "byte-level BPE, which is all that can be written yet",
            file);
  std::string pre;
  if (regexes.empty() && gpt2_regex) {
    pre = "gpt-2";
  } else {
    MOE_CHECK(!gpt2_regex, kWhere,
              "{}: Split regexes followed by ByteLevel's own regex: no "
              "llama.cpp pre-tokenizer does that",
              file);
    pre = tok::gguf_pre_tokenizer_for(regexes, model.value("ignore_merges", false));
    std::string list;
    for (const std::string& r : regexes) list += (list.empty() ? "" : ", ") + r;
    MOE_CHECK(!pre.empty(), kWhere,
              "{}: the pre-tokenizer's regexes [{}] are none of llama.cpp's named pre-tokenizers "
              "(tokenizer.ggml.pre) known here",
              file, list);
  }

  // Tokens by id: the vocabulary, the added tokens, "[PAD<id>]" (unused) for ids of neither.
  std::vector<std::string> tokens(static_cast<size_t>(vocab_size));
  std::vector<int32_t> types(static_cast<size_t>(vocab_size), 5);
  std::map<std::string, int64_t> ids;
  const auto place = [&](const std::string& t, int64_t id, int32_t type) {
    MOE_CHECK(id >= 0 && id < vocab_size, kWhere,
              "{}: token {:?} has id {}, outside the model's vocabulary of {}", file, t, id,
              vocab_size);
    tokens[static_cast<size_t>(id)] = t;
    types[static_cast<size_t>(id)] = type;
    ids[t] = id;
  };
  for (const auto& [t, id] : model.at("vocab").items()) place(t, id.get<int64_t>(), 1);
  if (tj->contains("added_tokens"))
    for (const json& a : (*tj)["added_tokens"]) {
      const std::string t = a.at("content").get<std::string>();
      place(t, a.at("id").get<int64_t>(), a.value("special", false) || looks_special(t) ? 3 : 4);
    }
  for (int64_t id = 0; id < vocab_size; ++id)
    if (types[static_cast<size_t>(id)] == 5)
      tokens[static_cast<size_t>(id)] = fmt::format("[PAD{}]", id);
  std::vector<std::string> merges;
  for (const json& m : model.at("merges")) {
    if (m.is_string())
      merges.push_back(m.get<std::string>());
    else
      merges.push_back(m.at(0).get<std::string>() + " " + m.at(1).get<std::string>());
  }
  meta.emplace_back("tokenizer.ggml.model", GgufValue::str("gpt2"));
  meta.emplace_back("tokenizer.ggml.pre", GgufValue::str(pre));
  meta.emplace_back("tokenizer.ggml.tokens", GgufValue::strings(tokens));
  std::vector<GgufValue> tv;
  for (int32_t t : types) tv.push_back(GgufValue::i32(t));
  meta.emplace_back("tokenizer.ggml.token_type", GgufValue::array(GgufValueType::I32, tv));
  // Even empty: llama.cpp's gpt2 vocabulary refuses a file without the key.
  meta.emplace_back("tokenizer.ggml.merges", GgufValue::strings(merges));

  // Special ids: tokenizer_config.json's tokens, else config.json's ids.
  const json tc = read_json(dir / "tokenizer_config.json").value_or(json::object());
  const json cfg = read_json(dir / "config.json").value_or(json::object());
  for (const char* what : {"bos", "eos", "unk", "pad"}) {
    std::optional<int64_t> id;
    if (const auto t = config_token(tc, (std::string(what) + "_token").c_str()))
      if (ids.count(*t)) id = ids[*t];
    const std::string cfg_key = std::string(what) + "_token_id";
    if (!id && cfg.contains(cfg_key) && cfg[cfg_key].is_number_integer())
      id = cfg[cfg_key].get<int64_t>();
    if (!id || *id < 0 || *id >= vocab_size) continue;
    const std::string key = std::string("tokenizer.ggml.") +
                            (std::string(what) == "unk"   ? "unknown"
                             : std::string(what) == "pad" ? "padding"
                                                          : what) +
                            "_token_id";
    meta.emplace_back(key, GgufValue::u32(static_cast<uint32_t>(*id)));
  }
  for (const char* key : {"add_bos_token", "add_eos_token"})
    if (tc.contains(key) && tc[key].is_boolean())
      meta.emplace_back(std::string("tokenizer.ggml.") + key,
                        GgufValue::boolean(tc[key].get<bool>()));
  std::optional<std::string> chat;
  if (tc.contains("chat_template") && tc["chat_template"].is_string())
    chat = tc["chat_template"].get<std::string>();
  if (!chat) {
    std::ifstream f(dir / "chat_template.jinja", std::ios::binary);
    if (f.good()) chat = std::string(std::istreambuf_iterator<char>(f), {});
  }
  if (chat) meta.emplace_back("tokenizer.chat_template", GgufValue::str(*chat));
}

// ---------------------------------------------------------------------------------------------
// A folder's model: its architecture, its metadata, its tensors.

// llama.cpp's architecture for a checkpoint: by config.json's model_type, and for this engine's
// own checkpoints by what the model computes.
std::string architecture_of(const CheckpointInfo& info) {
  const ModelConfig& c = info.config;
  if (!info.ours) {
    const std::string& t = info.model_type;
    if (t == "qwen3_moe") return "qwen3moe";
    if (t == "qwen2_moe") return "qwen2moe";
    if (t == "olmoe") return "olmoe";
    if (t == "mixtral") return "llama";
    if (t == "deepseek_v2" || t == "deepseek_v3") return "deepseek2";
    throw_error(kWhere,
                fmt::format("{}: writing model_type '{}' as GGUF is not supported (qwen3_moe, "
                            "qwen2_moe, olmoe, mixtral, deepseek_v2 and deepseek_v3 are)",
                            info.dir, t));
  }
  if (c.mla()) return "deepseek2";
  if (c.qk_norm == QkNorm::head) return "qwen3moe";
  if (c.qk_norm == QkNorm::full) return "olmoe";
  if (c.moe.n_shared > 0 || c.qkv_bias) return "qwen2moe";
  return "llama";
}

// What llama.cpp's graph of `arch` computes must be what the model computes: every difference
// is refused by name.
void check_expressible(const ModelConfig& c, const std::string& arch, const std::string& path) {
  std::vector<std::string> bad;
  const auto need = [&](bool ok, const char* what) {
    if (!ok) bad.emplace_back(what);
  };
  need(c.norm == NormKind::rms, "RMSNorm");
  need(c.moe.act == ExpertAct::swiglu, "SwiGLU experts");
  need(!c.moe.expert_bias, "experts without biases");
  need(c.clip_qkv == 0, "no q/k/v clipping");
  need(c.sliding_window == 0, "attention over all positions (no sliding window)");
  const bool deepseek = arch == "deepseek2";
  if (deepseek) {
    // Leading dense layers, then MoE layers: DeepSeek's layout.
    for (int64_t i = 0; i < c.n_layers; ++i)
      if (c.is_moe_layer(i) != (i >= c.first_dense)) {
        bad.push_back(fmt::format("dense layers only before the MoE layers (layer {})", i));
        break;
      }
    need(c.mla(), "multi-head latent attention");
    need(c.rope_interleave, "rotary embedding of adjacent pairs");
    need(c.moe.router == RouterKind::deepseek ||
             (c.moe.router == RouterKind::topk && c.moe.n_group <= 1),
         "DeepSeek-V3's sigmoid router or DeepSeek-V2's softmax top-k without groups");
    need(c.qk_norm == QkNorm::none && !c.qkv_bias, "no q/k norms and no q/k/v biases");
    need(c.moe.n_shared <= 1 && !c.moe.shared_gate, "shared experts as one ungated MLP");
  } else {
    need(c.moe.router == RouterKind::topk, "a softmax top-k router");
    need(!c.mla(), "multi-head attention (latent attention is DeepSeek's, deepseek2)");
    for (int64_t i = 0; i < c.n_layers; ++i)
      if (!c.is_moe_layer(i)) {
        bad.push_back(fmt::format("every layer an MoE layer (layer {} is dense)", i));
        break;
      }
  }
  const bool halves = arch != "llama" && !deepseek;
  if (halves) need(!c.rope_interleave, "rotary embedding of the two halves");
  if (deepseek) {
    // (the rest is in the config's metadata)
  } else if (arch == "qwen3moe") {
    need(c.qk_norm == QkNorm::head, "RMSNorm on each head of q and k");
    need(c.moe.renormalize, "top-k weights renormalized");
    need(!c.qkv_bias && c.moe.n_shared == 0, "no q/k/v biases and no shared experts");
  } else if (arch == "qwen2moe") {
    need(c.qk_norm == QkNorm::none, "no q/k norms");
    need(!c.moe.renormalize, "top-k weights not renormalized");
    need(c.moe.n_shared == 1 && c.moe.shared_gate, "one shared expert with its sigmoid gate");
  } else if (arch == "olmoe") {
    need(c.qk_norm == QkNorm::full, "RMSNorm over the whole q and k projections");
    // llama.cpp's olmoe normalizes k over n_embd values: as many key heads as query heads.
    need(c.n_kv_heads == 0 || c.n_kv_heads == c.n_heads,
         "as many key/value heads as query heads (its k norm has the width of q's)");
    need(!c.moe.renormalize, "top-k weights not renormalized");
    need(!c.qkv_bias && c.moe.n_shared == 0, "no q/k/v biases and no shared experts");
  } else {
    need(c.qk_norm == QkNorm::none, "no q/k norms");
    need(c.moe.renormalize, "top-k weights renormalized");
    need(!c.qkv_bias && c.moe.n_shared == 0, "no q/k/v biases and no shared experts");
  }
  std::string list;
  for (const std::string& b : bad) list += (list.empty() ? "" : "; ") + b;
  MOE_CHECK(bad.empty(), kWhere,
            "{}: llama.cpp's '{}' architecture cannot express this model; it needs: {}", path, arch,
            list);
}

Meta arch_metadata(const ModelConfig& c, const std::string& arch, const std::string& name) {
  Meta m;
  const auto key = [&](const char* k) { return arch + "." + k; };
  const auto u32 = [](int64_t v) { return GgufValue::u32(static_cast<uint32_t>(v)); };
  const int64_t hd = c.head_size();
  m.emplace_back("general.architecture", GgufValue::str(arch));
  m.emplace_back("general.type", GgufValue::str("model"));
  m.emplace_back("general.name", GgufValue::str(name));
  if (arch == "deepseek2") {
    // As llama.cpp's DeepseekV2Model converter writes them: MLA as MQA with one key/value head
    // of kv_lora + rope values (key_length, value_length), the decompressed heads' sizes in the
    // *_mla keys.
    const bool v3 = c.moe.router == RouterKind::deepseek;
    m.emplace_back(key("block_count"), u32(c.n_layers));
    m.emplace_back(key("context_length"), u32(c.max_seq_len));
    m.emplace_back(key("embedding_length"), u32(c.d_model));
    m.emplace_back(key("feed_forward_length"), u32(c.d_ffn > 0 ? c.d_ffn : c.moe.d_ffn));
    m.emplace_back(key("attention.head_count"), u32(c.n_heads));
    m.emplace_back(key("attention.head_count_kv"), u32(1));
    m.emplace_back(key("rope.freq_base"), GgufValue::f32(static_cast<float>(c.rope_theta)));
    m.emplace_back(key("attention.layer_norm_rms_epsilon"),
                   GgufValue::f32(static_cast<float>(c.norm_eps)));
    m.emplace_back(key("expert_count"), u32(c.moe.n_experts));
    m.emplace_back(key("expert_used_count"), u32(c.moe.top_k));
    if (v3) {
      m.emplace_back(key("expert_group_count"), u32(c.moe.n_group));
      m.emplace_back(key("expert_group_used_count"), u32(c.moe.topk_group));
    }
    m.emplace_back(key("expert_gating_func"), u32(v3 ? 2 : 1));  // sigmoid, softmax
    m.emplace_back(key("leading_dense_block_count"), u32(c.first_dense));
    m.emplace_back(key("vocab_size"), u32(c.vocab_size));
    // Written also when 0 (queries without compression, DeepSeek-V2-Lite): llama.cpp reads the
    // key of every deepseek2 model but the layer counts it knows as "lite".
    m.emplace_back(key("attention.q_lora_rank"), u32(c.q_lora_rank));
    m.emplace_back(key("attention.kv_lora_rank"), u32(c.kv_lora_rank));
    m.emplace_back(key("attention.key_length"), u32(c.kv_lora_rank + c.qk_rope_dim));
    m.emplace_back(key("attention.value_length"), u32(c.kv_lora_rank));
    m.emplace_back(key("attention.key_length_mla"), u32(c.qk_nope_dim + c.qk_rope_dim));
    m.emplace_back(key("attention.value_length_mla"), u32(c.v_head_dim));
    m.emplace_back(key("expert_feed_forward_length"), u32(c.moe.d_ffn));
    // The shared experts are one MLP; llama.cpp's width is expert_shared_count x the expert's.
    const int64_t shared = c.moe.n_shared > 0 ? c.moe.shared_width() : 0;
    MOE_CHECK(shared % c.moe.d_ffn == 0, kWhere,
              "shared experts of width {}: llama.cpp's deepseek2 takes a multiple of the routed "
              "experts' width {}",
              shared, c.moe.d_ffn);
    m.emplace_back(key("expert_shared_count"), u32(shared / c.moe.d_ffn));
    m.emplace_back(key("expert_weights_scale"),
                   GgufValue::f32(static_cast<float>(c.moe.routed_scaling_factor)));
    if (c.moe.renormalize) m.emplace_back(key("expert_weights_norm"), GgufValue::boolean(true));
    m.emplace_back(key("rope.dimension_count"), u32(c.qk_rope_dim));
    m.emplace_back("general.file_type", u32(0));  // set by the caller
    m.emplace_back("general.quantization_version", u32(2));
    return m;
  }
  m.emplace_back(key("block_count"), u32(c.n_layers));
  m.emplace_back(key("context_length"), u32(c.max_seq_len));
  m.emplace_back(key("embedding_length"), u32(c.d_model));
  m.emplace_back(key("feed_forward_length"), u32(arch == "qwen3moe" || arch == "qwen2moe"
                                                     ? (c.d_ffn > 0 ? c.d_ffn : c.moe.d_ffn)
                                                     : c.moe.d_ffn));
  m.emplace_back(key("attention.head_count"), u32(c.n_heads));
  m.emplace_back(key("attention.head_count_kv"), u32(c.n_kv_heads > 0 ? c.n_kv_heads : c.n_heads));
  m.emplace_back(key("rope.freq_base"), GgufValue::f32(static_cast<float>(c.rope_theta)));
  m.emplace_back(key("attention.layer_norm_rms_epsilon"),
                 GgufValue::f32(static_cast<float>(c.norm_eps)));
  m.emplace_back(key("expert_count"), u32(c.moe.n_experts));
  m.emplace_back(key("expert_used_count"), u32(c.moe.top_k));
  if (arch == "llama") {
    m.emplace_back(key("vocab_size"), u32(c.vocab_size));
    m.emplace_back(key("rope.dimension_count"), u32(hd));
  }
  if (arch == "qwen3moe" || (hd != c.d_model / c.n_heads)) {
    m.emplace_back(key("attention.key_length"), u32(hd));
    m.emplace_back(key("attention.value_length"), u32(hd));
  }
  m.emplace_back("general.file_type", u32(0));  // set by the caller
  if (arch == "qwen3moe" || arch == "qwen2moe")
    m.emplace_back(key("expert_feed_forward_length"), u32(c.moe.d_ffn));
  if (arch == "qwen2moe")
    m.emplace_back(key("expert_shared_feed_forward_length"), u32(c.moe.shared_width()));
  m.emplace_back("general.quantization_version", u32(2));
  return m;
}

// A shape without its leading dimensions of 1, reversed: GGUF's ne.
std::vector<int64_t> ne_of(const Shape& s) {
  size_t i = 0;
  while (i + 1 < s.size() && s[i] == 1) ++i;
  std::vector<int64_t> ne;
  for (size_t d = s.size(); d > i; --d) ne.push_back(s[d - 1]);
  return ne;
}

// llama.cpp's converter's permutation of Mixtral's q and k rows (per head: row 2i from row i, row
// 2i + 1 from row i + hd/2), so that rotating adjacent pairs computes HF's rotation of halves.
Tensor permute_rope_rows(const Tensor& w, int64_t heads) {
  const Tensor src = w.to(DType::F32);
  const int64_t rows = src.shape()[0], cols = src.numel() / rows, hd = rows / heads;
  Tensor out = Tensor::empty(src.shape(), DType::F32);
  const float* s = src.data<float>();
  float* o = out.data<float>();
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t i = 0; i < hd / 2; ++i)
      for (int64_t a = 0; a < 2; ++a)
        std::copy(s + (h * hd + a * hd / 2 + i) * cols, s + (h * hd + a * hd / 2 + i + 1) * cols,
                  o + (h * hd + 2 * i + a) * cols);
  return out;
}

// MLA's kv_b [H * (nope + v), kv_lora] as llama.cpp's converter splits it: attn_k_b, each head's
// key rows transposed (ne [nope, kv_lora, H]), and attn_v_b (ne [kv_lora, v, H]).
void add_kv_b_halves(std::vector<Source>& sources, const ModelConfig& c, const std::string& blk,
                     const Tensor& kv_b) {
  const int64_t H = c.n_heads, R = c.kv_lora_rank, N = c.qk_nope_dim, V = c.v_head_dim;
  Source k, v;
  k.desc = {blk + "attn_k_b.weight", {N, R, H}, GgmlType::F32};
  v.desc = {blk + "attn_v_b.weight", {R, V, H}, GgmlType::F32};
  k.values = [=] {
    const Tensor w = kv_b.to(DType::F32);
    Tensor out = Tensor::empty({H, R, N}, DType::F32);
    for (int64_t h = 0; h < H; ++h)
      for (int64_t r = 0; r < R; ++r)
        for (int64_t i = 0; i < N; ++i)
          out.data<float>()[(h * R + r) * N + i] = w.data<float>()[(h * (N + V) + i) * R + r];
    return out;
  };
  v.values = [=] {
    const Tensor w = kv_b.to(DType::F32);
    Tensor out = Tensor::empty({H, V, R}, DType::F32);
    for (int64_t h = 0; h < H; ++h)
      std::copy(w.data<float>() + (h * (N + V) + N) * R, w.data<float>() + (h + 1) * (N + V) * R,
                out.data<float>() + h * V * R);
    return out;
  };
  sources.push_back(std::move(k));
  sources.push_back(std::move(v));
}

// The file: the recipe's types, the header, then each tensor's bytes in turn.
GgufWriteReport write_sources(
    Meta meta, const std::vector<Source>& sources, GgufFileType ft, int64_t n_expert,
    int64_t n_layer, bool requantize, const std::string& out,
    const std::function<void(const std::string&, int64_t, int64_t)>& progress) {
  const GgufFileTypeInfo& info = gguf_file_type_info(ft);
  GgufWriteReport report;
  std::vector<GgufTensorDesc> descs;
  for (const Source& s : sources) descs.push_back(s.desc);
  const std::vector<GgmlType> types = gguf_recipe(descs, ft, n_expert, n_layer, &report.notes);
  // llama-quantize moves the two keys to the end; the converter writes them in its order.
  set_value(meta, "general.quantization_version", GgufValue::u32(2), requantize);
  set_value(meta, "general.file_type", GgufValue::u32(info.llama_ftype), requantize);

  std::vector<GgufWriteTensor> wt;
  for (size_t i = 0; i < sources.size(); ++i)
    wt.push_back({sources[i].desc.name, types[i], sources[i].desc.ne, nullptr});
  std::vector<uint64_t> offsets;
  const std::string header = gguf_header(meta, wt, offsets);
  AtomicFile file(out);
  file.write(header.data(), header.size());
  uint64_t pos = 0;  // from the start of the data section
  const std::string zeros(64, '\0');
  std::vector<float> f32;
  std::vector<char> q;
  for (size_t i = 0; i < sources.size(); ++i) {
    const Source& s = sources[i];
    const GgmlType to = types[i];
    const int64_t n0 = s.desc.ne[0], rows = s.rows();
    while (pos < offsets[i]) {
      const size_t n = std::min<uint64_t>(zeros.size(), offsets[i] - pos);
      file.write(zeros.data(), n);
      pos += n;
    }
    const size_t src_row = s.raw ? ggml_row_bytes(s.desc.type, n0) : 0;
    const size_t dst_row = ggml_row_bytes(to, n0);
    if (s.raw && s.desc.type == to) {
      file.write(s.raw, dst_row * static_cast<size_t>(rows));
    } else {
      if (s.raw && s.desc.type != GgmlType::F32 && s.desc.type != GgmlType::F16 &&
          s.desc.type != GgmlType::BF16)
        report.notes.push_back(fmt::format("{}: requantized from {} to {}", s.desc.name,
                                           ggml_type_name(s.desc.type), ggml_type_name(to)));
      Tensor values;
      if (!s.raw) values = s.values();
      const int64_t chunk = std::max<int64_t>(1, (int64_t{1} << 22) / std::max<int64_t>(1, n0));
      for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
        const int64_t nr = std::min(chunk, rows - r0);
        const float* x;
        if (s.raw) {
          f32.resize(static_cast<size_t>(nr * n0));
          for (int64_t r = 0; r < nr; ++r)
            dequantize_row(s.desc.type, s.raw + static_cast<size_t>(r0 + r) * src_row,
                           f32.data() + r * n0, n0);
          x = f32.data();
        } else {
          x = values.data<float>() + r0 * n0;
        }
        for (int64_t j = 0; j < nr * n0; ++j)
          MOE_CHECK(std::isfinite(x[j]), kWhere, "tensor '{}': value {} of row {} is {}",
                    s.desc.name, j % n0, r0 + j / n0, x[j]);
        q.resize(dst_row * static_cast<size_t>(nr));
#pragma omp parallel for schedule(static)
        for (int64_t r = 0; r < nr; ++r)
          quantize_row(to, x + r * n0, q.data() + static_cast<size_t>(r) * dst_row, n0);
        file.write(q.data(), q.size());
      }
    }
    pos += dst_row * static_cast<uint64_t>(rows);
    ++report.types[ggml_type_name(to)];
    if (progress)
      progress(s.desc.name, static_cast<int64_t>(i) + 1, static_cast<int64_t>(sources.size()));
  }
  file.commit();
  report.tensors = static_cast<int64_t>(sources.size());
  report.bytes = header.size() + pos;
  (void)load_gguf(out);  // every check of the reader
  return report;
}

GgufWriteReport write_from_gguf(
    const std::string& in, const std::string& out, GgufFileType ft,
    const std::function<void(const std::string&, int64_t, int64_t)>& progress) {
  const GgufFile f = load_gguf(in);
  const std::string arch = f.get_string("general.architecture");
  const int64_t n_expert = f.has(arch + ".expert_count") ? f.get_i64(arch + ".expert_count") : 0;
  const int64_t n_layer = f.get_i64(arch + ".block_count");
  Meta meta;
  for (const std::string& k : f.key_order) meta.emplace_back(k, f.metadata.at(k));
  std::vector<Source> sources;
  for (const GgufTensor& t : f.tensors) {
    Source s;
    // Its dimensions as ggml_n_dims counts them (no trailing 1s), as llama-quantize writes them.
    int n = t.n_dims;
    while (n > 1 && t.ne[static_cast<size_t>(n - 1)] == 1) --n;
    s.desc = {t.name, std::vector<int64_t>(t.ne.begin(), t.ne.begin() + n), t.type};
    s.raw = t.data;
    sources.push_back(std::move(s));
  }
  sort_tensors(sources);
  GgufWriteReport r =
      write_sources(std::move(meta), sources, ft, n_expert, n_layer, true, out, progress);
  r.architecture = arch;
  return r;
}

GgufWriteReport write_from_folder(
    const std::string& in, const std::string& out, GgufFileType ft,
    const std::function<void(const std::string&, int64_t, int64_t)>& progress) {
  const CheckpointInfo info = read_checkpoint_info(in);
  const std::string arch = architecture_of(info);
  const ModelConfig& c = info.config;
  check_expressible(c, arch, info.dir);
  const std::shared_ptr<Model> model = load_model(in, WeightsAs::float32);
  std::string name = fs::path(info.dir).filename().string();
  if (name.empty()) name = fs::path(info.dir).parent_path().filename().string();
  Meta meta = arch_metadata(c, arch, name);
  std::vector<std::string> notes;
  add_tokenizer(meta, info.dir, c.vocab_size, notes);

  std::vector<Source> sources;
  for (NamedParam& p : model->params()) {
    const std::string gname = gguf_tensor_name(p.name);
    MOE_CHECK(!gname.empty(), kWhere, "{}: parameter {} has no GGUF tensor name", in, p.name);
    Source s;
    // Qwen2-MoE's shared-expert gate [1, D] stays 2-D (ne [D, 1]), as the converter writes it.
    const bool gate =
        p.name.size() > 11 && p.name.compare(p.name.size() - 11, 11, "shared.gate") == 0;
    std::vector<int64_t> ne = ne_of(p.value.shape());
    if (gate && ne.size() == 1) ne.push_back(1);
    s.desc = {gname, ne, GgmlType::F32};
    const Tensor value = p.value;
    if (arch == "deepseek2" && gname.size() > 16 &&
        gname.compare(gname.size() - 16, 16, "attn_kv_b.weight") == 0) {
      add_kv_b_halves(sources, c, gname.substr(0, gname.size() - 16), p.value);
      continue;
    }
    const bool q = p.name.size() > 7 && p.name.compare(p.name.size() - 7, 7, "attn.wq") == 0;
    const bool k = p.name.size() > 7 && p.name.compare(p.name.size() - 7, 7, "attn.wk") == 0;
    if (arch == "llama" && !c.rope_interleave && (q || k)) {
      const int64_t heads = q ? c.n_heads : (c.n_kv_heads > 0 ? c.n_kv_heads : c.n_heads);
      s.values = [value, heads, model] { return permute_rope_rows(value, heads); };
    } else {
      s.values = [value, model] { return value.to(DType::F32); };
    }
    sources.push_back(std::move(s));
  }
  // The routers' selection biases (DeepSeek-V3's e_score_correction_bias): not parameters.
  size_t mi = 0;
  for (int64_t i = 0; i < c.n_layers; ++i) {
    if (!c.is_moe_layer(i)) continue;
    const std::vector<double>* bias = model->moe_layers()[mi++]->router().selection_bias();
    if (bias == nullptr || arch != "deepseek2") continue;
    Tensor t = Tensor::empty({static_cast<int64_t>(bias->size())}, DType::F32);
    for (size_t e = 0; e < bias->size(); ++e) t.data<float>()[e] = static_cast<float>((*bias)[e]);
    Source s;
    s.desc = {"blk." + std::to_string(i) + ".exp_probs_b.bias", {t.numel()}, GgmlType::F32};
    s.values = [t] { return t; };
    sources.push_back(std::move(s));
  }
  sort_tensors(sources);
  GgufWriteReport r = write_sources(std::move(meta), sources, ft, c.moe.n_experts, c.n_layers,
                                    false, out, progress);
  r.architecture = arch;
  r.notes.insert(r.notes.begin(), notes.begin(), notes.end());

  // The file must give back the model's config.
  const ModelConfig back = config_from_gguf(load_gguf(out));
  const auto same = [&](bool ok, const char* what) {
    if (ok) return;
    fs::remove(out);
    throw_error(kWhere,
                fmt::format("{}: the written file reads back with another {}; removed", out, what));
  };
  same(back.vocab_size == c.vocab_size && back.d_model == c.d_model && back.n_layers == c.n_layers,
       "vocabulary, width or depth");
  same(back.n_heads == c.n_heads && back.head_size() == c.head_size() &&
           (back.n_kv_heads > 0 ? back.n_kv_heads : back.n_heads) ==
               (c.n_kv_heads > 0 ? c.n_kv_heads : c.n_heads),
       "attention shape");
  same(back.moe.n_experts == c.moe.n_experts && back.moe.top_k == c.moe.top_k &&
           back.moe.d_ffn == c.moe.d_ffn && back.moe.renormalize == c.moe.renormalize &&
           back.moe.n_shared == c.moe.n_shared,
       "experts or routing");
  same(back.qk_norm == c.qk_norm && back.qkv_bias == c.qkv_bias, "q/k norms or biases");
  same(static_cast<float>(back.norm_eps) == static_cast<float>(c.norm_eps) &&
           static_cast<float>(back.rope_theta) == static_cast<float>(c.rope_theta),
       "epsilon or rope theta");
  return r;
}

}  // namespace

std::string GgufWriteReport::str() const {
  std::string t;
  for (const auto& [name, n] : types) t += fmt::format("{}{} {}", t.empty() ? "" : ", ", name, n);
  return fmt::format("{} tensors ({}), {:.1f} MiB", tensors, t,
                     static_cast<double>(bytes) / (1 << 20));
}

GgufWriteReport write_gguf_model(
    const std::string& model, const std::string& out, GgufFileType ft,
    const std::function<void(const std::string&, int64_t, int64_t)>& progress) {
  MOE_CHECK(!out.empty(), kWhere, "no output file given");
  MOE_CHECK(!fs::is_directory(out), kWhere, "{} is a folder: give the .gguf file to write", out);
  std::error_code ec;
  MOE_CHECK(!fs::exists(out) || !fs::equivalent(model, out, ec), kWhere,
            "{} is the input model: write the GGUF file elsewhere", out);
  MOE_CHECK(fs::exists(model), kWhere, "{} does not exist", model);
  if (is_gguf_file(model)) return write_from_gguf(model, out, ft, progress);
  return write_from_folder(model, out, ft, progress);
}

}  // namespace moe
