// Element-wise dtype conversion on the host, bit-identical to the reference a ConvertMode names
// (and to the CUDA kernels in cpp/kernels/convert.cu, which take the same modes).
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>

#include "fst/dtype.hpp"

namespace fst {

// Whose conversion rules to follow where the frameworks disagree (NaN payloads, F8_E4M3
// overflow, F64 rounding, subnormals): see cpp/src/detail/convert_math.hpp for the rules.
enum class ConvertMode : std::uint32_t {
  kTorch = 0,        // torch's CPU tensor.to(), torch 2.13: F8_E4M3 overflow saturates
  kTorchFp8Nan = 1,  // torch's CPU tensor.to() up to torch 2.11: F8_E4M3 overflow is NaN
  kNumpy = 2,        // numpy's astype (ml_dtypes for BF16 and F8)
  kJax = 3,          // jnp.asarray(a).astype(d) on JAX's CPU backend
};
inline constexpr unsigned kConvertModeCount = 4;

// "torch", "torch-fp8-nan", "numpy", "jax".
std::string_view convert_mode_name(ConvertMode m) noexcept;
std::optional<ConvertMode> convert_mode_from_name(std::string_view name) noexcept;

// True for: any dtype to itself (a copy); every pair among F64, F32, F16, BF16, F8_E4M3 and
// F8_E5M2; F8_E8M0 to F16, BF16, F32 or F64; every pair among BOOL, U8, I8, U16, I16, U32,
// I32, U64 and I64 (never between those and a float). The same pairs in every mode.
bool conversion_supported(Dtype from, Dtype to) noexcept;

// Converts `count` elements from `src` (dtype `from`) to `dst` (dtype `to`) by the rules of
// `mode`. The buffers must not overlap; neither needs any alignment. For an identity
// conversion of a sub-byte dtype, ceil(count * bits / 8) bytes are copied. `threads` <= 1 runs
// on the calling thread; larger values split the work into that many contiguous pieces (fewer
// for small inputs). Throws fst::UnsupportedError when !conversion_supported(from, to).
void convert_host(const void* src, Dtype from, void* dst, Dtype to, std::size_t count,
                  unsigned threads, ConvertMode mode = ConvertMode::kTorch);

}  // namespace fst
