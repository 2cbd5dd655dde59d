// Stands in for the CUDA built-ins so that fst's kernel sources (cpp/kernels/*.cu) compile as
// host C++ inside the fake driver (fake_cuda.cpp). Force-included before each kernel file.
//
// How a launch runs: the blocks of the grid run one after another; the threads of one block
// run at the same time, each on a real host thread whose `threadIdx` is its own
// (thread_local), and __syncthreads() is a barrier across them. Because only one block runs at
// a time, a function-local `static` is that block's shared memory.
#pragma once

#include <cstdint>
#include <cstring>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

namespace fake_cuda {
struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
};
void sync_threads();
}  // namespace fake_cuda

extern thread_local fake_cuda::Dim3 threadIdx;
extern fake_cuda::Dim3 blockIdx, blockDim, gridDim;

inline void __syncthreads() { fake_cuda::sync_threads(); }

struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

// __funnelshift_r as CUDA defines it: hi:lo shifted right by shift mod 32, the low 32 bits.
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned shift) {
  shift &= 31;
  return static_cast<unsigned>(((static_cast<std::uint64_t>(hi) << 32) | lo) >> shift);
}
