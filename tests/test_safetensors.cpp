// safetensors: round trips, bf16/f16 conversion, and a set of corrupt files, each refused with a
// clear error (never a crash, never a silently wrong tensor).
#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>

#include "moe/safetensors.h"

namespace moe {

namespace {

std::string temp_file(const std::string& name) {
  return (std::filesystem::temp_directory_path() / ("moe_st_" + name)).string();
}

// A file from a header text and data bytes.
std::string write_raw(const std::string& name, const std::string& header, const std::string& data,
                      uint64_t declared_len = UINT64_MAX) {
  const uint64_t n = declared_len == UINT64_MAX ? header.size() : declared_len;
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i)
    out[static_cast<size_t>(i)] = static_cast<char>((n >> (8 * i)) & 0xff);
  out += header + data;
  const std::string path = temp_file(name);
  std::ofstream(path, std::ios::binary) << out;
  return path;
}

void expect_refused(const std::string& path, const std::string& needle) {
  try {
    load_safetensors(path);
    ADD_FAILURE() << "loaded a corrupt file; expected: " << needle;
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << "the message names the file";
  }
  std::filesystem::remove(path);
}

}  // namespace

TEST(Safetensors, RoundTripsEveryDtypeWithMetadata) {
  Tensor a = Tensor::empty({2, 3}, DType::F32), b = Tensor::empty({4}, DType::F64);
  Tensor c = Tensor::empty({1, 2, 2}, DType::I32), d = Tensor::empty({0}, DType::I64);
  for (int64_t i = 0; i < 6; ++i) a.data<float>()[i] = 0.5f * static_cast<float>(i) - 1;
  for (int64_t i = 0; i < 4; ++i) b.data<double>()[i] = 1.0 / 3.0 + static_cast<double>(i);
  for (int64_t i = 0; i < 4; ++i) c.data<int32_t>()[i] = -7 * static_cast<int32_t>(i);
  const std::string path = temp_file("roundtrip");
  save_safetensors(path, {{"a", a}, {"b", b}, {"c", c}, {"empty", d}}, {{"format", "pt"}});
  const SafetensorsFile f = load_safetensors(path);
  EXPECT_EQ(f.metadata.at("format"), "pt");
  for (const auto& [name, t] :
       std::vector<std::pair<std::string, Tensor>>{{"a", a}, {"b", b}, {"c", c}, {"empty", d}}) {
    const Tensor& g = f.at(name);
    EXPECT_EQ(g.shape(), t.shape()) << name;
    EXPECT_EQ(g.dtype(), t.dtype()) << name;
    EXPECT_EQ(std::memcmp(g.raw(), t.raw(), t.nbytes()), 0) << name;
  }
  EXPECT_THROW(f.at("missing"), Error);
  std::filesystem::remove(path);
}

TEST(Safetensors, Bf16AndF16BecomeFloat32) {
  // bf16 0x3FC0 = 1.5, 0xC000 = -2; f16 0x3E00 = 1.5, 0xC000 = -2, 0x0001 = 2^-24, 0x7C00 = inf.
  const std::string data("\xC0\x3F\x00\xC0\x00\x3E\x00\xC0\x01\x00\x00\x7C", 12);
  const std::string header = R"({"b":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]},)"
                             R"("h":{"dtype":"F16","shape":[4],"data_offsets":[4,12]}})";
  const std::string path = write_raw("half", header, data);
  const SafetensorsFile f = load_safetensors(path);
  EXPECT_EQ(f.at("b").data<float>()[0], 1.5f);
  EXPECT_EQ(f.at("b").data<float>()[1], -2.0f);
  EXPECT_EQ(f.at("h").data<float>()[0], 1.5f);
  EXPECT_EQ(f.at("h").data<float>()[1], -2.0f);
  EXPECT_EQ(f.at("h").data<float>()[2], std::ldexp(1.0f, -24));
  EXPECT_EQ(f.at("h").data<float>()[3], std::numeric_limits<float>::infinity());
  std::filesystem::remove(path);
}

TEST(Safetensors, Bf16RoundsToNearestEven) {
  auto bits = [](float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
  };
  auto from = [](uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  };
  EXPECT_EQ(f32_to_bf16(1.5f), 0x3FC0);
  EXPECT_EQ(f32_to_bf16(from(0x3F808000u)), 0x3F80);  // halfway, even below: down
  EXPECT_EQ(f32_to_bf16(from(0x3F818000u)), 0x3F82);  // halfway, odd below: up
  EXPECT_EQ(f32_to_bf16(from(0x3F808001u)), 0x3F81);  // above halfway: up
  EXPECT_EQ(f32_to_bf16(from(0x7F7FFFFFu)), 0x7F80);  // the largest float rounds to inf
  const uint16_t nan = f32_to_bf16(std::numeric_limits<float>::quiet_NaN());
  EXPECT_TRUE(std::isnan(from(static_cast<uint32_t>(nan) << 16)));
  // Against the definition: the nearer of the two bf16 neighbours.
  for (uint32_t u = 0x3E000000u; u < 0x3E000000u + 5000000u; u += 997) {
    const float x = from(u), lo = from(u & 0xFFFF0000u), hi = from((u & 0xFFFF0000u) + 0x10000u);
    const float got = from(static_cast<uint32_t>(f32_to_bf16(x)) << 16);
    EXPECT_LE(std::abs(got - x), std::min(x - lo, hi - x)) << bits(x);
  }
}

TEST(Safetensors, Int8RowsWithScalesReadAsFloat32) {
  const int64_t R = 3, C = 5;
  std::vector<float> x = {0.5f,   -1.0f, 0.25f, 0.0f,  0.9f,  // max 1
                          0,      0,     0,     0,     0,     // all zero: scale 1
                          -3e-3f, 1e-3f, 2e-3f, 3e-3f, -1e-4f};
  std::vector<int8_t> q(static_cast<size_t>(R * C));
  std::vector<float> sc(static_cast<size_t>(R));
  quantize_rows_int8(x.data(), R, C, q.data(), sc.data());
  EXPECT_EQ(sc[0], 1.0f / 127);
  EXPECT_EQ(sc[1], 1.0f);
  EXPECT_EQ(q[1], -127);
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < C; ++c)  // within half a step of the row's scale
      EXPECT_LE(std::abs(sc[r] * q[r * C + c] - x[r * C + c]), 0.5f * sc[r] * 1.0001f);
  const std::string path = temp_file("int8");
  SafetensorsWriter w(path, {{"w", "I8", {R, C}}, {"w_scale", "F32", {R}}, {"b", "BF16", {2}}});
  w.write(q.data(), q.size());
  w.write(sc.data(), sc.size() * sizeof(float));
  const uint16_t b[2] = {f32_to_bf16(1.5f), f32_to_bf16(-2.0f)};
  w.write(b, sizeof b);
  w.commit();
  const SafetensorsFile f = load_safetensors(path);
  ASSERT_EQ(f.stored.at("w").dtype, "I8");
  const Tensor& t = f.at("w");
  ASSERT_EQ(t.dtype(), DType::F32);
  for (int64_t i = 0; i < R * C; ++i) EXPECT_EQ(t.data<float>()[i], sc[i / C] * q[i]);
  // Converted tensors are freed by drop and converted again when asked for.
  EXPECT_EQ(f.at("b").data<float>()[1], -2.0f);
  f.drop("b");
  EXPECT_EQ(f.at("b").data<float>()[0], 1.5f);
  std::filesystem::remove(path);
  // Writing checks the byte counts; an uncommitted file never appears.
  {
    SafetensorsWriter bad(path, {{"w", "I8", {R, C}}});
    bad.write(q.data(), 3);
    EXPECT_THROW(bad.commit(), Error);
    EXPECT_THROW(bad.write(q.data(), q.size()), Error);
  }
  EXPECT_FALSE(std::filesystem::exists(path));
  EXPECT_THROW(SafetensorsWriter(path, {{"w", "Q4", {2}}}), Error);
}

TEST(Safetensors, Int8WithoutGoodScalesIsRefused) {
  const std::string q4("\x01\x02\x03\x04", 4);
  expect_refused(
      write_raw("noscale", R"({"w":{"dtype":"I8","shape":[2,2],"data_offsets":[0,4]}})", q4),
      "no 'w_scale'");
  expect_refused(write_raw("scaleshape",
                           R"({"w":{"dtype":"I8","shape":[2,2],"data_offsets":[0,4]},)"
                           R"("w_scale":{"dtype":"F32","shape":[4],"data_offsets":[4,20]}})",
                           q4 + std::string(16, '\0')),
                 "must be F32 of shape [2]");
  const float neg[2] = {1.0f, -1.0f};
  expect_refused(write_raw("scaleneg",
                           R"({"w":{"dtype":"I8","shape":[2,2],"data_offsets":[0,4]},)"
                           R"("w_scale":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                           q4 + std::string(reinterpret_cast<const char*>(neg), 8)),
                 "finite and non-negative");
}

TEST(Safetensors, CorruptFilesAreRefused) {
  const std::string t = R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  const std::string data(8, '\0');
  {
    const std::string path = temp_file("short");
    std::ofstream(path, std::ios::binary) << "abc";
    expect_refused(path, "fewer than the 8-byte header length");
  }
  expect_refused(write_raw("huge_header", t, data, uint64_t{1} << 40), "exceeds the 100 MB limit");
  expect_refused(write_raw("past_end", t, data, 5000), "runs past the end of the file");
  expect_refused(write_raw("truncated_data", t, data.substr(0, 5)), "is outside the data");
  expect_refused(write_raw("bad_json", "{\"t\": [1, 2", data), "not valid JSON");
  expect_refused(write_raw("not_object", "[1, 2]  ", data), "must be a JSON object");
  expect_refused(
      write_raw("unknown_dtype", R"({"t":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}})", data),
      "unsupported dtype 'Q4'");
  expect_refused(write_raw("negative_shape",
                           R"({"t":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", data),
                 "negative or non-integer dimension");
  expect_refused(write_raw("overflow_shape",
                           R"({"t":{"dtype":"F32","shape":[4294967296,4294967296,16],)"
                           R"("data_offsets":[0,8]}})",
                           data),
                 "overflows");
  expect_refused(
      write_raw("size_mismatch", R"({"t":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", data),
      "needs 12 bytes, its range holds 8");
  expect_refused(write_raw("overlap",
                           R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                           R"("b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                           data),
                 "overlap");
  expect_refused(write_raw("gap",
                           R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                           R"("b":{"dtype":"F32","shape":[0],"data_offsets":[8,8]}})",
                           data),
                 "gap");
  expect_refused(write_raw("trailing", t, data + "xxxx"), "4 bytes after the last tensor");
  expect_refused(write_raw("duplicate",
                           R"({"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                           R"("t":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                           data),
                 "duplicate tensor name 't'");
  expect_refused(
      write_raw("bad_offsets", R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", data),
      "is outside the data");
  expect_refused(write_raw("missing_field", R"({"t":{"dtype":"F32","shape":[2]}})", data),
                 "needs dtype, shape and data_offsets");
  expect_refused(temp_file("does_not_exist"), "cannot open the file");
}

TEST(Safetensors, AtomicWriteLeavesNoTemporaryFile) {
  const auto dir = std::filesystem::temp_directory_path() / "moe_st_atomic";
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  write_file_atomic((dir / "f.txt").string(), "first");
  write_file_atomic((dir / "f.txt").string(), "second");
  std::ifstream in(dir / "f.txt");
  std::string s;
  in >> s;
  EXPECT_EQ(s, "second");
  int files = 0;
  for (const auto& e : std::filesystem::directory_iterator(dir)) files += e.is_regular_file();
  EXPECT_EQ(files, 1);
  std::filesystem::remove_all(dir);
}

}  // namespace moe

namespace moe {

// Float32 tensors are views of the mapped file, not copies, and stay valid after the file is
// gone (the mapping lives as long as a tensor does); writing to one does not change the file.
TEST(Safetensors, Float32IsZeroCopyFromTheMappedFile) {
  const std::string path = temp_file("mapped");
  Tensor a = Tensor::empty({3, 5}, DType::F32);
  for (int64_t i = 0; i < a.numel(); ++i) a.data<float>()[i] = static_cast<float>(i) * 0.5f;
  save_safetensors(path, {{"a", a}});
  Tensor t;
  {
    const SafetensorsFile f = load_safetensors(path);
    t = f.at("a");
    EXPECT_EQ(static_cast<const char*>(t.raw()), f.data_begin) << "a view of the mapping";
  }
  std::filesystem::remove(path);
  for (int64_t i = 0; i < a.numel(); ++i) EXPECT_EQ(t.data<float>()[i], a.data<float>()[i]);
  t.data<float>()[0] = 7;  // copy-on-write: allowed, private
  EXPECT_EQ(t.data<float>()[0], 7.0f);
}

namespace {

// How many of the pages under [p, p + bytes) this process has mapped (/proc/self/pagemap's
// "present" bit, readable without privileges), or -1 where the file cannot be read.
int64_t present_pages(const void* p, size_t bytes) {
  const int fd = ::open("/proc/self/pagemap", O_RDONLY);
  if (fd < 0) return -1;
  const auto page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t lo = reinterpret_cast<uintptr_t>(p) / page;
  const uintptr_t hi = (reinterpret_cast<uintptr_t>(p) + bytes + page - 1) / page;
  int64_t present = 0;
  for (uintptr_t v = lo; v < hi; ++v) {
    uint64_t entry = 0;
    if (::pread(fd, &entry, sizeof entry, static_cast<off_t>(v * sizeof entry)) != sizeof entry) {
      present = -1;
      break;
    }
    present += static_cast<int64_t>(entry >> 63);
  }
  ::close(fd);
  return present;
}

}  // namespace

// Weights computed from as stored are mapped into the process when their view is made, so the
// first products do not stop at page faults; without prefault, a view maps (almost) nothing
// until it is read.
TEST(Safetensors, PrefaultedViewsAreMappedAtOnce) {
  const std::string path = temp_file("prefault");
  const int64_t rows = 512, cols = 1024;  // 1 MiB of bf16: 256 pages
  std::vector<uint16_t> w(static_cast<size_t>(rows * cols));
  for (size_t i = 0; i < w.size(); ++i) w[i] = f32_to_bf16(static_cast<float>(i % 977));
  {
    SafetensorsWriter out(path, {{"w", "BF16", {rows, cols}}});
    out.write(w.data(), w.size() * sizeof(uint16_t));
    out.commit();
  }
  for (const bool on : {false, true}) {
    SafetensorsFile f = load_safetensors(path);
    f.set_prefault(on);
    const Tensor v = f.view("w");
    ASSERT_EQ(v.dtype(), DType::BF16);
    const int64_t pages = present_pages(v.raw(), static_cast<size_t>(v.nbytes()));
    ASSERT_GE(pages, 0) << "/proc/self/pagemap cannot be read";
    if (on) {
      EXPECT_GE(pages, v.nbytes() / sysconf(_SC_PAGESIZE)) << "every page mapped";
    } else {
      // Only what reading the header touched (and the kernel's fault-around near it).
      EXPECT_LE(pages, 16) << "mapped before it is read";
    }
    EXPECT_EQ(static_cast<const uint16_t*>(v.raw())[rows * cols - 1], w.back());
  }
  std::filesystem::remove(path);
  EXPECT_TRUE(fits_in_available_memory(1 << 20));
  EXPECT_FALSE(fits_in_available_memory(uint64_t{1} << 62));
}

TEST(Safetensors, DirectoriesAndMissingFilesAreRefused) {
  const std::string dir = temp_file("a_folder");  // expect_refused removes it afterwards
  std::filesystem::create_directory(dir);
  expect_refused(dir, "not a regular file");
  try {
    load_safetensors(temp_file("does_not_exist"));
    ADD_FAILURE() << "loaded a missing file";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("cannot open"), std::string::npos) << e.what();
  }
}

}  // namespace moe
