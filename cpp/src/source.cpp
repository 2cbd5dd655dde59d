#include "fst/source.hpp"

#include <cstdio>
#include <mutex>
#include <unordered_set>

#include "detail/posix_file.hpp"
#include "fst/errors.hpp"

namespace fst {

struct TensorSource::State {
  std::vector<detail::PosixFile> files;
  std::vector<std::shared_ptr<FileMapping>> maps;
  // Tensors already handed out as views: a second request gets a copy, so two tensors from
  // one source never alias (a write into one must not show in the other).
  std::mutex mu;
  std::unordered_set<std::uint64_t> viewed;
};

TensorSource::TensorSource(std::shared_ptr<const Checkpoint> ckpt, const ReadOptions& options)
    : ckpt_(std::move(ckpt)), opt_(options), state_(std::make_unique<State>()) {
  const auto& headers = ckpt_->files();
  for (const auto& h : headers) state_->files.emplace_back(h.path, O_RDONLY);
  state_->maps.resize(headers.size());
  backend_ = opt_.backend;
  if (backend_ == Backend::Gds) throw UnsupportedError(kGdsNeedsGpu);
  if (backend_ == Backend::Mmap && !opt_.allow_views)
    throw UnsupportedError("backend 'mmap' gives zero-copy views and only serves CPU targets");
  if (backend_ == Backend::Auto) {
    if (opt_.allow_views) {
      // As the reference does: views of a private mapping, paged in when first touched.
      std::vector<int> fds;
      for (const auto& f : state_->files) fds.push_back(f.fd());
      backend_ = Backend::Mmap;
      reason_ = percent(data_residency(*ckpt_, fds)) + " of the data is in the page cache: zero-copy mmap";
    } else {
      backend_ = Backend::Pread;
      reason_ = "target is not host memory: pread";
    }
  } else {
    reason_ = "requested";
  }
  if (backend_ == Backend::Mmap)
    for (std::size_t f = 0; f < headers.size(); ++f)
      state_->maps[f] = std::make_shared<FileMapping>(state_->files[f].fd(), headers[f].file_size, headers[f].path);
}

TensorSource::~TensorSource() = default;

TensorSource::Rows TensorSource::get(const Pick& pick) const {
  const TensorRef ref = pick.ref;
  const TensorEntry& e = ckpt_->entry(ref);
  const Extent ext = ckpt_->extent(pick);
  const std::uint64_t offset = ext.offset, len = ext.nbytes;
  if (backend_ == Backend::Mmap) {
    const auto& map = state_->maps[ref.file];
    std::byte* p = map->data() + offset;
    std::uint64_t need = opt_.view_alignment ? opt_.view_alignment : dtype_align(e.dtype);
    if (reinterpret_cast<std::uintptr_t>(p) % need == 0) {
      std::lock_guard<std::mutex> lock(state_->mu);
      if (state_->viewed.insert((std::uint64_t{ref.file} << 32) | ref.index).second) return Rows{map, p};
    }
  }
  auto arena = std::make_shared<HostArena>(len, opt_.alignment);
  if (len) state_->files[ref.file].read_exact(arena->data(), len, offset);
  return Rows{arena, arena->data()};
}

}  // namespace fst
