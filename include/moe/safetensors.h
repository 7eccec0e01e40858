// moe/safetensors.h: the safetensors format (an 8-byte little-endian header length, a JSON
// header naming each tensor's dtype, shape and byte range, then the bytes), read with every
// field validated before it is trusted, and written atomically.
#pragma once

#include <map>
#include <string>
#include <utility>
#include <vector>

#include "moe/tensor.h"

namespace moe {

// Writes `contents` to `path` through a temporary file in the same folder, fsync and rename,
// so that a crash leaves either the old file or the new one, whole.
void write_file_atomic(const std::string& path, const std::string& contents);

// Tensors in the given order (f32, f64, i32, i64), with optional string metadata.
void save_safetensors(const std::string& path,
                      const std::vector<std::pair<std::string, Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata = {});

struct SafetensorsFile {
  // F32, BF16 and F16 as f32; F64; I32; I64. Tensors stored in the file's own dtype (F32, F64,
  // I32, I64) are zero-copy views of the memory-mapped file (copy-on-write), which they keep
  // mapped; BF16 and F16 are converted into new memory.
  std::map<std::string, Tensor> tensors;
  std::map<std::string, std::string> metadata;
  const Tensor& at(const std::string& name) const;
  // For loaders, once a tensor's values are copied out: drops its pages from this process when it
  // is a view of the mapping (they stay in the page cache, and read back the same if touched
  // again: the mapping is private and never written), so that loading a model does not hold
  // the file and the copy in memory at once. Nothing for converted tensors.
  void drop(const Tensor& t) const;
  const char* data_begin = nullptr;  // the tensor bytes in the mapping (after the header)
  const char* data_end = nullptr;
};

// Reads and validates a file: header length bounded (100 MB) and inside the file; the header a
// JSON object of known dtypes with non-negative shapes whose byte size matches its range; the
// ranges sorted, contiguous, without gaps or overlap, covering the data; no duplicate names.
// Every violation throws moe::Error naming the file and the problem.
SafetensorsFile load_safetensors(const std::string& path);

// Drops the pages under [p, p + bytes) of a private, never written file mapping from this
// process (madvise): they stay in the page cache and read back the same if touched again.
void drop_mapped_pages(const void* p, size_t bytes);

}  // namespace moe
