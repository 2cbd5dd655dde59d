// The DLPack data-exchange ABI (version 1.x), declared from its published specification so
// fst can hand tensors to any framework without depending on one.
#pragma once

#include <cstdint>

namespace fst::dlpack {

enum DeviceType : std::int32_t { kCPU = 1, kCUDA = 2, kCUDAHost = 3 };

enum TypeCode : std::uint8_t {
  kInt = 0, kUInt = 1, kFloat = 2, kBfloat = 4, kComplex = 5, kBool = 6,
  kFloat8_e4m3fn = 10, kFloat8_e4m3fnuz = 11, kFloat8_e5m2 = 12, kFloat8_e5m2fnuz = 13,
  kFloat8_e8m0fnu = 14, kFloat6_e2m3fn = 15, kFloat6_e3m2fn = 16, kFloat4_e2m1fn = 17,
};

struct Device { std::int32_t device_type; std::int32_t device_id; };
struct DataType { std::uint8_t code; std::uint8_t bits; std::uint16_t lanes; };

struct Tensor {
  void* data;
  Device device;
  std::int32_t ndim;
  DataType dtype;
  std::int64_t* shape;
  std::int64_t* strides;  // nullptr: compact, row-major
  std::uint64_t byte_offset;
};

// Legacy (unversioned) managed tensor, capsule name "dltensor".
struct ManagedTensor {
  Tensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(ManagedTensor*);
};

struct Version { std::uint32_t major; std::uint32_t minor; };
inline constexpr Version kVersion{1, 1};
inline constexpr std::uint64_t kFlagReadOnly = 1ull << 0;

// Versioned managed tensor, capsule name "dltensor_versioned".
struct ManagedTensorVersioned {
  Version version;
  void* manager_ctx;
  void (*deleter)(ManagedTensorVersioned*);
  std::uint64_t flags;
  Tensor dl_tensor;
};

}  // namespace fst::dlpack
