#include <sys/mman.h>
#include <unistd.h>

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

std::shared_ptr<FileMapping> FileMapping::try_map(int fd, std::uint64_t offset, std::uint64_t length) {
  std::shared_ptr<FileMapping> map(new FileMapping());
  if (length == 0) {
    // Empty tensors still point at a real (never read, never unmapped) address.
    alignas(4096) static std::byte nothing[1];
    map->data_ = nothing;
    map->first_ = offset;
    return map;
  }
  const std::uint64_t page = static_cast<std::uint64_t>(::sysconf(_SC_PAGESIZE));
  map->first_ = offset / page * page;
  map->size_ = offset + length - map->first_;
  void* p = ::mmap(nullptr, map->size_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_NORESERVE, fd,
                   static_cast<off_t>(map->first_));
  if (p == MAP_FAILED) return nullptr;
  map->data_ = static_cast<std::byte*>(p);
  return map;
}

FileMapping::~FileMapping() {
  if (size_) ::munmap(data_, size_);
}

}  // namespace fst
