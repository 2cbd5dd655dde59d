// Export: DLPack tensors and capsules that own a reference to their memory, tensors exported
// as their bytes, and numpy arrays made in C++.
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>

#include "bindings.hpp"
#include "fst/errors.hpp"

namespace fst::bindings {

namespace {

// A capsule still carrying its original name was never consumed: free it here.
void destroy_versioned(PyObject* cap) {
  if (PyCapsule_IsValid(cap, "dltensor_versioned"))
    free_dlpack(PyCapsule_GetPointer(cap, "dltensor_versioned"), true);
}
void destroy_legacy(PyObject* cap) {
  if (PyCapsule_IsValid(cap, "dltensor")) free_dlpack(PyCapsule_GetPointer(cap, "dltensor"), false);
}

}  // namespace

std::vector<std::int64_t> signed_shape(const std::vector<std::uint64_t>& shape, const std::string& name) {
  for (std::uint64_t d : shape)
    if (d > static_cast<std::uint64_t>(INT64_MAX))
      throw UnsupportedError("tensor '" + name + "': dimension " + std::to_string(d) +
                             " is larger than frameworks allow (2^63 - 1)");
  return std::vector<std::int64_t>(shape.begin(), shape.end());
}

py::capsule DLPackTensor::dlpack(py::object stream, py::object max_version, py::object dl_device, py::object copy) {
  (void)stream;  // device data is complete before export: wait() synchronised every copy
  if (!copy.is_none() && copy.cast<bool>())
    throw py::value_error("fst tensors are exported without copies (copy=True is not supported)");
  if (!dl_device.is_none()) {
    auto dev = dl_device.cast<std::pair<int, int>>();
    if (dev.first != device_.type || dev.second != device_.id)
      throw py::buffer_error("fst cannot export to another device");
  }
  bool versioned = false;
  if (!max_version.is_none()) versioned = max_version.cast<std::pair<int, int>>().first >= 1;
  return capsule(item_, versioned);
}

py::capsule DLPackTensor::capsule(const ExportItem& item, bool versioned) {
  void* managed = make_dlpack(item.owner, item.data, item.dtype, item.shape, item.device, versioned);
  const char* name = versioned ? "dltensor_versioned" : "dltensor";
  PyObject* cap = PyCapsule_New(managed, name, versioned ? &destroy_versioned : &destroy_legacy);
  if (!cap) {
    free_dlpack(managed, versioned);
    throw py::error_already_set();
  }
  return py::reinterpret_steal<py::capsule>(cap);
}

py::tuple DLPackTensor::shape() const { return py::cast(item_.shape); }

ExportItem as_bytes(ExportItem item) {
  unsigned bits = dtype_bits(item.dtype);
  if (item.shape.empty()) {
    item.shape.push_back(static_cast<std::int64_t>(bits / 8));  // a 0-d tensor: its bytes
  } else {
    // In 128 bits: an empty tensor may have a last dimension near 2^63 (the format only bounds
    // the product of the dimensions).
    std::int64_t& last = item.shape.back();
    const unsigned __int128 last_bits = static_cast<unsigned __int128>(last) * bits;
    if (last_bits % 8 != 0)
      throw UnsupportedError(std::string(dtype_name(item.dtype)) +
                             " tensor whose last dimension does not fill whole bytes cannot be exported");
    if (last_bits / 8 > static_cast<unsigned __int128>(INT64_MAX))
      throw UnsupportedError(std::string(dtype_name(item.dtype)) + " tensor's last dimension is too large in bytes");
    last = static_cast<std::int64_t>(last_bits / 8);
  }
  item.dtype = Dtype::U8;
  return item;
}

py::capsule owner_capsule(const std::shared_ptr<const Buffer>& owner) {
  auto* keep = new std::shared_ptr<const Buffer>(owner);
  return py::capsule(keep, [](void* p) { delete static_cast<std::shared_ptr<const Buffer>*>(p); });
}

py::object numpy_array(const ExportItem& item, const py::list& dtypes, py::handle base,
                       const std::string& name) {
  py::object dt = dtypes[static_cast<std::size_t>(item.dtype)];
  if (dt.is_none())
    throw UnsupportedError("tensor '" + name + "': " + std::string(dtype_name(item.dtype)) + " has no numpy dtype" +
                           (item.dtype == Dtype::F4 ? " (use framework='torch')" : ""));
  std::vector<py::ssize_t> shape(item.shape.begin(), item.shape.end());
  // Row-major strides, computed here rather than by pybind11: an empty tensor may have other
  // dimensions so large that their product overflows, and any strides serve an empty array.
  py::dtype dtype = py::dtype::from_args(dt);
  std::vector<py::ssize_t> strides(shape.size(), dtype.itemsize());
  if (std::find(shape.begin(), shape.end(), 0) == shape.end())
    for (std::size_t i = shape.size(); i-- > 1;) strides[i - 1] = strides[i] * shape[i];
  return py::array(dtype, shape, strides, item.data, base);
}

void register_export(py::module_& m) {
  py::class_<DLPackTensor>(m, "DLPackTensor")
      .def("__dlpack__", &DLPackTensor::dlpack, py::kw_only(), py::arg("stream") = py::none(),
           py::arg("max_version") = py::none(), py::arg("dl_device") = py::none(),
           py::arg("copy") = py::none())
      .def("__dlpack_device__", &DLPackTensor::dlpack_device)
      .def_property_readonly("dtype", &DLPackTensor::dtype)
      .def_property_readonly("format_dtype", &DLPackTensor::format_dtype)
      .def_property_readonly("shape", &DLPackTensor::shape)
      .def_property_readonly("data_ptr", &DLPackTensor::data_ptr);
}

}  // namespace fst::bindings
