#include "fst/reader.hpp"

#include <sys/mman.h>
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

const char* backend_name(Backend b) noexcept {
  switch (b) {
    case Backend::Auto: return "auto";
    case Backend::Pread: return "pread";
    case Backend::Direct: return "direct";
    case Backend::Mmap: return "mmap";
  }
  return "?";
}

Backend backend_from_name(const std::string& name) {
  for (Backend b : {Backend::Auto, Backend::Pread, Backend::Direct, Backend::Mmap})
    if (name == backend_name(b)) return b;
  throw std::invalid_argument("unknown backend '" + name + "' (expected auto, pread, direct or mmap)");
}

double page_cache_residency(int fd, std::uint64_t file_size, std::uint64_t offset, std::uint64_t length) {
  if (length == 0) return 1.0;
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

bool direct_io_supported(const std::string& path, int& err) {
  auto f = detail::PosixFile::try_open(path, O_RDONLY | O_DIRECT, err);
  return f.valid();
}

struct PendingLoad::Files {
  std::vector<detail::PosixFile> files;                 // opened lazily, one per checkpoint file
  std::vector<std::shared_ptr<FileMapping>> maps;
  std::vector<std::unique_ptr<HostArena>> bounce;       // per worker, direct backend only
};

PendingLoad::PendingLoad(std::shared_ptr<const Checkpoint> ckpt, std::vector<Pick> selection,
                         const ReadOptions& options)
    : ckpt_(std::move(ckpt)), opt_(options), files_(std::make_unique<Files>()) {
  started_ = detail::now_seconds();
  const auto& headers = ckpt_->files();
  LoadStats& st = result_.stats;
  result_.selection = std::move(selection);
  const auto& sel = result_.selection;
  for (const Pick& p : sel) st.bytes += ckpt_->extent(p).nbytes;
  result_.data.assign(sel.size(), nullptr);
  result_.owner_of.assign(sel.size(), 0);
  files_->files.resize(headers.size());
  files_->maps.resize(headers.size());

  std::vector<bool> used(headers.size(), false);
  for (const Pick& p : sel) used[p.ref.file] = true;
  for (std::size_t f = 0; f < headers.size(); ++f)
    if (used[f]) files_->files[f] = detail::PosixFile(headers[f].path, O_RDONLY);

  Backend backend = opt_.backend;
  if (backend == Backend::Mmap && !opt_.allow_views)
    throw UnsupportedError("backend 'mmap' gives zero-copy views and only serves CPU targets");
  if (backend == Backend::Auto) {
    if (!opt_.allow_views) {
      backend = Backend::Pread;
      st.reason = "target is not host memory: parallel pread";
    } else {
      // Weighted page-cache share of the data regions this load touches.
      double resident = 0, total = 0;
      for (std::size_t f = 0; f < headers.size(); ++f) {
        if (!used[f] || headers[f].data_size() == 0) continue;
        double share = page_cache_residency(files_->files[f].fd(), headers[f].file_size,
                                             headers[f].data_start(), headers[f].data_size());
        if (share < 0) share = 0;
        resident += share * static_cast<double>(headers[f].data_size());
        total += static_cast<double>(headers[f].data_size());
      }
      st.resident = total > 0 ? resident / total : 1.0;
      char pct[32];
      std::snprintf(pct, sizeof pct, "%.0f%%", st.resident * 100);
      if (st.resident >= opt_.resident_for_mmap) {
        backend = Backend::Mmap;
        st.reason = std::string(pct) + " of the data is in the page cache: zero-copy mmap";
      } else {
        backend = Backend::Pread;
        st.reason = std::string(pct) + " of the data is in the page cache: parallel pread";
      }
    }
  } else {
    st.reason = "requested";
  }
  st.backend = backend;

  pool_ = std::make_unique<ThreadPool>(opt_.threads);
  st.threads = pool_->size();
  if (backend == Backend::Mmap) start_views();
  else start_reads(backend == Backend::Direct);
}

PendingLoad::~PendingLoad() {
  if (!finished_) {
    group_.cancel();
    group_.wait_for(-1);
  }
}

void PendingLoad::start_views() {
  const auto& headers = ckpt_->files();
  const auto& sel = result_.selection;
  std::vector<std::uint32_t> owner_index(headers.size(), UINT32_MAX);
  std::vector<Pick> copies;                // tensors whose file address is not aligned enough
  std::vector<std::size_t> copy_slots;
  for (std::size_t i = 0; i < sel.size(); ++i) {
    const TensorRef r = sel[i].ref;
    if (owner_index[r.file] == UINT32_MAX) {
      files_->maps[r.file] = std::make_shared<FileMapping>(files_->files[r.file].fd(),
                                                           headers[r.file].file_size, headers[r.file].path);
      owner_index[r.file] = static_cast<std::uint32_t>(result_.owners.size());
      result_.owners.push_back(files_->maps[r.file]);
    }
    std::byte* p = files_->maps[r.file]->data() + ckpt_->extent(sel[i]).offset;
    std::uint64_t need = opt_.view_alignment ? opt_.view_alignment : dtype_align(ckpt_->entry(r).dtype);
    if (reinterpret_cast<std::uintptr_t>(p) % need == 0) {
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
    pool_->submit(group_, [this, &req, base](unsigned) {
      const auto& file = files_->files[req.file];
      read_scattered(file.fd(), file.path(), req, plan_.pieces.data() + req.first_piece, base);
      done_.fetch_add(req.length, std::memory_order_relaxed);
    });
  }
}

void PendingLoad::start_reads(bool direct) {
  const auto& headers = ckpt_->files();
  const auto& sel = result_.selection;
  Placement placement = place(*ckpt_, sel, opt_.alignment);
  auto arena = std::make_shared<HostArena>(placement.size, opt_.alignment);
  result_.owners.push_back(arena);
  for (std::size_t i = 0; i < sel.size(); ++i) result_.data[i] = arena->data() + placement.offsets[i];
  plan_ = plan_reads(*ckpt_, sel, placement, opt_.max_request, IOV_MAX);
  result_.stats.bytes_read = plan_.bytes;
  result_.stats.requests = plan_.requests.size();
  std::byte* base = arena->data();

  if (!direct) {
    for (const ReadRequest& req : plan_.requests) {
      pool_->submit(group_, [this, &req, base](unsigned) {
        const auto& file = files_->files[req.file];
        read_scattered(file.fd(), file.path(), req, plan_.pieces.data() + req.first_piece, base);
        done_.fetch_add(req.length, std::memory_order_relaxed);
      });
    }
    return;
  }

  // O_DIRECT: aligned reads into a per-worker bounce buffer, then scattered into the slots.
  std::vector<detail::PosixFile> direct_files(headers.size());
  for (std::size_t f = 0; f < headers.size(); ++f) {
    if (!files_->files[f].valid()) continue;
    int err = 0;
    direct_files[f] = detail::PosixFile::try_open(headers[f].path, O_RDONLY | O_DIRECT, err);
    if (!direct_files[f].valid())
      throw UnsupportedError("backend 'direct': O_DIRECT open of '" + headers[f].path +
                             "' failed: " + std::strerror(err));
  }
  for (std::size_t f = 0; f < headers.size(); ++f)
    if (direct_files[f].valid()) files_->files[f] = std::move(direct_files[f]);
  files_->bounce.resize(pool_->size());
  const std::uint64_t bounce_size = opt_.max_request + 2 * detail::kDirectAlign;
  for (const ReadRequest& req : plan_.requests) {
    pool_->submit(group_, [this, &req, base, bounce_size](unsigned worker) {
      auto& bounce = files_->bounce[worker];
      if (!bounce) bounce = std::make_unique<HostArena>(bounce_size, detail::kDirectAlign);
      const auto& file = files_->files[req.file];
      const std::byte* src = file.read_direct(bounce->data(), req.length, req.offset);
      const Piece* pieces = plan_.pieces.data() + req.first_piece;
      for (std::uint32_t k = 0; k < req.piece_count; ++k) {
        std::memcpy(base + pieces[k].arena_offset, src, pieces[k].length);
        src += pieces[k].length;
      }
      done_.fetch_add(req.length, std::memory_order_relaxed);
    });
  }
}

LoadedTensors PendingLoad::wait(const std::function<bool()>& tick, int tick_ms) {
  while (!group_.wait_for(tick ? tick_ms : -1)) {
    if (!tick()) {
      group_.cancel();
      group_.wait_for(-1);
      finished_ = true;
      throw Error("load cancelled");
    }
  }
  finished_ = true;
  group_.rethrow();
  pool_.reset();
  files_.reset();  // close descriptors now; mappings stay alive through the owners
  result_.stats.seconds = detail::now_seconds() - started_;
  return std::move(result_);
}

}  // namespace fst
