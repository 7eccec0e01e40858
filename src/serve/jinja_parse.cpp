// Chat templates: the parser (statements, and expressions with Jinja2's precedence). See
// moe/jinja.h.
#include <fmt/core.h>

#include "jinja_impl.h"

namespace moe::jinja {

namespace {

// ---------------------------------------------------------------------------------------------
// Expressions

class ExprParser {
 public:
  ExprParser(const std::vector<Tok>& toks, size_t pos = 0) : t_(toks), p_(pos) {}

  ExprPtr expression() {  // a if b else c
    // Nesting is bounded, so that no template can exhaust the stack.
    if (++depth_ > kMaxDepth) fail(peek().line, "expressions nested too deeply");
    struct Leave {
      int& d;
      ~Leave() { --d; }
    } leave{depth_};
    ExprPtr e = or_expr();
    if (is_name("if")) {
      ++p_;
      auto c = node(Expr::Kind::cond);
      c->args.push_back(std::move(e));
      c->args.push_back(or_expr());
      if (is_name("else")) {
        ++p_;
        c->args.push_back(expression());
      } else {
        c->args.push_back(nullptr);
      }
      return c;
    }
    return e;
  }

  // An expression or an unparenthesized tuple ("a, b").
  ExprPtr tuple_or_expression() {
    ExprPtr e = expression();
    if (!is_op(",")) return e;
    auto t = node(Expr::Kind::tuple);
    t->args.push_back(std::move(e));
    while (is_op(",")) {
      ++p_;
      if (at_end()) break;
      t->args.push_back(expression());
    }
    return t;
  }

  // `for` targets and their iterable need "in" not to be read as an operator.
  ExprPtr or_expr() {
    ExprPtr e = and_expr();
    while (is_name("or")) {
      ++p_;
      e = binary("or", std::move(e), and_expr());
    }
    return e;
  }

  const Tok& peek() const { return t_[p_]; }
  size_t pos() const { return p_; }
  void skip() { ++p_; }
  bool at_end() const { return t_[p_].kind == Tok::Kind::end; }
  bool is_name(const char* n) const { return t_[p_].kind == Tok::Kind::name && t_[p_].s == n; }
  bool is_op(const char* o) const { return t_[p_].kind == Tok::Kind::op && t_[p_].s == o; }
  void expect_op(const char* o) {
    if (!is_op(o)) fail(peek().line, fmt::format("expected '{}', found {}", o, describe(peek())));
    ++p_;
  }
  std::string expect_name() {
    if (peek().kind != Tok::Kind::name)
      fail(peek().line, fmt::format("expected a name, found {}", describe(peek())));
    return t_[p_++].s;
  }
  void expect_end() {
    if (!at_end()) fail(peek().line, fmt::format("unexpected {}", describe(peek())));
  }
  static std::string describe(const Tok& t) {
    switch (t.kind) {
      case Tok::Kind::end: return "the end of the tag";
      case Tok::Kind::string: return "a string";
      case Tok::Kind::integer:
      case Tok::Kind::number: return "a number";
      default: return "'" + t.s + "'";
    }
  }

 private:
  ExprPtr node(Expr::Kind k) {
    auto e = std::make_unique<Expr>();
    e->kind = k;
    e->line = t_[p_ > 0 ? p_ - 1 : 0].line;
    return e;
  }
  ExprPtr binary(std::string op, ExprPtr a, ExprPtr b) {
    auto e = node(Expr::Kind::binary);
    e->name.swap(op);
    e->args.push_back(std::move(a));
    e->args.push_back(std::move(b));
    return e;
  }

  ExprPtr and_expr() {
    ExprPtr e = not_expr();
    while (is_name("and")) {
      ++p_;
      e = binary("and", std::move(e), not_expr());
    }
    return e;
  }
  ExprPtr not_expr() {
    if (is_name("not")) {
      ++p_;
      auto e = node(Expr::Kind::unary);
      e->name = "not";
      e->args.push_back(not_expr());
      return e;
    }
    return compare();
  }
  ExprPtr compare() {
    ExprPtr first = math1();
    auto chain = node(Expr::Kind::compare);
    chain->args.push_back(std::move(first));
    for (;;) {
      const char* op = nullptr;
      for (const char* o : {"==", "!=", "<", "<=", ">", ">="})
        if (is_op(o)) op = o;
      if (op) {
        ++p_;
      } else if (is_name("in")) {
        op = "in";
        ++p_;
      } else if (is_name("not") && t_[p_ + 1].kind == Tok::Kind::name && t_[p_ + 1].s == "in") {
        op = "not in";
        p_ += 2;
      } else {
        if (chain->ops.empty()) return std::move(chain->args[0]);
        return chain;
      }
      chain->ops.push_back(op);
      chain->args.push_back(math1());
    }
  }
  ExprPtr math1() {
    ExprPtr e = concat();
    while (is_op("+") || is_op("-")) {
      const std::string op = t_[p_++].s;
      e = binary(op, std::move(e), concat());
    }
    return e;
  }
  ExprPtr concat() {
    ExprPtr e = math2();
    while (is_op("~")) {
      ++p_;
      e = binary("~", std::move(e), math2());
    }
    return e;
  }
  ExprPtr math2() {
    ExprPtr e = power();
    for (;;) {
      const char* op = nullptr;
      for (const char* o : {"*", "/", "//", "%"})
        if (is_op(o)) op = o;
      if (!op) return e;
      ++p_;
      e = binary(op, std::move(e), power());
    }
  }
  ExprPtr power() {
    ExprPtr e = unary();
    while (is_op("**")) {
      ++p_;
      e = binary("**", std::move(e), unary());
    }
    return e;
  }
  ExprPtr unary(bool with_filter = true) {
    if (++depth_ > kMaxDepth) fail(peek().line, "expressions nested too deeply");
    struct Leave {
      int& d;
      ~Leave() { --d; }
    } leave{depth_};
    ExprPtr e;
    if (is_op("-") || is_op("+")) {
      auto u = node(Expr::Kind::unary);
      u->name = t_[p_++].s;
      u->args.push_back(unary(false));
      e = std::move(u);
    } else {
      e = primary();
    }
    e = postfix(std::move(e));
    if (with_filter) e = filters(std::move(e));
    return e;
  }

  ExprPtr primary() {
    const Tok& t = peek();
    ++p_;
    auto e = node(Expr::Kind::literal);
    switch (t.kind) {
      case Tok::Kind::string: {
        std::string s = t.s;
        while (peek().kind == Tok::Kind::string) s += t_[p_++].s;  // adjacent strings join
        e->value = Value::string(s);
        return e;
      }
      case Tok::Kind::integer: e->value = Value::integer(t.i); return e;
      case Tok::Kind::number: e->value = Value::number(t.d); return e;
      case Tok::Kind::name:
        if (t.s == "true" || t.s == "True") {
          e->value = Value::boolean(true);
        } else if (t.s == "false" || t.s == "False") {
          e->value = Value::boolean(false);
        } else if (t.s == "none" || t.s == "None") {
          e->value = Value::none();
        } else {
          e->kind = Expr::Kind::name;
          e->name = t.s;
        }
        return e;
      case Tok::Kind::op:
        if (t.s == "(") {
          if (is_op(")")) {
            ++p_;
            e->kind = Expr::Kind::tuple;
            return e;
          }
          ExprPtr inner = expression();
          if (is_op(",")) {
            auto tup = node(Expr::Kind::tuple);
            tup->args.push_back(std::move(inner));
            while (is_op(",")) {
              ++p_;
              if (is_op(")")) break;
              tup->args.push_back(expression());
            }
            inner = std::move(tup);
          }
          expect_op(")");
          return inner;
        }
        if (t.s == "[") {
          e->kind = Expr::Kind::list;
          while (!is_op("]")) {
            e->args.push_back(expression());
            if (!is_op(",")) break;
            ++p_;
          }
          expect_op("]");
          return e;
        }
        if (t.s == "{") {
          e->kind = Expr::Kind::dict;
          while (!is_op("}")) {
            e->args.push_back(expression());
            expect_op(":");
            e->args.push_back(expression());
            if (!is_op(",")) break;
            ++p_;
          }
          expect_op("}");
          return e;
        }
        break;
      case Tok::Kind::end: break;
    }
    fail(t.line, fmt::format("unexpected {} in an expression", describe(t)));
  }

  ExprPtr postfix(ExprPtr e) {
    for (;;) {
      if (is_op(".")) {
        ++p_;
        auto a = node(Expr::Kind::attr);
        if (peek().kind == Tok::Kind::integer) {  // foo.0 is foo[0]
          a->kind = Expr::Kind::item;
          a->args.push_back(std::move(e));
          auto idx = node(Expr::Kind::literal);
          idx->value = Value::integer(t_[p_++].i);
          a->args.push_back(std::move(idx));
        } else {
          a->name = expect_name();
          a->args.push_back(std::move(e));
        }
        e = std::move(a);
      } else if (is_op("[")) {
        ++p_;
        e = subscript(std::move(e));
      } else if (is_op("(")) {
        e = call(std::move(e));
      } else {
        return e;
      }
    }
  }

  ExprPtr subscript(ExprPtr base) {
    std::vector<ExprPtr> parts;
    bool is_slice = false;
    for (int k = 0; k < 3; ++k) {
      if (is_op(":")) {
        parts.push_back(nullptr);
      } else if (is_op("]")) {
        parts.push_back(nullptr);
        break;
      } else {
        parts.push_back(expression());
      }
      if (!is_op(":")) break;
      is_slice = true;
      ++p_;
    }
    expect_op("]");
    auto e = node(is_slice ? Expr::Kind::slice : Expr::Kind::item);
    e->args.push_back(std::move(base));
    if (!is_slice) {
      if (!parts[0]) fail(e->line, "an empty subscript []");
      e->args.push_back(std::move(parts[0]));
      return e;
    }
    parts.resize(3);
    for (auto& part : parts) e->args.push_back(std::move(part));
    return e;
  }

  // "(" args ")" after a callee or a filter or test name: positional, then name=value.
  void arguments(Expr& e) {
    expect_op("(");
    while (!is_op(")")) {
      if (peek().kind == Tok::Kind::name && t_[p_ + 1].kind == Tok::Kind::op &&
          t_[p_ + 1].s == "=") {
        std::string k = t_[p_].s;
        p_ += 2;
        e.kwargs.emplace_back(k, expression());
      } else {
        if (!e.kwargs.empty()) fail(peek().line, "a positional argument after a keyword argument");
        e.args.push_back(expression());
      }
      if (!is_op(",")) break;
      ++p_;
    }
    expect_op(")");
  }

  ExprPtr call(ExprPtr callee) {
    auto e = node(Expr::Kind::call);
    e->args.push_back(std::move(callee));
    arguments(*e);
    return e;
  }

  ExprPtr filters(ExprPtr e) {
    for (;;) {
      if (is_op("|")) {
        ++p_;
        auto f = node(Expr::Kind::filter);
        f->name = expect_name();
        f->args.push_back(std::move(e));
        if (is_op("(")) arguments(*f);
        e = std::move(f);
      } else if (is_name("is")) {
        ++p_;
        auto t = node(Expr::Kind::test);
        if (is_name("not")) {
          t->negate = true;
          ++p_;
        }
        // Tests named like keywords (none, true, false) come as names too.
        t->name = expect_name();
        t->args.push_back(std::move(e));
        if (is_op("(")) {
          arguments(*t);
        } else if (!at_end() &&
                   (peek().kind == Tok::Kind::string || peek().kind == Tok::Kind::integer ||
                    is_op("[") || is_op("{") || peek().kind == Tok::Kind::number ||
                    (peek().kind == Tok::Kind::name && !is_name("and") && !is_name("or") &&
                     !is_name("else") && !is_name("if") && !is_name("in") && !is_name("not")))) {
          t->args.push_back(primary());  // "x is divisibleby 3", "x is sameas y"
        }
        e = std::move(t);
      } else {
        return e;
      }
    }
  }

  const std::vector<Tok>& t_;
  size_t p_;
  int depth_ = 0;
  static constexpr int kMaxDepth = 200;
};

// ---------------------------------------------------------------------------------------------
// Statements

class Parser {
 public:
  explicit Parser(std::vector<Piece> pieces) : pieces_(std::move(pieces)) {}

  std::unique_ptr<Node> root() {
    auto n = std::make_unique<Node>();
    n->kind = Node::Kind::text;  // the root is a sequence: its body
    std::string end;
    n->body = body({}, end);
    return n;
  }

 private:
  // Nodes up to one of the `ends` keywords (whose tag is left in end_piece_).
  std::vector<NodePtr> body(const std::vector<std::string>& ends, std::string& found) {
    if (++depth_ > 200)
      fail(i_ < pieces_.size() ? pieces_[i_].line : 0, "statements nested too deeply");
    struct Leave {
      int& d;
      ~Leave() { --d; }
    } leave{depth_};
    std::vector<NodePtr> out;
    while (i_ < pieces_.size()) {
      Piece& pc = pieces_[i_];
      if (pc.kind == Piece::Kind::text) {
        auto n = std::make_unique<Node>();
        n->kind = Node::Kind::text;
        n->text = pc.text;
        n->line = pc.line;
        out.push_back(std::move(n));
        ++i_;
        continue;
      }
      if (pc.kind == Piece::Kind::var) {
        ExprParser ep(pc.toks);
        auto n = std::make_unique<Node>();
        n->kind = Node::Kind::output;
        n->line = pc.line;
        n->expr = ep.tuple_or_expression();
        ep.expect_end();
        out.push_back(std::move(n));
        ++i_;
        continue;
      }
      if (pc.toks.empty() || pc.toks[0].kind != Tok::Kind::name)
        fail(pc.line, "a {% %} tag without a statement");
      const std::string kw = pc.toks[0].s;
      for (const std::string& e : ends)
        if (kw == e) {
          found = kw;
          return out;
        }
      ++i_;
      if (kw == "if") {
        out.push_back(if_stmt(pc));
      } else if (kw == "for") {
        out.push_back(for_stmt(pc));
      } else if (kw == "set") {
        out.push_back(set_stmt(pc));
      } else if (kw == "macro") {
        out.push_back(macro_stmt(pc));
      } else if (kw == "break" || kw == "continue") {
        if (loops_ == 0) fail(pc.line, fmt::format("'{}' outside a for loop", kw));
        auto n = std::make_unique<Node>();
        n->kind = kw == "break" ? Node::Kind::break_ : Node::Kind::continue_;
        n->line = pc.line;
        out.push_back(std::move(n));
      } else if (kw == "generation") {  // transformers' marker of assistant text: no output
        std::string end;
        auto inner = body({"endgeneration"}, end);
        if (end.empty()) fail(pc.line, "{% generation %} is never closed");
        ++i_;
        for (auto& n : inner) out.push_back(std::move(n));
      } else if (kw == "endif" || kw == "endfor" || kw == "endset" || kw == "endmacro" ||
                 kw == "else" || kw == "elif" || kw == "endgeneration") {
        fail(pc.line, fmt::format("'{}' without its opening statement", kw));
      } else {
        fail(pc.line, fmt::format("the statement '{{% {} %}}' is not supported", kw));
      }
    }
    if (!ends.empty()) found.clear();
    return out;
  }

  NodePtr if_stmt(Piece& pc) {
    auto n = std::make_unique<Node>();
    n->kind = Node::Kind::if_;
    n->line = pc.line;
    ExprParser ep(pc.toks, 1);
    ExprPtr cond = ep.expression();
    ep.expect_end();
    for (;;) {
      std::string end;
      auto b = body({"elif", "else", "endif"}, end);
      if (end.empty()) fail(pc.line, "{% if %} is never closed by {% endif %}");
      n->branches.emplace_back(std::move(cond), std::move(b));
      Piece& e = pieces_[i_++];
      if (end == "endif") {
        ExprParser(e.toks, 1).expect_end();
        return n;
      }
      if (end == "else") {
        ExprParser(e.toks, 1).expect_end();
        std::string end2;
        auto eb = body({"endif"}, end2);
        if (end2.empty()) fail(pc.line, "{% if %} is never closed by {% endif %}");
        ++i_;
        n->branches.emplace_back(nullptr, std::move(eb));
        return n;
      }
      ExprParser ep2(e.toks, 1);
      cond = ep2.expression();
      ep2.expect_end();
    }
  }

  NodePtr for_stmt(Piece& pc) {
    auto n = std::make_unique<Node>();
    n->kind = Node::Kind::for_;
    n->line = pc.line;
    ExprParser ep(pc.toks, 1);
    n->targets.push_back(ep.expect_name());
    while (ep.is_op(",")) {
      ep.skip();
      n->targets.push_back(ep.expect_name());
    }
    if (!ep.is_name("in")) fail(pc.line, "expected 'in' in the for statement");
    ep.skip();
    n->expr = ep.or_expr();
    if (ep.is_name("if")) {
      ep.skip();
      n->loop_filter = ep.or_expr();
    }
    if (ep.is_name("recursive")) fail(pc.line, "recursive for loops are not supported");
    ep.expect_end();
    ++loops_;
    std::string end;
    n->body = body({"else", "endfor"}, end);
    if (end.empty()) fail(pc.line, "{% for %} is never closed by {% endfor %}");
    --loops_;
    if (end == "else") {
      ++i_;
      n->else_body = body({"endfor"}, end);
      if (end.empty()) fail(pc.line, "{% for %} is never closed by {% endfor %}");
    }
    ++i_;
    return n;
  }

  NodePtr set_stmt(Piece& pc) {
    auto n = std::make_unique<Node>();
    n->line = pc.line;
    ExprParser ep(pc.toks, 1);
    n->targets.push_back(ep.expect_name());
    if (ep.is_op(".")) {
      ep.skip();
      n->targets.push_back(ep.expect_name());  // ns.attr
    } else {
      while (ep.is_op(",")) {  // a, b = ...: unpacking, marked by a leading empty target
        ep.skip();
        if (n->targets.front() != "") n->targets.insert(n->targets.begin(), "");
        n->targets.push_back(ep.expect_name());
      }
    }
    if (ep.at_end()) {  // {% set x %}...{% endset %}
      if (n->targets.size() != 1) fail(pc.line, "a block set takes one name");
      n->kind = Node::Kind::set_block;
      std::string end;
      n->body = body({"endset"}, end);
      if (end.empty()) fail(pc.line, "{% set %} is never closed by {% endset %}");
      ++i_;
      return n;
    }
    n->kind = Node::Kind::set;
    ep.expect_op("=");
    n->expr = ep.tuple_or_expression();
    ep.expect_end();
    return n;
  }

  NodePtr macro_stmt(Piece& pc) {
    auto n = std::make_unique<Node>();
    n->kind = Node::Kind::macro;
    n->line = pc.line;
    ExprParser ep(pc.toks, 1);
    n->macro_name = ep.expect_name();
    ep.expect_op("(");
    while (!ep.is_op(")")) {
      std::string name = ep.expect_name();
      ExprPtr def;
      if (ep.is_op("=")) {
        ep.skip();
        def = ep.expression();
      }
      n->params.emplace_back(name, std::move(def));
      if (!ep.is_op(",")) break;
      ep.skip();
    }
    ep.expect_op(")");
    ep.expect_end();
    const int saved = loops_;
    loops_ = 0;
    std::string end;
    n->body = body({"endmacro"}, end);
    loops_ = saved;
    if (end.empty()) fail(pc.line, "{% macro %} is never closed by {% endmacro %}");
    ++i_;
    return n;
  }

  std::vector<Piece> pieces_;
  size_t i_ = 0;
  int loops_ = 0;
  int depth_ = 0;
};

}  // namespace

std::unique_ptr<Node> parse(const std::string& source) { return Parser(lex(source)).root(); }

}  // namespace moe::jinja
