// Load: the three loads a Selection starts (host reads, staged copies, GDS), the pending load
// that waits with the GIL released, and the loaded tensors with their stats and export calls.
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <atomic>
#include <functional>
#include <optional>

#include "bindings.hpp"
#include "fst/cuda.hpp"
#include "fst/errors.hpp"
#include "fst/file_handle.hpp"
#include "fst/read_into.hpp"
#include "fst/thread_pool.hpp"

namespace fst::bindings {

namespace {

// What a wait with the GIL released calls every 100 ms: handles Ctrl-C and reports progress
// (done, total) to a Python callable. A Python exception raised there cancels the work and is
// rethrown as itself once the workers are idle.
struct PythonTick {
  py::object progress;
  std::function<std::pair<std::uint64_t, std::uint64_t>()> counts;
  std::optional<py::error_already_set> py_error;

  bool operator()() {
    py::gil_scoped_acquire gil;
    if (PyErr_CheckSignals() != 0) {
      py_error.emplace();
      return false;
    }
    if (!progress.is_none()) {
      try {
        auto [done, total] = counts();
        progress(done, total);
      } catch (py::error_already_set& e) {
        py_error.emplace(std::move(e));
        return false;
      }
    }
    return true;
  }
  void rethrow_python_error() {
    if (py_error) throw *py_error;
  }
};

struct PyLoaded {
  LoadedTensors loaded;
  std::shared_ptr<const Checkpoint> ckpt;

  ExportItem item(std::size_t i) const {
    const Pick& p = loaded.selection[i];
    const Dtype d = loaded.dtypes[i];
    return ExportItem{loaded.owners[loaded.owner_of[i]], loaded.data[i], d,
                      signed_shape(ckpt->shape(p), ckpt->entry(p.ref).name), d,
                      loaded.device};
  }
  // name -> array, or (with as_dict=false) arrays in selection order: a selection of
  // shards may hold one tensor several times.
  py::object to_numpy(const py::list& dtypes, bool as_dict) const {
    if (loaded.device.type != ExportDevice::kCPU) throw UnsupportedError("numpy arrays need host memory");
    py::dict out;
    py::list seq;
    std::vector<py::object> bases(loaded.owners.size());
    for (std::size_t i = 0; i < loaded.selection.size(); ++i) {
      std::uint32_t o = loaded.owner_of[i];
      if (!bases[o]) bases[o] = owner_capsule(loaded.owners[o]);
      const std::string& name = ckpt->entry(loaded.selection[i].ref).name;
      py::object arr = numpy_array(item(i), dtypes, bases[o], name);
      if (as_dict) out[py::str(name)] = arr;
      else seq.append(arr);
    }
    return as_dict ? py::object(out) : py::object(seq);
  }
  py::list to_dlpack(const std::vector<bool>& bytes_for) const {
    py::list out;
    for (std::size_t i = 0; i < loaded.selection.size(); ++i) {
      ExportItem it = item(i);
      if (bytes_for[static_cast<std::size_t>(it.dtype)]) it = as_bytes(std::move(it));
      out.append(py::make_tuple(py::str(ckpt->entry(loaded.selection[i].ref).name), DLPackTensor(std::move(it))));
    }
    return out;
  }
  // (names, capsules, indices exported as bytes): capsules straight from the core, for
  // frameworks whose from_dlpack takes them (the cheapest import for 250,000 tensors).
  py::tuple to_capsules(const std::vector<bool>& bytes_for, bool versioned) const {
    const std::size_t n = loaded.selection.size();
    py::list names(n), capsules(n), as_bytes_at;
    for (std::size_t i = 0; i < n; ++i) {
      ExportItem it = item(i);
      if (bytes_for[static_cast<std::size_t>(it.dtype)]) {
        it = as_bytes(std::move(it));
        as_bytes_at.append(i);
      }
      names[i] = py::str(ckpt->entry(loaded.selection[i].ref).name);
      capsules[i] = DLPackTensor::capsule(it, versioned);
    }
    return py::make_tuple(names, capsules, as_bytes_at);
  }
  py::dict stats() const {
    const LoadStats& s = loaded.stats;
    py::dict d;
    d["backend"] = backend_name(s.backend);
    d["reason"] = s.reason;
    d["tensors"] = loaded.selection.size();
    d["unindexed"] = unindexed_names(*ckpt);  // a stale index must not hide tensors silently
    d["bytes"] = s.bytes;
    d["bytes_read"] = s.bytes_read;
    d["requests"] = s.requests;
    d["resident"] = s.resident < 0 ? py::object(py::none()) : py::object(py::float_(s.resident));
    d["seconds"] = s.seconds;
    d["threads"] = s.threads;
    return d;
  }
};

struct PyPending {
  std::unique_ptr<AsyncLoad> pending;
  std::shared_ptr<const Checkpoint> ckpt;
  std::string note;  // put before the load's own reason in its stats (why auto chose this path)

  PyLoaded wait(py::object progress) {
    if (!pending) throw Error("this load was already collected");
    PythonTick tick{progress, [this] { return std::make_pair(pending->bytes_done(), pending->bytes_total()); }};
    LoadedTensors loaded;
    try {
      py::gil_scoped_release release;
      loaded = pending->wait(std::ref(tick));
    } catch (...) {
      pending.reset();
      tick.rethrow_python_error();
      throw;
    }
    pending.reset();
    if (!note.empty()) loaded.stats.reason = note + "; " + loaded.stats.reason;
    if (!progress.is_none()) progress(loaded.stats.bytes, loaded.stats.bytes);
    return PyLoaded{std::move(loaded), ckpt};
  }
};

void register_results(py::module_& m) {
  py::class_<PyLoaded>(m, "Loaded")
      .def("to_numpy", &PyLoaded::to_numpy, py::arg("dtypes"), py::arg("as_dict") = true)
      .def("to_dlpack", &PyLoaded::to_dlpack, py::arg("bytes_for"))
      .def("to_capsules", &PyLoaded::to_capsules, py::arg("bytes_for"), py::arg("versioned") = false)
      .def_property_readonly("stats", &PyLoaded::stats)
      .def_property_readonly("casts", [](const PyLoaded& l) {
        py::list out;  // (tensor index, dtype name): conversions the framework must still do
        for (const auto& [i, d] : l.loaded.casts) out.append(py::make_tuple(i, std::string(dtype_name(d))));
        return out;
      })
      .def("__len__", [](const PyLoaded& l) { return l.loaded.selection.size(); });

  py::class_<PyPending>(m, "PendingLoad")
      .def("wait", &PyPending::wait, py::arg("progress") = py::none())
      .def_property_readonly("bytes_total", [](const PyPending& p) { return p.pending ? p.pending->bytes_total() : 0; });
}

// Selection.start, .start_staged and .start_gds: the methods join the Selection class that
// plan.cpp registered.
void register_starts(py::module_& m) {
  py::class_<PySelection> selection = m.attr("Selection");
  selection
      .def("start", [](const PySelection& s, ReadOptions opt) {
        opt.convert_mode = s.mode;
        PyPending p{nullptr, s.ckpt, {}};
        py::gil_scoped_release release;
        p.pending = std::make_unique<HostLoad>(s.ckpt, s.picks, opt, s.targets);
        return p;
      }, py::arg("options") = ReadOptions{})
      // Through pinned staging buffers into device memory (device >= 0), or into host memory
      // with a host copy engine (device = -1: the same pipeline, checkable without a GPU).
      // `note` goes before the load's own reason in its stats (why the route was taken).
      .def("start_staged", [](const PySelection& s, int device, StagingOptions opt, const std::string& note,
                              std::shared_ptr<StagingSink> sink) {
        opt.convert_mode = s.mode;
        PyPending p{nullptr, s.ckpt, note};
        py::gil_scoped_release release;
        if (!sink) sink = make_staging_sink(device, opt.alignment);
        p.pending = std::make_unique<StagedLoad>(s.ckpt, s.picks, opt, std::move(sink), s.targets);
        return p;
      }, py::arg("device"), py::arg("options") = StagingOptions{}, py::kw_only(), py::arg("note") = "",
         py::arg("sink") = nullptr)
      // GPU Direct Storage into device memory (device >= 0), or the same plan run on host
      // memory with the host twins of the kernels (device = -1: checkable without a GPU).
      .def("start_gds", [](const PySelection& s, int device, GdsOptions opt, const std::string& bundled_library,
                           std::shared_ptr<GdsDevice> gds_device) {
        opt.convert_mode = s.mode;
        PyPending p{nullptr, s.ckpt, {}};
        py::gil_scoped_release release;
        if (!gds_device) gds_device = make_gds_device(device, bundled_library);
        p.pending = std::make_unique<GdsLoad>(s.ckpt, s.picks, opt, std::move(gds_device), s.targets);
        return p;
      }, py::arg("device"), py::arg("options") = GdsOptions{}, py::kw_only(), py::arg("bundled_library") = "",
         py::arg("gds_device") = nullptr);
}

// Checkpoint.read_into: byte ranges straight into memory the caller owns (fst.torch.load_into,
// fst.dcp). `reads` is an (n, 4) uint64 array of rows (file, absolute offset, length,
// destination address): one array, so that 250,000 ranges cross the boundary without a
// Python object each. The caller keeps every destination alive and unused until it returns.
void register_read_into(py::module_& m) {
  py::class_<PyCheckpoint> checkpoint = m.attr("Checkpoint");
  checkpoint.def("read_into", [](const PyCheckpoint& c, py::array_t<std::uint64_t, py::array::c_style> reads,
                                 unsigned threads, std::uint64_t max_request, py::object progress) {
    if (reads.ndim() != 2 || reads.shape(1) != 4)
      throw py::value_error("read_into takes an (n, 4) array of (file, offset, length, address) rows");
    std::vector<CallerRead> ranges(static_cast<std::size_t>(reads.shape(0)));
    std::uint64_t total = 0;
    auto rows = reads.unchecked<2>();
    for (std::size_t i = 0; i < ranges.size(); ++i) {
      const auto r = static_cast<py::ssize_t>(i);
      if (rows(r, 0) > UINT32_MAX) throw py::value_error("read_into: file index out of range");
      ranges[i] = CallerRead{static_cast<std::uint32_t>(rows(r, 0)), rows(r, 1), rows(r, 2),
                             reinterpret_cast<std::byte*>(static_cast<std::uintptr_t>(rows(r, 3)))};
      total += ranges[i].length;
    }
    ReadIntoOptions opt;
    opt.threads = threads;
    opt.max_request = max_request;
    std::atomic<std::uint64_t> done{0};
    PythonTick tick{progress, [&] { return std::make_pair(done.load(std::memory_order_relaxed), total); }};
    std::uint64_t read = 0;
    try {
      py::gil_scoped_release release;
      read = read_into(*c.ckpt, ranges, opt, &done, std::ref(tick));
    } catch (...) {
      tick.rethrow_python_error();
      throw;
    }
    if (!progress.is_none()) progress(read, total);
    return read;
  }, py::arg("reads"), py::arg("threads") = 0, py::arg("max_request") = ReadIntoOptions{}.max_request,
     py::arg("progress") = py::none());
}

}  // namespace

void register_load(py::module_& m) {
  m.def("default_threads", &ThreadPool::default_threads);
  m.def("page_cache_residency", [](const std::string& path) {
    const auto file = FileHandle::open(path);
    const std::uint64_t size = file->identity().size;
    return page_cache_residency(file->fd(), size, 0, size);
  });
  register_results(m);
  register_starts(m);
  register_read_into(m);
}

}  // namespace fst::bindings
