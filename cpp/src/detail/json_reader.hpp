// A strict, allocation-light JSON reader with the exact acceptance rules of serde_json as the
// safetensors reference uses it: only space, tab, CR and LF as whitespace; no trailing
// characters; strings with valid escapes and no lone surrogates or raw control characters;
// nesting at most 127 levels deep. The header parser drives it token by token, so a
// 250,000-tensor header is read in one pass without building a document tree.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace fst::detail {

class JsonSyntaxError {
 public:
  JsonSyntaxError(std::string what, std::size_t pos) : what_(std::move(what)), pos_(pos) {}
  const std::string& what() const noexcept { return what_; }
  std::size_t pos() const noexcept { return pos_; }

 private:
  std::string what_;
  std::size_t pos_;
};

class JsonReader {
 public:
  explicit JsonReader(std::string_view text) : s_(text) {}

  // Skips whitespace and returns the next byte without consuming it (0 at the end).
  char peek();
  // Consumes `c` after whitespace or fails with `expected` in the message.
  void expect(char c, const char* expected);
  // After whitespace, consumes `c` if it is next.
  bool consume(char c);

  // Containers: call enter() after '{' or '[' has been consumed, leave() after the closer.
  void enter();
  void leave() { ++depth_left_; }

  // Reads a string token into `out` (decoded); the reader must be at '"'.
  void read_string(std::string& out);
  // Reads a number token; returns it if it is a non-negative integer that fits 64 bits,
  // otherwise nullopt with `kind` saying what it was ("negative integer", "float", ...).
  std::optional<std::uint64_t> read_unsigned(const char*& kind);
  // Skips any JSON value (used for unknown fields).
  void skip_value();
  // Reads `null`, `true` or `false` literals.
  bool consume_literal(std::string_view lit);
  // Fails unless only whitespace remains.
  void finish();

  std::size_t pos() const noexcept { return i_; }
  [[noreturn]] void fail(const std::string& what) const { throw JsonSyntaxError(what, i_); }

 private:
  void skip_ws();
  void skip_number();
  std::uint32_t read_hex4();

  std::string_view s_;
  std::size_t i_ = 0;
  int depth_left_ = 128;
};

// True when `bytes` is valid UTF-8 (no overlongs, no surrogates, at most U+10FFFF).
bool is_valid_utf8(std::string_view bytes) noexcept;

}  // namespace fst::detail
