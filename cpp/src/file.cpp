#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <string>

#include "detail/posix_file.hpp"
#include "fst/errors.hpp"

namespace fst::detail {

PosixFile PosixFile::try_open(const std::string& path, int flags, int& err) {
  PosixFile f;
  f.path_ = path;
  do f.fd_ = ::open(path.c_str(), flags | O_CLOEXEC);
  while (f.fd_ < 0 && errno == EINTR);
  err = f.fd_ < 0 ? errno : 0;
  return f;
}

PosixFile PosixFile::try_reopen(const FileHandle& handle, int flags, int& err) {
  PosixFile f = try_open("/proc/self/fd/" + std::to_string(handle.fd()), flags, err);
  f.path_ = handle.path();
  if (f.valid()) {
    // /proc/self/fd/N reopens the inode the descriptor refers to; check it, in case /proc is
    // something else here.
    struct stat st;
    if (::fstat(f.fd_, &st) != 0 || static_cast<std::uint64_t>(st.st_ino) != handle.identity().inode ||
        static_cast<std::uint64_t>(st.st_dev) != handle.identity().device) {
      err = ESTALE;
      return PosixFile();
    }
  }
  return f;
}

PosixFile PosixFile::reopen(const FileHandle& handle, int flags) {
  int err = 0;
  PosixFile f = try_reopen(handle, flags, err);
  if (!f.valid()) throw IoError(err, "reopen", handle.path());
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

void read_exact(int fd, const std::string& path, void* dst, std::uint64_t n, std::uint64_t offset) {
  auto* p = static_cast<char*>(dst);
  while (n > 0) {
    ssize_t got = ::pread(fd, p, n, static_cast<off_t>(offset));
    if (got < 0) {
      if (errno == EINTR) continue;
      throw IoError(errno, "read", path);
    }
    if (got == 0) throw_shrank(path);
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

namespace fst {

namespace {

FileIdentity identity_of(const struct stat& st) {
  return FileIdentity{static_cast<std::uint64_t>(st.st_dev), static_cast<std::uint64_t>(st.st_ino),
                      static_cast<std::uint64_t>(st.st_size),
                      static_cast<std::int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec};
}

int open_for_reading(const std::string& path) {
  int fd;
  do fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  while (fd < 0 && errno == EINTR);
  return fd;
}

}  // namespace

std::shared_ptr<const FileHandle> FileHandle::open(const std::string& path) {
  int fd = open_for_reading(path);
  if (fd < 0 && errno == EMFILE) {
    // A checkpoint holds a descriptor per file while it lives: a many-file checkpoint may need
    // more than the default soft limit, which any process may raise up to the hard one.
    // Headers are parsed on several threads: another one may have raised it meanwhile, so
    // the open is tried again either way.
    struct rlimit lim {};
    if (::getrlimit(RLIMIT_NOFILE, &lim) == 0 && lim.rlim_cur < lim.rlim_max) {
      lim.rlim_cur = lim.rlim_max;
      ::setrlimit(RLIMIT_NOFILE, &lim);
    }
    fd = open_for_reading(path);
    if (fd < 0 && errno == EMFILE)
      throw IoError(EMFILE, "open (a checkpoint holds one descriptor per file; RLIMIT_NOFILE is " +
                                std::to_string(lim.rlim_cur) + ")", path);
  }
  if (fd < 0) throw IoError(errno, "open", path);
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    int err = errno;
    ::close(fd);
    throw IoError(err, "stat", path);
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    throw IoError(S_ISDIR(st.st_mode) ? EISDIR : EINVAL, "open (not a regular file)", path);
  }
  // Reads of a regular file never block anyway; clear the flag so that descriptors reopened
  // from this one do not inherit it.
  ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) & ~O_NONBLOCK);
  return std::shared_ptr<const FileHandle>(new FileHandle(fd, path, identity_of(st)));
}

FileHandle::~FileHandle() { ::close(fd_); }

void FileHandle::check_unchanged() const {
  struct stat st;
  if (::fstat(fd_, &st) != 0) throw IoError(errno, "stat", path_);
  const FileIdentity now = identity_of(st);
  if (now != identity_)
    throw Error("'" + path_ + "' changed since its header was read (size " + std::to_string(identity_.size) +
                " -> " + std::to_string(now.size) + " bytes" +
                (now.mtime_ns != identity_.mtime_ns ? ", modified again" : "") +
                "): it was rewritten or truncated in place; load it again");
}

}  // namespace fst
