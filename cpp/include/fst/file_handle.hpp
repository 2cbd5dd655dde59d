// The descriptor a file's header was read from, held while the checkpoint lives. Every later
// read of that file goes through it, or through a descriptor reopened from it, never through
// the path again: a checkpoint replaced under the same name (an atomic os.replace by a
// trainer) is still read as the version whose header was parsed.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

namespace fst {

// What identifies one version of a file: fstat's device and inode, and the size and
// modification time that an in-place rewrite or truncation changes.
struct FileIdentity {
  std::uint64_t device = 0;
  std::uint64_t inode = 0;
  std::uint64_t size = 0;
  std::int64_t mtime_ns = 0;

  bool operator==(const FileIdentity& o) const noexcept {
    return device == o.device && inode == o.inode && size == o.size && mtime_ns == o.mtime_ns;
  }
  bool operator!=(const FileIdentity& o) const noexcept { return !(*this == o); }
};

class FileHandle {
 public:
  // Opens `path` for reading without blocking on a FIFO or device (O_NONBLOCK) and refuses
  // anything but a regular file (IoError naming the path). When the process is out of
  // descriptors (EMFILE), the soft RLIMIT_NOFILE is raised to the hard limit once and the
  // open retried.
  static std::shared_ptr<const FileHandle> open(const std::string& path);
  ~FileHandle();
  FileHandle(const FileHandle&) = delete;
  FileHandle& operator=(const FileHandle&) = delete;

  int fd() const noexcept { return fd_; }
  const std::string& path() const noexcept { return path_; }
  const FileIdentity& identity() const noexcept { return identity_; }
  // Throws fst::Error naming the file when its size or modification time is no longer what
  // they were when the header was read (rewritten or truncated in place).
  void check_unchanged() const;

 private:
  FileHandle(int fd, std::string path, const FileIdentity& identity)
      : fd_(fd), path_(std::move(path)), identity_(identity) {}
  int fd_;
  std::string path_;
  FileIdentity identity_;
};

}  // namespace fst
