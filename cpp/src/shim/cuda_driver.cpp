// The only place that knows the CUDA driver API's entry points (declared here by their
// documented C signatures; no CUDA header is needed to build fst).
#include "fst/cuda.hpp"
#include "shim/dl_library.hpp"

namespace fst {

namespace {
using CUresult = int;
using CUdevice = int;
using cuInit_t = CUresult (*)(unsigned);
using cuDriverGetVersion_t = CUresult (*)(int*);
using cuDeviceGetCount_t = CUresult (*)(int*);
using cuDeviceGet_t = CUresult (*)(CUdevice*, int);
using cuDeviceGetName_t = CUresult (*)(char*, int, CUdevice);
}  // namespace

CudaDriverInfo cuda_driver_info() {
  CudaDriverInfo info;
  shim::DlLibrary lib("libcuda.so.1");
  if (!lib.loaded()) {
    info.reason = "no CUDA driver: " + lib.error();
    return info;
  }
  auto init = lib.symbol<cuInit_t>("cuInit");
  auto version = lib.symbol<cuDriverGetVersion_t>("cuDriverGetVersion");
  auto count = lib.symbol<cuDeviceGetCount_t>("cuDeviceGetCount");
  auto get = lib.symbol<cuDeviceGet_t>("cuDeviceGet");
  auto name = lib.symbol<cuDeviceGetName_t>("cuDeviceGetName");
  if (!init || !version || !count || !get || !name) {
    info.reason = "libcuda.so.1 lacks the driver API entry points fst needs";
    return info;
  }
  if (CUresult r = init(0); r != 0) {
    info.reason = "cuInit failed with CUresult " + std::to_string(r);
    return info;
  }
  version(&info.driver_version);
  int n = 0;
  count(&n);
  for (int i = 0; i < n; ++i) {
    CUdevice dev;
    char buf[256] = {0};
    if (get(&dev, i) == 0 && name(buf, sizeof buf - 1, dev) == 0) info.devices.emplace_back(buf);
  }
  info.available = !info.devices.empty();
  if (!info.available) info.reason = "the CUDA driver reports no devices";
  return info;
}

}  // namespace fst
