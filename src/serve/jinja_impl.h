// The chat-template engine's insides (moe/jinja.h): values with Python's semantics, the syntax
// tree the parser (jinja_parse.cpp) builds and the interpreter (jinja_eval.cpp) walks.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "moe/jinja.h"

namespace moe::jinja {

struct Value;
using List = std::vector<Value>;
using Dict = std::vector<std::pair<std::string, Value>>;  // in insertion order, as Python's
using Args = std::vector<Value>;
using Kwargs = std::vector<std::pair<std::string, Value>>;
using Function = std::function<Value(Args&, Kwargs&)>;

// A value as the template sees it: Python's None, bool, int, float, str, list and dict, plus
// Jinja's undefined, callables (macros, methods, globals) and namespace() objects. Lists, dicts
// and namespaces are shared, as Python's references are.
struct Value {
  enum class Kind { undefined, none, boolean, integer, number, string, list, dict, function, ns };
  Kind kind = Kind::undefined;
  bool b = false;
  int64_t i = 0;
  double d = 0;
  std::string s;                   // string; for undefined, the name that was missing
  std::shared_ptr<List> list;      // list (tuples too)
  bool tuple = false;              // a list that prints as a tuple
  std::shared_ptr<Dict> dict;      // dict and namespace
  std::shared_ptr<Function> func;  // function

  static Value none() { return make(Kind::none); }
  static Value boolean(bool v) {
    Value x = make(Kind::boolean);
    x.b = v;
    return x;
  }
  static Value integer(int64_t v) {
    Value x = make(Kind::integer);
    x.i = v;
    return x;
  }
  static Value number(double v) {
    Value x = make(Kind::number);
    x.d = v;
    return x;
  }
  static Value string(std::string v) {
    Value x = make(Kind::string);
    x.s = std::move(v);
    return x;
  }
  static Value undefined(std::string name) {
    Value x;
    x.s = std::move(name);
    return x;
  }
  static Value of_list(List v, bool tuple = false) {
    Value x = make(Kind::list);
    x.list = std::make_shared<List>(std::move(v));
    x.tuple = tuple;
    return x;
  }
  static Value of_dict(Dict v, Kind k = Kind::dict) {
    Value x = make(k);
    x.dict = std::make_shared<Dict>(std::move(v));
    return x;
  }
  static Value function(Function f) {
    Value x = make(Kind::function);
    x.func = std::make_shared<Function>(std::move(f));
    return x;
  }
  static Value from_json(const Json& j);

  bool is(Kind k) const { return kind == k; }
  bool defined() const { return kind != Kind::undefined; }
  bool numeric() const {
    return kind == Kind::integer || kind == Kind::number || kind == Kind::boolean;
  }
  double as_double() const {
    return kind == Kind::number ? d : static_cast<double>(kind == Kind::boolean ? b : i);
  }
  const Value* find(const std::string& key) const;  // a dict's or namespace's entry, or null

 private:
  static Value make(Kind k) {
    Value x;
    x.kind = k;
    return x;
  }
};

bool truthy(const Value& v);
bool equal(const Value& a, const Value& b);
std::string to_str(const Value& v);   // Python's str()
std::string to_repr(const Value& v);  // Python's repr()
// transformers' tojson: json.dumps(v, ensure_ascii=False, indent=indent, sort_keys=...).
std::string to_json(const Value& v, int indent, bool sort_keys, int depth = 0);

// ---------------------------------------------------------------------------------------------
// The syntax tree

struct Expr;
using ExprPtr = std::unique_ptr<Expr>;

struct Expr {
  enum class Kind {
    literal,  // value
    name,     // name
    list,     // args
    tuple,    // args
    dict,     // kwargs as (key expression in args[i], value in args[i+1])
    attr,     // args[0].name
    item,     // args[0][args[1]]
    slice,    // args[0][args[1]:args[2]:args[3]] (null parts absent)
    call,     // args[0](args[1..], kwargs)
    filter,   // args[0] | name(args[1..], kwargs)
    test,     // args[0] is [not] name(args[1..])
    unary,    // name ("not", "-", "+") args[0]
    binary,   // args[0] name args[1]: or and == != < <= > >= in "not in" + - * / // % ** ~
    cond,     // args[0] if args[1] else args[2] (args[2] may be null)
    compare,  // a chain as Python's: a < b < c is a < b and b < c
  };
  Kind kind;
  int line = 0;
  Value value;
  std::string name;
  std::vector<ExprPtr> args;
  std::vector<std::pair<std::string, ExprPtr>> kwargs;
  bool negate = false;           // "is not"
  std::vector<std::string> ops;  // compare: args[0] ops[0] args[1] ops[1] args[2] ...
};

struct Template::Node {
  enum class Kind { text, output, if_, for_, set, set_block, macro, break_, continue_ };
  Kind kind;
  int line = 0;
  std::string text;                  // text
  ExprPtr expr;                      // output, set, for (the iterable)
  std::vector<std::string> targets;  // for: loop variables; set: the name (and attribute)
  std::vector<std::pair<ExprPtr, std::vector<std::unique_ptr<Node>>>> branches;  // if
  std::vector<std::unique_ptr<Node>> body, else_body;  // for, set_block, macro, root
  ExprPtr loop_filter;                                 // for ... if COND
  std::string macro_name;
  std::vector<std::pair<std::string, ExprPtr>> params;  // macro parameters and defaults
};
using Node = Template::Node;
using NodePtr = std::unique_ptr<Node>;

// The builtins (jinja_builtins.cpp): iteration as Python's (a list's items, a dict's keys, a
// string's characters), ordering, slicing, attribute and item access as Jinja2's, tests and
// filters by name, and the names of those that exist.
List items_of(const Value& v);
int compare(const Value& a, const Value& b);
Value slice(const Value& v, const Value* start, const Value* stop, const Value* step);
Value get_attr(const Value& v, const std::string& name);
Value get_item(const Value& v, const Value& key);
bool run_test(const std::string& name, const Value& v, Args& args);
Value apply_filter(const std::string& name, const Value& v, Args& args, Kwargs& kwargs);
const std::set<std::string>& filter_names();
const std::set<std::string>& test_names();

// The lexer's output (jinja_lex.cpp): text, and the tokens of each {{ }} and {% %} tag (the
// whitespace rules already applied, comments and raw blocks resolved).
struct Tok {
  enum class Kind { name, string, integer, number, op, end };
  Kind kind = Kind::end;
  std::string s;
  int64_t i = 0;
  double d = 0;
  int line = 0;
};

struct Piece {
  enum class Kind { text, var, block };
  Kind kind;
  std::string text;
  std::vector<Tok> toks;
  int line;
};
std::vector<Piece> lex(const std::string& source);

// Parses a template into its root (a Node whose body is the template).
std::unique_ptr<Node> parse(const std::string& source);

[[noreturn]] void fail(int line, const std::string& what);

}  // namespace moe::jinja
