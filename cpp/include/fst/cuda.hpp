// What this machine offers for GPU loading, discovered at run time: fst links nothing from
// CUDA, it opens the driver (libcuda.so.1) and cuFile (libcufile.so.0) with dlopen.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "fst/convert.hpp"
#include "fst/dtype.hpp"
#include "fst/staging.hpp"

namespace fst {

struct CudaDriverInfo {
  bool available = false;
  std::string reason;  // why not, when unavailable
  int driver_version = 0;
  std::vector<std::string> devices;
};
CudaDriverInfo cuda_driver_info();

// Whether GPU Direct Storage can run here: the library loads, a CUDA device is present and the
// cuFile driver opens. `bundled_library` is the pip package's copy (nvidia-cufile), tried after
// $FST_CUFILE_LIBRARY and the soname.
struct CufileInfo {
  bool available = false;
  std::string reason;
  std::string library;       // the path or soname that loaded
  bool compat_mode = false;  // no nvidia-fs: cuFile reads through POSIX inside the library
  std::string driver;        // "nvidia-fs 2.17", or what compatibility mode means
};
CufileInfo cufile_info(const std::string& bundled_library = "");

// Converts `count` elements at device address `src` (dtype `from`) into `dst` (dtype `to`) on
// CUDA device `device` with the batched conversion kernel, `repeats` launches in a row on the
// legacy default stream (the one torch uses unless told otherwise), then waits for them, by
// the rules of `mode`. For kernel tests and benchmarks on memory a framework owns. Throws
// UnsupportedError for a pair the kernels do not convert, CudaError without CUDA or kernels.
void convert_on_device(int device, std::uint64_t src, Dtype from, std::uint64_t dst, Dtype to,
                       std::uint64_t count, unsigned repeats = 1,
                       ConvertMode mode = ConvertMode::kTorch);

// One copy of `bytes` bytes between device addresses.
struct DeviceMove {
  std::uint64_t src, dst, bytes;
};
// Runs the batched move kernel (the one that places GDS reads in aligned slots) over `moves`:
// `repeats` launches of one batch each, then waits. No destination may overlap another move's
// source or destination (a move with dst == src is skipped). For kernel tests and benchmarks.
void move_on_device(int device, const std::vector<DeviceMove>& moves, unsigned repeats = 1);

class GdsDevice;
// A staging sink whose destination is device memory of CUDA device `device` (its primary
// context, shared with torch and JAX); it converts dtypes with the embedded kernels. Throws
// CudaError when CUDA is unavailable (or, from allocate(), when the device is out of memory).
std::shared_ptr<StagingSink> make_cuda_sink(int device);

// The staging pools of the CUDA devices used so far (one per device, shared by every staged
// load to it; see StagingPool), by device ordinal.
std::vector<std::pair<int, StagingPool::Usage>> cuda_staging_usage();
// Frees every pooled pinned buffer (with its stream and event) that no load holds, on every
// device, once its copies have finished; later loads allocate anew. Returns the bytes freed.
std::uint64_t release_cuda_staging();

// The GPU Direct Storage device of a GdsLoad (see gds.hpp) on CUDA device `device`: cuFile reads
// into device memory, the embedded kernels align and convert. Throws UnsupportedError with the
// reason when cuFile is unusable (see cufile_info) or fst was built without its kernels.
std::shared_ptr<GdsDevice> make_cufile_device(int device, const std::string& bundled_library);

// The device of a GDS load: cuFile into CUDA device memory (device >= 0), or O_DIRECT reads
// into host memory with the host twins of the kernels (device < 0: checkable without a GPU).
std::shared_ptr<GdsDevice> make_gds_device(int device, const std::string& bundled_library);

// The sink of a staged load: CUDA device memory (device >= 0), or host memory through a host
// copy engine (device < 0: the same pipeline, checkable without a GPU). Host sinks that
// misbehave on purpose come from make_host_sink's test arguments.
std::shared_ptr<StagingSink> make_staging_sink(int device, std::uint64_t alignment);

}  // namespace fst
