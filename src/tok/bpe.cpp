// HuggingFace tokenizers' tokenizer.json with a BPE model: the pipeline of the tokenizers
// library, step by step, for the files of Qwen2/Qwen3, DeepSeek-V3, gpt-oss, OLMoE (byte-level
// BPE) and Llama 2, Mistral, Mixtral (metaspace BPE with byte fallback).
//
// encode(text):
//   1. added tokens written in the text (those with "normalized": false) are cut out first and
//      give their ids;
//   2. every other run of text goes through the normalizer (NFC, Prepend, Replace), and the
//      added tokens with "normalized": true are cut out of the normalized text;
//   3. the pre-tokenizer cuts the rest into words (Split with a regex run by PCRE2, ByteLevel
//      with GPT-2's byte-to-unicode map, Metaspace, Digits);
//   4. BPE merges the characters of every word, lowest merge rank first, with byte fallback
//      (<0xNN> tokens) or the unknown token for characters outside the vocabulary.
// decode(ids): the tokens' texts through the decoder chain (ByteLevel, Replace, ByteFallback,
// Fuse, Strip, Metaspace), as tokenizers' decode with skip_special_tokens=False.
//
// make_bpe_tokenizer takes the same document as parts, its vocabulary and merges as lists rather
// than JSON text: gguf_vocab.cpp builds a GGUF file's tokenizer that way.
//
// Unicode normalization (NFC) is ICU's (Unicode Standard Annex #15).
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <unicode/normalizer2.h>
#include <unicode/unistr.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <mutex>
#include <nlohmann/json.hpp>
#include <queue>
#include <sstream>
#include <string_view>
#include <unordered_map>
#include <utility>

#include "moe/error.h"
#include "tok/tok.h"

namespace moe::tok {

namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using Span = std::pair<size_t, size_t>;  // [begin, end) in bytes

// ---------------------------------------------------------------------------------------------
// UTF-8

// Length of the well-formed UTF-8 sequence at s[i], or 0 if there is none; *prefix gets the
// length of the longest start of a well-formed sequence there (at least 1), which is what one
// U+FFFD replaces (Unicode's "maximal subpart" rule, as Rust's String::from_utf8_lossy).
size_t utf8_sequence(std::string_view s, size_t i, size_t* prefix = nullptr) {
  const auto b0 = static_cast<unsigned char>(s[i]);
  if (b0 < 0x80) return 1;
  size_t n = 0;
  unsigned char lo = 0x80, hi = 0xBF;  // the range of the second byte
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    n = 2;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    n = 3;
    if (b0 == 0xE0) lo = 0xA0;  // no overlong forms
    if (b0 == 0xED) hi = 0x9F;  // no surrogates
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    n = 4;
    if (b0 == 0xF0) lo = 0x90;
    if (b0 == 0xF4) hi = 0x8F;  // nothing above U+10FFFF
  } else {
    if (prefix) *prefix = 1;
    return 0;
  }
  for (size_t k = 1; k < n; ++k) {
    const bool ok = i + k < s.size() && [&] {
      const auto b = static_cast<unsigned char>(s[i + k]);
      return k == 1 ? (b >= lo && b <= hi) : (b >= 0x80 && b <= 0xBF);
    }();
    if (!ok) {
      if (prefix) *prefix = k;
      return 0;
    }
  }
  return n;
}

// Bytes of the character at s[i]; a byte that starts no well-formed sequence counts as one.
size_t char_length(std::string_view s, size_t i) {
  const size_t n = utf8_sequence(s, i);
  return n ? n : 1;
}

// The code point of the well-formed sequence of n bytes at s[i].
uint32_t code_point(std::string_view s, size_t i, size_t n) {
  const auto b = [&](size_t k) {
    return static_cast<uint32_t>(static_cast<unsigned char>(s[i + k]));
  };
  switch (n) {
    case 1: return b(0);
    case 2: return ((b(0) & 0x1F) << 6) | (b(1) & 0x3F);
    case 3: return ((b(0) & 0x0F) << 12) | ((b(1) & 0x3F) << 6) | (b(2) & 0x3F);
    default:
      return ((b(0) & 0x07) << 18) | ((b(1) & 0x3F) << 12) | ((b(2) & 0x3F) << 6) | (b(3) & 0x3F);
  }
}

void append_utf8(std::string& out, uint32_t cp) {
  const auto c = [](uint32_t v) { return static_cast<char>(v); };
  if (cp < 0x80) {
    out += c(cp);
  } else if (cp < 0x800) {
    out += c(0xC0 | (cp >> 6));
    out += c(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += c(0xE0 | (cp >> 12));
    out += c(0x80 | ((cp >> 6) & 0x3F));
    out += c(0x80 | (cp & 0x3F));
  } else {
    out += c(0xF0 | (cp >> 18));
    out += c(0x80 | ((cp >> 12) & 0x3F));
    out += c(0x80 | ((cp >> 6) & 0x3F));
    out += c(0x80 | (cp & 0x3F));
  }
}

// Bytes to text, every ill-formed part replaced by U+FFFD (Rust's String::from_utf8_lossy, which
// the tokenizers library's ByteLevel decoder uses).
std::string utf8_lossy(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    size_t prefix = 0;
    const size_t n = utf8_sequence(s, i, &prefix);
    if (n) {
      out.append(s.substr(i, n));
      i += n;
    } else {
      out += "\xEF\xBF\xBD";
      i += prefix;
    }
  }
  return out;
}

// Unicode's White_Space property (Rust's char::is_whitespace).
bool is_white_space(uint32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
         (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F ||
         cp == 0x205F || cp == 0x3000;
}

// ---------------------------------------------------------------------------------------------
// Regexes: PCRE2 in UTF mode with Unicode properties (\p{L}, \p{N}, \s as Unicode white space).
// The tokenizers library runs Oniguruma; the patterns of tokenizer.json files (alternations,
// classes of Unicode properties, (?i:...), (?!\S), counted repeats) mean the same in PCRE2.

class Regex {
 public:
  Regex(const std::string& pattern, const std::string& where) {
    refuse_differences(pattern, where);
    int error = 0;
    PCRE2_SIZE offset = 0;
    // MATCH_INVALID_UTF: text that is not valid UTF-8 is matched too (the bad bytes match no
    // character class) instead of failing.
    code_ =
        pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                      PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF, &error, &offset, nullptr);
    if (!code_) {
      std::array<PCRE2_UCHAR, 256> message{};
      pcre2_get_error_message(error, message.data(), message.size());
      throw_error("tokenizer",
                  fmt::format("{}: the regex {:?} does not compile (at offset {}): {}", where,
                              pattern, offset, reinterpret_cast<const char*>(message.data())));
    }
    pcre2_jit_compile(code_, PCRE2_JIT_COMPLETE);  // a speed-up where PCRE2 has its JIT
  }
  ~Regex() { pcre2_code_free(code_); }
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // The successive non-overlapping matches in s, left to right (empty matches left out).
  std::vector<Span> find_all(std::string_view s) const {
    std::vector<Span> spans;
    if (s.empty()) return spans;
    Scratch& scratch = thread_scratch();
    const auto* subject = reinterpret_cast<PCRE2_SPTR>(s.data());
    for (size_t offset = 0; offset < s.size();) {
      const int rc =
          pcre2_match(code_, subject, s.size(), offset, 0, scratch.data, scratch.context);
      if (rc == PCRE2_ERROR_NOMATCH) break;
      if (rc < 0) {
        std::array<PCRE2_UCHAR, 256> message{};
        pcre2_get_error_message(rc, message.data(), message.size());
        throw_error("tokenizer", fmt::format("a pre-tokenizer regex failed on the text: {}",
                                             reinterpret_cast<const char*>(message.data())));
      }
      const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(scratch.data);
      const size_t begin = ovector[0], end = ovector[1];
      if (end > begin) {
        spans.emplace_back(begin, end);
        offset = end;
      } else {
        if (begin >= s.size()) break;
        offset = begin + char_length(s, begin);
      }
    }
    return spans;
  }

  // Whether s matches somewhere.
  bool search(std::string_view s) const { return !find_all(s).empty(); }

 private:
  // Match data and a JIT stack per thread: encode may run on several threads at once.
  struct Scratch {
    pcre2_match_data* data = pcre2_match_data_create(16, nullptr);
    pcre2_match_context* context = pcre2_match_context_create(nullptr);
    pcre2_jit_stack* stack = pcre2_jit_stack_create(32 * 1024, 1024 * 1024, nullptr);
    Scratch() {
      if (!data || !context || !stack) throw std::bad_alloc();
      pcre2_jit_stack_assign(context, nullptr, stack);
    }
    ~Scratch() {
      pcre2_jit_stack_free(stack);
      pcre2_match_context_free(context);
      pcre2_match_data_free(data);
    }
    Scratch(const Scratch&) = delete;
    Scratch& operator=(const Scratch&) = delete;
  };
  static Scratch& thread_scratch() {
    thread_local Scratch scratch;
    return scratch;
  }

  // Oniguruma with its Ruby syntax (what tokenizers' onig::Regex::new compiles) and PCRE2 read
  // a few constructs differently: ^ and $ are always line anchors there, (?m) lets . match a
  // newline there, \h and \H are hex digits there. A pattern with one of them is refused rather
  // than matched the other way.
  static void refuse_differences(const std::string& pattern, const std::string& where) {
    const auto refuse = [&](const std::string& what) {
      throw_error("tokenizer",
                  fmt::format("{}: the regex {:?} uses {}, which Oniguruma (the regex engine of "
                              "the tokenizers library) reads differently from PCRE2: not supported",
                              where, pattern, what));
    };
    int in_class = 0;  // nesting of [...]
    for (size_t i = 0; i < pattern.size(); ++i) {
      const char c = pattern[i];
      if (c == '\\') {
        if (i + 1 < pattern.size() && (pattern[i + 1] == 'h' || pattern[i + 1] == 'H'))
          refuse(fmt::format("\\{} (a hex digit in Oniguruma, horizontal space in PCRE2)",
                             pattern[i + 1]));
        ++i;  // the escaped character
      } else if (c == '[') {
        ++in_class;
      } else if (c == ']' && in_class > 0) {
        --in_class;
      } else if (in_class == 0 && (c == '^' || c == '$')) {
        refuse(
            fmt::format("the anchor {} (start or end of any line in Oniguruma, of the text "
                        "in PCRE2)",
                        c));
      } else if (in_class == 0 && c == '(' && pattern.compare(i, 2, "(?") == 0) {
        for (size_t j = i + 2; j < pattern.size() && std::strchr("imx-", pattern[j]); ++j)
          if (pattern[j] == 'm') refuse("the option m (dot matches newline in Oniguruma)");
      }
    }
  }

  pcre2_code* code_ = nullptr;
};

// A tokenizer.json pattern: {"Regex": "..."} or {"String": "..."} (a literal).
struct Pattern {
  std::shared_ptr<const Regex> regex;
  std::string literal;

  std::vector<Span> find_all(std::string_view s) const {
    if (regex) return regex->find_all(s);
    std::vector<Span> spans;
    if (literal.empty()) return spans;
    for (size_t pos = s.find(literal); pos != std::string_view::npos;
         pos = s.find(literal, pos + literal.size()))
      spans.emplace_back(pos, pos + literal.size());
    return spans;
  }

  std::string replace_all(std::string_view s, std::string_view with) const {
    std::string out;
    size_t prev = 0;
    for (const auto& [begin, end] : find_all(s)) {
      out.append(s.substr(prev, begin - prev));
      out.append(with);
      prev = end;
    }
    out.append(s.substr(prev));
    return out;
  }
};

// ---------------------------------------------------------------------------------------------
// GPT-2's byte-to-unicode map (bytes_to_unicode in openai/gpt-2 encoder.py): the printable bytes
// '!'..'~', '¡'..'¬', '®'..'ÿ' stand for themselves, the other 68 bytes for U+0100, U+0101, ...
// in byte order, so that every byte is a visible character of the vocabulary.

struct ByteLevelMap {
  std::array<std::string, 256> to_char;  // byte -> its character, UTF-8
  std::array<int, 324> to_byte;          // code point -> byte, or -1

  ByteLevelMap() {
    to_byte.fill(-1);
    uint32_t next = 256;
    for (uint32_t b = 0; b < 256; ++b) {
      const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
      const uint32_t cp = printable ? b : next++;
      append_utf8(to_char[b], cp);
      to_byte[cp] = static_cast<int>(b);
    }
  }
};

const ByteLevelMap& byte_level_map() {
  static const ByteLevelMap map;
  return map;
}

// The regex of the ByteLevel pre-tokenizer with use_regex (GPT-2's).
constexpr const char* kGpt2Regex =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// ---------------------------------------------------------------------------------------------
// Reading tokenizer.json: every missing or ill-typed field is a moe::Error that names the file
// and the field.

class Fields {
 public:
  explicit Fields(std::string file) : file_(std::move(file)) {}
  // The vocabulary and the merges named otherwise in errors (a GGUF file's keys, for the parts
  // make_bpe_tokenizer is given).
  Fields(std::string file, std::string vocab, std::string merges)
      : file_(std::move(file)), vocab_(std::move(vocab)), merges_(std::move(merges)) {}

  [[noreturn]] void fail(const std::string& what) const {
    throw_error("tokenizer", fmt::format("{}: {}", file_, what));
  }

  void expect_object(const json& v, const std::string& where) const {
    if (!v.is_object()) fail(fmt::format("{} must be an object, not {}", where, v.type_name()));
  }
  // obj[key]; missing or null is an error.
  const json& get(const json& obj, const std::string& where, const char* key) const {
    expect_object(obj, where);
    const auto it = obj.find(key);
    if (it == obj.end() || it->is_null()) fail(fmt::format("{} has no \"{}\"", where, key));
    return *it;
  }
  // obj[key], or nullptr when it is missing or null.
  const json* find(const json& obj, const char* key) const {
    const auto it = obj.find(key);
    return it == obj.end() || it->is_null() ? nullptr : &*it;
  }
  std::string string(const json& v, const std::string& where) const {
    if (!v.is_string()) fail(fmt::format("{} must be a string, not {}", where, v.type_name()));
    return v.get<std::string>();
  }
  std::string string(const json& obj, const std::string& where, const char* key) const {
    return string(get(obj, where, key), fmt::format("{}.{}", where, key));
  }
  bool flag(const json& obj, const std::string& where, const char* key, bool fallback) const {
    const json* v = find(obj, key);
    if (!v) return fallback;
    if (!v->is_boolean())
      fail(fmt::format("{}.{} must be true or false, not {}", where, key, v->type_name()));
    return v->get<bool>();
  }
  int64_t integer(const json& v, const std::string& where) const {
    if (!v.is_number_integer())
      fail(fmt::format("{} must be an integer, not {}", where, v.type_name()));
    return v.get<int64_t>();
  }
  // A token id: an integer in [0, 2^26).
  int32_t id(const json& v, const std::string& where) const {
    const int64_t id = integer(v, where);
    if (id < 0 || id >= (int64_t{1} << 26))
      fail(fmt::format("{} = {} is not a valid token id", where, id));
    return static_cast<int32_t>(id);
  }
  const json& array(const json& obj, const std::string& where, const char* key) const {
    const json& v = get(obj, where, key);
    if (!v.is_array())
      fail(fmt::format("{}.{} must be an array, not {}", where, key, v.type_name()));
    return v;
  }
  Pattern pattern(const json& obj, const std::string& where) const {
    const json& p = get(obj, where, "pattern");
    const std::string at = where + ".pattern";
    expect_object(p, at);
    if (const json* re = find(p, "Regex"))
      return {std::make_shared<const Regex>(string(*re, at + ".Regex"), file_ + ": " + at), {}};
    if (const json* lit = find(p, "String")) return {nullptr, string(*lit, at + ".String")};
    fail(fmt::format("{} must be {{\"Regex\": ...}} or {{\"String\": ...}}", at));
  }
  const std::string& file() const { return file_; }
  const std::string& vocab() const { return vocab_; }
  const std::string& merges() const { return merges_; }

 private:
  std::string file_;
  std::string vocab_ = "model.vocab", merges_ = "model.merges";
};

// ---------------------------------------------------------------------------------------------
// Pieces of text on their way to BPE, and how a pattern cuts them (tokenizers'
// NormalizedString::split with a SplitDelimiterBehavior).

struct Piece {
  std::string text;
  bool first = false;  // starts at the beginning of the encoded text (Metaspace's "first")
};

enum class SplitBehavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

SplitBehavior parse_behavior(const Fields& f, const std::string& name, const std::string& where) {
  if (name == "Removed") return SplitBehavior::kRemoved;
  if (name == "Isolated") return SplitBehavior::kIsolated;
  if (name == "MergedWithPrevious") return SplitBehavior::kMergedWithPrevious;
  if (name == "MergedWithNext") return SplitBehavior::kMergedWithNext;
  if (name == "Contiguous") return SplitBehavior::kContiguous;
  f.fail(
      fmt::format("{}.behavior {:?} is none of Removed, Isolated, MergedWithPrevious, "
                  "MergedWithNext, Contiguous",
                  where, name));
}

// Cuts `piece` at the matches: the text is a run of segments, matched or not (flipped by
// invert); the behavior says what becomes of the matched ones. Appends the non-empty parts.
void split_piece(const Piece& piece, const std::vector<Span>& matches, SplitBehavior behavior,
                 bool invert, std::vector<Piece>& out) {
  struct Segment {
    size_t begin, end;
    bool match;
  };
  std::vector<Segment> segments;
  size_t prev = 0;
  for (const auto& [begin, end] : matches) {
    if (prev != begin) segments.push_back({prev, begin, invert});
    segments.push_back({begin, end, !invert});
    prev = end;
  }
  if (prev != piece.text.size()) segments.push_back({prev, piece.text.size(), invert});

  struct Part {
    size_t begin, end;
    bool remove;
  };
  std::vector<Part> parts;
  bool prev_match = false;
  switch (behavior) {
    case SplitBehavior::kIsolated:
      for (const Segment& s : segments) parts.push_back({s.begin, s.end, false});
      break;
    case SplitBehavior::kRemoved:
      for (const Segment& s : segments) parts.push_back({s.begin, s.end, s.match});
      break;
    case SplitBehavior::kContiguous:  // runs of matches and runs of the rest
      for (const Segment& s : segments) {
        if (s.match == prev_match && !parts.empty())
          parts.back().end = s.end;
        else
          parts.push_back({s.begin, s.end, false});
        prev_match = s.match;
      }
      break;
    case SplitBehavior::kMergedWithPrevious:  // a match joins the part before it
      for (const Segment& s : segments) {
        if (s.match && !prev_match && !parts.empty())
          parts.back().end = s.end;
        else
          parts.push_back({s.begin, s.end, false});
        prev_match = s.match;
      }
      break;
    case SplitBehavior::kMergedWithNext:  // a match joins the part after it
      for (auto it = segments.rbegin(); it != segments.rend(); ++it) {
        if (it->match && !prev_match && !parts.empty())
          parts.back().begin = it->begin;
        else
          parts.push_back({it->begin, it->end, false});
        prev_match = it->match;
      }
      std::reverse(parts.begin(), parts.end());
      break;
  }
  for (const Part& p : parts)
    if (!p.remove && p.end > p.begin)
      out.push_back({piece.text.substr(p.begin, p.end - p.begin), piece.first && p.begin == 0});
}

// ---------------------------------------------------------------------------------------------
// Normalizer: tokenizer.json's "normalizer" (NFC, Prepend, Replace, or a Sequence of them).

// Canonical composition (NFC) of UTF-8 text; ASCII is already NFC. Invalid UTF-8 becomes U+FFFD
// here as in the tokenizers library (which only accepts valid strings).
std::string nfc(const std::string& s) {
  if (std::all_of(s.begin(), s.end(), [](char c) { return static_cast<unsigned char>(c) < 0x80; }))
    return s;
  UErrorCode status = U_ZERO_ERROR;
  const icu::Normalizer2* n = icu::Normalizer2::getNFCInstance(status);
  MOE_CHECK(U_SUCCESS(status), "tokenizer", "ICU's NFC normalizer is unavailable: {}",
            u_errorName(status));
  const icu::UnicodeString in = icu::UnicodeString::fromUTF8(s);
  if (n->isNormalized(in, status) && U_SUCCESS(status)) return s;
  status = U_ZERO_ERROR;
  const icu::UnicodeString out = n->normalize(in, status);
  MOE_CHECK(U_SUCCESS(status), "tokenizer", "NFC normalization failed: {}", u_errorName(status));
  std::string r;
  out.toUTF8String(r);
  return r;
}

class Normalizer {
 public:
  void parse(const Fields& f, const json& node, const std::string& where) {
    const std::string type = f.string(node, where, "type");
    if (type == "Sequence") {
      const json& list = f.array(node, where, "normalizers");
      for (size_t i = 0; i < list.size(); ++i)
        parse(f, list[i], fmt::format("{}.normalizers[{}]", where, i));
    } else if (type == "NFC") {
      steps_.push_back({Kind::kNfc, {}, {}});
    } else if (type == "Prepend") {
      steps_.push_back({Kind::kPrepend, f.string(node, where, "prepend"), {}});
    } else if (type == "Replace") {
      steps_.push_back({Kind::kReplace, f.string(node, where, "content"), f.pattern(node, where)});
    } else {
      f.fail(
          fmt::format("{}: normalizer type {:?} is not supported (NFC, Prepend, Replace, "
                      "Sequence are)",
                      where, type));
    }
  }

  std::string apply(std::string s) const {
    for (const Step& step : steps_) {
      switch (step.kind) {
        case Kind::kNfc: s = nfc(s); break;
        case Kind::kPrepend:
          if (!s.empty()) s = step.text + s;
          break;
        case Kind::kReplace: s = step.pattern.replace_all(s, step.text); break;
      }
    }
    return s;
  }

 private:
  enum class Kind { kNfc, kPrepend, kReplace };
  struct Step {
    Kind kind;
    std::string text;  // Prepend: what; Replace: the replacement
    Pattern pattern;
  };
  std::vector<Step> steps_;
};

// ---------------------------------------------------------------------------------------------
// Pre-tokenizer: tokenizer.json's "pre_tokenizer" (Split, ByteLevel, Metaspace, Digits, or a
// Sequence of them) cuts the normalized text into the words BPE sees.

class PreTokenizer {
 public:
  void parse(const Fields& f, const json& node, const std::string& where) {
    const std::string type = f.string(node, where, "type");
    Step step;
    if (type == "Sequence") {
      const json& list = f.array(node, where, "pretokenizers");
      for (size_t i = 0; i < list.size(); ++i)
        parse(f, list[i], fmt::format("{}.pretokenizers[{}]", where, i));
      return;
    } else if (type == "Split") {
      step.kind = Kind::kSplit;
      step.pattern = f.pattern(node, where);
      step.behavior = parse_behavior(f, f.string(node, where, "behavior"), where);
      step.invert = f.flag(node, where, "invert", false);
    } else if (type == "ByteLevel") {
      step.kind = Kind::kByteLevel;
      step.add_prefix_space = f.flag(node, where, "add_prefix_space", true);
      if (f.flag(node, where, "use_regex", true))
        step.pattern.regex = std::make_shared<const Regex>(kGpt2Regex, "ByteLevel");
      step.behavior = SplitBehavior::kIsolated;
    } else if (type == "Metaspace") {
      step.kind = Kind::kMetaspace;
      step.text = f.string(node, where, "replacement");
      if (step.text.empty() || char_length(step.text, 0) != step.text.size())
        f.fail(fmt::format("{}.replacement must be one character", where));
      step.prepend = Prepend::kAlways;
      if (const json* scheme = f.find(node, "prepend_scheme")) {
        const std::string s = f.string(*scheme, where + ".prepend_scheme");
        if (s == "always")
          step.prepend = Prepend::kAlways;
        else if (s == "first")
          step.prepend = Prepend::kFirst;
        else if (s == "never")
          step.prepend = Prepend::kNever;
        else
          f.fail(fmt::format("{}.prepend_scheme {:?} is none of always, first, never", where, s));
      } else if (!f.flag(node, where, "add_prefix_space", true)) {
        step.prepend = Prepend::kNever;  // the older field
      }
      if (f.flag(node, where, "split", true)) step.pattern.literal = step.text;
      step.behavior = SplitBehavior::kMergedWithNext;
    } else if (type == "Digits") {
      step.kind = Kind::kSplit;
      const bool individual = f.flag(node, where, "individual_digits", false);
      step.pattern.regex =
          std::make_shared<const Regex>(individual ? R"(\p{N})" : R"(\p{N}+)", "Digits");
      step.behavior = SplitBehavior::kIsolated;
    } else {
      f.fail(
          fmt::format("{}: pre-tokenizer type {:?} is not supported (Split, ByteLevel, "
                      "Metaspace, Digits, Sequence are)",
                      where, type));
    }
    steps_.push_back(std::move(step));
  }

  void apply(std::vector<Piece>& pieces) const {
    std::vector<Piece> next;
    for (const Step& step : steps_) {
      next.clear();
      for (Piece& piece : pieces) {
        switch (step.kind) {
          case Kind::kSplit:
            split_piece(piece, step.pattern.find_all(piece.text), step.behavior, step.invert, next);
            break;
          case Kind::kByteLevel: {
            if (step.add_prefix_space && !piece.text.starts_with(' '))
              piece.text = " " + piece.text;
            const size_t from = next.size();
            if (step.pattern.regex)
              split_piece(piece, step.pattern.find_all(piece.text), step.behavior, false, next);
            else
              next.push_back(std::move(piece));
            // every byte becomes its character of GPT-2's map
            const ByteLevelMap& map = byte_level_map();
            for (size_t i = from; i < next.size(); ++i) {
              std::string mapped;
              mapped.reserve(next[i].text.size() * 2);
              for (unsigned char b : next[i].text) mapped += map.to_char[b];
              next[i].text = std::move(mapped);
            }
            break;
          }
          case Kind::kMetaspace: {
            piece.text = Pattern{nullptr, " "}.replace_all(piece.text, step.text);
            const bool prepend = !piece.text.starts_with(step.text) &&
                                 (step.prepend == Prepend::kAlways ||
                                  (step.prepend == Prepend::kFirst && piece.first));
            if (prepend) piece.text = step.text + piece.text;
            if (!step.pattern.literal.empty())
              split_piece(piece, step.pattern.find_all(piece.text), step.behavior, false, next);
            else if (!piece.text.empty())
              next.push_back(std::move(piece));
            break;
          }
        }
      }
      pieces.swap(next);
    }
  }

 private:
  enum class Kind { kSplit, kByteLevel, kMetaspace };
  enum class Prepend { kAlways, kFirst, kNever };
  struct Step {
    Kind kind = Kind::kSplit;
    Pattern pattern;  // Split's; ByteLevel's GPT-2 regex; Metaspace's replacement when it splits
    SplitBehavior behavior = SplitBehavior::kIsolated;
    bool invert = false;
    bool add_prefix_space = false;  // ByteLevel
    std::string text;               // Metaspace's replacement character
    Prepend prepend = Prepend::kAlways;
  };
  std::vector<Step> steps_;
};

// ---------------------------------------------------------------------------------------------
// Decoder: tokenizer.json's "decoder" (ByteLevel, Replace, ByteFallback, Fuse, Strip,
// Metaspace, or a Sequence of them), each a step from a list of token texts to another.

class Decoder {
 public:
  void parse(const Fields& f, const json& node, const std::string& where) {
    const std::string type = f.string(node, where, "type");
    Step step;
    if (type == "Sequence") {
      const json& list = f.array(node, where, "decoders");
      for (size_t i = 0; i < list.size(); ++i)
        parse(f, list[i], fmt::format("{}.decoders[{}]", where, i));
      return;
    } else if (type == "ByteLevel") {
      step.kind = Kind::kByteLevel;
    } else if (type == "Replace") {
      step.kind = Kind::kReplace;
      step.pattern = f.pattern(node, where);
      step.text = f.string(node, where, "content");
    } else if (type == "ByteFallback") {
      step.kind = Kind::kByteFallback;
    } else if (type == "Fuse") {
      step.kind = Kind::kFuse;
    } else if (type == "Strip") {
      step.kind = Kind::kStrip;
      step.text = f.string(node, where, "content");
      if (step.text.empty() || char_length(step.text, 0) != step.text.size())
        f.fail(fmt::format("{}.content must be one character", where));
      const int64_t start = f.integer(f.get(node, where, "start"), where + ".start");
      const int64_t stop = f.integer(f.get(node, where, "stop"), where + ".stop");
      if (start < 0 || stop < 0) f.fail(fmt::format("{}: start and stop must be >= 0", where));
      step.start = static_cast<size_t>(start);
      step.stop = static_cast<size_t>(stop);
    } else if (type == "Metaspace") {
      step.kind = Kind::kMetaspace;
      step.text = f.string(node, where, "replacement");
      const json* scheme = f.find(node, "prepend_scheme");
      step.strip_first = scheme ? f.string(*scheme, where + ".prepend_scheme") != "never"
                                : f.flag(node, where, "add_prefix_space", true);
    } else {
      f.fail(
          fmt::format("{}: decoder type {:?} is not supported (ByteLevel, Replace, "
                      "ByteFallback, Fuse, Strip, Metaspace, Sequence are)",
                      where, type));
    }
    steps_.push_back(std::move(step));
    has_decoder_ = true;
  }

  std::string apply(std::vector<std::string> tokens) const {
    if (!has_decoder_) {  // the tokenizers library joins the tokens with spaces
      std::string out;
      for (size_t i = 0; i < tokens.size(); ++i) out += (i ? " " : "") + tokens[i];
      return out;
    }
    for (const Step& step : steps_) tokens = run(step, std::move(tokens));
    std::string out;
    for (const std::string& t : tokens) out += t;
    return out;
  }

 private:
  enum class Kind { kByteLevel, kReplace, kByteFallback, kFuse, kStrip, kMetaspace };
  struct Step {
    Kind kind = Kind::kFuse;
    Pattern pattern;
    std::string text;  // Replace's content, Strip's character, Metaspace's replacement
    size_t start = 0, stop = 0;
    bool strip_first = true;
  };

  static std::vector<std::string> run(const Step& step, std::vector<std::string> tokens) {
    switch (step.kind) {
      case Kind::kByteLevel: {
        // Every character back to its byte; a token with a character outside the map (an added
        // token such as DeepSeek's <｜begin▁of▁sentence｜>) stays as its UTF-8 text.
        const ByteLevelMap& map = byte_level_map();
        std::string bytes;
        for (const std::string& t : tokens) {
          const size_t before = bytes.size();
          bool mapped = true;
          for (size_t i = 0; i < t.size() && mapped;) {
            const size_t n = utf8_sequence(t, i);
            const uint32_t cp = n ? code_point(t, i, n) : 0xFFFFFFFF;
            mapped = cp < map.to_byte.size() && map.to_byte[cp] >= 0;
            if (mapped) bytes += static_cast<char>(map.to_byte[cp]);
            i += n ? n : 1;
          }
          if (!mapped) bytes.replace(before, std::string::npos, t);
        }
        return {utf8_lossy(bytes)};
      }
      case Kind::kReplace:
        for (std::string& t : tokens) t = step.pattern.replace_all(t, step.text);
        return tokens;
      case Kind::kByteFallback: {
        // Runs of <0xNN> tokens become their bytes when those are valid UTF-8, else one U+FFFD
        // per byte.
        std::vector<std::string> out;
        std::string bytes;
        size_t n_bytes = 0;
        const auto flush = [&] {
          if (!n_bytes) return;
          if (utf8_lossy(bytes) == bytes)
            out.push_back(bytes);
          else
            for (size_t i = 0; i < n_bytes; ++i) out.emplace_back("\xEF\xBF\xBD");
          bytes.clear();
          n_bytes = 0;
        };
        for (std::string& t : tokens) {
          const int byte = byte_token_value(t);
          if (byte >= 0) {
            bytes += static_cast<char>(byte);
            ++n_bytes;
          } else {
            flush();
            out.push_back(std::move(t));
          }
        }
        flush();
        return out;
      }
      case Kind::kFuse: {
        std::string all;
        for (const std::string& t : tokens) all += t;
        return {all};
      }
      case Kind::kStrip:
        for (std::string& t : tokens) {
          const std::string_view c = step.text;
          size_t begin = 0, end = t.size();
          for (size_t k = 0; k < step.start && std::string_view(t).substr(begin).starts_with(c);
               ++k)
            begin += c.size();
          for (size_t k = 0; k < step.stop && end >= begin + c.size() &&
                             std::string_view(t).substr(begin, end - begin).ends_with(c);
               ++k)
            end -= c.size();
          t = t.substr(begin, end - begin);
        }
        return tokens;
      case Kind::kMetaspace:
        // The replacement character back to a space; in the first token it is dropped (the
        // space the pre-tokenizer prepended).
        for (size_t i = 0; i < tokens.size(); ++i)
          tokens[i] = Pattern{nullptr, step.text}.replace_all(
              tokens[i], i == 0 && step.strip_first ? "" : " ");
        return tokens;
    }
    return tokens;
  }

  // The byte of a byte-fallback token "<0xNN>", or -1.
  static int byte_token_value(std::string_view t) {
    if (t.size() != 6 || !t.starts_with("<0x") || t[5] != '>') return -1;
    int value = 0;
    for (char c : t.substr(3, 2)) {
      const int d = c >= '0' && c <= '9'   ? c - '0'
                    : c >= 'A' && c <= 'F' ? c - 'A' + 10
                    : c >= 'a' && c <= 'f' ? c - 'a' + 10
                                           : -1;
      if (d < 0) return -1;
      value = value * 16 + d;
    }
    return value;
  }

  std::vector<Step> steps_;
  bool has_decoder_ = false;
};

// ---------------------------------------------------------------------------------------------
// Added tokens (tokenizer.json's "added_tokens"): found in the text as written, leftmost match
// first and the longest token at that place (the tokenizers library's Aho-Corasick split), then
// checked against the token's single_word rule and widened by its lstrip/rstrip rules.

struct AddedToken {
  std::string content;
  int32_t id = 0;
  bool single_word = false, lstrip = false, rstrip = false, normalized = false, special = false;
};

struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const noexcept { return std::hash<std::string_view>{}(s); }
};
template <typename T>
using StringMap = std::unordered_map<std::string, T, StringHash, std::equal_to<>>;

class AddedTokenSplitter {
 public:
  struct Segment {
    size_t begin, end;
    int32_t id;  // the added token's id, or -1 for plain text
  };

  void add(const std::string& text, const AddedToken* token) {
    if (text.empty() || !by_text_.emplace(text, token).second) return;
    first_byte_[static_cast<unsigned char>(text[0])] = true;
    if (std::find(lengths_.begin(), lengths_.end(), text.size()) == lengths_.end()) {
      lengths_.push_back(text.size());
      std::sort(lengths_.begin(), lengths_.end(), std::greater<>());
    }
  }

  // The text as runs of plain text and added tokens, in order, none empty.
  std::vector<Segment> split(std::string_view s) const {
    std::vector<Segment> out;
    size_t done = 0;  // end of the last added token
    for (size_t i = 0; i < s.size() && !by_text_.empty();) {
      const AddedToken* token = nullptr;
      size_t len = 0;
      if (first_byte_[static_cast<unsigned char>(s[i])]) {
        for (size_t n : lengths_) {
          if (i + n > s.size()) continue;
          const auto it = by_text_.find(s.substr(i, n));
          if (it != by_text_.end()) {
            token = it->second;
            len = n;
            break;
          }
        }
      }
      if (!token) {
        ++i;
        continue;
      }
      size_t begin = i, end = i + len;
      i = end;  // matches do not overlap
      if (token->single_word &&
          (ends_with_word(s.substr(0, begin)) || starts_with_word(s.substr(end))))
        continue;
      if (token->lstrip) begin = std::max(done, begin - trailing_space(s.substr(0, begin)));
      if (token->rstrip) end += leading_space(s.substr(end));
      if (begin < done) continue;
      if (begin > done) out.push_back({done, begin, -1});
      out.push_back({begin, end, token->id});
      done = end;
      i = std::max(i, end);
    }
    if (done < s.size()) out.push_back({done, s.size(), -1});
    return out;
  }

 private:
  // Word characters as Rust's char::is_alphanumeric or '_' (letters and numbers).
  static const Regex& word_char() {
    static const Regex re(R"([\p{L}\p{N}_])", "added tokens");
    return re;
  }
  static bool ends_with_word(std::string_view s) {
    if (s.empty()) return false;
    size_t i = s.size() - 1;
    while (i > 0 && (static_cast<unsigned char>(s[i]) & 0xC0) == 0x80) --i;
    return word_char().search(s.substr(i));
  }
  static bool starts_with_word(std::string_view s) {
    return !s.empty() && word_char().search(s.substr(0, char_length(s, 0)));
  }
  // Bytes of white space at the start / end of s.
  static size_t leading_space(std::string_view s) {
    size_t i = 0;
    while (i < s.size()) {
      const size_t n = utf8_sequence(s, i);
      if (!n || !is_white_space(code_point(s, i, n))) break;
      i += n;
    }
    return i;
  }
  static size_t trailing_space(std::string_view s) {
    size_t end = s.size();
    while (end > 0) {
      size_t i = end - 1;
      while (i > 0 && (static_cast<unsigned char>(s[i]) & 0xC0) == 0x80) --i;
      const size_t n = utf8_sequence(s, i);
      if (n != end - i || !is_white_space(code_point(s, i, n))) break;
      end = i;
    }
    return s.size() - end;
  }

  StringMap<const AddedToken*> by_text_;
  std::vector<size_t> lengths_;  // the distinct token lengths, longest first
  std::array<bool, 256> first_byte_{};
};

// ---------------------------------------------------------------------------------------------
// The BPE model (tokenizer.json's "model" with "type": "BPE").

// ---------------------------------------------------------------------------------------------
// The BPE model's two lookups, as flat open-addressing tables (linear probing, at most half
// full): a token's text to its id, and a pair of ids to their merge. Loading gpt-oss's
// 200k tokens and 446k merges does 1.3 million text lookups; node-based hash maps spent most of
// the loading time there, in cache misses.

// Token text -> id. The texts live once, in the caller's id -> text table.
class TokenIndex {
 public:
  void reset(size_t n) { slots_.assign(capacity_for(n), 0); }
  // The id of `text`, or -1.
  int32_t find(std::string_view text, const std::vector<std::string>& texts) const {
    const uint64_t h = hash(text);
    for (size_t i = h & mask(); slots_[i] != 0; i = (i + 1) & mask())
      if ((slots_[i] >> 32) == (h >> 32)) {
        const auto id = static_cast<int32_t>((slots_[i] & 0xffffffffu) - 1);
        if (texts[static_cast<size_t>(id)] == text) return id;
      }
    return -1;
  }
  // Adds texts[id]; false if that text already has an id.
  bool insert(int32_t id, const std::vector<std::string>& texts) {
    const std::string_view text = texts[static_cast<size_t>(id)];
    if (find(text, texts) >= 0) return false;
    const uint64_t h = hash(text);
    size_t i = h & mask();
    while (slots_[i] != 0) i = (i + 1) & mask();
    slots_[i] = (h & ~uint64_t{0xffffffffu}) | (static_cast<uint64_t>(id) + 1);
    ++size_;
    return true;
  }
  bool empty() const { return size_ == 0; }

 private:
  static uint64_t hash(std::string_view s) { return std::hash<std::string_view>{}(s); }
  static size_t capacity_for(size_t n) {
    size_t cap = 16;
    while (cap < 2 * n) cap *= 2;
    return cap;
  }
  size_t mask() const { return slots_.size() - 1; }

  std::vector<uint64_t> slots_;  // high 32 bits of the hash, id + 1; 0 is empty
  size_t size_ = 0;
};

// (left id, right id) -> the merge's rank and the merged token's id.
class MergeTable {
 public:
  struct Merge {
    int32_t rank, id;
  };
  void reset(size_t n) {
    size_t cap = 16;
    while (cap < 2 * n) cap *= 2;
    slots_.assign(cap, Slot{});
    shift_ = 64 - std::countr_zero(cap);
  }
  const Merge* find(int32_t left, int32_t right) const {
    const uint64_t key = pair_key(left, right);
    for (size_t i = start(key);; i = (i + 1) & (slots_.size() - 1)) {
      if (slots_[i].key == key) return &slots_[i].merge;
      if (slots_[i].key == kEmpty) return nullptr;
    }
  }
  // A pair given twice keeps its later merge.
  void set(int32_t left, int32_t right, Merge merge) {
    const uint64_t key = pair_key(left, right);
    size_t i = start(key);
    while (slots_[i].key != kEmpty && slots_[i].key != key) i = (i + 1) & (slots_.size() - 1);
    slots_[i] = {key, merge};
  }

 private:
  static constexpr uint64_t kEmpty = ~uint64_t{0};  // ids are below 2^26: no pair is this
  struct Slot {
    uint64_t key = kEmpty;
    Merge merge{};
  };
  static uint64_t pair_key(int32_t a, int32_t b) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
  }
  // Fibonacci hashing: the top bits of key times 2^64 / golden ratio.
  size_t start(uint64_t key) const {
    return static_cast<size_t>((key * 0x9E3779B97F4A7C15ull) >> shift_);
  }

  std::vector<Slot> slots_;
  int shift_ = 64;
};

// model.vocab and model.merges as written, before they are checked: the bulk of a large
// tokenizer.json (gpt-oss's 28 MB hold 200k tokens and 446k merges), read straight from the
// text instead of through a JSON document (TokenizerJson below).
struct RawMerge {
  std::string a, b;
  bool joined = false;  // "a b" in a, not yet cut at its space
};
struct RawModel {
  bool has_vocab = false, has_merges = false;
  std::vector<std::pair<std::string, int64_t>> vocab;
  std::vector<RawMerge> merges;
};

class BpeModel {
 public:
  // `model` is tokenizer.json's "model" without its vocab and merges, which are in `raw`.
  void parse(const Fields& f, const json& model, RawModel raw) {
    const std::string where = "model";
    // vocab: token -> id
    if (!raw.has_vocab) f.fail("model has no \"vocab\"");
    if (raw.vocab.empty()) f.fail(fmt::format("{} is empty", f.vocab()));
    vocab_.reset(raw.vocab.size());
    for (auto& [token, id64] : raw.vocab) {
      if (id64 < 0 || id64 >= (int64_t{1} << 26))
        f.fail(fmt::format("model.vocab[{:?}] = {} is not a valid token id", token, id64));
      const auto id = static_cast<int32_t>(id64);
      if (static_cast<size_t>(id) >= id_to_token_.size()) id_to_token_.resize(id + size_t{1});
      if (!id_to_token_[id].empty())
        f.fail(fmt::format("model.vocab gives the id {} to both {:?} and {:?}", id,
                           id_to_token_[id], token));
      if (token.empty()) f.fail(fmt::format("{} has an empty token (id {})", f.vocab(), id));
      id_to_token_[id] = std::move(token);
      if (!vocab_.insert(id, id_to_token_))
        f.fail(fmt::format("{} lists {:?} twice (ids {} and {})", f.vocab(), id_to_token_[id],
                           find(id_to_token_[id]), id));
    }

    // merges, in priority order
    if (!raw.has_merges) f.fail("model has no \"merges\"");
    merges_.reset(raw.merges.size());
    const auto lookup = [&](std::string_view token, size_t i, const char* what) {
      const int32_t id = find(token);
      if (id < 0)
        f.fail(
            fmt::format("{}[{}]: the {} {:?} is not in {}", f.merges(), i, what, token, f.vocab()));
      return id;
    };
    std::string joined;
    for (size_t i = 0; i < raw.merges.size(); ++i) {
      RawMerge& m = raw.merges[i];
      std::string_view a = m.a, b = m.b;
      if (m.joined) {
        const size_t space = a.find(' ');
        if (space == std::string::npos || a.find(' ', space + 1) != std::string::npos)
          f.fail(fmt::format("{}[{}] = {:?} is not two tokens \"a b\"", f.merges(), i, m.a));
        b = a.substr(space + 1);
        a = a.substr(0, space);
      }
      joined.assign(a).append(b);
      const int32_t left = lookup(a, i, "token"), right = lookup(b, i, "token");
      const int32_t merged = lookup(joined, i, "merged token");
      // A pair listed twice keeps its later rank, as in the tokenizers library.
      merges_.set(left, right, {static_cast<int32_t>(i), merged});
    }

    if (const json* unk = f.find(model, "unk_token")) {
      const std::string token = f.string(*unk, "model.unk_token");
      unk_id_ = find(token);
      if (*unk_id_ < 0) f.fail(fmt::format("model.unk_token {:?} is not in {}", token, f.vocab()));
    }
    fuse_unk_ = f.flag(model, where, "fuse_unk", false);
    byte_fallback_ = f.flag(model, where, "byte_fallback", false);
    ignore_merges_ = f.flag(model, where, "ignore_merges", false);
    for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"})
      if (const json* v = f.find(model, key);
          v && !f.string(*v, fmt::format("model.{}", key)).empty())
        f.fail(fmt::format("model.{} is not supported (only the empty one)", key));
    // The byte-fallback tokens <0x00>..<0xFF>, where the vocabulary has them.
    for (int b = 0; b < 256; ++b) {
      byte_ids_[static_cast<size_t>(b)] = find(fmt::format("<0x{:02X}>", b));
    }
    // BPE-dropout (Provilkov et al., 2020) skips each merge with probability "dropout": the
    // tokenizers library then encodes at random. Only its absence (or 0) is supported.
    if (const json* dropout = f.find(model, "dropout")) {
      if (!dropout->is_number())
        f.fail(fmt::format("model.dropout must be a number, not {}", dropout->type_name()));
      if (dropout->get<double>() != 0.0)
        f.fail(
            fmt::format("model.dropout = {} is not supported: BPE-dropout encodes at random "
                        "(only null or 0 is supported)",
                        dropout->dump()));
    }
  }

  const std::vector<std::string>& id_to_token() const { return id_to_token_; }

  // BPE of one word: its characters (or their <0xNN> byte tokens, or the unknown token), then
  // the merges, the pair of lowest rank first (leftmost among equals), until none applies.
  void tokenize(std::string_view word, std::vector<int32_t>& out) const {
    if (ignore_merges_) {  // a word in the vocabulary is its own token
      if (const int32_t id = find(word); id >= 0) {
        out.push_back(id);
        return;
      }
    }
    struct Symbol {
      int32_t id, prev, next;
      bool alive;
    };
    std::vector<Symbol> symbols;
    symbols.reserve(word.size());
    const auto push = [&](int32_t id) {
      const auto n = static_cast<int32_t>(symbols.size());
      symbols.push_back({id, n - 1, n + 1, true});
    };
    bool pending_unk = false;  // an unknown-token run not yet pushed (fuse_unk joins them)
    for (size_t i = 0; i < word.size();) {
      const size_t n = char_length(word, i);
      const std::string_view c = word.substr(i, n);
      i += n;
      if (const int32_t id = find(c); id >= 0) {
        if (pending_unk) push(*unk_id_);
        pending_unk = false;
        push(id);
        continue;
      }
      if (byte_fallback_ && std::all_of(c.begin(), c.end(), [&](char b) {
            return byte_ids_[static_cast<unsigned char>(b)] >= 0;
          })) {
        if (pending_unk) push(*unk_id_);
        pending_unk = false;
        for (char b : c) push(byte_ids_[static_cast<unsigned char>(b)]);
        continue;
      }
      if (unk_id_) {
        if (pending_unk && !fuse_unk_) push(*unk_id_);
        pending_unk = true;
      }
      // without an unknown token the character is dropped, as in the tokenizers library
    }
    if (pending_unk) push(*unk_id_);
    if (symbols.empty()) return;
    symbols.back().next = -1;

    // Candidate merges (rank, position of the left symbol, merged id), lowest rank first.
    using Candidate = std::tuple<int32_t, int32_t, int32_t>;
    std::priority_queue<Candidate, std::vector<Candidate>, std::greater<>> queue;
    const auto consider = [&](int32_t pos) {
      const int32_t next = symbols[pos].next;
      if (next < 0) return;
      if (const MergeTable::Merge* m = merges_.find(symbols[pos].id, symbols[next].id))
        queue.emplace(m->rank, pos, m->id);
    };
    for (int32_t i = 0; i + 1 < static_cast<int32_t>(symbols.size()); ++i) consider(i);
    while (!queue.empty()) {
      const auto [rank, pos, merged] = queue.top();
      queue.pop();
      Symbol& left = symbols[pos];
      if (!left.alive || left.next < 0) continue;
      // stale: the pair at pos changed since this candidate was queued
      const MergeTable::Merge* m = merges_.find(left.id, symbols[left.next].id);
      if (!m || m->id != merged) continue;
      Symbol& right = symbols[left.next];
      left.id = merged;
      right.alive = false;
      left.next = right.next;
      if (right.next >= 0) symbols[right.next].prev = pos;
      if (left.prev >= 0) consider(left.prev);
      consider(pos);
    }
    for (int32_t i = 0; i >= 0; i = symbols[i].next) out.push_back(symbols[i].id);
  }

 private:
  int32_t find(std::string_view token) const { return vocab_.find(token, id_to_token_); }

  TokenIndex vocab_;
  std::vector<std::string> id_to_token_;
  MergeTable merges_;
  std::array<int32_t, 256> byte_ids_{};
  std::optional<int32_t> unk_id_;
  bool fuse_unk_ = false, byte_fallback_ = false, ignore_merges_ = false;
};

// ---------------------------------------------------------------------------------------------
// Reading the file. One pass of nlohmann's SAX parser builds the JSON document of everything
// but model.vocab and model.merges, which go straight into a RawModel: a document of them would
// be 1.3 million nodes for gpt-oss's file. Anything unexpected there (a wrong type, a repeated
// key, a syntax error) ends the pass, and the whole file is read again as a document, whose
// checks name what is wrong.

class TokenizerJsonSax final : public nlohmann::json_sax<json> {
 public:
  explicit TokenizerJsonSax(RawModel& raw) : raw_(raw) {}
  json root;

  bool null() override { return value(nullptr); }
  bool boolean(bool v) override { return value(v); }
  bool number_integer(int64_t v) override { return mode_ == kVocabId ? vocab_id(v) : value(v); }
  bool number_unsigned(uint64_t v) override {
    if (mode_ != kVocabId) return value(v);
    return v <= static_cast<uint64_t>(INT64_MAX) && vocab_id(static_cast<int64_t>(v));
  }
  bool number_float(double v, const std::string& /*text*/) override { return value(v); }
  bool string(std::string& v) override {
    switch (mode_) {
      case kMerges: raw_.merges.push_back({std::move(v), {}, true}); return true;
      case kPairFirst:
        pair_.a = std::move(v);
        mode_ = kPairSecond;
        return true;
      case kPairSecond:
        pair_.b = std::move(v);
        mode_ = kPairEnd;
        return true;
      default: return value(std::move(v));
    }
  }
  bool binary(json::binary_t& /*v*/) override { return false; }
  bool start_object(size_t /*n*/) override {
    if (mode_ == kVocabStart) {
      mode_ = kVocab;
      return true;
    }
    return open(json::object());
  }
  bool key(std::string& k) override {
    if (mode_ == kVocab) {
      token_ = std::move(k);
      mode_ = kVocabId;
      return true;
    }
    if (mode_ != kNone) return false;
    if (model_ && stack_.back() == model_) {
      if (k == "vocab" || k == "merges") {
        bool& seen = k == "vocab" ? raw_.has_vocab : raw_.has_merges;
        if (seen) return false;
        seen = true;
        mode_ = k == "vocab" ? kVocabStart : kMergesStart;
        return true;
      }
    }
    slot_ = &(*stack_.back())[k];
    model_key_ = stack_.size() == 1 && k == "model";
    return true;
  }
  bool end_object() override {
    if (mode_ == kVocab) {
      mode_ = kNone;
      return true;
    }
    if (mode_ != kNone) return false;
    stack_.pop_back();
    return true;
  }
  bool start_array(size_t /*n*/) override {
    if (mode_ == kMergesStart || mode_ == kMerges) {
      mode_ = mode_ == kMergesStart ? kMerges : kPairFirst;
      return true;
    }
    return open(json::array());
  }
  bool end_array() override {
    switch (mode_) {
      case kPairEnd:
        raw_.merges.push_back(std::move(pair_));
        pair_ = {};
        mode_ = kMerges;
        return true;
      case kMerges: mode_ = kNone; return true;
      case kNone: stack_.pop_back(); return true;
      default: return false;
    }
  }
  bool parse_error(size_t /*position*/, const std::string& /*last_token*/,
                   const nlohmann::detail::exception& /*ex*/) override {
    return false;
  }

 private:
  enum Mode {
    kNone,
    kVocabStart,
    kVocab,
    kVocabId,
    kMergesStart,
    kMerges,
    kPairFirst,
    kPairSecond,
    kPairEnd
  };

  bool vocab_id(int64_t id) {
    raw_.vocab.emplace_back(std::move(token_), id);
    mode_ = kVocab;
    return true;
  }
  // A value where the document is being built: the root, an array's next element, or the
  // value of the last key.
  json* place(json&& v) {
    if (stack_.empty()) {
      root = std::move(v);
      return &root;
    }
    json& top = *stack_.back();
    if (top.is_array()) {
      top.push_back(std::move(v));
      return &top.back();
    }
    *slot_ = std::move(v);
    return slot_;
  }
  bool value(json&& v) {
    if (mode_ != kNone) return false;
    place(std::move(v));
    return true;
  }
  bool open(json&& container) {
    if (mode_ != kNone) return false;
    const bool is_model = model_key_ && stack_.size() == 1 && container.is_object();
    json* p = place(std::move(container));
    if (is_model) model_ = p;
    stack_.push_back(p);
    return true;
  }

  RawModel& raw_;
  Mode mode_ = kNone;
  std::vector<json*> stack_;
  json* slot_ = nullptr;
  json* model_ = nullptr;
  bool model_key_ = false;
  std::string token_;
  RawMerge pair_;
};

// The document of the file. The fast pass leaves model.vocab and model.merges out of it and
// puts them in `raw`; the slow one leaves them in, for take_vocab_and_merges.
json read_tokenizer_json(const Fields& f, const std::string& text, RawModel& raw) {
  {
    TokenizerJsonSax sax(raw);
    if (json::sax_parse(text, &sax)) return std::move(sax.root);
  }
  raw = {};
  try {
    return json::parse(text);
  } catch (const json::exception& e) {
    f.fail(fmt::format("not valid JSON: {}", e.what()));
  }
}

// model.vocab and model.merges from the document into `raw`, where the fast pass did not.
void take_vocab_and_merges(const Fields& f, json& model, RawModel& raw) {
  if (const json* vocab = f.find(model, "vocab"); vocab && !raw.has_vocab) {
    f.expect_object(*vocab, "model.vocab");
    raw.has_vocab = true;
    for (const auto& [token, id] : vocab->items())
      raw.vocab.emplace_back(token, f.integer(id, fmt::format("model.vocab[{:?}]", token)));
  }
  if (model.contains("merges") && !raw.has_merges) {
    const json& merges = f.array(model, "model", "merges");
    raw.has_merges = true;
    for (size_t i = 0; i < merges.size(); ++i) {
      const json& m = merges[i];
      if (m.is_string())
        raw.merges.push_back({m.get<std::string>(), {}, true});
      else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string())
        raw.merges.push_back({m[0].get<std::string>(), m[1].get<std::string>(), false});
      else
        f.fail(
            fmt::format("model.merges[{}] must be \"a b\" or [\"a\", \"b\"], not {}", i, m.dump()));
    }
  }
  model.erase("vocab");
  model.erase("merges");
}

// ---------------------------------------------------------------------------------------------
// The tokenizer: added tokens, normalizer, pre-tokenizer, BPE, decoder.

class HfTokenizer final : public Tokenizer {
 public:
  // The file's document without model.vocab and model.merges, which are in `raw`; `config`,
  // when not empty, is the tokenizer_config.json that may name bos and eos.
  HfTokenizer(const Fields& f, json root, RawModel raw, const fs::path& config) {
    f.expect_object(root, "the file");

    f.get(root, "the file", "model");  // there, and not null
    json& model = root["model"];
    f.expect_object(model, "model");
    const json* type = f.find(model, "type");
    const std::string model_type = type ? f.string(*type, "model.type")
                                   : raw.has_merges || model.contains("merges") ? "BPE"
                                                                                : "(none)";
    if (model_type != "BPE")
      f.fail(fmt::format("model type {:?} is not supported (only BPE is)", model_type));
    take_vocab_and_merges(f, model, raw);
    bpe_.parse(f, model, std::move(raw));
    id_to_token_ = bpe_.id_to_token();

    if (const json* norm = f.find(root, "normalizer")) normalizer_.parse(f, *norm, "normalizer");
    if (const json* pre = f.find(root, "pre_tokenizer")) pre_.parse(f, *pre, "pre_tokenizer");
    if (const json* dec = f.find(root, "decoder")) decoder_.parse(f, *dec, "decoder");
    if (const json* added = f.find(root, "added_tokens")) parse_added(f, *added);
    has_token_.assign(id_to_token_.size(), false);
    for (size_t i = 0; i < id_to_token_.size(); ++i) has_token_[i] = !id_to_token_[i].empty();

    find_bos_eos(config);
  }

  std::vector<int32_t> encode(const std::string& text) const override {
    std::vector<int32_t> ids;
    for (const auto& seg : raw_added_.split(text)) {
      if (seg.id >= 0)
        ids.push_back(seg.id);
      else
        encode_plain(std::string_view(text).substr(seg.begin, seg.end - seg.begin), seg.begin == 0,
                     ids);
    }
    return ids;
  }

  std::string decode(const std::vector<int32_t>& ids) const override {
    std::vector<std::string> tokens;
    tokens.reserve(ids.size());
    for (int32_t id : ids) {
      MOE_CHECK(id >= 0 && id < vocab_size(), "tokenizer", "id {} is outside the vocabulary of {}",
                id, vocab_size());
      MOE_CHECK(has_token_[id], "tokenizer", "id {} has no token in the vocabulary", id);
      tokens.push_back(id_to_token_[id]);
    }
    return decoder_.apply(std::move(tokens));
  }

  int64_t vocab_size() const override { return static_cast<int64_t>(id_to_token_.size()); }
  std::optional<int32_t> bos_id() const override { return bos_; }
  std::optional<int32_t> eos_id() const override { return eos_; }

 private:
  // Text without the added tokens written as such: normalize, cut out the normalized added
  // tokens, pre-tokenize, BPE.
  void encode_plain(std::string_view raw, bool first, std::vector<int32_t>& ids) const {
    const std::string text = normalizer_.apply(std::string(raw));
    for (const auto& seg : normalized_added_.split(text)) {
      if (seg.id >= 0) {
        ids.push_back(seg.id);
        continue;
      }
      std::vector<Piece> pieces{
          {text.substr(seg.begin, seg.end - seg.begin), first && seg.begin == 0}};
      pre_.apply(pieces);
      for (const Piece& p : pieces) tokenize_word(p.text, ids);
    }
  }

  // BPE of a word, through a cache of the words seen (text repeats its words).
  void tokenize_word(const std::string& word, std::vector<int32_t>& ids) const {
    constexpr size_t kMaxCachedWord = 64, kMaxCacheEntries = 1 << 16;
    if (word.size() <= kMaxCachedWord) {
      std::lock_guard lock(cache_mutex_);
      const auto it = cache_.find(word);
      if (it != cache_.end()) {
        ids.insert(ids.end(), it->second.begin(), it->second.end());
        return;
      }
    }
    const size_t from = ids.size();
    bpe_.tokenize(word, ids);
    if (word.size() <= kMaxCachedWord) {
      std::lock_guard lock(cache_mutex_);
      if (cache_.size() >= kMaxCacheEntries) cache_.clear();
      cache_.emplace(
          word, std::vector<int32_t>(ids.begin() + static_cast<std::ptrdiff_t>(from), ids.end()));
    }
  }

  void parse_added(const Fields& f, const json& list) {
    if (!list.is_array())
      f.fail(fmt::format("added_tokens must be an array, not {}", list.type_name()));
    added_.resize(list.size());  // fixed from here: the splitters point into it
    for (size_t i = 0; i < list.size(); ++i) {
      const std::string where = fmt::format("added_tokens[{}]", i);
      const json& t = list[i];
      AddedToken& a = added_[i];
      a.id = f.id(f.get(t, where, "id"), where + ".id");
      a.content = f.string(t, where, "content");
      if (a.content.empty()) f.fail(fmt::format("{}.content is empty", where));
      a.special = f.flag(t, where, "special", false);
      a.single_word = f.flag(t, where, "single_word", false);
      a.lstrip = f.flag(t, where, "lstrip", false);
      a.rstrip = f.flag(t, where, "rstrip", false);
      a.normalized = f.flag(t, where, "normalized", !a.special);
      if (static_cast<size_t>(a.id) >= id_to_token_.size()) id_to_token_.resize(a.id + size_t{1});
      id_to_token_[a.id] = a.content;  // an added token's text wins over the model's
    }
    for (const AddedToken& a : added_) {
      // Tokens with "normalized" are matched in the normalized text, as their normalized form.
      if (a.normalized)
        normalized_added_.add(normalizer_.apply(a.content), &a);
      else
        raw_added_.add(a.content, &a);
    }
  }

  // bos and eos: tokenizer_config.json's bos_token / eos_token where the file has one beside it,
  // else the usual names among the added tokens.
  void find_bos_eos(const fs::path& config) {
    const auto id_of = [&](const std::string& text) -> std::optional<int32_t> {
      for (const AddedToken& a : added_)
        if (a.content == text) return a.id;
      return std::nullopt;
    };
    const auto from_list = [&](std::initializer_list<const char*> names) -> std::optional<int32_t> {
      for (const char* name : names)
        if (auto id = id_of(name)) return id;
      return std::nullopt;
    };
    bos_ = from_list({"<s>", "<|begin_of_text|>", "<｜begin▁of▁sentence｜>", "<|startoftext|>"});
    eos_ = from_list({"</s>", "<|end_of_text|>", "<｜end▁of▁sentence｜>", "<|endoftext|>"});
    if (config.empty()) return;
    std::ifstream in(config);
    if (!in) return;
    const json j = json::parse(in, nullptr, /*allow_exceptions=*/false);
    if (!j.is_object()) return;
    const auto configured = [&](const char* key, std::optional<int32_t>& out) {
      const auto it = j.find(key);
      if (it == j.end()) return;
      const json* v = &*it;
      if (v->is_object() && v->contains("content")) v = &v->at("content");
      if (v->is_string())
        if (auto id = id_of(v->get<std::string>())) out = id;
    };
    configured("bos_token", bos_);
    configured("eos_token", eos_);
  }

  BpeModel bpe_;
  Normalizer normalizer_;
  PreTokenizer pre_;
  Decoder decoder_;
  std::vector<AddedToken> added_;
  AddedTokenSplitter raw_added_, normalized_added_;
  std::vector<std::string> id_to_token_;  // the model's tokens and the added ones
  std::vector<bool> has_token_;
  std::optional<int32_t> bos_, eos_;

  mutable std::mutex cache_mutex_;
  mutable StringMap<std::vector<int32_t>> cache_;
};

// The tokenizer of a tokenizer.json's text, `path` naming it in errors; with `beside`,
// tokenizer_config.json next to it names bos and eos.
std::unique_ptr<Tokenizer> from_text(const std::string& path, const std::string& text,
                                     bool beside) {
  const Fields f(path);
  RawModel raw;
  json root = read_tokenizer_json(f, text, raw);
  return std::make_unique<HfTokenizer>(
      f, std::move(root), std::move(raw),
      beside ? fs::path(path).parent_path() / "tokenizer_config.json" : fs::path());
}

}  // namespace

std::unique_ptr<Tokenizer> load_hf_tokenizer(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) Fields(path).fail("cannot open the file");
  std::ostringstream buffer;
  buffer << in.rdbuf();
  return from_text(path, std::move(buffer).str(), true);
}

std::unique_ptr<Tokenizer> parse_hf_tokenizer(const std::string& text, const std::string& name) {
  return from_text(name, text, false);
}

std::unique_ptr<Tokenizer> make_bpe_tokenizer(BpeParts parts, const std::string& name) {
  const Fields f(name, parts.tokens_key, parts.merges_key);
  RawModel raw;
  raw.has_vocab = raw.has_merges = true;
  raw.vocab.reserve(parts.tokens.size());
  for (size_t id = 0; id < parts.tokens.size(); ++id)
    raw.vocab.emplace_back(std::move(parts.tokens[id]), static_cast<int64_t>(id));
  raw.merges.reserve(parts.merges.size());
  for (auto& [a, b] : parts.merges) raw.merges.push_back({std::move(a), std::move(b), false});
  return std::make_unique<HfTokenizer>(f, std::move(parts.doc), std::move(raw), fs::path());
}

}  // namespace moe::tok
