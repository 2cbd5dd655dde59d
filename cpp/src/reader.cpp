#include "fst/reader.hpp"

#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstring>
#include <stdexcept>

#include "detail/clock.hpp"
#include "detail/posix_file.hpp"
#include "fst/errors.hpp"
#include "fst/fixup.hpp"

namespace fst {

namespace {

// preadv of one request straight into its arena pieces, resuming after partial reads.
void read_scattered(int fd, const std::string& path, const ReadRequest& req, const Piece* pieces,
                    std::byte* arena) {
  iovec iov[IOV_MAX];
  std::uint32_t next = 0;          // first piece not fully read
  std::uint64_t piece_done = 0;    // bytes of pieces[next] already read
  std::uint64_t offset = req.offset;
  while (next < req.piece_count) {
    int n = 0;
    for (std::uint32_t k = next; k < req.piece_count && n < IOV_MAX; ++k, ++n) {
      std::uint64_t skip = k == next ? piece_done : 0;
      iov[n].iov_base = arena + pieces[k].arena_offset + skip;
      iov[n].iov_len = pieces[k].length - skip;
    }
    ssize_t got = ::preadv(fd, iov, n, static_cast<off_t>(offset));
    if (got < 0) {
      if (errno == EINTR) continue;
      throw IoError(errno, "read", path);
    }
    if (got == 0) detail::throw_shrank(path);
    offset += static_cast<std::uint64_t>(got);
    std::uint64_t left = static_cast<std::uint64_t>(got) + piece_done;
    while (next < req.piece_count && left >= pieces[next].length) {
      left -= pieces[next].length;
      ++next;
    }
    piece_done = left;
  }
}

}  // namespace

namespace {

// cachestat(2) (Linux 6.5): counts cached pages of a file range from the page cache itself,
// without mapping the file; large folios make it far cheaper than mincore on big files.
constexpr long kSysCachestat = 451;
struct CachestatRange {
  std::uint64_t off, len;
};
struct Cachestat {
  std::uint64_t nr_cache, nr_dirty, nr_writeback, nr_evicted, nr_recently_evicted;
};

double residency_by_mincore(int fd, std::uint64_t file_size, std::uint64_t offset, std::uint64_t length) {
  const std::uint64_t page = static_cast<std::uint64_t>(::sysconf(_SC_PAGESIZE));
  std::uint64_t first = offset / page * page;
  std::uint64_t span = std::min(file_size, offset + length) - first;
  void* map = ::mmap(nullptr, span, PROT_READ, MAP_SHARED, fd, static_cast<off_t>(first));
  if (map == MAP_FAILED) return -1;
  std::vector<unsigned char> vec((span + page - 1) / page);
  double share = -1;
  if (::mincore(map, span, vec.data()) == 0) {
    std::uint64_t resident = 0;
    for (unsigned char v : vec) resident += v & 1;
    share = static_cast<double>(resident) / static_cast<double>(vec.size());
  }
  ::munmap(map, span);
  return share;
}

}  // namespace

double page_cache_residency(int fd, std::uint64_t file_size, std::uint64_t offset, std::uint64_t length) {
  if (length == 0) return 1.0;
  const std::uint64_t page = static_cast<std::uint64_t>(::sysconf(_SC_PAGESIZE));
  const std::uint64_t first = offset / page * page, last = std::min(file_size, offset + length);
  CachestatRange range{first, last - first};
  Cachestat stat{};
  if (::syscall(kSysCachestat, fd, &range, &stat, 0) == 0) {
    const double pages = static_cast<double>((range.len + page - 1) / page);
    return std::min(1.0, static_cast<double>(stat.nr_cache) / pages);
  }
  return residency_by_mincore(fd, file_size, offset, length);  // older kernels
}

double data_residency(const Checkpoint& ckpt, const std::vector<int>& fds) {
  double resident = 0, total = 0;
  const auto& headers = ckpt.files();
  for (std::size_t f = 0; f < headers.size(); ++f) {
    if (fds[f] < 0 || headers[f].data_size() == 0) continue;
    double share = page_cache_residency(fds[f], headers[f].file_size, headers[f].data_start(), headers[f].data_size());
    resident += (share < 0 ? 0 : share) * static_cast<double>(headers[f].data_size());
    total += static_cast<double>(headers[f].data_size());
  }
  return total > 0 ? resident / total : 1.0;
}

std::string percent(double share) {
  char text[32];
  std::snprintf(text, sizeof text, "%.0f%%", share * 100);
  return text;
}

HostBackendChoice choose_host_backend(const Checkpoint& ckpt, const std::vector<bool>& used, const ReadOptions& opt) {
  if (opt.backend == Backend::Gds) throw UnsupportedError(kGdsNeedsGpu);
  if (opt.backend == Backend::Mmap && !opt.allow_views)
    throw UnsupportedError("backend 'mmap' gives zero-copy views and only serves CPU targets");
  if (opt.backend != Backend::Auto) return {opt.backend, "requested"};
  if (!opt.allow_views) return {Backend::Pread, "target is not host memory: parallel pread"};
  // Host targets are served as views of the page cache, as the reference does: no copy at
  // all. Data not cached yet is requested from the disk at once, in parallel (the kernel then
  // reads with a deep queue) rather than page by page as the tensors are first touched.
  const auto& headers = ckpt.files();
  std::vector<int> fds(headers.size(), -1);
  for (std::size_t f = 0; f < headers.size(); ++f)
    if (used[f]) fds[f] = headers[f].file->fd();
  HostBackendChoice choice{Backend::Mmap, ""};
  choice.resident = data_residency(ckpt, fds);
  choice.read_ahead = choice.resident < opt.resident_for_mmap;
  choice.reason = percent(choice.resident) + " of the data is in the page cache: zero-copy mmap";
  return choice;
}

bool direct_io_supported(const std::string& path, int& err) {
  // A probe of where a path's file lives (its file system), not a read of its data.
  auto f = detail::PosixFile::try_open(path, O_RDONLY | O_DIRECT, err);
  return f.valid();
}

struct HostLoad::Files {
  std::vector<detail::PosixFile> direct;                // O_DIRECT descriptors, direct backend only
  std::vector<std::unique_ptr<HostArena>> bounce;       // per worker, direct backend only
};

HostLoad::HostLoad(std::shared_ptr<const Checkpoint> ckpt, std::vector<Pick> selection,
                         const ReadOptions& options, std::vector<Dtype> targets)
    : ckpt_(std::move(ckpt)), opt_(options), targets_(std::move(targets)), files_(std::make_unique<Files>()) {
  started_ = detail::now_seconds();
  const std::vector<bool> used = begin_load(*ckpt_, std::move(selection), result_);
  LoadStats& st = result_.stats;
  result_.data.assign(result_.selection.size(), nullptr);
  result_.owner_of.assign(result_.selection.size(), 0);

  const HostBackendChoice choice = choose_host_backend(*ckpt_, used, opt_);
  st.backend = choice.backend;
  st.resident = choice.resident;
  st.reason = choice.reason + (choice.read_ahead ? ", the rest read ahead in parallel" : "");

  try {
    if (choice.backend == Backend::Mmap) start_views(choice.read_ahead);
    else start_reads(choice.backend == Backend::Direct);
  } catch (...) {
    // No destructor runs for a half-built load: stop the tasks already queued here, before
    // the members they use go away.
    group_.stop();
    throw;
  }
}

HostLoad::~HostLoad() {
  // Tasks still queued or running use this object: stop them first (a no-op once finished).
  group_.stop();
}

void HostLoad::start_views(bool read_ahead) {
  const auto& headers = ckpt_->files();
  const auto& sel = result_.selection;
  if (read_ahead) {
    // POSIX_FADV_WILLNEED queues the reads and returns; chunks spread the queuing over the
    // workers. Spans of selected tensors closer than 1 MiB are merged.
    constexpr std::uint64_t kChunk = 64u << 20, kGap = 1u << 20;
    std::vector<std::pair<std::uint32_t, Extent>> spans;
    for (const Pick& p : sel) {
      Extent e = ckpt_->extent(p);
      if (!spans.empty() && spans.back().first == p.ref.file &&
          e.offset <= spans.back().second.offset + spans.back().second.nbytes + kGap &&
          e.offset >= spans.back().second.offset)
        spans.back().second.nbytes = std::max(spans.back().second.nbytes, e.offset + e.nbytes - spans.back().second.offset);
      else
        spans.push_back({p.ref.file, e});
    }
    for (const auto& [file, span] : spans) {
      for (std::uint64_t off = 0; off < span.nbytes; off += kChunk) {
        const int fd = headers[file].file->fd();
        const std::uint64_t at = span.offset + off, len = std::min(kChunk, span.nbytes - off);
        pool().submit(group_, [fd, at, len](unsigned) {
          ::posix_fadvise(fd, static_cast<off_t>(at), static_cast<off_t>(len), POSIX_FADV_WILLNEED);
        });
      }
    }
  }
  // One mapping per file, of the range its selected tensors span: memory is reserved for what
  // the load selects, not for the file (which may be larger than memory).
  std::vector<std::uint64_t> lo(headers.size(), UINT64_MAX), hi(headers.size(), 0);
  for (const Pick& p : sel) {
    const Extent e = ckpt_->extent(p);
    lo[p.ref.file] = std::min(lo[p.ref.file], e.offset);
    hi[p.ref.file] = std::max(hi[p.ref.file], e.offset + e.nbytes);
  }
  std::vector<std::shared_ptr<FileMapping>> maps(headers.size());
  std::vector<std::uint32_t> owner_index(headers.size(), UINT32_MAX);
  for (std::size_t f = 0; f < headers.size(); ++f) {
    if (lo[f] == UINT64_MAX) continue;
    // Null when the kernel refuses the mapping (strict overcommit): those tensors are read.
    maps[f] = FileMapping::try_map(headers[f].file->fd(), lo[f], hi[f] - lo[f]);
    if (!maps[f]) continue;
    owner_index[f] = static_cast<std::uint32_t>(result_.owners.size());
    result_.owners.push_back(maps[f]);
  }
  std::vector<Pick> copies;                // tensors whose file address is not aligned enough
  std::vector<std::size_t> copy_slots;
  for (std::size_t i = 0; i < sel.size(); ++i) {
    const TensorRef r = sel[i].ref;
    std::byte* p = maps[r.file] ? maps[r.file]->at(ckpt_->extent(sel[i]).offset) : nullptr;
    std::uint64_t need = opt_.view_alignment ? opt_.view_alignment : dtype_align(ckpt_->entry(r).dtype);
    if (p && reinterpret_cast<std::uintptr_t>(p) % need == 0) {
      result_.data[i] = p;
      result_.owner_of[i] = owner_index[r.file];
    } else {
      copies.push_back(sel[i]);
      copy_slots.push_back(i);
    }
  }
  done_.fetch_add(result_.stats.bytes, std::memory_order_relaxed);
  if (copies.empty()) return;
  // Misaligned tensors are read into an aligned arena like any other read.
  Placement placement = place(*ckpt_, copies, opt_.alignment);
  auto arena = std::make_shared<HostArena>(placement.size, opt_.alignment);
  arena_ = arena.get();
  std::uint32_t owner = static_cast<std::uint32_t>(result_.owners.size());
  result_.owners.push_back(arena);
  for (std::size_t k = 0; k < copies.size(); ++k) {
    result_.data[copy_slots[k]] = arena->data() + placement.offsets[k];
    result_.owner_of[copy_slots[k]] = owner;
  }
  plan_ = plan_reads(*ckpt_, copies, placement, opt_.max_request, IOV_MAX);
  std::uint64_t copied = plan_.bytes;
  done_.fetch_sub(copied, std::memory_order_relaxed);
  result_.stats.bytes_read = copied;
  result_.stats.requests = plan_.requests.size();
  std::byte* base = arena->data();
  for (const ReadRequest& req : plan_.requests) {
    pool().submit(group_, [this, &req, base](unsigned) {
      const FileHandle& file = *ckpt_->files()[req.file].file;
      populate_for(req);
      read_scattered(file.fd(), file.path(), req, plan_.pieces.data() + req.first_piece, base);
      done_.fetch_add(req.length, std::memory_order_relaxed);
    });
  }
}

void HostLoad::start_reads(bool direct) {
  const auto& headers = ckpt_->files();
  const auto& sel = result_.selection;
  Placement placement = place(*ckpt_, sel, opt_.alignment);
  auto arena = std::make_shared<HostArena>(placement.size, opt_.alignment);
  arena_ = arena.get();
  result_.owners.push_back(arena);
  for (std::size_t i = 0; i < sel.size(); ++i) result_.data[i] = arena->data() + placement.offsets[i];
  plan_ = plan_reads(*ckpt_, sel, placement, opt_.max_request, IOV_MAX);
  result_.stats.bytes_read = plan_.bytes;
  result_.stats.requests = plan_.requests.size();
  std::byte* base = arena->data();

  if (!direct) {
    // Each worker streams one contiguous stripe of the requests through descriptors of its
    // own: the kernel then sees sequential readers and reads ahead for each, where one shared
    // descriptor read at interleaved offsets defeats its readahead when the data is cold.
    const std::size_t n = plan_.requests.size();
    const std::size_t stripes = std::min<std::size_t>(pool().size(), n);
    for (std::size_t s = 0; s < stripes; ++s) {
      pool().submit(group_, [this, base, first = n * s / stripes, last = n * (s + 1) / stripes](unsigned) {
        std::vector<detail::PosixFile> own(ckpt_->files().size());
        for (std::size_t i = first; i < last && !group_.cancelled(); ++i) {
          const ReadRequest& req = plan_.requests[i];
          auto& file = own[req.file];
          if (!file.valid()) {
            file = detail::PosixFile::reopen(*ckpt_->files()[req.file].file, O_RDONLY);
            ::posix_fadvise(file.fd(), 0, 0, POSIX_FADV_SEQUENTIAL);
          }
          populate_for(req);
          read_scattered(file.fd(), file.path(), req, plan_.pieces.data() + req.first_piece, base);
          done_.fetch_add(req.length, std::memory_order_relaxed);
        }
      });
    }
    return;
  }

  // O_DIRECT: aligned reads into a per-worker bounce buffer, then scattered into the slots.
  auto& direct_files = files_->direct;
  direct_files.resize(headers.size());
  for (const Pick& p : sel) {
    const std::uint32_t f = p.ref.file;
    if (direct_files[f].valid()) continue;
    int err = 0;
    direct_files[f] = detail::PosixFile::try_reopen(*headers[f].file, O_RDONLY | O_DIRECT, err);
    if (!direct_files[f].valid())
      throw UnsupportedError("backend 'direct': O_DIRECT open of '" + headers[f].path +
                             "' failed: " + std::strerror(err));
  }
  files_->bounce.resize(pool().size());
  const std::uint64_t bounce_size = opt_.max_request + 2 * detail::kDirectAlign;
  for (const ReadRequest& req : plan_.requests) {
    pool().submit(group_, [this, &req, base, bounce_size](unsigned worker) {
      auto& bounce = files_->bounce[worker];
      if (!bounce) bounce = std::make_unique<HostArena>(bounce_size, detail::kDirectAlign);
      const auto& file = files_->direct[req.file];
      const std::byte* src = file.read_direct(bounce->data(), req.length, req.offset);
      populate_for(req);
      const Piece* pieces = plan_.pieces.data() + req.first_piece;
      for (std::uint32_t k = 0; k < req.piece_count; ++k) {
        std::memcpy(base + pieces[k].arena_offset, src, pieces[k].length);
        src += pieces[k].length;
      }
      done_.fetch_add(req.length, std::memory_order_relaxed);
    });
  }
}

ThreadPool& HostLoad::pool() {
  if (!pool_) {
    pool_ = std::make_unique<ThreadPool>(opt_.threads);
    result_.stats.threads = pool_->size();
  }
  return *pool_;
}

void HostLoad::populate_for(const ReadRequest& req) const {
  if (req.piece_count == 0) return;
  const Piece& first = plan_.pieces[req.first_piece];
  const Piece& last = plan_.pieces[req.first_piece + req.piece_count - 1];
  arena_->populate(first.arena_offset, last.arena_offset + last.length - first.arena_offset);
}

LoadedTensors HostLoad::wait(const std::function<bool()>& tick, int tick_ms) {
  group_.drive(tick, tick_ms);
  if (!targets_.empty()) convert_loaded(result_, *ckpt_, targets_, pool(), opt_.alignment, opt_.convert_mode);
  pool_.reset();
  files_.reset();  // close descriptors now; mappings stay alive through the owners
  result_.stats.seconds = detail::now_seconds() - started_;
  return std::move(result_);
}

}  // namespace fst
