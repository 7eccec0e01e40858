// safetensors reading (validated) and writing (atomic).
#include "moe/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>

namespace moe {

namespace fs = std::filesystem;

void write_file_atomic(const std::string& path, const std::string& contents) {
  const fs::path target(path);
  const fs::path dir = target.has_parent_path() ? target.parent_path() : fs::path(".");
  const std::string tmp =
      (dir / (".tmp." + target.filename().string() + "." + std::to_string(getpid()))).string();
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  MOE_CHECK(fd >= 0, "io", "cannot create {}: {}", tmp, std::strerror(errno));
  size_t done = 0;
  while (done < contents.size()) {
    const ssize_t n = ::write(fd, contents.data() + done, contents.size() - done);
    if (n < 0) {
      const int err = errno;
      ::close(fd);
      ::unlink(tmp.c_str());
      throw_error("io", fmt::format("cannot write {}: {}", tmp, std::strerror(err)));
    }
    done += static_cast<size_t>(n);
  }
  const bool synced = ::fsync(fd) == 0;
  ::close(fd);
  if (!synced || std::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    throw_error("io", fmt::format("cannot save {}: {}", path, std::strerror(err)));
  }
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
}

namespace {

const char* st_dtype(DType d) {
  switch (d) {
    case DType::F32: return "F32";
    case DType::F64: return "F64";
    case DType::I32: return "I32";
    case DType::I64: return "I64";
  }
  return "?";
}

float bf16_to_f32(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalize
      exp = 127 - 15 + 1;
      while ((mant & 0x400) == 0) {
        mant <<= 1;
        --exp;
      }
      bits = sign | (exp << 23) | ((mant & 0x3ff) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

}  // namespace

void save_safetensors(const std::string& path,
                      const std::vector<std::pair<std::string, Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  nlohmann::json header = nlohmann::json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  size_t offset = 0;
  std::set<std::string> names;
  for (const auto& [name, t] : tensors) {
    MOE_CHECK(names.insert(name).second, "safetensors", "duplicate tensor name {} for {}", name,
              path);
    header[name] = {{"dtype", st_dtype(t.dtype())},
                    {"shape", t.shape()},
                    {"data_offsets", {offset, offset + t.nbytes()}}};
    offset += t.nbytes();
  }
  std::string h = header.dump();
  h.append((8 - h.size() % 8) % 8, ' ');  // align the data to 8 bytes
  std::string out(8, '\0');
  const uint64_t n = h.size();
  for (int i = 0; i < 8; ++i)
    out[static_cast<size_t>(i)] = static_cast<char>((n >> (8 * i)) & 0xff);
  out += h;
  out.reserve(out.size() + offset);
  for (const auto& [name, t] : tensors) out.append(static_cast<const char*>(t.raw()), t.nbytes());
  write_file_atomic(path, out);
}

const Tensor& SafetensorsFile::at(const std::string& name) const {
  auto it = tensors.find(name);
  MOE_CHECK(it != tensors.end(), "safetensors", "missing tensor {}", name);
  return it->second;
}

SafetensorsFile load_safetensors(const std::string& path) {
  const std::string w = "safetensors " + path;
  // The whole file is mapped (private, copy-on-write): tensors in their own dtype are views.
  const int fd = ::open(path.c_str(), O_RDONLY);
  MOE_CHECK(fd >= 0, w.c_str(), "cannot open the file: {}", std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw_error(w.c_str(), "not a regular file");
  }
  const auto size = static_cast<uint64_t>(st.st_size);
  if (size < 8) {
    ::close(fd);
    throw_error(w.c_str(),
                fmt::format("the file has {} bytes, fewer than the 8-byte header length", size));
  }
  void* base = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
  ::close(fd);
  MOE_CHECK(base != MAP_FAILED, w.c_str(), "cannot map the file: {}", std::strerror(errno));
  const std::shared_ptr<void> mapping(base, [size](void* p) { ::munmap(p, size); });
  const auto* bytes = static_cast<const unsigned char*>(base);
  uint64_t hlen = 0;
  for (int i = 0; i < 8; ++i) hlen |= static_cast<uint64_t>(bytes[i]) << (8 * i);
  MOE_CHECK(hlen <= 100'000'000, w.c_str(), "header length {} exceeds the 100 MB limit", hlen);
  MOE_CHECK(hlen <= size - 8, w.c_str(),
            "header length {} runs past the end of the file ({} bytes)", hlen, size);
  const std::string htext(reinterpret_cast<const char*>(bytes) + 8, hlen);
  // Parse, refusing duplicate names at the top level.
  std::set<std::string> seen;
  std::string duplicate;
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(
        htext, [&](int depth, nlohmann::json::parse_event_t ev, nlohmann::json& parsed) {
          if (depth == 1 && ev == nlohmann::json::parse_event_t::key &&
              !seen.insert(parsed.get<std::string>()).second)
            duplicate = parsed.get<std::string>();
          return true;
        });
  } catch (const nlohmann::json::exception& e) {
    throw_error(w.c_str(), fmt::format("the header is not valid JSON: {}", e.what()));
  }
  MOE_CHECK(duplicate.empty(), w.c_str(), "duplicate tensor name '{}'", duplicate);
  MOE_CHECK(header.is_object(), w.c_str(), "the header must be a JSON object");
  const uint64_t data_size = size - 8 - hlen;

  struct Entry {
    std::string name, dtype;
    Shape shape;
    uint64_t begin, end;
  };
  std::vector<Entry> entries;
  SafetensorsFile out;
  for (const auto& [name, v] : header.items()) {
    if (name == "__metadata__") {
      MOE_CHECK(v.is_object(), w.c_str(), "__metadata__ must be an object of strings");
      for (const auto& [k, mv] : v.items()) {
        MOE_CHECK(mv.is_string(), w.c_str(), "__metadata__[{}] is not a string", k);
        out.metadata[k] = mv.get<std::string>();
      }
      continue;
    }
    MOE_CHECK(
        v.is_object() && v.contains("dtype") && v.contains("shape") && v.contains("data_offsets"),
        w.c_str(), "tensor '{}' needs dtype, shape and data_offsets", name);
    Entry e{name, "", {}, 0, 0};
    MOE_CHECK(v["dtype"].is_string(), w.c_str(), "tensor '{}': dtype is not a string", name);
    e.dtype = v["dtype"].get<std::string>();
    uint64_t elem = 0;
    if (e.dtype == "F32" || e.dtype == "I32") elem = 4;
    if (e.dtype == "F64" || e.dtype == "I64") elem = 8;
    if (e.dtype == "BF16" || e.dtype == "F16") elem = 2;
    MOE_CHECK(elem > 0, w.c_str(),
              "tensor '{}': unsupported dtype '{}' (F32, F64, BF16, F16, "
              "I32, I64)",
              name, e.dtype);
    const auto& shape = v["shape"];
    MOE_CHECK(shape.is_array(), w.c_str(), "tensor '{}': shape is not an array", name);
    uint64_t numel = 1;
    for (const auto& d : shape) {
      MOE_CHECK(d.is_number_integer() && d.get<int64_t>() >= 0, w.c_str(),
                "tensor '{}': shape {} has a negative or non-integer dimension", name,
                shape.dump());
      const auto dim = d.get<uint64_t>();
      MOE_CHECK(dim == 0 || numel <= std::numeric_limits<uint64_t>::max() / 16 / dim, w.c_str(),
                "tensor '{}': shape {} overflows", name, shape.dump());
      numel *= dim;
      e.shape.push_back(static_cast<int64_t>(dim));
    }
    const auto& off = v["data_offsets"];
    MOE_CHECK(off.is_array() && off.size() == 2 && off[0].is_number_unsigned() &&
                  off[1].is_number_unsigned(),
              w.c_str(), "tensor '{}': data_offsets must be two non-negative integers", name);
    e.begin = off[0].get<uint64_t>();
    e.end = off[1].get<uint64_t>();
    MOE_CHECK(e.begin <= e.end && e.end <= data_size, w.c_str(),
              "tensor '{}': byte range [{}, {}) is outside the data ({} bytes)", name, e.begin,
              e.end, data_size);
    MOE_CHECK(numel * elem == e.end - e.begin, w.c_str(),
              "tensor '{}': shape {} of {} needs {} bytes, its range holds {}", name, shape.dump(),
              e.dtype, numel * elem, e.end - e.begin);
    entries.push_back(e);
  }
  std::sort(entries.begin(), entries.end(),
            [](const Entry& a, const Entry& b) { return a.begin < b.begin; });
  uint64_t expect = 0;
  for (const Entry& e : entries) {
    MOE_CHECK(e.begin == expect, w.c_str(), "tensor '{}' starts at byte {}: {} at {}", e.name,
              e.begin, e.begin < expect ? "overlap" : "gap", expect);
    expect = e.end;
  }
  MOE_CHECK(expect == data_size, w.c_str(), "{} bytes after the last tensor", data_size - expect);

  char* data = static_cast<char*>(base) + 8 + hlen;
  out.data_begin = data;
  out.data_end = data + data_size;
  for (const Entry& e : entries) {
    char* src = data + e.begin;
    const int64_t n = shape_numel(e.shape);
    Tensor t;
    if (e.dtype == "BF16" || e.dtype == "F16") {
      t = Tensor::empty(e.shape, DType::F32);
      float* dst = t.data<float>();
      for (int64_t i = 0; i < n; ++i) {
        uint16_t v;
        std::memcpy(&v, src + 2 * i, 2);
        dst[i] = e.dtype == "BF16" ? bf16_to_f32(v) : f16_to_f32(v);
      }
    } else {
      const DType dt = e.dtype == "F32"   ? DType::F32
                       : e.dtype == "F64" ? DType::F64
                       : e.dtype == "I32" ? DType::I32
                                          : DType::I64;
      if (reinterpret_cast<uintptr_t>(src) % dtype_size(dt) == 0) {
        t = Tensor::view(src, e.shape, dt, mapping);  // zero-copy
      } else {  // a header length that leaves the data unaligned: copy
        t = Tensor::empty(e.shape, dt);
        if (t.nbytes() > 0) std::memcpy(t.raw(), src, t.nbytes());
      }
    }
    out.tensors[e.name] = t;
  }
  return out;
}

void drop_mapped_pages(const void* p, size_t bytes) {
  const auto page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const auto lo = reinterpret_cast<uintptr_t>(p) / page * page;
  const auto hi = (reinterpret_cast<uintptr_t>(p) + bytes + page - 1) / page * page;
  madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_DONTNEED);
}

void SafetensorsFile::drop(const Tensor& t) const {
  const char* p = static_cast<const char*>(t.raw());
  if (!p || p < data_begin || p + t.nbytes() > data_end) return;  // converted, not mapped
  drop_mapped_pages(p, t.nbytes());
}

}  // namespace moe
