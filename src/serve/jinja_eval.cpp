// Chat templates: the interpreter (statements and expressions; transformers' globals), and the
// check that a template names only filters and tests this engine has. See moe/jinja.h.
#include <fmt/core.h>

#include <algorithm>
#include <cmath>
#include <ctime>
#include <map>
#include <set>

#include "jinja_impl.h"
#include "moe/error.h"

namespace moe::jinja {

// ---------------------------------------------------------------------------------------------
// The interpreter

namespace {

using K = Value::Kind;

[[noreturn]] void error(const std::string& what) { throw std::runtime_error(what); }

class Interp {
 public:
  struct Frame {
    std::map<std::string, Value> vars;
    std::shared_ptr<Frame> parent;
  };
  using FramePtr = std::shared_ptr<Frame>;
  enum class Flow { normal, break_, continue_ };

  Value lookup(const FramePtr& f, const std::string& name) const {
    for (const Frame* p = f.get(); p; p = p->parent.get()) {
      auto it = p->vars.find(name);
      if (it != p->vars.end()) return it->second;
    }
    return Value::undefined(name);
  }

  Flow exec(const std::vector<NodePtr>& body, const FramePtr& f, std::string& out) {
    for (const NodePtr& n : body) {
      const Flow fl = exec(*n, f, out);
      if (fl != Flow::normal) return fl;
    }
    return Flow::normal;
  }

  // Bounds on what one rendering may cost: macro calls nested (a macro that calls itself), steps
  // taken (loops within loops), and text written.
  static constexpr int kMaxCalls = 100;
  static constexpr int64_t kMaxSteps = 2'000'000;
  static constexpr size_t kMaxOutput = 64u << 20;
  int calls = 0;
  int64_t steps = 0;

  void tick(const std::string& out) {
    if (++steps > kMaxSteps) error("the template takes too many steps (a loop without end?)");
    if (out.size() > kMaxOutput) error("the template writes more than 64 MB");
  }

  Flow exec(const Node& n, const FramePtr& f, std::string& out) {
    tick(out);
    try {
      return exec_node(n, f, out);
    } catch (const std::runtime_error& e) {
      if (dynamic_cast<const Error*>(&e)) throw;
      fail(n.line, e.what());
    }
  }

  Flow exec_node(const Node& n, const FramePtr& f, std::string& out) {
    switch (n.kind) {
      case Node::Kind::text: out += n.text; return Flow::normal;
      case Node::Kind::output: out += to_str(eval(*n.expr, f)); return Flow::normal;
      case Node::Kind::if_:
        for (const auto& [cond, body] : n.branches)
          if (!cond || truthy(eval(*cond, f))) return exec(body, f, out);
        return Flow::normal;
      case Node::Kind::set: assign(n, eval(*n.expr, f), f); return Flow::normal;
      case Node::Kind::set_block: {
        std::string s;
        exec(n.body, f, s);
        assign(n, Value::string(s), f);
        return Flow::normal;
      }
      case Node::Kind::macro: f->vars[n.macro_name] = macro(n, f); return Flow::normal;
      case Node::Kind::break_: return Flow::break_;
      case Node::Kind::continue_: return Flow::continue_;
      case Node::Kind::for_: for_loop(n, f, out); return Flow::normal;
    }
    return Flow::normal;
  }

  void assign(const Node& n, const Value& v, const FramePtr& f) {
    if (n.targets.size() == 2 && !n.targets[0].empty()) {  // ns.attr = v
      Value ns = lookup(f, n.targets[0]);
      if (!ns.is(K::ns))
        error(fmt::format("'{}' is not a namespace: cannot set its attribute", n.targets[0]));
      for (auto& [k, x] : *ns.dict)
        if (k == n.targets[1]) {
          x = v;
          return;
        }
      ns.dict->emplace_back(n.targets[1], v);
      return;
    }
    if (n.targets[0].empty()) {  // a, b = v
      const List items = items_of(v);
      if (items.size() != n.targets.size() - 1)
        error(fmt::format("cannot unpack {} values into {}", items.size(), n.targets.size() - 1));
      for (size_t i = 1; i < n.targets.size(); ++i) f->vars[n.targets[i]] = items[i - 1];
      return;
    }
    f->vars[n.targets[0]] = v;
  }

  void for_loop(const Node& n, const FramePtr& f, std::string& out) {
    List items = items_of(eval(*n.expr, f));
    auto frame = std::make_shared<Frame>();
    frame->parent = f;
    if (n.loop_filter) {  // "for x in xs if cond": the loop sees only the items that pass
      List kept;
      for (const Value& x : items) {
        bind(n, x, frame);
        if (truthy(eval(*n.loop_filter, frame))) kept.push_back(x);
      }
      items = std::move(kept);
    }
    if (items.empty()) {
      exec(n.else_body, f, out);
      return;
    }
    const auto len = static_cast<int64_t>(items.size());
    for (int64_t i = 0; i < len; ++i) {
      tick(out);
      const Value& x = items[static_cast<size_t>(i)];
      bind(n, x, frame);
      Dict loop = {
          {"index", Value::integer(i + 1)},
          {"index0", Value::integer(i)},
          {"revindex", Value::integer(len - i)},
          {"revindex0", Value::integer(len - i - 1)},
          {"first", Value::boolean(i == 0)},
          {"last", Value::boolean(i == len - 1)},
          {"length", Value::integer(len)},
          {"depth", Value::integer(1)},
          {"depth0", Value::integer(0)},
          {"previtem", i > 0 ? items[static_cast<size_t>(i - 1)] : Value::undefined("previtem")},
          {"nextitem",
           i + 1 < len ? items[static_cast<size_t>(i + 1)] : Value::undefined("nextitem")}};
      loop.emplace_back("cycle", Value::function([i](Args& a, Kwargs&) {
                          if (a.empty()) error("loop.cycle needs arguments");
                          return a[static_cast<size_t>(i) % a.size()];
                        }));
      frame->vars["loop"] = Value::of_dict(std::move(loop));
      const Flow fl = exec(n.body, frame, out);
      if (fl == Flow::break_) break;
    }
  }

  void bind(const Node& n, const Value& x, const FramePtr& frame) {
    if (n.targets.size() == 1) {
      frame->vars[n.targets[0]] = x;
      return;
    }
    const List parts = items_of(x);
    if (parts.size() != n.targets.size())
      error(fmt::format("cannot unpack {} values into {} loop variables", parts.size(),
                        n.targets.size()));
    for (size_t i = 0; i < parts.size(); ++i) frame->vars[n.targets[i]] = parts[i];
  }

  Value macro(const Node& n, const FramePtr& defined_in) {
    const Node* node = &n;
    // The macro lives in the frame it was defined in: holding that frame weakly keeps the two from
    // owning each other (which would leak both).
    std::weak_ptr<Frame> scope = defined_in;
    return Value::function([this, node, scope](Args& a, Kwargs& kw) {
      FramePtr outer = scope.lock();
      if (!outer) error(fmt::format("macro '{}' is called outside its scope", node->macro_name));
      if (++calls > kMaxCalls)
        error(fmt::format("macro calls nested more than {} deep", kMaxCalls));
      struct Leave {
        int& c;
        ~Leave() { --c; }
      } leave{calls};
      auto frame = std::make_shared<Frame>();
      frame->parent = outer;
      if (a.size() > node->params.size())
        error(fmt::format("macro '{}' takes {} arguments, got {}", node->macro_name,
                          node->params.size(), a.size()));
      for (size_t i = 0; i < node->params.size(); ++i) {
        const auto& [name, dflt] = node->params[i];
        const Value* v = i < a.size() ? &a[i] : nullptr;
        for (auto& [k, x] : kw)
          if (k == name) v = &x;
        frame->vars[name] = v ? *v : dflt ? eval(*dflt, frame) : Value::undefined(name);
      }
      for (auto& [k, x] : kw) {
        bool known = false;
        for (const auto& p : node->params) known = known || p.first == k;
        if (!known) error(fmt::format("macro '{}' has no argument '{}'", node->macro_name, k));
      }
      std::string s;
      exec(node->body, frame, s);
      return Value::string(s);
    });
  }

  Value eval(const Expr& e, const FramePtr& f) {
    if (++steps > kMaxSteps) error("the template takes too many steps (a loop without end?)");
    switch (e.kind) {
      case Expr::Kind::literal: return e.value;
      case Expr::Kind::name: return lookup(f, e.name);
      case Expr::Kind::list:
      case Expr::Kind::tuple: {
        List l;
        for (const auto& x : e.args) l.push_back(eval(*x, f));
        return Value::of_list(std::move(l), e.kind == Expr::Kind::tuple);
      }
      case Expr::Kind::dict: {
        Dict d;
        for (size_t i = 0; i + 1 < e.args.size(); i += 2) {
          const Value k = eval(*e.args[i], f);
          if (!k.is(K::string)) error("dict keys must be strings");
          Value v = eval(*e.args[i + 1], f);
          bool replaced = false;
          for (auto& [dk, dv] : d)
            if (dk == k.s) {
              dv = v;
              replaced = true;
            }
          if (!replaced) d.emplace_back(k.s, v);
        }
        return Value::of_dict(std::move(d));
      }
      case Expr::Kind::attr: return get_attr(eval(*e.args[0], f), e.name);
      case Expr::Kind::item: return get_item(eval(*e.args[0], f), eval(*e.args[1], f));
      case Expr::Kind::slice: {
        const Value v = eval(*e.args[0], f);
        Value parts[3];
        const Value* p[3] = {nullptr, nullptr, nullptr};
        for (int k = 0; k < 3; ++k)
          if (e.args[static_cast<size_t>(k) + 1]) {
            parts[k] = eval(*e.args[static_cast<size_t>(k) + 1], f);
            if (!parts[k].is(K::integer) && !parts[k].is(K::none))
              error("slice indices must be integers");
            p[k] = &parts[k];
          }
        return slice(v, p[0], p[1], p[2]);
      }
      case Expr::Kind::call: {
        const Value callee = eval(*e.args[0], f);
        Args a;
        Kwargs kw;
        for (size_t i = 1; i < e.args.size(); ++i) a.push_back(eval(*e.args[i], f));
        for (const auto& [k, x] : e.kwargs) kw.emplace_back(k, eval(*x, f));
        if (!callee.is(K::function)) {
          const std::string what =
              e.args[0]->kind == Expr::Kind::attr   ? "method '" + e.args[0]->name + "'"
              : e.args[0]->kind == Expr::Kind::name ? "'" + e.args[0]->name + "'"
                                                    : "the value";
          error(fmt::format("{} is not something this engine can call", what));
        }
        return (*callee.func)(a, kw);
      }
      case Expr::Kind::filter: {
        Args a;
        Kwargs kw;
        for (size_t i = 1; i < e.args.size(); ++i) a.push_back(eval(*e.args[i], f));
        for (const auto& [k, x] : e.kwargs) kw.emplace_back(k, eval(*x, f));
        return apply_filter(e.name, eval(*e.args[0], f), a, kw);
      }
      case Expr::Kind::test: {
        Args a;
        for (size_t i = 1; i < e.args.size(); ++i) a.push_back(eval(*e.args[i], f));
        return Value::boolean(run_test(e.name, eval(*e.args[0], f), a) != e.negate);
      }
      case Expr::Kind::unary: {
        const Value v = eval(*e.args[0], f);
        if (e.name == "not") return Value::boolean(!truthy(v));
        if (v.is(K::integer)) return Value::integer(e.name == "-" ? -v.i : v.i);
        if (v.is(K::number)) return Value::number(e.name == "-" ? -v.d : v.d);
        error(fmt::format("bad operand for unary {}: {}", e.name, to_repr(v)));
      }
      case Expr::Kind::binary: return binary(e, f);
      case Expr::Kind::compare: {
        Value a = eval(*e.args[0], f);
        for (size_t k = 0; k < e.ops.size(); ++k) {
          Value b = eval(*e.args[k + 1], f);
          if (!truthy(compare_op(e.ops[k], a, b))) return Value::boolean(false);
          a = std::move(b);
        }
        return Value::boolean(true);
      }
      case Expr::Kind::cond:
        if (truthy(eval(*e.args[1], f))) return eval(*e.args[0], f);
        return e.args[2] ? eval(*e.args[2], f) : Value::undefined("else");
    }
    return Value();
  }

  Value binary(const Expr& e, const FramePtr& f) {
    const std::string& op = e.name;
    if (op == "and") {
      Value a = eval(*e.args[0], f);
      return truthy(a) ? eval(*e.args[1], f) : a;
    }
    if (op == "or") {
      Value a = eval(*e.args[0], f);
      return truthy(a) ? a : eval(*e.args[1], f);
    }
    const Value a = eval(*e.args[0], f), b = eval(*e.args[1], f);
    return arith(op, a, b);
  }

  static Value compare_op(const std::string& op, const Value& a, const Value& b) {
    if (op == "==") return Value::boolean(equal(a, b));
    if (op == "!=") return Value::boolean(!equal(a, b));
    if (op == "<") return Value::boolean(compare(a, b) < 0);
    if (op == "<=") return Value::boolean(compare(a, b) <= 0);
    if (op == ">") return Value::boolean(compare(a, b) > 0);
    if (op == ">=") return Value::boolean(compare(a, b) >= 0);
    if (op == "in" || op == "not in") {
      bool in = false;
      if (b.is(K::string)) {
        if (!a.is(K::string)) error("'in <string>' requires a string on the left");
        in = b.s.find(a.s) != std::string::npos;
      } else if (b.is(K::dict) || b.is(K::ns)) {
        in = a.is(K::string) && b.find(a.s) != nullptr;
      } else {
        for (const Value& x : items_of(b)) in = in || equal(x, a);
      }
      return Value::boolean(in == (op == "in"));
    }
    error(fmt::format("unsupported comparison {}", op));
  }

  static Value arith(const std::string& op, const Value& a, const Value& b) {
    if (op == "~") return Value::string(to_str(a) + to_str(b));
    if (op == "+") {
      if (a.is(K::string) && b.is(K::string)) return Value::string(a.s + b.s);
      if (a.is(K::list) && b.is(K::list)) {
        List l = *a.list;
        l.insert(l.end(), b.list->begin(), b.list->end());
        return Value::of_list(std::move(l));
      }
    }
    if (op == "*") {
      const Value* seq = a.is(K::string) || a.is(K::list)   ? &a
                         : b.is(K::string) || b.is(K::list) ? &b
                                                            : nullptr;
      const Value* n = seq == &a ? &b : &a;
      if (seq && n->is(K::integer)) {
        if (seq->is(K::string)) {
          std::string s;
          for (int64_t i = 0; i < n->i; ++i) s += seq->s;
          return Value::string(s);
        }
        List l;
        for (int64_t i = 0; i < n->i; ++i) l.insert(l.end(), seq->list->begin(), seq->list->end());
        return Value::of_list(std::move(l));
      }
    }
    if (!a.numeric() || !b.numeric())
      error(fmt::format("unsupported operand types for {}: {} and {}", op, to_repr(a), to_repr(b)));
    const bool ints = !a.is(K::number) && !b.is(K::number);
    const int64_t x = a.is(K::boolean) ? a.b : a.i, y = b.is(K::boolean) ? b.b : b.i;
    const double dx = a.as_double(), dy = b.as_double();
    if (op == "+") return ints ? Value::integer(x + y) : Value::number(dx + dy);
    if (op == "-") return ints ? Value::integer(x - y) : Value::number(dx - dy);
    if (op == "*") return ints ? Value::integer(x * y) : Value::number(dx * dy);
    if ((op == "/" || op == "//" || op == "%") && dy == 0) error("division by zero");
    if (op == "/") return Value::number(dx / dy);
    if (op == "//") {
      if (ints)
        return Value::integer(
            static_cast<int64_t>(std::floor(static_cast<double>(x) / static_cast<double>(y))));
      return Value::number(std::floor(dx / dy));
    }
    if (op == "%") {
      if (ints) return Value::integer(((x % y) + y) % y);
      return Value::number(dx - dy * std::floor(dx / dy));
    }
    if (op == "**") {
      if (ints && y >= 0)
        return Value::integer(
            static_cast<int64_t>(std::pow(static_cast<double>(x), static_cast<double>(y))));
      return Value::number(std::pow(dx, dy));
    }
    error(fmt::format("unsupported operator {}", op));
  }
};

// Every filter and test the template names must be one this engine has (checked when the
// template is read, so a server refuses it at start-up).
void check_names(const Expr& e) {
  if (e.kind == Expr::Kind::filter && !filter_names().count(e.name))
    fail(e.line, fmt::format("the filter '{}' is not supported", e.name));
  if (e.kind == Expr::Kind::test && !test_names().count(e.name))
    fail(e.line, fmt::format("the test '{}' is not supported", e.name));
  if (e.kind == Expr::Kind::filter && e.name == "map" && !e.args.empty()) {
    if (e.args.size() > 1 && e.args[1]->kind == Expr::Kind::literal &&
        e.args[1]->value.is(K::string) && !filter_names().count(e.args[1]->value.s))
      fail(e.line, fmt::format("the filter '{}' is not supported", e.args[1]->value.s));
  }
  for (const auto& a : e.args)
    if (a) check_names(*a);
  for (const auto& [k, a] : e.kwargs)
    if (a) check_names(*a);
}

void check_names(const Node& n) {
  if (n.expr) check_names(*n.expr);
  if (n.loop_filter) check_names(*n.loop_filter);
  for (const auto& [c, b] : n.branches) {
    if (c) check_names(*c);
    for (const auto& x : b) check_names(*x);
  }
  for (const auto& x : n.body) check_names(*x);
  for (const auto& x : n.else_body) check_names(*x);
  for (const auto& [k, d] : n.params)
    if (d) check_names(*d);
}

}  // namespace

Template::Template(const std::string& source) {
  std::unique_ptr<Node> root = parse(source);
  check_names(*root);
  root_ = std::move(root);
}

Template::~Template() = default;
Template::Template(Template&&) noexcept = default;
Template& Template::operator=(Template&&) noexcept = default;

std::string Template::render(const Json& context) const {
  Interp in;
  auto globals = std::make_shared<Interp::Frame>();
  globals->vars["range"] = Value::function([](Args& a, Kwargs&) {
    int64_t start = 0, stop = 0, step = 1;
    for (const Value& x : a)
      if (!x.is(K::integer)) error("range takes integers");
    if (a.size() == 1) {
      stop = a[0].i;
    } else if (a.size() >= 2) {
      start = a[0].i;
      stop = a[1].i;
      if (a.size() == 3) step = a[2].i;
    } else {
      error("range needs 1 to 3 integers");
    }
    if (step == 0) error("range step cannot be zero");
    List l;
    for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step) {
      l.push_back(Value::integer(i));
      if (l.size() > 1000000) error("range is too long");
    }
    return Value::of_list(std::move(l));
  });
  globals->vars["namespace"] = Value::function([](Args& a, Kwargs& kw) {
    Dict d;
    for (const Value& x : a)
      if (x.is(K::dict))
        for (const auto& e : *x.dict) d.push_back(e);
    for (auto& [k, v] : kw) d.emplace_back(k, v);
    return Value::of_dict(std::move(d), K::ns);
  });
  globals->vars["dict"] = Value::function([](Args&, Kwargs& kw) {
    Dict d(kw.begin(), kw.end());
    return Value::of_dict(std::move(d));
  });
  globals->vars["raise_exception"] = Value::function([](Args& a, Kwargs&) -> Value {
    throw Error(fmt::format("chat template: {}", a.empty() ? std::string("error") : to_str(a[0])));
  });
  globals->vars["strftime_now"] = Value::function([](Args& a, Kwargs&) {
    if (a.empty() || !a[0].is(K::string)) error("strftime_now needs a format");
    const std::time_t t = std::time(nullptr);
    std::tm tm{};
    localtime_r(&t, &tm);
    char buf[256];
    const size_t n = std::strftime(buf, sizeof buf, a[0].s.c_str(), &tm);
    return Value::string(std::string(buf, n));
  });
  auto frame = std::make_shared<Interp::Frame>();
  frame->parent = globals;
  if (!context.is_object()) throw Error("chat template: the context must be a JSON object");
  for (auto it = context.begin(); it != context.end(); ++it)
    frame->vars[it.key()] = Value::from_json(it.value());
  std::string out;
  in.exec(root_->body, frame, out);
  return out;
}

}  // namespace moe::jinja
