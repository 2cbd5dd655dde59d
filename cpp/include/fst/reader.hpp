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
#include "fst/load.hpp"
#include "fst/plan.hpp"
#include "fst/thread_pool.hpp"

namespace fst {

// Why a host load refuses Backend::Gds (it reads into GPU memory only).
inline constexpr const char* kGdsNeedsGpu =
    "backend 'gds' (GPU Direct Storage) reads into GPU memory; host targets use auto, pread, direct or mmap";

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

// A load into host memory through one of the CPU backends (the siblings: StagedLoad, GdsLoad).
class HostLoad final : public AsyncLoad {
 public:
  // `targets` (empty: none) gives each pick the dtype to convert it to after reading.
  HostLoad(std::shared_ptr<const Checkpoint> ckpt, std::vector<Pick> selection,
           const ReadOptions& options, std::vector<Dtype> targets = {});
  ~HostLoad();
  HostLoad(const HostLoad&) = delete;
  HostLoad& operator=(const HostLoad&) = delete;

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
