// Element-wise dtype conversion on the host, bit-identical to PyTorch's CPU `tensor.to()`
// (and to the CUDA kernels in cpp/kernels/convert.cu).
#pragma once

#include <cstddef>

#include "fst/dtype.hpp"

namespace fst {

// True for: any dtype to itself (a copy); every pair among F64, F32, F16, BF16, F8_E4M3 and
// F8_E5M2; F8_E8M0 to F16, BF16, F32 or F64.
bool conversion_supported(Dtype from, Dtype to) noexcept;

// Converts `count` elements from `src` (dtype `from`) to `dst` (dtype `to`). The buffers must
// not overlap; neither needs any alignment. For an identity conversion of a sub-byte dtype,
// ceil(count * bits / 8) bytes are copied. `threads` <= 1 runs on the calling thread; larger
// values split the work into that many contiguous pieces (fewer for small inputs).
// Throws fst::UnsupportedError when !conversion_supported(from, to).
void convert_host(const void* src, Dtype from, void* dst, Dtype to, std::size_t count,
                  unsigned threads);

}  // namespace fst
