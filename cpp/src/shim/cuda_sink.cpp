// Device memory and the CUDA staging sink: pinned host buffers, one stream per lane,
// cuMemcpyHtoDAsync into a device arena freed when its last tensor dies.
#include <vector>

#include "fst/cuda.hpp"
#include "fst/staging.hpp"
#include "fst/errors.hpp"
#include "shim/cuda_api.hpp"

namespace fst {

namespace {

using namespace cuda;

// One cuMemAlloc'ed block in the primary context of `device`.
class DeviceArena final : public Buffer {
 public:
  DeviceArena(int device, std::uint64_t bytes) : device_(device) {
    const Driver& d = Driver::get();
    ScopedDevice scope(device);
    size_ = bytes;
    CUdeviceptr ptr = 0;
    // A zero-byte arena still gets an address for empty tensors to point at.
    CUresult r = d.cuMemAlloc(&ptr, bytes ? bytes : 256);
    if (r == kErrorOutOfMemory) {
      std::size_t free = 0, total = 0;
      d.cuMemGetInfo(&free, &total);
      throw CudaError("out of GPU memory on cuda:" + std::to_string(device) + ": the load needs " +
                      std::to_string(bytes) + " bytes, " + std::to_string(free) + " are free");
    }
    check(r, "cuMemAlloc");
    data_ = reinterpret_cast<std::byte*>(static_cast<std::uintptr_t>(ptr));
  }
  ~DeviceArena() override {
    const Driver& d = Driver::get();
    try {
      ScopedDevice scope(device_);
      d.cuMemFree(static_cast<CUdeviceptr>(reinterpret_cast<std::uintptr_t>(data_)));
    } catch (...) {
      // The driver may already be shut down at interpreter exit: nothing left to free then.
    }
  }

 private:
  int device_;
};

class CudaSink final : public StagingSink {
 public:
  CudaSink(int device, std::uint64_t arena_bytes)
      : device_(device), dest_(std::make_shared<DeviceArena>(device, arena_bytes)) {}

  ~CudaSink() override {
    const Driver& d = Driver::get();
    try {
      ScopedDevice scope(device_);
      for (Lane& lane : lanes_) {
        if (lane.stream) {
          d.cuStreamSynchronize(lane.stream);
          d.cuStreamDestroy(lane.stream);
        }
        if (lane.buffer) d.cuMemFreeHost(lane.buffer);
      }
    } catch (...) {
    }
  }

  std::byte* staging_buffer(unsigned lane, std::size_t bytes) override {
    const Driver& d = Driver::get();
    ScopedDevice scope(device_);
    if (lanes_.size() <= lane) lanes_.resize(lane + 1);
    Lane& l = lanes_[lane];
    check(d.cuStreamCreate(&l.stream, kStreamNonBlocking), "cuStreamCreate");
    void* p = nullptr;
    // Pinned and page aligned, so O_DIRECT can read into it and the copy engine can DMA from it.
    check(d.cuMemHostAlloc(&p, bytes, kMemHostAllocPortable), "cuMemHostAlloc (pinned staging buffer)");
    l.buffer = p;
    return static_cast<std::byte*>(p);
  }

  // Pool threads belong to the load: the context can stay current on them.
  void bind_thread() override { make_current(device_); }

  void copy_async(unsigned lane, std::uint64_t dst_offset, const std::byte* src, std::uint64_t bytes) override {
    if (bytes == 0) return;
    const Driver& d = Driver::get();
    auto dst = static_cast<CUdeviceptr>(reinterpret_cast<std::uintptr_t>(dest_->data()) + dst_offset);
    check(d.cuMemcpyHtoDAsync(dst, src, bytes, lanes_[lane].stream), "cuMemcpyHtoDAsync");
  }

  void wait(unsigned lane) override {
    check(Driver::get().cuStreamSynchronize(lanes_[lane].stream), "cuStreamSynchronize");
  }

  std::shared_ptr<Buffer> destination() override { return dest_; }
  ExportDevice device() const override { return ExportDevice{ExportDevice::kCUDA, device_}; }

 private:
  struct Lane {
    CUstream stream = nullptr;
    void* buffer = nullptr;
  };
  int device_;
  std::shared_ptr<DeviceArena> dest_;
  std::vector<Lane> lanes_;
};

}  // namespace

std::unique_ptr<StagingSink> make_cuda_sink(int device, std::uint64_t arena_bytes) {
  return std::make_unique<CudaSink>(device, arena_bytes);
}

}  // namespace fst
