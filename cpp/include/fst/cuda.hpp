// What this machine offers for GPU loading, discovered at run time: fst links nothing from
// CUDA, it opens the driver (libcuda.so.1) and cuFile (libcufile.so.0) with dlopen.
#pragma once

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

}  // namespace fst
