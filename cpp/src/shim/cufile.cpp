// cuFile (GPU Direct Storage), opened at run time: the library, the driver session, registered
// files and buffers, and the probe behind cufile_info(). Only this file and cufile_api.hpp know
// cuFile's entry points.
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <type_traits>
#include <vector>

#include "fst/cuda.hpp"
#include "fst/errors.hpp"
#include "shim/cufile_api.hpp"
#include "shim/dl_library.hpp"

namespace fst {
namespace cufile {

namespace {

// Resolves every entry point from `lib`; returns the names that are missing.
std::string resolve(const shim::DlLibrary& lib, Library& out) {
  std::string missing;
  auto get = [&](const char* name, auto& fn) {
    fn = lib.symbol<std::remove_reference_t<decltype(fn)>>(name);
    if (!fn) missing += std::string(missing.empty() ? "" : ", ") + name;
  };
  get("cuFileDriverOpen", out.cuFileDriverOpen);
  // cufile.h maps cuFileDriverClose to cuFileDriverClose_v2 since CUDA 12.x; older
  // libraries have only the first.
  out.cuFileDriverClose = lib.symbol<decltype(out.cuFileDriverClose)>("cuFileDriverClose_v2");
  if (!out.cuFileDriverClose) get("cuFileDriverClose", out.cuFileDriverClose);
  get("cuFileDriverGetProperties", out.cuFileDriverGetProperties);
  get("cuFileHandleRegister", out.cuFileHandleRegister);
  get("cuFileHandleDeregister", out.cuFileHandleDeregister);
  get("cuFileBufRegister", out.cuFileBufRegister);
  get("cuFileBufDeregister", out.cuFileBufDeregister);
  get("cuFileRead", out.cuFileRead);
  return missing;
}

std::mutex g_library_mu;

}  // namespace

const Library& Library::get(const std::string& bundled) {
  static Library library{};
  std::lock_guard<std::mutex> lock(g_library_mu);
  if (library.loaded) return library;
  std::vector<std::string> candidates;
  if (const char* env = std::getenv("FST_CUFILE_LIBRARY"); env && *env) candidates.emplace_back(env);
  candidates.emplace_back("libcufile.so.0");
  if (!bundled.empty()) candidates.push_back(bundled);
  std::string tried;
  for (const std::string& name : candidates) {
    auto lib = std::make_unique<shim::DlLibrary>(name.c_str());
    std::string why;
    if (!lib->loaded()) {
      why = lib->error();
    } else {
      Library found{};
      std::string missing = resolve(*lib, found);
      if (missing.empty()) {
        found.loaded = true;
        found.path = name;
        library = found;
        // Deliberately never closed: the driver session and registrations of the loads live
        // until the process ends.
        lib.release();
        return library;
      }
      why = name + " lacks " + missing;
    }
    tried += std::string(tried.empty() ? "" : "; ") + why;
  }
  library.reason = "libcufile.so.0 not found (tried " + std::to_string(candidates.size()) + ": " + tried + ")";
  return library;
}

std::string status_text(Status s) {
  const char* what = nullptr;
  switch (s.err) {
    case kSuccess: what = "success"; break;
    case kErrorBase + 1: what = "the nvidia-fs driver is not loaded and compatibility mode is off"; break;
    case kErrorBase + 4: what = "nvidia-fs driver version mismatch"; break;
    case kErrorBase + 7: what = "GPU Direct Storage is not supported on this platform"; break;
    case kErrorBase + 8: what = "GPU Direct Storage is not supported for this file (its file system)"; break;
    case kErrorBase + 9: what = "GPU Direct Storage is not supported on this GPU"; break;
    case kErrorBase + 10: what = "nvidia-fs driver ioctl error"; break;
    case kCudaDriverError: what = "CUDA driver error"; break;
    case kErrorBase + 12: what = "invalid device pointer"; break;
    case kErrorBase + 16: what = "the buffer exceeds the GPU memory cuFile may pin (BAR1 space)"; break;
    case kErrorBase + 18: what = "unsupported file type"; break;
    case kErrorBase + 19: what = "unsupported file open flags"; break;
    case kErrorBase + 20: what = "the file is not opened with O_DIRECT"; break;
    case kErrorBase + 22: what = "invalid arguments"; break;
    case kErrorBase + 23: what = "device memory already registered"; break;
    case kErrorBase + 25: what = "permission denied (driver or file)"; break;
    case kErrorBase + 29: what = "GPU not found"; break;
    case kErrorBase + 30: what = "cuFile internal error"; break;
    case kErrorBase + 34: what = "GPU Direct Storage is disabled for this file by cufile.json"; break;
    case kErrorBase + 36: what = "pinning GPU memory failed"; break;
    default: break;
  }
  std::string text = what ? what : "cuFile error";
  if (s.err > 0 && s.err < kErrorBase) text = std::strerror(s.err);  // some calls report an errno
  text += " (cuFile error " + std::to_string(s.err);
  if (s.err == kCudaDriverError) text += ", CUresult " + std::to_string(s.cu_err);
  return text + ")";
}

Session::Session(const Library& lib) : lib_(lib) {
  if (Status s = lib_.cuFileDriverOpen(); s.err != kSuccess)
    throw UnsupportedError("cuFileDriverOpen failed: " + status_text(s));
  // Unknown fields stay zero: that reads as compatibility mode, the cautious answer.
  if (lib_.cuFileDriverGetProperties(&props_).err == kSuccess)
    compat_mode_ = props_.nvfs.major_version == 0 && props_.nvfs.minor_version == 0;
}

Session::~Session() { lib_.cuFileDriverClose(); }

namespace {
std::mutex g_session_mu;
// Never destroyed, so never closed at exit: static destructors run after libcufile's own
// teardown and CUDA's, and cuFileDriverClose then would call into freed state (a crash at
// exit that other GDS users have hit). The process's end releases the driver.
auto* const g_session = new std::shared_ptr<Session>();
}  // namespace

std::shared_ptr<Session> Session::shared(const Library& lib) {
  std::lock_guard<std::mutex> lock(g_session_mu);
  if (!*g_session) *g_session = std::make_shared<Session>(lib);
  return *g_session;
}


std::string Session::describe() const {
  if (compat_mode_) return "no nvidia-fs driver: cuFile compatibility mode (POSIX reads inside cuFile)";
  return "nvidia-fs " + std::to_string(props_.nvfs.major_version) + "." + std::to_string(props_.nvfs.minor_version);
}

RegisteredFile::RegisteredFile(const Library& lib, std::shared_ptr<const FileHandle> source)
    : lib_(lib), source_(std::move(source)) {
  const std::string& path = source_->path();
  int err = 0;
  file_ = detail::PosixFile::try_reopen(*source_, O_RDONLY | O_DIRECT, err);
  if (!file_.valid()) {
    if (err == EINVAL)
      throw UnsupportedError("'" + path + "': the file system does not support O_DIRECT, which cuFile needs");
    throw IoError(err, "open (O_DIRECT)", path);
  }
  Descriptor descr{};
  descr.type = kHandleTypeOpaqueFd;
  descr.handle.fd = file_.fd();
  if (Status s = lib_.cuFileHandleRegister(&handle_, &descr); s.err != kSuccess)
    throw UnsupportedError("'" + path + "': cuFileHandleRegister failed: " + status_text(s));
}

RegisteredFile::~RegisteredFile() { lib_.cuFileHandleDeregister(handle_); }

RegisteredBuffer::RegisteredBuffer(const Library& lib, const void* base, std::size_t bytes)
    : lib_(lib), base_(base) {
  if (Status s = lib_.cuFileBufRegister(base, bytes, 0); s.err != kSuccess)
    throw CudaError("cuFileBufRegister of " + std::to_string(bytes) + " bytes failed: " + status_text(s));
}

RegisteredBuffer::~RegisteredBuffer() { lib_.cuFileBufDeregister(base_); }

}  // namespace cufile

CufileInfo cufile_info(const std::string& bundled_library) {
  // Once the library is loaded the answer cannot change within the process: ask once.
  static std::mutex mu;
  static std::optional<CufileInfo> probed;
  std::lock_guard<std::mutex> lock(mu);
  if (probed) return *probed;
  CufileInfo info;
  const cufile::Library& lib = cufile::Library::get(bundled_library);
  if (!lib.loaded) {
    info.reason = lib.reason;
    return info;
  }
  info.library = lib.path;
  // Without a CUDA device cuFileDriverOpen does not fail: it hangs (seen with libcufile 1.15
  // and no libcuda.so.1), so the driver is never opened then.
  CudaDriverInfo driver = cuda_driver_info();
  if (!driver.available) {
    info.reason = "cuFile needs a CUDA device: " + driver.reason;
  } else {
    try {
      // The session the GDS loads use, opened here if none is yet and kept: opening the driver
      // is slow, and a load after this question must not pay for it a second time.
      const std::shared_ptr<cufile::Session> s = cufile::Session::shared(lib);
      info.available = true;
      info.compat_mode = s->compat_mode();
      info.driver = s->describe();
    } catch (const Error& e) {
      info.reason = e.what();
    }
  }
  probed = info;
  return info;
}

}  // namespace fst
