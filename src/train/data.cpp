// Corpora, the byte tokenizer and batch sampling (see moe/data.h).
#include "moe/data.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "moe/tokenizer.h"

namespace moe {

namespace fs = std::filesystem;

int64_t Corpus::bytes() const {
  int64_t n = 0;
  for (const Document& d : docs) n += static_cast<int64_t>(d.text.size());
  return n;
}

namespace {

std::string read_file(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  MOE_CHECK(f.good(), "data", "cannot read {}", p.string());
  std::ostringstream s;
  s << f.rdbuf();
  return s.str();
}

// Fortune files: entries separated by lines holding only "%".
void add_fortunes(Corpus& c, const std::string& text, int32_t lang) {
  std::string cur;
  std::istringstream in(text);
  std::string line;
  auto flush = [&] {
    while (!cur.empty() && (cur.back() == '\n' || cur.back() == ' ')) cur.pop_back();
    if (!cur.empty()) c.docs.push_back({cur, lang});
    cur.clear();
  };
  while (std::getline(in, line)) {
    if (line == "%") {
      flush();
    } else {
      cur += line;
      cur += '\n';
    }
  }
  flush();
}

int32_t language_index(Corpus& c, const std::string& name) {
  auto it = std::find(c.languages.begin(), c.languages.end(), name);
  if (it != c.languages.end()) return static_cast<int32_t>(it - c.languages.begin());
  c.languages.push_back(name);
  return static_cast<int32_t>(c.languages.size() - 1);
}

// Regular files of a folder, sorted by name, without .dat indexes; a name.u8 file (a UTF-8
// conversion) is preferred to name when both are regular files.
std::vector<fs::path> fortune_files(const fs::path& dir) {
  std::vector<fs::path> out;
  for (const auto& e : fs::directory_iterator(dir)) {
    if (e.is_symlink() || !e.is_regular_file()) continue;
    const std::string ext = e.path().extension().string();
    if (ext == ".dat" || ext == ".u8") continue;
    fs::path u8 = e.path();
    u8 += ".u8";
    out.push_back(fs::is_regular_file(u8) && !fs::is_symlink(u8) ? u8 : e.path());
  }
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace

Corpus load_fortunes(const std::string& root) {
  MOE_CHECK(fs::is_directory(root), "data",
            "no fortunes at {}: install them (apt-get install fortunes fortunes-de fortunes-es "
            "fortunes-it fortunes-ru) or pass --data",
            root);
  Corpus c;
  const std::pair<const char*, const char*> langs[] = {
      {"en", ""}, {"de", "de"}, {"es", "es"}, {"it", "it"}, {"ru", "ru"}};
  for (const auto& [name, sub] : langs) {
    const fs::path dir = fs::path(root) / sub;
    if (!fs::is_directory(dir)) continue;
    const int32_t lang = language_index(c, name);
    for (const fs::path& f : fortune_files(dir)) add_fortunes(c, read_file(f), lang);
  }
  MOE_CHECK(!c.docs.empty(), "data", "no fortunes found under {}", root);
  return c;
}

Corpus load_text(const std::vector<std::string>& paths) {
  Corpus c;
  for (const std::string& p : paths) {
    MOE_CHECK(fs::exists(p), "data", "{} does not exist", p);
    if (fs::is_directory(p)) {
      const int32_t lang = language_index(c, fs::path(p).filename().string());
      std::vector<fs::path> files;
      for (const auto& e : fs::recursive_directory_iterator(p)) {
        if (!e.is_regular_file()) continue;
        bool skip = false;
        for (const auto& part : e.path().lexically_relative(p)) skip = skip || part == "off";
        if (!skip) files.push_back(e.path());
      }
      std::sort(files.begin(), files.end());
      for (const fs::path& f : files) c.docs.push_back({read_file(f), lang});
    } else {
      c.docs.push_back({read_file(p), language_index(c, "text")});
    }
  }
  MOE_CHECK(!c.docs.empty(), "data", "no text files found in the given paths");
  return c;
}

std::vector<int32_t> ByteTokenizer::encode(const std::string& text) {
  std::vector<int32_t> ids;
  ids.reserve(text.size());
  for (unsigned char ch : text) ids.push_back(ch);
  return ids;
}

std::string ByteTokenizer::decode(const std::vector<int32_t>& ids) {
  std::string s;
  for (int32_t id : ids)
    if (id >= 0 && id < 256) s += static_cast<char>(id);
  return s;
}

void TokenStream::append(const Document& doc) {
  ids.push_back(ByteTokenizer::kBos);
  for (unsigned char ch : doc.text) ids.push_back(ch);
  ids.push_back(ByteTokenizer::kEos);
  lang.resize(ids.size(), doc.lang);
}

void TokenStream::append(const Document& doc, const Tokenizer& tok) {
  if (auto bos = tok.bos_id()) ids.push_back(*bos);
  for (int32_t id : tok.encode(doc.text)) ids.push_back(id);
  if (auto eos = tok.eos_id()) ids.push_back(*eos);
  lang.resize(ids.size(), doc.lang);
}

void split_corpus(const Corpus& corpus, int64_t val_every, TokenStream& train, TokenStream& val,
                  const Tokenizer* tok) {
  MOE_CHECK(val_every >= 2, "data", "val_every must be >= 2, got {}", val_every);
  for (size_t i = 0; i < corpus.docs.size(); ++i) {
    TokenStream& to = static_cast<int64_t>(i) % val_every == val_every - 1 ? val : train;
    if (tok) {
      to.append(corpus.docs[i], *tok);
    } else {
      to.append(corpus.docs[i]);
    }
  }
}

BatchSampler::BatchSampler(const TokenStream& stream, int64_t batch, int64_t seq_len, uint64_t seed)
    : stream_(stream), batch_(batch), seq_len_(seq_len), rng_(seed) {
  MOE_CHECK(batch >= 1 && seq_len >= 1, "data", "batch and seq_len must be >= 1");
  MOE_CHECK(static_cast<int64_t>(stream.ids.size()) > seq_len + 1, "data",
            "the text has {} tokens, fewer than one window of {}", stream.ids.size(), seq_len + 1);
}

void BatchSampler::next(Tensor& tokens, Tensor* langs) {
  const int64_t W = seq_len_ + 1;
  tokens.expect("data", "tokens", {batch_, W}, DType::I32);
  const int64_t span = static_cast<int64_t>(stream_.ids.size()) - W;
  for (int64_t b = 0; b < batch_; ++b) {
    const int64_t start = rng_.randint(0, span + 1);
    std::copy_n(stream_.ids.begin() + start, W, tokens.data<int32_t>() + b * W);
    if (langs) std::copy_n(stream_.lang.begin() + start, W, langs->data<int32_t>() + b * W);
  }
}

}  // namespace moe
