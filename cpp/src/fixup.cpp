#include "fst/fixup.hpp"

#include <algorithm>

#include "fst/convert.hpp"
#include "fst/errors.hpp"
#include "fst/plan.hpp"

namespace fst {

bool is_floating(Dtype d) noexcept {
  switch (d) {
    case Dtype::F4: case Dtype::F6_E2M3: case Dtype::F6_E3M2: case Dtype::F8_E5M2: case Dtype::F8_E4M3:
    case Dtype::F8_E8M0: case Dtype::F8_E4M3FNUZ: case Dtype::F8_E5M2FNUZ: case Dtype::F16:
    case Dtype::BF16: case Dtype::F32: case Dtype::F64:
      return true;
    default:
      return false;
  }
}

Dtype DtypeRules::target_for(const TensorEntry& e) const {
  std::optional<Dtype> target;
  for (const auto& [pattern, dtype] : rules) {
    if (name_matches(pattern, e.name)) {
      target = dtype;
      break;
    }
  }
  if (!target && floating_default && is_floating(e.dtype)) target = floating_default;
  if (!target || *target == e.dtype) return e.dtype;
  if (!conversion_supported(e.dtype, *target))
    throw UnsupportedError("tensor '" + e.name + "': no conversion from " + std::string(dtype_name(e.dtype)) +
                           " to " + std::string(dtype_name(*target)) +
                           " (supported: among F64, F32, F16, BF16, F8_E4M3, F8_E5M2; F8_E8M0 to wider floats; "
                           "among BOOL and the integer types)");
  return *target;
}

void convert_loaded(LoadedTensors& loaded, const Checkpoint& ckpt, const std::vector<Dtype>& targets,
                    ThreadPool& pool, std::uint64_t alignment, ConvertMode mode) {
  const std::size_t n = loaded.selection.size();
  loaded.dtypes.resize(n);
  std::vector<std::size_t> changed;
  std::uint64_t size = 0;
  std::vector<std::uint64_t> slot(n, 0), count(n, 0);
  for (std::size_t i = 0; i < n; ++i) {
    const Pick& p = loaded.selection[i];
    const Dtype from = ckpt.entry(p.ref).dtype;
    loaded.dtypes[i] = targets[i];
    if (targets[i] == from) continue;
    count[i] = ckpt.extent(p).nbytes * 8 / dtype_bits(from);
    size = align_up(size, alignment);
    slot[i] = size;
    size += count[i] * dtype_bits(targets[i]) / 8;
    changed.push_back(i);
  }
  if (changed.empty()) return;
  auto arena = std::make_shared<HostArena>(size, alignment);
  // Work in pieces of about 4 MiB of output so many small tensors share a task and large
  // ones spread over every thread.
  constexpr std::uint64_t kPiece = 4u << 20;
  TaskGroup group;
  std::vector<std::pair<std::size_t, std::pair<std::uint64_t, std::uint64_t>>> batch;  // tensor, [first, count)
  std::uint64_t batch_bytes = 0;
  auto flush = [&] {
    if (batch.empty()) return;
    pool.submit(group, [&loaded, &ckpt, &targets, mode, base = arena->data(), &slot, work = std::move(batch)](unsigned) {
      for (const auto& [i, range] : work) {
        const Dtype from = ckpt.entry(loaded.selection[i].ref).dtype, to = targets[i];
        const auto* src = loaded.data[i] + range.first * dtype_bits(from) / 8;
        auto* dst = base + slot[i] + range.first * dtype_bits(to) / 8;
        convert_host(src, from, dst, to, range.second, 1, mode);
      }
    });
    batch = {};
    batch_bytes = 0;
  };
  for (std::size_t i : changed) {
    const std::uint64_t out_bits = dtype_bits(targets[i]);
    const std::uint64_t per_piece = std::max<std::uint64_t>(1, kPiece * 8 / out_bits);
    for (std::uint64_t first = 0; first < count[i]; first += per_piece) {
      const std::uint64_t c = std::min(per_piece, count[i] - first);
      batch.push_back({i, {first, c}});
      batch_bytes += c * out_bits / 8;
      if (batch_bytes >= kPiece) flush();
    }
  }
  flush();
  group.wait_for(-1);
  group.rethrow();
  const auto owner = static_cast<std::uint32_t>(loaded.owners.size());
  loaded.owners.push_back(arena);
  for (std::size_t i : changed) {
    loaded.data[i] = arena->data() + slot[i];
    loaded.owner_of[i] = owner;
  }
  // Drop buffers no tensor uses any more (the raw bytes of converted tensors).
  std::vector<bool> used(loaded.owners.size(), false);
  for (std::uint32_t o : loaded.owner_of) used[o] = true;
  std::vector<std::uint32_t> renumber(loaded.owners.size());
  std::vector<std::shared_ptr<Buffer>> kept;
  for (std::size_t o = 0; o < loaded.owners.size(); ++o) {
    renumber[o] = static_cast<std::uint32_t>(kept.size());
    if (used[o]) kept.push_back(std::move(loaded.owners[o]));
  }
  for (auto& o : loaded.owner_of) o = renumber[o];
  loaded.owners = std::move(kept);
}

std::vector<Dtype> target_dtypes(const Checkpoint& ckpt, const std::vector<Pick>& picks, const DtypeRules& rules) {
  std::vector<Dtype> targets;
  if (rules.empty()) return targets;
  bool any = false;
  targets.reserve(picks.size());
  for (const Pick& p : picks) {
    const TensorEntry& e = ckpt.entry(p.ref);
    targets.push_back(rules.target_for(e));
    any = any || targets.back() != e.dtype;
  }
  if (!any) targets.clear();
  return targets;
}

}  // namespace fst
