// Quantized experts: `moe quantize` (see moe/quantize.h).
#include "moe/quantize.h"

#include <fmt/core.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <vector>

#include "moe/error.h"
#include "moe/safetensors.h"
#include "moe/trainer.h"

namespace moe {

namespace fs = std::filesystem;

namespace {

constexpr const char* kWhere = "quantize";

bool ends_with(const std::string& s, const std::string& tail) {
  return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}

// How the expert matrices of one file are written: values (bf16, or int8 then their scales), row
// block by row block, so that memory stays bounded by a block whatever the matrix size.
struct Converter {
  ExpertFormat format;
  QuantizeReport& report;
  double err2 = 0, norm2 = 0;  // over every matrix

  void write(const std::string& name, const StoredTensor& t, SafetensorsWriter& w) {
    const int64_t R = t.rows(), C = t.row_len();
    const int64_t block = std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(C, 1));
    std::vector<float> x, back;
    std::vector<uint16_t> half;
    std::vector<int8_t> q;
    std::vector<float> scales(static_cast<size_t>(format == ExpertFormat::int8 ? R : 0));
    double e2 = 0, n2 = 0;
    for (int64_t r0 = 0; r0 < R; r0 += block) {
      const int64_t n = std::min(block, R - r0), count = n * C;
      x.resize(static_cast<size_t>(count));
      back.resize(static_cast<size_t>(count));
      rows_to_f32(t.dtype, t.data + static_cast<size_t>(r0) * t.row_bytes(), nullptr, n, C,
                  x.data());
      if (format == ExpertFormat::bf16) {
        half.resize(static_cast<size_t>(count));
        for (int64_t i = 0; i < count; ++i) {
          MOE_CHECK(std::isfinite(x[static_cast<size_t>(i)]), kWhere,
                    "{} holds a value that is not finite in row {}", name, r0 + i / C);
          half[static_cast<size_t>(i)] = f32_to_bf16(x[static_cast<size_t>(i)]);
        }
        rows_to_f32("BF16", half.data(), nullptr, n, C, back.data());
        w.write(half.data(), half.size() * sizeof(uint16_t));
      } else {
        q.resize(static_cast<size_t>(count));
        for (int64_t i = 0; i < count; ++i)
          MOE_CHECK(std::isfinite(x[static_cast<size_t>(i)]), kWhere,
                    "{} holds a value that is not finite in row {}", name, r0 + i / C);
        quantize_rows_int8(x.data(), n, C, q.data(), scales.data() + r0);
        rows_to_f32("I8", q.data(), scales.data() + r0, n, C, back.data());
        w.write(q.data(), q.size());
      }
      drop_mapped_pages(t.data + static_cast<size_t>(r0) * t.row_bytes(),
                        static_cast<size_t>(n) * t.row_bytes());
      for (int64_t i = 0; i < count; ++i) {
        const double a = x[static_cast<size_t>(i)], d = back[static_cast<size_t>(i)] - a;
        e2 += d * d;
        n2 += a * a;
      }
    }
    if (format == ExpertFormat::int8) w.write(scales.data(), scales.size() * sizeof(float));
    const double rel = n2 > 0 ? std::sqrt(e2 / n2) : 0.0;
    report.worst_rel_error = std::max(report.worst_rel_error, rel);
    err2 += e2;
    norm2 += n2;
    ++report.tensors;
    report.values += R * C;
    report.bytes_before += static_cast<int64_t>(t.bytes);
    report.bytes_after +=
        R * C * (format == ExpertFormat::bf16 ? 2 : 1) + (format == ExpertFormat::int8 ? R * 4 : 0);
  }
};

// Whether `t` (named `name`) is converted: a routed expert matrix stored in more bytes than the
// target. Refuses experts already quantized.
bool converts(const std::string& name, const StoredTensor& t, ExpertFormat format,
              const std::string& file) {
  if (!is_routed_expert_weight(name, static_cast<int64_t>(t.shape.size()))) return false;
  MOE_CHECK(t.dtype != "I8", kWhere, "{} in {} is already int8: the checkpoint is quantized", name,
            file);
  MOE_CHECK(t.dtype == "F32" || t.dtype == "BF16" || t.dtype == "F16", kWhere,
            "{} in {} is {}: expert matrices must be F32, BF16 or F16 to be quantized", name, file,
            t.dtype);
  return !(format == ExpertFormat::bf16 && t.dtype == "BF16");  // already there: copied
}

// Rewrites one weight file; returns the names it added (scales).
std::vector<std::string> quantize_file(const fs::path& in, const fs::path& out, ExpertFormat format,
                                       Converter& conv, int64_t& done, int64_t total,
                                       const std::function<void(int64_t, int64_t)>& progress) {
  const SafetensorsFile f = load_safetensors(in.string());
  std::vector<SafetensorsWriter::Entry> entries;
  std::vector<std::string> added;
  for (const auto& [name, t] : f.stored) {
    if (!converts(name, t, format, in.string())) {
      entries.push_back({name, t.dtype, t.shape});
      continue;
    }
    entries.push_back({name, format == ExpertFormat::bf16 ? "BF16" : "I8", t.shape});
    if (format == ExpertFormat::int8) {
      const std::string s = name + "_scale";
      MOE_CHECK(!f.has(s), kWhere, "{} already has a tensor named {}", in.string(), s);
      entries.push_back({s, "F32", Shape(t.shape.begin(), t.shape.end() - 1)});
      added.push_back(s);
    }
  }
  std::map<std::string, std::string> meta = f.metadata;
  meta["moe_cpp.experts"] = to_string(format);
  SafetensorsWriter w(out.string(), std::move(entries), meta);
  for (const auto& [name, t] : f.stored) {
    if (converts(name, t, format, in.string())) {
      conv.write(name, t, w);
      if (progress) progress(++done, total);
    } else {
      w.write(t.data, t.bytes);
      if (t.bytes > 0) drop_mapped_pages(t.data, t.bytes);
    }
  }
  w.commit();
  return added;
}

}  // namespace

ExpertFormat parse_expert_format(const std::string& s) {
  if (s == "bf16") return ExpertFormat::bf16;
  if (s == "int8") return ExpertFormat::int8;
  throw_error(kWhere, fmt::format("unknown expert format '{}' (bf16, int8)", s));
}

const char* to_string(ExpertFormat f) { return f == ExpertFormat::bf16 ? "bf16" : "int8"; }

bool is_routed_expert_weight(const std::string& name, int64_t ndim) {
  // Biases: transformers' "...bias" and this engine's stacked "experts.b_gate" [E, F] and the like.
  return ndim >= 2 && name.find(".experts.") != std::string::npos && !ends_with(name, "bias") &&
         name.find(".experts.b_") == std::string::npos && !ends_with(name, "_scale");
}

std::string QuantizeReport::str() const {
  return fmt::format(
      "{} expert matrices ({:.1f} M values): {:.1f} MB -> {:.1f} MB ({:.2f}x smaller); relative "
      "error of the weights {:.2e} overall, {:.2e} in the worst matrix",
      tensors, static_cast<double>(values) / 1e6, static_cast<double>(bytes_before) / 1e6,
      static_cast<double>(bytes_after) / 1e6,
      bytes_after > 0 ? static_cast<double>(bytes_before) / static_cast<double>(bytes_after) : 0.0,
      rel_error, worst_rel_error);
}

QuantizeReport quantize_checkpoint(const std::string& in_dir, const std::string& out_dir,
                                   ExpertFormat format,
                                   const std::function<void(int64_t, int64_t)>& progress) {
  const fs::path in = resolve_checkpoint(in_dir);
  const fs::path out(out_dir);
  MOE_CHECK(!out_dir.empty(), kWhere, "give an output folder");
  fs::create_directories(out);
  MOE_CHECK(!fs::equivalent(in, out), kWhere,
            "the output folder is the input checkpoint {}: write the quantized one elsewhere",
            in.string());
  const fs::path index = in / "model.safetensors.index.json";
  std::vector<std::string> shards;
  nlohmann::json index_json;
  if (fs::exists(in / "model.safetensors")) {
    shards.push_back("model.safetensors");
  } else {
    MOE_CHECK(fs::exists(index), kWhere, "{} has neither model.safetensors nor {}", in.string(),
              index.filename().string());
    std::ifstream f(index);
    try {
      index_json = nlohmann::json::parse(f);
    } catch (const nlohmann::json::exception& e) {
      throw_error(kWhere, fmt::format("{} is not valid JSON: {}", index.string(), e.what()));
    }
    MOE_CHECK(index_json.contains("weight_map") && index_json["weight_map"].is_object(), kWhere,
              "{} has no weight_map object", index.string());
    std::set<std::string> seen;
    for (const auto& [name, shard] : index_json["weight_map"].items()) {
      MOE_CHECK(shard.is_string(), kWhere, "{}: the shard of '{}' is not a string", index.string(),
                name);
      const std::string s = shard.get<std::string>();
      MOE_CHECK(fs::path(s).filename() == s, kWhere, "{}: shard '{}' is not a file in the folder",
                index.string(), s);
      if (seen.insert(s).second) shards.push_back(s);
    }
  }
  // Count the matrices first, for the progress.
  int64_t total = 0, done = 0;
  for (const std::string& s : shards)
    for (const auto& [name, t] : load_safetensors((in / s).string()).stored)
      total += converts(name, t, format, (in / s).string()) ? 1 : 0;
  MOE_CHECK(total > 0 || format == ExpertFormat::bf16, kWhere,
            "{} has no routed expert matrices (names under '.experts.') to quantize", in.string());

  QuantizeReport report;
  Converter conv{format, report};
  for (const std::string& s : shards) {
    const std::vector<std::string> added =
        quantize_file(in / s, out / s, format, conv, done, total, progress);
    if (!index_json.is_null())
      for (const std::string& name : added) index_json["weight_map"][name] = s;
  }
  report.rel_error = conv.norm2 > 0 ? std::sqrt(conv.err2 / conv.norm2) : 0.0;
  if (!index_json.is_null()) {
    if (index_json.contains("metadata") && index_json["metadata"].is_object()) {
      uint64_t size = 0;
      for (const std::string& s : shards) {
        const SafetensorsFile f = load_safetensors((out / s).string());
        for (const auto& [name, t] : f.stored) size += t.bytes;
      }
      index_json["metadata"]["total_size"] = size;
    }
    write_file_atomic((out / index.filename()).string(), index_json.dump(2) + "\n");
  }
  // The other files (config, generation config, tokenizer) as they are; not the training state,
  // nor other tensor files.
  const std::set<std::string> skip = {"trainer_state.json", "model.safetensors.index.json"};
  for (const auto& entry : fs::directory_iterator(in)) {
    const std::string name = entry.path().filename().string();
    if (!entry.is_regular_file() || skip.count(name) || ends_with(name, ".safetensors") ||
        name.rfind(".tmp.", 0) == 0)
      continue;
    std::ifstream f(entry.path(), std::ios::binary);
    const std::string bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    MOE_CHECK(f.good() || f.eof(), kWhere, "cannot read {}", entry.path().string());
    write_file_atomic((out / name).string(), bytes);
  }
  return report;
}

}  // namespace moe
