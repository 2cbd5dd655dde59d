// A stand-in libcuda.so.1 for tests on machines without a GPU: the subset of the CUDA driver
// API that fst resolves, with host memory playing device memory (a device address is a host
// address, tracked so that every copy and kernel access is checked against live allocations).
//
//  * Streams: each has a worker thread that runs its copies and launches later, in order
//    (optionally each FST_FAKE_COPY_DELAY_US late), so code that reuses a staging buffer before
//    its copy ran reads wrong bytes.
//  * Events record a position in a stream; cuEventSynchronize/Query wait for or test it.
//  * Modules: cuModuleLoadData accepts a fatbin (checked by its magic number) and
//    cuModuleGetFunction finds fst's two batch kernels, whose own sources (cpp/kernels/*.cu) are
//    compiled into this library for the host through cuda_builtins.hpp.
//  * Errors are sticky like the real driver's: after a failed asynchronous copy every call
//    returns CUDA_ERROR_ILLEGAL_ADDRESS.
//
// Environment:
//   FST_FAKE_CUDA_LOG        file that every call is appended to, one line each:
//                            "<entry point> tid=<n> key=value ..."
//   FST_FAKE_CUINIT          CUresult cuInit returns (default 0)
//   FST_FAKE_DEVICE_MEMORY   bytes of device memory (default 1 GiB); beyond: out of memory
//   FST_FAKE_PINNED_MEMORY   bytes of pinned host memory (default 1 GiB)
//   FST_FAKE_FAIL_COPY       the n-th cuMemcpyHtoDAsync (from 1) fails when it runs
//   FST_FAKE_COPY_DELAY_US   each queued operation starts this late
//   FST_FAKE_CTX_SYNC_MS     cuCtxSynchronize takes at least this long
//   FST_FAKE_NO_KERNELS      cuModuleLoadData fails (no binary for this GPU)
#include <pthread.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "cuda_builtins.hpp"
#include "detail/convert_math.hpp"
#include "detail/kernel_abi.hpp"

extern "C" void fst_move_batch(const fst::kernels::MoveTask* tasks, std::uint32_t n_tasks);
extern "C" void fst_convert_batch(const fst::kernels::ConvertTask* tasks, std::uint32_t n_tasks);

thread_local fake_cuda::Dim3 threadIdx;
fake_cuda::Dim3 blockIdx, blockDim, gridDim;

namespace {

using CUresult = int;
using CUdeviceptr = std::uint64_t;

constexpr CUresult kSuccess = 0, kInvalidValue = 1, kOutOfMemory = 2, kInvalidContext = 201,
                   kNoBinary = 209, kInvalidHandle = 400, kNotFound = 500, kNotReady = 600,
                   kIllegalAddress = 700;
constexpr int kAttrMultiprocessorCount = 16;
constexpr unsigned kEventBlockingSync = 0x1;

std::uint64_t env_u64(const char* name, std::uint64_t fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::strtoull(v, nullptr, 0) : fallback;
}

// ---- the call log ------------------------------------------------------------------------

std::atomic<unsigned> g_next_tid{0};
thread_local unsigned t_tid = ++g_next_tid;

void log_call(const char* fn, const char* fmt = "", ...) {
  static const char* path = std::getenv("FST_FAKE_CUDA_LOG");
  if (!path || !*path) return;
  static std::mutex* mu = new std::mutex;
  char extra[512];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(extra, sizeof extra, fmt, ap);
  va_end(ap);
  std::lock_guard<std::mutex> lock(*mu);
  if (FILE* f = std::fopen(path, "a")) {
    std::fprintf(f, "%s tid=%u%s%s\n", fn, t_tid, *extra ? " " : "", extra);
    std::fclose(f);
  }
}

// ---- state ---------------------------------------------------------------------------------

struct Stream;

// Everything lives until the process ends (never destroyed): stream workers may still run
// while static destructors do.
struct State {
  std::mutex mu;
  std::map<std::uintptr_t, std::size_t> device;  // live device allocations: address -> bytes
  std::map<std::uintptr_t, std::size_t> pinned;  // live pinned allocations
  std::size_t device_used = 0, pinned_used = 0;
  std::size_t device_limit = env_u64("FST_FAKE_DEVICE_MEMORY", 1ull << 30);
  std::size_t pinned_limit = env_u64("FST_FAKE_PINNED_MEMORY", 1ull << 30);
  std::vector<Stream*> streams;
  std::atomic<CUresult> sticky{kSuccess};
  std::atomic<std::uint64_t> copies{0};
  std::uint64_t fail_copy = env_u64("FST_FAKE_FAIL_COPY", 0);
  unsigned delay_us = static_cast<unsigned>(env_u64("FST_FAKE_COPY_DELAY_US", 0));
};
State& state() {
  static State* s = new State;
  return *s;
}

// Whether [p, p + n) lies inside one live allocation of `table` (caller holds state().mu).
bool inside(const std::map<std::uintptr_t, std::size_t>& table, std::uintptr_t p, std::size_t n) {
  auto it = table.upper_bound(p);
  if (it == table.begin()) return false;
  --it;
  return p >= it->first && p + n <= it->first + std::max<std::size_t>(it->second, 1);
}
bool device_range(std::uint64_t p, std::uint64_t n) {
  std::lock_guard<std::mutex> lock(state().mu);
  return inside(state().device, p, n);
}

// What the calling thread queued last: (stream, position), for the "waits on the work it
// just queued" check.
thread_local const Stream* t_last_stream = nullptr;
thread_local std::uint64_t t_last_position = 0;
thread_local void* t_current = nullptr;  // the current context

struct Stream {
  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::function<void()>> ops;
  std::uint64_t queued = 0, done = 0;
  bool stopping = false;
  std::thread worker;

  Stream() : worker([this] { run(); }) {}
  void enqueue(std::function<void()> op) {
    {
      std::lock_guard<std::mutex> lock(mu);
      ops.push_back(std::move(op));
      ++queued;
      t_last_stream = this;
      t_last_position = queued;
    }
    cv.notify_all();
  }
  std::uint64_t position() {
    std::lock_guard<std::mutex> lock(mu);
    return queued;
  }
  bool reached(std::uint64_t pos) {
    std::lock_guard<std::mutex> lock(mu);
    return done >= pos;
  }
  void wait_for(std::uint64_t pos) {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] { return done >= pos; });
  }
  void drain() { wait_for(position()); }
  void run() {
    std::unique_lock<std::mutex> lock(mu);
    while (true) {
      cv.wait(lock, [&] { return stopping || !ops.empty(); });
      if (ops.empty()) return;
      std::function<void()> op = std::move(ops.front());
      ops.pop_front();
      lock.unlock();
      if (state().delay_us) std::this_thread::sleep_for(std::chrono::microseconds(state().delay_us));
      if (state().sticky.load() == kSuccess) op();  // after an error the device does nothing
      lock.lock();
      ++done;
      cv.notify_all();
    }
  }
  void stop() {
    {
      std::lock_guard<std::mutex> lock(mu);
      stopping = true;
    }
    cv.notify_all();
    worker.join();
  }
};

Stream* legacy_stream() {
  static Stream* s = [] {
    auto* st = new Stream;
    std::lock_guard<std::mutex> lock(state().mu);
    state().streams.push_back(st);
    return st;
  }();
  return s;
}
Stream* stream_of(void* handle) { return handle ? static_cast<Stream*>(handle) : legacy_stream(); }

struct Event {
  unsigned flags;
  Stream* stream = nullptr;
  std::uint64_t position = 0;
  unsigned recorded_by = 0;
};

// ---- kernel launches -----------------------------------------------------------------------

// Runs one block at a time on up to 1024 persistent threads, one per threadIdx.x.
class BlockRunner {
 public:
  void run(const std::function<void()>& body, unsigned grid, unsigned threads) {
    std::unique_lock<std::mutex> lock(mu_);
    while (workers_ < threads) {
      // A new worker counts launches from now: the block about to start is its first.
      std::thread([this, tid = workers_, seen = generation_] { work(tid, seen); }).detach();
      ++workers_;
    }
    gridDim = {grid, 1, 1};
    blockDim = {threads, 1, 1};
    body_ = &body;
    for (unsigned b = 0; b < grid; ++b) {
      blockIdx = {b, 0, 0};
      pthread_barrier_init(&barrier_, nullptr, threads);
      active_ = threads;
      finished_ = 0;
      ++generation_;
      start_.notify_all();
      done_.wait(lock, [&] { return finished_ == active_; });
      pthread_barrier_destroy(&barrier_);
    }
  }
  void sync() { pthread_barrier_wait(&barrier_); }

 private:
  void work(unsigned tid, std::uint64_t seen) {
    std::unique_lock<std::mutex> lock(mu_);
    while (true) {
      start_.wait(lock, [&] { return generation_ != seen; });
      seen = generation_;
      if (tid >= active_) continue;
      lock.unlock();
      threadIdx = {tid, 0, 0};
      (*body_)();
      lock.lock();
      if (++finished_ == active_) done_.notify_all();
    }
  }
  std::mutex mu_;
  std::condition_variable start_, done_;
  unsigned workers_ = 0, active_ = 0, finished_ = 0;
  std::uint64_t generation_ = 0;
  const std::function<void()>* body_ = nullptr;
  pthread_barrier_t barrier_;
};
BlockRunner& runner() {
  static BlockRunner* r = new BlockRunner;
  return *r;
}
std::mutex& kernel_mu() {  // one launch at a time: the block's shared memory is a static
  static std::mutex* mu = new std::mutex;
  return *mu;
}

struct Function {
  const char* name;
  std::size_t task_bytes;
};
const Function kFunctions[] = {{"fst_move_batch", sizeof(fst::kernels::MoveTask)},
                               {"fst_convert_batch", sizeof(fst::kernels::ConvertTask)}};

// Every range a task touches must be live device memory, as on a GPU.
bool tasks_valid(const Function* f, std::uint64_t tasks, std::uint32_t n) {
  if (!device_range(tasks, std::uint64_t{n} * f->task_bytes)) return false;
  for (std::uint32_t i = 0; i < n; ++i) {
    std::uint64_t src, dst, src_bytes, dst_bytes;
    if (f == &kFunctions[0]) {
      const auto& t = reinterpret_cast<const fst::kernels::MoveTask*>(tasks)[i];
      src = t.src, dst = t.dst, src_bytes = dst_bytes = t.bytes;
    } else {
      const auto& t = reinterpret_cast<const fst::kernels::ConvertTask*>(tasks)[i];
      namespace cvt = fst::detail::cvt;
      src = t.src, dst = t.dst;
      src_bytes = (t.count * cvt::bits_per_element(static_cast<fst::Dtype>(t.src_dtype)) + 7) / 8;
      dst_bytes = (t.count * cvt::bits_per_element(static_cast<fst::Dtype>(t.dst_dtype)) + 7) / 8;
    }
    if ((src_bytes && !device_range(src, src_bytes)) || (dst_bytes && !device_range(dst, dst_bytes))) return false;
  }
  return true;
}

CUresult need_context() { return t_current ? kSuccess : kInvalidContext; }

// Every entry point starts with this: a sticky error answers every call.
#define FAKE_ENTER(...)                                   \
  do {                                                    \
    log_call(__func__ + 5, __VA_ARGS__);                  \
    if (CUresult sticky = state().sticky.load()) return sticky; \
  } while (0)

int g_primary_context;  // its address is the primary context's handle

// ---- the entry points ----------------------------------------------------------------------

CUresult fake_cuInit(unsigned) {
  log_call("cuInit");
  return static_cast<CUresult>(env_u64("FST_FAKE_CUINIT", 0));
}
CUresult fake_cuDriverGetVersion(int* v) {
  FAKE_ENTER("");
  *v = 13000;
  return kSuccess;
}
CUresult fake_cuDeviceGetCount(int* n) {
  FAKE_ENTER("");
  *n = 1;
  return kSuccess;
}
CUresult fake_cuDeviceGet(int* dev, int ordinal) {
  FAKE_ENTER("ordinal=%d", ordinal);
  if (ordinal != 0) return 101;  // CUDA_ERROR_INVALID_DEVICE
  *dev = 0;
  return kSuccess;
}
CUresult fake_cuDeviceGetName(char* name, int len, int) {
  FAKE_ENTER("");
  std::snprintf(name, static_cast<std::size_t>(len), "fst fake CUDA device");
  return kSuccess;
}
CUresult fake_cuDeviceGetAttribute(int* v, int attr, int) {
  FAKE_ENTER("attr=%d", attr);
  *v = attr == kAttrMultiprocessorCount ? 2 : 0;  // few blocks per launch keep tests quick
  return kSuccess;
}
CUresult fake_cuDevicePrimaryCtxRetain(void** ctx, int) {
  FAKE_ENTER("");
  *ctx = &g_primary_context;
  return kSuccess;
}
CUresult fake_cuCtxGetCurrent(void** ctx) {
  FAKE_ENTER("");
  *ctx = t_current;
  return kSuccess;
}
CUresult fake_cuCtxSetCurrent(void* ctx) {
  FAKE_ENTER("ctx=%s", ctx ? "primary" : "none");
  if (ctx && ctx != &g_primary_context) return kInvalidContext;
  t_current = ctx;
  return kSuccess;
}
CUresult fake_cuCtxSynchronize() {
  FAKE_ENTER("");
  if (CUresult r = need_context()) return r;
  std::vector<Stream*> streams;
  {
    std::lock_guard<std::mutex> lock(state().mu);
    streams = state().streams;
  }
  for (Stream* s : streams) s->drain();
  if (auto ms = env_u64("FST_FAKE_CTX_SYNC_MS", 0)) std::this_thread::sleep_for(std::chrono::milliseconds(ms));
  log_call("cuCtxSynchronize.done");
  return state().sticky.load();
}
CUresult fake_cuMemAlloc(CUdeviceptr* p, std::size_t bytes) {
  FAKE_ENTER("bytes=%zu", bytes);
  if (CUresult r = need_context()) return r;
  if (bytes == 0) return kInvalidValue;
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  if (s.device_used + bytes > s.device_limit) return kOutOfMemory;
  void* mem = std::aligned_alloc(256, (bytes + 255) / 256 * 256);
  if (!mem) return kOutOfMemory;
  s.device[reinterpret_cast<std::uintptr_t>(mem)] = bytes;
  s.device_used += bytes;
  *p = reinterpret_cast<std::uintptr_t>(mem);
  return kSuccess;
}
CUresult fake_cuMemFree(CUdeviceptr p) {
  State& s = state();
  bool busy = false;
  {
    std::lock_guard<std::mutex> lock(s.mu);
    for (Stream* st : s.streams) busy = busy || !st->reached(st->position());
  }
  FAKE_ENTER("ptr=%#llx busy=%d", static_cast<unsigned long long>(p), busy ? 1 : 0);
  if (CUresult r = need_context()) return r;
  std::lock_guard<std::mutex> lock(s.mu);
  auto it = s.device.find(p);
  if (it == s.device.end()) return kInvalidValue;
  s.device_used -= it->second;
  s.device.erase(it);
  std::free(reinterpret_cast<void*>(p));
  return kSuccess;
}
CUresult fake_cuMemGetInfo(std::size_t* free_bytes, std::size_t* total) {
  FAKE_ENTER("");
  std::lock_guard<std::mutex> lock(state().mu);
  *free_bytes = state().device_limit - state().device_used;
  *total = state().device_limit;
  return kSuccess;
}
CUresult fake_cuMemHostAlloc(void** p, std::size_t bytes, unsigned flags) {
  FAKE_ENTER("bytes=%zu flags=%u", bytes, flags);
  if (CUresult r = need_context()) return r;
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  if (s.pinned_used + bytes > s.pinned_limit) return kOutOfMemory;
  void* mem = std::aligned_alloc(4096, (bytes + 4095) / 4096 * 4096);
  if (!mem) return kOutOfMemory;
  s.pinned[reinterpret_cast<std::uintptr_t>(mem)] = bytes;
  s.pinned_used += bytes;
  *p = mem;
  return kSuccess;
}
CUresult fake_cuMemFreeHost(void* p) {
  FAKE_ENTER("ptr=%p", p);
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  auto it = s.pinned.find(reinterpret_cast<std::uintptr_t>(p));
  if (it == s.pinned.end()) return kInvalidValue;
  s.pinned_used -= it->second;
  s.pinned.erase(it);
  std::free(p);
  return kSuccess;
}
CUresult fake_cuMemcpyHtoDAsync(CUdeviceptr dst, const void* src, std::size_t bytes, void* stream) {
  bool pinned;
  {
    std::lock_guard<std::mutex> lock(state().mu);
    pinned = inside(state().pinned, reinterpret_cast<std::uintptr_t>(src), bytes);
  }
  const std::uint64_t n = ++state().copies;
  FAKE_ENTER("stream=%p bytes=%zu pinned=%d n=%llu", stream, bytes, pinned ? 1 : 0, static_cast<unsigned long long>(n));
  if (CUresult r = need_context()) return r;
  const bool fail = n == state().fail_copy;
  stream_of(stream)->enqueue([=] {
    if (fail || !device_range(dst, bytes)) {
      log_call("copy.failed", "n=%llu injected=%d", static_cast<unsigned long long>(n), fail ? 1 : 0);
      state().sticky = kIllegalAddress;
      return;
    }
    std::memcpy(reinterpret_cast<void*>(dst), src, bytes);
  });
  return kSuccess;
}
CUresult fake_cuMemcpyDtoH(void* dst, CUdeviceptr src, std::size_t bytes) {
  FAKE_ENTER("bytes=%zu", bytes);
  if (CUresult r = need_context()) return r;
  if (!device_range(src, bytes)) return kInvalidValue;
  // Ordered after the legacy stream's work, as the synchronous copy is on the real driver.
  legacy_stream()->drain();
  std::memcpy(dst, reinterpret_cast<const void*>(src), bytes);
  return kSuccess;
}
CUresult fake_cuStreamCreate(void** stream, unsigned flags) {
  FAKE_ENTER("flags=%u", flags);
  if (CUresult r = need_context()) return r;
  auto* s = new Stream;
  {
    std::lock_guard<std::mutex> lock(state().mu);
    state().streams.push_back(s);
  }
  *stream = s;
  log_call("cuStreamCreate.done", "stream=%p", static_cast<void*>(s));
  return kSuccess;
}
CUresult fake_cuStreamDestroy(void* stream) {
  FAKE_ENTER("stream=%p", stream);
  if (!stream) return kInvalidHandle;
  auto* s = static_cast<Stream*>(stream);
  {
    std::lock_guard<std::mutex> lock(state().mu);
    auto& all = state().streams;
    all.erase(std::remove(all.begin(), all.end(), s), all.end());
  }
  s->drain();  // the real driver lets queued work finish too
  s->stop();
  delete s;
  return kSuccess;
}
CUresult fake_cuStreamSynchronize(void* stream) {
  Stream* s = stream_of(stream);
  const std::uint64_t pos = s->position();
  const bool own = t_last_stream == s && t_last_position == pos;
  FAKE_ENTER("stream=%p ready=%d own_last=%d", stream, s->reached(pos) ? 1 : 0, own ? 1 : 0);
  s->wait_for(pos);
  return state().sticky.load();
}
CUresult fake_cuEventCreate(void** event, unsigned flags) {
  FAKE_ENTER("flags=%u", flags);
  if (CUresult r = need_context()) return r;
  *event = new Event{flags};
  return kSuccess;
}
CUresult fake_cuEventDestroy(void* event) {
  FAKE_ENTER("");
  delete static_cast<Event*>(event);
  return kSuccess;
}
CUresult fake_cuEventRecord(void* event, void* stream) {
  FAKE_ENTER("stream=%p", stream);
  auto* e = static_cast<Event*>(event);
  e->stream = stream_of(stream);
  e->position = e->stream->position();
  e->recorded_by = t_tid;
  return kSuccess;
}
CUresult fake_cuEventQuery(void* event) {
  auto* e = static_cast<Event*>(event);
  FAKE_ENTER("");
  if (!e->stream) return kSuccess;
  return e->stream->reached(e->position) ? state().sticky.load() : kNotReady;
}
CUresult fake_cuEventSynchronize(void* event) {
  auto* e = static_cast<Event*>(event);
  const bool ready = !e->stream || e->stream->reached(e->position);
  const bool own = e->stream && t_last_stream == e->stream && t_last_position == e->position;
  FAKE_ENTER("ready=%d own_last=%d blocking=%d", ready ? 1 : 0, own ? 1 : 0,
             (e->flags & kEventBlockingSync) ? 1 : 0);
  if (e->stream) e->stream->wait_for(e->position);
  return state().sticky.load();
}
CUresult fake_cuModuleLoadData(void** module, const void* image) {
  FAKE_ENTER("");
  if (CUresult r = need_context()) return r;
  if (env_u64("FST_FAKE_NO_KERNELS", 0)) return kNoBinary;
  std::uint32_t magic = 0;
  std::memcpy(&magic, image, sizeof magic);
  if (magic != 0xBA55ED50u) return 200;  // CUDA_ERROR_INVALID_IMAGE: not a fatbin
  *module = const_cast<void*>(image);
  return kSuccess;
}
CUresult fake_cuModuleGetFunction(void** fn, void*, const char* name) {
  FAKE_ENTER("name=%s", name);
  for (const Function& f : kFunctions)
    if (!std::strcmp(f.name, name)) {
      *fn = const_cast<Function*>(&f);
      return kSuccess;
    }
  return kNotFound;
}
CUresult fake_cuLaunchKernel(void* fn, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                             unsigned bz, unsigned shared, void* stream, void** params, void** extra) {
  const auto* f = static_cast<const Function*>(fn);
  FAKE_ENTER("name=%s grid=%u block=%u stream=%p", f ? f->name : "?", gx, bx, stream);
  if (CUresult r = need_context()) return r;
  if (!f || gy != 1 || gz != 1 || by != 1 || bz != 1 || bx == 0 || bx > 1024 || gx == 0 || shared || extra ||
      !params)
    return kInvalidValue;
  // The arguments are read now, as the real driver does: (const Task* tasks, uint32_t n).
  const std::uint64_t tasks = *static_cast<const std::uint64_t*>(params[0]);
  const std::uint32_t n = *static_cast<const std::uint32_t*>(params[1]);
  stream_of(stream)->enqueue([=] {
    if (!tasks_valid(f, tasks, n)) {
      log_call("launch.failed", "name=%s", f->name);
      state().sticky = kIllegalAddress;
      return;
    }
    std::lock_guard<std::mutex> lock(kernel_mu());
    const std::function<void()> body = f == &kFunctions[0]
        ? std::function<void()>([=] { fst_move_batch(reinterpret_cast<const fst::kernels::MoveTask*>(tasks), n); })
        : std::function<void()>([=] { fst_convert_batch(reinterpret_cast<const fst::kernels::ConvertTask*>(tasks), n); });
    runner().run(body, gx, bx);
  });
  return kSuccess;
}
CUresult fake_cuGetErrorString(CUresult r, const char** text) {
  log_call("cuGetErrorString", "error=%d", r);
  switch (r) {
    case kOutOfMemory: *text = "out of memory"; break;
    case 100: *text = "no CUDA-capable device is detected"; break;
    case kIllegalAddress: *text = "an illegal memory access was encountered"; break;
    case kNoBinary: *text = "no kernel image is available for execution on the device"; break;
    case kInvalidContext: *text = "invalid device context"; break;
    default: *text = "fake CUDA error"; break;
  }
  return kSuccess;
}

struct Entry {
  const char* name;
  void* fn;
};
#define FAKE_ENTRY(name) {#name, reinterpret_cast<void*>(&fake_##name)}
const Entry kEntries[] = {
    FAKE_ENTRY(cuInit), FAKE_ENTRY(cuDriverGetVersion), FAKE_ENTRY(cuDeviceGetCount), FAKE_ENTRY(cuDeviceGet),
    FAKE_ENTRY(cuDeviceGetName), FAKE_ENTRY(cuDeviceGetAttribute), FAKE_ENTRY(cuDevicePrimaryCtxRetain),
    FAKE_ENTRY(cuCtxGetCurrent), FAKE_ENTRY(cuCtxSetCurrent), FAKE_ENTRY(cuCtxSynchronize), FAKE_ENTRY(cuMemAlloc),
    FAKE_ENTRY(cuMemFree), FAKE_ENTRY(cuMemGetInfo), FAKE_ENTRY(cuMemHostAlloc), FAKE_ENTRY(cuMemFreeHost),
    FAKE_ENTRY(cuMemcpyHtoDAsync), FAKE_ENTRY(cuMemcpyDtoH), FAKE_ENTRY(cuStreamCreate), FAKE_ENTRY(cuStreamDestroy),
    FAKE_ENTRY(cuStreamSynchronize), FAKE_ENTRY(cuEventCreate), FAKE_ENTRY(cuEventDestroy), FAKE_ENTRY(cuEventRecord),
    FAKE_ENTRY(cuEventQuery), FAKE_ENTRY(cuEventSynchronize), FAKE_ENTRY(cuModuleLoadData),
    FAKE_ENTRY(cuModuleGetFunction), FAKE_ENTRY(cuLaunchKernel), FAKE_ENTRY(cuGetErrorString),
};

}  // namespace

namespace fake_cuda {
void sync_threads() { runner().sync(); }
}  // namespace fake_cuda

extern "C" {

__attribute__((visibility("default"))) CUresult cuGetProcAddress_v2(const char* name, void** fn, int version,
                                                                    std::uint64_t flags, int* status) {
  (void)flags;
  if (status) *status = 0;
  for (const Entry& e : kEntries)
    if (!std::strcmp(e.name, name)) {
      log_call("cuGetProcAddress", "name=%s version=%d", name, version);
      *fn = e.fn;
      return kSuccess;
    }
  log_call("cuGetProcAddress", "name=%s version=%d missing=1", name, version);
  *fn = nullptr;
  return kNotFound;
}

// For tests reading results back directly (ctypes), the same functions under their own names.
__attribute__((visibility("default"))) CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, std::size_t bytes) {
  void* ctx = t_current;
  t_current = &g_primary_context;
  CUresult r = fake_cuMemcpyDtoH(dst, src, bytes);
  t_current = ctx;
  return r;
}
// Device and pinned bytes in use now.
__attribute__((visibility("default"))) std::size_t fake_cuda_device_bytes() {
  std::lock_guard<std::mutex> lock(state().mu);
  return state().device_used;
}
__attribute__((visibility("default"))) std::size_t fake_cuda_pinned_bytes() {
  std::lock_guard<std::mutex> lock(state().mu);
  return state().pinned_used;
}

}  // extern "C"
