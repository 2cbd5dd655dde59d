// Fix up: what happens to tensors after their bytes have landed. On the host, conversion to
// the dtype the caller asked for (the same arithmetic as the CUDA kernels, see convert.hpp).
#pragma once

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "fst/dtype.hpp"
#include "fst/plan.hpp"
#include "fst/reader.hpp"

namespace fst {

// Which dtype each tensor should have: the first rule whose pattern (exact name or glob)
// matches the name decides; otherwise `floating_default` applies to floating-point tensors.
// Integer and bool tensors change only when a rule names them.
struct DtypeRules {
  std::optional<Dtype> floating_default;
  std::vector<std::pair<std::string, Dtype>> rules;

  bool empty() const noexcept { return !floating_default && rules.empty(); }
  // The target of `e` (its own dtype when nothing applies). Throws UnsupportedError, naming
  // the tensor, when the conversion it asks for does not exist.
  Dtype target_for(const TensorEntry& e) const;
};

bool is_floating(Dtype d) noexcept;

// The dtype `rules` give each pick, or an empty vector when they change none.
std::vector<Dtype> target_dtypes(const Checkpoint& ckpt, const std::vector<Pick>& picks, const DtypeRules& rules);

// Converts every tensor of `loaded` whose target differs from its dtype into a new arena
// (slots aligned to `alignment`), on `pool`. loaded.dtypes then holds the new dtypes.
void convert_loaded(LoadedTensors& loaded, const Checkpoint& ckpt, const std::vector<Dtype>& targets,
                    ThreadPool& pool, std::uint64_t alignment, ConvertMode mode);

}  // namespace fst
