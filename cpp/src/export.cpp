#include "fst/export.hpp"

#include "detail/dlpack_abi.hpp"

namespace fst {

namespace {

dlpack::DataType dlpack_dtype(Dtype d) {
  using namespace dlpack;
  const std::uint8_t bits = static_cast<std::uint8_t>(dtype_bits(d));
  switch (d) {
    case Dtype::BOOL: return {kBool, 8, 1};
    case Dtype::U8: case Dtype::U16: case Dtype::U32: case Dtype::U64: return {kUInt, bits, 1};
    case Dtype::I8: case Dtype::I16: case Dtype::I32: case Dtype::I64: return {kInt, bits, 1};
    case Dtype::F16: case Dtype::F32: case Dtype::F64: return {kFloat, bits, 1};
    case Dtype::BF16: return {kBfloat, 16, 1};
    case Dtype::C64: return {kComplex, 64, 1};
    case Dtype::F8_E4M3: return {kFloat8_e4m3fn, 8, 1};
    case Dtype::F8_E5M2: return {kFloat8_e5m2, 8, 1};
    case Dtype::F8_E8M0: return {kFloat8_e8m0fnu, 8, 1};
    case Dtype::F8_E4M3FNUZ: return {kFloat8_e4m3fnuz, 8, 1};
    case Dtype::F8_E5M2FNUZ: return {kFloat8_e5m2fnuz, 8, 1};
    case Dtype::F6_E2M3: return {kFloat6_e2m3fn, 6, 1};
    case Dtype::F6_E3M2: return {kFloat6_e3m2fn, 6, 1};
    case Dtype::F4: return {kFloat4_e2m1fn, 4, 1};
  }
  return {kUInt, 8, 1};
}

// Everything a managed tensor needs to stay valid, in one allocation.
template <class Managed>
struct Holder {
  Managed managed{};
  std::shared_ptr<const Buffer> owner;
  std::vector<std::int64_t> shape;
  std::int64_t scalar_shape = 1;  // some consumers read shape[0] even for 0-d tensors
};

template <class Managed>
void delete_holder(Managed* m) {
  delete static_cast<Holder<Managed>*>(m->manager_ctx);
}

template <class Managed>
Managed* build(std::shared_ptr<const Buffer> owner, void* data, Dtype dtype,
               const std::vector<std::int64_t>& shape, ExportDevice device) {
  auto* h = new Holder<Managed>();
  h->owner = std::move(owner);
  h->shape = shape;
  dlpack::Tensor& t = h->managed.dl_tensor;
  t.data = data;
  t.device = {device.type, device.id};
  t.ndim = static_cast<std::int32_t>(shape.size());
  t.dtype = dlpack_dtype(dtype);
  t.shape = h->shape.empty() ? &h->scalar_shape : h->shape.data();
  t.strides = nullptr;
  t.byte_offset = 0;
  h->managed.manager_ctx = h;
  h->managed.deleter = &delete_holder<Managed>;
  return &h->managed;
}

}  // namespace

void* make_dlpack(std::shared_ptr<const Buffer> owner, void* data, Dtype dtype,
                  const std::vector<std::int64_t>& shape, ExportDevice device, bool versioned) {
  if (versioned) {
    auto* m = build<dlpack::ManagedTensorVersioned>(std::move(owner), data, dtype, shape, device);
    m->version = dlpack::kVersion;
    m->flags = 0;
    return m;
  }
  return build<dlpack::ManagedTensor>(std::move(owner), data, dtype, shape, device);
}

void free_dlpack(void* managed, bool versioned) noexcept {
  if (versioned) {
    auto* m = static_cast<dlpack::ManagedTensorVersioned*>(managed);
    if (m->deleter) m->deleter(m);
  } else {
    auto* m = static_cast<dlpack::ManagedTensor*>(managed);
    if (m->deleter) m->deleter(m);
  }
}

}  // namespace fst
