#include "fst/source.hpp"

#include <cstdio>
#include <mutex>
#include <unordered_set>

#include "detail/posix_file.hpp"
#include "fst/errors.hpp"

namespace fst {

struct TensorSource::State {
  // One mapping per file, made on the first view of it; null once the kernel refused it
  // (strict overcommit and a file larger than the commit limit): tensors are read then.
  std::vector<std::shared_ptr<FileMapping>> maps;
  std::vector<bool> map_tried;
  // Tensors already handed out as views: a second request gets a copy, so two tensors from
  // one source never alias (a write into one must not show in the other).
  std::mutex mu;
  std::unordered_set<std::uint64_t> viewed;
};

TensorSource::TensorSource(std::shared_ptr<const Checkpoint> ckpt, const ReadOptions& options)
    : ckpt_(std::move(ckpt)), opt_(options), state_(std::make_unique<State>()) {
  const auto& headers = ckpt_->files();
  state_->maps.resize(headers.size());
  state_->map_tried.assign(headers.size(), false);
  backend_ = opt_.backend;
  if (backend_ == Backend::Gds) throw UnsupportedError(kGdsNeedsGpu);
  if (backend_ == Backend::Mmap && !opt_.allow_views)
    throw UnsupportedError("backend 'mmap' gives zero-copy views and only serves CPU targets");
  if (backend_ == Backend::Auto) {
    if (opt_.allow_views) {
      // As the reference does: views of a private mapping, paged in when first touched.
      std::vector<int> fds;
      for (const auto& h : headers) fds.push_back(h.file->fd());
      backend_ = Backend::Mmap;
      reason_ = percent(data_residency(*ckpt_, fds)) + " of the data is in the page cache: zero-copy mmap";
    } else {
      backend_ = Backend::Pread;
      reason_ = "target is not host memory: pread";
    }
  } else {
    reason_ = "requested";
  }
}

TensorSource::~TensorSource() = default;

TensorSource::Rows TensorSource::get(const Pick& pick) const {
  const TensorRef ref = pick.ref;
  const TensorEntry& e = ckpt_->entry(ref);
  const Extent ext = ckpt_->extent(pick);
  const std::uint64_t offset = ext.offset, len = ext.nbytes;
  const FileHeader& header = ckpt_->files()[ref.file];
  // Each read reaches the version of the file whose header was parsed; one rewritten or
  // truncated in place since then is refused (a mapping of it would die of SIGBUS).
  header.file->check_unchanged();
  if (backend_ == Backend::Mmap) {
    std::lock_guard<std::mutex> lock(state_->mu);
    auto& map = state_->maps[ref.file];
    if (!state_->map_tried[ref.file]) {
      state_->map_tried[ref.file] = true;
      map = FileMapping::try_map(header.file->fd(), header.data_start(), header.data_size());
    }
    std::uint64_t need = opt_.view_alignment ? opt_.view_alignment : dtype_align(e.dtype);
    if (map) {
      std::byte* p = map->at(offset);
      if (reinterpret_cast<std::uintptr_t>(p) % need == 0 &&
          state_->viewed.insert((std::uint64_t{ref.file} << 32) | ref.index).second)
        return Rows{map, p};
    }
  }
  auto arena = std::make_shared<HostArena>(len, opt_.alignment);
  if (len) detail::read_exact(header.file->fd(), header.path, arena->data(), len, offset);
  return Rows{arena, arena->data()};
}

}  // namespace fst
