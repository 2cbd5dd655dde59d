// Random access to single tensors (safe_open): files opened once, each request served on the
// calling thread, either as a view of a file mapping or read into a buffer of its own.
#pragma once

#include <memory>
#include <vector>

#include "fst/buffer.hpp"
#include "fst/plan.hpp"
#include "fst/reader.hpp"

namespace fst {

class TensorSource {
 public:
  // `options.backend`: Mmap and Auto (mmap when the data is in the page cache) may give views;
  // Pread and Direct read every tensor (Direct is served by pread here: single tensors are
  // small requests where O_DIRECT has nothing to offer).
  TensorSource(std::shared_ptr<const Checkpoint> ckpt, const ReadOptions& options);
  ~TensorSource();

  struct Rows {
    std::shared_ptr<const Buffer> owner;
    std::byte* data;
  };
  Rows get(const Pick& pick) const;
  // The pick converted to `target` (by options.convert_mode's rules, into memory of its own)
  // when that differs from its dtype; get(pick) otherwise.
  Rows get_as(const Pick& pick, Dtype target) const;
  Backend backend() const noexcept { return backend_; }
  const std::string& reason() const noexcept { return reason_; }

 private:
  struct State;
  std::shared_ptr<const Checkpoint> ckpt_;
  ReadOptions opt_;
  Backend backend_;
  std::string reason_;
  std::unique_ptr<State> state_;
};

}  // namespace fst
