// The tokenizer of a GGUF file, from its metadata (tokenizer.ggml.*): the vocabulary llama.cpp's
// converter wrote, tokenized as llama.cpp tokenizes it. Each of the two vocabulary kinds becomes
// the equivalent tokenizer.json, given to bpe.cpp as parts (make_bpe_tokenizer):
//
// - "gpt2" (byte-level BPE: Qwen, DeepSeek, Llama 3, gpt-oss, OLMoE, ...): the tokens and the
//   merges as written; tokenizer.ggml.pre names the pre-tokenizer, whose regexes come from
//   llama.cpp's table (llama-vocab.cpp), each a Split (Isolated) in turn, then ByteLevel.
// - "llama" (SentencePiece vocabularies: Llama 2, Mistral, Mixtral, ...): metaspace BPE with byte
//   fallback (<0xNN> tokens). llama.cpp's SPM tokenizer merges, again and again, the adjacent
//   pair whose joined text is the token of highest score (the leftmost among equals); BPE with
//   every split of every token into two tokens as a merge, ranked by the joined token's score,
//   does the same.
//
// Control, unknown and user-defined tokens are added tokens (found in the text as written), so
// that encode recognizes special tokens in the text as the tokenizer.json path does (llama.cpp
// recognizes control tokens only when asked to parse special tokens). decode gives the text as
// tokenizers' decode does (no clean-up of spaces before punctuation). Every malformed entry gets
// a moe::Error that names the key. docs/gguf.md says more.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <optional>
#include <string_view>
#include <unordered_map>

#include "moe/error.h"
#include "moe/gguf.h"
#include "tok/tok.h"

namespace moe::tok {

namespace {

using json = nlohmann::json;

// llama.cpp's token types (tokenizer.ggml.token_type; gguf-py's TokenType).
enum TokenType : int64_t {
  kUndefined = 0,
  kNormal = 1,
  kUnknown = 2,
  kControl = 3,
  kUserDefined = 4,
  kUnused = 5,
  kByte = 6,
};

// ---------------------------------------------------------------------------------------------
// Pre-tokenizers by tokenizer.ggml.pre name: llama.cpp's regex lists (llm_tokenizer_bpe in
// llama-vocab.cpp), run one after the other, each cutting every piece into its matches and the
// text between them. Where llama.cpp rewrites a tokenizer.json pattern for its own regex engine
// ((?i:'s|...) as '[sS]|..., \p{Lu}... as lookaheads) and quotes the original beside it, the
// original is used: PCRE2 runs it as written, and it is what the model was trained with.

// GPT-2's (llama.cpp's copy has no final |\s+: the whitespace it would match is left between
// matches, which Isolated keeps as a piece all the same).
constexpr const char* kGpt2 =
    R"re('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S))re";
// Llama 3's (cl100k's), also DBRX's and GLM-4's.
constexpr const char* kLlama3 =
    R"re((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)re";
// Qwen2's: digits one by one.
constexpr const char* kQwen2 =
    R"re((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)re";
// Qwen3.5's: Qwen2's with marks (\p{M}) inside words.
constexpr const char* kQwen35 =
    R"re((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)re";
// o200k's (gpt-4o, gpt-oss, Llama 4): words split before an upper-case letter that follows
// lower-case ones.
constexpr const char* kGpt4o =
    R"re([^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?)re"
    R"re(|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?)re"
    R"re(|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+)re";
// DeepSeek-V3's (and R1's) third pattern.
constexpr const char* kDeepseekV3 =
    R"re([!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+)re"
    R"re(| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)re";
// DeepSeek LLM's letters (Latin, Greek, Cyrillic, Armenian, Georgian, ...: the letters with case).
// Written as code points: an editor's Unicode normalization would change some of them (U+1FD3 is
// canonically U+0390, which would put a range out of order).
constexpr const char* kDeepseekLlmLetters =
    R"re(\s?[A-Za-z\x{B5}\x{C0}-\x{D6}\x{D8}-\x{F6}\x{F8}-\x{1BA}\x{1BC}-\x{1BF}\x{1C4}-\x{293})re"
    R"re(\x{295}-\x{2AF}\x{370}-\x{373}\x{376}\x{377}\x{37B}-\x{37D}\x{37F}\x{386}\x{388}-\x{38A})re"
    R"re(\x{38C}\x{38E}-\x{3A1}\x{3A3}-\x{3F5}\x{3F7}-\x{481}\x{48A}-\x{52F}\x{531}-\x{556})re"
    R"re(\x{10A0}-\x{10C5}\x{13A0}-\x{13F5}\x{13F8}-\x{13FD}\x{1C90}-\x{1CBA}\x{1CBD}-\x{1CBF})re"
    R"re(\x{1D00}-\x{1D2B}\x{1D6B}-\x{1D77}\x{1D79}-\x{1D9A}\x{1E00}-\x{1F15}\x{1F18}-\x{1F1D})re"
    R"re(\x{1F20}-\x{1F45}\x{1F48}-\x{1F4D}\x{1F50}-\x{1F57}\x{1F59}\x{1F5B}\x{1F5D})re"
    R"re(\x{1F5F}-\x{1F7D}\x{1F80}-\x{1FB4}\x{1FB6}-\x{1FBC}\x{1FBE}\x{1FC2}-\x{1FC4})re"
    R"re(\x{1FC6}-\x{1FCC}\x{1FD0}-\x{1FD3}\x{1FD6}-\x{1FDB}\x{1FE0}-\x{1FEC}\x{1FF2}-\x{1FF4})re"
    R"re(\x{1FF6}-\x{1FFC}\x{2102}\x{2107}\x{210A}-\x{2113}\x{2115}\x{2119}-\x{211D}\x{2124})re"
    R"re(\x{2126}\x{2128}\x{212A}-\x{212D}\x{212F}-\x{2134}\x{2139}\x{213C}-\x{213F})re"
    R"re(\x{2145}-\x{2149}\x{214E}\x{2183}\x{2184}\x{2C00}-\x{2C7B}\x{2C7E}-\x{2CE4})re"
    R"re(\x{2CEB}-\x{2CEE}\x{2CF2}\x{2CF3}\x{A640}-\x{A66D}\x{A680}-\x{A69B}\x{A722}-\x{A76F})re"
    R"re(\x{A771}-\x{A787}\x{A78B}-\x{A78E}\x{AB70}-\x{ABBF}\x{FB00}-\x{FB06}\x{FB13}-\x{FB17})re"
    R"re(\x{FF21}-\x{FF3A}\x{FF41}-\x{FF5A}\x{10400}-\x{1044F}\x{104B0}-\x{104D3})re"
    R"re(\x{104D8}-\x{104FB}\x{10C80}-\x{10CB2}\x{10CC0}-\x{10CF2}\x{118A0}-\x{118DF})re"
    R"re(\x{1E900}-\x{1E943}]+)re";
// DeepSeek LLM's punctuation: ASCII's, its full-width forms, quotation marks, CJK's.
constexpr const char* kDeepseekLlmPunct =
    R"re(\s?[!-/:-~\x{FF01}-\x{FF0F}\x{FF1A}-\x{FF5E}\x{2018}-\x{201F}\x{3000}-\x{3002}]+)re";
// CJK ideographs, U+0800..U+4E00 and Hangul (DeepSeek LLM and Coder).
constexpr const char* kDeepseekCjk = R"re([\x{4E00}-\x{9FA5}\x{800}-\x{4E00}\x{AC00}-\x{D7FF}]+)re";
// CJK ideographs, hiragana, katakana (DeepSeek-V3).
constexpr const char* kDeepseekV3Cjk =
    R"re([\x{4E00}-\x{9FA5}\x{3040}-\x{309F}\x{30A0}-\x{30FF}]+)re";

struct PreTokenizerDef {
  std::vector<const char*> names;  // llama.cpp's names for it
  std::vector<const char*> regexes;
  // A word that is a token is that token, without merges (tokenizer.json's ignore_merges; what
  // tiktoken does). llama.cpp sets it for the Llama 3 family.
  bool ignore_merges = false;
};

const std::vector<PreTokenizerDef>& pre_tokenizers() {
  static const std::vector<PreTokenizerDef> table = {
      {{"default"},
       {R"re([\p{P}\$\+<=>\^~\|]+)re", kGpt2, R"re(\p{N}+)re", R"re([0-9][0-9][0-9])re"}},
      {{"gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0",
        "mellum", "modern-bert", "mpt", "olmo", "jais", "trillion", "granite-docling", "exaone4"},
       {kGpt2}},
      {{"starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b",
        "mellum2"},
       {R"re(\p{N})re", kGpt2}},
      {{"falcon"}, {R"re([\p{P}\$\+<=>\^~\|`]+)re", kGpt2, R"re([0-9][0-9][0-9])re"}},
      {{"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
        "jina-v5-nano"},
       {kLlama3},
       true},
      {{"dbrx", "smaug-bpe", "glm4", "chatglm-bpe"}, {kLlama3}},
      {{"qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan",
        "solar-open"},
       {kQwen2}},
      {{"qwen35"}, {kQwen35}},
      {{"gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"}, {kGpt4o}},
      {{"deepseek-v3", "hunyuan-dense", "joyai-llm", "hy_v4"},
       {R"re(\p{N}{1,3})re", kDeepseekV3Cjk, kDeepseekV3}},
      // llama.cpp's "\s+$" is \z here: the pieces it sees hold no newline but a lone "\n", and
      // PCRE2's $ would also match before a final newline.
      {{"deepseek-llm"},
       {R"re([\r\n])re", kDeepseekLlmLetters, kDeepseekLlmPunct, R"re(\s+\z)re", kDeepseekCjk,
        R"re(\p{N}+)re"}},
      {{"deepseek-coder"},
       {R"re([\r\n])re", R"re(\s?\p{L}+)re", R"re(\s?\p{P}+)re", kDeepseekCjk, R"re(\p{N})re"}},
  };
  return table;
}

const PreTokenizerDef* find_pre_tokenizer(const std::string& name) {
  for (const PreTokenizerDef& def : pre_tokenizers())
    for (const char* n : def.names)
      if (name == n) return &def;
  return nullptr;
}

// ---------------------------------------------------------------------------------------------
// Reading the metadata: every problem is a moe::Error naming the file and the key.

class Meta {
 public:
  explicit Meta(const GgufFile& f) : f_(f) {}

  [[noreturn]] void fail(const std::string& what) const {
    throw_error("tokenizer", fmt::format("{}: {}", f_.path, what));
  }

  // tokenizer.ggml.<key>'s id, when the file has it: an integer inside the vocabulary.
  std::optional<int32_t> token_id(const std::string& key, size_t n_tokens) const {
    if (!f_.has(key)) return std::nullopt;
    const int64_t id = f_.get_i64(key);
    if (id < 0 || static_cast<uint64_t>(id) >= n_tokens)
      fail(fmt::format("{} = {} is outside the vocabulary of {} tokens (tokenizer.ggml.tokens)",
                       key, id, n_tokens));
    return static_cast<int32_t>(id);
  }

  // An array key with one entry per token: its length must be the vocabulary's.
  void expect_per_token(const std::string& key, size_t n, size_t n_tokens) const {
    if (n != n_tokens)
      fail(fmt::format("{} has {} entries for the {} tokens of tokenizer.ggml.tokens", key, n,
                       n_tokens));
  }

  // tokenizer.ggml.scores as floats (llama.cpp takes float32 or int32 scores), none NaN.
  std::vector<float> scores(size_t n_tokens) const {
    const std::string key = "tokenizer.ggml.scores";
    std::vector<float> scores;
    if (!f_.has(key)) return std::vector<float>(n_tokens, 0.0f);
    const GgufValue& v = f_.get(key);
    if (v.type == GgufValueType::ARRAY && v.elem != GgufValueType::F32 &&
        v.elem != GgufValueType::F64) {
      for (int64_t s : f_.get_array_ints(key)) scores.push_back(static_cast<float>(s));
    } else {
      scores = f_.get_array_f32(key);
    }
    expect_per_token(key, scores.size(), n_tokens);
    for (size_t i = 0; i < scores.size(); ++i)
      if (std::isnan(scores[i])) fail(fmt::format("{}[{}] is NaN", key, i));
    return scores;
  }

 private:
  const GgufFile& f_;
};

// The merges of a "llama" vocabulary: every split of a token into two tokens (at a character
// boundary), ranked by the token's score, highest first (the lower id first among equals), the
// splits of one token by their tokens' ids (the order HuggingFace's converter gives the
// tokenizer.json of a SentencePiece model).
std::vector<std::pair<std::string, std::string>> merges_from_scores(
    const std::vector<std::string>& tokens, const std::vector<float>& scores) {
  std::unordered_map<std::string_view, int32_t> index;
  index.reserve(tokens.size());
  for (size_t id = 0; id < tokens.size(); ++id) index.emplace(tokens[id], static_cast<int32_t>(id));
  std::vector<int32_t> order(tokens.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int32_t a, int32_t b) { return scores[a] > scores[b]; });
  std::vector<std::pair<std::string, std::string>> merges;
  struct Split {
    int32_t left, right;
    size_t at;
  };
  std::vector<Split> splits;
  for (const int32_t id : order) {
    const std::string_view t = tokens[static_cast<size_t>(id)];
    splits.clear();
    for (size_t k = 1; k < t.size(); ++k) {
      if ((static_cast<unsigned char>(t[k]) & 0xC0) == 0x80) continue;  // inside a character
      const auto left = index.find(t.substr(0, k)), right = index.find(t.substr(k));
      if (left != index.end() && right != index.end())
        splits.push_back({left->second, right->second, k});
    }
    std::sort(splits.begin(), splits.end(), [](const Split& a, const Split& b) {
      return std::pair(a.left, a.right) < std::pair(b.left, b.right);
    });
    for (const Split& sp : splits) merges.emplace_back(t.substr(0, sp.at), t.substr(sp.at));
  }
  return merges;
}

// A GGUF file's tokenizer: bpe.cpp's, with the special ids and the chat template of the
// metadata.
class GgufTokenizer final : public Tokenizer {
 public:
  GgufTokenizer(std::unique_ptr<Tokenizer> bpe, std::optional<int32_t> bos,
                std::optional<int32_t> eos, std::optional<std::string> chat_template)
      : bpe_(std::move(bpe)), bos_(bos), eos_(eos), chat_template_(std::move(chat_template)) {}

  std::vector<int32_t> encode(const std::string& text) const override { return bpe_->encode(text); }
  std::string decode(const std::vector<int32_t>& ids) const override { return bpe_->decode(ids); }
  int64_t vocab_size() const override { return bpe_->vocab_size(); }
  std::optional<int32_t> bos_id() const override { return bos_; }
  std::optional<int32_t> eos_id() const override { return eos_; }
  std::optional<std::string> chat_template() const override { return chat_template_; }

 private:
  std::unique_ptr<Tokenizer> bpe_;
  std::optional<int32_t> bos_, eos_;
  std::optional<std::string> chat_template_;
};

}  // namespace

std::vector<std::string> gguf_pre_tokenizer_names() {
  std::vector<std::string> names;
  for (const PreTokenizerDef& def : pre_tokenizers())
    for (const char* n : def.names) names.emplace_back(n);
  std::sort(names.begin(), names.end());
  return names;
}

std::string gguf_pre_tokenizer_for(const std::vector<std::string>& regexes, bool ignore_merges) {
  for (const PreTokenizerDef& def : pre_tokenizers()) {
    if (def.ignore_merges != ignore_merges || def.regexes.size() != regexes.size()) continue;
    if (std::equal(regexes.begin(), regexes.end(), def.regexes.begin())) return def.names[0];
  }
  return "";
}

std::unique_ptr<Tokenizer> gguf_tokenizer(const GgufFile& f) {
  const Meta meta(f);
  if (!f.has("tokenizer.ggml.model"))
    meta.fail("the file has no tokenizer (no tokenizer.ggml.model)");
  const std::string model = f.get_string("tokenizer.ggml.model");
  if (model == "none" || model == "no_vocab")
    meta.fail(fmt::format("tokenizer.ggml.model = {:?}: the file has no vocabulary", model));
  if (model != "gpt2" && model != "llama")
    meta.fail(
        fmt::format("tokenizer.ggml.model = {:?} is not supported (gpt2, byte-level BPE, and "
                    "llama, SentencePiece-style, are)",
                    model));

  // The vocabulary, its token types, the special ids.
  if (!f.has("tokenizer.ggml.tokens")) meta.fail("the file has no tokenizer.ggml.tokens");
  BpeParts parts;
  parts.tokens = f.get_array_strings("tokenizer.ggml.tokens");
  parts.tokens_key = "tokenizer.ggml.tokens";
  parts.merges_key = "tokenizer.ggml.merges";
  const size_t n = parts.tokens.size();
  if (n == 0) meta.fail("tokenizer.ggml.tokens is empty");
  if (n >= (size_t{1} << 26))
    meta.fail(fmt::format("tokenizer.ggml.tokens has {} tokens, more than 2^26", n));
  for (size_t id = 0; id < n; ++id)
    if (parts.tokens[id].empty()) meta.fail(fmt::format("tokenizer.ggml.tokens[{}] is empty", id));
  std::vector<int64_t> types(n, kNormal);
  if (f.has("tokenizer.ggml.token_type")) {
    types = f.get_array_ints("tokenizer.ggml.token_type");
    meta.expect_per_token("tokenizer.ggml.token_type", types.size(), n);
    for (size_t id = 0; id < n; ++id)
      if (types[id] < kUndefined || types[id] > kByte)
        meta.fail(fmt::format("tokenizer.ggml.token_type[{}] = {} is not a token type (0 to 6)", id,
                              types[id]));
  }
  const auto bos = meta.token_id("tokenizer.ggml.bos_token_id", n);
  const auto eos = meta.token_id("tokenizer.ggml.eos_token_id", n);
  auto unk = meta.token_id("tokenizer.ggml.unknown_token_id", n);
  (void)meta.token_id("tokenizer.ggml.padding_token_id", n);  // checked, not used
  std::optional<std::string> chat_template;
  if (f.has("tokenizer.chat_template")) chat_template = f.get_string("tokenizer.chat_template");

  json& doc = parts.doc;
  doc["model"] = {{"type", "BPE"}};
  // Control, unknown and user-defined tokens: found in the text first, as llama.cpp's special
  // token partition does (it leaves control tokens as text unless told to parse them; the
  // Tokenizer interface recognizes them, as for tokenizer.json).
  json added = json::array();
  for (size_t id = 0; id < n; ++id)
    if (types[id] == kControl || types[id] == kUnknown || types[id] == kUserDefined)
      added.push_back({{"id", id},
                       {"content", parts.tokens[id]},
                       {"special", types[id] != kUserDefined},
                       {"normalized", false}});
  doc["added_tokens"] = std::move(added);

  if (model == "gpt2") {
    // No name (or an empty one): llama.cpp's default pre-tokenizer, as llama.cpp does.
    std::string pre = f.has("tokenizer.ggml.pre") ? f.get_string("tokenizer.ggml.pre") : "";
    if (pre.empty()) pre = "default";
    const PreTokenizerDef* def = find_pre_tokenizer(pre);
    if (!def) {
      std::string known;
      for (const std::string& name : gguf_pre_tokenizer_names())
        known += (known.empty() ? "" : ", ") + name;
      meta.fail(fmt::format(
          "tokenizer.ggml.pre = {:?} is a pre-tokenizer not known here; known: {}", pre, known));
    }
    json steps = json::array();
    for (const char* regex : def->regexes)
      steps.push_back(
          {{"type", "Split"}, {"pattern", {{"Regex", regex}}}, {"behavior", "Isolated"}});
    steps.push_back({{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}});
    doc["pre_tokenizer"] = {{"type", "Sequence"}, {"pretokenizers", std::move(steps)}};
    doc["decoder"] = {{"type", "ByteLevel"}};
    doc["model"]["ignore_merges"] = def->ignore_merges;

    // The merges, "left right" each, cut at the first space after the first character (as
    // llama.cpp does: a left token cannot be empty).
    if (!f.has("tokenizer.ggml.merges"))
      meta.fail("the file has no tokenizer.ggml.merges (a gpt2 vocabulary needs them)");
    std::vector<std::string> merges = f.get_array_strings("tokenizer.ggml.merges");
    parts.merges.reserve(merges.size());
    for (size_t i = 0; i < merges.size(); ++i) {
      const std::string& m = merges[i];
      const size_t space = m.empty() ? std::string::npos : m.find(' ', 1);
      if (space == std::string::npos)
        meta.fail(fmt::format("tokenizer.ggml.merges[{}] = {:?} is not two tokens \"a b\"", i, m));
      parts.merges.emplace_back(m.substr(0, space), m.substr(space + 1));
    }
  } else {  // llama
    const std::vector<float> scores = meta.scores(n);
    // A space before the text (and after each special token), as SentencePiece's dummy prefix;
    // spaces as U+2581 (▁).
    const bool add_space_prefix = f.has("tokenizer.ggml.add_space_prefix")
                                      ? f.get_bool("tokenizer.ggml.add_space_prefix")
                                      : true;
    const json replace = {
        {"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", "\u2581"}};
    json normalizers = json::array();
    if (add_space_prefix) normalizers.push_back({{"type", "Prepend"}, {"prepend", "\u2581"}});
    normalizers.push_back(replace);
    doc["normalizer"] = {{"type", "Sequence"}, {"normalizers", std::move(normalizers)}};
    json decoders = json::array();
    decoders.push_back(
        {{"type", "Replace"}, {"pattern", {{"String", "\u2581"}}}, {"content", " "}});
    decoders.push_back({{"type", "ByteFallback"}});
    decoders.push_back({{"type", "Fuse"}});
    if (add_space_prefix)
      decoders.push_back({{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 0}});
    doc["decoder"] = {{"type", "Sequence"}, {"decoders", std::move(decoders)}};
    // Characters outside the vocabulary become their <0xNN> byte tokens, or the unknown token
    // where the vocabulary has no byte tokens.
    doc["model"]["byte_fallback"] = true;
    if (!unk)
      for (size_t id = 0; id < n && !unk; ++id)
        if (types[id] == kUnknown) unk = static_cast<int32_t>(id);
    if (unk) doc["model"]["unk_token"] = parts.tokens[static_cast<size_t>(*unk)];
    parts.merges = merges_from_scores(parts.tokens, scores);
  }

  auto bpe = make_bpe_tokenizer(std::move(parts), f.path);
  return std::make_unique<GgufTokenizer>(std::move(bpe), bos, eos, std::move(chat_template));
}

}  // namespace moe::tok
