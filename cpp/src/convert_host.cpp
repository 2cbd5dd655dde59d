// Host conversion loops: the arithmetic of detail/convert_math.hpp applied over arrays, split
// across threads. The inner loops are branch-free per element so that the compiler turns them
// into SIMD code.

// The arithmetic computes every candidate result and selects one; GCC vectorises such loops
// only when it may assume that floating-point operations do not trap. They do not: the loops
// run in the default floating-point environment (DefaultFpEnv below), all exceptions masked.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

#include "fst/convert.hpp"

#include <cfenv>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#elif defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "detail/convert_math.hpp"
#include "fst/errors.hpp"

namespace fst {
namespace {

namespace cvt = detail::cvt;

// Instruction set extensions the loops may use.
struct Isa {
  bool avx2 = false, f16c = false;
};

using LoopFn = void (*)(const unsigned char*, unsigned char*, std::size_t, const Isa&);

// Elements per block of the staged loop (aligned stack buffers that stay in L1).
constexpr std::size_t kStageElems = 2048;
// Destinations at least this large (per thread) are written with non-temporal stores: they
// would not stay in the cache anyway, and streaming saves the read of every destination line
// that a normal store costs.
constexpr std::size_t kStreamBytes = std::size_t{4} << 20;
// Below this many bytes (source plus destination) per thread, extra threads cost more than
// they bring.
constexpr std::size_t kMinBytesPerThread = std::size_t{1} << 20;
// Upper bound on the threads of one call, whatever the caller asks for.
constexpr std::size_t kMaxThreads = 256;

template <Dtype S, Dtype D>
using Span = void (*)(const cvt::storage_t<S>*, cvt::storage_t<D>*, std::size_t);

// The element loop for the baseline instruction set.
template <ConvertMode M, Dtype S, Dtype D>
void span_baseline(const cvt::storage_t<S>* __restrict src, cvt::storage_t<D>* __restrict dst,
                   std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) dst[i] = cvt::convert<M, S, D>(src[i]);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FST_CONVERT_X86 1
// The same loop compiled for AVX2 (twice the vector width, and blends, unsigned minimum and
// packing instructions that SSE2 lacks), chosen at run time.
template <ConvertMode M, Dtype S, Dtype D>
__attribute__((target("avx2"))) void span_avx2(const cvt::storage_t<S>* __restrict src,
                                                cvt::storage_t<D>* __restrict dst,
                                                std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) dst[i] = cvt::convert<M, S, D>(src[i]);
}

// Conversions to and from F16 with the F16C instructions. VCVTPS2PH (round to nearest even)
// and VCVTPH2PS are the F32 <-> F16 rules of convert_math.hpp's torch modes, NaNs included,
// and VCVTPD2PS / VCVTPS2PD its F64 <-> F32 rules, so these agree bit for bit with the
// portable loops of those modes (the tests run both). pick_span says where other modes agree.
#define FST_F16C __attribute__((target("avx2,f16c")))

FST_F16C inline __m256 load8_as_f32(const std::uint32_t* p) {
  return _mm256_castsi256_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
FST_F16C inline __m256 load8_as_f32(const std::uint16_t* p) {  // BF16
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
FST_F16C inline __m256 load8_as_f32(const std::uint64_t* p) {
  const __m128 lo = _mm256_cvtpd_ps(_mm256_castsi256_pd(
      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
  const __m128 hi = _mm256_cvtpd_ps(_mm256_castsi256_pd(
      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 4))));
  return _mm256_insertf128_ps(_mm256_castps128_ps256(lo), hi, 1);
}

template <Dtype S>
FST_F16C void span_to_f16_f16c(const cvt::storage_t<S>* __restrict src,
                               std::uint16_t* __restrict dst, std::size_t n) {
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm256_cvtps_ph(load8_as_f32(src + i), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
  }
  for (; i < n; ++i) dst[i] = cvt::convert<ConvertMode::kTorch, S, Dtype::F16>(src[i]);
}

FST_F16C void span_f16_to_f32_f16c(const std::uint16_t* __restrict src,
                                   std::uint32_t* __restrict dst, std::size_t n) {
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 f = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), _mm256_castps_si256(f));
  }
  for (; i < n; ++i) dst[i] = cvt::convert<ConvertMode::kTorch, Dtype::F16, Dtype::F32>(src[i]);
}

FST_F16C void span_f16_to_f64_f16c(const std::uint16_t* __restrict src,
                                   std::uint64_t* __restrict dst, std::size_t n) {
  std::size_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const __m128 f = _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + i)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                        _mm256_castpd_si256(_mm256_cvtps_pd(f)));
  }
  for (; i < n; ++i) dst[i] = cvt::convert<ConvertMode::kTorch, Dtype::F16, Dtype::F64>(src[i]);
}

// F8_E4M3 -> BF16 (the usual way FP8 weights are widened) with byte shuffles, 32 elements at a
// time: for normal values the BF16 bytes are simple functions of the magnitude (high byte
// (mag >> 4) + 0x3C, low byte mag << 4); subnormals come from a 16-entry byte table, and the
// NaN code becomes 0x7FC0 (torch's rule). A table-driven scalar loop cannot keep up with
// memory here.
__attribute__((target("avx2"))) void span_e4m3_to_bf16_avx2(const std::uint8_t* __restrict src,
                                                             std::uint16_t* __restrict dst,
                                                             std::size_t n) {
  const __m256i k7f = _mm256_set1_epi8(0x7F), k80 = _mm256_set1_epi8(char(0x80));
  const __m256i k0f = _mm256_set1_epi8(0x0F), k07 = _mm256_set1_epi8(0x07);
  const __m256i k3c = _mm256_set1_epi8(0x3C), k08 = _mm256_set1_epi8(0x08);
  const __m256i nan_lo = _mm256_set1_epi8(char(0xC0));
  // BF16 of m * 2^-9 for m = 0..7, low and high bytes (both 128-bit lanes).
  const __m256i sub_lo = _mm256_setr_epi8(0, 0, char(0x80), char(0xC0), 0, 0x20, 0x40, 0x60, 0, 0,
                                          0, 0, 0, 0, 0, 0, 0, 0, char(0x80), char(0xC0), 0, 0x20,
                                          0x40, 0x60, 0, 0, 0, 0, 0, 0, 0, 0);
  const __m256i sub_hi = _mm256_setr_epi8(0, 0x3B, 0x3B, 0x3B, 0x3C, 0x3C, 0x3C, 0x3C, 0, 0, 0, 0,
                                          0, 0, 0, 0, 0, 0x3B, 0x3B, 0x3B, 0x3C, 0x3C, 0x3C, 0x3C,
                                          0, 0, 0, 0, 0, 0, 0, 0);
  std::size_t i = 0;
  for (; i + 32 <= n; i += 32) {
    // Qwords 0,2 | 1,3: the in-lane unpacks below then produce the elements in order.
    const __m256i b = _mm256_permute4x64_epi64(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i)), 0xD8);
    const __m256i mag = _mm256_and_si256(b, k7f);
    const __m256i sign = _mm256_and_si256(b, k80);
    __m256i lo = _mm256_slli_epi16(_mm256_and_si256(mag, k0f), 4);
    __m256i hi = _mm256_add_epi8(_mm256_and_si256(_mm256_srli_epi16(mag, 4), k07), k3c);
    const __m256i sub = _mm256_cmpgt_epi8(k08, mag);
    lo = _mm256_blendv_epi8(lo, _mm256_shuffle_epi8(sub_lo, mag), sub);
    hi = _mm256_blendv_epi8(hi, _mm256_shuffle_epi8(sub_hi, mag), sub);
    hi = _mm256_or_si256(hi, sign);
    const __m256i nan = _mm256_cmpeq_epi8(mag, k7f);
    lo = _mm256_blendv_epi8(lo, nan_lo, nan);
    hi = _mm256_blendv_epi8(hi, k7f, nan);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), _mm256_unpacklo_epi8(lo, hi));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i + 16), _mm256_unpackhi_epi8(lo, hi));
  }
  for (; i < n; ++i) dst[i] = cvt::convert<ConvertMode::kTorch, Dtype::F8_E4M3, Dtype::BF16>(src[i]);
}

#undef FST_F16C
#endif

// What the processor offers. FST_CONVERT_BASELINE=1 in the environment (read on each call of
// convert_host) restricts the host loops to the portable ones, for testing and comparison.
Isa usable_isa() {
#if defined(FST_CONVERT_X86)
  static const Isa detected{__builtin_cpu_supports("avx2") != 0,
                            __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c")};
  const char* env = std::getenv("FST_CONVERT_BASELINE");
  if (env && env[0] && std::strcmp(env, "0") != 0) return Isa{};
  return detected;
#else
  return Isa{};
#endif
}

// 8-bit sources: a 256-entry table of results, filled on first use (under the default
// floating-point environment: every caller runs inside DefaultFpEnv). As fast as the memory.
template <ConvertMode M, Dtype S, Dtype D>
void span_table(const cvt::storage_t<S>* __restrict src, cvt::storage_t<D>* __restrict dst,
                std::size_t n) {
  using DstT = cvt::storage_t<D>;
  struct Table {
    DstT v[256];
    Table() {
      for (unsigned i = 0; i < 256; ++i)
        v[i] = cvt::convert<M, S, D>(static_cast<std::uint8_t>(i));
    }
  };
  static const Table table;
  const DstT* __restrict t = table.v;
  for (std::size_t i = 0; i < n; ++i) dst[i] = t[src[i]];
}

// The torch-specific vector loops above serve kTorch only; every pair that another mode
// converts as torch does reaches here as kTorch (cvt::dispatch_mode).
template <ConvertMode M, Dtype S, Dtype D>
Span<S, D> pick_span(const Isa& c) {
  constexpr bool torch = M == ConvertMode::kTorch;
  if constexpr (sizeof(cvt::storage_t<S>) == 1) {
#if defined(FST_CONVERT_X86)
    if constexpr (torch && S == Dtype::F8_E4M3 && D == Dtype::BF16) {
      if (c.avx2) return &span_e4m3_to_bf16_avx2;
    }
#endif
    return &span_table<M, S, D>;
  } else {
#if defined(FST_CONVERT_X86)
    if constexpr (torch && D == Dtype::F16 &&
                  (S == Dtype::F32 || S == Dtype::BF16 || S == Dtype::F64)) {
      if (c.f16c) return &span_to_f16_f16c<S>;
    }
    if constexpr (torch && S == Dtype::F16 && D == Dtype::F32) {
      if (c.f16c) return &span_f16_to_f32_f16c;
    }
    if constexpr (torch && S == Dtype::F16 && D == Dtype::F64) {
      if (c.f16c) return &span_f16_to_f64_f16c;
    }
    if (c.avx2) return &span_avx2<M, S, D>;
#endif
    (void)c;
    return &span_baseline<M, S, D>;
  }
}

// Copies n bytes of a cache-resident block to dst with non-temporal stores where possible.
// The caller issues the store fence (end_streaming) once it is done.
void stream_out(unsigned char* dst, const unsigned char* src, std::size_t n) {
#if defined(__SSE2__)
  std::size_t head = (16 - reinterpret_cast<std::uintptr_t>(dst) % 16) % 16;
  if (head > n) head = n;
  std::memcpy(dst, src, head);
  dst += head;
  src += head;
  n -= head;
  const std::size_t vecs = n / 16;
  for (std::size_t i = 0; i < vecs; ++i)
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst) + i,
                     _mm_loadu_si128(reinterpret_cast<const __m128i*>(src) + i));
  std::memcpy(dst + 16 * vecs, src + 16 * vecs, n - 16 * vecs);
#else
  std::memcpy(dst, src, n);
#endif
}

void end_streaming() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// Converts n elements; src and dst need no alignment. Aligned data of moderate size goes
// straight through the vectorised loop; misaligned data (the loops only ever see naturally
// aligned element pointers) and large outputs go block by block through an aligned stage.
template <ConvertMode M, Dtype S, Dtype D>
void convert_loop(const unsigned char* src, unsigned char* dst, std::size_t n, const Isa& isa) {
  using SrcT = cvt::storage_t<S>;
  using DstT = cvt::storage_t<D>;
  const Span<S, D> span = pick_span<M, S, D>(isa);
  const bool src_aligned = reinterpret_cast<std::uintptr_t>(src) % alignof(SrcT) == 0;
  const bool dst_aligned = reinterpret_cast<std::uintptr_t>(dst) % alignof(DstT) == 0;
  const bool stream = n * sizeof(DstT) >= kStreamBytes;
  if (src_aligned && dst_aligned && !stream) {
    span(reinterpret_cast<const SrcT*>(src), reinterpret_cast<DstT*>(dst), n);
    return;
  }
  alignas(64) SrcT in[kStageElems];
  alignas(64) DstT out[kStageElems];
  for (std::size_t done = 0; done < n; done += kStageElems) {
    const std::size_t m = n - done < kStageElems ? n - done : kStageElems;
    const SrcT* s = reinterpret_cast<const SrcT*>(src) + done;
    if (!src_aligned) {
      std::memcpy(in, src + done * sizeof(SrcT), m * sizeof(SrcT));
      s = in;
    }
    span(s, out, m);
    if (stream)
      stream_out(dst + done * sizeof(DstT), reinterpret_cast<const unsigned char*>(out),
                 m * sizeof(DstT));
    else
      std::memcpy(dst + done * sizeof(DstT), out, m * sizeof(DstT));
  }
  if (stream) end_streaming();
}

struct LoopFinder {
  LoopFn* fn;
  template <ConvertMode M, Dtype S, Dtype D>
  void operator()() const {
    *fn = &convert_loop<M, S, D>;
  }
};

LoopFn find_loop(ConvertMode mode, Dtype from, Dtype to) {
  LoopFn fn = nullptr;
  cvt::dispatch(mode, from, to, LoopFinder{&fn});
  return fn;
}

// The arithmetic assumes IEEE behaviour with subnormals: run with the default floating-point
// environment (a library built with -ffast-math may have turned on flush-to-zero).
class DefaultFpEnv {
 public:
  DefaultFpEnv() : saved_ok_(std::fegetenv(&saved_) == 0) { std::fesetenv(FE_DFL_ENV); }
  ~DefaultFpEnv() {
    if (saved_ok_) std::fesetenv(&saved_);
  }
  DefaultFpEnv(const DefaultFpEnv&) = delete;
  DefaultFpEnv& operator=(const DefaultFpEnv&) = delete;

 private:
  std::fenv_t saved_;
  bool saved_ok_;
};

// Piece [begin, end) of the work, in elements (for copies: in bytes).
struct Job {
  LoopFn fn;  // nullptr: byte copy
  const unsigned char* src;
  unsigned char* dst;
  std::size_t src_size, dst_size;
  Isa isa;
};

void run_piece(const Job& job, std::size_t begin, std::size_t end) {
  if (begin >= end) return;
  if (!job.fn) {
    std::memcpy(job.dst + begin, job.src + begin, end - begin);
    return;
  }
  DefaultFpEnv env;
  job.fn(job.src + begin * job.src_size, job.dst + begin * job.dst_size, end - begin, job.isa);
}

// Joins every started thread when it goes out of scope, also on the way out of an exception.
class Workers {
 public:
  Workers() = default;
  Workers(const Workers&) = delete;
  Workers& operator=(const Workers&) = delete;
  ~Workers() {
    for (std::thread& t : threads_)
      if (t.joinable()) t.join();
  }
  // Starts fn on a new thread; runs it here when no thread can be started.
  template <class F>
  void spawn(F fn) {
    try {
      threads_.emplace_back(fn);
    } catch (const std::system_error&) {
      fn();
    }
  }
  void reserve(std::size_t n) { threads_.reserve(n); }

 private:
  std::vector<std::thread> threads_;
};

// Runs job over [0, units) on up to `threads` threads (the calling thread included), in
// contiguous pieces whose bounds are multiples of `grain` units.
void run_parallel(const Job& job, std::size_t units, std::size_t bytes_per_unit,
                  unsigned threads, std::size_t grain) {
  std::size_t nt = threads > 1 ? threads : 1;
  if (nt > kMaxThreads) nt = kMaxThreads;
  const std::size_t by_size = units * bytes_per_unit / kMinBytesPerThread;
  if (nt > by_size) nt = by_size ? by_size : 1;
  if (nt <= 1) {
    run_piece(job, 0, units);
    return;
  }
  std::size_t piece = (units + nt - 1) / nt;
  piece = (piece + grain - 1) / grain * grain;
  Workers workers;
  workers.reserve(nt - 1);
  std::size_t begin = piece;  // the calling thread takes the first piece
  for (std::size_t i = 1; i < nt && begin < units; ++i, begin += piece) {
    const std::size_t end = units - begin < piece ? units : begin + piece;
    workers.spawn([&job, begin, end] { run_piece(job, begin, end); });
  }
  run_piece(job, 0, piece < units ? piece : units);
}

bool valid_dtype(Dtype d) {
  return static_cast<unsigned>(d) < static_cast<unsigned>(kDtypeCount);
}

std::string name_of(Dtype d) {
  if (valid_dtype(d)) return std::string(dtype_name(d));
  return "dtype code " + std::to_string(static_cast<unsigned>(d));
}

constexpr std::string_view kModeNames[kConvertModeCount] = {"torch", "torch-fp8-nan", "numpy",
                                                            "jax"};

}  // namespace

std::string_view convert_mode_name(ConvertMode m) noexcept {
  const auto i = static_cast<unsigned>(m);
  return i < kConvertModeCount ? kModeNames[i] : std::string_view{};
}

std::optional<ConvertMode> convert_mode_from_name(std::string_view name) noexcept {
  for (unsigned i = 0; i < kConvertModeCount; ++i)
    if (kModeNames[i] == name) return static_cast<ConvertMode>(i);
  return std::nullopt;
}

bool conversion_supported(Dtype from, Dtype to) noexcept {
  return valid_dtype(from) && valid_dtype(to) && cvt::pair_supported(from, to);
}

void convert_host(const void* src, Dtype from, void* dst, Dtype to, std::size_t count,
                  unsigned threads, ConvertMode mode) {
  if (!conversion_supported(from, to))
    throw UnsupportedError("conversion from " + name_of(from) + " to " + name_of(to) +
                           " is not supported");
  if (count == 0) return;
  const auto* s = static_cast<const unsigned char*>(src);
  auto* d = static_cast<unsigned char*>(dst);
  if (from == to) {
    const std::size_t bytes = (count * dtype_bits(from) + 7) / 8;
    run_parallel(Job{nullptr, s, d, 1, 1, Isa{}}, bytes, 2, threads, 4096);
    return;
  }
  const std::size_t ss = dtype_bits(from) / 8, ds = dtype_bits(to) / 8;
  const LoopFn fn = find_loop(mode, from, to);
  if (!fn)
    throw UnsupportedError("conversion mode code " + std::to_string(static_cast<unsigned>(mode)) +
                           " does not exist");
  run_parallel(Job{fn, s, d, ss, ds, usable_isa()}, count, ss + ds, threads, 64);
}

}  // namespace fst
