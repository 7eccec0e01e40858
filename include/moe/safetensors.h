// moe/safetensors.h: the safetensors format (an 8-byte little-endian header length, a JSON
// header naming each tensor's dtype, shape and byte range, then the bytes), read with every
// field validated before it is trusted, and written atomically.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "moe/tensor.h"
#include "moe/weights.h"

namespace moe {

// Writes `contents` to `path` through a temporary file in the same folder, fsync and rename,
// so that a crash leaves either the old file or the new one, whole.
void write_file_atomic(const std::string& path, const std::string& contents);

// A file written piece by piece with write_file_atomic's guarantee: nothing appears at `path`
// until commit(); destroyed without commit(), the temporary file is removed.
class AtomicFile {
 public:
  explicit AtomicFile(const std::string& path);
  ~AtomicFile();
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;
  void write(const void* data, size_t bytes);
  void commit();

 private:
  std::string path_, tmp_;
  int fd_ = -1;
};

// A safetensors file written tensor by tensor, atomically: the header (every name, dtype and
// shape, in file order) first, then the tensors' bytes, in that order, in pieces of any size;
// commit() once all are written (it checks that they were, and no more).
class SafetensorsWriter {
 public:
  struct Entry {
    std::string name, dtype;  // dtype as safetensors names it
    Shape shape;
  };
  SafetensorsWriter(const std::string& path, std::vector<Entry> entries,
                    const std::map<std::string, std::string>& metadata = {});
  void write(const void* data, size_t bytes);  // the next bytes
  void commit();

 private:
  size_t bytes_of(size_t i) const;
  AtomicFile file_;
  std::vector<Entry> entries_;
  size_t next_ = 0;  // the tensor being written
  size_t left_ = 0;  // its bytes still to come (0: not started)
};

// The safetensors name of a dtype (throws for one it has none).
const char* st_dtype(DType d);
// Bytes per value of a safetensors dtype (0 for one not supported).
size_t st_dtype_size(const std::string& dtype);

// A file's size and CRC-32 (zlib's), to tell later that its bytes are still the ones written.
struct FileCheck {
  uint64_t bytes = 0;
  uint32_t crc32 = 0;
};
FileCheck check_file(const std::string& path);

// Tensors in the given order (f32, f64, i32, i64), with optional string metadata; streamed to
// the file (never held twice in memory).
void save_safetensors(const std::string& path,
                      const std::vector<std::pair<std::string, Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata = {});

// One tensor as a file stores it: the dtype as safetensors names it (F32, F64, BF16, F16, I8,
// I32, I64), its shape, and its bytes in the file's mapping. An I8 tensor is quantized: its
// values are the integers times `scale`, a float32 tensor named "<name>_scale" holding one
// scale per row of the last dimension (its shape is this one's without the last dimension).
struct StoredTensor {
  std::string dtype;
  Shape shape;
  const char* data = nullptr;
  uint64_t bytes = 0;
  const StoredTensor* scale = nullptr;  // I8 only
  const float* scale_values = nullptr;  // I8 only: the scales, aligned
  int64_t row_len() const { return shape.empty() ? 1 : shape.back(); }
  int64_t rows() const { return row_len() == 0 ? 0 : shape_numel(shape) / row_len(); }
  size_t row_bytes() const;  // of the stored values
  bool as_f32() const;       // whether float32 is how it is read (every dtype but F64, I32, I64)
};

// Converts `rows` rows of `row_len` values stored as `dtype` (F32, BF16, F16, or I8 with one
// float32 scale per row in `scales`) to float32.
void rows_to_f32(const std::string& dtype, const void* src, const float* scales, int64_t rows,
                 int64_t row_len, float* out);

// Int8 with per-row scales: scale = max |x| / 127 over the row (1 for an all-zero row), and
// q = round(x / scale).
void quantize_rows_int8(const float* x, int64_t rows, int64_t row_len, int8_t* q, float* scales);

struct SafetensorsFile {
  SafetensorsFile() = default;
  SafetensorsFile(SafetensorsFile&&) = default;
  SafetensorsFile& operator=(SafetensorsFile&&) = default;
  SafetensorsFile(const SafetensorsFile&) = delete;  // `stored` points into itself
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  // Every tensor as the file stores it, by name.
  std::map<std::string, StoredTensor> stored;
  std::map<std::string, std::string> metadata;
  bool has(const std::string& name) const { return stored.count(name) > 0; }
  // A tensor as f32 (F32, BF16, F16, I8 with its scales), F64, I32 or I64. Tensors stored in
  // those dtypes are zero-copy views of the memory-mapped file (copy-on-write), which they keep
  // mapped; the others are converted into new memory on first use, kept until drop().
  const Tensor& at(const std::string& name) const;
  // The tensor as stored (F32, F64, BF16, F16 or I8, whose scales are "<name>_scale"), a view of
  // the mapping that keeps it alive.
  Tensor view(const std::string& name) const;
  // For loaders, once a tensor's values are copied out: frees its converted copy, or drops its
  // pages from this process when it is a view of the mapping (they stay in the page cache, and
  // read back the same if touched again: the mapping is private and never written), so that
  // loading a model does not hold the file and the copy in memory at once.
  void drop(const std::string& name) const;
  // With prefault on, view() maps the view's pages into this process at once
  // (prefault_mapped_pages), so that the products that first read them do not stop at a page
  // fault every 4 KiB. For weights computed from as stored, where the files fit in memory.
  void set_prefault(bool on) { prefault_ = on; }
  const char* data_begin = nullptr;  // the tensor bytes in the mapping (after the header)
  const char* data_end = nullptr;

 private:
  friend SafetensorsFile parse_safetensors(char*, uint64_t, std::shared_ptr<void>,
                                           const std::string&);
  friend SafetensorsFile load_safetensors(const std::string& path);
  std::shared_ptr<void> mapping_;
  bool mapped_ = false;  // a file mapping (drop may release its pages), not other memory
  bool prefault_ = false;
  mutable std::map<std::string, Tensor> tensors_;  // views, and conversions made by at()
};

// Reads and validates a file: header length bounded (100 MB) and inside the file; the header a
// JSON object of known dtypes with non-negative shapes whose byte size matches its range; the
// ranges sorted, contiguous, without gaps or overlap, covering the data; no duplicate names; an
// I8 tensor's scales present, float32, of the right shape and finite.
// Every violation throws moe::Error naming the file and the problem.
SafetensorsFile load_safetensors(const std::string& path);
// The same checks on a file's bytes already in memory (`data`, `size` bytes, writable: views
// alias it), which `owner` keeps alive; `path` names them in errors.
SafetensorsFile parse_safetensors(char* data, uint64_t size, std::shared_ptr<void> owner,
                                  const std::string& path);

// Drops the pages under [p, p + bytes) of a private, never written file mapping from this
// process (madvise): they stay in the page cache and read back the same if touched again.
void drop_mapped_pages(const void* p, size_t bytes);
// Maps the pages under [p, p + bytes) of a file mapping into this process now, read-only
// (madvise MADV_POPULATE_READ, Linux 5.14 and later, in parallel chunks), reading from the file
// what the page cache lacks. False where the kernel cannot: the pages then come on first touch.
bool prefault_mapped_pages(const void* p, size_t bytes);
// Whether `bytes` more would fit in the memory the system has available now (MemAvailable of
// /proc/meminfo; false where it cannot be read).
bool fits_in_available_memory(uint64_t bytes);

}  // namespace moe
