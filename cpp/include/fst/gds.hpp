// GPU Direct Storage: the selection's file ranges are read in large page-aligned requests
// straight into a device "bulk" buffer (cuFileRead, several threads), then one batched kernel
// launch moves every tensor from where it landed to its 256-byte aligned slot in the
// destination arena (and one more converts the tensors whose dtype changes).
//
// The plan (what to read, where it lands, which moves and conversions follow) is a pure
// function, and the device sits behind GdsDevice, so the whole path runs on the CPU with
// make_host_gds_device() for tests, the way StagedLoad runs with make_host_sink().
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "fst/buffer.hpp"
#include "fst/convert.hpp"
#include "fst/file_handle.hpp"
#include "fst/load.hpp"
#include "fst/plan.hpp"
#include "fst/thread_pool.hpp"

namespace fst {

namespace kernels {
struct MoveTask;     // cpp/src/detail/kernel_abi.hpp: the batch descriptors of the kernels
struct ConvertTask;
}  // namespace kernels

struct GdsOptions {
  unsigned threads = 0;                     // 0: the CPUs this process may use
  std::uint64_t alignment = 256;            // of every tensor slot in the destination
  std::uint64_t request_bytes = 16u << 20;  // the largest single read (a multiple of 4096)
  // Device memory the reads land in before the kernels place the tensors (a multiple of 4096,
  // at least two pages). A selection larger than this is read in several windows, one after
  // the other, each with its own launches; the extra device memory stays bounded by it.
  std::uint64_t bulk_bytes = 512u << 20;
  // Unselected bytes between two selected ranges of a file that are read rather than
  // starting a new read (filters leave such holes).
  std::uint64_t merge_gap = 1u << 20;
  ConvertMode convert_mode = ConvertMode::kTorch;  // whose rules dtype= conversions follow
};

// One read: bytes [file_offset, file_offset + length) of a file into the bulk buffer at
// bulk_offset. Offset, length and bulk_offset are multiples of 4096, so storage and GPU
// memory meet page to page (what O_DIRECT and the GDS DMA path want).
struct BulkRead {
  std::uint32_t file;
  std::uint64_t file_offset;
  std::uint64_t length;       // may reach past the end of the file: the read then ends early
  std::uint64_t needed;       // bytes that must arrive (fewer is a file that shrank)
  std::uint64_t bulk_offset;
};
// Bytes of one tensor (selection index `pick`) from the bulk buffer to its slot.
struct BulkMove {
  std::uint64_t bulk_offset;
  std::uint64_t slot_offset;  // in the destination arena
  std::uint64_t bytes;
  std::uint32_t pick;
};
// Elements of one tensor converted from the bulk buffer into its slot.
struct BulkConvert {
  std::uint64_t bulk_offset;
  std::uint64_t slot_offset;
  std::uint64_t count;
  Dtype from, to;
  std::uint32_t pick;
};
// One fill of the bulk buffer: its reads, then one move launch and one conversion launch.
// No move or conversion writes bytes that another reads or writes (the kernels' contract):
// sources are in the bulk buffer, destinations in disjoint slots of the arena.
struct GdsWindow {
  std::vector<BulkRead> reads;
  std::vector<BulkMove> moves;
  std::vector<BulkConvert> converts;
  std::uint64_t bulk_used = 0;
};
struct GdsPlan {
  Placement placement;              // the destination arena's slots
  std::vector<GdsWindow> windows;
  std::uint64_t bulk_bytes = 0;     // the largest window: the bulk buffer to allocate
  std::uint64_t bytes_read = 0;     // sum of the reads' lengths
  std::size_t most_moves = 0, most_converts = 0;  // per window
};
// `targets` (empty: none) gives each pick's dtype after the load. A tensor is cut between
// windows only at element boundaries of its source dtype when it is converted.
GdsPlan plan_gds(const Checkpoint& ckpt, const std::vector<Pick>& sel, const std::vector<Dtype>& targets,
                 const GdsOptions& options);

// What a GdsLoad needs from the device. The cuFile implementation is make_cufile_device()
// (fst/cuda.hpp); make_host_gds_device() runs the same steps on host memory.
//
// A device serves one load at a time, and may serve several one after another (the groups of a
// streamed load): it keeps the files it opened, its bulk buffer (with its registration) and its
// task lists, and hands them out again where they fit, so registration is paid once per stream.
class GdsDevice {
 public:
  virtual ~GdsDevice() = default;
  // Opens the file `source` holds for direct reads, as file number `file` (reopened from that
  // descriptor, never from its path; kept when that number already names that very
  // descriptor). Throws UnsupportedError naming the file and why when it cannot be read so.
  virtual void open_file(std::uint32_t file, std::shared_ptr<const FileHandle> source) = 0;
  // The destination arena (the memory the tensors keep alive).
  virtual std::shared_ptr<Buffer> allocate(std::uint64_t bytes) = 0;
  // A bulk buffer of at least `bytes` (4096-aligned; the earlier one when large enough); its
  // address.
  virtual std::uint64_t bulk_buffer(std::uint64_t bytes) = 0;
  // Room for up to `moves` move tasks and `converts` conversion tasks per launch.
  virtual void reserve_tasks(std::size_t moves, std::size_t converts) = 0;
  // Reads up to `length` bytes at `file_offset` of file `file` into the bulk buffer at
  // `bulk_offset`; returns the bytes read (fewer only at the end of the file). Thread-safe.
  virtual std::uint64_t read(std::uint32_t file, std::uint64_t file_offset, std::uint64_t length,
                             std::uint64_t bulk_offset) = 0;
  // Queue one launch of the batched move (fst_move_batch) / conversion (fst_convert_batch);
  // the addresses in the tasks are absolute.
  virtual void move_async(const std::vector<kernels::MoveTask>& tasks) = 0;
  virtual void convert_async(const std::vector<kernels::ConvertTask>& tasks) = 0;
  // Returns once everything queued has finished.
  virtual void synchronize() = 0;
  // Called on a reading thread before its work (CUDA: make the device's context current).
  virtual void bind_thread() {}
  virtual ExportDevice device() const { return ExportDevice{}; }
  // How reads reach the device, for the load stats ("nvidia-fs 2.17, bulk buffer registered").
  virtual std::string describe() const = 0;
  // Bulk buffers allocated so far (one handed out again is not counted twice).
  std::size_t bulk_allocations() const noexcept { return bulk_allocations_.load(); }

 protected:
  std::atomic<std::size_t> bulk_allocations_{0};
};

// A GPU Direct Storage load of `selection`. Runs on a thread pool; wait() drives it to the end.
class GdsLoad final : public AsyncLoad {
 public:
  // `targets` (empty: none): the dtype each pick is delivered in, converted on the device.
  GdsLoad(std::shared_ptr<const Checkpoint> ckpt, std::vector<Pick> selection, const GdsOptions& options,
          std::shared_ptr<GdsDevice> device, const std::vector<Dtype>& targets = {});
  ~GdsLoad();
  GdsLoad(const GdsLoad&) = delete;
  GdsLoad& operator=(const GdsLoad&) = delete;

  LoadedTensors wait(const std::function<bool()>& tick, int tick_ms = 100) override;
  std::uint64_t bytes_done() const noexcept override { return done_.load(std::memory_order_relaxed); }
  std::uint64_t bytes_total() const noexcept override { return result_.stats.bytes; }

 private:
  void start_window(std::size_t window);
  void read(std::size_t window, const BulkRead& r);
  void place_window(std::size_t window);

  std::shared_ptr<const Checkpoint> ckpt_;
  GdsOptions opt_;
  std::shared_ptr<GdsDevice> device_;
  LoadedTensors result_;
  GdsPlan plan_;
  std::uint64_t bulk_ = 0;  // the bulk buffer's address
  std::uint64_t dest_ = 0;  // the destination arena's address
  std::atomic<std::size_t> reads_left_{0};  // in the window being read
  std::unique_ptr<ThreadPool> pool_;
  TaskGroup group_;
  std::atomic<std::uint64_t> done_{0};
  double started_ = 0;
};

// Host memory in place of the GPU: reads are O_DIRECT preads into a page-aligned host bulk
// buffer, and queued moves and conversions run through the host twins of the kernels only at
// synchronize() (the latest a stream could run them). It checks the kernels' overlap contract,
// reads that run past the bulk buffer, and reads into it while launches that read it are
// still queued (std::logic_error for each: the plan or the load is wrong).
std::shared_ptr<GdsDevice> make_host_gds_device();

}  // namespace fst
