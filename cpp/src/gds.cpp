// GPU Direct Storage loads: the pure plan, the load that runs it, and the host device that
// runs it on the CPU for tests. The cuFile device is in device/cufile_device.cpp.
#include "fst/gds.hpp"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <mutex>
#include <optional>
#include <stdexcept>

#include "detail/clock.hpp"
#include "detail/kernel_abi.hpp"
#include "detail/posix_file.hpp"
#include "fst/convert.hpp"
#include "fst/errors.hpp"

namespace fst {

namespace {

constexpr std::uint64_t kPage = detail::kDirectAlign;
constexpr std::uint64_t kBulkGranule = 8u << 20;  // bulk buffers are asked for in steps of this

std::uint64_t align_down(std::uint64_t v, std::uint64_t a) noexcept { return v / a * a; }

}  // namespace

GdsPlan plan_gds(const Checkpoint& ckpt, const std::vector<Pick>& sel, const std::vector<Dtype>& targets,
                 const GdsOptions& opt) {
  if (opt.request_bytes == 0 || opt.request_bytes % kPage)
    throw std::invalid_argument("GDS read requests must be a positive multiple of 4096 bytes");
  if (opt.bulk_bytes < 2 * kPage || opt.bulk_bytes % kPage)
    throw std::invalid_argument("the GDS bulk buffer must be a multiple of 4096 bytes, at least 8192");
  GdsPlan plan;
  plan.placement = place(ckpt, sel, opt.alignment, targets);

  // A run: one stretch of one file whose pages land contiguously in the bulk buffer.
  struct Run {
    std::uint32_t file;
    std::uint64_t start;  // page-aligned file offset of its first page
    std::uint64_t end;    // file offset just past its last needed byte
    std::uint64_t bulk;   // where its first page lands
  };
  std::optional<Run> run;
  GdsWindow window;

  auto close_run = [&] {
    if (!run) return;
    const std::uint64_t stop = align_up(run->end, kPage);
    for (std::uint64_t at = run->start; at < stop; at += opt.request_bytes) {
      const std::uint64_t length = std::min(opt.request_bytes, stop - at);
      window.reads.push_back(
          BulkRead{run->file, at, length, std::min(length, run->end - at), run->bulk + (at - run->start)});
      plan.bytes_read += length;
    }
    window.bulk_used = run->bulk + (stop - run->start);
    run.reset();
  };
  auto close_window = [&] {
    close_run();
    if (window.reads.empty()) return;
    plan.bulk_bytes = std::max(plan.bulk_bytes, window.bulk_used);
    plan.most_moves = std::max(plan.most_moves, window.moves.size());
    plan.most_converts = std::max(plan.most_converts, window.converts.size());
    plan.windows.push_back(std::move(window));
    window = GdsWindow{};
  };

  for (std::size_t i = 0; i < sel.size(); ++i) {
    const Extent ext = ckpt.extent(sel[i]);
    const std::uint32_t file = sel[i].ref.file;
    const Dtype from = ckpt.entry(sel[i].ref).dtype, to = targets.empty() ? from : targets[i];
    const bool convert = to != from;
    // A converted piece must hold whole elements; a moved one may end anywhere.
    const std::uint64_t unit = convert ? dtype_bits(from) / 8 : 1;
    std::uint64_t off = ext.offset, left = ext.nbytes, within = 0;
    while (left > 0) {
      // Selected bytes that follow the run closely join it (the hole between is read too).
      const bool extends = run && run->file == file && off >= run->end && off - run->end <= opt.merge_gap;
      if (!extends) close_run();
      const std::uint64_t start = extends ? run->start : align_down(off, kPage);
      const std::uint64_t bulk = extends ? run->bulk : window.bulk_used;
      // The run may grow until its pages reach the end of the bulk buffer.
      const std::uint64_t limit = start + (opt.bulk_bytes - bulk);
      std::uint64_t take = std::min(left, limit > off ? limit - off : 0);
      if (take < left) take -= take % unit;
      if (take == 0) {
        // The window is full: the rest goes to a fresh one, where at least 4097 bytes fit.
        close_window();
        continue;
      }
      if (!extends) run = Run{file, start, off, bulk};
      const std::uint64_t src = run->bulk + (off - run->start);
      if (convert) {
        const std::uint64_t first = within / unit;  // elements of the tensor before this piece
        window.converts.push_back(BulkConvert{src, plan.placement.offsets[i] + first * dtype_bits(to) / 8,
                                              take / unit, from, to, static_cast<std::uint32_t>(i)});
      } else {
        window.moves.push_back(BulkMove{src, plan.placement.offsets[i] + within, take, static_cast<std::uint32_t>(i)});
      }
      run->end = off + take;
      off += take;
      within += take;
      left -= take;
    }
  }
  close_window();
  return plan;
}

// ---------------------------------------------------------------- the load -------------

GdsLoad::GdsLoad(std::shared_ptr<const Checkpoint> ckpt, std::vector<Pick> selection, const GdsOptions& options,
                 std::shared_ptr<GdsDevice> device, const std::vector<Dtype>& targets)
    : ckpt_(std::move(ckpt)), opt_(options), device_(std::move(device)) {
  started_ = detail::now_seconds();
  const auto& headers = ckpt_->files();
  const std::vector<bool> used = begin_load(*ckpt_, std::move(selection), result_);
  const auto& sel = result_.selection;
  LoadStats& st = result_.stats;
  st.backend = Backend::Gds;

  // Every file is opened and registered before any memory is allocated: a file GDS cannot
  // read ends the load here, cheaply (the automatic choice then falls back to staging).
  for (std::size_t f = 0; f < headers.size(); ++f)
    if (used[f]) device_->open_file(static_cast<std::uint32_t>(f), headers[f].file);

  plan_ = plan_gds(*ckpt_, sel, targets, opt_);
  result_.device = device_->device();
  auto dest = device_->allocate(plan_.placement.size);
  result_.owners.push_back(dest);
  result_.owner_of.assign(sel.size(), 0);
  for (std::size_t i = 0; i < sel.size(); ++i) result_.data.push_back(dest->data() + plan_.placement.offsets[i]);
  dest_ = reinterpret_cast<std::uintptr_t>(dest->data());
  if (!targets.empty()) result_.dtypes = targets;

  std::size_t most_reads = 0;
  for (const GdsWindow& w : plan_.windows) {
    most_reads = std::max(most_reads, w.reads.size());
    st.requests += w.reads.size();
  }
  st.bytes_read = plan_.bytes_read;
  if (!plan_.windows.empty()) {
    // Rounded up (within the configured size), so that the next loads of a stream, whose
    // windows differ a little, find the buffer large enough and keep its registration.
    bulk_ = device_->bulk_buffer(std::min(opt_.bulk_bytes, align_up(plan_.bulk_bytes, kBulkGranule)));
    device_->reserve_tasks(plan_.most_moves, plan_.most_converts);
  }
  st.reason = "GPU Direct Storage (" + device_->describe() + "): " + std::to_string(st.requests) +
              " reads of up to " + std::to_string(opt_.request_bytes >> 10) + " KiB into a " +
              std::to_string(plan_.bulk_bytes >> 10) + " KiB device buffer in " +
              std::to_string(plan_.windows.size()) + " window(s), each placed by one fst_move_batch launch" +
              (plan_.most_converts ? " and converted by one fst_convert_batch launch" : "");

  // More threads than reads in a window would have nothing to do.
  const unsigned threads = opt_.threads ? opt_.threads : ThreadPool::default_threads();
  pool_ = std::make_unique<ThreadPool>(
      static_cast<unsigned>(std::clamp<std::size_t>(most_reads, 1, std::max(threads, 1u))));
  st.threads = pool_->size();
  if (plan_.windows.empty()) return;
  try {
    start_window(0);
  } catch (...) {
    // No destructor runs for a half-built load: stop what was queued before members go.
    group_.stop();
    throw;
  }
}

GdsLoad::~GdsLoad() {
  // Tasks still queued or running use this object: stop them first (a no-op once finished).
  group_.stop();
  pool_.reset();
}

void GdsLoad::start_window(std::size_t window) {
  const GdsWindow& w = plan_.windows[window];
  reads_left_.store(w.reads.size());
  for (const BulkRead& r : w.reads) pool_->submit(group_, [this, window, &r](unsigned) { read(window, r); });
}

void GdsLoad::read(std::size_t window, const BulkRead& r) {
  device_->bind_thread();
  std::uint64_t got = 0;
  while (got < r.needed) {
    const std::uint64_t n = device_->read(r.file, r.file_offset + got, r.length - got, r.bulk_offset + got);
    if (n == 0) detail::throw_shrank(ckpt_->files()[r.file].path);
    got += n;
  }
  done_.fetch_add(r.needed, std::memory_order_relaxed);
  // The last read of the window places it (and starts the next window's reads).
  if (reads_left_.fetch_sub(1) == 1 && !group_.cancelled()) place_window(window);
}

void GdsLoad::place_window(std::size_t window) {
  const GdsWindow& w = plan_.windows[window];
  std::vector<kernels::MoveTask> moves;
  moves.reserve(w.moves.size());
  for (const BulkMove& m : w.moves) moves.push_back(kernels::MoveTask{bulk_ + m.bulk_offset, dest_ + m.slot_offset, m.bytes});
  std::vector<kernels::ConvertTask> converts;
  converts.reserve(w.converts.size());
  for (const BulkConvert& c : w.converts)
    converts.push_back(kernels::ConvertTask{bulk_ + c.bulk_offset, dest_ + c.slot_offset, c.count,
                                            static_cast<std::uint32_t>(c.from), static_cast<std::uint32_t>(c.to),
                                            static_cast<std::uint32_t>(opt_.convert_mode)});
  if (!moves.empty()) device_->move_async(moves);
  if (!converts.empty()) device_->convert_async(converts);
  // The next window reads into the same bulk buffer: this one's bytes must be placed first.
  device_->synchronize();
  if (window + 1 < plan_.windows.size()) start_window(window + 1);
}

LoadedTensors GdsLoad::wait(const std::function<bool()>& tick, int tick_ms) {
  group_.drive(tick, tick_ms);
  pool_.reset();
  device_.reset();  // files, registrations, bulk buffer, unless the device serves more loads
  result_.stats.seconds = detail::now_seconds() - started_;
  return std::move(result_);
}

// ---------------------------------------------------------------- host device ----------

namespace {

// The byte range a task reads or writes, for the overlap check.
struct Span {
  std::uint64_t begin, end;
  bool written;
};

// The kernels' contract (kernel_abi.hpp): no destination overlaps any other range of the launch.
void check_no_overlap(std::vector<Span> spans, const char* kernel) {
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) { return a.begin < b.begin; });
  std::uint64_t end = 0, written_end = 0;  // furthest end so far of any range / of a destination
  for (const Span& s : spans) {
    if (s.begin == s.end) continue;
    if (s.begin < written_end || (s.written && s.begin < end))
      throw std::logic_error(std::string(kernel) + ": a destination overlaps another range of the same launch");
    end = std::max(end, s.end);
    if (s.written) written_end = std::max(written_end, s.end);
  }
}

class HostGdsDevice final : public GdsDevice {
 public:
  void open_file(std::uint32_t file, std::shared_ptr<const FileHandle> source) override {
    if (files_.size() <= file) {
      files_.resize(file + 1);
      sources_.resize(file + 1);
    }
    if (files_[file].valid() && sources_[file] == source) return;
    int err = 0;
    files_[file] = detail::PosixFile::try_reopen(*source, O_RDONLY | O_DIRECT, err);
    if (!files_[file].valid()) {
      if (err == EINVAL)
        throw UnsupportedError("'" + source->path() + "': the file system does not support O_DIRECT");
      throw IoError(err, "open (O_DIRECT)", source->path());
    }
    sources_[file] = std::move(source);
  }
  std::shared_ptr<Buffer> allocate(std::uint64_t bytes) override {
    return std::make_shared<HostArena>(bytes, kPage);
  }
  std::uint64_t bulk_buffer(std::uint64_t bytes) override {
    if (!bulk_ || bulk_->size() < bytes) {
      bulk_.reset();
      bulk_ = std::make_unique<HostArena>(bytes, kPage);
      ++bulk_allocations_;
    }
    return reinterpret_cast<std::uintptr_t>(bulk_->data());
  }
  void reserve_tasks(std::size_t moves, std::size_t converts) override {
    most_moves_ = moves;
    most_converts_ = converts;
  }
  std::uint64_t read(std::uint32_t file, std::uint64_t file_offset, std::uint64_t length,
                     std::uint64_t bulk_offset) override {
    if (bulk_offset + length > bulk_->size()) throw std::logic_error("GDS plan: a read runs past the bulk buffer");
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!queued_.empty())
        throw std::logic_error("GDS load: a read into the bulk buffer before the launches reading it finished");
    }
    const detail::PosixFile& f = files_[file];
    while (true) {
      const ssize_t got = ::pread(f.fd(), bulk_->data() + bulk_offset, length, static_cast<off_t>(file_offset));
      if (got >= 0) return static_cast<std::uint64_t>(got);
      if (errno != EINTR) throw IoError(errno, "read (O_DIRECT)", f.path());
    }
  }
  void move_async(const std::vector<kernels::MoveTask>& tasks) override {
    if (tasks.size() > most_moves_) throw std::logic_error("fst_move_batch: more tasks than reserved");
    std::vector<Span> spans;
    for (const auto& t : tasks) {
      if (t.src == t.dst) continue;  // skipped by the kernel
      spans.push_back(Span{t.src, t.src + t.bytes, false});
      spans.push_back(Span{t.dst, t.dst + t.bytes, true});
    }
    check_no_overlap(std::move(spans), kernels::kMoveKernel);
    std::lock_guard<std::mutex> lock(mu_);
    queued_.emplace_back([tasks] {
      for (const auto& t : tasks)
        if (t.src != t.dst)
          std::memcpy(reinterpret_cast<void*>(t.dst), reinterpret_cast<const void*>(t.src), t.bytes);
    });
  }
  void convert_async(const std::vector<kernels::ConvertTask>& tasks) override {
    if (tasks.size() > most_converts_) throw std::logic_error("fst_convert_batch: more tasks than reserved");
    std::vector<Span> spans;
    for (const auto& t : tasks) {
      const auto from = static_cast<Dtype>(t.src_dtype), to = static_cast<Dtype>(t.dst_dtype);
      spans.push_back(Span{t.src, t.src + (t.count * dtype_bits(from) + 7) / 8, false});
      spans.push_back(Span{t.dst, t.dst + (t.count * dtype_bits(to) + 7) / 8, true});
    }
    check_no_overlap(std::move(spans), kernels::kConvertKernel);
    std::lock_guard<std::mutex> lock(mu_);
    queued_.emplace_back([tasks] {
      for (const auto& t : tasks)
        convert_host(reinterpret_cast<const void*>(t.src), static_cast<Dtype>(t.src_dtype),
                     reinterpret_cast<void*>(t.dst), static_cast<Dtype>(t.dst_dtype), t.count, 1,
                     static_cast<ConvertMode>(t.mode));
    });
  }
  // Queued work runs only now, the latest a stream could run it: a plan that reused the bulk
  // buffer before its launches finished would deliver wrong bytes.
  void synchronize() override {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& job : queued_) job();
    queued_.clear();
  }
  std::string describe() const override { return "host memory, O_DIRECT reads (test device)"; }

 private:
  std::vector<detail::PosixFile> files_;
  std::vector<std::shared_ptr<const FileHandle>> sources_;  // what each of files_ was reopened from
  std::unique_ptr<HostArena> bulk_;
  std::size_t most_moves_ = 0, most_converts_ = 0;
  std::mutex mu_;  // reads on the pool's threads check queued_
  std::vector<std::function<void()>> queued_;
};

}  // namespace

std::shared_ptr<GdsDevice> make_host_gds_device() { return std::make_shared<HostGdsDevice>(); }

}  // namespace fst
