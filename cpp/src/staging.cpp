#include "fst/staging.hpp"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <deque>
#include <map>
#include <stdexcept>
#include <chrono>
#include <thread>

#include "detail/clock.hpp"
#include "detail/kernel_abi.hpp"
#include "detail/posix_file.hpp"
#include "fst/convert.hpp"
#include "fst/errors.hpp"

namespace fst {

// ---------------------------------------------------------------- the pool -----------

unsigned StagingPool::acquire(std::size_t bytes) {
  std::unique_lock<std::mutex> lock(mu_);
  if (bytes > budget_)
    throw std::invalid_argument("a staging buffer of " + std::to_string(bytes) + " bytes exceeds the pinned budget (" +
                                std::to_string(budget_) + " bytes)");
  const std::thread::id me = std::this_thread::get_id();
  while (true) {
    // 1. A buffer large enough whose copies are known to be done, or turn out to be now.
    for (unsigned i = 0; i < slots_.size(); ++i) {
      Slot& s = slots_[i];
      if (s.live && !s.held && s.bytes >= bytes && s.settled) return take(lock, i, false);
    }
    for (unsigned i = 0; i < slots_.size(); ++i) {
      Slot& s = slots_[i];
      if (s.live && !s.held && s.bytes >= bytes && finished(i)) {
        s.settled = true;
        return take(lock, i, false);
      }
    }
    // 2. Room in the budget: a new buffer (allocated without the lock: pinning is slow).
    if (used_ + bytes <= budget_) {
      unsigned i = 0;
      while (i < slots_.size() && (slots_[i].live || slots_[i].held)) ++i;
      if (i == slots_.size()) slots_.emplace_back();
      Slot& s = slots_[i];
      s.held = true;
      s.settled = true;
      used_ += bytes;
      lock.unlock();
      std::byte* data = nullptr;
      try {
        data = allocate_slot(i, bytes);
      } catch (...) {
        lock.lock();
        slots_[i].held = false;
        used_ -= bytes;
        cv_.notify_all();
        throw;
      }
      lock.lock();
      Slot& t = slots_[i];  // the vector may have grown meanwhile
      t.data = data;
      t.bytes = bytes;
      t.live = true;
      t.last_holder = me;
      ++allocations_;
      return i;
    }
    // 3. The budget is spent and no free buffer is large enough, but one too small is free:
    //    free it to make room (after its copies).
    for (unsigned i = 0; i < slots_.size(); ++i) {
      Slot& s = slots_[i];
      if (!s.live || s.held || s.bytes >= bytes) continue;
      s.held = true;
      lock.unlock();
      std::exception_ptr failed;
      try {
        wait(i);
      } catch (...) {
        failed = std::current_exception();
      }
      if (!failed) free_slot(i);
      lock.lock();
      Slot& t = slots_[i];
      t.held = false;
      if (!failed) {
        used_ -= t.bytes;
        t.live = false;
        t.data = nullptr;
        t.bytes = 0;
      }
      cv_.notify_all();
      if (failed) std::rethrow_exception(failed);
      break;
    }
    if (used_ + bytes <= budget_) continue;
    // 4. A buffer large enough still copying: wait for it, preferring the one released longest
    //    ago, by another reader (a reader never waits on the copy it has just queued itself).
    unsigned best = UINT32_MAX;
    for (unsigned i = 0; i < slots_.size(); ++i) {
      const Slot& s = slots_[i];
      if (!s.live || s.held || s.bytes < bytes) continue;
      if (best == UINT32_MAX) {
        best = i;
        continue;
      }
      const Slot& b = slots_[best];
      const bool mine = s.last_holder == me, best_mine = b.last_holder == me;
      if (mine != best_mine ? best_mine : s.released_at < b.released_at) best = i;
    }
    if (best != UINT32_MAX) return take(lock, best, true);
    // 5. Every buffer is held: wait for one to come back.
    cv_.wait(lock);
  }
}

unsigned StagingPool::take(std::unique_lock<std::mutex>& lock, unsigned slot, bool must_wait) {
  Slot& s = slots_[slot];
  s.held = true;
  s.last_holder = std::this_thread::get_id();
  if (!must_wait) return slot;
  lock.unlock();
  try {
    wait(slot);
  } catch (...) {
    // Given back unsettled, so that readers waiting for a buffer do not wait forever.
    lock.lock();
    slots_[slot].held = false;
    cv_.notify_all();
    throw;
  }
  lock.lock();
  slots_[slot].settled = true;
  return slot;
}

std::uint64_t StagingPool::release(unsigned slot) {
  std::exception_ptr failed;
  try {
    record(slot);
  } catch (...) {
    failed = std::current_exception();
  }
  std::uint64_t ticket;
  bool over_budget;
  {
    std::lock_guard<std::mutex> lock(mu_);
    Slot& s = slots_[slot];
    s.held = false;
    s.settled = false;
    s.released_at = ++releases_;
    ticket = ++s.ticket;
    over_budget = used_ > budget_;
  }
  cv_.notify_all();
  if (over_budget) trim();
  if (failed) std::rethrow_exception(failed);
  return ticket;
}

void StagingPool::wait_released(unsigned slot, std::uint64_t ticket) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    const Slot& s = slots_[slot];
    // Released again since (whoever took it waited for this work first), freed, or known done.
    if (s.ticket != ticket || !s.live || s.settled) return;
  }
  wait(slot);
}

std::byte* StagingPool::data(unsigned slot) const {
  std::lock_guard<std::mutex> lock(mu_);
  return slots_[slot].data;
}

void StagingPool::set_budget(std::uint64_t budget) {
  bool over;
  {
    std::lock_guard<std::mutex> lock(mu_);
    budget_ = budget;
    over = used_ > budget_;
  }
  cv_.notify_all();
  if (over) trim();
}

std::uint64_t StagingPool::trim() {
  std::uint64_t freed = 0;
  std::unique_lock<std::mutex> lock(mu_);
  for (unsigned i = 0; i < slots_.size(); ++i) {
    Slot& s = slots_[i];
    if (!s.live || s.held) continue;
    s.held = true;
    lock.unlock();
    bool done = true;
    try {
      wait(i);
    } catch (...) {
      done = false;  // a device error: its memory may still be in use, keep it
    }
    if (done) free_slot(i);
    lock.lock();
    Slot& t = slots_[i];
    t.held = false;
    if (done) {
      used_ -= t.bytes;
      freed += t.bytes;
      t.live = false;
      t.data = nullptr;
      t.bytes = 0;
    }
  }
  cv_.notify_all();
  return freed;
}

StagingPool::Usage StagingPool::usage() const {
  std::lock_guard<std::mutex> lock(mu_);
  Usage u;
  u.budget = budget_;
  u.allocations = allocations_;
  for (const Slot& s : slots_) {
    if (!s.live) continue;
    ++u.buffers;
    u.pinned_bytes += s.bytes;
    if (s.held) ++u.in_use;
  }
  return u;
}

void StagingPool::close() noexcept {
  std::lock_guard<std::mutex> lock(mu_);
  for (unsigned i = 0; i < slots_.size(); ++i) {
    if (!slots_[i].live) continue;
    try {
      wait(i);
    } catch (...) {
    }
    free_slot(i);
    slots_[i].live = false;
  }
}

void StagingSink::release(unsigned slot) {
  const std::uint64_t ticket = pool().release(slot);
  std::lock_guard<std::mutex> lock(pending_mu_);
  for (auto& [s, t] : pending_)
    if (s == slot) {
      t = ticket;
      return;
    }
  pending_.emplace_back(slot, ticket);
}

void StagingSink::wait_all() {
  std::vector<std::pair<unsigned, std::uint64_t>> pending;
  {
    std::lock_guard<std::mutex> lock(pending_mu_);
    pending.swap(pending_);
  }
  for (std::size_t i = 0; i < pending.size(); ++i) {
    try {
      pool().wait_released(pending[i].first, pending[i].second);
    } catch (...) {
      // Keep what was not waited for: the destructor still waits for it.
      std::lock_guard<std::mutex> lock(pending_mu_);
      pending_.insert(pending_.end(), pending.begin() + static_cast<std::ptrdiff_t>(i) + 1, pending.end());
      throw;
    }
  }
}

void StagingSink::drain() noexcept {
  try {
    wait_all();
  } catch (...) {
  }
}

StagingShape staging_shape(const StagingOptions& opt) {
  if (opt.buffer_bytes < detail::kDirectAlign || opt.buffer_bytes % detail::kDirectAlign)
    throw std::invalid_argument("staging buffers must be a multiple of 4096 bytes");
  // An O_DIRECT read of a request starts on the page holding its first byte: one page more.
  const std::uint64_t pad = opt.backend == Backend::Direct ? detail::kDirectAlign : 0;
  const std::uint64_t floor = std::min(kStagingFloor, opt.buffer_bytes);
  if (opt.budget < 2 * (floor + pad))
    throw std::invalid_argument("the pinned budget (" + std::to_string(opt.budget) + " bytes) cannot hold two staging buffers of " +
                                std::to_string(floor + pad) + " bytes");
  StagingShape shape;
  shape.readers = std::max(1u, opt.threads ? opt.threads : ThreadPool::default_threads());
  // Two buffers per reader, each as large as the budget then allows, within [floor, buffer_bytes];
  // at the floor, fewer readers.
  std::uint64_t each = opt.budget / (2ull * shape.readers);
  each = each > pad ? (each - pad) / detail::kDirectAlign * detail::kDirectAlign : 0;
  shape.buffer_bytes = std::clamp(each, floor, opt.buffer_bytes);
  shape.slot_bytes = shape.buffer_bytes + pad;
  shape.readers = static_cast<unsigned>(
      std::min<std::uint64_t>(shape.readers, std::max<std::uint64_t>(1, opt.budget / (2 * shape.slot_bytes))));
  return shape;
}

struct StagedLoad::Files {
  std::vector<detail::PosixFile> files;
};

StagedLoad::StagedLoad(std::shared_ptr<const Checkpoint> ckpt, std::vector<Pick> selection,
                       const StagingOptions& options, std::shared_ptr<StagingSink> sink,
                       const std::vector<Dtype>& targets)
    : ckpt_(std::move(ckpt)), opt_(options), sink_(std::move(sink)), files_(std::make_unique<Files>()) {
  started_ = detail::now_seconds();
  if (opt_.backend != Backend::Pread && opt_.backend != Backend::Direct)
    throw UnsupportedError(std::string("backend '") + backend_name(opt_.backend) +
                           "' cannot feed device memory (use pread or direct)");
  const StagingShape shape = staging_shape(opt_);
  sink_->pool().set_budget(opt_.budget);
  const auto& headers = ckpt_->files();
  begin_load(*ckpt_, std::move(selection), result_);
  const auto& sel = result_.selection;
  LoadStats& st = result_.stats;
  st.backend = opt_.backend;
  if (!targets.empty() && sink_->converts()) {
    targets_ = targets;  // converted on the device, from scratch memory into the slots
  } else {
    for (std::size_t i = 0; i < targets.size(); ++i)
      if (targets[i] != result_.dtypes[i]) result_.casts.emplace_back(static_cast<std::uint32_t>(i), targets[i]);
  }

  // Open each file the selection touches (O_DIRECT for the direct backend).
  files_->files.resize(headers.size());
  const int flags = O_RDONLY | (opt_.backend == Backend::Direct ? O_DIRECT : 0);
  for (const Pick& p : sel) {
    auto& f = files_->files[p.ref.file];
    if (f.valid()) continue;
    // Reopened from the descriptor the header was read from, never from the path.
    int err = 0;
    f = detail::PosixFile::try_reopen(*headers[p.ref.file].file, flags, err);
    if (!f.valid()) {
      if (opt_.backend == Backend::Direct && err == EINVAL)
        throw UnsupportedError("backend 'direct': O_DIRECT open of '" + headers[p.ref.file].path +
                               "' failed: " + std::strerror(err));
      throw IoError(err, "open", headers[p.ref.file].path);
    }
  }

  Placement placement = place(*ckpt_, sel, opt_.alignment, targets_);
  result_.device = sink_->device();
  auto dest = sink_->allocate(placement.size);
  result_.owners.push_back(dest);
  result_.data.resize(sel.size());
  result_.owner_of.assign(sel.size(), 0);
  for (std::size_t i = 0; i < sel.size(); ++i) {
    result_.data[i] = dest->data() + placement.offsets[i];
    slots_.push_back(reinterpret_cast<std::uintptr_t>(result_.data[i]));
  }
  if (!targets_.empty()) result_.dtypes = targets_;
  plan_ = plan_reads(*ckpt_, sel, placement, shape.buffer_bytes, UINT32_MAX);
  st.bytes_read = plan_.bytes;
  st.requests = plan_.requests.size();

  // Buffers as large as this load's largest request needs (rounded up, so that loads of
  // similar sizes find the pool's buffers large enough), not more.
  std::uint64_t largest = 0;
  std::size_t most_pieces = 0;
  for (const ReadRequest& req : plan_.requests) {
    largest = std::max<std::uint64_t>(largest, req.length);
    most_pieces = std::max<std::size_t>(most_pieces, req.piece_count);
  }
  std::uint64_t wanted = 64u << 10;
  while (wanted < largest) wanted *= 2;
  slot_bytes_ = std::min(wanted, shape.buffer_bytes) + (shape.slot_bytes - shape.buffer_bytes);
  batching_ = sink_->moves() && most_pieces >= opt_.batch_pieces;
  if (batching_ || !targets_.empty())
    sink_->reserve_tasks(batching_ ? most_pieces : 0, targets_.empty() ? 0 : most_pieces);

  const unsigned readers = static_cast<unsigned>(std::min<std::size_t>(shape.readers, std::max<std::size_t>(plan_.requests.size(), 1)));
  pool_ = std::make_unique<ThreadPool>(readers);
  st.threads = pool_->size();
  st.reason = std::to_string(readers) + " readers, pinned staging buffers of " + std::to_string(slot_bytes_ >> 10) +
              " KiB from a pool of at most " + std::to_string(opt_.budget >> 10) + " KiB";
  for (const ReadRequest& req : plan_.requests)
    pool_->submit(group_, [this, &req](unsigned) { run_request(req); });
}

StagedLoad::~StagedLoad() {
  // Tasks still queued or running use this object: stop them first (a no-op once finished).
  group_.stop();
  pool_.reset();
  // Copies still queued write into the destination, which goes with this load; a wait that
  // fails (a device error, which sticks) has nothing left to wait for, and the load already
  // reported an error.
  if (sink_) {
    try {
      sink_->wait_all();
    } catch (...) {
    }
  }
}

void StagedLoad::run_request(const ReadRequest& req) {
  sink_->bind_thread();
  const unsigned slot = sink_->acquire(slot_bytes_);
  try {
    // Only the slot's holder touches its buffer and its scratch memory.
    std::byte* buffer = sink_->buffer(slot);
    const auto& file = files_->files[req.file];
    const std::byte* src;
    if (opt_.backend == Backend::Direct) {
      src = file.read_direct(buffer, req.length, req.offset);
    } else {
      file.read_exact(buffer, req.length, req.offset);
      src = buffer;
    }
    const Piece* pieces = plan_.pieces.data() + req.first_piece;
    const bool batched = batching_ && req.piece_count >= opt_.batch_pieces;
    std::uint64_t scratch = 0;  // where the slot's staging buffer is mirrored on the device
    if (batched || !targets_.empty())
      scratch = sink_->scratch(slot, slot_bytes_) - reinterpret_cast<std::uintptr_t>(buffer);
    // Batched: the whole request in one copy; each piece then moved (or converted) from there.
    if (batched) sink_->copy_async(slot, scratch + reinterpret_cast<std::uintptr_t>(src), src, req.length);
    std::vector<kernels::MoveTask> moves;
    std::vector<kernels::ConvertTask> converts;
    for (std::uint32_t k = 0; k < req.piece_count; ++k) {
      const Piece& piece = pieces[k];
      const Dtype from = ckpt_->entry(result_.selection[piece.pick].ref).dtype;
      const std::uint64_t slot_address = slots_[piece.pick];
      const std::uint64_t raw = scratch + reinterpret_cast<std::uintptr_t>(src);
      if (targets_.empty() || targets_[piece.pick] == from) {
        if (batched) moves.push_back(kernels::MoveTask{raw, slot_address + piece.pick_offset, piece.length});
        else sink_->copy_async(slot, slot_address + piece.pick_offset, src, piece.length);
      } else {
        // Raw bytes in scratch memory beside the staging buffer, converted into the slot.
        if (!batched) sink_->copy_async(slot, raw, src, piece.length);
        const Dtype to = targets_[piece.pick];
        const std::uint64_t first = piece.pick_offset * 8 / dtype_bits(from);
        converts.push_back(kernels::ConvertTask{raw, slot_address + first * dtype_bits(to) / 8,
                                                piece.length * 8 / dtype_bits(from),
                                                static_cast<std::uint32_t>(from), static_cast<std::uint32_t>(to),
                                                static_cast<std::uint32_t>(opt_.convert_mode)});
      }
      src += piece.length;
    }
    if (!moves.empty()) sink_->move_async(slot, moves);
    if (!converts.empty()) sink_->convert_async(slot, converts);
    if (batched) batched_.fetch_add(1, std::memory_order_relaxed);
  } catch (...) {
    sink_->release(slot);
    throw;
  }
  sink_->release(slot);
  done_.fetch_add(req.length, std::memory_order_relaxed);
}

LoadedTensors StagedLoad::wait(const std::function<bool()>& tick, int tick_ms) {
  group_.drive(tick, tick_ms);
  pool_.reset();
  sink_->wait_all();
  files_.reset();
  sink_.reset();  // its device memory goes with it unless the sink serves more loads
  if (const std::uint64_t n = batched_.load())
    result_.stats.reason += "; " + std::to_string(n) + " of " + std::to_string(plan_.requests.size()) +
                            " requests copied whole and placed by one batched move";
  result_.stats.seconds = detail::now_seconds() - started_;
  return std::move(result_);
}

std::shared_ptr<Buffer> stage_host_bytes(StagingSink& sink, const std::byte* src, std::uint64_t bytes,
                                         const StagingOptions& opt) {
  const StagingShape shape = staging_shape(opt);
  sink.pool().set_budget(opt.budget);
  std::shared_ptr<Buffer> dest = sink.allocate(bytes);
  const std::uint64_t chunk = std::min<std::uint64_t>(shape.buffer_bytes, std::max<std::uint64_t>(bytes, 1));
  const std::uint64_t base = reinterpret_cast<std::uintptr_t>(dest->data());
  // On a thread of fst's own: bind_thread() may change the thread's current CUDA context,
  // which the caller's thread keeps as it was.
  std::exception_ptr failed;
  std::thread copier([&] {
    try {
      sink.bind_thread();
      for (std::uint64_t at = 0; at < bytes; at += chunk) {
        const std::uint64_t n = std::min(chunk, bytes - at);
        const unsigned slot = sink.acquire(chunk);
        try {
          std::memcpy(sink.buffer(slot), src + at, n);
          sink.copy_async(slot, base + at, sink.buffer(slot), n);
        } catch (...) {
          sink.release(slot);
          throw;
        }
        sink.release(slot);
      }
    } catch (...) {
      failed = std::current_exception();
    }
  });
  copier.join();
  if (failed) {
    sink.drain();  // the copies queued before the error still read from `src`
    std::rethrow_exception(failed);
  }
  sink.wait_all();
  return dest;
}

// ---------------------------------------------------------------- host sink ------------

namespace {

// A pool whose slots are host memory and whose "streams" are one copy engine thread that runs
// the queued jobs in order; a slot's mark is the number of its jobs queued so far.
class HostPool final : public StagingPool {
 public:
  HostPool(unsigned copy_delay_us, unsigned fail_wait)
      : StagingPool(StagingOptions{}.budget), delay_us_(copy_delay_us), fail_wait_(fail_wait),
        worker_([this] { run(); }) {}
  ~HostPool() override {
    close();
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
    }
    cv_.notify_all();
    worker_.join();
  }

  void enqueue(unsigned slot, std::function<void()> job) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      queue_.push_back(Job{slot, std::move(job)});
      ++lanes_[slot].queued;
    }
    cv_.notify_all();
  }

 protected:
  std::byte* allocate_slot(unsigned slot, std::size_t bytes) override {
    auto memory = std::make_unique<HostArena>(bytes, detail::kDirectAlign);
    std::lock_guard<std::mutex> lock(mu_);
    if (lanes_.size() <= slot) lanes_.resize(slot + 1);
    lanes_[slot].memory = std::move(memory);
    return lanes_[slot].memory->data();
  }
  void free_slot(unsigned slot) noexcept override {
    std::lock_guard<std::mutex> lock(mu_);
    lanes_[slot].memory.reset();
  }
  void record(unsigned slot) override {
    std::lock_guard<std::mutex> lock(mu_);
    lanes_[slot].mark = lanes_[slot].queued;
  }
  bool finished(unsigned slot) override {
    std::lock_guard<std::mutex> lock(mu_);
    return lanes_[slot].done >= lanes_[slot].mark;
  }
  void wait(unsigned slot) override {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return lanes_[slot].done >= lanes_[slot].mark; });
    if (fail_wait_ && ++waits_ >= fail_wait_)
      throw CudaError("copy on staging buffer " + std::to_string(slot) + " failed (injected)");
  }

 private:
  struct Job {
    unsigned slot;
    std::function<void()> run;
  };
  struct Lane {
    std::unique_ptr<HostArena> memory;
    std::uint64_t queued = 0, done = 0, mark = 0;
  };
  // The copy engine: jobs run one at a time in the order queued, each started late.
  void run() {
    std::unique_lock<std::mutex> lock(mu_);
    while (true) {
      cv_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) return;
      Job job = std::move(queue_.front());
      queue_.pop_front();
      lock.unlock();
      if (delay_us_) std::this_thread::sleep_for(std::chrono::microseconds(delay_us_));
      job.run();
      lock.lock();
      ++lanes_[job.slot].done;
      cv_.notify_all();
    }
  }

  unsigned delay_us_;
  unsigned fail_wait_;
  unsigned waits_ = 0;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Job> queue_;
  std::deque<Lane> lanes_;  // a deque: references to lanes stay valid as it grows
  bool stopping_ = false;
  std::thread worker_;
};

class HostSink final : public StagingSink {
 public:
  HostSink(std::uint64_t alignment, unsigned copy_delay_us, bool converts, unsigned fail_wait)
      : alignment_(alignment), converts_(converts), pool_(copy_delay_us, fail_wait) {}
  ~HostSink() override { drain(); }

  StagingPool& pool() override { return pool_; }
  std::shared_ptr<Buffer> allocate(std::uint64_t bytes) override {
    return std::make_shared<HostArena>(bytes, alignment_);
  }
  std::uint64_t scratch(unsigned slot, std::size_t bytes) override {
    std::lock_guard<std::mutex> lock(mu_);
    std::unique_ptr<HostArena>& buffer = scratch_[slot];
    if (!buffer || buffer->size() < bytes) buffer = std::make_unique<HostArena>(bytes, detail::kDirectAlign);
    return reinterpret_cast<std::uintptr_t>(buffer->data());
  }
  bool converts() const override { return converts_; }
  bool moves() const override { return true; }
  void reserve_tasks(std::size_t, std::size_t) override {}

  void copy_async(unsigned slot, std::uint64_t dst, const std::byte* src, std::uint64_t bytes) override {
    pool_.enqueue(slot, [dst, src, bytes] { std::memcpy(reinterpret_cast<std::byte*>(dst), src, bytes); });
  }
  void move_async(unsigned slot, const std::vector<kernels::MoveTask>& tasks) override {
    pool_.enqueue(slot, [tasks] {
      for (const auto& t : tasks)
        if (t.src != t.dst) std::memcpy(reinterpret_cast<void*>(t.dst), reinterpret_cast<const void*>(t.src), t.bytes);
    });
  }
  void convert_async(unsigned slot, const std::vector<kernels::ConvertTask>& tasks) override {
    pool_.enqueue(slot, [tasks] {
      for (const auto& t : tasks)
        convert_host(reinterpret_cast<const void*>(t.src), static_cast<Dtype>(t.src_dtype),
                     reinterpret_cast<void*>(t.dst), static_cast<Dtype>(t.dst_dtype), t.count, 1,
                     static_cast<ConvertMode>(t.mode));
    });
  }

 private:
  std::uint64_t alignment_;
  bool converts_;
  HostPool pool_;
  std::mutex mu_;
  std::map<unsigned, std::unique_ptr<HostArena>> scratch_;  // per pool slot
};

}  // namespace

std::shared_ptr<StagingSink> make_host_sink(std::uint64_t alignment, unsigned copy_delay_us, bool converts,
                                            unsigned fail_wait) {
  return std::make_shared<HostSink>(alignment, copy_delay_us, converts, fail_wait);
}

}  // namespace fst
