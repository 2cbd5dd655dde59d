// The CUDA driver API as fst uses it, opened at run time: libcuda.so.1 is dlopen'ed and every
// entry point comes from cuGetProcAddress, so fst builds without CUDA headers and imports on
// machines without a driver. Types and signatures follow the driver API's documented C ABI.
// This header is the only place (with cuda_driver.cpp) that knows them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace fst::cuda {

using CUresult = int;
using CUdevice = int;
using CUdeviceptr = std::uint64_t;
using CUcontext = struct CUctx_st*;
using CUstream = struct CUstream_st*;
using CUevent = struct CUevent_st*;
using CUmodule = struct CUmod_st*;
using CUfunction = struct CUfunc_st*;

inline constexpr CUresult kSuccess = 0;
inline constexpr CUresult kErrorNotReady = 600;
inline constexpr CUresult kErrorOutOfMemory = 2;
inline constexpr CUresult kErrorDeinitialized = 4;
inline constexpr unsigned kMemHostAllocPortable = 0x01;
inline constexpr unsigned kStreamNonBlocking = 0x1;
inline constexpr unsigned kEventBlockingSync = 0x1;  // waiting threads sleep instead of spinning
inline constexpr unsigned kEventDisableTiming = 0x2;
inline constexpr int kAttrMultiprocessorCount = 16;

// The entry points, filled by Driver::get(); null when the driver is absent.
struct Driver {
  CUresult (*cuInit)(unsigned);
  CUresult (*cuDriverGetVersion)(int*);
  CUresult (*cuDeviceGetCount)(int*);
  CUresult (*cuDeviceGet)(CUdevice*, int);
  CUresult (*cuDeviceGetName)(char*, int, CUdevice);
  CUresult (*cuDeviceGetAttribute)(int*, int, CUdevice);
  CUresult (*cuDevicePrimaryCtxRetain)(CUcontext*, CUdevice);
  CUresult (*cuCtxGetCurrent)(CUcontext*);
  CUresult (*cuCtxSetCurrent)(CUcontext);
  CUresult (*cuCtxSynchronize)();
  CUresult (*cuMemAlloc)(CUdeviceptr*, std::size_t);
  CUresult (*cuMemFree)(CUdeviceptr);
  CUresult (*cuMemGetInfo)(std::size_t*, std::size_t*);
  CUresult (*cuMemHostAlloc)(void**, std::size_t, unsigned);
  CUresult (*cuMemFreeHost)(void*);
  CUresult (*cuMemcpyHtoDAsync)(CUdeviceptr, const void*, std::size_t, CUstream);
  CUresult (*cuStreamCreate)(CUstream*, unsigned);
  CUresult (*cuStreamDestroy)(CUstream);
  CUresult (*cuStreamSynchronize)(CUstream);
  CUresult (*cuEventCreate)(CUevent*, unsigned);
  CUresult (*cuEventDestroy)(CUevent);
  CUresult (*cuEventRecord)(CUevent, CUstream);
  CUresult (*cuEventQuery)(CUevent);
  CUresult (*cuEventSynchronize)(CUevent);
  CUresult (*cuModuleLoadData)(CUmodule*, const void*);
  CUresult (*cuModuleGetFunction)(CUfunction*, CUmodule, const char*);
  CUresult (*cuLaunchKernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                             unsigned, CUstream, void**, void**);
  CUresult (*cuGetErrorString)(CUresult, const char**);

  bool available = false;
  std::string reason;   // why not, when unavailable
  int version = 0;      // cuDriverGetVersion

  // The process-wide driver, opened and initialised on first use (thread-safe).
  static const Driver& get();
};

// Throws fst::CudaError ("<what>: <driver message> (CUresult N)") unless r is kSuccess.
void check(CUresult r, const char* what);
std::string error_string(CUresult r);

// Makes the primary context of `device` current on the calling thread, for threads fst owns.
void make_current(int device);

// Makes the primary context of `device` current on the calling thread for its lifetime, and
// restores the previous one after (the context torch and JAX use, so memory is shared).
class ScopedDevice {
 public:
  explicit ScopedDevice(int device);
  ~ScopedDevice();
  ScopedDevice(const ScopedDevice&) = delete;
  ScopedDevice& operator=(const ScopedDevice&) = delete;

 private:
  CUcontext previous_ = nullptr;
};

}  // namespace fst::cuda
