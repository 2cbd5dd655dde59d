#include "fst/source.hpp"

#include <cstdio>
#include <mutex>
#include <unordered_set>

#include "detail/posix_file.hpp"
#include "fst/convert.hpp"
#include "fst/errors.hpp"
#include "fst/thread_pool.hpp"

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
  // Single tensors are read on the calling thread when asked for: nothing to read ahead.
  HostBackendChoice choice = choose_host_backend(*ckpt_, std::vector<bool>(headers.size(), true), opt_);
  backend_ = choice.backend;
  reason_ = std::move(choice.reason);
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

TensorSource::Rows TensorSource::get_as(const Pick& pick, Dtype target) const {
  Rows rows = get(pick);
  const Dtype from = ckpt_->entry(pick.ref).dtype;
  if (target == from) return rows;
  const std::uint64_t count = ckpt_->extent(pick).nbytes * 8 / dtype_bits(from);
  auto arena = std::make_shared<HostArena>(count * dtype_bits(target) / 8, opt_.alignment);
  convert_host(rows.data, from, arena->data(), target, count, ThreadPool::default_threads(), opt_.convert_mode);
  return Rows{arena, arena->data()};
}

}  // namespace fst
