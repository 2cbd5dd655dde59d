// Devices: the staging sinks and GDS devices loads run on (CUDA, or host twins checkable
// without a GPU), the process-wide pinned staging pools, host bytes staged onto a device, and
// what the run time offers (driver, cuFile, O_DIRECT, the embedded kernels).
#include <pybind11/stl.h>

#include <cstring>

#include "bindings.hpp"
#include "detail/fatbin.hpp"
#include "fst/cuda.hpp"
#include "fst/reader.hpp"

namespace fst::bindings {

namespace {

void register_devices(py::module_& m) {
  // What several staged loads use one after another (the groups of a stream), one load at a
  // time: on a CUDA device, its device scratch memory (the pinned buffers come from the
  // device's process-wide pool either way); on the host (device -1), a pool of its own.
  py::class_<StagingSink, std::shared_ptr<StagingSink>>(m, "StagingSink")
      .def(py::init([](int device, std::uint64_t alignment) {
             py::gil_scoped_release release;
             return make_staging_sink(device, alignment);
           }),
           py::arg("device"), py::arg("alignment") = 256)
      // Pinned buffers its pool has allocated so far (a buffer handed out again is not counted
      // twice).
      .def_property_readonly("buffers_allocated", [](StagingSink& s) { return s.pool().usage().allocations; })
      .def_property_readonly("pinned_bytes", [](StagingSink& s) { return s.pool().usage().pinned_bytes; });

  // What GDS loads run one after another (the groups of a stream) share: registered files, the
  // registered bulk buffer, task lists. One load at a time.
  py::class_<GdsDevice, std::shared_ptr<GdsDevice>>(m, "GdsDevice")
      .def(py::init([](int device, const std::string& bundled_library) {
             py::gil_scoped_release release;
             return make_gds_device(device, bundled_library);
           }),
           py::arg("device"), py::arg("bundled_library") = "")
      .def_property_readonly("bulk_allocations", &GdsDevice::bulk_allocations);
}

void register_staging_pool(py::module_& m) {
  // Host bytes (any contiguous buffer) onto CUDA device `device` (or, device = -1, into host
  // memory through the host sink) through the pinned staging pool: one U8 tensor.
  m.def("stage_to_device", [](int device, py::buffer data, std::uint64_t budget, std::uint64_t buffer_bytes) {
    py::buffer_info info = data.request();
    if (!PyBuffer_IsContiguous(info.view(), 'C')) throw py::value_error("stage_to_device needs a contiguous buffer");
    const auto bytes = static_cast<std::uint64_t>(info.size * info.itemsize);
    StagingOptions opt;
    opt.budget = budget;
    opt.buffer_bytes = buffer_bytes;
    std::shared_ptr<StagingSink> sink;
    std::shared_ptr<Buffer> arena;
    {
      py::gil_scoped_release release;  // `info` keeps the buffer alive and unchanged in size
      sink = make_staging_sink(device, 256);
      arena = stage_host_bytes(*sink, static_cast<const std::byte*>(info.ptr), bytes, opt);
      sink.reset();
    }
    ExportItem item{arena, arena->data(), Dtype::U8, {static_cast<std::int64_t>(bytes)}, Dtype::U8, ExportDevice{}};
    if (device >= 0) item.device = ExportDevice{ExportDevice::kCUDA, device};
    return DLPackTensor(std::move(item));
  }, py::arg("device"), py::arg("data"), py::arg("budget") = StagingOptions{}.budget,
     py::arg("buffer_bytes") = StagingOptions{}.buffer_bytes);
  // The process-wide staging pools of the CUDA devices used so far.
  m.def("staging_usage", [] {
    py::list out;
    for (const auto& [device, u] : cuda_staging_usage()) {
      py::dict d;
      d["device"] = device;
      d["budget"] = u.budget;
      d["pinned_bytes"] = u.pinned_bytes;
      d["buffers"] = u.buffers;
      d["in_use"] = u.in_use;
      d["allocations"] = u.allocations;
      out.append(d);
    }
    return out;
  });
  m.def("release_staging", [] {
    py::gil_scoped_release release;
    return release_cuda_staging();
  });
}

void register_runtime_info(py::module_& m) {
#ifdef FST_HAVE_KERNELS
  m.attr("HAVE_KERNELS") = true;
#else
  m.attr("HAVE_KERNELS") = false;
#endif
  m.def("kernel_images", [] {
    py::list out;  // (kernel file, fatbin bytes) embedded in this build
    for (std::size_t i = 0; i < kernels::kFatbinCount; ++i) {
      const auto& img = kernels::kFatbins[i];
      out.append(py::make_tuple(img.name, py::bytes(reinterpret_cast<const char*>(img.begin),
                                                    static_cast<std::size_t>(img.end - img.begin))));
    }
    return out;
  });
  m.def("cuda_driver_info", [] {
    CudaDriverInfo i = cuda_driver_info();
    py::dict d;
    d["available"] = i.available;
    d["reason"] = i.reason;
    d["driver_version"] = i.driver_version;
    d["devices"] = i.devices;
    return d;
  });
  m.def("cufile_info", [](const std::string& bundled_library) {
    CufileInfo i;
    {
      py::gil_scoped_release release;  // the first call opens the cuFile driver
      i = cufile_info(bundled_library);
    }
    py::dict d;
    d["available"] = i.available;
    d["reason"] = i.reason;
    d["library"] = i.library;
    d["compat_mode"] = i.compat_mode;
    d["driver"] = i.driver;
    return d;
  }, py::arg("bundled_library") = "");
  m.def("direct_io_supported", [](const std::string& path) {
    int err = 0;
    bool ok = direct_io_supported(path, err);
    return py::make_tuple(ok, ok ? std::string() : std::string(std::strerror(err)));
  });
}

}  // namespace

void register_device(py::module_& m) {
  register_devices(m);
  register_staging_pool(m);
  register_runtime_info(m);
}

}  // namespace fst::bindings
