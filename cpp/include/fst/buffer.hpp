// Memory that tensors view. Every exported tensor holds a shared_ptr to its Buffer, so the
// memory lives exactly as long as the last tensor that needs it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace fst {

class Buffer {
 public:
  virtual ~Buffer() = default;
  std::byte* data() const noexcept { return data_; }
  std::size_t size() const noexcept { return size_; }

 protected:
  std::byte* data_ = nullptr;
  std::size_t size_ = 0;
};

// Anonymous host memory aligned to at least `alignment` (a power of two up to 4096);
// large arenas come straight from mmap so they are page aligned and returned to the OS.
class HostArena final : public Buffer {
 public:
  HostArena(std::size_t size, std::size_t alignment);
  ~HostArena() override;
  // Backs [offset, offset + length) with memory now, in one call (MADV_POPULATE_WRITE), instead
  // of a page fault per 4 KiB page on first write: several times cheaper on virtual machines.
  // Best effort: a no-op on kernels without it and for small arenas.
  void populate(std::size_t offset, std::size_t length) const noexcept;

 private:
  bool mapped_ = false;
};

// A private, copy-on-write mapping of the bytes [offset, offset + length) of a file (whole
// pages around them): writes to a tensor never reach the file. Only the range a load selects
// is mapped, and without reserving swap for it (MAP_NORESERVE): its pages stay the page
// cache's until written, so a file larger than memory maps under the default overcommit
// heuristic. Strict overcommit (vm.overcommit_memory=2) charges the whole range anyway, and
// the mapping can fail there: `try_map` then returns null and the caller reads instead.
class FileMapping final : public Buffer {
 public:
  static std::shared_ptr<FileMapping> try_map(int fd, std::uint64_t offset, std::uint64_t length);
  ~FileMapping() override;
  // The address of byte `file_offset` of the file (inside the mapped range).
  std::byte* at(std::uint64_t file_offset) const noexcept { return data_ + (file_offset - first_); }

 private:
  FileMapping() = default;
  std::uint64_t first_ = 0;  // file offset of data_
};

inline std::uint64_t align_up(std::uint64_t v, std::uint64_t a) noexcept { return (v + a - 1) / a * a; }

}  // namespace fst
