// The tokenizer of a GGUF file's metadata (tokenizer.ggml.*): llama.cpp's own files encode the
// reference texts to exactly llama.cpp's ids and decode them back; a SentencePiece model written
// as a "llama" vocabulary encodes as libsentencepiece does; every pre-tokenizer name compiles and
// splits as its regexes say; the special ids and the chat template come from the metadata; and
// every malformed vocabulary gets a moe::Error that names the key.
#include <gtest/gtest.h>
#include <sentencepiece_processor.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <nlohmann/json.hpp>

#include "moe/error.h"
#include "moe/gguf.h"
#include "moe/tokenizer.h"
#include "tok/tok.h"
#include "tokenizer_cases.h"

namespace moe {

namespace {

using Metadata = std::vector<std::pair<std::string, GgufValue>>;

const std::string kFixtures = MOE_TEST_FIXTURES;

// A GGUF file of `meta` (no tensors), read back from memory.
GgufFile gguf_of(const Metadata& meta, const std::string& name = "test.gguf") {
  auto bytes = std::make_shared<std::string>(gguf_bytes(meta, {}));
  return parse_gguf(bytes->data(), bytes->size(), bytes, name);
}

GgufValue ints(GgufValueType type, const std::vector<int64_t>& xs) {
  std::vector<GgufValue> items;
  // Built in steps: GCC 12 at -O2 under the sanitizers took the brace-initialized value's
  // string alternative for maybe uninitialized.
  for (int64_t x : xs) {
    GgufValue v;
    v.type = type;
    v.v = x;
    items.push_back(std::move(v));
  }
  return GgufValue::array(type, std::move(items));
}
GgufValue floats(const std::vector<float>& xs) {
  std::vector<GgufValue> items;
  for (float x : xs) items.push_back(GgufValue::f32(x));
  return GgufValue::array(GgufValueType::F32, std::move(items));
}

// fn throws moe::Error whose message holds every one of `parts`.
void expect_error(const std::function<void()>& fn, const std::vector<std::string>& parts) {
  try {
    fn();
    ADD_FAILURE() << "no moe::Error; expected one saying \"" << parts[0] << "\"";
  } catch (const Error& e) {
    for (const std::string& part : parts)
      EXPECT_NE(std::string(e.what()).find(part), std::string::npos)
          << "the message \"" << e.what() << "\" does not say \"" << part << "\"";
  }
}

// GPT-2's byte-to-character map (every byte a visible character).
std::string byte_char(int b) {
  const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
  int cp = b;
  if (!printable) {
    cp = 256;
    for (int x = 0; x < b; ++x)
      if (!((x >= 0x21 && x <= 0x7E) || (x >= 0xA1 && x <= 0xAC) || x >= 0xAE)) ++cp;
  }
  std::string s;
  if (cp < 0x80) {
    s += static_cast<char>(cp);
  } else {
    s += static_cast<char>(0xC0 | (cp >> 6));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  }
  return s;
}

// A small "gpt2" vocabulary: ids 0..255 the bytes (as GPT-2's characters), 256 "12", 257 "123",
// 258 "<|endoftext|>" (control), 259 "<tool>" (user-defined); merges "1 2", "12 3".
Metadata byte_level_vocab(const std::string& pre) {
  std::vector<std::string> tokens;
  for (int b = 0; b < 256; ++b) tokens.push_back(byte_char(b));
  tokens.insert(tokens.end(), {"12", "123", "<|endoftext|>", "<tool>"});
  std::vector<int64_t> types(tokens.size(), 1);
  types[258] = 3;
  types[259] = 4;
  Metadata meta = {{"general.architecture", GgufValue::str("qwen3moe")},
                   {"tokenizer.ggml.model", GgufValue::str("gpt2")},
                   {"tokenizer.ggml.tokens", GgufValue::strings(tokens)},
                   {"tokenizer.ggml.token_type", ints(GgufValueType::I32, types)},
                   {"tokenizer.ggml.merges", GgufValue::strings({"1 2", "12 3"})},
                   {"tokenizer.ggml.eos_token_id", GgufValue::u32(258)}};
  if (!pre.empty()) meta.push_back({"tokenizer.ggml.pre", GgufValue::str(pre)});
  return meta;
}

// `meta` with `key` set to `value` (replaced, or added at the end).
Metadata with(Metadata meta, const std::string& key, GgufValue value) {
  for (auto& [k, v] : meta)
    if (k == key) {
      v = std::move(value);
      return meta;
    }
  meta.emplace_back(key, std::move(value));
  return meta;
}
Metadata without(Metadata meta, const std::string& key) {
  std::erase_if(meta, [&](const auto& kv) { return kv.first == key; });
  return meta;
}

// A small "llama" vocabulary: <unk>, <s>, </s>, the 256 byte tokens, then pieces with scores.
Metadata spm_vocab() {
  std::vector<std::string> tokens = {"<unk>", "<s>", "</s>"};
  std::vector<int64_t> types = {2, 3, 3};
  std::vector<float> scores = {0, 0, 0};
  for (int b = 0; b < 256; ++b) {
    tokens.push_back(fmt::format("<0x{:02X}>", b));
    types.push_back(6);
    scores.push_back(0);
  }
  const std::vector<std::string> pieces = {"\u2581", "a", "b", "c", "ab", "\u2581ab", "bc", "abc"};
  const std::vector<float> piece_scores = {-5, -6, -7, -8, -1, -2, -0.5f, -3};
  for (size_t i = 0; i < pieces.size(); ++i) {
    tokens.push_back(pieces[i]);
    types.push_back(1);
    scores.push_back(piece_scores[i]);
  }
  return {{"general.architecture", GgufValue::str("llama")},
          {"tokenizer.ggml.model", GgufValue::str("llama")},
          {"tokenizer.ggml.tokens", GgufValue::strings(tokens)},
          {"tokenizer.ggml.scores", floats(scores)},
          {"tokenizer.ggml.token_type", ints(GgufValueType::I32, types)},
          {"tokenizer.ggml.bos_token_id", GgufValue::u32(1)},
          {"tokenizer.ggml.eos_token_id", GgufValue::u32(2)},
          {"tokenizer.ggml.unknown_token_id", GgufValue::u32(0)}};
}
constexpr int32_t kPiece = 259;  // the id of the first piece of spm_vocab, "▁"

}  // namespace

// llama.cpp's own files (tests/fixtures/gguf): its ids for the six texts of each reference, and
// the texts back from them.
TEST(GgufTokenizer, FixturesEncodeAsLlamaCpp) {
  for (const char* name :
       {"qwen3moe-Q4_K_M", "mixtral-Q4_0", "deepseek_v3-Q8_0", "gpt_oss-MXFP4"}) {
    SCOPED_TRACE(name);
    const std::string path = kFixtures + "/gguf/" + name + ".gguf";
    const auto tok = load_tokenizer(path);
    const GgufFile f = load_gguf(path);
    EXPECT_EQ(tok->vocab_size(), 3000);
    for (const auto& [key, id] : {std::pair{"tokenizer.ggml.bos_token_id", tok->bos_id()},
                                  std::pair{"tokenizer.ggml.eos_token_id", tok->eos_id()}}) {
      if (f.has(key))
        EXPECT_EQ(id, static_cast<int32_t>(f.get_u32(key))) << key;
      else
        EXPECT_EQ(id, std::nullopt) << key;
    }
    const nlohmann::json ref = test::read_json(kFixtures + "/gguf/" + name + ".reference.json");
    ASSERT_EQ(ref.at("tokenize").size(), 6u);
    for (const auto& c : ref.at("tokenize")) {
      const std::string text = c.at("text").get<std::string>();
      const auto ids = c.at("ids").get<std::vector<int32_t>>();
      EXPECT_EQ(tok->encode(text), ids) << nlohmann::json(text).dump();
      EXPECT_EQ(tok->decode(ids), text);
    }
  }
}

// The fixtures' vocabulary is tests/fixtures/tokenizers/bytelevel_bpe's (their README): the GGUF
// tokenizer gives that tokenizer.json's ids for all its cases, special tokens in the text included.
TEST(GgufTokenizer, FixtureVocabularyEncodesAsItsTokenizerJson) {
  const auto tok = gguf_tokenizer(load_gguf(kFixtures + "/gguf/qwen3moe-Q4_K_M.gguf"));
  const std::string dir = kFixtures + "/tokenizers/bytelevel_bpe";
  const auto cases = test::parse_cases(test::read_json(dir + "/cases.json"));
  ASSERT_EQ(cases.size(), 20u);
  EXPECT_EQ(test::expect_cases(*tok, cases, "qwen3moe-Q4_K_M.gguf"), 20);
}

// A SentencePiece BPE model (tests/fixtures/tokenizers/sentencepiece_bpe) written as a "llama"
// vocabulary, as llama.cpp's converter writes one (pieces, scores, types from the
// SentencePiece API): the ids libsentencepiece gives, for every text its normalizer (NFKC,
// extra spaces removed) leaves as it is.
TEST(GgufTokenizer, SentencePieceVocabularyEncodesAsSentencePiece) {
  const std::string dir = kFixtures + "/tokenizers/sentencepiece_bpe";
  sentencepiece::SentencePieceProcessor sp;
  ASSERT_TRUE(sp.Load(dir + "/tokenizer.model").ok());
  std::vector<std::string> tokens;
  std::vector<float> scores;
  std::vector<int64_t> types;
  for (int id = 0; id < sp.GetPieceSize(); ++id) {
    tokens.push_back(sp.IdToPiece(id));
    scores.push_back(sp.GetScore(id));
    types.push_back(sp.IsUnknown(id)   ? 2
                    : sp.IsControl(id) ? 3
                    : sp.IsUnused(id)  ? 5
                    : sp.IsByte(id)    ? 6
                                       : 1);
  }
  const GgufFile f = gguf_of({{"general.architecture", GgufValue::str("llama")},
                              {"tokenizer.ggml.model", GgufValue::str("llama")},
                              {"tokenizer.ggml.tokens", GgufValue::strings(tokens)},
                              {"tokenizer.ggml.scores", floats(scores)},
                              {"tokenizer.ggml.token_type", ints(GgufValueType::I32, types)},
                              {"tokenizer.ggml.bos_token_id", GgufValue::u32(sp.bos_id())},
                              {"tokenizer.ggml.eos_token_id", GgufValue::u32(sp.eos_id())},
                              {"tokenizer.ggml.unknown_token_id", GgufValue::u32(sp.unk_id())},
                              {"tokenizer.ggml.add_bos_token", GgufValue::boolean(true)}});
  const auto tok = gguf_tokenizer(f);
  const auto reference = load_tokenizer(dir + "/tokenizer.model");
  EXPECT_EQ(tok->vocab_size(), reference->vocab_size());
  EXPECT_EQ(tok->bos_id(), reference->bos_id());
  EXPECT_EQ(tok->eos_id(), reference->eos_id());

  int compared = 0;
  for (const auto& c : test::parse_cases(test::read_json(dir + "/cases.json"))) {
    if (c.decoded != c.text) continue;  // changed by SentencePiece's normalizer
    EXPECT_EQ(tok->encode(c.text), c.ids) << nlohmann::json(c.text).dump();
    EXPECT_EQ(tok->decode(c.ids), c.text);
    ++compared;
  }
  EXPECT_EQ(compared, 14);
  for (const std::string text :
       {"The quick brown fox jumps over the lazy dog.", "Ça va? Ja, sehr gut. Ελληνικά 42.",
        "routes experts; experts route tokens", "x", "a-b_c/d\\e", "Straße 10, 10115 Berlin"}) {
    const auto ids = reference->encode(text);
    EXPECT_EQ(tok->encode(text), ids) << text;
    EXPECT_EQ(tok->decode(ids), text);
  }
  // Every line of two READMEs that the normalizer leaves as it is.
  int lines = 0;
  for (const char* file : {"/gguf/README.md", "/trained_tiny/README.md"}) {
    std::ifstream in(kFixtures + file);
    for (std::string line; std::getline(in, line);) {
      std::vector<int> ids;
      std::string back;
      ASSERT_TRUE(sp.Encode(line, &ids).ok() && sp.Decode(ids, &back).ok());
      if (back != line) continue;
      EXPECT_EQ(tok->encode(line), std::vector<int32_t>(ids.begin(), ids.end())) << line;
      ++lines;
    }
  }
  EXPECT_GE(lines, 20);
}

// A "llama" vocabulary by hand: merges by score, a space before the text and after each special
// token, characters outside the vocabulary as byte tokens, decoding back.
TEST(GgufTokenizer, SentencePieceStyleMergesByScore) {
  const auto tok = gguf_tokenizer(gguf_of(spm_vocab()));
  const int32_t sp = kPiece, a = kPiece + 1, b = kPiece + 2, c = kPiece + 3, ab = kPiece + 4,
                sp_ab = kPiece + 5, bc = kPiece + 6, abc = kPiece + 7;
  // "▁abc": bc (-0.5) before ab (-1); then ▁ + a, a + bc: abc (-3) only.
  EXPECT_EQ(tok->encode("abc"), (std::vector<int32_t>{sp, abc}));
  // "▁ab": ab (-1), then ▁ + ab = ▁ab (-2).
  EXPECT_EQ(tok->encode("ab"), (std::vector<int32_t>{sp_ab}));
  EXPECT_EQ(tok->encode("ab ab"), (std::vector<int32_t>{sp_ab, sp_ab}));
  EXPECT_EQ(tok->encode("ca"), (std::vector<int32_t>{sp, c, a}));
  // "é" is outside the vocabulary: its two bytes.
  EXPECT_EQ(tok->encode("b\u00e9"), (std::vector<int32_t>{sp, b, 3 + 0xC3, 3 + 0xA9}));
  // Special tokens written in the text; a space again after each.
  EXPECT_EQ(tok->encode("<s>ab</s>"), (std::vector<int32_t>{1, sp_ab, 2}));
  EXPECT_EQ(tok->encode(""), std::vector<int32_t>{});
  for (const std::string text : {"abc", "ab ab", "b\u00e9 c", "  a  b  ", "ca\nb"})
    EXPECT_EQ(tok->decode(tok->encode(text)), text);
  EXPECT_EQ(tok->decode({1, sp_ab, bc}), "<s> abbc");
  EXPECT_EQ(tok->bos_id(), 1);
  EXPECT_EQ(tok->eos_id(), 2);
  // Without the space prefix: "abc" is a + bc = abc, with no ▁.
  const auto bare = gguf_tokenizer(
      gguf_of(with(spm_vocab(), "tokenizer.ggml.add_space_prefix", GgufValue::boolean(false))));
  EXPECT_EQ(bare->encode("abc"), (std::vector<int32_t>{abc}));
  EXPECT_EQ(bare->encode("ab"), (std::vector<int32_t>{ab}));
  EXPECT_EQ(bare->encode("abc ab"), (std::vector<int32_t>{abc, sp_ab}));
  EXPECT_EQ(bare->decode({abc, sp_ab}), "abc ab");
  // int32 scores, as llama.cpp also takes.
  std::vector<int64_t> int_scores(kPiece, 0);
  for (int64_t s : {-5, -6, -7, -8, -1, -2, 0, -3}) int_scores.push_back(s);
  const auto with_ints = gguf_tokenizer(
      gguf_of(with(spm_vocab(), "tokenizer.ggml.scores", ints(GgufValueType::I32, int_scores))));
  EXPECT_EQ(with_ints->encode("abc"), (std::vector<int32_t>{sp, abc}));
}

// Every pre-tokenizer name compiles and gives the text back; the digit rules tell them apart.
TEST(GgufTokenizer, PreTokenizersByName) {
  const std::string text =
      "Hello World, it's 2024-12-06: 3.14159!\n\n  Größe \xe4\xb8\xad\xe6\x96\x87 \xf0\x9f\xa4\x96 "
      "x<tool>y <|endoftext|> ok  \t\n";
  const std::vector<std::string> names = tok::gguf_pre_tokenizer_names();
  EXPECT_GE(names.size(), 50u);
  for (const std::string& name : names) {
    SCOPED_TRACE(name);
    const auto tok = gguf_tokenizer(gguf_of(byte_level_vocab(name)));
    const auto ids = tok->encode(text);
    EXPECT_EQ(tok->decode(ids), text);
    // The special and the user-defined token are found in the text.
    EXPECT_NE(std::find(ids.begin(), ids.end(), 258), ids.end());
    EXPECT_NE(std::find(ids.begin(), ids.end(), 259), ids.end());
  }
  const auto ids_of = [](const std::string& pre, const std::string& s) {
    return gguf_tokenizer(gguf_of(byte_level_vocab(pre)))->encode(s);
  };
  const int32_t one = '1', two = '2', three = '3', four = '4';  // a byte's id is the byte
  EXPECT_EQ(ids_of("qwen2", "1234"), (std::vector<int32_t>{one, two, three, four}));
  EXPECT_EQ(ids_of("llama-bpe", "1234"), (std::vector<int32_t>{257, four}));
  EXPECT_EQ(ids_of("deepseek-v3", "1234"), (std::vector<int32_t>{257, four}));
  EXPECT_EQ(ids_of("gpt-2", "1234"), (std::vector<int32_t>{257, four}));
  EXPECT_EQ(ids_of("starcoder", "1234"), (std::vector<int32_t>{one, two, three, four}));
  // No tokenizer.ggml.pre: llama.cpp's default.
  EXPECT_EQ(ids_of("", "123"), (std::vector<int32_t>{257}));
  EXPECT_EQ(ids_of("default", "12"), (std::vector<int32_t>{256}));
}

// bos and eos from the metadata only; the chat template kept for a server to render.
TEST(GgufTokenizer, SpecialIdsAndChatTemplate) {
  const std::string tmpl = "{% for m in messages %}<|im_start|>{{ m.content }}{% endfor %}";
  const auto tok = gguf_tokenizer(
      gguf_of(with(byte_level_vocab("qwen2"), "tokenizer.chat_template", GgufValue::str(tmpl))));
  EXPECT_EQ(tok->chat_template(), tmpl);
  EXPECT_EQ(tok->eos_id(), 258);
  EXPECT_EQ(tok->bos_id(), std::nullopt);
  const auto plain = gguf_tokenizer(gguf_of(byte_level_vocab("qwen2")));
  EXPECT_EQ(plain->chat_template(), std::nullopt);
  EXPECT_EQ(make_byte_tokenizer()->chat_template(), std::nullopt);
  // The fixtures carry no chat template.
  EXPECT_EQ(load_tokenizer(kFixtures + "/gguf/mixtral-Q4_0.gguf")->chat_template(), std::nullopt);
}

// load_tokenizer knows a GGUF file by its name or by its magic.
TEST(GgufTokenizer, LoadTokenizerFindsGgufFiles) {
  const std::string bytes = gguf_bytes(byte_level_vocab("llama-bpe"), {});
  const auto dir = std::filesystem::temp_directory_path();
  for (const char* name : {"moe_tok_vocab.gguf", "moe_tok_vocab.bin"}) {
    const std::string path = (dir / name).string();
    std::ofstream(path, std::ios::binary) << bytes;
    EXPECT_EQ(load_tokenizer(path)->encode("123"), (std::vector<int32_t>{257}));
    std::filesystem::remove(path);
  }
}

// Every malformed vocabulary: a moe::Error that names the key, never a crash.
TEST(GgufTokenizerErrors, MalformedVocabulariesNameTheKey) {
  const Metadata bpe = byte_level_vocab("qwen2");
  const Metadata spm = spm_vocab();
  const auto load = [](const Metadata& meta) { return [meta] { gguf_tokenizer(gguf_of(meta)); }; };
  expect_error(load(without(bpe, "tokenizer.ggml.model")), {"test.gguf", "tokenizer.ggml.model"});
  for (const char* model : {"rwkv", "t5", "bert"})
    expect_error(load(with(bpe, "tokenizer.ggml.model", GgufValue::str(model))),
                 {fmt::format("tokenizer.ggml.model = \"{}\" is not supported", model), "gpt2"});
  expect_error(load(with(bpe, "tokenizer.ggml.model", GgufValue::str("none"))),
               {"has no vocabulary"});
  expect_error(load(with(bpe, "tokenizer.ggml.model", GgufValue::u32(2))),
               {"tokenizer.ggml.model"});
  expect_error(load(without(bpe, "tokenizer.ggml.tokens")), {"no tokenizer.ggml.tokens"});
  expect_error(load(with(bpe, "tokenizer.ggml.tokens", GgufValue::u32(3))),
               {"tokenizer.ggml.tokens"});
  expect_error(load(with(bpe, "tokenizer.ggml.tokens", GgufValue::strings({}))),
               {"tokenizer.ggml.tokens is empty"});
  expect_error(load(with(bpe, "tokenizer.ggml.tokens", GgufValue::strings({"a", "", "b"}))),
               {"tokenizer.ggml.tokens[1] is empty"});
  expect_error(
      load(with(without(without(bpe, "tokenizer.ggml.token_type"), "tokenizer.ggml.eos_token_id"),
                "tokenizer.ggml.tokens", GgufValue::strings({"a", "b", "a"}))),
      {"tokenizer.ggml.tokens lists \"a\" twice (ids 0 and 2)"});
  // token types: one per token, each 0..6
  expect_error(load(with(bpe, "tokenizer.ggml.token_type", ints(GgufValueType::I32, {1, 1}))),
               {"tokenizer.ggml.token_type has 2 entries for the 260 tokens"});
  std::vector<int64_t> types(260, 1);
  types[7] = 9;
  expect_error(load(with(bpe, "tokenizer.ggml.token_type", ints(GgufValueType::I32, types))),
               {"tokenizer.ggml.token_type[7] = 9 is not a token type"});
  // merges
  expect_error(load(without(bpe, "tokenizer.ggml.merges")), {"no tokenizer.ggml.merges"});
  expect_error(load(with(bpe, "tokenizer.ggml.merges", GgufValue::strings({"1 2", "12"}))),
               {"tokenizer.ggml.merges[1] = \"12\" is not two tokens"});
  expect_error(load(with(bpe, "tokenizer.ggml.merges", GgufValue::strings({"1 2", "xy z"}))),
               {"tokenizer.ggml.merges[1]: the token \"xy\" is not in tokenizer.ggml.tokens"});
  expect_error(
      load(with(bpe, "tokenizer.ggml.merges", GgufValue::strings({"2 1"}))),
      {"tokenizer.ggml.merges[0]: the merged token \"21\" is not in tokenizer.ggml.tokens"});
  // pre-tokenizer
  expect_error(load(with(bpe, "tokenizer.ggml.pre", GgufValue::str("no-such-pre"))),
               {"tokenizer.ggml.pre = \"no-such-pre\"", "known: ", "qwen2", "llama-bpe", "gpt-4o"});
  // special ids
  expect_error(load(with(bpe, "tokenizer.ggml.bos_token_id", GgufValue::u32(260))),
               {"tokenizer.ggml.bos_token_id = 260 is outside the vocabulary of 260 tokens"});
  expect_error(load(with(bpe, "tokenizer.ggml.eos_token_id", GgufValue::i32(-1))),
               {"tokenizer.ggml.eos_token_id = -1 is outside"});
  expect_error(load(with(bpe, "tokenizer.ggml.padding_token_id", GgufValue::u32(1000))),
               {"tokenizer.ggml.padding_token_id = 1000"});
  expect_error(load(with(bpe, "tokenizer.ggml.unknown_token_id", GgufValue::str("0"))),
               {"tokenizer.ggml.unknown_token_id"});
  expect_error(load(with(bpe, "tokenizer.chat_template", GgufValue::u32(0))),
               {"tokenizer.chat_template"});
  // scores of a llama vocabulary
  expect_error(load(with(spm, "tokenizer.ggml.scores", floats({0, 0}))),
               {"tokenizer.ggml.scores has 2 entries for the 267 tokens"});
  std::vector<float> nan_scores(267, 0.0f);
  nan_scores[5] = std::numeric_limits<float>::quiet_NaN();
  expect_error(load(with(spm, "tokenizer.ggml.scores", floats(nan_scores))),
               {"tokenizer.ggml.scores[5] is NaN"});
  expect_error(load(with(spm, "tokenizer.ggml.scores", GgufValue::strings({"x"}))),
               {"tokenizer.ggml.scores"});
  expect_error(load(with(spm, "tokenizer.ggml.add_space_prefix", GgufValue::u32(1))),
               {"tokenizer.ggml.add_space_prefix"});
  // decoding an id outside the vocabulary
  const auto tok = gguf_tokenizer(gguf_of(bpe));
  expect_error([&] { tok->decode({260}); }, {"outside"});
  expect_error([&] { tok->decode({-1}); }, {"outside"});
}

}  // namespace moe
