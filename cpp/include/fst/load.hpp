// The vocabulary the three loads share (host reads, staged copies through pinned memory, GPU
// Direct Storage): backends, stats, the loaded tensors, a load in flight, and the prologue
// each load starts with.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "fst/buffer.hpp"
#include "fst/dtype.hpp"
#include "fst/export.hpp"
#include "fst/plan.hpp"

namespace fst {

enum class Backend { Auto, Pread, Direct, Mmap, Gds };
const char* backend_name(Backend b) noexcept;
Backend backend_from_name(const std::string& name);  // throws std::invalid_argument

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

// The prologue of every load: takes `selection` into `result`, counts its bytes and its
// dtypes as the files hold them, and checks that every file it reads is unchanged since its
// header was parsed, before anything is mapped, opened or read. Returns which files it reads.
std::vector<bool> begin_load(const Checkpoint& ckpt, std::vector<Pick> selection, LoadedTensors& result);

}  // namespace fst
