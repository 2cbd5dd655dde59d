// Export: a tensor as a DLPack managed tensor that owns a reference to its memory.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "fst/buffer.hpp"
#include "fst/dtype.hpp"

namespace fst {

struct ExportDevice {
  static constexpr std::int32_t kCPU = 1, kCUDA = 2;  // DLPack device types
  std::int32_t type = kCPU;
  std::int32_t id = 0;
};

// What a consumer receives: the pointer it must pass to the matching deleter when done.
// `versioned` selects DLPack 1.x (ManagedTensorVersioned) or the legacy struct.
void* make_dlpack(std::shared_ptr<const Buffer> owner, void* data, Dtype dtype,
                  const std::vector<std::int64_t>& shape, ExportDevice device, bool versioned);
// Frees a managed tensor made by make_dlpack that no consumer took.
void free_dlpack(void* managed, bool versioned) noexcept;

}  // namespace fst
