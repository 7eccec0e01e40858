// Command-line options that describe one MoE layer, shared by `moe demo` and `moe bench layer`.
#pragma once

#include <CLI/CLI.hpp>
#include <string>

#include "moe/moe_config.h"

namespace moe::cli {

struct LayerOptions {
  MoeConfig cfg;
  int64_t tokens = 0;
  std::string act = "swiglu";
  std::string drop = "position";
  std::string router = "topk";
  int64_t segment = 1;  // fine-grained segmentation factor m
  int threads = 0;
  uint64_t seed = 0;

  // Registers the flags on `cmd` with these defaults.
  void add_to(CLI::App* cmd);
  // Applies the string options and segmentation, validates, returns the final config.
  MoeConfig finish();
};

}  // namespace moe::cli
