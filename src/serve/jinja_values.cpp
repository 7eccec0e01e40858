// Chat templates: values with Python's semantics (truth, equality, str(), repr(), and
// transformers' tojson). See moe/jinja.h.
#include <fmt/core.h>

#include <algorithm>
#include <cmath>

#include "jinja_impl.h"

namespace moe::jinja {

Value Value::from_json(const Json& j) {
  switch (j.type()) {
    case Json::value_t::null: return none();
    case Json::value_t::boolean: return boolean(j.get<bool>());
    case Json::value_t::number_integer: return integer(j.get<int64_t>());
    case Json::value_t::number_unsigned: return integer(static_cast<int64_t>(j.get<uint64_t>()));
    case Json::value_t::number_float: return number(j.get<double>());
    case Json::value_t::string: return string(j.get<std::string>());
    case Json::value_t::array: {
      List l;
      for (const Json& x : j) l.push_back(from_json(x));
      return of_list(std::move(l));
    }
    case Json::value_t::object: {
      Dict d;
      for (auto it = j.begin(); it != j.end(); ++it)
        d.emplace_back(it.key(), from_json(it.value()));
      return of_dict(std::move(d));
    }
    default: return none();
  }
}

const Value* Value::find(const std::string& key) const {
  if (!dict) return nullptr;
  for (const auto& [k, v] : *dict)
    if (k == key) return &v;
  return nullptr;
}

bool truthy(const Value& v) {
  switch (v.kind) {
    case Value::Kind::undefined:
    case Value::Kind::none: return false;
    case Value::Kind::boolean: return v.b;
    case Value::Kind::integer: return v.i != 0;
    case Value::Kind::number: return v.d != 0;
    case Value::Kind::string: return !v.s.empty();
    case Value::Kind::list: return !v.list->empty();
    case Value::Kind::dict: return !v.dict->empty();
    case Value::Kind::function:
    case Value::Kind::ns: return true;
  }
  return false;
}

bool equal(const Value& a, const Value& b) {
  if (a.numeric() && b.numeric()) {
    if (a.kind == Value::Kind::number || b.kind == Value::Kind::number)
      return a.as_double() == b.as_double();
    return (a.kind == Value::Kind::boolean ? a.b : a.i) ==
           (b.kind == Value::Kind::boolean ? b.b : b.i);
  }
  if (a.kind != b.kind) return false;
  switch (a.kind) {
    case Value::Kind::undefined:
    case Value::Kind::none: return true;
    case Value::Kind::string: return a.s == b.s;
    case Value::Kind::list:
      if (a.list->size() != b.list->size()) return false;
      for (size_t i = 0; i < a.list->size(); ++i)
        if (!equal((*a.list)[i], (*b.list)[i])) return false;
      return true;
    case Value::Kind::dict:
      if (a.dict->size() != b.dict->size()) return false;
      for (const auto& [k, v] : *a.dict) {
        const Value* o = b.find(k);
        if (!o || !equal(v, *o)) return false;
      }
      return true;
    default: return a.dict == b.dict && a.func == b.func;
  }
}

namespace {

// Python's repr() of a float: the shortest text that reads back, with ".0" on whole numbers.
std::string float_str(double d) {
  if (std::isnan(d)) return "nan";
  if (std::isinf(d)) return d > 0 ? "inf" : "-inf";
  std::string s = fmt::format("{}", d);
  if (s.find_first_of(".e") == std::string::npos) s += ".0";
  return s;
}

std::string quote_repr(const std::string& s) {
  const char q = s.find('\'') != std::string::npos && s.find('"') == std::string::npos ? '"' : '\'';
  std::string out(1, q);
  for (char c : s) {
    switch (c) {
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c == q) {
          out += '\\';
          out += c;
        } else if (static_cast<unsigned char>(c) < 0x20 || c == 0x7F) {
          out += fmt::format("\\x{:02x}", static_cast<unsigned char>(c));
        } else {
          out += c;
        }
    }
  }
  return out + q;
}

void json_string(std::string& out, const std::string& s) {
  out += '"';
  for (char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      default:
        if (static_cast<unsigned char>(c) < 0x20 || c == 0x7F)
          out += fmt::format("\\u{:04x}", static_cast<unsigned char>(c));
        else
          out += c;
    }
  }
  out += '"';
}

}  // namespace

std::string to_str(const Value& v) {
  switch (v.kind) {
    case Value::Kind::undefined: return "";
    case Value::Kind::string: return v.s;
    default: return to_repr(v);
  }
}

std::string to_repr(const Value& v) {
  switch (v.kind) {
    case Value::Kind::undefined: return "";
    case Value::Kind::none: return "None";
    case Value::Kind::boolean: return v.b ? "True" : "False";
    case Value::Kind::integer: return std::to_string(v.i);
    case Value::Kind::number: return float_str(v.d);
    case Value::Kind::string: return quote_repr(v.s);
    case Value::Kind::list: {
      std::string out = v.tuple ? "(" : "[";
      for (size_t i = 0; i < v.list->size(); ++i) out += (i ? ", " : "") + to_repr((*v.list)[i]);
      if (v.tuple && v.list->size() == 1) out += ",";
      return out + (v.tuple ? ")" : "]");
    }
    case Value::Kind::dict: {
      std::string out = "{";
      bool first = true;
      for (const auto& [k, x] : *v.dict) {
        out += (first ? "" : ", ") + quote_repr(k) + ": " + to_repr(x);
        first = false;
      }
      return out + "}";
    }
    case Value::Kind::function: return "<function>";
    case Value::Kind::ns: return "<Namespace>";
  }
  return "";
}

std::string to_json(const Value& v, int indent, bool sort_keys, int depth) {
  std::string out;
  const std::string nl =
      indent >= 0 ? "\n" + std::string(static_cast<size_t>(indent * (depth + 1)), ' ') : "";
  const std::string nl_end =
      indent >= 0 ? "\n" + std::string(static_cast<size_t>(indent * depth), ' ') : "";
  const std::string item_sep = indent >= 0 ? "," : ", ";
  switch (v.kind) {
    case Value::Kind::none: return "null";
    case Value::Kind::boolean: return v.b ? "true" : "false";
    case Value::Kind::integer: return std::to_string(v.i);
    case Value::Kind::number:
      if (std::isnan(v.d)) return "NaN";
      if (std::isinf(v.d)) return v.d > 0 ? "Infinity" : "-Infinity";
      return float_str(v.d);
    case Value::Kind::string: json_string(out, v.s); return out;
    case Value::Kind::list: {
      if (v.list->empty()) return "[]";
      out = "[";
      for (size_t i = 0; i < v.list->size(); ++i)
        out += (i ? item_sep : "") + nl + to_json((*v.list)[i], indent, sort_keys, depth + 1);
      return out + nl_end + "]";
    }
    case Value::Kind::dict:
    case Value::Kind::ns: {
      if (v.dict->empty()) return "{}";
      Dict items = *v.dict;
      if (sort_keys)
        std::stable_sort(items.begin(), items.end(),
                         [](const auto& a, const auto& b) { return a.first < b.first; });
      out = "{";
      bool first = true;
      for (const auto& [k, x] : items) {
        out += (first ? "" : item_sep) + nl;
        json_string(out, k);
        out += ": " + to_json(x, indent, sort_keys, depth + 1);
        first = false;
      }
      return out + nl_end + "}";
    }
    case Value::Kind::undefined:
      throw std::runtime_error(fmt::format("'{}' is undefined (tojson)", v.s));
    case Value::Kind::function: throw std::runtime_error("a function is not JSON serializable");
  }
  return out;
}

}  // namespace moe::jinja
