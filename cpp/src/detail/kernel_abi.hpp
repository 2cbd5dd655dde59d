// The binary interface between the host launcher and the batched CUDA kernels of
// cpp/kernels/*.cu. Plain structs only (no CUDA headers): the host fills arrays of them, copies
// them to device memory and launches the kernels through the driver API (cuLaunchKernel).
//
// Kernels (extern "C", looked up by name with cuModuleGetFunction):
//
//   fst_convert_batch(const ConvertTask* tasks, uint32_t n_tasks)     cpp/kernels/convert.cu
//   fst_move_batch(const MoveTask* tasks, uint32_t n_tasks)           cpp/kernels/align.cu
//
// Launch shape: 1-D blocks of up to kBlockThreads (256) threads, best a multiple of 32; a 1-D
// grid of any size; no dynamic shared memory. The work of all tasks is cut into chunks of
// about kChunkBytes and dealt round-robin to the blocks, so the grid size only sets the
// parallelism; suggested_grid() gives a sensible value.
//
// Contract shared by both kernels (not checked on the device):
//  * no destination range overlaps another destination range or any source range of the same
//    launch (tasks and the pieces of one task run in parallel, in no order); the one exception
//    is a copy (MoveTask, or ConvertTask with src_dtype == dst_dtype) whose source and
//    destination are the same address: it is skipped;
//  * addresses need no particular alignment (16-byte aligned ones are fastest);
//  * the task array itself is in device memory (or host memory mapped into the device).
#pragma once

#include <cstdint>

namespace fst::kernels {

inline constexpr const char* kConvertKernel = "fst_convert_batch";
inline constexpr const char* kMoveKernel = "fst_move_batch";
inline constexpr unsigned kBlockThreads = 256;
// Bytes (of the wider side) that one block handles per chunk at kBlockThreads threads.
inline constexpr unsigned kChunkBytes = 32 * 1024;

// Convert `count` elements from src (dtype src_dtype) to dst (dtype dst_dtype) by the rules of
// `mode` (an fst::ConvertMode value; 0, torch's, when left out). Codes are fst::Dtype values.
// Supported: every pair for which fst::conversion_supported() is true; a task with
// src_dtype == dst_dtype copies ceil(count * bits / 8) bytes (any dtype); a task with an
// unsupported pair or mode is skipped (validate on the host before launching).
struct ConvertTask {
  std::uint64_t src;  // device address of the first source element
  std::uint64_t dst;  // device address of the first destination element
  std::uint64_t count;
  std::uint32_t src_dtype;
  std::uint32_t dst_dtype;
  std::uint32_t mode = 0;
  std::uint32_t reserved = 0;  // keeps the size a multiple of 8 (arrays of tasks)
};
static_assert(sizeof(ConvertTask) == 40, "ConvertTask layout is part of the kernel ABI");

// Copy `bytes` bytes from src to dst (typically from an unaligned offset in a staging buffer to
// an aligned tensor slot in a separate destination arena).
struct MoveTask {
  std::uint64_t src;
  std::uint64_t dst;
  std::uint64_t bytes;
};
static_assert(sizeof(MoveTask) == 24, "MoveTask layout is part of the kernel ABI");

// A grid size for a launch that touches `total_bytes` (sum over tasks of the larger of source
// and destination sizes) on a device with `sm_count` multiprocessors.
inline unsigned suggested_grid(std::uint64_t total_bytes, unsigned sm_count) {
  const std::uint64_t chunks = (total_bytes + kChunkBytes - 1) / kChunkBytes;
  const std::uint64_t cap = static_cast<std::uint64_t>(sm_count ? sm_count : 1) * 8;
  const std::uint64_t g = chunks < cap ? chunks : cap;
  return g ? static_cast<unsigned>(g) : 1u;
}

}  // namespace fst::kernels
