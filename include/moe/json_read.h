// moe/json_read.h: reading values out of JSON files strictly.
//
// nlohmann::json converts on request: get<int64_t>() of 4.2e102 is a float-to-integer cast out
// of range (undefined behaviour), get<int32_t>() of 2^40 wraps, and get<bool>() of a number
// throws a message that names neither the file nor the key. Everything this engine reads from a
// file goes through json_as / json_value instead: an integer must be a JSON integer within the
// range of its C++ type, a float any JSON number, a flag true or false, a string a string, and a
// list a JSON array of those. Anything else is a moe::Error naming the key and what it held.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "moe/error.h"

namespace moe {

namespace json_detail {

template <class T>
struct IsVector : std::false_type {};
template <class U>
struct IsVector<std::vector<U>> : std::true_type {};

// What a value held, for messages: its text when short, else its type.
inline std::string shown(const nlohmann::json& v) {
  std::string s = v.dump();
  return s.size() <= 40 ? s : fmt::format("a {} ({} characters)", v.type_name(), s.size());
}

}  // namespace json_detail

// v read as T; `name` is the key (or key[i]) the message names.
template <class T>
T json_as(const nlohmann::json& v, const char* where, std::string_view name) {
  if constexpr (std::is_same_v<T, bool>) {
    MOE_CHECK(v.is_boolean(), where, "'{}' must be true or false, not {}", name,
              json_detail::shown(v));
    return v.get<bool>();
  } else if constexpr (std::is_integral_v<T>) {
    MOE_CHECK(v.is_number_integer(), where, "'{}' must be an integer, not {}", name,
              json_detail::shown(v));
    const bool fits = v.is_number_unsigned() ? std::in_range<T>(v.get<uint64_t>())
                                             : std::in_range<T>(v.get<int64_t>());
    MOE_CHECK(fits, where, "'{}' = {} is out of range", name, v.dump());
    return v.is_number_unsigned() ? static_cast<T>(v.get<uint64_t>())
                                  : static_cast<T>(v.get<int64_t>());
  } else if constexpr (std::is_floating_point_v<T>) {
    MOE_CHECK(v.is_number(), where, "'{}' must be a number, not {}", name, json_detail::shown(v));
    return v.get<T>();
  } else if constexpr (std::is_same_v<T, std::string>) {
    MOE_CHECK(v.is_string(), where, "'{}' must be a string, not {}", name, json_detail::shown(v));
    return v.get<std::string>();
  } else {
    static_assert(json_detail::IsVector<T>::value, "json_as: unsupported type");
    MOE_CHECK(v.is_array(), where, "'{}' must be a list, not {}", name, json_detail::shown(v));
    T out;
    out.reserve(v.size());
    for (size_t i = 0; i < v.size(); ++i)
      out.push_back(json_as<typename T::value_type>(v[i], where, fmt::format("{}[{}]", name, i)));
    return out;
  }
}

// obj[key] read as T, or `fallback` when obj has no such key.
template <class T>
T json_value(const nlohmann::json& obj, const char* key, T fallback, const char* where) {
  const auto it = obj.find(key);
  return it == obj.end() ? std::move(fallback) : json_as<T>(*it, where, key);
}

// obj[key] read as T; the key must be there.
template <class T>
T json_at(const nlohmann::json& obj, const char* key, const char* where) {
  const auto it = obj.find(key);
  MOE_CHECK(it != obj.end(), where, "'{}' is missing", key);
  return json_as<T>(*it, where, key);
}

// Sets `into` from obj[key] when obj has it; leaves it alone otherwise.
template <class T>
void json_into(const nlohmann::json& obj, const char* key, T& into, const char* where) {
  const auto it = obj.find(key);
  if (it != obj.end()) into = json_as<T>(*it, where, key);
}

}  // namespace moe
