// GGUF: llama.cpp's own files read back (metadata and tensors as its references say), every
// tensor type dequantized bit for bit as llama.cpp does, hand-built blocks of the types the
// fixtures lack, round trips through write_gguf, and corrupt files refused with clear errors.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <set>

#include "moe/gguf.h"
#include "moe/safetensors.h"
#include "moe/weights.h"

namespace moe {

namespace {

const std::string kDir = std::string(MOE_TEST_FIXTURES) + "/gguf/";

// The fixtures (tests/fixtures/gguf/README.md): the models' sizes are in their README.
struct Fixture {
  std::string name;
  int expert_used;
};
const Fixture kFixtures[] = {{"qwen3moe-Q4_K_M", 2}, {"mixtral-Q4_0", 2}, {"gpt_oss-MXFP4", 4}};

nlohmann::json reference_json(const std::string& name) {
  std::ifstream in(kDir + name + ".reference.json");
  return nlohmann::json::parse(in);
}

uint32_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

std::string temp_file(const std::string& name) {
  return (std::filesystem::temp_directory_path() / ("moe_gguf_" + name)).string();
}

void put_u16(std::string& s, uint16_t v) {
  s.push_back(static_cast<char>(v & 0xff));
  s.push_back(static_cast<char>(v >> 8));
}

// Dequantizes a one-block (or several) byte string.
std::vector<float> dequant(GgmlType t, const std::string& bytes, int64_t n) {
  std::vector<float> out(static_cast<size_t>(n));
  dequantize_row(t, bytes.data(), out.data(), n);
  return out;
}

}  // namespace

TEST(GgufFixtures, MetadataAndTensorTypesMatchTheReferences) {
  for (const Fixture& fx : kFixtures) {
    SCOPED_TRACE(fx.name);
    const GgufFile f = load_gguf(kDir + fx.name + ".gguf");
    const nlohmann::json ref = reference_json(fx.name);
    EXPECT_EQ(f.version, 3u);
    EXPECT_EQ(f.alignment, 32u);
    const std::string arch = f.get_string("general.architecture");
    EXPECT_EQ(arch, ref["architecture"].get<std::string>());
    EXPECT_EQ(f.get_u32("general.file_type"), ref["general.file_type"].get<uint32_t>());
    // Every model: hidden 256, 2 layers, 8 experts (README of the fixtures).
    EXPECT_EQ(f.get_u32(arch + ".block_count"), 2u);
    EXPECT_EQ(f.get_u32(arch + ".embedding_length"), 256u);
    EXPECT_EQ(f.get_u32(arch + ".expert_count"), 8u);
    EXPECT_EQ(f.get_u32(arch + ".expert_used_count"), static_cast<uint32_t>(fx.expert_used));
    EXPECT_GT(f.get_f32(arch + ".attention.layer_norm_rms_epsilon"), 0.0f);
    EXPECT_EQ(f.get_string("tokenizer.ggml.model"), "gpt2");
    EXPECT_EQ(f.get_string("tokenizer.ggml.pre"), "qwen2");
    // The vocabulary: as many tokens as the reference logits have columns (3000).
    const SafetensorsFile st = load_safetensors(kDir + fx.name + ".reference.safetensors");
    const std::vector<std::string> tokens = f.get_array_strings("tokenizer.ggml.tokens");
    EXPECT_EQ(static_cast<int64_t>(tokens.size()), st.stored.at("logits").shape[1]);
    EXPECT_EQ(tokens.size(), 3000u);
    EXPECT_EQ(tokens[0], "<|endoftext|>");
    EXPECT_EQ(f.get_array_size("tokenizer.ggml.token_type"), 3000u);
    // Tensors: the counts per type.
    std::map<std::string, int> types;
    for (const GgufTensor& t : f.tensors) {
      ++types[ggml_type_name(t.type)];
      EXPECT_EQ(&f.tensor(t.name), &t);
      EXPECT_EQ(reinterpret_cast<uintptr_t>(t.data) % f.alignment, 0u) << t.name;
    }
    std::map<std::string, int> want;
    int total = 0;
    for (const auto& [type, n] : ref["tensor_types"].items()) {
      want[type] = n.get<int>();
      total += n.get<int>();
    }
    EXPECT_EQ(types, want);
    EXPECT_EQ(static_cast<int>(f.tensors.size()), total);
    // Wrong types and missing keys are errors naming the key.
    try {
      f.get_string(arch + ".block_count");
      ADD_FAILURE() << "a UINT32 read as a string";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("block_count' is UINT32, not a string"),
                std::string::npos)
          << e.what();
    }
    EXPECT_THROW(f.get_u32("no.such.key"), Error);
    EXPECT_THROW(f.get_array_strings("general.architecture"), Error);
    EXPECT_THROW(f.tensor("no.such.tensor"), Error);
  }
}

TEST(GgufFixtures, DequantizationIsBitIdenticalToLlamaCpp) {
  std::set<std::string> seen;
  for (const Fixture& fx : kFixtures) {
    SCOPED_TRACE(fx.name);
    const GgufFile f = load_gguf(kDir + fx.name + ".gguf");
    const SafetensorsFile st = load_safetensors(kDir + fx.name + ".reference.safetensors");
    const nlohmann::json ref = reference_json(fx.name);
    ASSERT_FALSE(ref["dequantized"].empty());
    for (const nlohmann::json& d : ref["dequantized"]) {
      const std::string type = d["ggml_type"].get<std::string>();
      SCOPED_TRACE(type);
      const GgufTensor& t = f.tensor(d["tensor"].get<std::string>());
      ASSERT_EQ(ggml_type_name(t.type), type);
      const auto ne = d["gguf_ne"].get<std::vector<int64_t>>();
      ASSERT_EQ(static_cast<size_t>(t.n_dims), ne.size());
      for (size_t i = 0; i < ne.size(); ++i) EXPECT_EQ(t.ne[i], ne[i]);
      // An expert tensor: the matrix of expert `expert`, rows [e * ne1, (e + 1) * ne1).
      const int64_t rows = d.contains("expert") ? t.ne[1] : t.rows();
      const int64_t first = d.contains("expert") ? d["expert"].get<int64_t>() * t.ne[1] : 0;
      std::vector<float> got(static_cast<size_t>(rows * t.ne[0]));
      t.dequantize_rows(first, rows, got.data());
      const Tensor& want = st.at(d["key"].get<std::string>());
      ASSERT_EQ(want.numel(), static_cast<int64_t>(got.size()));
      int64_t differ = 0, first_bad = -1;
      for (int64_t i = 0; i < want.numel(); ++i)
        if (bits(got[i]) != bits(want.data<float>()[i])) {
          if (first_bad < 0) first_bad = i;
          ++differ;
        }
      EXPECT_EQ(differ, 0) << "first at " << first_bad << ": "
                           << (first_bad >= 0 ? got[first_bad] : 0) << " vs "
                           << (first_bad >= 0 ? want.data<float>()[first_bad] : 0);
      seen.insert(type);
    }
  }
  EXPECT_EQ(seen, (std::set<std::string>{"F32", "BF16", "Q8_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K",
                                         "MXFP4"}));
}

// The types the fixtures lack, block by block against values worked out by hand.
TEST(GgufDequant, HalfPrecisionAndBf16AreExact) {
  std::string h, b;
  const float xs[] = {1.5f, -2.0f, 0.0f, std::ldexp(1.0f, -24), 65504.0f, -0.0f};
  for (float x : xs) put_u16(h, f32_to_f16(x));
  for (float x : xs) put_u16(b, f32_to_bf16(x));
  const std::vector<float> fh = dequant(GgmlType::F16, h, 6), fb = dequant(GgmlType::BF16, b, 6);
  for (int i = 0; i < 6; ++i) {
    EXPECT_EQ(bits(fh[i]), bits(xs[i])) << i;
    if (i != 4) {  // 65504 needs 11 significant bits, bf16 has 8
      EXPECT_EQ(bits(fb[i]), bits(xs[i])) << i;
    }
  }
}

TEST(GgufDequant, LegacyBlocksByHand) {
  // Q4_0: d = 0.5; byte j = j | (15 - j) << 4: element j is (j - 8) / 2, element j + 16 (7 - j)
  // / 2.
  std::string q40;
  put_u16(q40, f32_to_f16(0.5f));
  for (int j = 0; j < 16; ++j) q40.push_back(static_cast<char>(j | ((15 - j) << 4)));
  // Q4_1: d = 0.25, m = -1: q / 4 - 1.
  std::string q41;
  put_u16(q41, f32_to_f16(0.25f));
  put_u16(q41, f32_to_f16(-1.0f));
  for (int j = 0; j < 16; ++j) q41.push_back(static_cast<char>(j | ((15 - j) << 4)));
  // Q5_0 and Q5_1: the fifth bits 0xA5A5F00F (bit i for element i).
  const uint32_t qh = 0xA5A5F00Fu;
  std::string q50, q51;
  put_u16(q50, f32_to_f16(0.125f));
  put_u16(q51, f32_to_f16(2.0f));
  put_u16(q51, f32_to_f16(0.5f));
  for (std::string* s : {&q50, &q51})
    for (int i = 0; i < 4; ++i) s->push_back(static_cast<char>((qh >> (8 * i)) & 0xff));
  for (int j = 0; j < 16; ++j) {
    q50.push_back(static_cast<char>(j | ((15 - j) << 4)));
    q51.push_back(static_cast<char>(j | ((15 - j) << 4)));
  }
  // Q8_0: d = -0.5, q = j - 16.
  std::string q80;
  put_u16(q80, f32_to_f16(-0.5f));
  for (int j = 0; j < 32; ++j) q80.push_back(static_cast<char>(static_cast<int8_t>(j - 16)));

  const auto y40 = dequant(GgmlType::Q4_0, q40, 32), y41 = dequant(GgmlType::Q4_1, q41, 32);
  const auto y50 = dequant(GgmlType::Q5_0, q50, 32), y51 = dequant(GgmlType::Q5_1, q51, 32);
  const auto y80 = dequant(GgmlType::Q8_0, q80, 32);
  for (int i = 0; i < 32; ++i) {
    const int nib = i < 16 ? i : 15 - (i - 16);
    const int q5 = nib | static_cast<int>(((qh >> i) & 1u) << 4);
    EXPECT_EQ(y40[i], static_cast<float>(nib - 8) * 0.5f) << i;
    EXPECT_EQ(y41[i], static_cast<float>(nib) * 0.25f - 1.0f) << i;
    EXPECT_EQ(y50[i], static_cast<float>(q5 - 16) * 0.125f) << i;
    EXPECT_EQ(y51[i], static_cast<float>(q5) * 2.0f + 0.5f) << i;
    EXPECT_EQ(y80[i], static_cast<float>(i - 16) * -0.5f) << i;
  }
}

TEST(GgufDequant, Mxfp4ScalesAtTheEdgesOfE8M0) {
  // Codes 0..15 in the first 16 elements and 15..0 in the last 16; scales 2^(e - 127).
  const float codes[16] = {0, .5, 1, 1.5, 2, 3, 4, 6, -0.0f, -.5, -1, -1.5, -2, -3, -4, -6};
  for (int e : {0, 1, 2, 100, 127, 130, 254, 255}) {
    SCOPED_TRACE(e);
    std::string b(1, static_cast<char>(e));
    for (int j = 0; j < 16; ++j) b.push_back(static_cast<char>(j | ((15 - j) << 4)));
    const auto y = dequant(GgmlType::MXFP4, b, 32);
    for (int i = 0; i < 32; ++i) {
      const float c = codes[i < 16 ? i : 15 - (i - 16)];
      // The product in double is exact; as a float it is exact (subnormal below 2^-126) or
      // infinite (6 * 2^128).
      const double v = static_cast<double>(c) * std::ldexp(1.0, e - 127);
      const float want =
          std::abs(v) > std::numeric_limits<float>::max()
              ? std::copysign(std::numeric_limits<float>::infinity(), static_cast<float>(c))
              : static_cast<float>(v);
      EXPECT_EQ(y[i], want) << i;
    }
  }
}

TEST(GgufDequant, LowBitKQuantsFollowTheirLayouts) {
  // Q2_K and Q3_K against their layouts written out element by element: element i of a
  // super-block is group g = i / 128, pass j = (i % 128) / 32 (2-bit code at bits 2j of byte
  // 32g + i % 32), scale i / 16.
  std::string q2, q3;
  uint32_t s = 12345;
  auto next = [&] {
    s = s * 1103515245u + 12345u;
    return static_cast<char>((s >> 16) & 0xff);
  };
  for (int i = 0; i < 80; ++i) q2.push_back(next());
  put_u16(q2, f32_to_f16(0.0625f));
  put_u16(q2, f32_to_f16(0.03125f));
  for (int i = 0; i < 108; ++i) q3.push_back(next());
  put_u16(q3, f32_to_f16(0.015625f));
  const auto y2 = dequant(GgmlType::Q2_K, q2, 256), y3 = dequant(GgmlType::Q3_K, q3, 256);
  auto byte = [](const std::string& b, int i) {
    return static_cast<int>(static_cast<uint8_t>(b[i]));
  };
  for (int i = 0; i < 256; ++i) {
    const int g = i / 128, j = (i % 128) / 32, l = i % 32, sub = i / 16;
    const int q2c = (byte(q2, 16 + 32 * g + l) >> (2 * j)) & 3;
    const int sc2 = byte(q2, sub);
    EXPECT_EQ(y2[i], 0.0625f * static_cast<float>(sc2 & 15) * static_cast<float>(q2c) -
                         0.03125f * static_cast<float>(sc2 >> 4))
        << i;
    const int q3c = (byte(q3, 32 + 32 * g + l) >> (2 * j)) & 3;
    const bool high = (byte(q3, l) >> (4 * g + j)) & 1;
    const int lo = sub < 8 ? byte(q3, 96 + sub) & 15 : byte(q3, 96 + sub - 8) >> 4;
    const int hi = (byte(q3, 104 + sub % 4) >> (2 * (sub / 4))) & 3;
    const int sc3 = (lo | (hi << 4)) - 32;
    EXPECT_EQ(y3[i], 0.015625f * static_cast<float>(sc3) * static_cast<float>(q3c - (high ? 0 : 4)))
        << i;
  }
  EXPECT_THROW(dequant(GgmlType::Q4_K, std::string(144, '\0'), 255), Error);  // not whole blocks
}

namespace {

// A small valid file: keys of several types and two tensors, F32 [4, 2] and Q8_0 [32, 2].
std::string small_file() {
  static std::vector<float> a = {1, 2, 3, 4, 5, 6, 7, 8};
  static std::string b = [] {
    std::string s;
    for (int r = 0; r < 2; ++r) {
      put_u16(s, f32_to_f16(0.5f));
      for (int j = 0; j < 32; ++j) s.push_back(static_cast<char>(j - 16 + r));
    }
    return s;
  }();
  return gguf_bytes({{"general.architecture", GgufValue::str("test")},
                     {"general.alignment", GgufValue::u32(32)},
                     {"test.count", GgufValue::u32(7)},
                     {"test.xount", GgufValue::i32(-3)},
                     {"test.scale", GgufValue::f32(0.25f)},
                     {"test.flag", GgufValue::boolean(true)},
                     {"test.names", GgufValue::strings({"x", "yy", "zzz"})}},
                    {{"tensor.one", GgmlType::F32, {4, 2}, a.data()},
                     {"tensor.two", GgmlType::Q8_0, {32, 2}, b.data()}});
}

// The position just after the first occurrence of `s`.
size_t after(const std::string& bytes, const std::string& s) {
  const size_t p = bytes.find(s);
  EXPECT_NE(p, std::string::npos) << s;
  return p + s.size();
}

void patch(std::string& bytes, size_t at, uint64_t v, int n) {
  for (int i = 0; i < n; ++i) bytes[at + i] = static_cast<char>((v >> (8 * i)) & 0xff);
}

void expect_refused(const std::string& name, const std::string& bytes, const std::string& needle) {
  const std::string path = temp_file(name);
  std::ofstream(path, std::ios::binary) << bytes;
  try {
    load_gguf(path);
    ADD_FAILURE() << name << ": loaded a corrupt file; expected: " << needle;
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << name << ": " << e.what();
    EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << "the message names the file";
  }
  std::filesystem::remove(path);
}

}  // namespace

TEST(GgufFormat, WrittenFilesReadBack) {
  const std::string path = temp_file("roundtrip.gguf");
  const std::string bytes = small_file();
  std::ofstream(path, std::ios::binary) << bytes;
  const GgufFile f = load_gguf(path);
  EXPECT_EQ(f.key_order.size(), 7u);
  EXPECT_EQ(f.key_order[2], "test.count");
  EXPECT_EQ(f.get_u32("test.count"), 7u);
  EXPECT_EQ(f.get_i64("test.xount"), -3);
  EXPECT_EQ(f.get_f32("test.scale"), 0.25f);
  EXPECT_TRUE(f.get_bool("test.flag"));
  EXPECT_EQ(f.get_array_size("test.names"), 3u);
  EXPECT_THROW(f.get_bool("test.count"), Error);
  EXPECT_EQ(f.get_array_strings("test.names"), (std::vector<std::string>{"x", "yy", "zzz"}));
  try {
    f.get_u32("test.xount");
    ADD_FAILURE() << "-3 read as unsigned";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("-3 does not fit"), std::string::npos) << e.what();
  }
  ASSERT_EQ(f.tensors.size(), 2u);
  EXPECT_EQ(f.tensors[0].name, "tensor.one");
  EXPECT_EQ(f.tensors[1].bytes, 68u);
  EXPECT_EQ(f.tensors[1].offset, 32u);  // 32 bytes of F32, aligned to 32
  EXPECT_EQ(f.data_size, 100u);  // no padding after the last tensor, as llama.cpp writes them
  std::vector<float> one(8), two(64);
  f.tensors[0].dequantize_rows(0, 2, one.data());
  f.tensors[1].dequantize_rows(0, 2, two.data());
  EXPECT_EQ(one[7], 8.0f);
  EXPECT_EQ(two[0], -8.0f);
  EXPECT_EQ(two[63], 8.0f);  // row 1: (31 - 16 + 1) / 2
  EXPECT_THROW(f.tensors[1].dequantize_rows(1, 2, two.data()), Error);
  // write_gguf writes a file that reads back, through a temporary file and a rename.
  write_gguf(path,
             {{"k", GgufValue::u64(1)},
              {"big", {GgufValueType::F64, GgufValueType::U8, 1e300}},
              {"ints", GgufValue::array(GgufValueType::I16,
                                        {{GgufValueType::I16, GgufValueType::U8, int64_t{-2}}})}},
             {});
  const GgufFile g = load_gguf(path);
  EXPECT_EQ(g.get_u64("k"), 1u);
  EXPECT_EQ(g.get_f64("big"), 1e300);
  EXPECT_THROW(g.get_f32("big"), Error);  // beyond float32
  EXPECT_EQ(g.get_array_ints("ints"), std::vector<int64_t>{-2});
  std::filesystem::remove(path);
}

TEST(GgufFormat, CorruptFilesAreRefusedWithClearErrors) {
  const std::string good = small_file();
  {
    const std::string path = temp_file("good.gguf");
    std::ofstream(path, std::ios::binary) << good;
    EXPECT_NO_THROW(load_gguf(path));
    std::filesystem::remove(path);
  }
  auto with = [&](auto edit) {
    std::string b = good;
    edit(b);
    return b;
  };
  expect_refused("empty", "", "truncated");
  expect_refused("truncated_header", good.substr(0, 20), "truncated");
  expect_refused("truncated_in_kv", good.substr(0, after(good, "test.names") + 6), "truncated");
  expect_refused("bad_magic", with([](std::string& b) { b[0] = 'X'; }), "bad magic");
  expect_refused("version_1", with([](std::string& b) { patch(b, 4, 1, 4); }), "version 1");
  expect_refused("version_9", with([](std::string& b) { patch(b, 4, 9, 4); }), "version 9");
  expect_refused("big_endian", with([](std::string& b) { patch(b, 4, 0x03000000u, 4); }),
                 "big-endian");
  expect_refused("huge_tensor_count", with([](std::string& b) { patch(b, 8, 1ull << 40, 8); }),
                 "tensor count");
  expect_refused("huge_kv_count", with([](std::string& b) { patch(b, 16, ~0ull, 8); }),
                 "key-value count");
  // The string value of general.architecture: its length after the key and the type.
  expect_refused("huge_string", with([](std::string& b) {
                   patch(b, after(b, "general.architecture") + 4, 1ull << 62, 8);
                 }),
                 "runs past the end of the file");
  expect_refused("huge_key", with([](std::string& b) { patch(b, 24, 1ull << 62, 8); }),
                 "exceeds the limit");
  // test.names: type ARRAY, element type STRING, then the count.
  expect_refused("huge_array",
                 with([](std::string& b) { patch(b, after(b, "test.names") + 8, 1ull << 60, 8); }),
                 "array at byte");
  expect_refused("unknown_value_type",
                 with([](std::string& b) { patch(b, after(b, "test.count"), 13, 4); }),
                 "unknown value type 13");
  expect_refused("unknown_array_type",
                 with([](std::string& b) { patch(b, after(b, "test.names") + 4, 77, 4); }),
                 "unknown element type 77");
  expect_refused("bad_bool",
                 with([](std::string& b) { patch(b, after(b, "test.flag") + 4, 2, 1); }),
                 "not 0 or 1");
  expect_refused("duplicate_key",
                 with([](std::string& b) { b.replace(b.find("test.xount"), 10, "test.count"); }),
                 "duplicate key 'test.count'");
  expect_refused("alignment_not_power_of_two",
                 with([](std::string& b) { patch(b, after(b, "general.alignment") + 4, 48, 4); }),
                 "not a power of two");
  expect_refused("alignment_wrong_type",
                 with([](std::string& b) { patch(b, after(b, "general.alignment"), 5, 4); }),
                 "general.alignment is INT32");
  // tensor.two: n_dims (4 bytes), ne[0], ne[1] (8 each), type (4), offset (8).
  const size_t two = after(good, "tensor.two");
  expect_refused("unknown_ggml_type", with([&](std::string& b) { patch(b, two + 20, 99, 4); }),
                 "unknown ggml type 99");
  expect_refused("unsupported_ggml_type", with([&](std::string& b) { patch(b, two + 20, 16, 4); }),
                 "ggml type IQ2_XXS (16) is not supported; supported: F32 (0), F16 (1)");
  expect_refused("unknown_ggml_type_names_the_known",
                 with([&](std::string& b) { patch(b, two + 20, 99, 4); }), "Q4_K (12)");
  expect_refused("misaligned_offset", with([&](std::string& b) { patch(b, two + 24, 48, 8); }),
                 "not a multiple of the alignment 32");
  expect_refused("tensor_past_the_end", good.substr(0, good.size() - 32),
                 "run past the end of the data section");
  expect_refused("offset_past_the_end",
                 with([&](std::string& b) { patch(b, two + 24, 1ull << 62, 8); }),
                 "run past the end of the data section");
  expect_refused("overlap", with([&](std::string& b) { patch(b, two + 24, 0, 8); }), "overlap");
  expect_refused("ne0_not_a_block_multiple",
                 with([&](std::string& b) { patch(b, two + 4, 33, 8); }),
                 "ne[0] = 33 is not a multiple of Q8_0's block size 32");
  expect_refused("zero_dim", with([&](std::string& b) { patch(b, two + 12, 0, 8); }), "ne[1] = 0");
  expect_refused("too_many_dims", with([&](std::string& b) { patch(b, two, 5, 4); }),
                 "5 dimensions");
  const size_t one = after(good, "tensor.one");
  expect_refused("overflowing_dims", with([&](std::string& b) {
                   patch(b, one + 4, 1ull << 40, 8);
                   patch(b, one + 12, 1ull << 40, 8);
                 }),
                 "overflows");
  expect_refused("byte_size_overflow", with([&](std::string& b) {
                   patch(b, one + 4, 1ull << 62, 8);  // 2^62 elements fit int64, 2^64 bytes do not
                   patch(b, one + 12, 1, 8);
                 }),
                 "byte size overflows");
  expect_refused("duplicate_tensor",
                 with([](std::string& b) { b.replace(b.find("tensor.two"), 10, "tensor.one"); }),
                 "duplicate tensor name 'tensor.one'");
}

TEST(GgufFormat, DeeplyNestedArraysAreRefused) {
  // An array of arrays of ... of uint8, nested 6 deep.
  std::string b = "GGUF";
  auto u = [&](uint64_t v, int n) {
    for (int i = 0; i < n; ++i) b.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
  };
  u(3, 4);
  u(0, 8);
  u(1, 8);
  u(1, 8);
  b += "k";
  u(9, 4);
  for (int d = 0; d < 6; ++d) {
    u(9, 4);
    u(1, 8);
  }
  b += std::string(64, '\0');
  expect_refused("nested", b, "nested more than 4 deep");
}

}  // namespace moe
