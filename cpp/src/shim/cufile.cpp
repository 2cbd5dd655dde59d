// cuFile (GPU Direct Storage) discovery: the library is opened at run time only.
#include "fst/cuda.hpp"
#include "shim/dl_library.hpp"

namespace fst {

CufileInfo cufile_info() {
  CufileInfo info;
  shim::DlLibrary lib("libcufile.so.0");
  if (!lib.loaded()) {
    info.reason = "libcufile.so.0 not found: " + lib.error();
    return info;
  }
  if (!lib.symbol<void*>("cuFileDriverOpen")) {
    info.reason = "libcufile.so.0 lacks cuFileDriverOpen";
    return info;
  }
  info.library = "libcufile.so.0";
  CudaDriverInfo driver = cuda_driver_info();
  if (!driver.available) {
    info.reason = "cuFile needs a CUDA device: " + driver.reason;
    return info;
  }
  info.available = true;
  return info;
}

}  // namespace fst
