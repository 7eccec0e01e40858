// moe/gguf.h: the GGUF format (llama.cpp's model files: a header of typed key-value metadata and
// tensor descriptions, then the tensors' bytes, aligned), read with every field validated before
// it is trusted, and written; and ggml's tensor types, with scalar dequantization that gives the
// values ggml gives, bit for bit.
//
// Spec: ggml's docs/gguf.md (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md). Versions
// 2 and 3, little-endian. What the reader checks, and why it is our own code: docs/gguf.md.
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include "moe/tensor.h"

namespace moe {

// ggml's tensor types (the numbers are ggml's `enum ggml_type`, as GGUF stores them).
enum class GgmlType : uint32_t {
  F32 = 0,
  F16 = 1,
  Q4_0 = 2,
  Q4_1 = 3,
  Q5_0 = 6,
  Q5_1 = 7,
  Q8_0 = 8,
  Q2_K = 10,
  Q3_K = 11,
  Q4_K = 12,
  Q5_K = 13,
  Q6_K = 14,
  BF16 = 30,
  MXFP4 = 39,
};

// A type's name as ggml writes it, its elements per block and bytes per block.
struct GgmlTypeInfo {
  GgmlType type;
  const char* name;
  int64_t block;      // elements per block
  size_t block_size;  // bytes per block
};
// The table entry of ggml type number `t`, or nullptr for a type this reader does not know.
const GgmlTypeInfo* ggml_type_info(uint32_t t);
const GgmlTypeInfo& ggml_type_info(GgmlType t);
const char* ggml_type_name(GgmlType t);
// The name of a type number ggml has (or had) that the table lacks (IQ2_XXS, Q8_K, I32, ...), for
// error messages; nullptr for a number ggml never used.
const char* ggml_other_type_name(uint32_t t);
// "F32 (0), F16 (1), ...": the types the reader knows, for error messages.
std::string ggml_known_types();
// Bytes of `n` elements of type t (n a multiple of its block; checked).
size_t ggml_row_bytes(GgmlType t, int64_t n);

// Whether dequantize_row handles type t (all of the table's types do).
bool ggml_can_dequantize(GgmlType t);
// Converts `n` elements stored as type t at `src` (any alignment) to float32, bit-identical to
// ggml's dequantize_row_* (and gguf-py's dequantize). n must be a multiple of t's block size.
// dst: n floats.
void dequantize_row(GgmlType t, const void* src, float* dst, int64_t n);

// Whether quantize_row writes type t: F32, F16, BF16, Q4_0, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K
// and MXFP4.
bool ggml_can_quantize(GgmlType t);
// Converts `n` float32 values at `src` to type t at `dst` (ggml_row_bytes(t, n) bytes, any
// alignment), bit-identical to ggml's reference quantizers (quantize_row_*_ref, what
// llama-quantize runs without an importance matrix; src/io/gguf_quantize.cpp). n must be a
// multiple of t's block size; the values should be finite (ggml's results for NaN and infinity
// are not promised).
void quantize_row(GgmlType t, const float* src, void* dst, int64_t n);

// One block of a quantized type as float32, the values dequantize_row gives: `block` elements at
// `out` from the block's bytes at `b`. nullptr for F32, F16 and BF16.
using BlockDecoder = void (*)(const uint8_t* b, float* out);
BlockDecoder ggml_block_decoder(GgmlType t);

// The tensor dtype of a ggml type (every type of the table has one), and back (F32, F16, BF16 and
// the quantized dtypes; others throw).
DType dtype_of_ggml(GgmlType t);
GgmlType ggml_type_of(DType d);

// GGUF metadata value types (numbers as GGUF stores them).
enum class GgufValueType : uint32_t {
  U8 = 0,
  I8 = 1,
  U16 = 2,
  I16 = 3,
  U32 = 4,
  I32 = 5,
  F32 = 6,
  BOOL = 7,
  STRING = 8,
  ARRAY = 9,
  U64 = 10,
  I64 = 11,
  F64 = 12,
};
const char* gguf_value_type_name(GgufValueType t);

// One metadata value: unsigned integers are held as uint64_t, signed ones as int64_t, floats as
// double (exact for float32), then bool, string, and arrays (of one element type, `elem`).
struct GgufValue {
  GgufValueType type = GgufValueType::U32;
  GgufValueType elem = GgufValueType::U8;  // arrays only
  std::variant<uint64_t, int64_t, double, bool, std::string, std::vector<GgufValue>> v;

  static GgufValue u32(uint32_t x) { return {GgufValueType::U32, GgufValueType::U8, uint64_t{x}}; }
  static GgufValue u64(uint64_t x) { return {GgufValueType::U64, GgufValueType::U8, x}; }
  static GgufValue i32(int32_t x) { return {GgufValueType::I32, GgufValueType::U8, int64_t{x}}; }
  static GgufValue f32(float x) { return {GgufValueType::F32, GgufValueType::U8, double{x}}; }
  static GgufValue boolean(bool x) { return {GgufValueType::BOOL, GgufValueType::U8, x}; }
  static GgufValue str(std::string x) {
    return {GgufValueType::STRING, GgufValueType::U8, std::move(x)};
  }
  static GgufValue array(GgufValueType elem, std::vector<GgufValue> items) {
    return {GgufValueType::ARRAY, elem, std::move(items)};
  }
  static GgufValue strings(const std::vector<std::string>& xs);
  const std::vector<GgufValue>& items() const { return std::get<std::vector<GgufValue>>(v); }
};

// One tensor: ne in GGUF (ggml) order, ne[0] the row length (the innermost, contiguous dimension);
// ne[i] = 1 for i >= n_dims. Its bytes are `bytes` at `data`, inside the file's mapping.
struct GgufTensor {
  std::string name;
  GgmlType type = GgmlType::F32;
  int n_dims = 0;
  std::array<int64_t, 4> ne{1, 1, 1, 1};
  uint64_t offset = 0;  // from the start of the data section
  uint64_t bytes = 0;
  const char* data = nullptr;
  int64_t numel() const { return ne[0] * ne[1] * ne[2] * ne[3]; }
  int64_t rows() const { return ne[1] * ne[2] * ne[3]; }
  size_t row_bytes() const { return ggml_row_bytes(type, ne[0]); }
  // Rows [first, first + n) as float32 (n * ne[0] floats at `out`).
  void dequantize_rows(int64_t first, int64_t n, float* out) const;
};

struct GgufFile {
  std::string path;
  uint32_t version = 0;
  uint32_t alignment = 32;  // general.alignment, or GGUF's default
  std::map<std::string, GgufValue> metadata;
  std::vector<std::string> key_order;  // the keys in file order
  std::vector<GgufTensor> tensors;     // in file order
  const char* data_begin = nullptr;    // the data section in the mapping
  uint64_t data_size = 0;

  bool has(const std::string& key) const { return metadata.count(key) > 0; }
  // Each throws moe::Error naming the file and the key when it is missing or of another type.
  // The integer getters take any integer type whose value fits; get_f32/get_f64 take F32 or F64.
  const GgufValue& get(const std::string& key) const;
  uint32_t get_u32(const std::string& key) const;
  uint64_t get_u64(const std::string& key) const;
  int64_t get_i64(const std::string& key) const;
  float get_f32(const std::string& key) const;
  double get_f64(const std::string& key) const;
  bool get_bool(const std::string& key) const;
  const std::string& get_string(const std::string& key) const;
  std::vector<std::string> get_array_strings(const std::string& key) const;
  std::vector<int64_t> get_array_ints(const std::string& key) const;
  std::vector<float> get_array_f32(const std::string& key) const;
  size_t get_array_size(const std::string& key) const;

  bool has_tensor(const std::string& name) const { return index_.count(name) > 0; }
  const GgufTensor& tensor(const std::string& name) const;  // throws when absent
  // Tensor `name` as a view of the mapping that keeps it alive, in PyTorch's dimension order
  // (ne reversed: [ne[n_dims - 1], ..., ne[0]]) and the dtype of its ggml type.
  Tensor view(const std::string& name) const;

 private:
  friend GgufFile parse_gguf(const char*, uint64_t, std::shared_ptr<void>, const std::string&);
  std::map<std::string, size_t> index_;
  std::shared_ptr<void> owner_;  // keeps the bytes alive
};

// Whether `path` is a regular file that begins with GGUF's magic.
bool is_gguf_file(const std::string& path);

// Reads and validates a GGUF file, memory-mapped read-only: magic "GGUF"; version 2 or 3
// (big-endian files and version 1 refused by name); tensor and key-value counts, string and
// array lengths bounded by the bytes left; value types known, arrays nested at most 4 deep;
// bools 0 or 1; no duplicate keys or tensor names; general.alignment a UINT32 power of two;
// tensors of 1 to 4 dimensions, each > 0, of known ggml types, ne[0] a multiple of the block
// size, sizes without overflow; offsets aligned, every tensor inside the data section, none
// overlapping. Every violation throws moe::Error naming the file and the problem.
GgufFile load_gguf(const std::string& path);
// The same on bytes in memory (`size` bytes at `data`, kept alive by `owner`); `path` names them
// in errors.
GgufFile parse_gguf(const char* data, uint64_t size, std::shared_ptr<void> owner,
                    const std::string& path);

// A tensor to write: ne in GGUF order (1 to 4 dimensions), its bytes at `data`
// (ggml_row_bytes(type, ne[0]) * rows).
struct GgufWriteTensor {
  std::string name;
  GgmlType type = GgmlType::F32;
  std::vector<int64_t> ne;
  const void* data = nullptr;
};
// A GGUF version 3 file's bytes: the metadata in the order given, the tensors in the order given,
// each at the next offset aligned to general.alignment (32 when the metadata has none), with no
// padding after the last (as llama.cpp writes them). The result reads back with parse_gguf (the
// same checks are made here).
std::string gguf_bytes(const std::vector<std::pair<std::string, GgufValue>>& metadata,
                       const std::vector<GgufWriteTensor>& tensors);
// The bytes of such a file before its data section (header, metadata, tensor descriptions,
// padding; `data` is not read), and each tensor's offset from the start of the data section, for
// a writer that produces the tensors' bytes one after the other.
std::string gguf_header(const std::vector<std::pair<std::string, GgufValue>>& metadata,
                        const std::vector<GgufWriteTensor>& tensors,
                        std::vector<uint64_t>& offsets);
// gguf_bytes written to `path` atomically.
void write_gguf(const std::string& path,
                const std::vector<std::pair<std::string, GgufValue>>& metadata,
                const std::vector<GgufWriteTensor>& tensors);

}  // namespace moe
