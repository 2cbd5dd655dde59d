// Read: fills host memory with the selected tensors through one of the I/O backends, on a
// thread pool, and says which backend ran and why.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "fst/buffer.hpp"
#include "fst/convert.hpp"
#include "fst/export.hpp"
#include "fst/plan.hpp"
#include "fst/thread_pool.hpp"

namespace fst {

enum class Backend { Auto, Pread, Direct, Mmap, Gds };
const char* backend_name(Backend b) noexcept;
// Why a host load refuses Backend::Gds (it reads into GPU memory only).
inline constexpr const char* kGdsNeedsGpu =
    "backend 'gds' (GPU Direct Storage) reads into GPU memory; host targets use auto, pread, direct or mmap";
Backend backend_from_name(const std::string& name);  // throws std::invalid_argument

struct ReadOptions {
  Backend backend = Backend::Auto;
  unsigned threads = 0;                    // 0: the CPUs this process may use
  std::uint64_t alignment = 64;            // of every slot fst fills itself
  std::uint64_t view_alignment = 0;        // zero-copy mmap views need this (0: natural)
  bool allow_views = true;                 // may tensors view a file mapping (CPU targets)?
  std::uint64_t max_request = 16u << 20;   // bytes per read request
  double resident_for_mmap = 0.98;         // auto: below this page-cache share, read ahead
  ConvertMode convert_mode = ConvertMode::kTorch;  // whose rules dtype= conversions follow
};

struct LoadStats {
  Backend backend = Backend::Auto;
  std::string reason;
  std::uint64_t bytes = 0;      // tensor bytes delivered
  std::uint64_t bytes_read = 0; // bytes read from files (0 for zero-copy views)
  std::uint64_t requests = 0;
  double resident = -1;         // share of the bytes in the page cache (-1: not measured)
  double seconds = 0;
  unsigned threads = 0;
};

// Tensors of one load: data[i] is where selection[i] lives, kept alive by owners[owner_of[i]].
struct LoadedTensors {
  std::vector<Pick> selection;
  std::vector<std::byte*> data;
  std::vector<std::uint32_t> owner_of;
  std::vector<std::shared_ptr<Buffer>> owners;
  std::vector<Dtype> dtypes;  // each tensor's dtype as delivered (after any conversion)
  // Conversions left to the framework (device loads): tensor index and dtype wanted.
  std::vector<std::pair<std::uint32_t, Dtype>> casts;
  ExportDevice device;        // where data[] points: host memory unless a device load
  LoadStats stats;
};

// A load in flight (host or device). wait() drives it to the end on the calling thread:
// it calls `tick` every `tick_ms` meanwhile; `tick` returns false to cancel (the load then
// stops early and wait() throws after the workers are idle). wait() throws the first error.
class AsyncLoad {
 public:
  virtual ~AsyncLoad() = default;
  virtual LoadedTensors wait(const std::function<bool()>& tick, int tick_ms = 100) = 0;
  virtual std::uint64_t bytes_done() const noexcept = 0;
  virtual std::uint64_t bytes_total() const noexcept = 0;
};

// A load into host memory through one of the CPU backends.
class PendingLoad final : public AsyncLoad {
 public:
  // `targets` (empty: none) gives each pick the dtype to convert it to after reading.
  PendingLoad(std::shared_ptr<const Checkpoint> ckpt, std::vector<Pick> selection,
              const ReadOptions& options, std::vector<Dtype> targets = {});
  ~PendingLoad();
  PendingLoad(const PendingLoad&) = delete;
  PendingLoad& operator=(const PendingLoad&) = delete;

  LoadedTensors wait(const std::function<bool()>& tick, int tick_ms = 100) override;
  std::uint64_t bytes_done() const noexcept override { return done_.load(std::memory_order_relaxed); }
  std::uint64_t bytes_total() const noexcept override { return result_.stats.bytes; }

 private:
  void start_views(bool read_ahead);
  // Backs the arena range a request fills before reading into it (see HostArena::populate).
  void populate_for(const ReadRequest& req) const;
  void start_reads(bool direct);
  // The load's worker threads, started on first use: a load of views of cached data has no
  // work for them, and starting and joining threads is most of a small load's fixed cost.
  ThreadPool& pool();

  std::shared_ptr<const Checkpoint> ckpt_;
  ReadOptions opt_;
  std::vector<Dtype> targets_;
  LoadedTensors result_;
  std::unique_ptr<ThreadPool> pool_;
  TaskGroup group_;
  ReadPlan plan_;
  HostArena* arena_ = nullptr;  // where requests land (owned by result_.owners)
  struct Files;
  std::unique_ptr<Files> files_;
  std::atomic<std::uint64_t> done_{0};
  double started_ = 0;
};

// How a host load reads: the backend asked for, or the automatic choice and why.
struct HostBackendChoice {
  Backend backend;
  std::string reason;
  double resident = 1.0;    // page-cache share of the data (measured for the automatic choice)
  bool read_ahead = false;  // views whose data is partly uncached: ask the kernel for the rest
};
// The one place a host load's backend is chosen, for whole loads and for single tensors
// (safe_open): `used[f]` marks the files the load reads. Throws UnsupportedError for a
// backend that cannot serve the target.
HostBackendChoice choose_host_backend(const Checkpoint& ckpt, const std::vector<bool>& used, const ReadOptions& opt);

// Share of bytes [offset, offset+length) of `path` that is in the page cache (0..1).
double page_cache_residency(int fd, std::uint64_t file_size, std::uint64_t offset, std::uint64_t length);
// The page-cache share of the data of the files whose descriptor is given (fds[f] < 0: not
// part of the load), weighted by size.
double data_residency(const Checkpoint& ckpt, const std::vector<int>& fds);
// "97%": a share as the load stats' reasons print it.
std::string percent(double share);

// Whether O_DIRECT can be opened for `path` (and errno otherwise).
bool direct_io_supported(const std::string& path, int& err);

}  // namespace fst
