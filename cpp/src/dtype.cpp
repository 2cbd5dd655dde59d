#include "fst/dtype.hpp"

#include <array>

namespace fst {
namespace {
struct DtypeRow { std::string_view name; unsigned bits; };
constexpr std::array<DtypeRow, kDtypeCount> kRows = {{
    {"BOOL", 8}, {"F4", 4}, {"F6_E2M3", 6}, {"F6_E3M2", 6}, {"U8", 8}, {"I8", 8},
    {"F8_E5M2", 8}, {"F8_E4M3", 8}, {"F8_E8M0", 8}, {"F8_E4M3FNUZ", 8}, {"F8_E5M2FNUZ", 8},
    {"I16", 16}, {"U16", 16}, {"F16", 16}, {"BF16", 16}, {"I32", 32}, {"U32", 32},
    {"F32", 32}, {"C64", 64}, {"F64", 64}, {"I64", 64}, {"U64", 64},
}};
}  // namespace

unsigned dtype_bits(Dtype d) noexcept { return kRows[static_cast<int>(d)].bits; }
std::string_view dtype_name(Dtype d) noexcept { return kRows[static_cast<int>(d)].name; }

std::optional<Dtype> dtype_from_name(std::string_view name) noexcept {
  for (int i = 0; i < kDtypeCount; ++i)
    if (kRows[i].name == name) return static_cast<Dtype>(i);
  return std::nullopt;
}

}  // namespace fst
