// Device memory and the CUDA staging sink: pinned host buffers, one stream per lane,
// cuMemcpyHtoDAsync into a device arena freed when its last tensor dies.
#include <algorithm>
#include <cstring>
#include <deque>
#include <optional>
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
  explicit CudaSink(int device) : device_(device) {
    ScopedDevice check_available(device);
    // Load the kernels now, not on a reading thread halfway through the load: where one cannot
    // load (code built for a newer driver, say), the framework converts instead, or each piece
    // is copied on its own.
    convert_kernel_ = load_kernel("convert", kernels::kConvertKernel);
    move_kernel_ = load_kernel("align", kernels::kMoveKernel);
  }

  std::shared_ptr<Buffer> allocate(std::uint64_t bytes) override { return make_device_arena(device_, bytes); }

  void reserve_lanes(unsigned lanes) override {
    if (lanes_.size() < lanes) lanes_.resize(lanes);
    for (Lane& l : lanes_)
      if (!l.stream) l.stream = std::make_unique<Stream>(device_);
  }

  std::byte* staging_buffer(unsigned lane, std::size_t bytes) override {
    Lane& l = lanes_.at(lane);  // lanes are reserved: concurrent calls touch only their own
    if (!l.buffer || l.buffer_bytes < bytes) {
      // Pinned and page aligned, so O_DIRECT can read into it and the copy engine can DMA from it.
      l.buffer.reset();
      l.buffer = std::make_unique<PinnedBuffer>(device_, bytes, "cuMemHostAlloc (pinned staging buffer)");
      l.buffer_bytes = bytes;
      ++buffers_allocated_;
    }
    return static_cast<std::byte*>(l.buffer->data());
  }

  std::uint64_t scratch(unsigned lane, std::size_t bytes) override {
    Lane& l = lanes_.at(lane);
    if (!l.scratch || l.scratch->size() < bytes) {
      l.scratch.reset();
      l.scratch = make_device_arena(device_, bytes);
    }
    return device_address(*l.scratch);
  }

  bool converts() const override { return convert_kernel_ != nullptr; }
  bool moves() const override { return move_kernel_ != nullptr; }

  void reserve_tasks(unsigned lanes, std::size_t max_moves, std::size_t max_converts) override {
    for (unsigned lane = 0; lane < lanes; ++lane) {
      Lane& l = lanes_.at(lane);
      // Separate lists: a request may queue both launches before either has run.
      if (max_moves && (!l.moves || l.moves->capacity() < max_moves)) {
        l.moves.reset();
        l.moves.emplace(device_, max_moves);
      }
      if (max_converts && (!l.converts || l.converts->capacity() < max_converts)) {
        l.converts.reset();
        l.converts.emplace(device_, max_converts);
      }
    }
  }

  // Pool threads belong to the load: the context can stay current on them.
  void bind_thread() override { make_current(device_); }

  void copy_async(unsigned lane, std::uint64_t dst, const std::byte* src, std::uint64_t bytes) override {
    if (bytes == 0) return;
    check(Driver::get().cuMemcpyHtoDAsync(dst, src, bytes, lanes_[lane].stream->get()), "cuMemcpyHtoDAsync");
  }

  void convert_async(unsigned lane, const std::vector<kernels::ConvertTask>& tasks) override {
    Lane& l = lanes_[lane];
    std::uint64_t bytes = 0;
    for (const auto& t : tasks) bytes += t.count * 8;  // an upper bound of the wider side
    // The lane's task lists are free: the lane is reused only after its stream has drained.
    launch_batch(*convert_kernel_, l.converts->upload(tasks, l.stream->get()), static_cast<std::uint32_t>(tasks.size()),
                 bytes, l.stream->get(), "cuLaunchKernel (fst_convert_batch)");
  }

  void move_async(unsigned lane, const std::vector<kernels::MoveTask>& tasks) override {
    Lane& l = lanes_[lane];
    std::uint64_t bytes = 0;
    for (const auto& t : tasks) bytes += t.bytes;
    launch_batch(*move_kernel_, l.moves->upload(tasks, l.stream->get()), static_cast<std::uint32_t>(tasks.size()),
                 bytes, l.stream->get(), "cuLaunchKernel (fst_move_batch)");
  }

  void wait(unsigned lane) override {
    // Also called on the caller's thread, where no context may be current.
    ScopedDevice scope(device_);
    lanes_[lane].stream->synchronize();
  }

  ExportDevice device() const override { return ExportDevice{ExportDevice::kCUDA, device_}; }

 private:
  // Members are destroyed in reverse order: the stream first, which waits for its work, then
  // the memory that work used.
  struct Lane {
    std::unique_ptr<PinnedBuffer> buffer;
    std::size_t buffer_bytes = 0;
    std::shared_ptr<Buffer> scratch;
    std::optional<TaskList<kernels::MoveTask>> moves;
    std::optional<TaskList<kernels::ConvertTask>> converts;
    std::unique_ptr<Stream> stream;
  };
  const BatchKernel* load_kernel(const char* image, const char* name) const {
    if (kernels::kFatbinCount == 0) return nullptr;
    try {
      return &batch_kernel(device_, image, name);
    } catch (const CudaError&) {
      return nullptr;
    }
  }
  int device_;
  const BatchKernel* convert_kernel_ = nullptr;
  const BatchKernel* move_kernel_ = nullptr;
  std::deque<Lane> lanes_;  // a deque: references to lanes stay valid as it grows
};

}  // namespace

std::shared_ptr<StagingSink> make_cuda_sink(int device) {
  return std::make_shared<CudaSink>(device);
}

}  // namespace fst
