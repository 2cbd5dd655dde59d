// The CUDA kernels' fatbins embedded in the extension (see CMakeLists.txt); empty when fst was
// built without nvcc.
#pragma once

#include <cstddef>

namespace fst::kernels {

struct FatbinImage {
  const char* name;  // the kernel file: "convert", "align"
  const unsigned char* begin;
  const unsigned char* end;
};

extern const FatbinImage kFatbins[];
extern const std::size_t kFatbinCount;

}  // namespace fst::kernels
