// Device memory, streams, pinned host memory and the embedded batch kernels (cuda_device.hpp).
#include "device/cuda_device.hpp"

#include <algorithm>
#include <condition_variable>
#include <thread>
#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "detail/fatbin.hpp"
#include "detail/kernel_abi.hpp"
#include "fst/convert.hpp"
#include "fst/cuda.hpp"
#include "fst/errors.hpp"

namespace fst::cuda {

namespace {

// Frees device memory on a thread of its own. The frameworks drop DLPack tensors without
// ordering the free after their queued work, and cuMemFree only "may" synchronise, so a free
// waits for the context's earlier work first (cuCtxSynchronize). That wait must not run on the
// thread dropping the tensor: often Python's, holding the GIL, where it stalls the caller and
// can deadlock against queued collective work that needs the GIL to progress. Never destroyed:
// at exit, frees still pending are left to the process's end rather than waited for.
class Freer {
 public:
  static Freer& get() {
    static Freer* freer = new Freer;
    return *freer;
  }

  void hand_over(int device, CUdeviceptr ptr) noexcept {
    try {
      std::lock_guard<std::mutex> lock(mu_);
      pending_.emplace_back(device, ptr);
      if (!started_) {
        std::thread([this] { run(); }).detach();
        started_ = true;
      }
    } catch (...) {
      return;  // no thread (or no memory for the queue): the block stays allocated
    }
    cv_.notify_all();
  }

  // Returns once every free handed over so far has been done (an allocation that ran out of
  // memory retries after this).
  void flush() {
    std::unique_lock<std::mutex> lock(mu_);
    const std::uint64_t target = handed_ + pending_.size();
    cv_.wait(lock, [&] { return done_ >= target; });
  }

 private:
  void run() {
    std::unique_lock<std::mutex> lock(mu_);
    while (true) {
      cv_.wait(lock, [&] { return !pending_.empty(); });
      std::vector<std::pair<int, CUdeviceptr>> batch;
      batch.swap(pending_);
      handed_ += batch.size();
      lock.unlock();
      std::sort(batch.begin(), batch.end());
      const Driver& d = Driver::get();
      for (std::size_t i = 0; i < batch.size();) {
        const int device = batch[i].first;
        try {
          make_current(device);
          d.cuCtxSynchronize();  // an error here (sticky) does not keep the memory
        } catch (...) {
        }
        for (; i < batch.size() && batch[i].first == device; ++i) d.cuMemFree(batch[i].second);
      }
      lock.lock();
      done_ += batch.size();
      cv_.notify_all();
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::pair<int, CUdeviceptr>> pending_;
  std::uint64_t handed_ = 0, done_ = 0;  // frees taken by the thread / finished
  bool started_ = false;
};

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
      // Memory of tensors dropped a moment ago may still be on its way back.
      Freer::get().flush();
      r = d.cuMemAlloc(&ptr, bytes ? bytes : 256);
    }
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
    Freer::get().hand_over(device_, static_cast<CUdeviceptr>(reinterpret_cast<std::uintptr_t>(data_)));
  }

 private:
  int device_;
};

}  // namespace

std::shared_ptr<Buffer> make_device_arena(int device, std::uint64_t bytes) {
  return std::make_shared<DeviceArena>(device, bytes);
}

const BatchKernel& batch_kernel(int device, const char* image, const char* name) {
  static std::mutex mu;
  static std::map<std::pair<int, std::string>, BatchKernel> loaded;
  std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_pair(device, std::string(name));
  auto it = loaded.find(key);
  if (it != loaded.end()) return it->second;
  const Driver& d = Driver::get();
  ScopedDevice scope(device);
  const kernels::FatbinImage* found = nullptr;
  for (std::size_t i = 0; i < kernels::kFatbinCount; ++i)
    if (std::string(kernels::kFatbins[i].name) == image) found = &kernels::kFatbins[i];
  if (!found) throw CudaError("fst was built without its CUDA kernels (FST_CUDA=OFF or no nvcc)");
  CUmodule module = nullptr;  // kept for the life of the process, like the function in it
  check(d.cuModuleLoadData(&module, found->begin), ("cuModuleLoadData (fst " + std::string(image) + " kernels)").c_str());
  BatchKernel k;
  check(d.cuModuleGetFunction(&k.function, module, name), "cuModuleGetFunction");
  CUdevice dev;
  check(d.cuDeviceGet(&dev, device), "cuDeviceGet");
  int sms = 1;
  d.cuDeviceGetAttribute(&sms, kAttrMultiprocessorCount, dev);
  k.sm_count = static_cast<unsigned>(sms);
  return loaded.emplace(key, k).first->second;
}

void launch_batch(const BatchKernel& kernel, CUdeviceptr tasks, std::uint32_t count, std::uint64_t bytes,
                  CUstream stream, const char* what) {
  // Both kernels take (const Task* tasks, uint32_t n_tasks); the pointer travels as a device address.
  void* params[] = {&tasks, &count};
  check(Driver::get().cuLaunchKernel(kernel.function, kernels::suggested_grid(bytes, kernel.sm_count), 1, 1,
                                     kernels::kBlockThreads, 1, 1, 0, stream, params, nullptr),
        what);
}

PinnedBuffer::PinnedBuffer(int device, std::size_t bytes, const char* what) : device_(device) {
  ScopedDevice scope(device);
  check(Driver::get().cuMemHostAlloc(&data_, bytes ? bytes : 1, kMemHostAllocPortable), what);
  // O_DIRECT reads land in these buffers, which needs page alignment; cuMemHostAlloc gives it
  // in practice, but does not promise it.
  if (reinterpret_cast<std::uintptr_t>(data_) % 4096) {
    Driver::get().cuMemFreeHost(data_);
    throw CudaError(std::string(what) + ": cuMemHostAlloc returned memory that is not page aligned");
  }
}

PinnedBuffer::~PinnedBuffer() {
  try {
    ScopedDevice scope(device_);
    Driver::get().cuMemFreeHost(data_);
  } catch (...) {
  }
}

Stream::Stream(int device) : device_(device) {
  ScopedDevice scope(device);
  check(Driver::get().cuStreamCreate(&stream_, kStreamNonBlocking), "cuStreamCreate");
}

Stream::~Stream() {
  const Driver& d = Driver::get();
  try {
    ScopedDevice scope(device_);
    d.cuStreamSynchronize(stream_);
    d.cuStreamDestroy(stream_);
  } catch (...) {
  }
}

void Stream::synchronize() const { check(Driver::get().cuStreamSynchronize(stream_), "cuStreamSynchronize"); }

Event::Event(int device) : device_(device) {
  ScopedDevice scope(device);
  check(Driver::get().cuEventCreate(&event_, kEventBlockingSync | kEventDisableTiming), "cuEventCreate");
}

Event::~Event() {
  try {
    ScopedDevice scope(device_);
    Driver::get().cuEventDestroy(event_);
  } catch (...) {
  }
}

void Event::record(CUstream stream) const { check(Driver::get().cuEventRecord(event_, stream), "cuEventRecord"); }

bool Event::finished() const {
  const CUresult r = Driver::get().cuEventQuery(event_);
  if (r == kErrorNotReady) return false;
  check(r, "cuEventQuery");
  return true;
}

void Event::wait() const { check(Driver::get().cuEventSynchronize(event_), "cuEventSynchronize"); }

}  // namespace fst::cuda

namespace fst {

namespace {

// `repeats` launches of a batch kernel over `tasks` on the legacy default stream, then a wait.
template <class Task>
void launch_and_wait(int device, const char* image, const char* name, const std::vector<Task>& tasks,
                     std::uint64_t bytes, unsigned repeats) {
  using namespace cuda;
  const Driver& d = Driver::get();
  ScopedDevice scope(device);
  const BatchKernel& kernel = batch_kernel(device, image, name);
  if (tasks.empty()) return;
  TaskList<Task> list(device, tasks.size());  // lives until the launches using it have finished
  const CUdeviceptr list_address = list.upload(tasks, nullptr);
  const std::string what = std::string("cuLaunchKernel (") + name + ")";
  for (unsigned i = 0; i < repeats; ++i)
    launch_batch(kernel, list_address, static_cast<std::uint32_t>(tasks.size()), bytes, nullptr, what.c_str());
  check(d.cuStreamSynchronize(nullptr), "cuStreamSynchronize");
}

}  // namespace

void convert_on_device(int device, std::uint64_t src, Dtype from, std::uint64_t dst, Dtype to,
                       std::uint64_t count, unsigned repeats, ConvertMode mode) {
  if (from != to && !conversion_supported(from, to))
    throw UnsupportedError("no conversion from " + std::string(dtype_name(from)) + " to " + std::string(dtype_name(to)));
  const std::vector<kernels::ConvertTask> tasks{{src, dst, count, static_cast<std::uint32_t>(from),
                                                 static_cast<std::uint32_t>(to), static_cast<std::uint32_t>(mode)}};
  launch_and_wait(device, "convert", kernels::kConvertKernel, tasks,
                  count * std::max(dtype_bits(from), dtype_bits(to)) / 8, repeats);
}

void move_on_device(int device, const std::vector<DeviceMove>& moves, unsigned repeats) {
  std::vector<kernels::MoveTask> tasks;
  tasks.reserve(moves.size());
  std::uint64_t bytes = 0;
  for (const DeviceMove& m : moves) {
    tasks.push_back(kernels::MoveTask{m.src, m.dst, m.bytes});
    bytes += m.bytes;
  }
  launch_and_wait(device, "align", kernels::kMoveKernel, tasks, bytes, repeats);
}

}  // namespace fst
