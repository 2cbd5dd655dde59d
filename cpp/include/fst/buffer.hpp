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

// A private, copy-on-write mapping of a whole file: writes to a tensor never reach the file.
class FileMapping final : public Buffer {
 public:
  FileMapping(int fd, std::size_t size, const std::string& path);
  ~FileMapping() override;
};

inline std::uint64_t align_up(std::uint64_t v, std::uint64_t a) noexcept { return (v + a - 1) / a * a; }

}  // namespace fst
