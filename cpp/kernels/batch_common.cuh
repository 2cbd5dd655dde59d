// Device-side pieces shared by the batched kernels (convert.cu, align.cu): the chunk scheduler
// that spreads the work of many tasks over the blocks of one launch, and the byte mover.
#pragma once

#include <cstdint>

#include "detail/kernel_abi.hpp"

namespace fst::kernels::dev {

// Bytes of the wider side that one thread handles per chunk.
constexpr unsigned kThreadBytes = kChunkBytes / kBlockThreads;
static_assert(kThreadBytes % 16 == 0, "per-thread work must be whole 16-byte vectors");
// Task descriptors staged in shared memory at a time.
constexpr unsigned kTaskBatch = 128;

// Deals the chunks of all tasks to the blocks: chunks are numbered consecutively across tasks
// and dealt round-robin to the blocks of the grid, so any grid size balances both many small
// tasks and a few large ones. For each task with chunks for this block, calls
// body(task, first, count, stride): the block must run chunks first, first + stride, ... below
// count. chunks(task) must give the same value in every block; body is executed by all threads
// of the block together. (The chunk loop lives in the body so that per-dtype code is hoisted
// out of it only within its own branch.)
template <class Task, class Chunks, class Body>
__device__ __forceinline__ void for_each_chunk(const Task* __restrict__ tasks, std::uint32_t n,
                                               Chunks chunks, Body body) {
  __shared__ Task staged[kTaskBatch];
  const std::uint64_t grid = gridDim.x;
  std::uint64_t base = 0;  // number of the first chunk of the current task
  for (std::uint32_t batch = 0; batch < n; batch += kTaskBatch) {
    const std::uint32_t count = n - batch < kTaskBatch ? n - batch : kTaskBatch;
    __syncthreads();  // the previous batch is no longer read
    for (std::uint32_t i = threadIdx.x; i < count; i += blockDim.x) staged[i] = tasks[batch + i];
    __syncthreads();
    for (std::uint32_t t = 0; t < count; ++t) {
      const Task task = staged[t];
      const std::uint64_t c = chunks(task);
      const std::uint64_t first = (blockIdx.x + grid - base % grid) % grid;
      if (first < c) body(task, first, c, grid);
      base += c;
    }
  }
}

// ---- byte mover ----------------------------------------------------------------------------
// Layout of one byte range: `head` bytes until the destination is 16-byte aligned, then
// `words` 16-byte destination words built from the source by vector loads (source 16-byte
// aligned too), aligned 4-byte loads (source 4-byte aligned) or aligned 4-byte loads joined by
// funnel shifts (any other source), then a byte-wise tail. Loads never go past the end of the
// source range; the funnel-shift path reads from the aligned 4-byte word that contains the
// first source byte, which lies in the same allocation.
struct MovePlan {
  std::uint64_t head, words, tail, chunks;
};

__device__ __forceinline__ MovePlan plan_move(std::uint64_t src, std::uint64_t dst,
                                              std::uint64_t bytes) {
  MovePlan p{0, 0, 0, 0};
  if (bytes == 0 || src == dst) return p;
  std::uint64_t head = (16 - (dst & 15)) & 15;
  if (head > bytes) head = bytes;
  std::uint64_t words = (bytes - head) / 16;
  const std::uint64_t s0 = src + head;
  const unsigned shift = static_cast<unsigned>(s0 & 3);
  if (shift != 0 && words > 0) {
    // The last word reads the aligned 4-byte word starting at s0 - shift + 16 * words + 16;
    // keep it inside the source range.
    const std::uint64_t end = src + bytes;
    while (words > 0 && s0 - shift + 16 * words + 4 > end) --words;
  }
  p.head = head;
  p.words = words;
  p.tail = bytes - head - 16 * words;
  const std::uint64_t per_chunk = static_cast<std::uint64_t>(blockDim.x) * (kThreadBytes / 16);
  p.chunks = words ? (words + per_chunk - 1) / per_chunk : 1;
  return p;
}

// Chunk j of a range planned by plan_move, executed by the whole block.
__device__ __forceinline__ void move_chunk(std::uint64_t src, std::uint64_t dst,
                                           const MovePlan& p, std::uint64_t j) {
  constexpr unsigned kWordsPerThread = kThreadBytes / 16;
  const unsigned char* __restrict__ s = reinterpret_cast<const unsigned char*>(src);
  unsigned char* __restrict__ d = reinterpret_cast<unsigned char*>(dst);
  if (j == 0) {
    for (std::uint64_t i = threadIdx.x; i < p.head; i += blockDim.x) d[i] = s[i];
    const std::uint64_t t0 = p.head + 16 * p.words;
    for (std::uint64_t i = threadIdx.x; i < p.tail; i += blockDim.x) d[t0 + i] = s[t0 + i];
  }
  if (p.words == 0) return;
  const std::uint64_t s0 = src + p.head;
  uint4* __restrict__ dw = reinterpret_cast<uint4*>(dst + p.head);
  const std::uint64_t w0 = j * blockDim.x * kWordsPerThread + threadIdx.x;
  const unsigned shift = static_cast<unsigned>(s0 & 3);
  if ((s0 & 15) == 0) {
    const uint4* __restrict__ sw = reinterpret_cast<const uint4*>(s0);
    uint4 v[kWordsPerThread];
#pragma unroll
    for (unsigned u = 0; u < kWordsPerThread; ++u) {
      const std::uint64_t w = w0 + static_cast<std::uint64_t>(u) * blockDim.x;
      if (w < p.words) v[u] = sw[w];
    }
#pragma unroll
    for (unsigned u = 0; u < kWordsPerThread; ++u) {
      const std::uint64_t w = w0 + static_cast<std::uint64_t>(u) * blockDim.x;
      if (w < p.words) dw[w] = v[u];
    }
  } else if (shift == 0) {
    const std::uint32_t* __restrict__ sw = reinterpret_cast<const std::uint32_t*>(s0);
#pragma unroll
    for (unsigned u = 0; u < kWordsPerThread; ++u) {
      const std::uint64_t w = w0 + static_cast<std::uint64_t>(u) * blockDim.x;
      if (w < p.words) {
        const std::uint32_t* q = sw + 4 * w;
        dw[w] = make_uint4(q[0], q[1], q[2], q[3]);
      }
    }
  } else {
    const std::uint32_t* __restrict__ sw = reinterpret_cast<const std::uint32_t*>(s0 - shift);
    const unsigned bits = 8 * shift;
#pragma unroll
    for (unsigned u = 0; u < kWordsPerThread; ++u) {
      const std::uint64_t w = w0 + static_cast<std::uint64_t>(u) * blockDim.x;
      if (w < p.words) {
        const std::uint32_t* q = sw + 4 * w;
        const std::uint32_t a = q[0], b = q[1], c = q[2], e = q[3], f = q[4];
        dw[w] = make_uint4(__funnelshift_r(a, b, bits), __funnelshift_r(b, c, bits),
                           __funnelshift_r(c, e, bits), __funnelshift_r(e, f, bits));
      }
    }
  }
}

__device__ __forceinline__ void move_chunks(std::uint64_t src, std::uint64_t dst,
                                            std::uint64_t bytes, std::uint64_t first,
                                            std::uint64_t count, std::uint64_t stride) {
  const MovePlan p = plan_move(src, dst, bytes);
  for (std::uint64_t j = first; j < count; j += stride) move_chunk(src, dst, p, j);
}

}  // namespace fst::kernels::dev
