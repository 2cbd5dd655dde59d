// Which device backend a staged or GDS load runs on: CUDA (device >= 0), or its host twin
// (device < 0), which runs the same pipeline on host memory so that it is checkable without
// a GPU.
#include "fst/cuda.hpp"
#include "fst/gds.hpp"
#include "fst/staging.hpp"

namespace fst {

std::shared_ptr<GdsDevice> make_gds_device(int device, const std::string& bundled_library) {
  return device < 0 ? make_host_gds_device() : make_cufile_device(device, bundled_library);
}

std::shared_ptr<StagingSink> make_staging_sink(int device, std::uint64_t alignment) {
  return device < 0 ? make_host_sink(alignment) : make_cuda_sink(device);
}

}  // namespace fst
