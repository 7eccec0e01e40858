// Tokenizers: the tokenizer files of tests/fixtures/tokenizers (a byte-level BPE and a metaspace
// BPE tokenizer.json made with HuggingFace tokenizers, a SentencePiece BPE tokenizer.model) encode
// every reference case to exactly the reference ids and decode them to the reference text; the
// byte tokenizer behind the same interface; load_tokenizer's choice by folder; and every
// malformed file gives a moe::Error that says what is wrong.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <thread>
#include <tuple>

#include "moe/error.h"
#include "moe/tokenizer.h"
#include "tokenizer_cases.h"

namespace moe {

namespace fs = std::filesystem;

namespace {

const std::string kDir = std::string(MOE_TEST_FIXTURES) + "/tokenizers";

// A fresh folder under the system's temp folder.
fs::path temp_dir(const std::string& name) {
  const fs::path dir = fs::temp_directory_path() / ("moe_test_tok_" + name);
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

void write_file(const fs::path& path, const std::string& text) {
  std::ofstream f(path, std::ios::binary);
  f << text;
}

// fn throws moe::Error whose message holds `part`.
void expect_error(const std::function<void()>& fn, const std::string& part) {
  try {
    fn();
    ADD_FAILURE() << "no moe::Error; expected one saying \"" << part << "\"";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(part), std::string::npos)
        << "the message \"" << e.what() << "\" does not say \"" << part << "\"";
  }
}

// A tokenizer.json with the given text, loaded.
std::unique_ptr<Tokenizer> load_json(const std::string& name, const std::string& text) {
  const fs::path file = temp_dir(name) / "tokenizer.json";
  write_file(file, text);
  return load_tokenizer(file.string());
}

// A small BPE vocabulary: a, b, c, ab, abc; a space; merges a+b, ab+c.
const std::string kTinyModel = R"("model": {"type": "BPE",
    "vocab": {"a": 0, "b": 1, "c": 2, "ab": 3, "abc": 4, " ": 5}, "merges": ["a b", "ab c"]})";

void run_fixture(const std::string& name) {
  const std::string dir = kDir + "/" + name;
  const std::unique_ptr<Tokenizer> tok = load_tokenizer(dir);  // the folder: it finds the file
  const auto cases = test::parse_cases(test::read_json(dir + "/cases.json"));
  ASSERT_EQ(cases.size(), 20u);
  const int passed = test::expect_cases(*tok, cases, name);
  EXPECT_EQ(passed, static_cast<int>(cases.size()));
  std::printf("[ cases    ] %s: %d of %zu match\n", name.c_str(), passed, cases.size());
}

}  // namespace

TEST(Tokenizer, ByteLevelBpeMatchesTokenizers) { run_fixture("bytelevel_bpe"); }
TEST(Tokenizer, MetaspaceBpeMatchesTokenizers) { run_fixture("metaspace_bpe"); }
TEST(Tokenizer, SentencePieceMatchesSentencePiece) { run_fixture("sentencepiece_bpe"); }

TEST(Tokenizer, VocabularyAndSpecialIds) {
  const auto byte_level = load_tokenizer(kDir + "/bytelevel_bpe/tokenizer.json");
  EXPECT_EQ(byte_level->vocab_size(), 3000);
  EXPECT_EQ(byte_level->eos_id(), 0);  // <|endoftext|>
  const auto metaspace = load_tokenizer(kDir + "/metaspace_bpe/tokenizer.json");
  EXPECT_EQ(metaspace->vocab_size(), 3000);
  EXPECT_EQ(metaspace->bos_id(), 1);  // <s>
  EXPECT_EQ(metaspace->eos_id(), 2);  // </s>
  const auto sp = load_tokenizer(kDir + "/sentencepiece_bpe/tokenizer.model");
  EXPECT_GT(sp->vocab_size(), 256);
  EXPECT_TRUE(sp->bos_id().has_value());
  EXPECT_TRUE(sp->eos_id().has_value());
}

// Special tokens written in the text are matched, and decode writes them back.
TEST(Tokenizer, SpecialTokensInTheText) {
  const auto tok = load_tokenizer(kDir + "/bytelevel_bpe");
  const auto ids = tok->encode("<|im_start|>hi<|im_end|><|endoftext|>");
  ASSERT_GE(ids.size(), 4u);
  EXPECT_EQ(ids.front(), 1);
  EXPECT_EQ(ids[ids.size() - 2], 2);
  EXPECT_EQ(ids.back(), 0);
  EXPECT_EQ(tok->decode(ids), "<|im_start|>hi<|im_end|><|endoftext|>");
}

// Text that is not valid UTF-8 still encodes (byte-level BPE covers every byte) and decodes to
// the bytes with U+FFFD for the ill-formed parts.
TEST(Tokenizer, InvalidUtf8Text) {
  const auto tok = load_tokenizer(kDir + "/bytelevel_bpe");
  const std::string text = "ab\xff\xfe cd\xc3";
  const auto ids = tok->encode(text);
  EXPECT_FALSE(ids.empty());
  EXPECT_EQ(tok->decode(ids), "ab\xEF\xBF\xBD\xEF\xBF\xBD cd\xEF\xBF\xBD");
}

TEST(Tokenizer, EncodingIsThreadSafe) {
  const auto tok = load_tokenizer(kDir + "/bytelevel_bpe");
  const auto cases = test::parse_cases(test::read_json(kDir + "/bytelevel_bpe/cases.json"));
  std::vector<int> bad(4, 0);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      for (int rep = 0; rep < 50; ++rep)
        for (const auto& c : cases) bad[t] += tok->encode(c.text) != c.ids;
    });
  for (auto& th : threads) th.join();
  for (int t = 0; t < 4; ++t) EXPECT_EQ(bad[t], 0);
}

// The split behaviors of the Split pre-tokenizer, on a tiny vocabulary.
TEST(Tokenizer, SplitBehaviors) {
  const auto with_split = [](const std::string& name, const std::string& behavior, bool invert) {
    return load_json(name, "{" + kTinyModel + R"(, "pre_tokenizer": {"type": "Split",
        "pattern": {"String": " "}, "behavior": ")" +
                               behavior + R"(", "invert": )" + (invert ? "true" : "false") + "}}");
  };
  // Isolated: "ab", " ", "c" -> no merge across the space
  EXPECT_EQ(with_split("iso", "Isolated", false)->encode("ab c"), (std::vector<int32_t>{3, 5, 2}));
  EXPECT_EQ(with_split("rem", "Removed", false)->encode("ab c"), (std::vector<int32_t>{3, 2}));
  EXPECT_EQ(with_split("prev", "MergedWithPrevious", false)->encode("ab c"),
            (std::vector<int32_t>{3, 5, 2}));
  // inverted: the spaces are the text between the matches, removed are "ab" and "c"
  EXPECT_EQ(with_split("inv", "Removed", true)->encode("ab c"), (std::vector<int32_t>{5}));
  // no pre-tokenizer: one word, merged as far as the merges go
  EXPECT_EQ(load_json("none", "{" + kTinyModel + "}")->encode("abcab"),
            (std::vector<int32_t>{4, 3}));
}

// Added tokens' lstrip, rstrip and single_word rules, and fused unknown characters.
TEST(Tokenizer, AddedTokenRules) {
  const auto tok = load_json("rules", R"({"model": {"type": "BPE", "unk_token": "<unk>",
      "fuse_unk": true, "merges": ["a b", "ab c"],
      "vocab": {"a": 0, "b": 1, "c": 2, "ab": 3, "abc": 4, " ": 5, "<unk>": 6}},
    "added_tokens": [
      {"id": 7, "content": "<l>", "lstrip": true, "special": true},
      {"id": 8, "content": "<r>", "rstrip": true, "special": true},
      {"id": 9, "content": "<w>", "single_word": true, "special": true}]})");
  using Ids = std::vector<int32_t>;
  EXPECT_EQ(tok->encode("ab <l>c"), (Ids{3, 7, 2}));  // the space before goes with the token
  EXPECT_EQ(tok->encode("ab<r> c"), (Ids{3, 8, 2}));  // the space after goes with the token
  EXPECT_EQ(tok->encode("ab <w> c"), (Ids{3, 5, 9, 5, 2}));
  EXPECT_EQ(tok->encode("ab<w>c"), (Ids{3, 6, 2}));  // inside a word: text, one fused <unk>
  EXPECT_EQ(tok->decode({3, 7, 2}), "ab <l> c");     // no decoder: tokens joined by spaces
  EXPECT_EQ(tok->vocab_size(), 10);
}

TEST(Tokenizer, ByteTokenizer) {
  const auto tok = make_byte_tokenizer();
  EXPECT_EQ(tok->vocab_size(), 259);
  EXPECT_EQ(tok->bos_id(), 256);
  EXPECT_EQ(tok->eos_id(), 257);
  const std::vector<int32_t> ids = tok->encode("<bos>h\xc3\xa9<eos>");
  EXPECT_EQ(ids, (std::vector<int32_t>{256, 'h', 0xc3, 0xa9, 257}));
  EXPECT_EQ(tok->decode(ids), "<bos>h\xc3\xa9<eos>");
  expect_error([&] { tok->decode({259}); }, "outside");
}

// A folder of this engine (a checkpoint's config.json with "moe_cpp", or a training output
// folder with "latest") gives the byte tokenizer; any other folder without a tokenizer is an
// error.
TEST(Tokenizer, LoadByFolder) {
  const fs::path ckpt = temp_dir("ckpt");
  write_file(ckpt / "config.json", R"({"model_type": "moe_cpp", "moe_cpp": {"d_model": 8}})");
  EXPECT_EQ(load_tokenizer(ckpt.string())->vocab_size(), 259);
  const fs::path run = temp_dir("run");
  write_file(run / "latest", "step-4\n");
  EXPECT_EQ(load_tokenizer(run.string())->vocab_size(), 259);
  const fs::path hf = temp_dir("hf");
  write_file(hf / "config.json", R"({"model_type": "mixtral"})");
  expect_error([&] { load_tokenizer(hf.string()); }, "no tokenizer.json or tokenizer.model");
  expect_error([&] { load_tokenizer((hf / "missing").string()); }, "no such file or folder");
}

TEST(TokenizerErrors, DecodeOfAnIdOutsideTheVocabulary) {
  for (const char* name : {"bytelevel_bpe", "metaspace_bpe", "sentencepiece_bpe"}) {
    const auto tok = load_tokenizer(kDir + "/" + name);
    expect_error([&] { tok->decode({5, static_cast<int32_t>(tok->vocab_size())}); }, "outside");
    expect_error([&] { tok->decode({-1}); }, "outside");
  }
}

TEST(TokenizerErrors, MalformedTokenizerJson) {
  expect_error([] { load_json("badjson", "{\"model\": {"); }, "not valid JSON");
  expect_error([] { load_json("array", "[1, 2]"); }, "must be an object");
  expect_error([] { load_json("nomodel", R"({"added_tokens": []})"); }, "has no \"model\"");
  expect_error([] { load_json("unigram", R"({"model": {"type": "Unigram", "vocab": []}})"); },
               "model type \"Unigram\" is not supported");
  expect_error([] { load_json("novocab", R"({"model": {"type": "BPE", "merges": []}})"); },
               "model has no \"vocab\"");
  expect_error(
      [] { load_json("vocablist", R"({"model": {"type": "BPE", "vocab": [], "merges": []}})"); },
      "model.vocab must be an object");
  expect_error(
      [] {
        load_json("vocabid", R"({"model": {"type": "BPE", "vocab": {"a": "x"}, "merges": []}})");
      },
      "model.vocab[\"a\"] must be an integer");
  expect_error(
      [] {
        load_json("unknown",
                  R"({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1}, "merges": ["a c"]}})");
      },
      "model.merges[0]: the token \"c\" is not in model.vocab");
  expect_error(
      [] {
        load_json(
            "merged",
            R"({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1}, "merges": [["a", "b"]]}})");
      },
      "the merged token \"ab\" is not in model.vocab");
  expect_error(
      [] {
        load_json("mergeform", R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": [7]}})");
      },
      "model.merges[0] must be");
  expect_error(
      [] {
        load_json("regex", "{" + kTinyModel +
                               R"(, "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "(a"},
                                  "behavior": "Isolated"}})");
      },
      "does not compile");
  expect_error(
      [] {
        load_json("behavior",
                  "{" + kTinyModel +
                      R"(, "pre_tokenizer": {"type": "Split", "pattern": {"String": " "},
                                     "behavior": "Sideways"}})");
      },
      "behavior \"Sideways\"");
  expect_error(
      [] { load_json("pretype", "{" + kTinyModel + R"(, "pre_tokenizer": {"type": "Bert"}})"); },
      "pre-tokenizer type \"Bert\" is not supported");
  expect_error(
      [] { load_json("normtype", "{" + kTinyModel + R"(, "normalizer": {"type": "NFKC"}})"); },
      "normalizer type \"NFKC\" is not supported");
  expect_error(
      [] { load_json("added", "{" + kTinyModel + R"(, "added_tokens": [{"content": "<x>"}]})"); },
      "added_tokens[0] has no \"id\"");
  for (const auto& [name, regex, what] :
       std::vector<std::tuple<std::string, std::string, std::string>>{
           {"anchor_start", "^a", "the anchor ^"},
           {"anchor_end", "a$", "the anchor $"},
           {"hex", "\\\\h+", "\\h (a hex digit in Oniguruma"},
           {"dotall", "(?m:a.b)", "the option m"},
           {"dotall_off", "(?i-m)a", "the option m"}}) {
    expect_error(
        [&] {
          load_json(name, "{" + kTinyModel +
                              R"(, "pre_tokenizer": {"type": "Split", "pattern": {"Regex": ")" +
                              regex + R"("}, "behavior": "Isolated"}})");
        },
        what);
  }
  // inside a class, ^ and $ are characters
  EXPECT_NO_THROW(load_json("class", "{" + kTinyModel +
                                         R"(, "pre_tokenizer": {"type": "Split", "pattern":
                                            {"Regex": "[^$a]+"}, "behavior": "Isolated"}})"));
  expect_error(
      [] {
        load_json("dropout", R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": [],
                                           "dropout": 0.1}})");
      },
      "model.dropout = 0.1 is not supported");
  EXPECT_NO_THROW(
      load_json("nodropout",
                R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": [], "dropout": null}})"));
  expect_error(
      [] {
        load_json("vocabtwice",
                  R"({"model": {"type": "BPE", "vocab": {"a": 0, "a": 1}, "merges": []}})");
      },
      "model.vocab lists \"a\" twice");
  expect_error(
      [] {
        load_json("emptytoken", R"({"model": {"type": "BPE", "vocab": {"": 0}, "merges": []}})");
      },
      "model.vocab has an empty token (id 0)");
  expect_error(
      [] {
        load_json("negativeid", R"({"model": {"type": "BPE", "vocab": {"a": -1}, "merges": []}})");
      },
      "model.vocab[\"a\"] = -1 is not a valid token id");
  expect_error(
      [] {
        load_json("hugeid", R"({"model": {"type": "BPE", "vocab": {"a": 18446744073709551615},
                                          "merges": []}})");
      },
      "is not a valid token id");
  expect_error(
      [] {
        load_json("mergepair",
                  R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": [["a", "a", "a"]]}})");
      },
      "model.merges[0] must be");
  expect_error([] { load_json("nomerges", R"({"model": {"type": "BPE", "vocab": {"a": 0}}})"); },
               "model has no \"merges\"");
  expect_error(
      [] {
        load_json("cut",
                  R"({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1}, "merges": ["a b")");
      },
      "not valid JSON");
}

// The file is read in one pass that takes model.vocab and model.merges straight from the text;
// where that pass stops (here at a second "vocab" key, which JSON allows and whose last value
// counts), the file is read again as a JSON document. Both give the same tokenizer.
TEST(Tokenizer, BothWaysOfReadingTheFileAgree) {
  for (const std::string name : {"bytelevel_bpe", "metaspace_bpe"}) {
    const std::string dir = kDir + "/" + name;
    std::ifstream in(dir + "/tokenizer.json", std::ios::binary);
    std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    const size_t model = text.find("\"model\": {");
    ASSERT_NE(model, std::string::npos);
    text.insert(model + 10, R"("vocab": {"zz": 0}, "merges": ["z z"], )");
    const auto reread = load_json("reread_" + name, text);
    const auto cases = test::parse_cases(test::read_json(dir + "/cases.json"));
    EXPECT_EQ(test::expect_cases(*reread, cases, name), static_cast<int>(cases.size()));
    EXPECT_EQ(reread->vocab_size(), load_tokenizer(dir)->vocab_size());
  }
}

TEST(TokenizerErrors, CorruptSentencePieceModel) {
  const fs::path dir = temp_dir("sp");
  write_file(dir / "garbage.model", "this is not a protobuf \xff\xff\xff\xff");
  expect_error([&] { load_tokenizer((dir / "garbage.model").string()); },
               "not a SentencePiece model file");
  std::ifstream in(kDir + "/sentencepiece_bpe/tokenizer.model", std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  write_file(dir / "tokenizer.model", bytes.substr(0, bytes.size() / 2));  // cut in half
  expect_error([&] { load_tokenizer(dir.string()); }, "not a SentencePiece model file");
}

}  // namespace moe

namespace moe {

// The text shown while a character's bytes are still coming: every prefix of a string of 1-, 2-,
// 3- and 4-byte characters is cut back to its last whole character.
TEST(Tokenizer, CompleteUtf8PrefixStopsBeforeAPartialCharacter) {
  const std::string s = "a\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80z";  // a é € 😀 z
  const size_t ends[] = {0, 1, 1, 3, 3, 3, 6, 6, 6, 6, 10, 11};    // for each prefix length
  for (size_t n = 0; n <= s.size(); ++n)
    EXPECT_EQ(complete_utf8_prefix(s.substr(0, n)), ends[n]) << n;
  EXPECT_EQ(complete_utf8_prefix("\x80\x80"), 2u);  // stray continuation bytes are left as they are
}

}  // namespace moe
