// moe/tensor.h: a dense, row-major tensor of float32, float64, int32 or int64, or of weights as
// a checkpoint stores them (bf16, f16, int8 beside its row scales, or ggml's block-quantized
// types as GGUF files store them): those are read by the weight kernels (moe/weights.h), never
// accessed element by element as another type.
//
// A Tensor either owns its buffer (Tensor::empty / zeros, 64-byte aligned) or views memory that
// somebody else owns (Tensor::view, used for arena-backed activations). Copies share the buffer;
// clone() copies the data. Typed access checks the dtype: data<float>() on a float64 tensor throws.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <nlohmann/json_fwd.hpp>
#include <string>
#include <vector>

#include "moe/error.h"

namespace moe {

// The quantized types are ggml's (moe/gguf.h has their layouts): along the last dimension, every
// dtype_block(t) elements are one block of dtype_block_bytes(t) bytes.
enum class DType {
  F32,
  F64,
  I32,
  I64,
  BF16,
  F16,
  I8,
  Q4_0,
  Q4_1,
  Q5_0,
  Q5_1,
  Q8_0,
  Q2_K,
  Q3_K,
  Q4_K,
  Q5_K,
  Q6_K,
  MXFP4,
};

// A tensor's dimensions, stored inline (up to kMaxDims), so that making a tensor or a view never
// touches the heap: the training step allocates nothing in its steady state.
class Shape {
 public:
  static constexpr size_t kMaxDims = 8;
  Shape() = default;
  Shape(std::initializer_list<int64_t> dims) : Shape(dims.begin(), dims.end()) {}
  template <class It>
  Shape(It first, It last) {
    for (; first != last; ++first) push_back(static_cast<int64_t>(*first));
  }
  explicit Shape(const std::vector<int64_t>& dims) : Shape(dims.begin(), dims.end()) {}

  size_t size() const { return n_; }
  bool empty() const { return n_ == 0; }
  int64_t operator[](size_t i) const { return d_[i]; }
  int64_t& operator[](size_t i) { return d_[i]; }
  const int64_t* begin() const { return d_.data(); }
  const int64_t* end() const { return d_.data() + n_; }
  int64_t back() const { return d_[n_ - 1]; }
  void push_back(int64_t d) {
    MOE_CHECK(n_ < kMaxDims, "tensor", "a shape has at most {} dimensions", kMaxDims);
    d_[n_++] = d;
  }
  std::vector<int64_t> vec() const { return {begin(), end()}; }
  friend bool operator==(const Shape& a, const Shape& b) {
    return std::equal(a.begin(), a.end(), b.begin(), b.end());
  }
  friend bool operator<(const Shape& a, const Shape& b) {
    return std::lexicographical_compare(a.begin(), a.end(), b.begin(), b.end());
  }

 private:
  std::array<int64_t, kMaxDims> d_{};
  size_t n_ = 0;
};

void to_json(nlohmann::json& j, const Shape& s);
void from_json(const nlohmann::json& j, Shape& s);

// Bytes per element; throws for the block-quantized types, which have none (dtype_bytes).
size_t dtype_size(DType dtype);
const char* dtype_name(DType dtype);
bool dtype_quantized(DType dtype);
// Elements per block (1 for the element types) and bytes per block.
int64_t dtype_block(DType dtype);
size_t dtype_block_bytes(DType dtype);
// Bytes of n elements (n a multiple of the block; checked).
size_t dtype_bytes(DType dtype, int64_t n);
std::string shape_str(const Shape& shape);
int64_t shape_numel(const Shape& shape);

template <class T>
constexpr DType dtype_of();
template <>
constexpr DType dtype_of<float>() {
  return DType::F32;
}
template <>
constexpr DType dtype_of<double>() {
  return DType::F64;
}
template <>
constexpr DType dtype_of<int32_t>() {
  return DType::I32;
}
template <>
constexpr DType dtype_of<int64_t>() {
  return DType::I64;
}

class Tensor {
 public:
  Tensor() = default;

  // An owning tensor; its contents are unspecified (NaN-filled in debug builds).
  static Tensor empty(const Shape& shape, DType dtype);
  static Tensor zeros(const Shape& shape, DType dtype);
  // A non-owning view of `data`, which must outlive every use of the view.
  static Tensor view(void* data, const Shape& shape, DType dtype);
  // A view of `data` that keeps `owner` (the memory holding it, e.g. a file mapping) alive.
  static Tensor view(void* data, const Shape& shape, DType dtype, std::shared_ptr<void> owner);

  bool defined() const { return data_ != nullptr || numel() == 0; }
  DType dtype() const { return dtype_; }
  const Shape& shape() const { return shape_; }
  int64_t ndim() const { return static_cast<int64_t>(shape_.size()); }
  int64_t size(int64_t dim) const;
  int64_t numel() const { return shape_numel(shape_); }
  size_t nbytes() const { return dtype_bytes(dtype_, numel()); }
  std::string str() const;  // "f32[2, 3]"

  template <class T>
  T* data() {
    check_dtype(dtype_of<T>());
    return static_cast<T*>(data_);
  }
  template <class T>
  const T* data() const {
    check_dtype(dtype_of<T>());
    return static_cast<const T*>(data_);
  }
  void* raw() { return data_; }
  const void* raw() const { return data_; }

  Tensor clone() const;
  // The same memory (shared, not copied) under another shape of as many elements.
  Tensor reshaped(const Shape& shape) const;
  // A view of `shape` starting `offset` elements in, inside this tensor's memory, which it keeps
  // alive (for a block-quantized tensor, offset and shape cover whole blocks).
  Tensor view_at(int64_t offset, const Shape& shape) const;
  // Converting copy between the float types (f32, f64; and from bf16, f16 and the quantized
  // types, exactly as ggml dequantizes; from f32 to bf16 or f16, rounding to nearest even).
  Tensor to(DType dtype) const;
  void fill(double value);  // f32, f64, i32, i64
  // Element i as double, for tests and diagnostics (float types only).
  double at(int64_t i) const;

  // Throws unless the shape and dtype are exactly these; `what` names the tensor in the message.
  void expect(const char* where, const char* what, const Shape& shape, DType dtype) const;

 private:
  void check_dtype(DType want) const;

  std::shared_ptr<void> owner_;
  void* data_ = nullptr;
  Shape shape_;
  DType dtype_ = DType::F32;
};

}  // namespace moe
