// Plan: the headers of every file of a checkpoint, the tensors a load selects, where each
// lands in memory, and the merged read requests that fill those places.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "fst/header.hpp"

namespace fst {

struct TensorRef {
  std::uint32_t file;
  std::uint32_t index;  // into files[file].tensors
};

inline constexpr std::uint64_t kAllRows = UINT64_MAX;

// What one load delivers of a tensor: all of it, or rows [first_row, first_row + rows) of its
// dimension 0 (a shard), which are contiguous bytes in the file.
struct Pick {
  TensorRef ref;
  std::uint64_t first_row = 0;
  std::uint64_t rows = kAllRows;
};

// Where a pick's bytes are: absolute file offset and length.
struct Extent {
  std::uint64_t offset;
  std::uint64_t nbytes;
};

// What a *.safetensors.index.json says: the file of each tensor it names.
struct IndexMap {
  std::string path;                                       // the index itself, for errors
  std::vector<std::string> shards;                        // file names as the index writes them, one per path
  std::unordered_map<std::string, std::string> shard_of;  // tensor name -> one of `shards`
};

// Whether `name` is `pattern` or matches it as a glob: POSIX fnmatch without flags (`*` matches
// any characters and `?` any one, `/` and `.` included; `[...]` sets, `[!...]` negated; a backslash
// quotes the next character). Every name pattern fst takes (keys=, dtype=, shard=, sharding=)
// is matched by this one function, so all of them mean the same thing.
bool name_matches(const std::string& pattern, const std::string& name);

class Checkpoint {
 public:
  // Parses every header (in parallel over files) and refuses a name present in two files.
  // With an index, the checkpoint is what the index names: a tensor a file holds that the
  // index does not name there is left out (see unindexed()), and a name the index maps to a
  // file lacking it is an error once a selection takes it, so that a load whose keys= avoid
  // the gap still works.
  Checkpoint(const std::vector<std::string>& paths, unsigned threads, const IndexMap* index = nullptr);
  ~Checkpoint();
  Checkpoint(const Checkpoint&) = delete;  // the name table refers to this object
  Checkpoint& operator=(const Checkpoint&) = delete;

  const std::vector<FileHeader>& files() const noexcept { return files_; }
  const TensorEntry& entry(TensorRef r) const { return files_[r.file].tensors[r.index]; }
  // All tensors in file order (file by file, by data offset).
  const std::vector<TensorRef>& all() const noexcept { return all_; }
  // nullptr when absent.
  const TensorRef* find(std::string_view name) const;
  // The tensor named `name`: throws the stale-index error or KeyNotFoundError when absent.
  TensorRef require(const std::string& name) const;
  // Throws the stale-index error when the index names a tensor no file holds: before a
  // load of every tensor.
  void check_complete() const;
  // Tensors the files hold that the index does not name, in file order.
  const std::vector<TensorRef>& unindexed() const noexcept { return unindexed_; }
  // Tensors whose name equals one of `patterns` or matches it (name_matches), in file order. A pattern without glob characters that names no tensor is an error
  // (KeyError in Python); a glob may match nothing.
  std::vector<Pick> select(const std::vector<std::string>& patterns) const;
  std::uint64_t absolute_offset(TensorRef r) const { return files_[r.file].data_start() + entry(r).begin; }
  // Checks the row range (throws Error when out of bounds) and locates its bytes.
  Extent extent(const Pick& p) const;
  // The pick's shape: the tensor's, with dimension 0 cut to the rows picked.
  std::vector<std::uint64_t> shape(const Pick& p) const;

 private:
  std::vector<FileHeader> files_;
  std::vector<TensorRef> all_;
  std::vector<TensorRef> unindexed_;
  std::string index_path_;
  std::unordered_map<std::string, std::uint32_t> missing_;  // name -> the file the index says holds it
  [[noreturn]] void throw_missing(const std::string& name, std::uint32_t file) const;
  // Throws for the first missing name `glob` matches (every one when null), if any.
  void throw_first_missing(const std::string* glob) const;
  void apply_index(const IndexMap& index);
  struct NameOf {
    const Checkpoint* ckpt;
    std::string_view operator()(std::uint32_t i) const;
  };
  struct NameTable;
  void build_name_table() const;
  mutable std::once_flag name_table_once_;
  mutable std::unique_ptr<NameTable> by_name_;  // indices into all_, by name
};

// Consecutive groups of items whose sizes add up to at most `budget` (an item larger than the
// budget is a group of its own): the index of each group's first item. What a stream reads
// at a time, for a selection's tensors or for the shares of them a process reads.
std::vector<std::size_t> group_starts(const std::vector<std::uint64_t>& sizes, std::uint64_t budget);

// Where each selected tensor goes in one host arena: slots aligned to `alignment`.
struct Placement {
  std::vector<std::uint64_t> offsets;  // parallel to the selection
  std::uint64_t size = 0;
};
Placement place(const Checkpoint& ckpt, const std::vector<Pick>& sel, std::uint64_t alignment);
// The same with each slot sized for targets[i] instead of the tensor's own dtype.
Placement place(const Checkpoint& ckpt, const std::vector<Pick>& sel, std::uint64_t alignment,
                const std::vector<Dtype>& targets);

// One contiguous range of one file, scattered into consecutive pieces of the arena.
struct Piece {
  std::uint64_t arena_offset;
  std::uint64_t length;
  std::uint32_t pick;         // index in the selection of the tensor the bytes belong to
  std::uint64_t pick_offset;  // where they start within that tensor's bytes
};
struct ReadRequest {
  std::uint32_t file;
  std::uint64_t offset;  // absolute, in the file
  std::uint64_t length;
  std::uint32_t first_piece;
  std::uint32_t piece_count;
};
struct ReadPlan {
  std::vector<ReadRequest> requests;
  std::vector<Piece> pieces;
  std::uint64_t bytes = 0;
};
// Merges tensors that are adjacent in a file into requests of at most `max_request` bytes
// and `max_pieces` pieces; a tensor larger than `max_request` is split across requests.
ReadPlan plan_reads(const Checkpoint& ckpt, const std::vector<Pick>& sel,
                    const Placement& placement, std::uint64_t max_request, std::uint32_t max_pieces);

}  // namespace fst
