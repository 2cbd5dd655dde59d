#include "fst/read_into.hpp"

#include <algorithm>
#include <memory>
#include <string>

#include "detail/posix_file.hpp"
#include "fst/errors.hpp"
#include "fst/thread_pool.hpp"

namespace fst {

namespace {

// A slice of one CallerRead of at most max_request bytes: the unit a worker takes.
struct Chunk {
  std::uint32_t read;
  std::uint64_t skip;    // bytes of the read before this chunk
  std::uint64_t length;
};

void check_ranges(const Checkpoint& ckpt, const std::vector<CallerRead>& reads) {
  const auto& files = ckpt.files();
  for (const CallerRead& r : reads) {
    if (r.file >= files.size())
      throw Error("read_into: file index " + std::to_string(r.file) + " out of range (the checkpoint has " +
                  std::to_string(files.size()) + " files)");
    const FileHeader& h = files[r.file];
    // Written so that no sum can overflow: offset + length <= file_size.
    if (r.offset < h.data_start() || r.offset > h.file_size || r.length > h.file_size - r.offset)
      throw Error("'" + h.path + "': bytes [" + std::to_string(r.offset) + ", +" + std::to_string(r.length) +
                  ") are outside the file's data section [" + std::to_string(h.data_start()) + ", " +
                  std::to_string(h.file_size) + ")");
    if (r.length > 0 && r.destination == nullptr)
      throw Error("'" + h.path + "': read_into was given no destination for " + std::to_string(r.length) + " bytes");
  }
}

}  // namespace

std::uint64_t read_into(const Checkpoint& ckpt, const std::vector<CallerRead>& reads,
                        const ReadIntoOptions& options, std::atomic<std::uint64_t>* done,
                        const std::function<bool()>& tick) {
  check_ranges(ckpt, reads);
  const auto& files = ckpt.files();
  std::vector<bool> used(files.size(), false);
  for (const CallerRead& r : reads) used[r.file] = true;
  for (std::size_t f = 0; f < files.size(); ++f)
    if (used[f]) files[f].file->check_unchanged();

  const std::uint64_t step = std::max<std::uint64_t>(options.max_request, 4096);
  std::vector<Chunk> chunks;
  std::uint64_t total = 0;
  for (std::uint32_t i = 0; i < reads.size(); ++i) {
    total += reads[i].length;
    for (std::uint64_t skip = 0; skip < reads[i].length; skip += step)
      chunks.push_back({i, skip, std::min(step, reads[i].length - skip)});
  }

  auto read_chunk = [&](const Chunk& c) {
    const CallerRead& r = reads[c.read];
    const FileHeader& h = files[r.file];
    detail::read_exact(h.file->fd(), h.path, r.destination + c.skip, c.length, r.offset + c.skip);
    if (done) done->fetch_add(c.length, std::memory_order_relaxed);
  };

  if (chunks.size() <= 1) {
    // One request: starting a pool would cost more than it saves.
    for (const Chunk& c : chunks) read_chunk(c);
    return total;
  }
  unsigned threads = options.threads ? options.threads : ThreadPool::default_threads();
  threads = static_cast<unsigned>(std::clamp<std::size_t>(threads, 1, chunks.size()));

  // Workers pull chunks in order from one counter, so neighbouring ranges are read close in
  // time (the kernel's readahead follows) and no worker idles while another has a queue.
  std::atomic<std::size_t> next{0};
  TaskGroup group;
  {
    ThreadPool pool(threads);
    for (unsigned t = 0; t < threads; ++t)
      pool.submit(group, [&](unsigned) {
        for (std::size_t i; !group.cancelled() && (i = next.fetch_add(1)) < chunks.size();)
          read_chunk(chunks[i]);
      });
    // On failure or cancel, drive() waits for the running tasks before it throws, and the
    // pool joins its threads as it goes out of scope.
    group.drive(tick, 100);
  }
  return total;
}

}  // namespace fst
