// Chat templates: the lexer. Text, {{ }}, {% %} and {# #}, with Jinja2's whitespace control
// under trim_blocks and lstrip_blocks ("-" and "+" markers, one trailing newline dropped), and
// the tokens of each tag. See moe/jinja.h.
#include <fmt/core.h>

#include <cctype>
#include <cstring>

#include "jinja_impl.h"
#include "moe/error.h"

namespace moe::jinja {

void fail(int line, const std::string& what) {
  throw Error(fmt::format("chat template, line {}: {}", line, what));
}

namespace {

bool is_space(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v';
}

std::string rstrip_ws(const std::string& s) {
  size_t n = s.size();
  while (n > 0 && is_space(s[n - 1])) --n;
  return s.substr(0, n);
}

// Python's string escapes, as Jinja2 reads a string literal.
void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

class Lexer {
 public:
  explicit Lexer(std::string src) : src_(std::move(src)) {
    // Jinja2 reads "\r\n" and "\r" as "\n" and drops one trailing newline.
    std::string norm;
    norm.reserve(src_.size());
    for (size_t i = 0; i < src_.size(); ++i) {
      if (src_[i] == '\r') {
        norm += '\n';
        if (i + 1 < src_.size() && src_[i + 1] == '\n') ++i;
      } else {
        norm += src_[i];
      }
    }
    if (!norm.empty() && norm.back() == '\n') norm.pop_back();
    src_ = std::move(norm);
  }

  std::vector<Piece> run() {
    std::vector<Piece> out;
    size_t pos = 0;
    for (;;) {
      size_t at = pos;
      while ((at = src_.find('{', at)) != std::string::npos) {
        if (at + 1 < src_.size() &&
            (src_[at + 1] == '{' || src_[at + 1] == '%' || src_[at + 1] == '#'))
          break;
        ++at;
      }
      if (at == std::string::npos) {
        if (pos < src_.size())
          out.push_back({Piece::Kind::text, src_.substr(pos), {}, line_at(pos)});
        return out;
      }
      const char type = src_[at + 1];
      const char sign = at + 2 < src_.size() ? src_[at + 2] : '\0';
      std::string text = src_.substr(pos, at - pos);
      const bool line_starting = pos == 0 || src_[pos - 1] == '\n';
      if (sign == '-') {
        text = rstrip_ws(text);
      } else if (sign != '+' && type != '{') {  // lstrip_blocks: blocks and comments
        const size_t l_pos = text.rfind('\n') == std::string::npos ? 0 : text.rfind('\n') + 1;
        if ((l_pos > 0 || line_starting) && l_pos < text.size()) {
          bool blank = true;
          for (size_t i = l_pos; i < text.size(); ++i) blank = blank && is_space(text[i]);
          if (blank) text.resize(l_pos);
        }
      }
      if (!text.empty()) out.push_back({Piece::Kind::text, text, {}, line_at(pos)});
      size_t p = at + 2 + ((sign == '-' || sign == '+') ? 1 : 0);
      const int line = line_at(at);
      if (type == '#') {
        const size_t end = src_.find("#}", p);
        if (end == std::string::npos) fail(line, "a comment {# is never closed");
        pos = after_tag(end + 2, end > p && src_[end - 1] == '-', true);
        continue;
      }
      Piece piece{type == '{' ? Piece::Kind::var : Piece::Kind::block, {}, {}, line};
      After after = After::normal;
      p = tokens(p, type == '{' ? '}' : '%', piece.toks, after, line);
      pos = after_tag(p, after == After::strip, type == '%' && after != After::keep);
      if (piece.kind == Piece::Kind::block && piece.toks.size() == 2 &&
          piece.toks[0].kind == Tok::Kind::name && piece.toks[0].s == "raw") {
        pos = raw(pos, out, line);
        continue;
      }
      out.push_back(std::move(piece));
    }
  }

 private:
  int line_at(size_t pos) {
    while (counted_ < pos && counted_ < src_.size()) {
      if (src_[counted_] == '\n') ++line_;
      ++counted_;
    }
    return line_;
  }

  // Past a closing delimiter: "-" strips all whitespace after it; trim_blocks removes the one
  // newline after a block or comment tag.
  size_t after_tag(size_t p, bool strip, bool trim) {
    if (strip) {
      while (p < src_.size() && is_space(src_[p])) ++p;
    } else if (trim && p < src_.size() && src_[p] == '\n') {
      ++p;
    }
    return p;
  }

  // {% raw %} ... {% endraw %}: the text between, as it is.
  size_t raw(size_t pos, std::vector<Piece>& out, int line) {
    for (size_t at = src_.find("{%", pos); at != std::string::npos; at = src_.find("{%", at + 2)) {
      size_t p = at + 2;
      const bool minus = p < src_.size() && src_[p] == '-';
      if (minus || (p < src_.size() && src_[p] == '+')) ++p;
      while (p < src_.size() && is_space(src_[p])) ++p;
      if (src_.compare(p, 6, "endraw") != 0) continue;
      p += 6;
      while (p < src_.size() && is_space(src_[p])) ++p;
      bool strip = false;
      if (p < src_.size() && src_[p] == '-') {
        strip = true;
        ++p;
      }
      if (src_.compare(p, 2, "%}") != 0) continue;
      std::string text = src_.substr(pos, at - pos);
      if (minus) text = rstrip_ws(text);
      if (!text.empty()) out.push_back({Piece::Kind::text, text, {}, line});
      return after_tag(p + 2, strip, true);
    }
    fail(line, "{% raw %} is never closed by {% endraw %}");
  }

  // The tokens of an expression or statement up to its closing "}}" or "%}" (outside brackets);
  // returns the position after it.
  enum class After { normal, strip, keep };
  size_t tokens(size_t p, char close, std::vector<Tok>& toks, After& after, int line) {
    int depth = 0;
    for (;;) {
      while (p < src_.size() && is_space(src_[p])) ++p;
      if (p >= src_.size()) fail(line, close == '}' ? "{{ is never closed" : "{% is never closed");
      const char c = src_[p];
      const int tl = line_at(p);
      if (depth == 0) {
        // "}}" or "%}", or "-}}" / "-%}" (strip the whitespace after), or "+%}" (keep the
        // newline trim_blocks would remove).
        const bool sign = c == '-' || (c == '+' && close == '%');
        const size_t q = sign ? p + 1 : p;
        if (q + 1 < src_.size() && src_[q] == close && src_[q + 1] == '}') {
          after = c == '-' ? After::strip : c == '+' ? After::keep : After::normal;
          toks.push_back({Tok::Kind::end, {}, 0, 0, tl});
          return q + 2;
        }
      }
      if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') {
        size_t e = p;
        while (e < src_.size() &&
               (std::isalnum(static_cast<unsigned char>(src_[e])) || src_[e] == '_'))
          ++e;
        toks.push_back({Tok::Kind::name, src_.substr(p, e - p), 0, 0, tl});
        p = e;
      } else if (std::isdigit(static_cast<unsigned char>(c))) {
        size_t e = p;
        bool real = false;
        while (e < src_.size() &&
               (std::isdigit(static_cast<unsigned char>(src_[e])) || src_[e] == '_'))
          ++e;
        if (e + 1 < src_.size() && src_[e] == '.' &&
            std::isdigit(static_cast<unsigned char>(src_[e + 1]))) {
          real = true;
          ++e;
          while (e < src_.size() && std::isdigit(static_cast<unsigned char>(src_[e]))) ++e;
        }
        if (e < src_.size() && (src_[e] == 'e' || src_[e] == 'E')) {
          size_t f = e + 1;
          if (f < src_.size() && (src_[f] == '+' || src_[f] == '-')) ++f;
          if (f < src_.size() && std::isdigit(static_cast<unsigned char>(src_[f]))) {
            real = true;
            e = f;
            while (e < src_.size() && std::isdigit(static_cast<unsigned char>(src_[e]))) ++e;
          }
        }
        std::string num;
        for (size_t k = p; k < e; ++k)
          if (src_[k] != '_') num += src_[k];
        Tok t{real ? Tok::Kind::number : Tok::Kind::integer, num, 0, 0, tl};
        try {
          if (real)
            t.d = std::stod(num);
          else
            t.i = std::stoll(num);
        } catch (const std::exception&) {
          fail(tl, fmt::format("the number {} is out of range", num));
        }
        toks.push_back(t);
        p = e;
      } else if (c == '\'' || c == '"') {
        std::string s;
        size_t e = p + 1;
        for (;; ++e) {
          if (e >= src_.size()) fail(tl, "a string is never closed");
          if (src_[e] == c) break;
          if (src_[e] != '\\' || e + 1 >= src_.size()) {
            s += src_[e];
            continue;
          }
          const char x = src_[++e];
          switch (x) {
            case 'n': s += '\n'; break;
            case 't': s += '\t'; break;
            case 'r': s += '\r'; break;
            case '0': s += '\0'; break;
            case 'a': s += '\a'; break;
            case 'b': s += '\b'; break;
            case 'f': s += '\f'; break;
            case 'v': s += '\v'; break;
            case '\\': s += '\\'; break;
            case '\'': s += '\''; break;
            case '"': s += '"'; break;
            case '\n': break;
            case 'x':
            case 'u':
            case 'U': {
              const size_t n = x == 'x' ? 2 : x == 'u' ? 4 : 8;
              if (e + n >= src_.size()) fail(tl, "a \\x, \\u or \\U escape is cut short");
              uint32_t cp = 0;
              for (size_t k = 1; k <= n; ++k) {
                const char h = src_[e + k];
                if (!std::isxdigit(static_cast<unsigned char>(h)))
                  fail(tl, "a bad hexadecimal escape");
                cp = cp * 16 + static_cast<uint32_t>(std::isdigit(static_cast<unsigned char>(h))
                                                         ? h - '0'
                                                         : std::tolower(h) - 'a' + 10);
              }
              append_utf8(s, cp);
              e += n;
              break;
            }
            default:  // Python keeps an unknown escape as written
              s += '\\';
              s += x;
          }
        }
        toks.push_back({Tok::Kind::string, s, 0, 0, tl});
        p = e + 1;
      } else {
        static const char* const ops[] = {"//", "**", "==", "!=", "<=", ">=", "+", "-", "*",
                                          "/",  "%",  "~",  "<",  ">",  "=",  "(", ")", "[",
                                          "]",  "{",  "}",  ",",  ".",  ":",  "|"};
        const char* op = nullptr;
        for (const char* o : ops)
          if (src_.compare(p, std::strlen(o), o) == 0) {
            op = o;
            break;
          }
        if (!op) fail(tl, fmt::format("unexpected character '{}'", c));
        if (std::strchr("([{", op[0]) && op[1] == '\0') ++depth;
        if (std::strchr(")]}", op[0]) && op[1] == '\0') --depth;
        toks.push_back({Tok::Kind::op, op, 0, 0, tl});
        p += std::strlen(op);
      }
    }
  }

  std::string src_;
  size_t counted_ = 0;
  int line_ = 1;
};

}  // namespace

std::vector<Piece> lex(const std::string& source) { return Lexer(source).run(); }

}  // namespace moe::jinja
