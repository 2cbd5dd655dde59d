#include "detail/json_reader.hpp"

#include <array>
#include <cmath>
#include <cstdlib>
#include <cstring>

namespace fst::detail {

void JsonReader::skip_ws() {
  while (i_ < s_.size()) {
    char c = s_[i_];
    if (c == ' ' || c == '\n' || c == '\r' || c == '\t') ++i_;
    else break;
  }
}

char JsonReader::peek() {
  skip_ws();
  return i_ < s_.size() ? s_[i_] : '\0';
}

void JsonReader::expect(char c, const char* expected) {
  if (peek() != c) fail(std::string("expected ") + expected);
  ++i_;
}

bool JsonReader::consume(char c) {
  if (peek() != c) return false;
  ++i_;
  return true;
}

void JsonReader::enter() {
  if (--depth_left_ == 0) fail("recursion limit exceeded");
}

bool JsonReader::consume_literal(std::string_view lit) {
  skip_ws();
  if (s_.substr(i_, lit.size()) != lit) return false;
  i_ += lit.size();
  return true;
}

void JsonReader::finish() {
  skip_ws();
  if (i_ != s_.size()) fail("trailing characters");
}

std::uint32_t JsonReader::read_hex4() {
  if (i_ + 4 > s_.size()) fail("EOF while parsing a string");
  std::uint32_t v = 0;
  for (int k = 0; k < 4; ++k) {
    char c = s_[i_++];
    v <<= 4;
    if (c >= '0' && c <= '9') v |= c - '0';
    else if (c >= 'a' && c <= 'f') v |= c - 'a' + 10;
    else if (c >= 'A' && c <= 'F') v |= c - 'A' + 10;
    else fail("invalid escape");
  }
  return v;
}

static void append_utf8(std::string& out, std::uint32_t cp) {
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

void JsonReader::read_string(std::string& out) {
  out.clear();
  ++i_;  // opening quote
  while (true) {
    // Copy the run of plain bytes in one go: the common case for tensor names.
    std::size_t run = i_;
    while (run < s_.size()) {
      unsigned char c = static_cast<unsigned char>(s_[run]);
      if (c == '"' || c == '\\' || c < 0x20) break;
      ++run;
    }
    out.append(s_.data() + i_, run - i_);
    i_ = run;
    if (i_ >= s_.size()) fail("EOF while parsing a string");
    char c = s_[i_++];
    if (c == '"') return;
    if (c != '\\') fail("control character (\\u0000-\\u001F) found while parsing a string");
    if (i_ >= s_.size()) fail("EOF while parsing a string");
    char e = s_[i_++];
    switch (e) {
      case '"': out.push_back('"'); break;
      case '\\': out.push_back('\\'); break;
      case '/': out.push_back('/'); break;
      case 'b': out.push_back('\b'); break;
      case 'f': out.push_back('\f'); break;
      case 'n': out.push_back('\n'); break;
      case 'r': out.push_back('\r'); break;
      case 't': out.push_back('\t'); break;
      case 'u': {
        std::uint32_t cp = read_hex4();
        if (cp >= 0xDC00 && cp <= 0xDFFF) fail("lone trailing surrogate in hex escape");
        if (cp >= 0xD800 && cp <= 0xDBFF) {
          if (i_ + 2 > s_.size() || s_[i_] != '\\' || s_[i_ + 1] != 'u')
            fail("lone leading surrogate in hex escape");
          i_ += 2;
          std::uint32_t lo = read_hex4();
          if (lo < 0xDC00 || lo > 0xDFFF) fail("lone leading surrogate in hex escape");
          cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
        }
        append_utf8(out, cp);
        break;
      }
      default: fail("invalid escape");
    }
  }
}

// serde_json, as the reference builds it (without float_roundtrip), turns every number into
// (significand: u64, exponent: i32) and fails with "number out of range" when
// significand * 10^exponent overflows f64, even in a field that is then ignored. These mirror
// its arithmetic: digits past u64 are dropped (integer ones raise the exponent), and only a
// non-negative exponent can overflow.
static bool serde_number_in_range(std::uint64_t significand, std::int64_t exponent) {
  static const auto pow10 = [] {
    std::array<double, 309> t{};
    for (int k = 0; k < 309; ++k) t[k] = std::strtod(("1e" + std::to_string(k)).c_str(), nullptr);
    return t;
  }();
  if (exponent < 0 || significand == 0) return true;
  if (exponent > 308) return false;
  return !std::isinf(static_cast<double>(significand) * pow10[exponent]);
}

void JsonReader::skip_number() {
  // -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?
  auto digit = [&](std::size_t k) { return k < s_.size() && s_[k] >= '0' && s_[k] <= '9'; };
  std::uint64_t sig = 0;
  std::int64_t exp = 0;
  bool sig_full = false;  // a digit did not fit: later ones are dropped
  auto take = [&](char c) {
    auto d = static_cast<std::uint64_t>(c - '0');
    if (!sig_full && sig <= (UINT64_MAX - d) / 10) {
      sig = sig * 10 + d;
      return true;
    }
    sig_full = true;
    return false;
  };
  if (i_ < s_.size() && s_[i_] == '-') ++i_;
  if (!digit(i_)) fail("invalid number");
  if (s_[i_] == '0') {
    ++i_;
    if (digit(i_)) fail("invalid number");
  } else {
    for (; digit(i_); ++i_)
      if (!take(s_[i_])) ++exp;
  }
  if (i_ < s_.size() && s_[i_] == '.') {
    ++i_;
    if (!digit(i_)) fail("invalid number");
    // serde_json retries the significand on the first fractional digit even after an
    // integer digit overflowed it, then stops at the first one that does not fit.
    sig_full = false;
    for (; digit(i_); ++i_)
      if (take(s_[i_])) --exp;
      else break;
    while (digit(i_)) ++i_;
  }
  if (i_ < s_.size() && (s_[i_] == 'e' || s_[i_] == 'E')) {
    ++i_;
    bool negative = false;
    if (i_ < s_.size() && (s_[i_] == '+' || s_[i_] == '-')) negative = s_[i_++] == '-';
    if (!digit(i_)) fail("invalid number");
    std::int64_t e = 0;
    for (; digit(i_); ++i_)
      if (e < 1'000'000'000'000) e = e * 10 + (s_[i_] - '0');
    exp += negative ? -e : e;
  }
  if (!serde_number_in_range(sig, exp)) fail("number out of range");
}

std::optional<std::uint64_t> JsonReader::read_unsigned(const char*& kind) {
  skip_ws();
  std::size_t start = i_;
  skip_number();
  std::string_view tok = s_.substr(start, i_ - start);
  if (tok[0] == '-') {
    kind = "negative number";
    return std::nullopt;
  }
  if (tok.find_first_of(".eE") != std::string_view::npos) {
    kind = "floating point number";
    return std::nullopt;
  }
  std::uint64_t v = 0;
  for (char c : tok) {
    std::uint64_t d = static_cast<std::uint64_t>(c - '0');
    if (v > (UINT64_MAX - d) / 10) {
      kind = "integer larger than 2^64-1";
      return std::nullopt;
    }
    v = v * 10 + d;
  }
  return v;
}

void JsonReader::skip_value() {
  char c = peek();
  switch (c) {
    case '{': {
      ++i_;
      enter();
      if (!consume('}')) {
        std::string key;
        do {
          if (peek() != '"') fail("key must be a string");
          read_string(key);
          expect(':', "':'");
          skip_value();
        } while (consume(','));
        expect('}', "',' or '}'");
      }
      leave();
      return;
    }
    case '[': {
      ++i_;
      enter();
      if (!consume(']')) {
        do skip_value();
        while (consume(','));
        expect(']', "',' or ']'");
      }
      leave();
      return;
    }
    case '"': {
      std::string tmp;
      read_string(tmp);
      return;
    }
    case 't': if (consume_literal("true")) return; break;
    case 'f': if (consume_literal("false")) return; break;
    case 'n': if (consume_literal("null")) return; break;
    case '\0': fail("EOF while parsing a value");
    default:
      if (c == '-' || (c >= '0' && c <= '9')) {
        skip_number();
        return;
      }
  }
  fail("expected value");
}

bool is_valid_utf8(std::string_view bytes) noexcept {
  const auto* p = reinterpret_cast<const unsigned char*>(bytes.data());
  const auto* end = p + bytes.size();
  while (p < end) {
    // Fast path: 8 ASCII bytes at a time.
    if (end - p >= 8) {
      std::uint64_t w;
      std::memcpy(&w, p, 8);
      if ((w & 0x8080808080808080ull) == 0) {
        p += 8;
        continue;
      }
    }
    unsigned char c = *p;
    if (c < 0x80) {
      ++p;
      continue;
    }
    int n;
    std::uint32_t cp;
    if (c >= 0xC2 && c <= 0xDF) { n = 1; cp = c & 0x1F; }
    else if (c >= 0xE0 && c <= 0xEF) { n = 2; cp = c & 0x0F; }
    else if (c >= 0xF0 && c <= 0xF4) { n = 3; cp = c & 0x07; }
    else return false;
    if (end - p <= n) return false;
    for (int k = 1; k <= n; ++k) {
      if ((p[k] & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (p[k] & 0x3F);
    }
    if ((n == 2 && cp < 0x800) || (n == 3 && (cp < 0x10000 || cp > 0x10FFFF)) ||
        (cp >= 0xD800 && cp <= 0xDFFF))
      return false;
    p += n + 1;
  }
  return true;
}

}  // namespace fst::detail
