#include <sys/mman.h>

#include <cerrno>
#include <cstdlib>
#include <algorithm>
#include <new>

#include "fst/buffer.hpp"
#include "fst/errors.hpp"

namespace fst {

namespace {
constexpr std::size_t kMapThreshold = 1 << 20;
}

HostArena::HostArena(std::size_t size, std::size_t alignment) {
  size_ = size;
  if (size >= kMapThreshold) {
    void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
      throw Error("cannot allocate " + std::to_string(size) + " bytes of host memory: out of memory");
    mapped_ = true;
    data_ = static_cast<std::byte*>(p);
    return;
  }
  if (alignment < sizeof(void*)) alignment = sizeof(void*);
  void* p = nullptr;
  // A zero-byte request still gets a real, aligned address for empty tensors to point at.
  if (::posix_memalign(&p, alignment, size ? size : alignment) != 0) throw std::bad_alloc();
  data_ = static_cast<std::byte*>(p);
}

void HostArena::populate(std::size_t offset, std::size_t length) const noexcept {
#ifdef MADV_POPULATE_WRITE
  if (!mapped_ || length == 0) return;
  const std::size_t page = 4096;
  std::size_t first = offset / page * page, last = std::min(size_, offset + length);
  last = (last + page - 1) / page * page;  // the mapping extends to the end of its last page
  ::madvise(data_ + first, last - first, MADV_POPULATE_WRITE);
#else
  (void)offset, (void)length;
#endif
}

HostArena::~HostArena() {
  if (mapped_) ::munmap(data_, size_);
  else std::free(data_);
}

FileMapping::FileMapping(int fd, std::size_t size, const std::string& path) {
  size_ = size;
  if (size == 0) return;
  void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
  if (p == MAP_FAILED) throw IoError(errno, "mmap", path);
  data_ = static_cast<std::byte*>(p);
}

FileMapping::~FileMapping() {
  if (data_) ::munmap(data_, size_);
}

}  // namespace fst
