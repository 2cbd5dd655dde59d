#include "fst/staging.hpp"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <deque>
#include <chrono>
#include <thread>

#include "detail/clock.hpp"
#include "detail/kernel_abi.hpp"
#include "detail/posix_file.hpp"
#include "fst/convert.hpp"
#include "fst/errors.hpp"

namespace fst {

unsigned staging_buffer_count(const StagingOptions& opt) noexcept {
  std::uint64_t n = opt.buffer_bytes ? opt.budget / opt.buffer_bytes : 0;
  return static_cast<unsigned>(std::clamp<std::uint64_t>(n, 2, 1024));
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
  if (opt_.buffer_bytes < detail::kDirectAlign || opt_.buffer_bytes % detail::kDirectAlign)
    throw std::invalid_argument("staging buffers must be a multiple of 4096 bytes");
  const auto& headers = ckpt_->files();
  result_.selection = std::move(selection);
  const auto& sel = result_.selection;
  LoadStats& st = result_.stats;
  st.backend = opt_.backend;
  for (const Pick& p : sel) {
    st.bytes += ckpt_->extent(p).nbytes;
    result_.dtypes.push_back(ckpt_->entry(p.ref).dtype);
  }
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
    headers[p.ref.file].file->check_unchanged();
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
  plan_ = plan_reads(*ckpt_, sel, placement, opt_.buffer_bytes, UINT32_MAX);
  st.bytes_read = plan_.bytes;
  st.requests = plan_.requests.size();

  const unsigned count = std::min<unsigned>(staging_buffer_count(opt_),
                                            std::max<std::size_t>(plan_.requests.size(), 1));
  buffer_size_ = opt_.buffer_bytes + 2 * detail::kDirectAlign;
  // Pinning memory is slow: each lane's buffer is allocated by the first thread to use it, so
  // the first reads start after one allocation, not after all of them.
  sink_->reserve_lanes(count);
  buffers_.assign(count, nullptr);
  scratch_.assign(count, 0);
  std::size_t most_pieces = 0;
  for (const ReadRequest& req : plan_.requests) most_pieces = std::max<std::size_t>(most_pieces, req.piece_count);
  batching_ = sink_->moves() && most_pieces >= opt_.batch_pieces;
  if (batching_ || !targets_.empty())
    sink_->reserve_tasks(count, batching_ ? most_pieces : 0, targets_.empty() ? 0 : most_pieces);
  busy_.assign(count, false);
  in_flight_.assign(count, false);
  st.reason = std::to_string(count) + " pinned staging buffers of " +
              std::to_string(opt_.buffer_bytes >> 20) + " MiB";

  // More threads than buffers would only wait for buffers.
  unsigned threads = opt_.threads ? opt_.threads : ThreadPool::default_threads();
  pool_ = std::make_unique<ThreadPool>(std::min(threads, count));
  st.threads = pool_->size();
  for (const ReadRequest& req : plan_.requests)
    pool_->submit(group_, [this, &req](unsigned) { run_request(req); });
}

StagedLoad::~StagedLoad() {
  // Tasks still queued or running use this object: stop them first (a no-op once finished).
  group_.stop();
  pool_.reset();
  // Copies still queued read from the staging buffers: let them finish before the sink goes.
  // A wait that fails (a device error, which sticks) has nothing left to wait for, and the
  // load already reported an error.
  if (sink_)
    for (unsigned lane = 0; lane < in_flight_.size(); ++lane)
      if (in_flight_[lane]) {
        try {
          sink_->wait(lane);
        } catch (...) {
        }
      }
}

unsigned StagedLoad::acquire_buffer() {
  unsigned lane = 0;
  bool must_wait = false;
  {
    std::unique_lock<std::mutex> lock(ring_mu_);
    ring_cv_.wait(lock, [&] { return in_use_ < busy_.size(); });
    // Prefer a buffer whose copies are known to be done over one that may still be copying.
    lane = UINT32_MAX;
    for (unsigned i = 0; i < busy_.size(); ++i) {
      if (busy_[i]) continue;
      if (!in_flight_[i]) {
        lane = i;
        break;
      }
      if (lane == UINT32_MAX) lane = i;
    }
    busy_[lane] = true;
    must_wait = in_flight_[lane];
    in_flight_[lane] = false;
    ++in_use_;
  }
  if (must_wait) {
    try {
      sink_->wait(lane);
    } catch (...) {
      // The buffer was never handed out: give it back (still in flight, its copies unknown),
      // so that threads waiting for a buffer do not wait forever.
      release_buffer(lane);
      throw;
    }
  }
  return lane;
}

void StagedLoad::release_buffer(unsigned lane) {
  {
    std::lock_guard<std::mutex> lock(ring_mu_);
    busy_[lane] = false;
    in_flight_[lane] = true;
    --in_use_;
  }
  ring_cv_.notify_one();
}

void StagedLoad::run_request(const ReadRequest& req) {
  sink_->bind_thread();
  const unsigned lane = acquire_buffer();
  try {
    // The thread holding a lane is the only one touching its buffer (the ring's mutex orders
    // one holder after the next).
    if (!buffers_[lane]) buffers_[lane] = sink_->staging_buffer(lane, buffer_size_);
    const auto& file = files_->files[req.file];
    const std::byte* src;
    if (opt_.backend == Backend::Direct) {
      src = file.read_direct(buffers_[lane], req.length, req.offset);
    } else {
      file.read_exact(buffers_[lane], req.length, req.offset);
      src = buffers_[lane];
    }
    const Piece* pieces = plan_.pieces.data() + req.first_piece;
    const bool batched = batching_ && req.piece_count >= opt_.batch_pieces;
    std::uint64_t scratch = 0;  // where the lane's staging buffer is mirrored on the device
    if (batched || !targets_.empty()) {
      if (!scratch_[lane]) scratch_[lane] = sink_->scratch(lane, buffer_size_);
      scratch = scratch_[lane] - reinterpret_cast<std::uintptr_t>(buffers_[lane]);
    }
    // Batched: the whole request in one copy; each piece then moved (or converted) from there.
    if (batched) sink_->copy_async(lane, scratch + reinterpret_cast<std::uintptr_t>(src), src, req.length);
    std::vector<kernels::MoveTask> moves;
    std::vector<kernels::ConvertTask> converts;
    for (std::uint32_t k = 0; k < req.piece_count; ++k) {
      const Piece& piece = pieces[k];
      const Dtype from = ckpt_->entry(result_.selection[piece.pick].ref).dtype;
      const std::uint64_t slot = slots_[piece.pick];
      const std::uint64_t raw = scratch + reinterpret_cast<std::uintptr_t>(src);
      if (targets_.empty() || targets_[piece.pick] == from) {
        if (batched) moves.push_back(kernels::MoveTask{raw, slot + piece.pick_offset, piece.length});
        else sink_->copy_async(lane, slot + piece.pick_offset, src, piece.length);
      } else {
        // Raw bytes in scratch memory beside the staging buffer, converted into the slot.
        if (!batched) sink_->copy_async(lane, raw, src, piece.length);
        const Dtype to = targets_[piece.pick];
        const std::uint64_t first = piece.pick_offset * 8 / dtype_bits(from);
        converts.push_back(kernels::ConvertTask{raw, slot + first * dtype_bits(to) / 8,
                                                piece.length * 8 / dtype_bits(from),
                                                static_cast<std::uint32_t>(from), static_cast<std::uint32_t>(to)});
      }
      src += piece.length;
    }
    if (!moves.empty()) sink_->move_async(lane, moves);
    if (!converts.empty()) sink_->convert_async(lane, converts);
    if (batched) batched_.fetch_add(1, std::memory_order_relaxed);
  } catch (...) {
    release_buffer(lane);
    throw;
  }
  release_buffer(lane);
  done_.fetch_add(req.length, std::memory_order_relaxed);
}

LoadedTensors StagedLoad::wait(const std::function<bool()>& tick, int tick_ms) {
  group_.drive(tick, tick_ms);
  pool_.reset();
  for (unsigned lane = 0; lane < in_flight_.size(); ++lane)
    if (in_flight_[lane]) {
      sink_->wait(lane);
      in_flight_[lane] = false;
    }
  files_.reset();
  sink_.reset();  // its staging memory goes with it unless the sink serves more loads
  if (const std::uint64_t n = batched_.load())
    result_.stats.reason += "; " + std::to_string(n) + " of " + std::to_string(plan_.requests.size()) +
                            " requests copied whole and placed by one batched move";
  result_.stats.seconds = detail::now_seconds() - started_;
  return std::move(result_);
}

// ---------------------------------------------------------------- host sink ------------

namespace {

class HostSink final : public StagingSink {
 public:
  HostSink(std::uint64_t alignment, unsigned copy_delay_us, bool converts, unsigned fail_wait)
      : alignment_(alignment), converts_(converts), delay_us_(copy_delay_us), fail_wait_(fail_wait),
        worker_([this] { run(); }) {}
  ~HostSink() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
    }
    cv_.notify_all();
    worker_.join();
  }

  std::shared_ptr<Buffer> allocate(std::uint64_t bytes) override {
    return std::make_shared<HostArena>(bytes, alignment_);
  }
  void reserve_lanes(unsigned lanes) override { lane_of(lanes - 1); }
  std::byte* staging_buffer(unsigned lane, std::size_t bytes) override {
    std::unique_ptr<HostArena>& buffer = lane_of(lane).staging;  // only this lane's holder calls
    if (!buffer || buffer->size() < bytes) {
      buffer = std::make_unique<HostArena>(bytes, detail::kDirectAlign);
      ++buffers_allocated_;
    }
    return buffer->data();
  }
  std::uint64_t scratch(unsigned lane, std::size_t bytes) override {
    std::unique_ptr<HostArena>& buffer = lane_of(lane).scratch;
    if (!buffer || buffer->size() < bytes) buffer = std::make_unique<HostArena>(bytes, detail::kDirectAlign);
    return reinterpret_cast<std::uintptr_t>(buffer->data());
  }
  bool converts() const override { return converts_; }
  bool moves() const override { return true; }
  void reserve_tasks(unsigned, std::size_t, std::size_t) override {}

  void copy_async(unsigned lane, std::uint64_t dst, const std::byte* src, std::uint64_t bytes) override {
    enqueue(lane, [dst, src, bytes] { std::memcpy(reinterpret_cast<std::byte*>(dst), src, bytes); });
  }
  void move_async(unsigned lane, const std::vector<kernels::MoveTask>& tasks) override {
    enqueue(lane, [tasks] {
      for (const auto& t : tasks)
        if (t.src != t.dst) std::memcpy(reinterpret_cast<void*>(t.dst), reinterpret_cast<const void*>(t.src), t.bytes);
    });
  }
  void convert_async(unsigned lane, const std::vector<kernels::ConvertTask>& tasks) override {
    enqueue(lane, [tasks] {
      for (const auto& t : tasks)
        convert_host(reinterpret_cast<const void*>(t.src), static_cast<Dtype>(t.src_dtype),
                     reinterpret_cast<void*>(t.dst), static_cast<Dtype>(t.dst_dtype), t.count, 1);
    });
  }
  void wait(unsigned lane) override {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return lanes_[lane].done == lanes_[lane].queued; });
    if (fail_wait_ && ++waits_ >= fail_wait_) throw CudaError("copy on lane " + std::to_string(lane) + " failed (injected)");
  }

 private:
  struct Job {
    unsigned lane;
    std::function<void()> run;
  };
  struct Lane {
    std::unique_ptr<HostArena> staging, scratch;
    std::uint64_t queued = 0, done = 0;
  };
  Lane& lane_of(unsigned lane) {
    std::lock_guard<std::mutex> lock(mu_);
    if (lanes_.size() <= lane) lanes_.resize(lane + 1);
    return lanes_[lane];
  }
  void enqueue(unsigned lane, std::function<void()> job) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      queue_.push_back(Job{lane, std::move(job)});
      ++lanes_[lane].queued;
    }
    cv_.notify_all();
  }
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
      ++lanes_[job.lane].done;
      cv_.notify_all();
    }
  }

  std::uint64_t alignment_;
  bool converts_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Job> queue_;
  std::deque<Lane> lanes_;  // a deque: references to lanes stay valid as it grows
  bool stopping_ = false;
  unsigned delay_us_;
  unsigned fail_wait_;
  unsigned waits_ = 0;
  std::thread worker_;
};

}  // namespace

std::shared_ptr<StagingSink> make_host_sink(std::uint64_t alignment, unsigned copy_delay_us, bool converts,
                                            unsigned fail_wait) {
  return std::make_shared<HostSink>(alignment, copy_delay_us, converts, fail_wait);
}

}  // namespace fst
