// safetensors reading (validated) and writing (atomic).
#include "moe/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>
#include <vector>

namespace moe {

namespace fs = std::filesystem;

AtomicFile::AtomicFile(const std::string& path) : path_(path) {
  const fs::path target(path);
  const fs::path dir = target.has_parent_path() ? target.parent_path() : fs::path(".");
  tmp_ = (dir / (".tmp." + target.filename().string() + "." + std::to_string(getpid()))).string();
  fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  MOE_CHECK(fd_ >= 0, "io", "cannot create {}: {}", tmp_, std::strerror(errno));
}

AtomicFile::~AtomicFile() {
  if (fd_ >= 0) {  // not committed: leave the old file as it was
    ::close(fd_);
    ::unlink(tmp_.c_str());
  }
}

void AtomicFile::write(const void* data, size_t bytes) {
  MOE_CHECK(fd_ >= 0, "io", "{} is already committed", path_);
  const char* p = static_cast<const char*>(data);
  size_t done = 0;
  while (done < bytes) {
    const ssize_t n = ::write(fd_, p + done, bytes - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      const int err = errno;
      ::close(fd_);
      fd_ = -1;
      ::unlink(tmp_.c_str());
      throw_error("io", fmt::format("cannot write {}: {}", path_, std::strerror(err)));
    }
    done += static_cast<size_t>(n);
  }
}

void AtomicFile::commit() {
  MOE_CHECK(fd_ >= 0, "io", "{} is already committed", path_);
  const bool synced = ::fsync(fd_) == 0;
  const int sync_err = errno;
  ::close(fd_);
  fd_ = -1;
  if (!synced || std::rename(tmp_.c_str(), path_.c_str()) != 0) {
    const int err = synced ? errno : sync_err;
    ::unlink(tmp_.c_str());
    throw_error("io", fmt::format("cannot save {}: {}", path_, std::strerror(err)));
  }
  const fs::path target(path_);
  const fs::path dir = target.has_parent_path() ? target.parent_path() : fs::path(".");
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
}

FileCheck check_file(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  MOE_CHECK(fd >= 0, "io", "cannot open {}: {}", path, std::strerror(errno));
  FileCheck c;
  uLong crc = crc32(0L, Z_NULL, 0);
  std::vector<unsigned char> buf(size_t{1} << 20);
  for (;;) {
    const ssize_t n = ::read(fd, buf.data(), buf.size());
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const int err = errno;
      ::close(fd);
      throw_error("io", fmt::format("cannot read {}: {}", path, std::strerror(err)));
    }
    if (n == 0) break;
    crc = crc32(crc, buf.data(), static_cast<uInt>(n));
    c.bytes += static_cast<uint64_t>(n);
  }
  ::close(fd);
  c.crc32 = static_cast<uint32_t>(crc);
  return c;
}

void write_file_atomic(const std::string& path, const std::string& contents) {
  AtomicFile f(path);
  f.write(contents.data(), contents.size());
  f.commit();
}

const char* st_dtype(DType d) {
  switch (d) {
    case DType::F32: return "F32";
    case DType::F64: return "F64";
    case DType::I32: return "I32";
    case DType::I64: return "I64";
    case DType::BF16: return "BF16";
    case DType::F16: return "F16";
    case DType::I8: return "I8";
    default: break;
  }
  throw_error(
      "safetensors",
      fmt::format("{} tensors have no safetensors dtype (write them as GGUF)", dtype_name(d)));
}

size_t st_dtype_size(const std::string& dtype) {
  if (dtype == "F32" || dtype == "I32") return 4;
  if (dtype == "F64" || dtype == "I64") return 8;
  if (dtype == "BF16" || dtype == "F16") return 2;
  if (dtype == "I8" || dtype == "U8") return 1;
  return 0;
}

SafetensorsWriter::SafetensorsWriter(const std::string& path, std::vector<Entry> entries,
                                     const std::map<std::string, std::string>& metadata)
    : file_(path), entries_(std::move(entries)) {
  nlohmann::json header = nlohmann::json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  std::set<std::string> names;
  for (const Entry& e : entries_) {
    MOE_CHECK(names.insert(e.name).second, "safetensors", "duplicate tensor name {} for {}", e.name,
              path);
    const size_t elem = st_dtype_size(e.dtype);
    MOE_CHECK(elem > 0, "safetensors", "tensor {}: cannot write dtype {}", e.name, e.dtype);
    const uint64_t bytes = static_cast<uint64_t>(shape_numel(e.shape)) * elem;
    header[e.name] = {
        {"dtype", e.dtype}, {"shape", e.shape}, {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  std::string h = header.dump();
  h.append((8 - h.size() % 8) % 8, ' ');  // align the data to 8 bytes
  unsigned char len[8];
  const uint64_t n = h.size();
  for (int i = 0; i < 8; ++i) len[i] = static_cast<unsigned char>((n >> (8 * i)) & 0xff);
  file_.write(len, 8);
  file_.write(h.data(), h.size());
}

void SafetensorsWriter::write(const void* data, size_t bytes) {
  const char* p = static_cast<const char*>(data);
  while (bytes > 0 || (next_ < entries_.size() && left_ == 0 && bytes_of(next_) == 0)) {
    MOE_CHECK(next_ < entries_.size(), "safetensors", "more bytes written than the {} tensors hold",
              entries_.size());
    if (left_ == 0) left_ = bytes_of(next_);
    const size_t n = std::min(bytes, left_);
    file_.write(p, n);
    p += n;
    bytes -= n;
    left_ -= n;
    if (left_ == 0) ++next_;
  }
}

size_t SafetensorsWriter::bytes_of(size_t i) const {
  return static_cast<size_t>(shape_numel(entries_[i].shape)) * st_dtype_size(entries_[i].dtype);
}

void SafetensorsWriter::commit() {
  while (next_ < entries_.size() && left_ == 0 && bytes_of(next_) == 0) ++next_;  // empty ones
  MOE_CHECK(next_ == entries_.size(), "safetensors", "{} of {} tensors written", next_,
            entries_.size());
  file_.commit();
}

void save_safetensors(const std::string& path,
                      const std::vector<std::pair<std::string, Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  std::vector<SafetensorsWriter::Entry> entries;
  for (const auto& [name, t] : tensors) entries.push_back({name, st_dtype(t.dtype()), t.shape()});
  SafetensorsWriter w(path, std::move(entries), metadata);
  for (const auto& [name, t] : tensors) w.write(t.raw(), t.nbytes());
  w.commit();
}

size_t StoredTensor::row_bytes() const {
  return static_cast<size_t>(row_len()) * st_dtype_size(dtype);
}

bool StoredTensor::as_f32() const {
  return dtype == "F32" || dtype == "BF16" || dtype == "F16" || dtype == "I8";
}

void rows_to_f32(const std::string& dtype, const void* src, const float* scales, int64_t rows,
                 int64_t row_len, float* out) {
  const std::optional<WType> t = dtype == "F32"    ? WType::f32
                                 : dtype == "BF16" ? WType::bf16
                                 : dtype == "F16"  ? WType::f16
                                 : dtype == "I8"   ? std::optional<WType>(WType::i8)
                                                   : std::nullopt;
  if (!t) throw_error("safetensors", fmt::format("{} values cannot be read as float32", dtype));
  const WeightMatrix w{*t, src, rows, row_len, scales};
  cpu::weight_rows_f32(w, 0, rows, out);
}

void quantize_rows_int8(const float* x, int64_t rows, int64_t row_len, int8_t* q, float* scales) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * row_len;
    float m = 0;
    for (int64_t j = 0; j < row_len; ++j) m = std::max(m, std::abs(row[j]));
    MOE_CHECK(std::isfinite(m), "quantize", "row {} holds a value that is not finite", r);
    const float sc = m > 0 ? m / 127.0f : 1.0f;
    scales[r] = sc;
    for (int64_t j = 0; j < row_len; ++j)
      q[r * row_len + j] =
          static_cast<int8_t>(std::clamp(std::nearbyint(row[j] / sc), -127.f, 127.f));
  }
}

const Tensor& SafetensorsFile::at(const std::string& name) const {
  auto it = tensors_.find(name);
  if (it != tensors_.end()) return it->second;
  auto s = stored.find(name);
  MOE_CHECK(s != stored.end(), "safetensors", "missing tensor {}", name);
  const StoredTensor& st = s->second;
  Tensor t = Tensor::empty(st.shape, DType::F32);
  rows_to_f32(st.dtype, st.data, st.scale_values, st.rows(), st.row_len(), t.data<float>());
  return tensors_.emplace(name, std::move(t)).first->second;
}

Tensor SafetensorsFile::view(const std::string& name) const {
  auto s = stored.find(name);
  MOE_CHECK(s != stored.end(), "safetensors", "missing tensor {}", name);
  const StoredTensor& st = s->second;
  static const std::pair<const char*, DType> kTypes[] = {{"F32", DType::F32},
                                                         {"F64", DType::F64},
                                                         {"BF16", DType::BF16},
                                                         {"F16", DType::F16},
                                                         {"I8", DType::I8}};
  const auto t = std::find_if(std::begin(kTypes), std::end(kTypes),
                              [&](const auto& k) { return st.dtype == k.first; });
  MOE_CHECK(t != std::end(kTypes), "safetensors",
            "{} is {}: it cannot be computed from as stored (F32, BF16, F16 and I8 can)", name,
            st.dtype);
  const DType d = t->second;
  if (mapped_ && prefault_ && st.bytes > 0) prefault_mapped_pages(st.data, st.bytes);
  return Tensor::view(const_cast<char*>(st.data), st.shape, d, mapping_);
}

void SafetensorsFile::drop(const std::string& name) const {
  auto s = stored.find(name);
  if (s == stored.end()) return;
  auto it = tensors_.find(name);
  const bool a_scale = name.size() > 6 && name.compare(name.size() - 6, 6, "_scale") == 0 &&
                       has(name.substr(0, name.size() - 6));  // still pointed to: kept
  if (it != tensors_.end() && it->second.raw() != s->second.data && s->second.as_f32() &&
      !a_scale) {
    tensors_.erase(it);  // a conversion: free it
    return;
  }
  if (mapped_ && s->second.bytes > 0) drop_mapped_pages(s->second.data, s->second.bytes);
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
  std::shared_ptr<void> mapping(base, [size](void* p) { ::munmap(p, size); });
  SafetensorsFile f = parse_safetensors(static_cast<char*>(base), size, std::move(mapping), path);
  f.mapped_ = true;
  return f;
}

SafetensorsFile parse_safetensors(char* base, uint64_t size, std::shared_ptr<void> owner,
                                  const std::string& path) {
  const std::string w = "safetensors " + path;
  MOE_CHECK(size >= 8, w.c_str(), "the file has {} bytes, fewer than the 8-byte header length",
            size);
  const std::shared_ptr<void> mapping = std::move(owner);
  const auto* bytes = reinterpret_cast<const unsigned char*>(base);
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
    const uint64_t elem = st_dtype_size(e.dtype);
    MOE_CHECK(elem > 0, w.c_str(),
              "tensor '{}': unsupported dtype '{}' (F32, F64, BF16, F16, I8, U8, I32, I64)", name,
              e.dtype);
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
  out.mapping_ = mapping;
  for (const Entry& e : entries) {
    char* src = data + e.begin;
    StoredTensor& entry = out.stored[e.name];
    entry.dtype = e.dtype;
    entry.shape = e.shape;
    entry.data = src;
    entry.bytes = e.end - e.begin;
    if (entry.as_f32() && e.dtype != "F32") continue;  // converted when asked for
    const DType dt = e.dtype == "F32"   ? DType::F32
                     : e.dtype == "F64" ? DType::F64
                     : e.dtype == "I32" ? DType::I32
                                        : DType::I64;
    Tensor t;
    if (reinterpret_cast<uintptr_t>(src) % dtype_size(dt) == 0) {
      t = Tensor::view(src, e.shape, dt, mapping);  // zero-copy
    } else {  // a header length that leaves the data unaligned: copy
      t = Tensor::empty(e.shape, dt);
      if (t.nbytes() > 0) std::memcpy(t.raw(), src, t.nbytes());
    }
    out.tensors_[e.name] = t;
  }
  // Quantized tensors: their scales must be there, float32, one per row, finite.
  for (auto& [name, q] : out.stored) {
    if (q.dtype != "I8") continue;
    auto sc = out.stored.find(name + "_scale");
    MOE_CHECK(sc != out.stored.end(), w.c_str(),
              "tensor '{}' is int8 but the file has no '{}_scale' (its per-row scales)", name,
              name);
    const Shape want(q.shape.begin(), q.shape.empty() ? q.shape.end() : q.shape.end() - 1);
    MOE_CHECK(sc->second.dtype == "F32" && sc->second.shape == want, w.c_str(),
              "'{}_scale' must be F32 of shape {}, got {} of shape {}", name,
              nlohmann::json(want).dump(), sc->second.dtype,
              nlohmann::json(sc->second.shape).dump());
    const Tensor& scales = out.at(name + "_scale");
    const float* v = scales.data<float>();
    for (int64_t i = 0; i < scales.numel(); ++i)
      MOE_CHECK(std::isfinite(v[i]) && v[i] >= 0, w.c_str(),
                "'{}_scale' holds {} at {}: scales must be finite and non-negative", name, v[i], i);
    q.scale = &sc->second;
    q.scale_values = v;
  }
  return out;
}

void drop_mapped_pages(const void* p, size_t bytes) {
  const auto page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const auto lo = reinterpret_cast<uintptr_t>(p) / page * page;
  const auto hi = (reinterpret_cast<uintptr_t>(p) + bytes + page - 1) / page * page;
  madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_DONTNEED);
}

bool prefault_mapped_pages(const void* p, size_t bytes) {
#ifndef MADV_POPULATE_READ
  constexpr int MADV_POPULATE_READ = 22;  // Linux 5.14; older headers lack the name
#endif
  const auto page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t lo = reinterpret_cast<uintptr_t>(p) / page * page;
  const uintptr_t hi = (reinterpret_cast<uintptr_t>(p) + bytes + page - 1) / page * page;
  constexpr uintptr_t kChunk = uintptr_t{16} << 20;
  const auto chunks = static_cast<int64_t>((hi - lo + kChunk - 1) / kChunk);
  int failed = 0;
#pragma omp parallel for schedule(dynamic) reduction(+ : failed) if (chunks > 1)
  for (int64_t i = 0; i < chunks; ++i) {
    const uintptr_t a = lo + static_cast<uintptr_t>(i) * kChunk, b = std::min(hi, a + kChunk);
    failed += madvise(reinterpret_cast<void*>(a), b - a, MADV_POPULATE_READ) != 0 ? 1 : 0;
  }
  return failed == 0;
}

bool fits_in_available_memory(uint64_t bytes) {
  std::ifstream f("/proc/meminfo");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("MemAvailable:", 0) == 0)
      return bytes / 1024 < std::strtoull(line.c_str() + 13, nullptr, 10);  // in KiB
  return false;
}

}  // namespace moe
