// Device memory and the CUDA staging sink: pinned host buffers, one stream per lane,
// cuMemcpyHtoDAsync into a device arena freed when its last tensor dies.
#include <algorithm>
#include <cstring>
#include <deque>
#include <mutex>
#include <string>
#include <vector>

#include "fst/cuda.hpp"
#include "fst/staging.hpp"
#include "detail/fatbin.hpp"
#include "detail/kernel_abi.hpp"
#include "fst/errors.hpp"
#include "shim/cuda_api.hpp"
#include "shim/cuda_device.hpp"

namespace fst {

namespace {

using namespace cuda;

class CudaSink final : public StagingSink {
 public:
  explicit CudaSink(int device) : device_(device) { ScopedDevice check_available(device); }

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
        if (lane.host_tasks) d.cuMemFreeHost(lane.host_tasks);
        if (lane.scratch) d.cuMemFree(lane.scratch);
        if (lane.device_tasks) d.cuMemFree(lane.device_tasks);
      }
    } catch (...) {
    }
  }

  std::shared_ptr<Buffer> allocate(std::uint64_t bytes) override {
    return make_device_arena(device_, bytes);
  }

  std::byte* staging_buffer(unsigned lane, std::size_t bytes) override {
    const Driver& d = Driver::get();
    ScopedDevice scope(device_);
    Lane& l = lane_of(lane);
    check(d.cuStreamCreate(&l.stream, kStreamNonBlocking), "cuStreamCreate");
    void* p = nullptr;
    // Pinned and page aligned, so O_DIRECT can read into it and the copy engine can DMA from it.
    check(d.cuMemHostAlloc(&p, bytes, kMemHostAllocPortable), "cuMemHostAlloc (pinned staging buffer)");
    l.buffer = p;
    return static_cast<std::byte*>(p);
  }

  std::uint64_t scratch(unsigned lane, std::size_t bytes) override {
    ScopedDevice scope(device_);
    Lane& l = lane_of(lane);
    check(Driver::get().cuMemAlloc(&l.scratch, bytes), "cuMemAlloc (conversion scratch)");
    return l.scratch;
  }

  bool converts() const override { return kernels::kFatbinCount > 0; }

  void reserve_tasks(unsigned lanes, std::size_t max_tasks) override {
    const Driver& d = Driver::get();
    ScopedDevice scope(device_);
    const std::size_t bytes = std::max<std::size_t>(max_tasks, 1) * sizeof(kernels::ConvertTask);
    for (unsigned lane = 0; lane < lanes; ++lane) {
      Lane& l = lane_of(lane);
      check(d.cuMemHostAlloc(&l.host_tasks, bytes, kMemHostAllocPortable), "cuMemHostAlloc (task list)");
      check(d.cuMemAlloc(&l.device_tasks, bytes), "cuMemAlloc (task list)");
    }
  }

  // Pool threads belong to the load: the context can stay current on them.
  void bind_thread() override { make_current(device_); }

  void copy_async(unsigned lane, std::uint64_t dst, const std::byte* src, std::uint64_t bytes) override {
    if (bytes == 0) return;
    check(Driver::get().cuMemcpyHtoDAsync(dst, src, bytes, lanes_[lane].stream), "cuMemcpyHtoDAsync");
  }

  void convert_async(unsigned lane, const std::vector<kernels::ConvertTask>& tasks) override {
    const Driver& d = Driver::get();
    const BatchKernel& kernel = batch_kernel(device_, "convert", kernels::kConvertKernel);
    Lane& l = lanes_[lane];
    // The lane's task list is free: the lane is reused only after its stream has drained.
    std::memcpy(l.host_tasks, tasks.data(), tasks.size() * sizeof(kernels::ConvertTask));
    check(d.cuMemcpyHtoDAsync(l.device_tasks, l.host_tasks, tasks.size() * sizeof(kernels::ConvertTask), l.stream),
          "cuMemcpyHtoDAsync (task list)");
    std::uint64_t bytes = 0;
    for (const auto& t : tasks) bytes += t.count * 8;  // an upper bound of the wider side
    launch_batch(kernel, l.device_tasks, static_cast<std::uint32_t>(tasks.size()), bytes, l.stream,
                 "cuLaunchKernel (fst_convert_batch)");
  }

  void wait(unsigned lane) override {
    check(Driver::get().cuStreamSynchronize(lanes_[lane].stream), "cuStreamSynchronize");
  }

  ExportDevice device() const override { return ExportDevice{ExportDevice::kCUDA, device_}; }

 private:
  struct Lane {
    CUstream stream = nullptr;
    void* buffer = nullptr;
    void* host_tasks = nullptr;
    CUdeviceptr scratch = 0;
    CUdeviceptr device_tasks = 0;
  };
  Lane& lane_of(unsigned lane) {
    if (lanes_.size() <= lane) lanes_.resize(lane + 1);
    return lanes_[lane];
  }
  int device_;
  std::deque<Lane> lanes_;
};

}  // namespace

std::unique_ptr<StagingSink> make_cuda_sink(int device) {
  return std::make_unique<CudaSink>(device);
}

}  // namespace fst
