#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>

#include "detail/posix_file.hpp"
#include "fst/errors.hpp"

namespace fst::detail {

PosixFile::PosixFile(const std::string& path, int flags) : path_(path) {
  do fd_ = ::open(path.c_str(), flags | O_CLOEXEC);
  while (fd_ < 0 && errno == EINTR);
  if (fd_ < 0) throw IoError(errno, "open", path);
}

PosixFile PosixFile::try_open(const std::string& path, int flags, int& err) {
  PosixFile f;
  f.path_ = path;
  do f.fd_ = ::open(path.c_str(), flags | O_CLOEXEC);
  while (f.fd_ < 0 && errno == EINTR);
  err = f.fd_ < 0 ? errno : 0;
  return f;
}

PosixFile::~PosixFile() {
  if (fd_ >= 0) ::close(fd_);
}

PosixFile& PosixFile::operator=(PosixFile&& o) noexcept {
  if (this != &o) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = o.fd_;
    path_ = std::move(o.path_);
    o.fd_ = -1;
  }
  return *this;
}

std::uint64_t PosixFile::size() const {
  struct stat st;
  if (::fstat(fd_, &st) != 0) throw IoError(errno, "stat", path_);
  if (S_ISDIR(st.st_mode)) throw IoError(EISDIR, "open", path_);
  return static_cast<std::uint64_t>(st.st_size);
}

void PosixFile::read_exact(void* dst, std::uint64_t n, std::uint64_t offset) const {
  auto* p = static_cast<char*>(dst);
  while (n > 0) {
    ssize_t got = ::pread(fd_, p, n, static_cast<off_t>(offset));
    if (got < 0) {
      if (errno == EINTR) continue;
      throw IoError(errno, "read", path_);
    }
    if (got == 0) throw_shrank(path_);
    p += got;
    n -= static_cast<std::uint64_t>(got);
    offset += static_cast<std::uint64_t>(got);
  }
}

const std::byte* PosixFile::read_direct(std::byte* buffer, std::uint64_t n, std::uint64_t offset) const {
  const std::uint64_t first = offset / kDirectAlign * kDirectAlign;
  const std::uint64_t last = (offset + n + kDirectAlign - 1) / kDirectAlign * kDirectAlign;
  const std::uint64_t need = offset + n - first;  // the file may end before `last`
  std::uint64_t have = 0;
  while (have < need) {
    ssize_t got = ::pread(fd_, buffer + have, last - first - have, static_cast<off_t>(first + have));
    if (got < 0) {
      if (errno == EINTR) continue;
      throw IoError(errno, "read (O_DIRECT)", path_);
    }
    if (got == 0) throw_shrank(path_);
    have += static_cast<std::uint64_t>(got);
  }
  return buffer + (offset - first);
}

void throw_shrank(const std::string& path) {
  throw Error("'" + path + "': the file is shorter than its header says (it shrank while being read?)");
}

}  // namespace fst::detail
