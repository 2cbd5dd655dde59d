#include "fst/plan.hpp"

#include <fnmatch.h>

#include <algorithm>
#include <mutex>
#include <tuple>
#include <unordered_set>

#include "fst/buffer.hpp"
#include "fst/errors.hpp"
#include "fst/thread_pool.hpp"
#include "detail/name_index.hpp"

namespace fst {

bool name_matches(const std::string& pattern, const std::string& name) {
  return pattern == name || ::fnmatch(pattern.c_str(), name.c_str(), 0) == 0;
}

std::string_view Checkpoint::NameOf::operator()(std::uint32_t i) const {
  return ckpt->entry(ckpt->all_[i]).name;
}

struct Checkpoint::NameTable : detail::NameIndex<Checkpoint::NameOf> {
  using detail::NameIndex<Checkpoint::NameOf>::NameIndex;
};

Checkpoint::Checkpoint(const std::vector<std::string>& paths, unsigned threads, const IndexMap* index) {
  files_.resize(paths.size());
  // A few headers are parsed faster on this thread than threads can be started for them (a
  // small checkpoint's load is mostly such fixed costs); many files, read in parallel.
  constexpr std::size_t kParallelFrom = 5;
  if (paths.size() < kParallelFrom || threads == 1) {
    for (std::size_t i = 0; i < paths.size(); ++i) files_[i] = read_header(paths[i]);
  } else {
    ThreadPool pool(std::min<unsigned>(threads ? threads : ThreadPool::default_threads(),
                                       static_cast<unsigned>(paths.size())));
    TaskGroup group;
    for (std::size_t i = 0; i < paths.size(); ++i)
      pool.submit(group, [&, i](unsigned) { files_[i] = read_header(paths[i]); });
    group.wait_for(-1);
    group.rethrow();
  }
  std::size_t total = 0;
  for (const auto& f : files_) total += f.tensors.size();
  all_.reserve(total);
  for (std::uint32_t fi = 0; fi < files_.size(); ++fi)
    for (std::uint32_t ti = 0; ti < files_[fi].tensors.size(); ++ti) all_.push_back(TensorRef{fi, ti});
  if (index) apply_index(*index);
  // Names are unique within a file (the parser resolved repeats), so one file needs the name
  // table only for lookups, built on the first one: a whole-checkpoint load never pays for it.
  if (files_.size() > 1) build_name_table();
}

Checkpoint::~Checkpoint() = default;

void Checkpoint::apply_index(const IndexMap& index) {
  if (index.shards.size() != files_.size()) throw Error(index.path + ": expected one shard name per file");
  index_path_ = index.path;
  std::unordered_map<std::string_view, std::uint32_t> file_of_shard;
  for (std::uint32_t fi = 0; fi < index.shards.size(); ++fi) file_of_shard.emplace(index.shards[fi], fi);
  std::vector<TensorRef> kept;
  kept.reserve(all_.size());
  for (TensorRef r : all_) {
    auto it = index.shard_of.find(entry(r).name);
    bool named_here = it != index.shard_of.end() && file_of_shard.at(it->second) == r.file;
    (named_here ? kept : unindexed_).push_back(r);
  }
  all_ = std::move(kept);
  // Each kept tensor is a distinct name of the index: fewer than it names means some are missing.
  if (all_.size() == index.shard_of.size()) return;
  std::unordered_map<std::string_view, std::uint32_t> held;
  held.reserve(all_.size());
  for (TensorRef r : all_) held.emplace(entry(r).name, r.file);
  for (const auto& [name, shard] : index.shard_of)
    if (!held.count(name)) missing_.emplace(name, file_of_shard.at(shard));
}

void Checkpoint::throw_missing(const std::string& name, std::uint32_t file) const {
  throw Error(index_path_ + ": maps '" + name + "' to '" + files_[file].path +
              "', which does not hold it (the index is stale)");
}

void Checkpoint::throw_first_missing(const std::string* glob) const {
  // The first by file, then by name, so the message does not depend on the hash order.
  const std::pair<const std::string, std::uint32_t>* first = nullptr;
  for (const auto& m : missing_) {
    if (glob && !name_matches(*glob, m.first)) continue;
    if (!first || std::tie(m.second, m.first) < std::tie(first->second, first->first)) first = &m;
  }
  if (first) throw_missing(first->first, first->second);
}

void Checkpoint::check_complete() const {
  if (!missing_.empty()) throw_first_missing(nullptr);
}

TensorRef Checkpoint::require(const std::string& name) const {
  if (const TensorRef* r = find(name)) return *r;
  if (auto it = missing_.find(name); it != missing_.end()) throw_missing(it->first, it->second);
  throw KeyNotFoundError(name);
}

void Checkpoint::build_name_table() const {
  std::call_once(name_table_once_, [this] {
    auto table = std::make_unique<NameTable>(all_.size(), NameOf{this});
    for (std::uint32_t i = 0; i < all_.size(); ++i) {
      auto [other, inserted] = table->insert(i);
      if (!inserted)
        throw HeaderError(files_[all_[i].file].path, entry(all_[i]).name, HeaderRule::DuplicateTensor,
                          "the name is also in '" + files_[all_[other].file].path + "'");
    }
    by_name_ = std::move(table);
  });
}

const TensorRef* Checkpoint::find(std::string_view name) const {
  build_name_table();
  std::uint32_t i = by_name_->find(name);
  return i == NameTable::kEmpty ? nullptr : &all_[i];
}

Extent Checkpoint::extent(const Pick& p) const {
  const TensorEntry& e = entry(p.ref);
  if (p.rows == kAllRows && p.first_row == 0) return Extent{absolute_offset(p.ref), e.nbytes()};
  std::uint64_t n = e.shape.empty() ? 1 : e.shape[0];
  if (p.first_row > n || p.rows > n - p.first_row)
    throw Error("rows [" + std::to_string(p.first_row) + ", " + std::to_string(p.first_row + p.rows) +
                ") are out of bounds for tensor '" + e.name + "' with " + std::to_string(n) + " rows");
  std::uint64_t row_bytes = n ? e.nbytes() / n : 0;
  return Extent{absolute_offset(p.ref) + p.first_row * row_bytes, p.rows * row_bytes};
}

std::vector<std::uint64_t> Checkpoint::shape(const Pick& p) const {
  std::vector<std::uint64_t> s = entry(p.ref).shape;
  if (p.rows != kAllRows && !s.empty()) s[0] = p.rows;
  return s;
}

std::vector<Pick> Checkpoint::select(const std::vector<std::string>& patterns) const {
  // A pattern that is a tensor's exact name selects it, even if it holds glob characters.
  std::unordered_set<std::string> exact;
  std::vector<const std::string*> globs;
  for (const auto& p : patterns) {
    if (find(p)) exact.insert(p);
    else if (auto it = missing_.find(p); it != missing_.end()) throw_missing(it->first, it->second);
    else if (p.find_first_of("*?[") != std::string::npos) globs.push_back(&p);
    else throw KeyNotFoundError(p);
  }
  if (!missing_.empty())
    for (const std::string* g : globs) throw_first_missing(g);
  std::vector<Pick> out;
  for (TensorRef r : all_) {
    const std::string& name = entry(r).name;
    bool keep = exact.count(name) > 0;
    for (std::size_t i = 0; !keep && i < globs.size(); ++i)
      keep = name_matches(*globs[i], name);
    if (keep) out.push_back(Pick{r});
  }
  return out;
}

Placement place(const Checkpoint& ckpt, const std::vector<Pick>& sel, std::uint64_t alignment) {
  return place(ckpt, sel, alignment, {});
}

Placement place(const Checkpoint& ckpt, const std::vector<Pick>& sel, std::uint64_t alignment,
                const std::vector<Dtype>& targets) {
  Placement p;
  p.offsets.resize(sel.size());
  std::uint64_t cursor = 0;
  for (std::size_t i = 0; i < sel.size(); ++i) {
    cursor = align_up(cursor, alignment);
    p.offsets[i] = cursor;
    std::uint64_t bytes = ckpt.extent(sel[i]).nbytes;
    if (!targets.empty()) bytes = bytes * dtype_bits(targets[i]) / dtype_bits(ckpt.entry(sel[i].ref).dtype);
    cursor += bytes;
  }
  p.size = cursor;
  return p;
}

ReadPlan plan_reads(const Checkpoint& ckpt, const std::vector<Pick>& sel,
                    const Placement& placement, std::uint64_t max_request, std::uint32_t max_pieces) {
  ReadPlan plan;
  ReadRequest* open = nullptr;  // the request still accepting adjacent pieces
  auto start_request = [&](std::uint32_t file, std::uint64_t offset) {
    plan.requests.push_back(ReadRequest{file, offset, 0, static_cast<std::uint32_t>(plan.pieces.size()), 0});
    open = &plan.requests.back();
  };
  for (std::size_t i = 0; i < sel.size(); ++i) {
    const Extent ext = ckpt.extent(sel[i]);
    const std::uint32_t file = sel[i].ref.file;
    std::uint64_t file_off = ext.offset;
    std::uint64_t arena_off = placement.offsets[i];
    std::uint64_t left = ext.nbytes, within = 0;
    const std::uint64_t element = dtype_align(ckpt.entry(sel[i].ref).dtype);
    plan.bytes += left;
    while (left > 0) {
      // A tensor split across requests is cut between elements, so that every piece can be
      // converted on its own.
      bool adjacent = open && open->file == file && open->offset + open->length == file_off;
      std::uint64_t room = adjacent ? max_request - std::min(max_request, open->length) : 0;
      if (room < left) room -= room % element;
      if (!adjacent || room == 0 || open->piece_count >= max_pieces) {
        start_request(file, file_off);
        room = max_request - max_request % element;
      }
      std::uint64_t take = std::min(left, room);
      plan.pieces.push_back(Piece{arena_off, take, static_cast<std::uint32_t>(i), within});
      within += take;
      open->length += take;
      ++open->piece_count;
      file_off += take;
      arena_off += take;
      left -= take;
    }
  }
  return plan;
}

std::vector<std::size_t> group_starts(const std::vector<std::uint64_t>& sizes, std::uint64_t budget) {
  std::vector<std::size_t> starts;
  std::uint64_t bytes = 0;
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    if (starts.empty() || (bytes + sizes[i] > budget && starts.back() < i)) {
      starts.push_back(i);
      bytes = 0;
    }
    bytes += sizes[i];
  }
  return starts;
}

}  // namespace fst
