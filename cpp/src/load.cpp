#include "fst/load.hpp"

#include <stdexcept>

namespace fst {

const char* backend_name(Backend b) noexcept {
  switch (b) {
    case Backend::Auto: return "auto";
    case Backend::Pread: return "pread";
    case Backend::Direct: return "direct";
    case Backend::Mmap: return "mmap";
    case Backend::Gds: return "gds";
  }
  return "?";
}

Backend backend_from_name(const std::string& name) {
  for (Backend b : {Backend::Auto, Backend::Pread, Backend::Direct, Backend::Mmap, Backend::Gds})
    if (name == backend_name(b)) return b;
  throw std::invalid_argument("unknown backend '" + name + "' (expected auto, pread, direct, mmap or gds)");
}

std::vector<bool> begin_load(const Checkpoint& ckpt, std::vector<Pick> selection, LoadedTensors& result) {
  const auto& headers = ckpt.files();
  result.selection = std::move(selection);
  std::vector<bool> used(headers.size(), false);
  for (const Pick& p : result.selection) {
    result.stats.bytes += ckpt.extent(p).nbytes;
    result.dtypes.push_back(ckpt.entry(p.ref).dtype);
    used[p.ref.file] = true;
  }
  // Every read goes through the descriptors the headers were read from; a file rewritten or
  // truncated in place since then is refused here.
  for (std::size_t f = 0; f < headers.size(); ++f)
    if (used[f]) headers[f].file->check_unchanged();
  return used;
}

}  // namespace fst
