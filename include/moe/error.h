// moe/error.h: the error type and the check macros used for everything a user can get wrong.
//
// A failed check throws moe::Error with a message of the form "[where] what was wrong: values",
// so that the CLI can print it and exit with status 2. Internal invariants use MOE_ASSERT, which
// is compiled in for debug and sanitizer builds only.
#pragma once

#include <fmt/format.h>

#include <stdexcept>
#include <string>

namespace moe {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

// Throws Error("[where] message").
[[noreturn]] void throw_error(const char* where, const std::string& message);

}  // namespace moe

// MOE_CHECK(cond, "where", "format {}", args...): throws moe::Error when cond is false.
#define MOE_CHECK(cond, where, ...)                                   \
  do {                                                                \
    if (!(cond)) ::moe::throw_error(where, fmt::format(__VA_ARGS__)); \
  } while (0)

#ifdef MOE_DEBUG
#define MOE_ASSERT(cond)                                                                           \
  do {                                                                                             \
    if (!(cond))                                                                                   \
      ::moe::throw_error("internal",                                                               \
                         fmt::format("assertion failed: {} at {}:{}", #cond, __FILE__, __LINE__)); \
  } while (0)
#else
#define MOE_ASSERT(cond) \
  do {                   \
  } while (0)
#endif
