// Tensor storage, dtype bookkeeping and conversions.
#include "moe/tensor.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>

#include "moe/gguf.h"
#include "moe/weights.h"

namespace moe {

size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::F32: return 4;
    case DType::F64: return 8;
    case DType::I32: return 4;
    case DType::I64: return 8;
    case DType::BF16:
    case DType::F16: return 2;
    case DType::I8: return 1;
    default: break;
  }
  throw_error("tensor",
              fmt::format("{} is block-quantized: it has no size per element (its "
                          "block of {} elements takes {} bytes)",
                          dtype_name(dtype), dtype_block(dtype), dtype_block_bytes(dtype)));
}

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::F32: return "f32";
    case DType::F64: return "f64";
    case DType::I32: return "i32";
    case DType::I64: return "i64";
    case DType::BF16: return "bf16";
    case DType::F16: return "f16";
    case DType::I8: return "i8";
    default: return ggml_type_name(ggml_type_of(dtype));
  }
}

bool dtype_quantized(DType dtype) { return dtype >= DType::Q4_0; }

int64_t dtype_block(DType dtype) {
  return dtype_quantized(dtype) ? ggml_type_info(ggml_type_of(dtype)).block : 1;
}

size_t dtype_block_bytes(DType dtype) {
  return dtype_quantized(dtype) ? ggml_type_info(ggml_type_of(dtype)).block_size
                                : dtype_size(dtype);
}

size_t dtype_bytes(DType dtype, int64_t n) {
  if (!dtype_quantized(dtype)) return static_cast<size_t>(n) * dtype_size(dtype);
  return ggml_row_bytes(ggml_type_of(dtype), n);
}

void to_json(nlohmann::json& j, const Shape& s) { j = s.vec(); }
void from_json(const nlohmann::json& j, Shape& s) { s = Shape(j.get<std::vector<int64_t>>()); }

std::string shape_str(const Shape& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

int64_t shape_numel(const Shape& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

namespace {

void check_shape(const Shape& shape, DType dtype) {
  int64_t n = 1;
  for (int64_t d : shape) {
    MOE_CHECK(d >= 0, "tensor", "negative dimension in shape {}", shape_str(shape));
    MOE_CHECK(d == 0 || n <= std::numeric_limits<int64_t>::max() / 16 / d, "tensor",
              "shape {} is too large", shape_str(shape));
    n *= d;
  }
  const int64_t block = dtype_block(dtype);
  MOE_CHECK(block == 1 || (!shape.empty() && shape.back() % block == 0), "tensor",
            "a {} tensor's rows are whole blocks of {} elements: shape {}", dtype_name(dtype),
            block, shape_str(shape));
}

template <class T>
void fill_typed(void* p, int64_t n, double v) {
  T* t = static_cast<T*>(p);
  for (int64_t i = 0; i < n; ++i) t[i] = static_cast<T>(v);
}

}  // namespace

Tensor Tensor::empty(const Shape& shape, DType dtype) {
  check_shape(shape, dtype);
  Tensor t;
  t.shape_ = shape;
  t.dtype_ = dtype;
  size_t bytes = (t.nbytes() + 63) / 64 * 64;
  if (bytes == 0) bytes = 64;
  void* p = std::aligned_alloc(64, bytes);
  MOE_CHECK(p != nullptr, "tensor", "out of memory allocating {} bytes for {}", bytes, t.str());
  t.owner_ = std::shared_ptr<void>(p, [](void* q) { std::free(q); });
  t.data_ = p;
#ifdef MOE_DEBUG
  if (dtype == DType::F32 || dtype == DType::F64) t.fill(std::numeric_limits<double>::quiet_NaN());
#endif
  return t;
}

Tensor Tensor::zeros(const Shape& shape, DType dtype) {
  check_shape(shape, dtype);
  Tensor t;
  t.shape_ = shape;
  t.dtype_ = dtype;
  const size_t bytes = std::max<size_t>(64, (t.nbytes() + 63) / 64 * 64);
  // calloc: a large block comes from the kernel as zero pages, which become resident only when
  // written (an inference model's gradients never are).
  void* raw = std::calloc(bytes + 64, 1);
  MOE_CHECK(raw != nullptr, "tensor", "out of memory allocating {} bytes for {}", bytes, t.str());
  t.owner_ = std::shared_ptr<void>(raw, [](void* q) { std::free(q); });
  t.data_ = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(raw) + 63) / 64 * 64);
  return t;
}

Tensor Tensor::view(void* data, const Shape& shape, DType dtype) {
  check_shape(shape, dtype);
  Tensor t;
  t.shape_ = shape;
  t.dtype_ = dtype;
  t.data_ = data;
  return t;
}

Tensor Tensor::view(void* data, const Shape& shape, DType dtype, std::shared_ptr<void> owner) {
  Tensor t = view(data, shape, dtype);
  t.owner_ = std::move(owner);
  return t;
}

int64_t Tensor::size(int64_t dim) const {
  MOE_CHECK(dim >= 0 && dim < ndim(), "tensor", "dimension {} out of range for {}", dim, str());
  return shape_[static_cast<size_t>(dim)];
}

std::string Tensor::str() const { return std::string(dtype_name(dtype_)) + shape_str(shape_); }

Tensor Tensor::clone() const {
  Tensor t = empty(shape_, dtype_);
  if (nbytes() > 0) std::memcpy(t.data_, data_, nbytes());
  return t;
}

Tensor Tensor::reshaped(const Shape& shape) const {
  check_shape(shape, dtype_);
  MOE_CHECK(shape_numel(shape) == numel(), "tensor", "cannot view {} as {}", str(),
            shape_str(shape));
  Tensor t = *this;
  t.shape_ = shape;
  return t;
}

Tensor Tensor::view_at(int64_t offset, const Shape& shape) const {
  check_shape(shape, dtype_);
  MOE_CHECK(offset >= 0 && offset + shape_numel(shape) <= numel(), "tensor",
            "a view of {} at element {} does not fit in {}", shape_str(shape), offset, str());
  Tensor t = *this;
  t.shape_ = shape;
  MOE_CHECK(offset % dtype_block(dtype_) == 0, "tensor",
            "a view of {} at element {}: not at a block of {} elements", str(), offset,
            dtype_block(dtype_));
  t.data_ = static_cast<char*>(data_) + dtype_bytes(dtype_, offset);
  return t;
}

Tensor Tensor::to(DType dtype) const {
  if (dtype == dtype_) return clone();
  if (dtype_quantized(dtype_) && (dtype == DType::F32 || dtype == DType::F64)) {
    Tensor t = empty(shape_, DType::F32);  // row by row, as ggml dequantizes
    const int64_t cols = shape_.back(), rows = cols > 0 ? numel() / cols : 0;
    const size_t row_bytes = dtype_bytes(dtype_, cols);
    for (int64_t r = 0; r < rows; ++r)
      dequantize_row(ggml_type_of(dtype_), static_cast<const char*>(data_) + r * row_bytes,
                     t.data<float>() + r * cols, cols);
    return dtype == DType::F32 ? t : t.to(dtype);
  }
  const bool from16 = dtype_ == DType::BF16 || dtype_ == DType::F16;
  const bool from_float = dtype_ == DType::F32 || dtype_ == DType::F64 || from16;
  MOE_CHECK(from_float && (dtype == DType::F32 || dtype == DType::F64 ||
                           ((dtype == DType::BF16 || dtype == DType::F16) && dtype_ == DType::F32)),
            "tensor", "conversion from {} to {} is not supported", dtype_name(dtype_),
            dtype_name(dtype));
  Tensor t = empty(shape_, dtype);
  const int64_t n = numel();
  if (from16) {  // through the weight kernels' exact widening
    const int64_t cols = ndim() > 0 ? shape_.back() : 1, rows = cols > 0 ? n / cols : 0;
    const WeightMatrix w{dtype_ == DType::BF16 ? WType::bf16 : WType::f16, data_, rows, cols,
                         nullptr};
    if (dtype == DType::F32) {
      cpu::weight_rows_f32(w, 0, rows, t.data<float>());
    } else {
      const Tensor f = to(DType::F32);
      return f.to(DType::F64);
    }
    return t;
  }
  if (dtype == DType::BF16 || dtype == DType::F16) {
    const float* s = static_cast<const float*>(data_);
    auto* d = static_cast<uint16_t*>(t.raw());
    for (int64_t i = 0; i < n; ++i)
      d[i] = dtype == DType::BF16 ? f32_to_bf16(s[i]) : f32_to_f16(s[i]);
    return t;
  }
  if (dtype == DType::F64) {
    const float* s = static_cast<const float*>(data_);
    double* d = t.data<double>();
    for (int64_t i = 0; i < n; ++i) d[i] = s[i];
  } else {
    const double* s = static_cast<const double*>(data_);
    float* d = t.data<float>();
    for (int64_t i = 0; i < n; ++i) d[i] = static_cast<float>(s[i]);
  }
  return t;
}

void Tensor::fill(double value) {
  switch (dtype_) {
    case DType::F32: fill_typed<float>(data_, numel(), value); break;
    case DType::F64: fill_typed<double>(data_, numel(), value); break;
    case DType::I32: fill_typed<int32_t>(data_, numel(), value); break;
    case DType::I64: fill_typed<int64_t>(data_, numel(), value); break;
    case DType::BF16:
    case DType::F16:
    default:
      throw_error("tensor", fmt::format("fill is not defined for {} tensors", dtype_name(dtype_)));
  }
}

double Tensor::at(int64_t i) const {
  MOE_CHECK(i >= 0 && i < numel(), "tensor", "index {} out of range for {}", i, str());
  switch (dtype_) {
    case DType::F32: return static_cast<const float*>(data_)[i];
    case DType::F64: return static_cast<const double*>(data_)[i];
    case DType::I32: return static_cast<const int32_t*>(data_)[i];
    case DType::I64: return static_cast<double>(static_cast<const int64_t*>(data_)[i]);
    case DType::BF16:
    case DType::F16: {
      uint16_t h;  // a view of a mapped file may not be 2-byte aligned
      std::memcpy(&h, static_cast<const char*>(data_) + 2 * i, 2);
      return dtype_ == DType::BF16 ? bf16_to_f32(h) : f16_to_f32(h);
    }
    case DType::I8: return static_cast<const int8_t*>(data_)[i];
    default: break;
  }
  // A block-quantized tensor: the block holding element i, dequantized.
  const int64_t block = dtype_block(dtype_);
  float values[256];
  MOE_CHECK(block <= 256, "tensor", "{}: blocks of {} elements", str(), block);
  dequantize_row(ggml_type_of(dtype_),
                 static_cast<const char*>(data_) + dtype_bytes(dtype_, i / block * block), values,
                 block);
  return values[i % block];
}

void Tensor::expect(const char* where, const char* what, const Shape& shape, DType dtype) const {
  MOE_CHECK(shape_ == shape && dtype_ == dtype, where, "{} must be {}{}, got {}", what,
            dtype_name(dtype), shape_str(shape), str());
  MOE_CHECK(data_ != nullptr || numel() == 0, where, "{} is not allocated", what);
}

void Tensor::check_dtype(DType want) const {
  MOE_CHECK(want == dtype_, "tensor", "accessed {} tensor {} as {}", dtype_name(dtype_), str(),
            dtype_name(want));
}

}  // namespace moe
