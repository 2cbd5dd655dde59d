// Element-wise dtype conversion arithmetic, shared by the CUDA kernels (cpp/kernels/convert.cu)
// and the host loops (cpp/src/convert_host.cpp). Everything here is pure bit manipulation plus
// a handful of float/double operations, so one definition serves both compilers.
//
// Every conversion follows one reference, bit for bit, NaN payloads included: a ConvertMode
// (fst/convert.hpp) names it. The references agree on every finite value except where listed
// below; tests/test_conversion_reference.py enumerates where they differ.
//
// ConvertMode::kTorch, PyTorch's CPU `tensor.to(dtype)` on a contiguous tensor (torch 2.13):
//  * Every conversion that involves a type narrower than F32 goes through F32, exactly as torch
//    does. In particular F64 -> F16/BF16/F8 rounds twice (F64 -> F32 -> target), each step
//    round-to-nearest-even.
//  * F64 <-> F32, F16 -> F32 and E5M2 -> F32 behave like the x86 conversion instructions: a NaN
//    keeps its sign, is made quiet and keeps the top bits of its payload.
//  * BF16 -> F32 is a plain 16-bit shift (a signalling NaN stays signalling), and E4M3 -> F32 is
//    the direct bit mapping (its single NaN, S.1111.111, becomes S|0x7FF00000).
//  * E8M0 -> F32: 0xFF (NaN) becomes 0x7F800001, code 0 becomes 2^-127 (0x00400000).
//  * F32 -> F16 follows VCVTPS2PH: NaN -> sign|0x7E00|payload>>13; overflow -> infinity.
//  * F32/F64 -> BF16: NaN -> 0xFFFF whatever its sign; every other source -> BF16 maps NaN to
//    0x7FC0 (torch converts those through a different routine).
//  * -> F8_E4M3 (float8_e4m3fn, which has no infinity): NaN -> S|0x7F; +-inf and every finite
//    value that would round past 448 (|x| > 464) saturate to S|0x7E (+-448); otherwise round
//    to nearest even, subnormals included.
//  * -> F8_E5M2: NaN -> S|0x7F; |x| >= 61440 (max 57344 plus half an ulp) -> S|0x7C (inf).
//
// ConvertMode::kTorchFp8Nan, torch 2.11 and earlier: as kTorch, except that -> F8_E4M3 turns
// +-inf and every value that would round past 448 into NaN (S|0x7F).
//
// ConvertMode::kNumpy, `a.astype(d)`: numpy's own casts among F16/F32/F64, ml_dtypes' for BF16
// and F8. Finite values as kTorchFp8Nan, except F64 -> F16, which rounds once. NaNs:
//  * F16 -> F32/F64 and F32/F64 -> F16 keep the payload without making it quiet (a payload that
//    would become zero becomes 1);
//  * every NaN that involves BF16 or an F8 type on either side becomes the canonical quiet NaN
//    of the target with the source's sign (E5M2: S|0x7E), except BF16 -> F32/F64 (a shift, as
//    kTorch);
//  * F32 <-> F64 as kTorch.
//
// ConvertMode::kJax, `jnp.asarray(a).astype(d)` on XLA's CPU backend:
//  * F32 <-> F64 flush subnormals to signed zero (on input for F32 -> F64, on output for
//    F64 -> F32; BF16 -> F64 and F64 -> BF16 go through them, and flush too; E8M0's 2^-127
//    widens to F64 unflushed);
//  * F64 -> F8 rounds once; F64 -> F16/BF16 twice, through F32;
//  * -> F8_E4M3 overflow and +-inf -> NaN, as kTorchFp8Nan;
//  * NaNs: -> BF16, F8 -> F16/F32/F64 and F64 -> F16 give the target's canonical quiet NaN
//    with the source's sign; F16/BF16/E4M3 -> E5M2 give 0x7F whatever the sign, F32/F64 ->
//    E5M2 give S|0x7E; everything else as kTorch.
//
// Host callers must run with the default floating-point environment (no FTZ/DAZ): the host
// loops set it themselves. CUDA code must be compiled without -ftz=true / --use_fast_math.
#pragma once

#include <cstdint>
#include <cstring>

#include "fst/convert.hpp"
#include "fst/dtype.hpp"

#if defined(__CUDACC__)
#define FST_HD __host__ __device__ __forceinline__
#else
#define FST_HD inline
#endif

namespace fst::detail::cvt {

// ---- bit casts ---------------------------------------------------------------------------
FST_HD std::uint32_t bits_of(float f) {
  std::uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
}
FST_HD std::uint64_t bits_of(double d) {
  std::uint64_t u;
  memcpy(&u, &d, sizeof u);
  return u;
}
FST_HD float f32_from(std::uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}
FST_HD double f64_from(std::uint64_t u) {
  double d;
  memcpy(&d, &u, sizeof d);
  return d;
}

// ---- which conversions exist -------------------------------------------------------------
// Floating types convertible in both directions among themselves.
FST_HD constexpr bool is_convertible_float(Dtype d) {
  return d == Dtype::F64 || d == Dtype::F32 || d == Dtype::F16 || d == Dtype::BF16 ||
         d == Dtype::F8_E4M3 || d == Dtype::F8_E5M2;
}
// BOOL and the integer types, convertible among themselves (never to or from a float).
FST_HD constexpr bool is_integral(Dtype d) {
  return d == Dtype::BOOL || d == Dtype::U8 || d == Dtype::I8 || d == Dtype::U16 ||
         d == Dtype::I16 || d == Dtype::U32 || d == Dtype::I32 || d == Dtype::U64 ||
         d == Dtype::I64;
}
// F8_E8M0 (a power-of-two scale) only widens: to F16, BF16, F32, F64.
FST_HD constexpr bool pair_supported(Dtype from, Dtype to) {
  if (from == to) return true;  // a copy, for every dtype
  if (is_convertible_float(from) && is_convertible_float(to)) return true;
  if (is_integral(from) && is_integral(to)) return true;
  return from == Dtype::F8_E8M0 &&
         (to == Dtype::F16 || to == Dtype::BF16 || to == Dtype::F32 || to == Dtype::F64);
}

// Bits per element, usable on the device (mirrors fst::dtype_bits).
FST_HD constexpr unsigned bits_per_element(Dtype d) {
  switch (d) {
    case Dtype::F4: return 4;
    case Dtype::F6_E2M3:
    case Dtype::F6_E3M2: return 6;
    case Dtype::I16:
    case Dtype::U16:
    case Dtype::F16:
    case Dtype::BF16: return 16;
    case Dtype::I32:
    case Dtype::U32:
    case Dtype::F32: return 32;
    case Dtype::C64:
    case Dtype::F64:
    case Dtype::I64:
    case Dtype::U64: return 64;
    default: return 8;
  }
}

// Storage type of one element of a convertible dtype.
template <Dtype D> struct Storage;
template <> struct Storage<Dtype::F64> { using type = std::uint64_t; };
template <> struct Storage<Dtype::F32> { using type = std::uint32_t; };
template <> struct Storage<Dtype::F16> { using type = std::uint16_t; };
template <> struct Storage<Dtype::BF16> { using type = std::uint16_t; };
template <> struct Storage<Dtype::F8_E4M3> { using type = std::uint8_t; };
template <> struct Storage<Dtype::F8_E5M2> { using type = std::uint8_t; };
template <> struct Storage<Dtype::F8_E8M0> { using type = std::uint8_t; };
// Integers are stored unsigned (shifts and loads of their bytes stay defined); value_t is the
// type whose conversion rules apply.
template <Dtype D, class Stored, class Value> struct IntStorage {
  using type = Stored;
  using value = Value;
};
template <> struct Storage<Dtype::BOOL> : IntStorage<Dtype::BOOL, std::uint8_t, std::uint8_t> {};
template <> struct Storage<Dtype::U8> : IntStorage<Dtype::U8, std::uint8_t, std::uint8_t> {};
template <> struct Storage<Dtype::I8> : IntStorage<Dtype::I8, std::uint8_t, std::int8_t> {};
template <> struct Storage<Dtype::U16> : IntStorage<Dtype::U16, std::uint16_t, std::uint16_t> {};
template <> struct Storage<Dtype::I16> : IntStorage<Dtype::I16, std::uint16_t, std::int16_t> {};
template <> struct Storage<Dtype::U32> : IntStorage<Dtype::U32, std::uint32_t, std::uint32_t> {};
template <> struct Storage<Dtype::I32> : IntStorage<Dtype::I32, std::uint32_t, std::int32_t> {};
template <> struct Storage<Dtype::U64> : IntStorage<Dtype::U64, std::uint64_t, std::uint64_t> {};
template <> struct Storage<Dtype::I64> : IntStorage<Dtype::I64, std::uint64_t, std::int64_t> {};
template <Dtype D> using storage_t = typename Storage<D>::type;
template <Dtype D> using value_t = typename Storage<D>::value;

// ---- narrow -> F32 (results are F32 bit patterns) -----------------------------------------
// The branches below are written as selects between values that are all computed, so that
// compilers turn the loops that call them into SIMD code.

// `quiet`: NaNs made quiet (the x86 instruction); numpy keeps them as they are.
FST_HD std::uint32_t f16_to_f32(std::uint32_t h, bool quiet = true) {
  const std::uint32_t sign = (h & 0x8000u) << 16;
  const std::uint32_t e = (h >> 10) & 0x1Fu;
  const std::uint32_t m = h & 0x3FFu;
  const std::uint32_t normal = ((e + 112u) << 23) | (m << 13);
  const std::uint32_t special = 0x7F800000u | (m << 13) | (m != 0 && quiet ? 0x00400000u : 0u);
  // Subnormal (or zero): m * 2^-24, exact and a normal F32 (no subnormal arithmetic).
  const std::uint32_t sub = bits_of(static_cast<float>(static_cast<std::int32_t>(m)) * 0x1p-24f);
  const std::uint32_t mag = e == 0 ? sub : (e == 31u ? special : normal);
  return sign | mag;
}

FST_HD std::uint32_t bf16_to_f32(std::uint32_t h) { return h << 16; }

FST_HD std::uint32_t e4m3_to_f32(std::uint32_t b) {
  const std::uint32_t sign = (b & 0x80u) << 24;
  const std::uint32_t e = (b >> 3) & 0xFu;
  const std::uint32_t m = b & 0x7u;
  const std::uint32_t normal = ((e + 120u) << 23) | (m << 20);
  const std::uint32_t sub = bits_of(static_cast<float>(static_cast<std::int32_t>(m)) * 0x1p-9f);
  const std::uint32_t mag = (b & 0x7Fu) == 0x7Fu ? 0x7FF00000u : (e == 0 ? sub : normal);
  return sign | mag;
}

// E5M2 is the top byte of an F16; torch converts it through F16 -> F32 (NaNs made quiet).
FST_HD std::uint32_t e5m2_to_f32(std::uint32_t b) { return f16_to_f32(b << 8); }

FST_HD std::uint32_t e8m0_to_f32(std::uint32_t b) {
  return b == 0xFFu ? 0x7F800001u : (b == 0 ? 0x00400000u : b << 23);
}

// `flush`: a result below the normal range becomes a signed zero (XLA's CPU backend).
FST_HD std::uint32_t f64_to_f32(std::uint64_t d, bool flush = false) {
  const std::uint64_t a = d & 0x7FFFFFFFFFFFFFFFull;
  const std::uint32_t sign = static_cast<std::uint32_t>(d >> 32 & 0x80000000u);
  const std::uint32_t nan = sign | 0x7FC00000u | static_cast<std::uint32_t>(d >> 29 & 0x7FFFFFu);
  // Magnitudes up to 2^-150 round to zero; passing them as signed zeros keeps subnormal
  // operands (slow on many CPUs) out of the conversion.
  const std::uint64_t in = a <= 0x3690000000000000ull ? d & 0x8000000000000000ull : d;
  const std::uint32_t rounded = bits_of(static_cast<float>(f64_from(in)));
  const std::uint32_t kept = flush && (rounded & 0x7F800000u) == 0 ? sign : rounded;
  return a > 0x7FF0000000000000ull ? nan : kept;
}

// F64 -> F32 rounded to odd: truncated, with the last bit set when anything was dropped.
// Rounding that to any format at least two bits narrower (F16, F8) to nearest even gives the
// F64 value rounded once. Magnitudes below 2^-126 become signed zeros (they round to zero in
// those formats) and those of 2^128 and above infinity (they overflow there); NaNs are not
// handled here.
FST_HD std::uint32_t f64_to_f32_odd(std::uint64_t d) {
  const std::uint64_t a = d & 0x7FFFFFFFFFFFFFFFull;
  const std::uint32_t sign = static_cast<std::uint32_t>(d >> 32 & 0x80000000u);
  const std::uint32_t truncated = static_cast<std::uint32_t>((a - (896ull << 52)) >> 29);
  const std::uint32_t odd = truncated | ((a & 0x1FFFFFFFull) != 0 ? 1u : 0u);
  const std::uint32_t mag =
      a < 0x3810000000000000ull ? 0u : (a >= 0x47F0000000000000ull ? 0x7F800000u : odd);
  return sign | mag;
}

// ---- F32 -> other (input is an F32 bit pattern) -------------------------------------------

// `flush`: a subnormal source becomes a signed zero (XLA's CPU backend).
FST_HD std::uint64_t f32_to_f64(std::uint32_t u, bool flush = false) {
  const std::uint64_t nan = (static_cast<std::uint64_t>(u & 0x80000000u) << 32) |
                            0x7FF8000000000000ull |
                            (static_cast<std::uint64_t>(u & 0x7FFFFFu) << 29);
  const std::uint64_t sign = static_cast<std::uint64_t>(u & 0x80000000u) << 32;
  const bool small = (u & 0x7F800000u) == 0;  // zero or subnormal
  const std::uint64_t widened = bits_of(static_cast<double>(f32_from(small ? 0u : u)));
  // Subnormal: m * 2^-149, exact from integer arithmetic (no subnormal operand).
  const std::uint64_t sub =
      flush ? sign
            : sign | bits_of(static_cast<double>(static_cast<std::int32_t>(u & 0x7FFFFFu)) * 0x1p-149);
  return (u & 0x7FFFFFFFu) > 0x7F800000u ? nan : (small ? sub : widened);
}

FST_HD std::uint32_t f32_to_f16(std::uint32_t u) {
  const std::uint32_t sign = (u >> 16) & 0x8000u;
  const std::uint32_t a = u & 0x7FFFFFFFu;
  // Normal F16 range: rebias the exponent, round the 13 dropped bits to nearest even, and
  // clamp everything that carried past the largest finite value (and +inf) to infinity.
  std::uint32_t r = a - (112u << 23);
  r = (r + 0xFFFu + ((r >> 13) & 1u)) >> 13;
  r = r > 0x7C00u ? 0x7C00u : r;
  // Below 2^-14: adding 0.5f leaves the value in units of 2^-24 in the low mantissa bits,
  // rounded to nearest even by the FPU. Magnitudes below 2^-25 give 0 and are passed as 0
  // (no subnormal operands: they are slow on many CPUs).
  const std::uint32_t sub = bits_of(f32_from(a < 0x33000000u ? 0u : a) + 0.5f) - 0x3F000000u;
  const std::uint32_t nan = 0x7E00u | ((a >> 13) & 0x3FFu);
  const std::uint32_t mag = a > 0x7F800000u ? nan : (a < 0x38800000u ? sub : r);
  return sign | mag;
}

FST_HD std::uint32_t f32_to_bf16(std::uint32_t u, std::uint32_t nan_bits) {
  const std::uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return (u & 0x7FFFFFFFu) > 0x7F800000u ? nan_bits : r;
}

// `saturate`: +-inf and values that round past 448 become +-448 (torch 2.13); otherwise NaN.
FST_HD std::uint32_t f32_to_e4m3(std::uint32_t u, bool saturate) {
  const std::uint32_t sign = (u >> 24) & 0x80u;
  const std::uint32_t a = u & 0x7FFFFFFFu;
  // Below 2^-6 (subnormal E4M3): 2^14 has an ulp of 2^-9, the E4M3 subnormal step. Below
  // 2^-10 the result is 0, and the operand is passed as 0 (see f32_to_f16).
  const std::uint32_t sub = bits_of(f32_from(a < 0x3A800000u ? 0u : a) + 0x1p14f) - (141u << 23);
  // Normal range; a value that rounds up into the NaN code (above 464) overflows.
  std::uint32_t normal = (a - (120u << 23) + 0x7FFFFu + ((a >> 20) & 1u)) >> 20;
  const std::uint32_t overflow = saturate ? 0x7Eu : 0x7Fu;
  normal = normal > 0x7Eu ? overflow : normal;
  // 480 and above, and infinity, overflow too (e4m3fn has no infinity); NaN stays NaN.
  const std::uint32_t big = a > 0x7F800000u ? 0x7Fu : overflow;
  const std::uint32_t mag = a >= 0x43F00000u ? big : (a < (121u << 23) ? sub : normal);
  return sign | mag;
}

FST_HD std::uint32_t f32_to_e5m2(std::uint32_t u) {
  const std::uint32_t sign = (u >> 24) & 0x80u;
  const std::uint32_t a = u & 0x7FFFFFFFu;
  // Below 2^-14 (subnormal E5M2): 2^7 has an ulp of 2^-16, the E5M2 subnormal step. Below
  // 2^-17 the result is 0, and the operand is passed as 0 (see f32_to_f16).
  const std::uint32_t sub = bits_of(f32_from(a < 0x37000000u ? 0u : a) + 0x1p7f) - (134u << 23);
  const std::uint32_t normal = (a - (112u << 23) + 0xFFFFFu + ((a >> 21) & 1u)) >> 21;
  const std::uint32_t big = a > 0x7F800000u ? 0x7Fu : 0x7Cu;  // NaN stays NaN, else inf
  const std::uint32_t mag = a >= 0x47800000u ? big : (a < (113u << 23) ? sub : normal);
  return sign | mag;
}

// ---- NaNs ---------------------------------------------------------------------------------

template <Dtype S>
FST_HD bool is_nan(storage_t<S> x) {
  if constexpr (S == Dtype::F64) return (x & 0x7FFFFFFFFFFFFFFFull) > 0x7FF0000000000000ull;
  else if constexpr (S == Dtype::F32) return (x & 0x7FFFFFFFu) > 0x7F800000u;
  else if constexpr (S == Dtype::F16) return (x & 0x7FFFu) > 0x7C00u;
  else if constexpr (S == Dtype::BF16) return (x & 0x7FFFu) > 0x7F80u;
  else if constexpr (S == Dtype::F8_E4M3) return (x & 0x7Fu) == 0x7Fu;
  else if constexpr (S == Dtype::F8_E5M2) return (x & 0x7Fu) > 0x7Cu;
  else return x == 0xFFu;
}

// The sign bit of x, moved to the sign position of D.
template <Dtype S, Dtype D>
FST_HD storage_t<D> sign_as(storage_t<S> x) {
  constexpr unsigned from = sizeof(storage_t<S>) * 8 - 1, to = sizeof(storage_t<D>) * 8 - 1;
  if constexpr (S == Dtype::F8_E8M0) return 0;  // unsigned
  else return static_cast<storage_t<D>>(static_cast<storage_t<D>>((x >> from) & 1u) << to);
}

// The quiet NaN numpy and XLA produce for D (F8_E5M2: ml_dtypes' S.11111.10).
template <Dtype D>
FST_HD constexpr storage_t<D> canonical_nan() {
  if constexpr (D == Dtype::F64) return 0x7FF8000000000000ull;
  else if constexpr (D == Dtype::F32) return 0x7FC00000u;
  else if constexpr (D == Dtype::F16) return 0x7E00u;
  else if constexpr (D == Dtype::BF16) return 0x7FC0u;
  else if constexpr (D == Dtype::F8_E4M3) return 0x7Fu;
  else return 0x7Eu;
}

// What a mode makes of a NaN source where that differs from the composition through F32.
enum class NanRule {
  kComposed,   // whatever to_f32 / from_f32 give
  kCanonical,  // the source's sign | canonical_nan<D>()
  kKeepBits,   // numpy's F16 <-> F32/F64: the payload moved as it is, never made quiet
  kE5m2Ones,   // 0x7F whatever the sign (XLA's F16/BF16/E4M3 -> E5M2)
};

FST_HD constexpr bool is_f8(Dtype d) {
  return d == Dtype::F8_E4M3 || d == Dtype::F8_E5M2 || d == Dtype::F8_E8M0;
}

template <ConvertMode M, Dtype S, Dtype D>
FST_HD constexpr NanRule nan_rule() {
  if constexpr (M == ConvertMode::kNumpy) {
    if (S == Dtype::F16 && (D == Dtype::F32 || D == Dtype::F64)) return NanRule::kKeepBits;
    if ((S == Dtype::F32 || S == Dtype::F64) && D == Dtype::F16) return NanRule::kKeepBits;
    if (D == Dtype::BF16 || is_f8(D) || is_f8(S) || (S == Dtype::BF16 && D == Dtype::F16))
      return NanRule::kCanonical;
    return NanRule::kComposed;
  } else if constexpr (M == ConvertMode::kJax) {
    if (D == Dtype::F8_E5M2)
      return S == Dtype::F32 || S == Dtype::F64 ? NanRule::kCanonical : NanRule::kE5m2Ones;
    if (D == Dtype::BF16 || is_f8(S) || (S == Dtype::F64 && D == Dtype::F16))
      return NanRule::kCanonical;
    return NanRule::kComposed;
  } else {
    return NanRule::kComposed;
  }
}

// numpy's NaN between F16 and F32/F64: the payload's top bits moved, never made quiet; a
// payload that would vanish in a narrower target becomes 1.
template <Dtype S, Dtype D>
FST_HD storage_t<D> nan_keep_bits(storage_t<S> x) {
  if constexpr (S == Dtype::F16 && D == Dtype::F32)
    return static_cast<std::uint32_t>(x & 0x8000u) << 16 | 0x7F800000u | (x & 0x3FFu) << 13;
  else if constexpr (S == Dtype::F16 && D == Dtype::F64)
    return static_cast<std::uint64_t>(x & 0x8000u) << 48 | 0x7FF0000000000000ull |
           static_cast<std::uint64_t>(x & 0x3FFu) << 42;
  else if constexpr (S == Dtype::F32 && D == Dtype::F16) {
    const std::uint32_t m = (x & 0x7FFFFFu) >> 13;
    return static_cast<std::uint16_t>((x >> 16 & 0x8000u) | 0x7C00u | (m ? m : 1u));
  } else {
    static_assert(S == Dtype::F64 && D == Dtype::F16, "numpy keeps NaN bits only here");
    const std::uint32_t m = static_cast<std::uint32_t>((x & 0xFFFFFFFFFFFFFull) >> 42);
    return static_cast<std::uint16_t>((x >> 48 & 0x8000u) | 0x7C00u | (m ? m : 1u));
  }
}

// ---- composition -------------------------------------------------------------------------

// The source as F32 bits on the way to D.
template <ConvertMode M, Dtype S, Dtype D>
FST_HD std::uint32_t to_f32(storage_t<S> x) {
  if constexpr (S == Dtype::F32) return x;
  else if constexpr (S == Dtype::F64) {
    // Where the reference rounds F64 once, round to odd on the way (see f64_to_f32_odd).
    constexpr bool once = (M == ConvertMode::kNumpy && D == Dtype::F16) ||
                          (M == ConvertMode::kJax && (D == Dtype::F8_E4M3 || D == Dtype::F8_E5M2));
    if constexpr (once) return is_nan<S>(x) ? f64_to_f32(x) : f64_to_f32_odd(x);
    else return f64_to_f32(x, M == ConvertMode::kJax);
  }
  else if constexpr (S == Dtype::F16) return f16_to_f32(x);
  else if constexpr (S == Dtype::BF16) return bf16_to_f32(x);
  else if constexpr (S == Dtype::F8_E4M3) return e4m3_to_f32(x);
  else if constexpr (S == Dtype::F8_E5M2) return e5m2_to_f32(x);
  else return e8m0_to_f32(x);
}

// `S` matters only for BF16, whose NaN in torch depends on where the value came from.
template <ConvertMode M, Dtype S, Dtype D>
FST_HD storage_t<D> from_f32(std::uint32_t u) {
  if constexpr (D == Dtype::F32) return u;
  else if constexpr (D == Dtype::F64)  // XLA widens F8 and F16 to F64 directly: no flush
    return f32_to_f64(u, M == ConvertMode::kJax && (S == Dtype::F32 || S == Dtype::BF16));
  else if constexpr (D == Dtype::F16) return static_cast<std::uint16_t>(f32_to_f16(u));
  else if constexpr (D == Dtype::BF16)
    return static_cast<std::uint16_t>(
        f32_to_bf16(u, (S == Dtype::F32 || S == Dtype::F64) ? 0xFFFFu : 0x7FC0u));
  else if constexpr (D == Dtype::F8_E4M3)
    return static_cast<std::uint8_t>(f32_to_e4m3(u, M == ConvertMode::kTorch));
  else return static_cast<std::uint8_t>(f32_to_e5m2(u));
}

// Between BOOL and integers, as torch, numpy and JAX all do it: BOOL is 1 for every nonzero
// value (of a BOOL byte too), integers wrap around (sign-extended, then truncated).
template <Dtype S, Dtype D>
FST_HD storage_t<D> integral_convert(storage_t<S> x) {
  if constexpr (S == Dtype::BOOL || D == Dtype::BOOL) return x != 0 ? 1 : 0;
  else return static_cast<storage_t<D>>(static_cast<value_t<S>>(x));
}

// Whether mode M converts S -> D exactly as kTorch does: then dispatch_mode instantiates the
// kTorch code for it (one copy in the kernel, and the torch-specific host loops). M enters the
// arithmetic only through nan_rule, F8_E4M3 targets (overflow), F64 sources (rounding once, or
// XLA's flush) and F64 targets (XLA's flush).
template <ConvertMode M, Dtype S, Dtype D>
FST_HD constexpr bool same_as_torch() {
  if (M == ConvertMode::kTorch) return true;
  if (nan_rule<M, S, D>() != NanRule::kComposed || D == Dtype::F8_E4M3) return false;
  if (M == ConvertMode::kNumpy) return !(S == Dtype::F64 && D == Dtype::F16);
  if (M == ConvertMode::kJax)
    return S != Dtype::F64 && !(D == Dtype::F64 && (S == Dtype::F32 || S == Dtype::BF16));
  return true;
}

// One element, as bits, by the rules of mode M (the same in every mode between integers).
// Valid for every (S, D) with pair_supported(S, D) and both storage types defined; S == D is
// the identity.
template <ConvertMode M, Dtype S, Dtype D>
FST_HD storage_t<D> convert(storage_t<S> x) {
  if constexpr (S == D) {
    return x;
  } else if constexpr (is_integral(S)) {
    return integral_convert<S, D>(x);
  } else {
    const storage_t<D> value = from_f32<M, S, D>(to_f32<M, S, D>(x));
    constexpr NanRule rule = nan_rule<M, S, D>();
    if constexpr (rule == NanRule::kComposed) return value;
    else {
      storage_t<D> nan;
      if constexpr (rule == NanRule::kCanonical) nan = sign_as<S, D>(x) | canonical_nan<D>();
      else if constexpr (rule == NanRule::kKeepBits) nan = nan_keep_bits<S, D>(x);
      else nan = 0x7Fu;
      return is_nan<S>(x) ? nan : value;
    }
  }
}

// Calls f.template operator()<E, S, D>() for mode m: E is kTorch wherever m converts S -> D as
// kTorch does (same_as_torch), so that each distinct conversion is instantiated once (the
// kernel inlines every call).
template <Dtype S, Dtype D, class F>
FST_HD void dispatch_mode(ConvertMode m, F&& f) {
  constexpr bool fp8_nan = !same_as_torch<ConvertMode::kTorchFp8Nan, S, D>();
  constexpr bool numpy = !same_as_torch<ConvertMode::kNumpy, S, D>();
  constexpr bool jax = !same_as_torch<ConvertMode::kJax, S, D>();
  if constexpr (fp8_nan) {
    if (m == ConvertMode::kTorchFp8Nan) return f.template operator()<ConvertMode::kTorchFp8Nan, S, D>();
  }
  if constexpr (numpy) {
    if (m == ConvertMode::kNumpy) return f.template operator()<ConvertMode::kNumpy, S, D>();
  }
  if constexpr (jax) {
    if (m == ConvertMode::kJax) return f.template operator()<ConvertMode::kJax, S, D>();
  }
  f.template operator()<ConvertMode::kTorch, S, D>();
}

// Calls dispatch_mode<S, D>(m, f) for a supported, non-identity pair of floats and returns
// true; returns false for anything else. Lets host and device code instantiate per-pair loops
// from run-time dtype codes without spelling out the table twice.
template <class F>
FST_HD bool dispatch_pair(ConvertMode m, Dtype s, Dtype d, F&& f) {
#define FST_CVT_CASE(S_, D_)                              \
  if (s == Dtype::S_ && d == Dtype::D_) {                 \
    dispatch_mode<Dtype::S_, Dtype::D_>(m, f);            \
    return true;                                          \
  }
#define FST_CVT_FROM(S_)                                                              \
  FST_CVT_CASE(S_, F64) FST_CVT_CASE(S_, F32) FST_CVT_CASE(S_, F16) FST_CVT_CASE(S_, BF16) \
  FST_CVT_CASE(S_, F8_E4M3) FST_CVT_CASE(S_, F8_E5M2)
  if (s == d) return false;
  FST_CVT_FROM(F64)
  FST_CVT_FROM(F32)
  FST_CVT_FROM(F16)
  FST_CVT_FROM(BF16)
  FST_CVT_FROM(F8_E4M3)
  FST_CVT_FROM(F8_E5M2)
  FST_CVT_CASE(F8_E8M0, F64)
  FST_CVT_CASE(F8_E8M0, F32)
  FST_CVT_CASE(F8_E8M0, F16)
  FST_CVT_CASE(F8_E8M0, BF16)
#undef FST_CVT_FROM
#undef FST_CVT_CASE
  return false;
}

// The integer dtype with the bits of an integer target: a conversion to U8 and one to I8 write
// the same bytes, so only one of them is instantiated.
FST_HD constexpr Dtype integral_bits_of(Dtype d) {
  switch (d) {
    case Dtype::I8: return Dtype::U8;
    case Dtype::I16: return Dtype::U16;
    case Dtype::I32: return Dtype::U32;
    case Dtype::I64: return Dtype::U64;
    default: return d;
  }
}

// Calls f.template operator()<M, S, D'>() for a conversion between integral dtypes, D' being
// integral_bits_of(d) (the same for every mode, so M is kTorch); false for anything else.
template <class F>
FST_HD bool dispatch_integral(Dtype s, Dtype d, F&& f) {
  const Dtype t = integral_bits_of(d);
#define FST_CVT_CASE(S_, D_)                                        \
  if (s == Dtype::S_ && t == Dtype::D_) {                           \
    f.template operator()<ConvertMode::kTorch, Dtype::S_, Dtype::D_>(); \
    return true;                                                    \
  }
#define FST_CVT_FROM(S_)                                                             \
  FST_CVT_CASE(S_, BOOL) FST_CVT_CASE(S_, U8) FST_CVT_CASE(S_, U16) FST_CVT_CASE(S_, U32) \
  FST_CVT_CASE(S_, U64)
  if (s == d || !is_integral(s) || !is_integral(d)) return false;
  FST_CVT_FROM(BOOL)
  FST_CVT_FROM(U8)
  FST_CVT_FROM(I8)
  FST_CVT_FROM(U16)
  FST_CVT_FROM(I16)
  FST_CVT_FROM(U32)
  FST_CVT_FROM(I32)
  FST_CVT_FROM(U64)
  FST_CVT_FROM(I64)
#undef FST_CVT_FROM
#undef FST_CVT_CASE
  return false;
}

// Calls f.template operator()<E, S, D>() (see dispatch_mode and dispatch_integral) for a
// supported, non-identity pair in mode m and returns true; false for anything else, an unknown
// mode included.
template <class F>
FST_HD bool dispatch(ConvertMode m, Dtype s, Dtype d, F&& f) {
  if (static_cast<unsigned>(m) >= kConvertModeCount) return false;
  return is_integral(s) ? dispatch_integral(s, d, f) : dispatch_pair(m, s, d, f);
}

}  // namespace fst::detail::cvt
