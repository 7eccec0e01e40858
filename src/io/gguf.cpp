// GGUF reading (every field validated before it is trusted) and writing. The format (ggml's
// docs/gguf.md): "GGUF", uint32 version, uint64 tensor count, uint64 key-value count; each
// key-value a string key, a uint32 value type and the value; each tensor a string name, uint32
// n_dims, uint64 ne[n_dims], uint32 ggml type, uint64 offset into the data section; the data
// section starts at the next multiple of general.alignment. Strings are a uint64 length and the
// bytes; arrays a uint32 element type, a uint64 count and the elements. All little-endian.
#include "moe/gguf.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "moe/error.h"
#include "moe/safetensors.h"  // write_file_atomic

namespace moe {

namespace {

constexpr uint32_t kDefaultAlignment = 32;
constexpr int kMaxArrayDepth = 4;
constexpr uint64_t kMaxKeyBytes = 65535;  // the spec's limit on a key
constexpr uint64_t kMaxNameBytes = 64;    // the spec's limit on a tensor name

// Bytes that a value of type t takes at least (a string its length, an array its type and count).
uint64_t min_value_bytes(GgufValueType t) {
  switch (t) {
    case GgufValueType::U8:
    case GgufValueType::I8:
    case GgufValueType::BOOL: return 1;
    case GgufValueType::U16:
    case GgufValueType::I16: return 2;
    case GgufValueType::U32:
    case GgufValueType::I32:
    case GgufValueType::F32: return 4;
    case GgufValueType::U64:
    case GgufValueType::I64:
    case GgufValueType::F64:
    case GgufValueType::STRING: return 8;
    case GgufValueType::ARRAY: return 12;
  }
  return 1;
}

bool known_value_type(uint32_t t) { return t <= 12; }

// A little-endian reader over the header that refuses to read past the end.
class Reader {
 public:
  Reader(const unsigned char* p, uint64_t size, const std::string& where)
      : p_(p), size_(size), w_(where) {}
  uint64_t pos() const { return pos_; }
  uint64_t left() const { return size_ - pos_; }

  uint64_t uint(int bytes, const char* what) {
    need(static_cast<uint64_t>(bytes), what);
    uint64_t v = 0;
    for (int i = 0; i < bytes; ++i) v |= static_cast<uint64_t>(p_[pos_ + i]) << (8 * i);
    pos_ += static_cast<uint64_t>(bytes);
    return v;
  }
  uint32_t u32(const char* what) { return static_cast<uint32_t>(uint(4, what)); }
  uint64_t u64(const char* what) { return uint(8, what); }

  std::string str(const char* what, uint64_t max_len) {
    const uint64_t at = pos_;
    const uint64_t n = u64(what);
    MOE_CHECK(n <= max_len, w_.c_str(), "{} at byte {}: length {} exceeds the limit of {} bytes",
              what, at, n, max_len);
    MOE_CHECK(n <= left(), w_.c_str(),
              "{} at byte {}: length {} runs past the end of the file ({} bytes left)", what, at, n,
              left());
    std::string s(reinterpret_cast<const char*>(p_ + pos_), static_cast<size_t>(n));
    pos_ += n;
    return s;
  }

  GgufValue value(GgufValueType t, const std::string& key, int depth) {
    GgufValue out;
    out.type = t;
    switch (t) {
      case GgufValueType::U8: out.v = uint(1, "a uint8 value"); break;
      case GgufValueType::U16: out.v = uint(2, "a uint16 value"); break;
      case GgufValueType::U32: out.v = uint(4, "a uint32 value"); break;
      case GgufValueType::U64: out.v = uint(8, "a uint64 value"); break;
      case GgufValueType::I8: out.v = int64_t{static_cast<int8_t>(uint(1, "an int8 value"))}; break;
      case GgufValueType::I16:
        out.v = int64_t{static_cast<int16_t>(uint(2, "an int16 value"))};
        break;
      case GgufValueType::I32:
        out.v = int64_t{static_cast<int32_t>(uint(4, "an int32 value"))};
        break;
      case GgufValueType::I64: out.v = static_cast<int64_t>(uint(8, "an int64 value")); break;
      case GgufValueType::F32: {
        const auto bits = static_cast<uint32_t>(uint(4, "a float32 value"));
        float f;
        std::memcpy(&f, &bits, 4);
        out.v = double{f};
        break;
      }
      case GgufValueType::F64: {
        const uint64_t bits = uint(8, "a float64 value");
        double f;
        std::memcpy(&f, &bits, 8);
        out.v = f;
        break;
      }
      case GgufValueType::BOOL: {
        const uint64_t at = pos_;
        const uint64_t b = uint(1, "a bool value");
        MOE_CHECK(b <= 1, w_.c_str(), "key '{}': bool at byte {} holds {}, not 0 or 1", key, at, b);
        out.v = b == 1;
        break;
      }
      case GgufValueType::STRING:
        out.v = str("a string value", std::numeric_limits<uint64_t>::max());
        break;
      case GgufValueType::ARRAY: {
        MOE_CHECK(depth < kMaxArrayDepth, w_.c_str(), "key '{}': arrays nested more than {} deep",
                  key, kMaxArrayDepth);
        const uint64_t at = pos_;
        const uint32_t et = u32("an array's element type");
        MOE_CHECK(known_value_type(et), w_.c_str(),
                  "key '{}': array at byte {} has unknown element type {} (known: 0 to 12, uint8 "
                  "to float64)",
                  key, at, et);
        out.elem = static_cast<GgufValueType>(et);
        const uint64_t n = u64("an array's length");
        MOE_CHECK(n <= left() / min_value_bytes(out.elem), w_.c_str(),
                  "key '{}': array at byte {} of {} {} elements runs past the end of the file ({} "
                  "bytes left)",
                  key, at, n, gguf_value_type_name(out.elem), left());
        std::vector<GgufValue> items;
        items.reserve(static_cast<size_t>(n));
        for (uint64_t i = 0; i < n; ++i) items.push_back(value(out.elem, key, depth + 1));
        out.v = std::move(items);
        break;
      }
    }
    return out;
  }

 private:
  void need(uint64_t n, const char* what) {
    MOE_CHECK(n <= left(), w_.c_str(),
              "truncated: the file ends at byte {} while reading {} ({} bytes needed)", size_, what,
              n);
  }
  const unsigned char* p_;
  uint64_t size_, pos_ = 0;
  const std::string& w_;
};

uint64_t align_up(uint64_t x, uint64_t a) { return x + (a - x % a) % a; }

[[noreturn]] void wrong_type(const GgufFile& f, const std::string& key, const GgufValue& v,
                             const char* wanted) {
  throw_error(
      ("gguf " + f.path).c_str(),
      fmt::format("key '{}' is {}{}{}, not {}", key, gguf_value_type_name(v.type),
                  v.type == GgufValueType::ARRAY ? " of " : "",
                  v.type == GgufValueType::ARRAY ? gguf_value_type_name(v.elem) : "", wanted));
}

bool is_int(GgufValueType t) {
  return t == GgufValueType::U8 || t == GgufValueType::I8 || t == GgufValueType::U16 ||
         t == GgufValueType::I16 || t == GgufValueType::U32 || t == GgufValueType::I32 ||
         t == GgufValueType::U64 || t == GgufValueType::I64;
}

// Whether an integer value fits T (then stored in `out`).
template <class T>
bool int_fits(const GgufValue& v, T& out) {
  if (const auto* u = std::get_if<uint64_t>(&v.v)) {
    if (*u > static_cast<uint64_t>(std::numeric_limits<T>::max())) return false;
    out = static_cast<T>(*u);
    return true;
  }
  const int64_t i = std::get<int64_t>(v.v);
  if constexpr (std::is_unsigned_v<T>) {
    if (i < 0 || static_cast<uint64_t>(i) > std::numeric_limits<T>::max()) return false;
  } else {
    if (i < static_cast<int64_t>(std::numeric_limits<T>::min()) ||
        i > static_cast<int64_t>(std::numeric_limits<T>::max()))
      return false;
  }
  out = static_cast<T>(i);
  return true;
}

// A float64 as float32: refused where it is finite and beyond float32's range (the conversion would
// be undefined), infinities and NaNs kept.
float narrow_f32(double v, const char* where, const std::string& key) {
  MOE_CHECK(!(std::abs(v) > std::numeric_limits<float>::max()) || std::isinf(v), where,
            "key '{}': {} does not fit a float32", key, v);
  return static_cast<float>(v);
}

std::string int_text(const GgufValue& v) {
  return std::holds_alternative<uint64_t>(v.v) ? std::to_string(std::get<uint64_t>(v.v))
                                               : std::to_string(std::get<int64_t>(v.v));
}

template <class T>
T get_int(const GgufFile& f, const std::string& key, const GgufValue& v, const char* wanted) {
  if (!is_int(v.type)) wrong_type(f, key, v, wanted);
  T out{};
  if (!int_fits(v, out))
    throw_error(("gguf " + f.path).c_str(),
                fmt::format("key '{}': {} does not fit {}", key, int_text(v), wanted));
  return out;
}

}  // namespace

const char* gguf_value_type_name(GgufValueType t) {
  switch (t) {
    case GgufValueType::U8: return "UINT8";
    case GgufValueType::I8: return "INT8";
    case GgufValueType::U16: return "UINT16";
    case GgufValueType::I16: return "INT16";
    case GgufValueType::U32: return "UINT32";
    case GgufValueType::I32: return "INT32";
    case GgufValueType::F32: return "FLOAT32";
    case GgufValueType::BOOL: return "BOOL";
    case GgufValueType::STRING: return "STRING";
    case GgufValueType::ARRAY: return "ARRAY";
    case GgufValueType::U64: return "UINT64";
    case GgufValueType::I64: return "INT64";
    case GgufValueType::F64: return "FLOAT64";
  }
  return "?";
}

GgufValue GgufValue::strings(const std::vector<std::string>& xs) {
  std::vector<GgufValue> items;
  items.reserve(xs.size());
  for (const std::string& s : xs) items.push_back(str(s));
  return array(GgufValueType::STRING, std::move(items));
}

const GgufValue& GgufFile::get(const std::string& key) const {
  const auto it = metadata.find(key);
  MOE_CHECK(it != metadata.end(), ("gguf " + path).c_str(), "the file has no key '{}'", key);
  return it->second;
}

uint32_t GgufFile::get_u32(const std::string& key) const {
  return get_int<uint32_t>(*this, key, get(key), "an unsigned 32-bit integer");
}
uint64_t GgufFile::get_u64(const std::string& key) const {
  return get_int<uint64_t>(*this, key, get(key), "an unsigned 64-bit integer");
}
int64_t GgufFile::get_i64(const std::string& key) const {
  return get_int<int64_t>(*this, key, get(key), "a signed 64-bit integer");
}
double GgufFile::get_f64(const std::string& key) const {
  const GgufValue& v = get(key);
  if (v.type != GgufValueType::F32 && v.type != GgufValueType::F64)
    wrong_type(*this, key, v, "a float");
  return std::get<double>(v.v);
}
float GgufFile::get_f32(const std::string& key) const {
  return narrow_f32(get_f64(key), ("gguf " + path).c_str(), key);
}
bool GgufFile::get_bool(const std::string& key) const {
  const GgufValue& v = get(key);
  if (v.type != GgufValueType::BOOL) wrong_type(*this, key, v, "a bool");
  return std::get<bool>(v.v);
}
const std::string& GgufFile::get_string(const std::string& key) const {
  const GgufValue& v = get(key);
  if (v.type != GgufValueType::STRING) wrong_type(*this, key, v, "a string");
  return std::get<std::string>(v.v);
}
size_t GgufFile::get_array_size(const std::string& key) const {
  const GgufValue& v = get(key);
  if (v.type != GgufValueType::ARRAY) wrong_type(*this, key, v, "an array");
  return v.items().size();
}
std::vector<std::string> GgufFile::get_array_strings(const std::string& key) const {
  const GgufValue& v = get(key);
  if (v.type != GgufValueType::ARRAY || v.elem != GgufValueType::STRING)
    wrong_type(*this, key, v, "an array of strings");
  std::vector<std::string> out;
  out.reserve(v.items().size());
  for (const GgufValue& x : v.items()) out.push_back(std::get<std::string>(x.v));
  return out;
}
std::vector<int64_t> GgufFile::get_array_ints(const std::string& key) const {
  const GgufValue& v = get(key);
  if (v.type != GgufValueType::ARRAY || !is_int(v.elem))
    wrong_type(*this, key, v, "an array of integers");
  std::vector<int64_t> out;
  out.reserve(v.items().size());
  for (const GgufValue& x : v.items()) out.push_back(get_int<int64_t>(*this, key, x, "int64"));
  return out;
}
std::vector<float> GgufFile::get_array_f32(const std::string& key) const {
  const GgufValue& v = get(key);
  if (v.type != GgufValueType::ARRAY ||
      (v.elem != GgufValueType::F32 && v.elem != GgufValueType::F64))
    wrong_type(*this, key, v, "an array of floats");
  std::vector<float> out;
  out.reserve(v.items().size());
  for (const GgufValue& x : v.items())
    out.push_back(narrow_f32(std::get<double>(x.v), ("gguf " + path).c_str(), key));
  return out;
}

const GgufTensor& GgufFile::tensor(const std::string& name) const {
  const auto it = index_.find(name);
  MOE_CHECK(it != index_.end(), ("gguf " + path).c_str(), "the file has no tensor '{}'", name);
  return tensors[it->second];
}

Tensor GgufFile::view(const std::string& name) const {
  const GgufTensor& t = tensor(name);
  Shape shape;
  for (int i = t.n_dims - 1; i >= 0; --i) shape.push_back(t.ne[static_cast<size_t>(i)]);
  return Tensor::view(const_cast<char*>(t.data), shape, dtype_of_ggml(t.type), owner_);
}

bool is_gguf_file(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) return false;
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) return false;
  char magic[4] = {};
  const bool ok = ::read(fd, magic, 4) == 4 && std::memcmp(magic, "GGUF", 4) == 0;
  ::close(fd);
  return ok;
}

GgufFile load_gguf(const std::string& path) {
  const std::string w = "gguf " + path;
  const int fd = ::open(path.c_str(), O_RDONLY);
  MOE_CHECK(fd >= 0, w.c_str(), "cannot open the file: {}", std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    throw_error(w.c_str(), fmt::format("cannot stat the file: {}", std::strerror(err)));
  }
  const auto size = static_cast<uint64_t>(st.st_size);
  if (size == 0) {
    ::close(fd);
    throw_error(w.c_str(), "truncated: the file is empty (a GGUF file starts with 'GGUF')");
  }
  void* base = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  MOE_CHECK(base != MAP_FAILED, w.c_str(), "cannot map the file: {}", std::strerror(errno));
  std::shared_ptr<void> mapping(base, [size](void* p) { ::munmap(p, size); });
  return parse_gguf(static_cast<const char*>(base), size, std::move(mapping), path);
}

GgufFile parse_gguf(const char* data, uint64_t size, std::shared_ptr<void> owner,
                    const std::string& path) {
  const std::string w = "gguf " + path;
  const auto* bytes = reinterpret_cast<const unsigned char*>(data);
  Reader r(bytes, size, w);
  GgufFile f;
  f.path = path;
  f.owner_ = std::move(owner);

  MOE_CHECK(size >= 4, w.c_str(), "truncated: the file has {} bytes, fewer than the magic 'GGUF'",
            size);
  MOE_CHECK(std::memcmp(data, "GGUF", 4) == 0, w.c_str(),
            "bad magic: the file starts with bytes {:02x} {:02x} {:02x} {:02x}, not 'GGUF'",
            bytes[0], bytes[1], bytes[2], bytes[3]);
  r.uint(4, "the magic");
  const uint32_t version = r.u32("the version");
  const uint32_t swapped = __builtin_bswap32(version);
  MOE_CHECK(!(version > 0xffff && swapped >= 1 && swapped <= 3), w.c_str(),
            "a big-endian GGUF file (version {} byte-swapped); only little-endian files are "
            "supported",
            swapped);
  MOE_CHECK(version != 1, w.c_str(),
            "GGUF version 1 (32-bit counts) is not supported; versions 2 and 3 are");
  MOE_CHECK(version == 2 || version == 3, w.c_str(),
            "unsupported GGUF version {}; versions 2 and 3 are supported", version);
  f.version = version;
  const uint64_t n_tensors = r.u64("the tensor count");
  const uint64_t n_kv = r.u64("the key-value count");
  // Bounds from the bytes left: a key-value takes at least 13 bytes (key length, type, one byte),
  // a tensor description at least 33 (a name of at least one byte, n_dims, one ne, type, offset).
  MOE_CHECK(n_kv <= r.left() / 13, w.c_str(),
            "key-value count {} cannot fit in the {} bytes left in the file", n_kv, r.left());
  MOE_CHECK(n_tensors <= r.left() / 33, w.c_str(),
            "tensor count {} cannot fit in the {} bytes left in the file", n_tensors, r.left());

  for (uint64_t i = 0; i < n_kv; ++i) {
    const uint64_t at = r.pos();
    std::string key = r.str("a key", kMaxKeyBytes);
    MOE_CHECK(!key.empty(), w.c_str(), "key-value {} at byte {}: empty key", i, at);
    const uint64_t type_at = r.pos();
    const uint32_t t = r.u32("a value type");
    MOE_CHECK(known_value_type(t), w.c_str(),
              "key '{}': unknown value type {} at byte {} (known: 0 to 12, uint8 to float64)", key,
              t, type_at);
    GgufValue v = r.value(static_cast<GgufValueType>(t), key, 0);
    MOE_CHECK(f.metadata.count(key) == 0, w.c_str(), "duplicate key '{}' at byte {}", key, at);
    f.key_order.push_back(key);
    f.metadata.emplace(std::move(key), std::move(v));
  }
  if (f.has("general.alignment")) {
    const GgufValue& a = f.get("general.alignment");
    MOE_CHECK(a.type == GgufValueType::U32, w.c_str(), "general.alignment is {}, not UINT32",
              gguf_value_type_name(a.type));
    const uint64_t al = std::get<uint64_t>(a.v);
    MOE_CHECK(al > 0 && (al & (al - 1)) == 0, w.c_str(),
              "general.alignment {} is not a power of two", al);
    f.alignment = static_cast<uint32_t>(al);
  } else {
    f.alignment = kDefaultAlignment;
  }

  f.tensors.reserve(static_cast<size_t>(n_tensors));
  for (uint64_t i = 0; i < n_tensors; ++i) {
    GgufTensor t;
    const uint64_t at = r.pos();
    t.name = r.str("a tensor name", kMaxNameBytes);
    MOE_CHECK(!t.name.empty(), w.c_str(), "tensor {} at byte {}: empty name", i, at);
    const uint32_t n_dims = r.u32("a tensor's n_dims");
    MOE_CHECK(n_dims >= 1 && n_dims <= 4, w.c_str(),
              "tensor '{}': {} dimensions (1 to 4 are allowed)", t.name, n_dims);
    t.n_dims = static_cast<int>(n_dims);
    uint64_t numel = 1;
    for (uint32_t d = 0; d < n_dims; ++d) {
      const uint64_t ne = r.u64("a tensor's ne");
      MOE_CHECK(ne >= 1 && ne <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max()),
                w.c_str(), "tensor '{}': ne[{}] = {} (each must be at least 1 and below 2^63)",
                t.name, d, ne);
      MOE_CHECK(numel <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) / ne, w.c_str(),
                "tensor '{}': the product of its dimensions overflows", t.name);
      numel *= ne;
      t.ne[d] = static_cast<int64_t>(ne);
    }
    const uint64_t type_at = r.pos();
    const uint32_t type = r.u32("a tensor's type");
    const GgmlTypeInfo* info = ggml_type_info(type);
    if (info == nullptr) {
      const char* other = ggml_other_type_name(type);
      throw_error(
          w.c_str(),
          other != nullptr
              ? fmt::format("tensor '{}': ggml type {} ({}) is not supported; supported: {}",
                            t.name, other, type, ggml_known_types())
              : fmt::format("tensor '{}': unknown ggml type {} at byte {}; supported: {}", t.name,
                            type, type_at, ggml_known_types()));
    }
    t.type = info->type;
    MOE_CHECK(t.ne[0] % info->block == 0, w.c_str(),
              "tensor '{}': ne[0] = {} is not a multiple of {}'s block size {}", t.name, t.ne[0],
              info->name, info->block);
    const auto blocks = static_cast<uint64_t>(t.ne[0] / info->block);
    const auto rows = static_cast<uint64_t>(t.rows());  // numel fits, so rows do
    MOE_CHECK(blocks <= std::numeric_limits<uint64_t>::max() / info->block_size / rows, w.c_str(),
              "tensor '{}': its byte size overflows", t.name);
    t.bytes = blocks * info->block_size * rows;
    t.offset = r.u64("a tensor's offset");
    MOE_CHECK(t.offset % f.alignment == 0, w.c_str(),
              "tensor '{}': offset {} is not a multiple of the alignment {}", t.name, t.offset,
              f.alignment);
    f.tensors.push_back(std::move(t));
  }
  for (size_t i = 0; i < f.tensors.size(); ++i)
    MOE_CHECK(f.index_.emplace(f.tensors[i].name, i).second, w.c_str(),
              "duplicate tensor name '{}'", f.tensors[i].name);

  const uint64_t data_start = align_up(r.pos(), f.alignment);
  MOE_CHECK(f.tensors.empty() || data_start <= size, w.c_str(),
            "the data section would start at byte {}, past the end of the file ({} bytes)",
            data_start, size);
  f.data_begin = data + std::min(data_start, size);
  f.data_size = data_start <= size ? size - data_start : 0;
  std::vector<const GgufTensor*> by_offset;
  for (GgufTensor& t : f.tensors) {
    MOE_CHECK(t.offset <= f.data_size && t.bytes <= f.data_size - t.offset, w.c_str(),
              "tensor '{}': {} bytes at offset {} run past the end of the data section ({} bytes)",
              t.name, t.bytes, t.offset, f.data_size);
    t.data = f.data_begin + t.offset;
    by_offset.push_back(&t);
  }
  std::sort(by_offset.begin(), by_offset.end(),
            [](const GgufTensor* a, const GgufTensor* b) { return a->offset < b->offset; });
  for (size_t i = 1; i < by_offset.size(); ++i)
    MOE_CHECK(by_offset[i]->offset >= by_offset[i - 1]->offset + by_offset[i - 1]->bytes, w.c_str(),
              "tensors '{}' (bytes [{}, {})) and '{}' (from byte {}) overlap",
              by_offset[i - 1]->name, by_offset[i - 1]->offset,
              by_offset[i - 1]->offset + by_offset[i - 1]->bytes, by_offset[i]->name,
              by_offset[i]->offset);
  return f;
}

namespace {

void put(std::string& out, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
void put_str(std::string& out, const std::string& s) {
  put(out, s.size(), 8);
  out += s;
}

void put_value(std::string& out, const GgufValue& v) {
  switch (v.type) {
    case GgufValueType::U8:
    case GgufValueType::U16:
    case GgufValueType::U32:
    case GgufValueType::U64:
    case GgufValueType::I8:
    case GgufValueType::I16:
    case GgufValueType::I32:
    case GgufValueType::I64: {
      const uint64_t bits = std::holds_alternative<uint64_t>(v.v)
                                ? std::get<uint64_t>(v.v)
                                : static_cast<uint64_t>(std::get<int64_t>(v.v));
      put(out, bits, static_cast<int>(min_value_bytes(v.type)));
      break;
    }
    case GgufValueType::F32: {
      const float x = narrow_f32(std::get<double>(v.v), "gguf", "(a FLOAT32 being written)");
      uint32_t bits;
      std::memcpy(&bits, &x, 4);
      put(out, bits, 4);
      break;
    }
    case GgufValueType::F64: {
      uint64_t bits;
      const double x = std::get<double>(v.v);
      std::memcpy(&bits, &x, 8);
      put(out, bits, 8);
      break;
    }
    case GgufValueType::BOOL: out.push_back(std::get<bool>(v.v) ? 1 : 0); break;
    case GgufValueType::STRING: put_str(out, std::get<std::string>(v.v)); break;
    case GgufValueType::ARRAY:
      put(out, static_cast<uint32_t>(v.elem), 4);
      put(out, v.items().size(), 8);
      for (const GgufValue& x : v.items()) {
        MOE_CHECK(x.type == v.elem, "gguf", "an array of {} holds a {}",
                  gguf_value_type_name(v.elem), gguf_value_type_name(x.type));
        put_value(out, x);
      }
      break;
  }
}

}  // namespace

std::string gguf_header(const std::vector<std::pair<std::string, GgufValue>>& metadata,
                        const std::vector<GgufWriteTensor>& tensors,
                        std::vector<uint64_t>& offsets) {
  std::string out = "GGUF";
  put(out, 3, 4);
  put(out, tensors.size(), 8);
  put(out, metadata.size(), 8);
  uint64_t alignment = kDefaultAlignment;
  for (const auto& [key, v] : metadata) {
    put_str(out, key);
    put(out, static_cast<uint32_t>(v.type), 4);
    put_value(out, v);
    if (key == "general.alignment" && v.type == GgufValueType::U32)
      alignment = std::get<uint64_t>(v.v);
  }
  MOE_CHECK(alignment > 0 && (alignment & (alignment - 1)) == 0, "gguf",
            "general.alignment {} is not a power of two", alignment);
  offsets.clear();
  uint64_t offset = 0;
  for (const GgufWriteTensor& t : tensors) {
    MOE_CHECK(!t.ne.empty() && t.ne.size() <= 4, "gguf", "tensor '{}': {} dimensions", t.name,
              t.ne.size());
    int64_t rows = 1;
    for (size_t d = 1; d < t.ne.size(); ++d) rows *= t.ne[d];
    const uint64_t bytes = ggml_row_bytes(t.type, t.ne[0]) * static_cast<uint64_t>(rows);
    put_str(out, t.name);
    put(out, t.ne.size(), 4);
    for (const int64_t ne : t.ne) put(out, static_cast<uint64_t>(ne), 8);
    put(out, static_cast<uint32_t>(t.type), 4);
    put(out, offset, 8);
    offsets.push_back(offset);
    offset = align_up(offset + bytes, alignment);
  }
  out.append(align_up(out.size(), alignment) - out.size(), '\0');
  return out;
}

std::string gguf_bytes(const std::vector<std::pair<std::string, GgufValue>>& metadata,
                       const std::vector<GgufWriteTensor>& tensors) {
  std::vector<uint64_t> offsets;
  std::string out = gguf_header(metadata, tensors, offsets);
  const size_t data_start = out.size();
  for (size_t i = 0; i < tensors.size(); ++i) {
    const GgufWriteTensor& t = tensors[i];
    int64_t rows = 1;
    for (size_t d = 1; d < t.ne.size(); ++d) rows *= t.ne[d];
    out.resize(data_start + offsets[i], '\0');
    out.append(static_cast<const char*>(t.data),
               ggml_row_bytes(t.type, t.ne[0]) * static_cast<uint64_t>(rows));
  }
  // What is written must read back.
  parse_gguf(out.data(), out.size(), nullptr, "(being written)");
  return out;
}

void write_gguf(const std::string& path,
                const std::vector<std::pair<std::string, GgufValue>>& metadata,
                const std::vector<GgufWriteTensor>& tensors) {
  write_file_atomic(path, gguf_bytes(metadata, tensors));
}

}  // namespace moe
