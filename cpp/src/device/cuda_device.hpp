// Device memory, streams, pinned host memory and the embedded batch kernels: what both the
// staging sink (cuda_sink.cpp) and the GPU Direct Storage device (cufile_device.cpp) use.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <vector>

#include "fst/buffer.hpp"
#include "shim/cuda_api.hpp"

namespace fst::cuda {

// The device address of device memory that a Buffer holds.
inline CUdeviceptr device_address(const Buffer& b) noexcept {
  return static_cast<CUdeviceptr>(reinterpret_cast<std::uintptr_t>(b.data()));
}

// One cuMemAlloc'ed block in the primary context of `device`. When its last reference goes it
// is handed to fst's freeing thread, which frees it after the context's earlier work (the
// caller never waits). Running out of memory, after the frees under way, is a CudaError naming
// the bytes needed and free.
std::shared_ptr<Buffer> make_device_arena(int device, std::uint64_t bytes);

// A batched kernel of the embedded fatbins (see detail/kernel_abi.hpp), loaded once per device.
struct BatchKernel {
  CUfunction function = nullptr;
  unsigned sm_count = 1;
};
// `image` is the kernel file ("convert", "align"), `name` the kernel in it. Throws CudaError
// when fst was built without its kernels.
const BatchKernel& batch_kernel(int device, const char* image, const char* name);
// Launches `kernel` over `count` tasks at device address `tasks` on `stream`; `bytes` (the
// tasks' total size, wider side) sets the grid.
void launch_batch(const BatchKernel& kernel, CUdeviceptr tasks, std::uint32_t count, std::uint64_t bytes,
                  CUstream stream, const char* what);

// Page-locked host memory (cuMemHostAlloc), freed on destruction.
class PinnedBuffer {
 public:
  PinnedBuffer(int device, std::size_t bytes, const char* what);
  ~PinnedBuffer();
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  void* data() const noexcept { return data_; }

 private:
  int device_;
  void* data_ = nullptr;
};

// A non-blocking stream of the primary context of `device`; drained and destroyed on
// destruction.
class Stream {
 public:
  explicit Stream(int device);
  ~Stream();
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  CUstream get() const noexcept { return stream_; }
  void synchronize() const;

 private:
  int device_;
  CUstream stream_ = nullptr;
};

// An event for waiting on a stream's work: created with CU_EVENT_BLOCKING_SYNC, so a thread
// waiting on it sleeps rather than spins (whatever scheduling flags the primary context has:
// torch and JAX own those, and fst never changes them), and without timing, which costs.
class Event {
 public:
  explicit Event(int device);
  ~Event();
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  void record(CUstream stream) const;
  bool finished() const;  // cuEventQuery: never blocks
  void wait() const;      // cuEventSynchronize

 private:
  int device_;
  CUevent event_ = nullptr;
};

// A task list of one kernel launch: filled in pinned host memory, copied to the device on the
// stream before the launch. Reused only after the stream has drained (its owner waits for the
// stream before the next upload).
template <class Task>
class TaskList {
 public:
  TaskList(int device, std::size_t most)
      : host_(device, std::max<std::size_t>(most, 1) * sizeof(Task), "cuMemHostAlloc (task list)"),
        device_(make_device_arena(device, std::max<std::size_t>(most, 1) * sizeof(Task))),
        most_(most) {}

  std::size_t capacity() const noexcept { return most_; }

  CUdeviceptr upload(const std::vector<Task>& tasks, CUstream stream) {
    if (tasks.size() > most_) throw std::logic_error("more kernel tasks than reserved");
    std::memcpy(host_.data(), tasks.data(), tasks.size() * sizeof(Task));
    const CUdeviceptr address = device_address(*device_);
    check(Driver::get().cuMemcpyHtoDAsync(address, host_.data(), tasks.size() * sizeof(Task), stream),
          "cuMemcpyHtoDAsync (task list)");
    return address;
  }

 private:
  PinnedBuffer host_;
  std::shared_ptr<Buffer> device_;
  std::size_t most_;
};

}  // namespace fst::cuda
