// Which tokenizer a path holds (load_tokenizer), and the project's byte tokenizer behind the
// Tokenizer interface (see moe/tokenizer.h).
#include "moe/tokenizer.h"

#include <array>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string_view>

#include "moe/data.h"
#include "moe/error.h"
#include "moe/gguf.h"
#include "tok/tok.h"

namespace moe {

namespace fs = std::filesystem;

namespace {

// ByteTokenizer's ids: the 256 byte values, then <bos>, <eos>, <pad>. The special tokens are
// written as these texts: encode recognizes them in the text, decode writes them back.
constexpr std::array<std::string_view, 3> kByteSpecials = {"<bos>", "<eos>", "<pad>"};

class ByteTokenizerAdapter final : public Tokenizer {
 public:
  std::vector<int32_t> encode(const std::string& text) const override {
    std::vector<int32_t> ids;
    ids.reserve(text.size());
    const std::string_view s = text;
    for (size_t i = 0; i < s.size();) {
      bool special = false;
      if (s[i] == '<') {
        for (size_t k = 0; k < kByteSpecials.size(); ++k) {
          if (s.substr(i).starts_with(kByteSpecials[k])) {
            ids.push_back(ByteTokenizer::kBos + static_cast<int32_t>(k));
            i += kByteSpecials[k].size();
            special = true;
            break;
          }
        }
      }
      if (!special) ids.push_back(static_cast<unsigned char>(s[i++]));
    }
    return ids;
  }

  std::string decode(const std::vector<int32_t>& ids) const override {
    std::string text;
    for (int32_t id : ids) {
      MOE_CHECK(id >= 0 && id < ByteTokenizer::kVocabSize, "tokenizer",
                "id {} is outside the byte tokenizer's vocabulary of {}", id,
                ByteTokenizer::kVocabSize);
      if (id < 256)
        text += static_cast<char>(id);
      else
        text += kByteSpecials[static_cast<size_t>(id - ByteTokenizer::kBos)];
    }
    return text;
  }

  int64_t vocab_size() const override { return ByteTokenizer::kVocabSize; }
  std::optional<int32_t> bos_id() const override { return ByteTokenizer::kBos; }
  std::optional<int32_t> eos_id() const override { return ByteTokenizer::kEos; }
};

// A folder this engine wrote: a training output folder (it has "latest") or a checkpoint
// (config.json with the engine's own config under "moe_cpp").
bool is_engine_folder(const fs::path& dir) {
  if (fs::exists(dir / "latest")) return true;
  const fs::path config = dir / "config.json";
  if (!fs::is_regular_file(config)) return false;
  std::ifstream f(config);
  const nlohmann::json j = nlohmann::json::parse(f, nullptr, /*allow_exceptions=*/false);
  return j.is_object() && j.contains("moe_cpp");
}

// Whether the file starts with GGUF's magic.
bool has_gguf_magic(const fs::path& file) {
  std::ifstream f(file, std::ios::binary);
  std::array<char, 4> magic{};
  return f.read(magic.data(), magic.size()) && std::string_view(magic.data(), 4) == "GGUF";
}

// A file named neither *.json nor *.model: JSON starts with '{', a SentencePiece model (a
// protobuf) does not.
bool looks_like_json(const fs::path& file) {
  std::ifstream f(file, std::ios::binary);
  char c = 0;
  while (f.get(c))
    if (c != ' ' && c != '\t' && c != '\n' && c != '\r') return c == '{';
  return false;
}

}  // namespace

std::unique_ptr<Tokenizer> make_byte_tokenizer() {
  return std::make_unique<ByteTokenizerAdapter>();
}

std::unique_ptr<Tokenizer> gguf_tokenizer(const GgufFile& file) {
  return tok::gguf_tokenizer(file);
}

std::unique_ptr<Tokenizer> load_tokenizer(const std::string& path) {
  MOE_CHECK(!path.empty(), "tokenizer", "no tokenizer path given");
  const fs::path p(path);
  if (fs::is_directory(p)) {
    if (fs::is_regular_file(p / "tokenizer.json"))
      return tok::load_hf_tokenizer((p / "tokenizer.json").string());
    if (fs::is_regular_file(p / "tokenizer.model"))
      return tok::load_sentencepiece((p / "tokenizer.model").string());
    if (is_engine_folder(p)) return make_byte_tokenizer();
    throw_error("tokenizer",
                fmt::format("{} holds no tokenizer.json or tokenizer.model and is not a folder of "
                            "this engine (no config.json with \"moe_cpp\", no \"latest\")",
                            path));
  }
  MOE_CHECK(fs::is_regular_file(p), "tokenizer", "{}: no such file or folder", path);
  const std::string ext = p.extension().string();
  if (ext == ".gguf" || has_gguf_magic(p)) return tok::gguf_tokenizer(load_gguf(path));
  if (ext == ".json") return tok::load_hf_tokenizer(path);
  if (ext == ".model") return tok::load_sentencepiece(path);
  return looks_like_json(p) ? tok::load_hf_tokenizer(path) : tok::load_sentencepiece(path);
}

size_t complete_utf8_prefix(const std::string& s) {
  size_t i = s.size();
  for (size_t back = 0; back < 4 && i > 0; ++back) {
    const auto c = static_cast<unsigned char>(s[i - 1]);
    if ((c & 0xC0) != 0x80) {  // a lead byte (or ASCII): is its sequence whole?
      const size_t need = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : 4;
      return back + 1 >= need ? s.size() : i - 1;
    }
    --i;
  }
  return s.size();
}

}  // namespace moe
