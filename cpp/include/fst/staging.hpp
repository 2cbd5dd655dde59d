// Stage: the path to device memory. Reads land in pinned host buffers from a pool that every
// load to the device shares; each filled buffer is copied to the device asynchronously on its
// own stream while the readers fill other buffers. Pinned memory stays within a fixed budget
// whatever the checkpoint size, and pageable memory is never on the way to the device.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "fst/buffer.hpp"
#include "fst/convert.hpp"
#include "fst/load.hpp"
#include "fst/plan.hpp"
#include "fst/thread_pool.hpp"

namespace fst {

namespace kernels {
struct ConvertTask;  // cpp/src/detail/kernel_abi.hpp: the batch descriptors of the kernels
struct MoveTask;
}  // namespace kernels

// The staging buffers of one destination (a CUDA device), shared by every load to it. Each
// slot is a pinned host buffer with its own stream and completion event; the pool lives as
// long as the process (or until trim()), so pinning, stream and event creation are paid once,
// not per load. Its pinned bytes never exceed the budget: a reader wanting a buffer when the
// budget is spent waits for one. A reader gets a buffer whose earlier copies have finished
// whenever there is one, and otherwise waits on the copy released longest ago by another
// reader, never on the one it queued itself.
class StagingPool {
 public:
  explicit StagingPool(std::uint64_t budget) : budget_(budget) {}
  virtual ~StagingPool() = default;
  StagingPool(const StagingPool&) = delete;
  StagingPool& operator=(const StagingPool&) = delete;

  // A slot of at least `bytes` whose earlier work has finished, held by the caller until
  // release(). Blocks while every buffer is held and the budget is spent. Throws
  // std::invalid_argument when `bytes` exceeds the budget (no wait could end).
  unsigned acquire(std::size_t bytes);
  // The holder has queued its work on the slot: marks the end of that work and hands the slot
  // back. Returns the ticket that wait_released() takes.
  std::uint64_t release(unsigned slot);
  // Returns once the work queued on `slot` before the release that returned `ticket` has
  // finished. Throws the device's error (a failed copy).
  void wait_released(unsigned slot, std::uint64_t ticket);
  std::byte* data(unsigned slot) const;

  // Later allocations keep within `budget`; buffers beyond it are freed as they come back.
  void set_budget(std::uint64_t budget);
  // Frees every buffer no load holds, once its copies have finished. Returns the bytes freed.
  std::uint64_t trim();

  struct Usage {
    std::uint64_t budget = 0;
    std::uint64_t pinned_bytes = 0;  // allocated now
    std::size_t buffers = 0;         // allocated now
    std::size_t in_use = 0;          // held by readers now
    std::size_t allocations = 0;     // buffers allocated since the pool was made
  };
  Usage usage() const;

 protected:
  // The device side of slot `slot`: pinned memory of `bytes` (page aligned) and whatever
  // marks the end of its work (CUDA: a stream and an event). Called without the pool's lock.
  virtual std::byte* allocate_slot(unsigned slot, std::size_t bytes) = 0;
  // Frees them; the slot's work has finished.
  virtual void free_slot(unsigned slot) noexcept = 0;
  // Marks the end of the work queued on the slot so far (CUDA: cuEventRecord).
  virtual void record(unsigned slot) = 0;
  // Whether the marked work has finished; never blocks (CUDA: cuEventQuery).
  virtual bool finished(unsigned slot) = 0;
  // Blocks until it has (CUDA: cuEventSynchronize on a blocking-sync event).
  virtual void wait(unsigned slot) = 0;
  // For destructors of implementations: waits for and frees every slot.
  void close() noexcept;

 private:
  struct Slot {
    std::byte* data = nullptr;
    std::size_t bytes = 0;
    bool live = false;     // allocated (false while being allocated or once freed)
    bool held = false;     // a reader holds it, or it is being allocated or freed
    bool settled = true;   // its marked work is known to have finished
    std::uint64_t ticket = 0;          // releases so far
    std::uint64_t released_at = 0;     // order of its last release among all slots
    std::thread::id last_holder;
  };
  unsigned take(std::unique_lock<std::mutex>& lock, unsigned slot, bool must_wait);

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Slot> slots_;
  std::uint64_t budget_;
  std::uint64_t used_ = 0;  // pinned bytes allocated or being allocated
  std::uint64_t releases_ = 0;
  std::size_t allocations_ = 0;
};

// Where staged bytes go, for one load at a time (or the loads of one stream, one after
// another). Its buffers come from a StagingPool, which concurrent loads share; what it owns
// itself is device memory that lives only as long as it does: scratch memory and kernel task
// lists, per pool slot it used. The CUDA implementation copies with cuMemcpyHtoDAsync on the
// slot's stream; the host implementation (tests) copies on a thread of its own, so both
// exercise the rule that a staging buffer is reused only after its copies have finished.
class StagingSink {
 public:
  // Waits for the work it queued (its device memory is in use until then).
  virtual ~StagingSink() = default;
  virtual StagingPool& pool() = 0;
  // A pool slot for the calling reader (see StagingPool::acquire).
  unsigned acquire(std::size_t bytes) { return pool().acquire(bytes); }
  // Hands a slot back after queueing work on it; the work is remembered for wait_all().
  void release(unsigned slot);
  // Returns once all work this sink queued has finished; throws the device's error.
  void wait_all();
  std::byte* buffer(unsigned slot) { return pool().data(slot); }
  // Allocates the destination arena (the memory the tensors end up in).
  virtual std::shared_ptr<Buffer> allocate(std::uint64_t bytes) = 0;
  // Queues a copy of `bytes` from `src` (inside the slot's buffer) to address `dst` (in the
  // destination or in the slot's scratch memory), on the slot's stream.
  virtual void copy_async(unsigned slot, std::uint64_t dst, const std::byte* src, std::uint64_t bytes) = 0;
  // Whether the sink converts dtypes itself (CUDA: the conversion kernel loaded).
  virtual bool converts() const = 0;
  // Whether the sink places many pieces with one batched move (CUDA: the move kernel loaded).
  virtual bool moves() const = 0;
  // Device memory of at least `bytes` for `slot`, where raw bytes land before a conversion or
  // a batched move takes them to their slots. Called by the slot's holder.
  virtual std::uint64_t scratch(unsigned slot, std::size_t bytes) = 0;
  // Queue `tasks` on the slot's stream after its copies: each converts (moves) from scratch
  // memory into the destination; addresses are absolute. At most as many as reserve_tasks()
  // made room for. Called by the slot's holder.
  virtual void convert_async(unsigned slot, const std::vector<kernels::ConvertTask>& tasks) = 0;
  virtual void move_async(unsigned slot, const std::vector<kernels::MoveTask>& tasks) = 0;
  // Room for up to `max_moves` move and `max_converts` conversion tasks per call.
  virtual void reserve_tasks(std::size_t max_moves, std::size_t max_converts) = 0;
  // Called on a reading thread before each request (CUDA: make the device's context current).
  virtual void bind_thread() {}
  virtual ExportDevice device() const { return ExportDevice{}; }
  // wait_all(), errors ignored (for destructors, and after an error that is being reported).
  void drain() noexcept;

 private:
  std::mutex pending_mu_;
  std::vector<std::pair<unsigned, std::uint64_t>> pending_;  // (slot, ticket) of its releases
};

struct StagingOptions {
  Backend backend = Backend::Pread;    // Pread or Direct (O_DIRECT into the pinned buffers)
  unsigned threads = 0;                // readers; 0: the CPUs this process may use
  // The largest staging buffer (= the largest read request). Loads use smaller ones where the
  // budget could not otherwise give every reader two (down to kStagingFloor), and where their
  // requests are smaller.
  std::uint64_t buffer_bytes = 16u << 20;
  std::uint64_t budget = 256u << 20;   // all pinned staging buffers of the pool together
  std::uint64_t alignment = 256;       // of every tensor slot in the destination
  // A request of at least this many pieces is copied to the device whole, into scratch memory,
  // and placed by one batched move, where one copy per piece would cost a driver call each
  // (checkpoints of many tiny tensors). Needs a sink that moves().
  std::uint32_t batch_pieces = 8;
  ConvertMode convert_mode = ConvertMode::kTorch;  // whose rules dtype= conversions follow
};

// The smallest staging buffer a load picks to make room for more readers (unless
// buffer_bytes is smaller still).
inline constexpr std::uint64_t kStagingFloor = 1u << 20;

// How a load uses the pool: `readers` threads, read requests of up to `buffer_bytes`, each in
// a pinned buffer of `slot_bytes` (room for an O_DIRECT read's page alignment). The budget
// holds at least 2 * readers such buffers.
struct StagingShape {
  unsigned readers = 1;
  std::uint64_t buffer_bytes = 0;
  std::uint64_t slot_bytes = 0;
};
// Throws std::invalid_argument when the budget cannot hold two buffers.
StagingShape staging_shape(const StagingOptions& opt);

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
  void run_request(const ReadRequest& req);

  std::shared_ptr<const Checkpoint> ckpt_;
  StagingOptions opt_;
  LoadedTensors result_;
  ReadPlan plan_;
  std::shared_ptr<StagingSink> sink_;
  struct Files;
  std::unique_ptr<Files> files_;
  std::size_t slot_bytes_ = 0;             // the pinned buffer each request asks for
  bool batching_ = false;                  // requests of many pieces are placed by one move
  std::atomic<std::uint64_t> batched_{0};  // requests placed so
  std::vector<Dtype> targets_;             // per pick, when the sink converts
  std::vector<std::uint64_t> slots_;       // per pick: address in the destination
  std::unique_ptr<ThreadPool> pool_;
  TaskGroup group_;
  std::atomic<std::uint64_t> done_{0};
  double started_ = 0;
};

// Copies `bytes` bytes of host memory at `src` into a new destination arena of `sink` through
// its pool's pinned buffers (chunks of at most opt.buffer_bytes, memcpy'd in while earlier
// chunks are copying), and returns the arena once every copy has finished. For bytes already in
// pageable host memory, such as what a collective delivered on the CPU: they reach the device
// through pinned memory, never by the driver staging pageable memory itself.
std::shared_ptr<Buffer> stage_host_bytes(StagingSink& sink, const std::byte* src, std::uint64_t bytes,
                                         const StagingOptions& opt);

// The sink for checking the pipeline without a GPU, with a pool of its own: the destination is
// host memory and copies (and conversions, with the host twins of the kernels, unless
// `converts` is false) run on a background thread, in order, each started `copy_delay_us` late
// (a slow copy engine makes any reuse of a buffer before its work ends show up as wrong bytes).
// With `fail_wait` = n > 0, the n-th wait for a buffer's copies and every later one throw
// CudaError, as after a copy that failed on a device (CUDA errors are sticky).
std::shared_ptr<StagingSink> make_host_sink(std::uint64_t alignment, unsigned copy_delay_us = 0,
                                            bool converts = true, unsigned fail_wait = 0);

}  // namespace fst
