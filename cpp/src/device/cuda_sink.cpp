// The CUDA staging sink and the staging pools behind it: per device, one process-wide pool of
// pinned buffers, each with its own stream and blocking-sync event; per load (or per stream of
// loads), the device memory the copies and kernels use besides the destination.
#include <algorithm>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "detail/fatbin.hpp"
#include "detail/kernel_abi.hpp"
#include "fst/cuda.hpp"
#include "fst/errors.hpp"
#include "fst/staging.hpp"
#include "shim/cuda_api.hpp"
#include "device/cuda_device.hpp"

namespace fst {

namespace {

using namespace cuda;

constexpr std::size_t kTaskAlign = 256;

std::size_t round_up(std::size_t v, std::size_t a) { return (v + a - 1) / a * a; }

// Bytes of the task lists of one request: its moves, then its conversions.
std::size_t task_bytes(std::size_t moves, std::size_t converts) {
  return round_up(std::max<std::size_t>(moves, 1) * sizeof(kernels::MoveTask), kTaskAlign) +
         std::max<std::size_t>(converts, 1) * sizeof(kernels::ConvertTask);
}

class CudaPool final : public StagingPool {
 public:
  CudaPool(int device, std::uint64_t budget) : StagingPool(budget), device_(device) {}
  ~CudaPool() override { close(); }

  CUstream stream(unsigned slot) { return parts(slot).stream.get(); }

  // Pinned memory of at least `bytes` for the kernel task lists of the slot's holder (grown,
  // rarely, when a request has more pieces than any before it on this slot). The previous
  // holder's uploads have finished: acquire() waited for them.
  void* task_area(unsigned slot, std::size_t bytes) {
    Parts& p = parts(slot);
    if (p.task_bytes < bytes) {
      p.tasks.reset();
      p.task_bytes = std::max<std::size_t>(round_up(bytes, 4096), 2 * p.task_bytes);
      p.tasks = std::make_unique<PinnedBuffer>(device_, p.task_bytes, "cuMemHostAlloc (kernel task list)");
    }
    return p.tasks->data();
  }

 protected:
  std::byte* allocate_slot(unsigned slot, std::size_t bytes) override {
    auto p = std::make_unique<Parts>(device_, bytes);
    std::byte* data = static_cast<std::byte*>(p->buffer.data());
    std::lock_guard<std::mutex> lock(mu_);
    parts_[slot] = std::move(p);
    return data;
  }
  void free_slot(unsigned slot) noexcept override {
    std::unique_ptr<Parts> gone;
    std::lock_guard<std::mutex> lock(mu_);
    gone = std::move(parts_[slot]);
    parts_.erase(slot);
  }
  void record(unsigned slot) override {
    Parts& p = parts(slot);
    p.event.record(p.stream.get());
  }
  bool finished(unsigned slot) override { return parts(slot).event.finished(); }
  void wait(unsigned slot) override { parts(slot).event.wait(); }

 private:
  // Destroyed in reverse order: the stream first, which waits for its work, then the memory
  // that work used.
  struct Parts {
    Parts(int device, std::size_t bytes)
        : buffer(device, bytes, "cuMemHostAlloc (pinned staging buffer)"), event(device), stream(device) {}
    // Pinned and page aligned, so O_DIRECT can read into it and the copy engine can DMA from it.
    PinnedBuffer buffer;
    std::unique_ptr<PinnedBuffer> tasks;
    std::size_t task_bytes = 0;
    Event event;
    Stream stream;
  };
  Parts& parts(unsigned slot) {
    std::lock_guard<std::mutex> lock(mu_);
    return *parts_.at(slot);
  }

  int device_;
  std::mutex mu_;
  std::map<unsigned, std::unique_ptr<Parts>> parts_;
};

// The process's pools by device ordinal. Never destroyed: stream and memory teardown at exit
// would call into a driver that may already be gone.
std::mutex g_pools_mu;
auto* const g_pools = new std::map<int, std::shared_ptr<CudaPool>>();

std::shared_ptr<CudaPool> pool_for(int device) {
  std::lock_guard<std::mutex> lock(g_pools_mu);
  std::shared_ptr<CudaPool>& pool = (*g_pools)[device];
  if (!pool) pool = std::make_shared<CudaPool>(device, StagingOptions{}.budget);
  return pool;
}

class CudaSink final : public StagingSink {
 public:
  explicit CudaSink(int device) : device_(device) {
    ScopedDevice check_available(device);
    pool_ = pool_for(device);
    // Load the kernels now, not on a reading thread halfway through the load: where one cannot
    // load (code built for a newer driver, say), the framework converts instead, or each piece
    // is copied on its own. Loaded once per device for the life of the process.
    convert_kernel_ = load_kernel("convert", kernels::kConvertKernel);
    move_kernel_ = load_kernel("align", kernels::kMoveKernel);
  }
  // Queued copies and launches use the scratch memory and task lists below.
  ~CudaSink() override { drain(); }

  StagingPool& pool() override { return *pool_; }

  std::shared_ptr<Buffer> allocate(std::uint64_t bytes) override { return make_device_arena(device_, bytes); }

  std::uint64_t scratch(unsigned slot, std::size_t bytes) override {
    std::shared_ptr<Buffer>& memory = device_memory(slot).scratch;  // only the slot's holder calls
    if (!memory || memory->size() < bytes) {
      memory.reset();
      memory = make_device_arena(device_, bytes);
    }
    return device_address(*memory);
  }

  bool converts() const override { return convert_kernel_ != nullptr; }
  bool moves() const override { return move_kernel_ != nullptr; }

  void reserve_tasks(std::size_t max_moves, std::size_t max_converts) override {
    most_moves_ = std::max(most_moves_, max_moves);
    most_converts_ = std::max(most_converts_, max_converts);
  }

  // Reading threads belong to the load: the context can stay current on them.
  void bind_thread() override { make_current(device_); }

  void copy_async(unsigned slot, std::uint64_t dst, const std::byte* src, std::uint64_t bytes) override {
    if (bytes == 0) return;
    check(Driver::get().cuMemcpyHtoDAsync(dst, src, bytes, pool_->stream(slot)), "cuMemcpyHtoDAsync");
  }

  void move_async(unsigned slot, const std::vector<kernels::MoveTask>& tasks) override {
    std::uint64_t bytes = 0;
    for (const auto& t : tasks) bytes += t.bytes;
    launch_batch(*move_kernel_, upload(slot, tasks, 0, most_moves_), static_cast<std::uint32_t>(tasks.size()), bytes,
                 pool_->stream(slot), "cuLaunchKernel (fst_move_batch)");
  }

  void convert_async(unsigned slot, const std::vector<kernels::ConvertTask>& tasks) override {
    std::uint64_t bytes = 0;
    for (const auto& t : tasks) bytes += t.count * 8;  // an upper bound of the wider side
    const std::size_t offset = round_up(std::max<std::size_t>(most_moves_, 1) * sizeof(kernels::MoveTask), kTaskAlign);
    launch_batch(*convert_kernel_, upload(slot, tasks, offset, most_converts_), static_cast<std::uint32_t>(tasks.size()),
                 bytes, pool_->stream(slot), "cuLaunchKernel (fst_convert_batch)");
  }

  ExportDevice device() const override { return ExportDevice{ExportDevice::kCUDA, device_}; }

 private:
  struct DeviceMemory {
    std::shared_ptr<Buffer> scratch;
    std::shared_ptr<Buffer> tasks;
  };
  DeviceMemory& device_memory(unsigned slot) {
    std::lock_guard<std::mutex> lock(mu_);
    return memory_[slot];  // std::map: references stay valid as it grows
  }

  // Copies `tasks` through the slot's pinned task area into this sink's device task list of
  // the slot, at `offset`; returns their device address.
  template <class Task>
  CUdeviceptr upload(unsigned slot, const std::vector<Task>& tasks, std::size_t offset, std::size_t most) {
    if (tasks.size() > most) throw std::logic_error("more kernel tasks than reserved");
    const std::size_t total = task_bytes(most_moves_, most_converts_);
    auto* host = static_cast<std::byte*>(pool_->task_area(slot, total)) + offset;
    std::memcpy(host, tasks.data(), tasks.size() * sizeof(Task));
    std::shared_ptr<Buffer>& list = device_memory(slot).tasks;
    if (!list || list->size() < total) {
      list.reset();
      list = make_device_arena(device_, total);
    }
    const CUdeviceptr address = device_address(*list) + offset;
    check(Driver::get().cuMemcpyHtoDAsync(address, host, tasks.size() * sizeof(Task), pool_->stream(slot)),
          "cuMemcpyHtoDAsync (task list)");
    return address;
  }

  const BatchKernel* load_kernel(const char* image, const char* name) const {
    if (kernels::kFatbinCount == 0) return nullptr;
    try {
      return &batch_kernel(device_, image, name);
    } catch (const CudaError&) {
      return nullptr;
    }
  }

  int device_;
  std::shared_ptr<CudaPool> pool_;
  const BatchKernel* convert_kernel_ = nullptr;
  const BatchKernel* move_kernel_ = nullptr;
  std::size_t most_moves_ = 0, most_converts_ = 0;
  std::mutex mu_;
  std::map<unsigned, DeviceMemory> memory_;  // per pool slot used
};

}  // namespace

std::shared_ptr<StagingSink> make_cuda_sink(int device) {
  return std::make_shared<CudaSink>(device);
}

std::vector<std::pair<int, StagingPool::Usage>> cuda_staging_usage() {
  std::vector<std::pair<int, StagingPool::Usage>> out;
  std::lock_guard<std::mutex> lock(g_pools_mu);
  for (const auto& [device, pool] : *g_pools) out.emplace_back(device, pool->usage());
  return out;
}

std::uint64_t release_cuda_staging() {
  std::vector<std::shared_ptr<CudaPool>> pools;
  {
    std::lock_guard<std::mutex> lock(g_pools_mu);
    for (const auto& [device, pool] : *g_pools) pools.push_back(pool);
  }
  std::uint64_t freed = 0;
  for (const auto& pool : pools) freed += pool->trim();
  return freed;
}

}  // namespace fst
