// Error construction: one place that formats "[where] what".
#include "moe/error.h"

namespace moe {

void throw_error(const char* where, const std::string& message) {
  throw Error(fmt::format("[{}] {}", where, message));
}

}  // namespace moe
