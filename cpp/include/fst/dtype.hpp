// Element types of the safetensors format and what fst needs to know about each.
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>

namespace fst {

// Order follows the format's own alignment order (smallest first); values are stable and
// shared with the Python side (fst._core.DTYPE_NAMES).
enum class Dtype : std::uint8_t {
  BOOL, F4, F6_E2M3, F6_E3M2, U8, I8, F8_E5M2, F8_E4M3, F8_E8M0, F8_E4M3FNUZ, F8_E5M2FNUZ,
  I16, U16, F16, BF16, I32, U32, F32, C64, F64, I64, U64,
};
inline constexpr int kDtypeCount = 22;

// Bits per element (F4 and F6 are sub-byte: elements are packed).
unsigned dtype_bits(Dtype d) noexcept;
// Bytes per element for whole-byte types; for sub-byte types, 1 (their natural alignment).
inline unsigned dtype_align(Dtype d) noexcept { return dtype_bits(d) >= 8 ? dtype_bits(d) / 8 : 1; }
std::string_view dtype_name(Dtype d) noexcept;
// Exact, case-sensitive match on the format's names ("BF16", "F8_E4M3", ...).
std::optional<Dtype> dtype_from_name(std::string_view name) noexcept;

}  // namespace fst
