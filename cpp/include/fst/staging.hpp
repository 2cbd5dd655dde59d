// Stage: the path to device memory. Reads land in a ring of pinned host buffers; each filled
// buffer is copied to the device asynchronously on its own lane (a CUDA stream) while the
// threads read the next requests into the other buffers. Pinned memory stays within a fixed
// budget whatever the checkpoint size, and pageable memory is never on the way to the device.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "fst/buffer.hpp"
#include "fst/plan.hpp"
#include "fst/reader.hpp"
#include "fst/thread_pool.hpp"

namespace fst {

// Where staged bytes go. The CUDA implementation copies with cuMemcpyHtoDAsync on one stream
// per lane; the host implementation (tests) copies on a thread of its own, so both exercise the
// rule that a staging buffer is reused only after its copies have finished.
namespace kernels {
struct ConvertTask;  // cpp/src/detail/kernel_abi.hpp: the batch descriptors of the kernels
struct MoveTask;
}  // namespace kernels

//
// A sink serves one load at a time, and may serve several one after another (the groups of a
// streamed load): it keeps its staging memory (buffers, scratch, task lists) between loads and
// hands it out again when it is large enough, so pinned memory is allocated once per stream.
class StagingSink {
 public:
  virtual ~StagingSink() = default;
  // Called by each load before any other call naming a lane: lanes 0 .. lanes-1 will be used.
  virtual void reserve_lanes(unsigned lanes) = 0;
  // Pinned (page-aligned) host memory of at least `bytes` for lane's staging buffer, owned by
  // the sink (the lane's earlier buffer when large enough). Called on a reading thread, the
  // first time a load uses `lane` (concurrently for different lanes).
  virtual std::byte* staging_buffer(unsigned lane, std::size_t bytes) = 0;
  // Allocates the destination arena (the memory the tensors end up in).
  virtual std::shared_ptr<Buffer> allocate(std::uint64_t bytes) = 0;
  // Queues a copy of `bytes` from `src` (inside lane's staging buffer) to address `dst` (in the
  // destination or in lane's scratch memory), on `lane`.
  virtual void copy_async(unsigned lane, std::uint64_t dst, const std::byte* src, std::uint64_t bytes) = 0;
  // Returns once every copy queued on `lane` so far has finished.
  virtual void wait(unsigned lane) = 0;
  // Whether the sink converts dtypes itself (CUDA: the conversion kernel loaded).
  virtual bool converts() const = 0;
  // Whether the sink places many pieces with one batched move (CUDA: the move kernel loaded).
  virtual bool moves() const = 0;
  // Device memory of at least `bytes` for `lane`, where raw bytes land before a conversion or
  // a batched move takes them to their slots. Called on a reading thread holding the lane.
  virtual std::uint64_t scratch(unsigned lane, std::size_t bytes) = 0;
  // Queue `tasks` on `lane` after its copies: each converts (moves) from scratch memory into the
  // destination; addresses are absolute. At most as many as reserve_tasks() made room for.
  virtual void convert_async(unsigned lane, const std::vector<kernels::ConvertTask>& tasks) = 0;
  virtual void move_async(unsigned lane, const std::vector<kernels::MoveTask>& tasks) = 0;
  // Room for up to `max_moves` move and `max_converts` conversion tasks per call, on every lane.
  virtual void reserve_tasks(unsigned lanes, std::size_t max_moves, std::size_t max_converts) = 0;
  // Called on a reading thread before each request (CUDA: make the device's context current).
  virtual void bind_thread() {}
  virtual ExportDevice device() const { return ExportDevice{}; }
  // Staging buffers allocated so far (a buffer handed out again is not counted twice).
  std::size_t buffers_allocated() const noexcept { return buffers_allocated_.load(); }

 protected:
  std::atomic<std::size_t> buffers_allocated_{0};
};

struct StagingOptions {
  Backend backend = Backend::Pread;    // Pread or Direct (O_DIRECT into the pinned buffers)
  unsigned threads = 0;
  std::uint64_t buffer_bytes = 16u << 20;  // one staging buffer (= the largest read request)
  std::uint64_t budget = 128u << 20;       // all staging buffers together
  std::uint64_t alignment = 256;           // of every tensor slot in the destination
  // A request of at least this many pieces is copied to the device whole, into scratch memory,
  // and placed by one batched move, where one copy per piece would cost a driver call each
  // (checkpoints of many tiny tensors). Needs a sink that moves().
  std::uint32_t batch_pieces = 8;
};

// How many buffers a budget buys (at least 2 so that reading and copying overlap).
unsigned staging_buffer_count(const StagingOptions& opt) noexcept;

// A load through staging buffers into one destination arena that `sink` owns. Runs on a thread
// pool; wait() drives it to the end on the calling thread.
class StagedLoad final : public AsyncLoad {
 public:
  // `targets` (empty: none): dtypes wanted per pick. The sink converts them when it can
  // (converts()); otherwise they are reported in LoadedTensors::casts for the framework.
  StagedLoad(std::shared_ptr<const Checkpoint> ckpt, std::vector<Pick> selection,
             const StagingOptions& options, std::shared_ptr<StagingSink> sink,
             const std::vector<Dtype>& targets = {});
  ~StagedLoad();
  StagedLoad(const StagedLoad&) = delete;
  StagedLoad& operator=(const StagedLoad&) = delete;

  LoadedTensors wait(const std::function<bool()>& tick, int tick_ms = 100) override;
  std::uint64_t bytes_done() const noexcept override { return done_.load(std::memory_order_relaxed); }
  std::uint64_t bytes_total() const noexcept override { return result_.stats.bytes; }

 private:
  unsigned acquire_buffer();
  void release_buffer(unsigned lane);
  void run_request(const ReadRequest& req);

  std::shared_ptr<const Checkpoint> ckpt_;
  StagingOptions opt_;
  LoadedTensors result_;
  ReadPlan plan_;
  std::shared_ptr<StagingSink> sink_;
  struct Files;
  std::unique_ptr<Files> files_;
  std::vector<std::byte*> buffers_;        // per lane, allocated when the lane is first used
  std::size_t buffer_size_ = 0;
  std::vector<std::uint64_t> scratch_;     // per lane, once needed: raw bytes on the device
  bool batching_ = false;                  // requests of many pieces are placed by one move
  std::atomic<std::uint64_t> batched_{0};  // requests placed so
  std::vector<Dtype> targets_;             // per pick, when the sink converts
  std::vector<std::uint64_t> slots_;       // per pick: address in the destination
  std::mutex ring_mu_;
  std::condition_variable ring_cv_;
  std::vector<bool> busy_;         // a thread is filling the buffer
  std::vector<bool> in_flight_;    // its copies may still be running: wait(lane) before reuse
  unsigned in_use_ = 0;  // buffers being filled
  std::unique_ptr<ThreadPool> pool_;
  TaskGroup group_;
  std::atomic<std::uint64_t> done_{0};
  double started_ = 0;
};

// The sink for checking the pipeline without a GPU: the destination is host memory and copies
// (and conversions, with the host twins of the kernels, unless `converts` is false) run on a
// background thread, in order, each started `copy_delay_us` late (a slow copy engine makes any
// reuse of a buffer before its work ends show up as wrong bytes). With `fail_wait` = n > 0, the
// n-th wait() and every later one throw CudaError, as after a copy that failed on a device (CUDA
// errors are sticky).
std::shared_ptr<StagingSink> make_host_sink(std::uint64_t alignment, unsigned copy_delay_us = 0,
                                            bool converts = true, unsigned fail_wait = 0);

}  // namespace fst
