// Batched dtype conversion on the GPU.
//
// Kernels (stable names, looked up by the host with cuModuleGetFunction):
//
//   extern "C" __global__ void fst_convert_batch(const fst::kernels::ConvertTask* tasks,
//                                                uint32_t n_tasks);
//       Converts every task of the array (in device memory) in one launch. Launch shape and
//       the overlap contract: see cpp/src/detail/kernel_abi.hpp. Element arithmetic:
//       cpp/src/detail/convert_math.hpp, by the task's mode (bit-identical to the host
//       conversion, and to the CPU conversion of the framework the mode names). Identity tasks
//       (src_dtype == dst_dtype) are byte copies; tasks with an unsupported pair or mode are
//       skipped.
//
// Per task, when the source and destination can reach 16-byte alignment at the same element,
// the body is converted with 16-byte vector loads and stores (a scalar head and tail around
// it); otherwise every element is loaded and stored on its own (byte by byte where the
// address is not a multiple of the element size).
#include <cstdint>

#include "batch_common.cuh"
#include "detail/convert_math.hpp"
#include "detail/kernel_abi.hpp"

namespace fst::kernels::dev {
namespace {

namespace cvt = fst::detail::cvt;

template <class T>
__device__ __forceinline__ T load_elem(const unsigned char* p, bool aligned) {
  if (aligned) return *reinterpret_cast<const T*>(p);
  T v = 0;
#pragma unroll
  for (unsigned i = 0; i < sizeof(T); ++i) v |= static_cast<T>(static_cast<T>(p[i]) << (8 * i));
  return v;
}

template <class T>
__device__ __forceinline__ void store_elem(unsigned char* p, T v, bool aligned) {
  if (aligned) {
    *reinterpret_cast<T*>(p) = v;
    return;
  }
#pragma unroll
  for (unsigned i = 0; i < sizeof(T); ++i) p[i] = static_cast<unsigned char>(v >> (8 * i));
}

// How one conversion task is cut up; computed identically by every block.
struct ConvertPlan {
  std::uint64_t head;    // scalar elements before the vector body
  std::uint64_t groups;  // vector groups in the body (0 on the scalar path)
  std::uint64_t chunks;
  bool vector;
};

template <Dtype S, Dtype D>
struct PairShape {
  static constexpr unsigned kSrc = sizeof(cvt::storage_t<S>);
  static constexpr unsigned kDst = sizeof(cvt::storage_t<D>);
  static constexpr unsigned kNarrow = kSrc < kDst ? kSrc : kDst;
  static constexpr unsigned kWide = kSrc < kDst ? kDst : kSrc;
  // Elements per group: one 16-byte vector on the narrower side.
  static constexpr unsigned kGroup = 16 / kNarrow;
  static constexpr unsigned kInVecs = kGroup * kSrc / 16;
  static constexpr unsigned kOutVecs = kGroup * kDst / 16;
  // Groups per thread per chunk: kThreadBytes of the wider side.
  static constexpr unsigned kUnroll = kThreadBytes / (kGroup * kWide);
  static_assert(kUnroll >= 1, "chunk too small for this pair");
};

// The plan of a task from its element sizes (run-time values, so that the scheduler can count
// chunks without instantiating every pair; PairShape gives the same numbers at compile time).
__device__ __forceinline__ ConvertPlan plan_convert(const ConvertTask& t, unsigned src_size,
                                                    unsigned dst_size) {
  ConvertPlan p{0, 0, 0, false};
  if (t.count == 0) return p;
  const unsigned narrow = src_size < dst_size ? src_size : dst_size;
  const unsigned wide = src_size < dst_size ? dst_size : src_size;
  const unsigned group = 16 / narrow;
  const std::uint64_t per_chunk =
      static_cast<std::uint64_t>(blockDim.x) * (kThreadBytes / (group * wide));
  const std::uint64_t sa = t.src & 15;
  if (sa % src_size == 0) {
    const std::uint64_t head = ((16 - sa) & 15) / src_size;
    if (head <= t.count && ((t.dst + head * dst_size) & 15) == 0) {
      const std::uint64_t groups = (t.count - head) / group;
      if (groups > 0) {
        p.vector = true;
        p.head = head;
        p.groups = groups;
        p.chunks = (groups + per_chunk - 1) / per_chunk;
        return p;
      }
    }
  }
  const std::uint64_t per_chunk_elems = per_chunk * group;
  p.chunks = (t.count + per_chunk_elems - 1) / per_chunk_elems;
  return p;
}

__device__ __forceinline__ unsigned elem_size(std::uint32_t code) {
  return cvt::bits_per_element(static_cast<Dtype>(code)) / 8;
}

template <ConvertMode M, Dtype S, Dtype D>
__device__ __forceinline__ void convert_scalar_range(const ConvertTask& t, std::uint64_t begin,
                                                     std::uint64_t end, std::uint64_t step) {
  using SrcT = cvt::storage_t<S>;
  using DstT = cvt::storage_t<D>;
  const unsigned char* __restrict__ s = reinterpret_cast<const unsigned char*>(t.src);
  unsigned char* __restrict__ d = reinterpret_cast<unsigned char*>(t.dst);
  const bool sa = (t.src % sizeof(SrcT)) == 0;
  const bool da = (t.dst % sizeof(DstT)) == 0;
  for (std::uint64_t i = begin; i < end; i += step) {
    const SrcT x = load_elem<SrcT>(s + i * sizeof(SrcT), sa);
    store_elem<DstT>(d + i * sizeof(DstT), cvt::convert<M, S, D>(x), da);
  }
}

template <ConvertMode M, Dtype S, Dtype D>
__device__ __forceinline__ void convert_chunk(const ConvertTask& t, const ConvertPlan& p,
                                              std::uint64_t j, unsigned tid, unsigned ntid) {
  using Shape = PairShape<S, D>;
  using SrcT = cvt::storage_t<S>;
  using DstT = cvt::storage_t<D>;
  constexpr unsigned G = Shape::kGroup, U = Shape::kUnroll;
  const std::uint64_t bd = ntid;
  if (!p.vector) {
    const std::uint64_t per_chunk = bd * U * G;
    const std::uint64_t begin = j * per_chunk;
    const std::uint64_t end = begin + per_chunk < t.count ? begin + per_chunk : t.count;
    convert_scalar_range<M, S, D>(t, begin + tid, end, bd);
    return;
  }
  if (j == 0) {
    convert_scalar_range<M, S, D>(t, tid, p.head, bd);
    convert_scalar_range<M, S, D>(t, p.head + p.groups * G + tid, t.count, bd);
  }
  const uint4* __restrict__ sv = reinterpret_cast<const uint4*>(t.src + p.head * sizeof(SrcT));
  uint4* __restrict__ dv = reinterpret_cast<uint4*>(t.dst + p.head * sizeof(DstT));
  const std::uint64_t g0 = j * bd * U + tid;
  // One group at a time: load, convert, store. (Loading every group first needs more
  // registers, and with all pairs inlined into one kernel that adds up.)
#pragma unroll
  for (unsigned u = 0; u < U; ++u) {
    const std::uint64_t g = g0 + u * bd;
    if (g < p.groups) {
      uint4 in[Shape::kInVecs];
#pragma unroll
      for (unsigned k = 0; k < Shape::kInVecs; ++k) in[k] = sv[g * Shape::kInVecs + k];
      SrcT x[G];
      DstT y[G];
      memcpy(x, in, sizeof x);
#pragma unroll
      for (unsigned e = 0; e < G; ++e) y[e] = cvt::convert<M, S, D>(x[e]);
      uint4 out[Shape::kOutVecs];
      memcpy(out, y, sizeof out);
#pragma unroll
      for (unsigned k = 0; k < Shape::kOutVecs; ++k) dv[g * Shape::kOutVecs + k] = out[k];
    }
  }
}

// All chunks of a conversion task that fall to this block.
template <ConvertMode M, Dtype S, Dtype D>
__device__ __forceinline__ void run_chunks(const ConvertTask& t, const ConvertPlan& p,
                                           std::uint64_t first, std::uint64_t count,
                                           std::uint64_t stride) {
  const unsigned tid = threadIdx.x, ntid = blockDim.x;
  for (std::uint64_t j = first; j < count; j += stride) convert_chunk<M, S, D>(t, p, j, tid, ntid);
}

struct ChunkRunner {
  const ConvertTask& task;
  const ConvertPlan& plan;
  std::uint64_t first, count, stride;
  template <ConvertMode M, Dtype S, Dtype D>
  __device__ __forceinline__ void operator()() const {
    run_chunks<M, S, D>(task, plan, first, count, stride);
  }
};

__device__ __forceinline__ std::uint64_t copy_bytes(const ConvertTask& t) {
  const unsigned bits = cvt::bits_per_element(static_cast<Dtype>(t.src_dtype));
  return (t.count * bits + 7) / 8;
}

__device__ __forceinline__ bool valid_code(std::uint32_t code) {
  return code < static_cast<std::uint32_t>(kDtypeCount);
}

struct ConvertChunks {
  __device__ __forceinline__ std::uint64_t operator()(const ConvertTask& t) const {
    if (!valid_code(t.src_dtype) || !valid_code(t.dst_dtype)) return 0;
    if (t.src_dtype == t.dst_dtype) return plan_move(t.src, t.dst, copy_bytes(t)).chunks;
    if (!cvt::pair_supported(static_cast<Dtype>(t.src_dtype), static_cast<Dtype>(t.dst_dtype)) ||
        t.mode >= kConvertModeCount)
      return 0;
    return plan_convert(t, elem_size(t.src_dtype), elem_size(t.dst_dtype)).chunks;
  }
};

struct ConvertBody {
  __device__ __forceinline__ void operator()(const ConvertTask& t, std::uint64_t first,
                                             std::uint64_t count, std::uint64_t stride) const {
    if (t.src_dtype == t.dst_dtype) {
      move_chunks(t.src, t.dst, copy_bytes(t), first, count, stride);
      return;
    }
    const ConvertPlan p = plan_convert(t, elem_size(t.src_dtype), elem_size(t.dst_dtype));
    cvt::dispatch(static_cast<ConvertMode>(t.mode), static_cast<Dtype>(t.src_dtype),
                  static_cast<Dtype>(t.dst_dtype), ChunkRunner{t, p, first, count, stride});
  }
};

}  // namespace
}  // namespace fst::kernels::dev

// At most 256 threads per block; 3 blocks per multiprocessor keep it at 80 registers.
extern "C" __global__ void __launch_bounds__(256, 3)
    fst_convert_batch(const fst::kernels::ConvertTask* __restrict__ tasks, std::uint32_t n_tasks) {
  fst::kernels::dev::for_each_chunk(tasks, n_tasks, fst::kernels::dev::ConvertChunks{},
                                    fst::kernels::dev::ConvertBody{});
}
