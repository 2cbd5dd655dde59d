// cuFile (GPU Direct Storage) as fst uses it, opened at run time: libcufile.so.0 is dlopen'ed,
// so fst builds without the cuFile SDK and imports where it is missing. The few types below
// are written from the documented C ABI of cufile.h; this header and cufile.cpp are the only
// places that know them.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "detail/posix_file.hpp"

namespace fst::cufile {

// CUfileError_t: returned by value; `err` is a CUfileOpError (0 or 5000 + n), `cu_err` the
// CUresult behind err == kCudaDriverError.
struct Status {
  int err;
  int cu_err;
};
inline constexpr int kSuccess = 0;
inline constexpr int kErrorBase = 5000;
inline constexpr int kCudaDriverError = kErrorBase + 11;

using Handle = void*;  // CUfileHandle_t
inline constexpr int kHandleTypeOpaqueFd = 1;

// CUfileDescr_t for a Linux file descriptor.
struct Descriptor {
  int type;
  union {
    int fd;
    void* handle;
  } handle;
  const void* fs_ops;  // null: the kernel's file system
};

// CUfileDrvProps_t. Only nvfs.major_version / minor_version are read: both 0 means the
// nvidia-fs kernel driver is not loaded, so cuFile serves reads in compatibility mode (POSIX
// reads through its own bounce buffers) instead of DMA from storage to the GPU.
struct DriverProperties {
  struct {
    unsigned major_version;
    unsigned minor_version;
    std::size_t poll_thresh_size;
    std::size_t max_direct_io_size;
    unsigned dstatusflags;
    unsigned dcontrolflags;
  } nvfs;
  unsigned fflags;
  unsigned max_device_cache_size;
  unsigned per_buffer_cache_size;
  unsigned max_device_pinned_mem_size;
  unsigned max_batch_io_size;
  unsigned max_batch_io_timeout_msecs;
};

// The entry points of the process-wide library; null while it is not loaded.
struct Library {
  Status (*cuFileDriverOpen)();
  Status (*cuFileDriverClose)();
  Status (*cuFileDriverGetProperties)(DriverProperties*);
  Status (*cuFileHandleRegister)(Handle*, Descriptor*);
  void (*cuFileHandleDeregister)(Handle);
  Status (*cuFileBufRegister)(const void*, std::size_t, int);
  Status (*cuFileBufDeregister)(const void*);
  ssize_t (*cuFileRead)(Handle, void*, std::size_t, off_t, off_t);

  bool loaded = false;
  std::string path;    // what was opened: the FST_CUFILE_LIBRARY path, the soname or `bundled`
  std::string reason;  // why not, when not loaded

  // Loads the library on first success and keeps it for the life of the process (cuFile
  // state must never be unloaded under live handles). Candidates, in order: $FST_CUFILE_LIBRARY,
  // the soname libcufile.so.0, then `bundled` (the pip package nvidia-cufile, located by the
  // Python side). A failed attempt is not remembered, so a later call may still succeed.
  static const Library& get(const std::string& bundled);
};

// "GPUDirect Storage not supported on current file (cuFile error 5008)" and the like.
std::string status_text(Status s);

// One cuFileDriverOpen ... cuFileDriverClose session.
class Session {
 public:
  // Throws UnsupportedError with cuFile's reason when the driver cannot be opened.
  explicit Session(const Library& lib);
  ~Session();
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  // The session loads share: opened on first use, kept open for the rest of the process,
  // because opening the driver sets up its pinned pools (too slow to pay on every load).
  static std::shared_ptr<Session> shared(const Library& lib);

  bool compat_mode() const noexcept { return compat_mode_; }
  // "nvidia-fs 2.17" or "no nvidia-fs (compatibility mode)".
  std::string describe() const;

 private:
  const Library& lib_;
  DriverProperties props_{};
  bool compat_mode_ = true;
};

// A file opened with O_DIRECT and registered with cuFile (cuFileHandleRegister). Throws
// UnsupportedError naming the file and cuFile's (or open's) reason when either step fails.
class RegisteredFile {
 public:
  // Reopens the file `source` holds with O_DIRECT (never its path) and registers it.
  RegisteredFile(const Library& lib, std::shared_ptr<const FileHandle> source);
  const FileHandle& source() const noexcept { return *source_; }
  ~RegisteredFile();
  RegisteredFile(const RegisteredFile&) = delete;
  RegisteredFile& operator=(const RegisteredFile&) = delete;

  Handle handle() const noexcept { return handle_; }
  const std::string& path() const noexcept { return file_.path(); }

 private:
  const Library& lib_;
  std::shared_ptr<const FileHandle> source_;
  detail::PosixFile file_;  // outlives the registration (deregistered first, in ~RegisteredFile)
  Handle handle_ = nullptr;
};

// Device memory registered with cuFile (cuFileBufRegister): reads into it go straight to the
// GPU without cuFile's internal bounce buffers. Throws CudaError when registration fails.
class RegisteredBuffer {
 public:
  RegisteredBuffer(const Library& lib, const void* base, std::size_t bytes);
  ~RegisteredBuffer();
  RegisteredBuffer(const RegisteredBuffer&) = delete;
  RegisteredBuffer& operator=(const RegisteredBuffer&) = delete;

 private:
  const Library& lib_;
  const void* base_;
};

}  // namespace fst::cufile
