// RAII file descriptor with the few operations the reader needs; every failure is an IoError
// naming the operation and the path.
#pragma once

#include <fcntl.h>
#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "fst/file_handle.hpp"

namespace fst::detail {

inline constexpr std::uint64_t kDirectAlign = 4096;  // O_DIRECT offset, length and address unit

[[noreturn]] void throw_shrank(const std::string& path);
// Reads exactly `n` bytes at `offset` of `fd`; a short read means the file shrank: fst::Error.
void read_exact(int fd, const std::string& path, void* dst, std::uint64_t n, std::uint64_t offset);

class PosixFile {
 public:
  PosixFile() = default;
  ~PosixFile();
  PosixFile(PosixFile&& o) noexcept : fd_(o.fd_), path_(std::move(o.path_)) { o.fd_ = -1; }
  PosixFile& operator=(PosixFile&& o) noexcept;
  PosixFile(const PosixFile&) = delete;
  PosixFile& operator=(const PosixFile&) = delete;

  // Like the constructor, but returns an invalid file and sets `err` instead of throwing.
  static PosixFile try_open(const std::string& path, int flags, int& err);
  // A new open file description of the file `handle` holds (through /proc/self/fd), with
  // `flags` of its own (O_DIRECT, or its own readahead state), never the path: the result is
  // the version whose header was parsed even when the name now points elsewhere. Returns an
  // invalid file and sets `err` on failure.
  static PosixFile try_reopen(const FileHandle& handle, int flags, int& err);
  // The same, throwing IoError.
  static PosixFile reopen(const FileHandle& handle, int flags);

  int fd() const noexcept { return fd_; }
  bool valid() const noexcept { return fd_ >= 0; }
  const std::string& path() const noexcept { return path_; }
  void read_exact(void* dst, std::uint64_t n, std::uint64_t offset) const {
    detail::read_exact(fd_, path_, dst, n, offset);
  }
  // For a file opened with O_DIRECT: reads the aligned blocks covering [offset, offset + n)
  // into `buffer` (kDirectAlign-aligned, at least n + 2 * kDirectAlign bytes) and returns
  // where byte `offset` landed in it.
  const std::byte* read_direct(std::byte* buffer, std::uint64_t n, std::uint64_t offset) const;

 private:
  int fd_ = -1;
  std::string path_;
};

}  // namespace fst::detail
