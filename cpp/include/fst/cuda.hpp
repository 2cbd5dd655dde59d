// What this machine offers for GPU loading, discovered at run time: fst links nothing from
// CUDA, it opens the driver (libcuda.so.1) and cuFile (libcufile.so.0) with dlopen.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace fst {

struct CudaDriverInfo {
  bool available = false;
  std::string reason;  // why not, when unavailable
  int driver_version = 0;
  std::vector<std::string> devices;
};
CudaDriverInfo cuda_driver_info();

struct CufileInfo {
  bool available = false;
  std::string reason;
  std::string library;  // the path or soname that loaded
};
CufileInfo cufile_info();

class StagingSink;
// A staging sink whose destination is device memory of CUDA device `device` (its primary
// context, shared with torch and JAX); it converts dtypes with the embedded kernels. Throws
// CudaError when CUDA is unavailable (or, from allocate(), when the device is out of memory).
std::unique_ptr<StagingSink> make_cuda_sink(int device);

}  // namespace fst
