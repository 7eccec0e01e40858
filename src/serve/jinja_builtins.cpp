// Chat templates: the builtins: methods of strings, lists and dicts (the immutable sandbox's:
// nothing that mutates), attribute and item access as Jinja2's, filters and tests. See
// moe/jinja.h.
#include <fmt/core.h>

#include <algorithm>
#include <cmath>
#include <set>

#include "jinja_impl.h"

namespace moe::jinja {

namespace {

using K = Value::Kind;

[[noreturn]] void error(const std::string& what) { throw std::runtime_error(what); }

}  // namespace

// ---------------------------------------------------------------------------------------------
// Strings: Python indexes them by code point

std::vector<size_t> code_points(const std::string& s) {  // byte offset of each code point
  std::vector<size_t> at;
  for (size_t i = 0; i < s.size(); ++i)
    if ((static_cast<unsigned char>(s[i]) & 0xC0) != 0x80) at.push_back(i);
  return at;
}

bool py_space(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v';
}

std::string strip(const std::string& s, const Value* chars, bool left, bool right) {
  auto drop = [&](char c) {
    return chars && chars->is(K::string) ? chars->s.find(c) != std::string::npos : py_space(c);
  };
  size_t b = 0, e = s.size();
  if (left)
    while (b < e && drop(s[b])) ++b;
  if (right)
    while (e > b && drop(s[e - 1])) --e;
  return s.substr(b, e - b);
}

std::string lower(std::string s) {
  for (char& c : s)
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  return s;
}
std::string upper(std::string s) {
  for (char& c : s)
    if (c >= 'a' && c <= 'z') c = static_cast<char>(c - 'a' + 'A');
  return s;
}

Value split(const std::string& s, const Value* sep, int64_t maxsplit) {
  List out;
  if (!sep || sep->is(K::none)) {  // runs of whitespace, no empty pieces
    size_t i = 0;
    while (i < s.size()) {
      while (i < s.size() && py_space(s[i])) ++i;
      if (i >= s.size()) break;
      if (maxsplit >= 0 && static_cast<int64_t>(out.size()) == maxsplit) {
        out.push_back(Value::string(strip(s.substr(i), nullptr, false, true)));
        break;
      }
      size_t j = i;
      while (j < s.size() && !py_space(s[j])) ++j;
      out.push_back(Value::string(s.substr(i, j - i)));
      i = j;
    }
    return Value::of_list(std::move(out));
  }
  if (!sep->is(K::string) || sep->s.empty())
    error("split: the separator must be a non-empty string");
  size_t i = 0;
  for (;;) {
    const size_t j = s.find(sep->s, i);
    if (j == std::string::npos || (maxsplit >= 0 && static_cast<int64_t>(out.size()) == maxsplit)) {
      out.push_back(Value::string(s.substr(i)));
      break;
    }
    out.push_back(Value::string(s.substr(i, j - i)));
    i = j + sep->s.size();
  }
  return Value::of_list(std::move(out));
}

std::string replace(const std::string& s, const std::string& from, const std::string& to,
                    int64_t count) {
  if (from.empty()) error("replace: an empty string to replace is not supported");
  std::string out;
  size_t i = 0;
  int64_t n = 0;
  for (;;) {
    const size_t j = s.find(from, i);
    if (j == std::string::npos || (count >= 0 && n == count)) break;
    out += s.substr(i, j - i) + to;
    i = j + from.size();
    ++n;
  }
  return out + s.substr(i);
}

int64_t length(const Value& v) {
  switch (v.kind) {
    case K::string: return static_cast<int64_t>(code_points(v.s).size());
    case K::list: return static_cast<int64_t>(v.list->size());
    case K::dict:
    case K::ns: return static_cast<int64_t>(v.dict->size());
    case K::undefined: return 0;
    default: error(fmt::format("object of type {} has no length", to_repr(v)));
  }
}

// Iteration as Python's: a list's items, a dict's keys, a string's characters.
List items_of(const Value& v) {
  switch (v.kind) {
    case K::list: return *v.list;
    case K::dict: {
      List out;
      for (const auto& [k, x] : *v.dict) out.push_back(Value::string(k));
      return out;
    }
    case K::string: {
      List out;
      const auto at = code_points(v.s);
      for (size_t i = 0; i < at.size(); ++i)
        out.push_back(
            Value::string(v.s.substr(at[i], (i + 1 < at.size() ? at[i + 1] : v.s.size()) - at[i])));
      return out;
    }
    case K::undefined: return {};
    default: error(fmt::format("{} is not iterable", to_repr(v)));
  }
}

int compare(const Value& a, const Value& b) {
  if (a.numeric() && b.numeric()) {
    const double x = a.as_double(), y = b.as_double();
    return x < y ? -1 : x > y ? 1 : 0;
  }
  if (a.is(K::string) && b.is(K::string)) return a.s < b.s ? -1 : a.s > b.s ? 1 : 0;
  if (a.is(K::list) && b.is(K::list)) {
    for (size_t i = 0; i < std::min(a.list->size(), b.list->size()); ++i)
      if (int c = compare((*a.list)[i], (*b.list)[i])) return c;
    return a.list->size() < b.list->size() ? -1 : a.list->size() > b.list->size() ? 1 : 0;
  }
  error(fmt::format("cannot order {} and {}", to_repr(a), to_repr(b)));
}

// Python's index rules: negative counts from the end.
int64_t index_in(int64_t i, int64_t n) {
  if (i < 0) i += n;
  if (i < 0 || i >= n) error("index out of range");
  return i;
}

Value slice(const Value& v, const Value* start, const Value* stop, const Value* step) {
  const int64_t st = step && !step->is(K::none) ? step->i : 1;
  if (st == 0) error("slice step cannot be zero");
  List src;
  std::vector<size_t> at;
  int64_t n = 0;
  if (v.is(K::string)) {
    at = code_points(v.s);
    n = static_cast<int64_t>(at.size());
  } else if (v.is(K::list)) {
    n = static_cast<int64_t>(v.list->size());
  } else {
    error(fmt::format("{} cannot be sliced", to_repr(v)));
  }
  auto bound = [&](const Value* x, int64_t dflt) {
    if (!x || x->is(K::none)) return dflt;
    int64_t i = x->i;
    if (i < 0) i += n;
    if (st > 0) return std::clamp<int64_t>(i, 0, n);
    return std::clamp<int64_t>(i, -1, n - 1);
  };
  const int64_t b = bound(start, st > 0 ? 0 : n - 1), e = bound(stop, st > 0 ? n : -1);
  std::vector<int64_t> idx;
  for (int64_t i = b; st > 0 ? i < e : i > e; i += st) idx.push_back(i);
  if (v.is(K::string)) {
    std::string out;
    for (int64_t i : idx) {
      const size_t from = at[static_cast<size_t>(i)];
      const size_t to =
          static_cast<size_t>(i) + 1 < at.size() ? at[static_cast<size_t>(i) + 1] : v.s.size();
      out += v.s.substr(from, to - from);
    }
    return Value::string(out);
  }
  List out;
  for (int64_t i : idx) out.push_back((*v.list)[static_cast<size_t>(i)]);
  return Value::of_list(std::move(out));
}

const Value* arg(Args& a, Kwargs& kw, size_t pos, const char* name) {
  if (pos < a.size()) return &a[pos];
  for (auto& [k, v] : kw)
    if (k == name) return &v;
  return nullptr;
}

std::string str_arg(Args& a, Kwargs& kw, size_t pos, const char* name, const char* what) {
  const Value* v = arg(a, kw, pos, name);
  if (!v || !v->is(K::string)) error(fmt::format("{}: '{}' must be a string", what, name));
  return v->s;
}

int64_t int_arg(Args& a, Kwargs& kw, size_t pos, const char* name, int64_t dflt) {
  const Value* v = arg(a, kw, pos, name);
  if (!v || v->is(K::none)) return dflt;
  if (!v->is(K::integer)) error(fmt::format("'{}' must be an integer", name));
  return v->i;
}

// ---------------------------------------------------------------------------------------------
// Methods of strings, dicts and lists (the immutable sandbox's: nothing that mutates)

Value method(const Value& self, const std::string& name) {
  auto fn = [](auto f) { return Value::function(f); };
  if (self.is(K::string)) {
    const std::string s = self.s;
    if (name == "startswith" || name == "endswith") {
      const bool starts = name == "startswith";
      return fn([s, starts](Args& a, Kwargs& kw) {
        const Value* p = arg(a, kw, 0, "prefix");
        if (!p) error("startswith/endswith need an argument");
        List opts = p->is(K::list) ? *p->list : List{*p};
        for (const Value& o : opts) {
          if (!o.is(K::string)) error("startswith/endswith take strings");
          if (o.s.size() <= s.size() &&
              (starts ? s.compare(0, o.s.size(), o.s) == 0
                      : s.compare(s.size() - o.s.size(), o.s.size(), o.s) == 0))
            return Value::boolean(true);
        }
        return Value::boolean(false);
      });
    }
    if (name == "strip" || name == "lstrip" || name == "rstrip") {
      const bool l = name != "rstrip", r = name != "lstrip";
      return fn([s, l, r](Args& a, Kwargs& kw) {
        const Value* c = arg(a, kw, 0, "chars");
        return Value::string(strip(s, c && c->is(K::none) ? nullptr : c, l, r));
      });
    }
    if (name == "split")
      return fn([s](Args& a, Kwargs& kw) {
        return split(s, arg(a, kw, 0, "sep"), int_arg(a, kw, 1, "maxsplit", -1));
      });
    if (name == "replace")
      return fn([s](Args& a, Kwargs& kw) {
        return Value::string(replace(s, str_arg(a, kw, 0, "old", "replace"),
                                     str_arg(a, kw, 1, "new", "replace"),
                                     int_arg(a, kw, 2, "count", -1)));
      });
    if (name == "upper") return fn([s](Args&, Kwargs&) { return Value::string(upper(s)); });
    if (name == "lower") return fn([s](Args&, Kwargs&) { return Value::string(lower(s)); });
    if (name == "capitalize")
      return fn([s](Args&, Kwargs&) {
        return Value::string(s.empty() ? s : upper(s.substr(0, 1)) + lower(s.substr(1)));
      });
    if (name == "title")
      return fn([s](Args&, Kwargs&) {
        std::string out = s;
        bool start = true;
        for (char& c : out) {
          const bool alpha = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
          if (alpha) c = start ? upper(std::string(1, c))[0] : lower(std::string(1, c))[0];
          start = !alpha;
        }
        return Value::string(out);
      });
    if (name == "find" || name == "count")
      return fn([s, name](Args& a, Kwargs& kw) {
        const std::string sub = str_arg(a, kw, 0, "sub", name.c_str());
        if (name == "find") {
          const size_t at = s.find(sub);
          if (at == std::string::npos) return Value::integer(-1);
          return Value::integer(static_cast<int64_t>(code_points(s.substr(0, at)).size()));
        }
        int64_t n = 0;
        for (size_t i = s.find(sub); i != std::string::npos && !sub.empty();
             i = s.find(sub, i + sub.size()))
          ++n;
        return Value::integer(n);
      });
    if (name == "join")
      return fn([s](Args& a, Kwargs& kw) {
        const Value* it = arg(a, kw, 0, "iterable");
        if (!it) error("join needs an iterable");
        std::string out;
        bool first = true;
        for (const Value& x : items_of(*it)) {
          if (!x.is(K::string)) error("join: every item must be a string");
          out += (first ? "" : s) + x.s;
          first = false;
        }
        return Value::string(out);
      });
  } else if (self.is(K::dict)) {
    const Value d = self;
    if (name == "items" || name == "keys" || name == "values")
      return fn([d, name](Args&, Kwargs&) {
        List out;
        for (const auto& [k, v] : *d.dict) {
          if (name == "items")
            out.push_back(Value::of_list({Value::string(k), v}, true));
          else
            out.push_back(name == "keys" ? Value::string(k) : v);
        }
        return Value::of_list(std::move(out));
      });
    if (name == "get")
      return fn([d](Args& a, Kwargs& kw) {
        const Value* k = arg(a, kw, 0, "key");
        if (!k || !k->is(K::string)) return Value::none();
        const Value* v = d.find(k->s);
        if (v) return *v;
        const Value* dflt = arg(a, kw, 1, "default");
        return dflt ? *dflt : Value::none();
      });
  } else if (self.is(K::list)) {
    const Value l = self;
    if (name == "index" || name == "count")
      return fn([l, name](Args& a, Kwargs& kw) {
        const Value* x = arg(a, kw, 0, "value");
        if (!x) error(name + " needs an argument");
        int64_t n = 0;
        for (size_t i = 0; i < l.list->size(); ++i)
          if (equal((*l.list)[i], *x)) {
            if (name == "index") return Value::integer(static_cast<int64_t>(i));
            ++n;
          }
        if (name == "index") error("list.index: the value is not in the list");
        return Value::integer(n);
      });
  }
  return Value::undefined(name);
}

// a.name: a method, else the dict's (or namespace's) entry, as Jinja2's getattr.
Value get_attr(const Value& v, const std::string& name) {
  if (v.is(K::undefined)) error(fmt::format("'{}' is undefined", v.s.empty() ? "value" : v.s));
  if (v.is(K::ns)) {
    const Value* x = v.find(name);
    return x ? *x : Value::undefined(name);
  }
  Value m = method(v, name);
  if (m.defined()) return m;
  if (v.is(K::dict)) {
    const Value* x = v.find(name);
    return x ? *x : Value::undefined(name);
  }
  return Value::undefined(name);
}

// a[key]: an entry or an item, else an attribute (as Jinja2's getitem).
Value get_item(const Value& v, const Value& key) {
  if (v.is(K::undefined)) error(fmt::format("'{}' is undefined", v.s.empty() ? "value" : v.s));
  if ((v.is(K::dict) || v.is(K::ns)) && key.is(K::string)) {
    const Value* x = v.find(key.s);
    return x ? *x : Value::undefined(key.s);
  }
  if (key.is(K::integer) || key.is(K::boolean)) {
    const int64_t i = key.is(K::boolean) ? key.b : key.i;
    if (v.is(K::list)) {
      const auto n = static_cast<int64_t>(v.list->size());
      if (i < -n || i >= n) return Value::undefined(fmt::format("[{}]", i));
      return (*v.list)[static_cast<size_t>(index_in(i, n))];
    }
    if (v.is(K::string)) {
      const auto at = code_points(v.s);
      const auto n = static_cast<int64_t>(at.size());
      if (i < -n || i >= n) return Value::undefined(fmt::format("[{}]", i));
      const auto k = static_cast<size_t>(index_in(i, n));
      return Value::string(v.s.substr(at[k], (k + 1 < at.size() ? at[k + 1] : v.s.size()) - at[k]));
    }
  }
  if (key.is(K::string)) return get_attr(v, key.s);
  return Value::undefined("item");
}

// ---------------------------------------------------------------------------------------------
// Filters and tests

const std::set<std::string>& filter_names() {
  static const std::set<std::string> names = {
      "abs",   "capitalize", "count",      "d",       "default", "dictsort",
      "e",     "escape",     "first",      "float",   "indent",  "int",
      "items", "join",       "last",       "length",  "list",    "lower",
      "map",   "reject",     "rejectattr", "replace", "reverse", "round",
      "safe",  "select",     "selectattr", "sort",    "string",  "sum",
      "title", "tojson",     "trim",       "unique",  "upper",   "wordcount"};
  return names;
}

const std::set<std::string>& test_names() {
  static const std::set<std::string> names = {
      "boolean", "callable", "defined",  "divisibleby", "eq",   "equalto",   "even",
      "false",   "float",    "ge",       "gt",          "in",   "integer",   "iterable",
      "le",      "lower",    "lt",       "mapping",     "ne",   "none",      "number",
      "odd",     "sameas",   "sequence", "string",      "true", "undefined", "upper"};
  return names;
}

bool run_test(const std::string& name, const Value& v, Args& a) {
  auto need = [&](size_t n) {
    if (a.size() < n) error(fmt::format("the test '{}' needs an argument", name));
  };
  if (name == "defined") return v.defined();
  if (name == "undefined") return !v.defined();
  if (name == "none") return v.is(K::none);
  if (name == "boolean") return v.is(K::boolean);
  if (name == "true") return v.is(K::boolean) && v.b;
  if (name == "false") return v.is(K::boolean) && !v.b;
  if (name == "integer") return v.is(K::integer);
  if (name == "float") return v.is(K::number);
  if (name == "number") return v.numeric();
  if (name == "string") return v.is(K::string);
  if (name == "mapping") return v.is(K::dict);
  if (name == "iterable") return v.is(K::list) || v.is(K::dict) || v.is(K::string);
  if (name == "sequence") return v.is(K::list) || v.is(K::dict) || v.is(K::string);
  if (name == "callable") return v.is(K::function);
  if (name == "lower") return v.is(K::string) && lower(v.s) == v.s;
  if (name == "upper") return v.is(K::string) && upper(v.s) == v.s;
  if (name == "odd" || name == "even") {
    if (!v.is(K::integer)) error(fmt::format("the test '{}' needs an integer", name));
    return (((v.i % 2) + 2) % 2 == 1) == (name == "odd");
  }
  need(1);
  const Value& o = a[0];
  if (name == "divisibleby") {
    if (!v.is(K::integer) || !o.is(K::integer) || o.i == 0) error("divisibleby needs integers");
    return v.i % o.i == 0;
  }
  if (name == "eq" || name == "equalto") return equal(v, o);
  if (name == "ne") return !equal(v, o);
  if (name == "lt") return compare(v, o) < 0;
  if (name == "le") return compare(v, o) <= 0;
  if (name == "gt") return compare(v, o) > 0;
  if (name == "ge") return compare(v, o) >= 0;
  if (name == "sameas")
    return v.kind == o.kind && (v.list == o.list && v.dict == o.dict && equal(v, o));
  if (name == "in") {
    for (const Value& x : items_of(o))
      if (equal(x, v)) return true;
    return o.is(K::string) && v.is(K::string) && o.s.find(v.s) != std::string::npos;
  }
  error(fmt::format("no test named '{}'", name));
}

std::string html_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&#34;"; break;
      case '\'': out += "&#39;"; break;
      default: out += c;
    }
  }
  return out;
}

Value attribute_path(const Value& v, const std::string& path) {
  Value x = v;
  size_t i = 0;
  for (;;) {
    const size_t j = path.find('.', i);
    const std::string part = path.substr(i, j == std::string::npos ? std::string::npos : j - i);
    x = x.defined() ? get_item(x, Value::string(part)) : x;
    if (j == std::string::npos) return x;
    i = j + 1;
  }
}

Value apply_filter(const std::string& name, const Value& v, Args& a, Kwargs& kw) {
  if (name == "tojson") {
    const Value* ind = arg(a, kw, 99, "indent");
    const Value* sk = arg(a, kw, 99, "sort_keys");
    return Value::string(
        to_json(v, ind && ind->is(K::integer) ? static_cast<int>(ind->i) : -1, sk && truthy(*sk)));
  }
  if (name == "trim") return Value::string(strip(to_str(v), arg(a, kw, 0, "chars"), true, true));
  if (name == "length" || name == "count") return Value::integer(length(v));
  if (name == "string") return Value::string(to_str(v));
  if (name == "lower") return Value::string(lower(to_str(v)));
  if (name == "upper") return Value::string(upper(to_str(v)));
  if (name == "capitalize" || name == "title") {
    Args none;
    Kwargs nkw;
    return (*method(Value::string(to_str(v)), name).func)(none, nkw);
  }
  if (name == "replace")
    return Value::string(replace(to_str(v), str_arg(a, kw, 0, "old", "replace"),
                                 str_arg(a, kw, 1, "new", "replace"),
                                 int_arg(a, kw, 2, "count", -1)));
  if (name == "safe") return v;
  if (name == "e" || name == "escape") return Value::string(html_escape(to_str(v)));
  if (name == "default" || name == "d") {
    const Value* dflt = arg(a, kw, 0, "default_value");
    const Value* boolean = arg(a, kw, 1, "boolean");
    const bool use = boolean && truthy(*boolean) ? !truthy(v) : !v.defined();
    return use ? (dflt ? *dflt : Value::string("")) : v;
  }
  if (name == "first" || name == "last") {
    const List items = items_of(v);
    if (items.empty()) return Value::undefined(name);
    return name == "first" ? items.front() : items.back();
  }
  if (name == "list") return Value::of_list(items_of(v));
  if (name == "items") {
    if (v.is(K::undefined)) return Value::of_list({});
    if (!v.is(K::dict)) error("items needs a mapping");
    Args none;
    Kwargs nkw;
    return (*method(v, "items").func)(none, nkw);
  }
  if (name == "join") {
    const Value* sep = arg(a, kw, 0, "d");
    const Value* attr = arg(a, kw, 1, "attribute");
    std::string out;
    bool first = true;
    for (const Value& x : items_of(v)) {
      out += (first ? ""
              : sep ? to_str(*sep)
                    : "") +
             to_str(attr ? attribute_path(x, to_str(*attr)) : x);
      first = false;
    }
    return Value::string(out);
  }
  if (name == "reverse") {
    if (v.is(K::string)) {
      const Value step = Value::integer(-1);
      return slice(v, nullptr, nullptr, &step);
    }
    List l = items_of(v);
    std::reverse(l.begin(), l.end());
    return Value::of_list(std::move(l));
  }
  if (name == "int") {
    if (v.is(K::integer)) return v;
    if (v.is(K::number)) return Value::integer(static_cast<int64_t>(v.d));
    if (v.is(K::boolean)) return Value::integer(v.b);
    if (v.is(K::string)) {
      try {
        size_t used = 0;
        const std::string t = strip(v.s, nullptr, true, true);
        const int64_t i = std::stoll(t, &used);
        if (used == t.size()) return Value::integer(i);
      } catch (const std::exception&) {
      }
    }
    const Value* dflt = arg(a, kw, 0, "default");
    return dflt ? *dflt : Value::integer(0);
  }
  if (name == "float") {
    if (v.numeric()) return Value::number(v.as_double());
    if (v.is(K::string)) {
      try {
        return Value::number(std::stod(v.s));
      } catch (const std::exception&) {
      }
    }
    const Value* dflt = arg(a, kw, 0, "default");
    return dflt ? *dflt : Value::number(0);
  }
  if (name == "abs") {
    if (v.is(K::integer)) return Value::integer(v.i < 0 ? -v.i : v.i);
    if (v.is(K::number)) return Value::number(std::fabs(v.d));
    error("abs needs a number");
  }
  if (name == "round") {
    const int64_t prec = int_arg(a, kw, 0, "precision", 0);
    const double scale = std::pow(10.0, static_cast<double>(prec));
    return Value::number(std::round(v.as_double() * scale) / scale);
  }
  if (name == "indent") {
    const Value* w = arg(a, kw, 0, "width");
    const Value* first = arg(a, kw, 1, "first");
    const Value* blank = arg(a, kw, 2, "blank");
    const std::string pad =
        w && w->is(K::string) ? w->s : std::string(static_cast<size_t>(w ? w->i : 4), ' ');
    const std::string s = to_str(v);
    std::string out;
    size_t i = 0;
    bool line0 = true;
    for (;;) {
      const size_t j = s.find('\n', i);
      const std::string ln = s.substr(i, j == std::string::npos ? std::string::npos : j - i);
      const bool indent_it =
          line0 ? first && truthy(*first) : (!ln.empty() || (blank && truthy(*blank)));
      out += (indent_it ? pad : "") + ln;
      if (j == std::string::npos) break;
      out += '\n';
      i = j + 1;
      line0 = false;
    }
    return Value::string(out);
  }
  if (name == "wordcount") return Value::integer(length(split(to_str(v), nullptr, -1)));
  if (name == "sum") {
    const Value* attr = arg(a, kw, 0, "attribute");
    Value total = Value::integer(0);
    for (const Value& x : items_of(v)) {
      const Value y = attr ? attribute_path(x, to_str(*attr)) : x;
      if (!y.numeric()) error("sum needs numbers");
      total = total.is(K::integer) && y.is(K::integer)
                  ? Value::integer(total.i + y.i)
                  : Value::number(total.as_double() + y.as_double());
    }
    return total;
  }
  if (name == "unique") {
    List out;
    for (const Value& x : items_of(v)) {
      bool seen = false;
      for (const Value& y : out) seen = seen || equal(x, y);
      if (!seen) out.push_back(x);
    }
    return Value::of_list(std::move(out));
  }
  if (name == "sort" || name == "dictsort") {
    List l;
    if (name == "dictsort") {
      if (!v.is(K::dict)) error("dictsort needs a mapping");
      for (const auto& [k, x] : *v.dict) l.push_back(Value::of_list({Value::string(k), x}, true));
    } else {
      l = items_of(v);
    }
    const Value* rev = arg(a, kw, name == "sort" ? 0 : 2, "reverse");
    const Value* attr = name == "sort" ? arg(a, kw, 2, "attribute") : nullptr;
    auto key = [&](const Value& x) {
      if (name == "dictsort") return (*x.list)[0];
      return attr ? attribute_path(x, to_str(*attr)) : x;
    };
    std::stable_sort(l.begin(), l.end(),
                     [&](const Value& x, const Value& y) { return compare(key(x), key(y)) < 0; });
    if (rev && truthy(*rev)) std::reverse(l.begin(), l.end());
    return Value::of_list(std::move(l));
  }
  if (name == "map") {
    List out;
    const Value* attr = arg(a, kw, 99, "attribute");
    for (const Value& x : items_of(v)) {
      if (attr) {
        out.push_back(attribute_path(x, to_str(*attr)));
      } else {
        if (a.empty() || !a[0].is(K::string)) error("map needs a filter name or attribute=");
        Args rest(a.begin() + 1, a.end());
        Kwargs nkw;
        out.push_back(apply_filter(a[0].s, x, rest, nkw));
      }
    }
    return Value::of_list(std::move(out));
  }
  if (name == "select" || name == "reject" || name == "selectattr" || name == "rejectattr") {
    const bool by_attr = name.size() > 6;
    const bool keep_if = name[0] == 's';
    List out;
    for (const Value& x : items_of(v)) {
      size_t p = 0;
      Value subject = x;
      if (by_attr) {
        if (a.empty()) error(name + " needs an attribute");
        subject = attribute_path(x, to_str(a[0]));
        p = 1;
      }
      bool ok;
      if (p < a.size()) {
        Args rest(a.begin() + static_cast<std::ptrdiff_t>(p) + 1, a.end());
        ok = run_test(to_str(a[p]), subject, rest);
      } else {
        ok = truthy(subject);
      }
      if (ok == keep_if) out.push_back(x);
    }
    return Value::of_list(std::move(out));
  }
  error(fmt::format("no filter named '{}'", name));
}

}  // namespace moe::jinja
