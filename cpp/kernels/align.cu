// Batched byte moves on the GPU: gathers tensors from unaligned offsets (as they lie in a
// safetensors file image) to aligned slots of a separate destination arena.
//
// Kernels (stable names, looked up by the host with cuModuleGetFunction):
//
//   extern "C" __global__ void fst_move_batch(const fst::kernels::MoveTask* tasks,
//                                             uint32_t n_tasks);
//       Copies tasks[i].bytes bytes from tasks[i].src to tasks[i].dst for every task of the
//       array (in device memory) in one launch. Any alignment works; 16-byte aligned
//       destinations are written with 16-byte stores whatever the source alignment (sources
//       that are not 16-byte aligned are read as aligned 4-byte words and realigned in
//       registers). Launch shape: see cpp/src/detail/kernel_abi.hpp.
//
//       Overlap contract: no destination range may overlap any source range or any other
//       destination range of the same launch (tasks run in parallel and in no order, and
//       so do the pieces of one task), except that a task with dst == src is skipped. Moving
//       tensors within one arena therefore needs a separate destination arena (or one launch
//       per non-overlapping step).
#include <cstdint>

#include "batch_common.cuh"
#include "detail/kernel_abi.hpp"

namespace fst::kernels::dev {
namespace {

struct MoveChunks {
  __device__ __forceinline__ std::uint64_t operator()(const MoveTask& t) const {
    return plan_move(t.src, t.dst, t.bytes).chunks;
  }
};

struct MoveBody {
  __device__ __forceinline__ void operator()(const MoveTask& t, std::uint64_t first,
                                             std::uint64_t count, std::uint64_t stride) const {
    move_chunks(t.src, t.dst, t.bytes, first, count, stride);
  }
};

}  // namespace
}  // namespace fst::kernels::dev

extern "C" __global__ void __launch_bounds__(256)
    fst_move_batch(const fst::kernels::MoveTask* __restrict__ tasks, std::uint32_t n_tasks) {
  fst::kernels::dev::for_each_chunk(tasks, n_tasks, fst::kernels::dev::MoveChunks{},
                                    fst::kernels::dev::MoveBody{});
}
