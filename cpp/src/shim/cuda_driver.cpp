// Opens the CUDA driver at run time. Only this file and cuda_api.hpp know its entry points.
#include <mutex>
#include <vector>

#include "fst/cuda.hpp"
#include "fst/errors.hpp"
#include "shim/cuda_api.hpp"
#include "shim/dl_library.hpp"

namespace fst {
namespace cuda {

namespace {

// The driver version whose entry-point variants fst asks for (CUDA 12.0: cuMemAlloc_v2, ...).
constexpr int kRequestedVersion = 12000;

using GetProcV2 = CUresult (*)(const char*, void**, int, std::uint64_t, int*);
using GetProcV1 = CUresult (*)(const char*, void**, int, std::uint64_t);

// "no CUDA-capable device is detected (CUresult 100)", from the driver `d` itself: used while
// Driver::get() is still building `d`, where calling it again would wait for itself forever.
std::string describe(const Driver& d, CUresult r) {
  const char* text = nullptr;
  if (d.cuGetErrorString) d.cuGetErrorString(r, &text);
  return std::string(text ? text : "unknown CUDA error") + " (CUresult " + std::to_string(r) + ")";
}

void load(Driver& d) {
  // Never closed: contexts, streams and memory of the driver live until the process ends, and
  // destructors of other statics may still call into it at exit.
  static const auto* lib = new shim::DlLibrary("libcuda.so.1");
  if (!lib->loaded()) {
    d.reason = "no CUDA driver: " + lib->error();
    return;
  }
  auto v2 = lib->symbol<GetProcV2>("cuGetProcAddress_v2");
  auto v1 = lib->symbol<GetProcV1>("cuGetProcAddress");
  if (!v2 && !v1) {
    d.reason = "the CUDA driver is too old: it has no cuGetProcAddress (needs 11.3 or newer)";
    return;
  }
  std::string missing;
  auto get = [&](const char* name, auto& fn) {
    void* p = nullptr;
    int status = 0;
    CUresult r = v2 ? v2(name, &p, kRequestedVersion, 0, &status) : v1(name, &p, kRequestedVersion, 0);
    if (r != kSuccess || !p) missing += std::string(missing.empty() ? "" : ", ") + name;
    fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(p);
  };
  get("cuInit", d.cuInit);
  get("cuDriverGetVersion", d.cuDriverGetVersion);
  get("cuDeviceGetCount", d.cuDeviceGetCount);
  get("cuDeviceGet", d.cuDeviceGet);
  get("cuDeviceGetName", d.cuDeviceGetName);
  get("cuDeviceGetAttribute", d.cuDeviceGetAttribute);
  get("cuDevicePrimaryCtxRetain", d.cuDevicePrimaryCtxRetain);
  get("cuCtxGetCurrent", d.cuCtxGetCurrent);
  get("cuCtxSetCurrent", d.cuCtxSetCurrent);
  get("cuCtxSynchronize", d.cuCtxSynchronize);
  get("cuMemAlloc", d.cuMemAlloc);
  get("cuMemFree", d.cuMemFree);
  get("cuMemGetInfo", d.cuMemGetInfo);
  get("cuMemHostAlloc", d.cuMemHostAlloc);
  get("cuMemFreeHost", d.cuMemFreeHost);
  get("cuMemcpyHtoDAsync", d.cuMemcpyHtoDAsync);
  get("cuStreamCreate", d.cuStreamCreate);
  get("cuStreamDestroy", d.cuStreamDestroy);
  get("cuStreamSynchronize", d.cuStreamSynchronize);
  get("cuEventCreate", d.cuEventCreate);
  get("cuEventDestroy", d.cuEventDestroy);
  get("cuEventRecord", d.cuEventRecord);
  get("cuEventQuery", d.cuEventQuery);
  get("cuEventSynchronize", d.cuEventSynchronize);
  get("cuModuleLoadData", d.cuModuleLoadData);
  get("cuModuleGetFunction", d.cuModuleGetFunction);
  get("cuLaunchKernel", d.cuLaunchKernel);
  get("cuGetErrorString", d.cuGetErrorString);
  if (!missing.empty()) {
    d.reason = "the CUDA driver lacks entry points: " + missing;
    return;
  }
  if (CUresult r = d.cuInit(0); r != kSuccess) {
    d.reason = "cuInit failed: " + describe(d, r);
    return;
  }
  d.cuDriverGetVersion(&d.version);
  int n = 0;
  if (d.cuDeviceGetCount(&n) != kSuccess || n == 0) {
    d.reason = "the CUDA driver reports no devices";
    return;
  }
  d.available = true;
}

std::mutex g_ctx_mu;
std::vector<CUcontext> g_primary;  // retained primary contexts by device ordinal

CUcontext primary_context(int device) {
  const Driver& d = Driver::get();
  std::lock_guard<std::mutex> lock(g_ctx_mu);
  if (device < 0) throw CudaError("invalid CUDA device ordinal " + std::to_string(device));
  if (g_primary.size() <= static_cast<std::size_t>(device)) g_primary.resize(device + 1, nullptr);
  if (!g_primary[device]) {
    CUdevice dev;
    check(d.cuDeviceGet(&dev, device), "cuDeviceGet");
    // Retained for the life of the process: it is the context the frameworks share.
    check(d.cuDevicePrimaryCtxRetain(&g_primary[device], dev), "cuDevicePrimaryCtxRetain");
  }
  return g_primary[device];
}

}  // namespace

const Driver& Driver::get() {
  static Driver driver = [] {
    Driver d{};
    load(d);
    return d;
  }();
  return driver;
}

std::string error_string(CUresult r) { return describe(Driver::get(), r); }

void check(CUresult r, const char* what) {
  if (r != kSuccess) throw CudaError(std::string(what) + ": " + error_string(r));
}

void make_current(int device) {
  const Driver& d = Driver::get();
  if (!d.available) throw CudaError("CUDA is not available: " + d.reason);
  CUcontext ctx = primary_context(device), now = nullptr;
  check(d.cuCtxGetCurrent(&now), "cuCtxGetCurrent");
  if (now != ctx) check(d.cuCtxSetCurrent(ctx), "cuCtxSetCurrent");
}

ScopedDevice::ScopedDevice(int device) {
  const Driver& d = Driver::get();
  if (!d.available) throw CudaError("CUDA is not available: " + d.reason);
  CUcontext ctx = primary_context(device);
  check(d.cuCtxGetCurrent(&previous_), "cuCtxGetCurrent");
  if (previous_ != ctx) check(d.cuCtxSetCurrent(ctx), "cuCtxSetCurrent");
}

ScopedDevice::~ScopedDevice() {
  const Driver& d = Driver::get();
  CUcontext now = nullptr;
  d.cuCtxGetCurrent(&now);
  if (now != previous_) d.cuCtxSetCurrent(previous_);
}

}  // namespace cuda

CudaDriverInfo cuda_driver_info() {
  const cuda::Driver& d = cuda::Driver::get();
  CudaDriverInfo info;
  info.available = d.available;
  info.reason = d.reason;
  info.driver_version = d.version;
  if (!d.available) return info;
  int n = 0;
  d.cuDeviceGetCount(&n);
  for (int i = 0; i < n; ++i) {
    cuda::CUdevice dev;
    char buf[256] = {0};
    if (d.cuDeviceGet(&dev, i) == cuda::kSuccess && d.cuDeviceGetName(buf, sizeof buf - 1, dev) == cuda::kSuccess)
      info.devices.emplace_back(buf);
  }
  return info;
}

}  // namespace fst
