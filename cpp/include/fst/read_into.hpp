// Read into memory the caller owns: byte ranges of a checkpoint's files copied straight into
// destinations a framework allocated (existing parameters, a distributed checkpoint's
// tensors), with no arena of fst's own in between.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <vector>

#include "fst/plan.hpp"

namespace fst {

// One range of one file and where its bytes go.
struct CallerRead {
  std::uint32_t file;         // index into the checkpoint's files
  std::uint64_t offset;       // absolute, in the file; within its data section
  std::uint64_t length;
  std::byte* destination;     // at least `length` writable bytes, owned by the caller
};

struct ReadIntoOptions {
  unsigned threads = 0;                   // 0: the CPUs this process may use
  std::uint64_t max_request = 16u << 20;  // bytes per read call
};

// Reads every range through the descriptor each file's header was read from, on a pool of
// `threads` workers (the calling thread alone for a single small range). Before reading:
// every range is checked to lie within its file's data section (Error naming the file) and
// every file read is checked unchanged since its header was parsed. `done` (may be null)
// counts the bytes read so far; `tick` is called every 100 ms meanwhile (not for a single request) and cancels the read
// when it returns false (Error "load cancelled"). Returns the bytes read.
std::uint64_t read_into(const Checkpoint& ckpt, const std::vector<CallerRead>& reads,
                        const ReadIntoOptions& options, std::atomic<std::uint64_t>* done = nullptr,
                        const std::function<bool()>& tick = {});

}  // namespace fst
