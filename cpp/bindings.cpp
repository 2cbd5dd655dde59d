// Python bindings of the fst core: registration and conversion of values only; the work is
// done in cpp/src. The GIL is released for every stage that touches files.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <unordered_map>

#include "detail/dlpack_abi.hpp"
#include "detail/fatbin.hpp"
#include "detail/posix_file.hpp"
#include "fst/cuda.hpp"
#include "fst/errors.hpp"
#include "fst/convert.hpp"
#include "fst/export.hpp"
#include "fst/fixup.hpp"
#include "fst/gds.hpp"
#include "fst/plan.hpp"
#include "fst/reader.hpp"
#include "fst/source.hpp"
#include "fst/staging.hpp"

namespace py = pybind11;
using namespace fst;


namespace {

// ---------------------------------------------------------------- exceptions -----------

py::object g_fst_error, g_header_error, g_unsupported_error, g_cuda_error;

void raise_with_attrs(const py::object& cls, const std::string& msg,
                      std::initializer_list<std::pair<const char*, py::object>> attrs) {
  py::object exc = cls(msg);
  for (const auto& [k, v] : attrs) exc.attr(k) = v;
  PyErr_SetObject(cls.ptr(), exc.ptr());
}

void translate(std::exception_ptr p) {
  try {
    if (p) std::rethrow_exception(p);
  } catch (const HeaderError& e) {
    raise_with_attrs(g_header_error, e.what(),
                     {{"file", py::str(e.file())},
                      {"tensor", e.tensor().empty() ? py::object(py::none()) : py::object(py::str(e.tensor()))},
                      {"rule", py::str(header_rule_name(e.rule()))}});
  } catch (const IoError& e) {
    py::object exc = py::module_::import("builtins").attr("OSError")(e.err(), e.what(), e.path());
    PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exc.ptr())), exc.ptr());
  } catch (const KeyNotFoundError& e) {
    PyErr_SetObject(PyExc_KeyError, py::str(e.what()).ptr());
  } catch (const UnsupportedError& e) {
    PyErr_SetString(g_unsupported_error.ptr(), e.what());
  } catch (const CudaError& e) {
    PyErr_SetString(g_cuda_error.ptr(), e.what());
  } catch (const Error& e) {
    PyErr_SetString(g_fst_error.ptr(), e.what());
  }
}

// ---------------------------------------------------------------- export ---------------

// One tensor ready to leave the core: the memory that keeps it alive and how to read it.
struct ExportItem {
  std::shared_ptr<const Buffer> owner;
  void* data;
  Dtype dtype;
  std::vector<std::int64_t> shape;
  Dtype format_dtype;  // the tensor's dtype in the file; `dtype` differs once exported as bytes
  ExportDevice device{};
};

// Frameworks index with signed 64-bit sizes; the format allows larger dimensions when another
// one is 0 (an empty tensor), which no framework can represent.
std::vector<std::int64_t> signed_shape(const std::vector<std::uint64_t>& shape, const std::string& name) {
  for (std::uint64_t d : shape)
    if (d > static_cast<std::uint64_t>(INT64_MAX))
      throw UnsupportedError("tensor '" + name + "': dimension " + std::to_string(d) +
                             " is larger than frameworks allow (2^63 - 1)");
  return std::vector<std::int64_t>(shape.begin(), shape.end());
}

// A tensor that speaks the DLPack protocol (__dlpack__ / __dlpack_device__), so any
// framework's from_dlpack can take it without a copy.
class DLPackTensor {
 public:
  explicit DLPackTensor(ExportItem item) : item_(std::move(item)), device_(item_.device) {}

  py::capsule dlpack(py::object stream, py::object max_version, py::object dl_device, py::object copy) {
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

  // A DLPack capsule of `item` that owns a reference to its memory.
  static py::capsule capsule(const ExportItem& item, bool versioned) {
    void* managed = make_dlpack(item.owner, item.data, item.dtype, item.shape, item.device, versioned);
    const char* name = versioned ? "dltensor_versioned" : "dltensor";
    PyObject* cap = PyCapsule_New(managed, name, versioned ? &destroy_versioned : &destroy_legacy);
    if (!cap) {
      free_dlpack(managed, versioned);
      throw py::error_already_set();
    }
    return py::reinterpret_steal<py::capsule>(cap);
  }
  std::pair<int, int> dlpack_device() const { return {device_.type, device_.id}; }
  std::string dtype() const { return std::string(dtype_name(item_.dtype)); }
  std::string format_dtype() const { return std::string(dtype_name(item_.format_dtype)); }
  py::tuple shape() const { return py::cast(item_.shape); }
  std::uintptr_t data_ptr() const { return reinterpret_cast<std::uintptr_t>(item_.data); }

 private:
  // A capsule still carrying its original name was never consumed: free it here.
  static void destroy_versioned(PyObject* cap) {
    if (PyCapsule_IsValid(cap, "dltensor_versioned"))
      free_dlpack(PyCapsule_GetPointer(cap, "dltensor_versioned"), true);
  }
  static void destroy_legacy(PyObject* cap) {
    if (PyCapsule_IsValid(cap, "dltensor")) free_dlpack(PyCapsule_GetPointer(cap, "dltensor"), false);
  }

  ExportItem item_;
  ExportDevice device_;
};

// Tensors of dtypes whose consumer lacks a DLPack code travel as their bytes (U8, the last
// dimension scaled to bytes: F4's x2-packed layout) and are re-typed by the adapter.
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

// numpy arrays straight from C++ (one call for all tensors, no per-tensor Python work).
// `dtypes[d]` is the numpy dtype for fst Dtype d, or None when numpy has none.
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

// ---------------------------------------------------------------- objects --------------

struct PyCheckpoint;

// Dtype rules from Python: a default for floating tensors (or None) and (pattern, dtype) pairs.
DtypeRules make_rules(const std::optional<std::string>& floating_default,
                      const std::vector<std::pair<std::string, std::string>>& rules) {
  auto parse = [](const std::string& name) {
    auto d = dtype_from_name(name);
    if (!d) throw py::value_error("unknown dtype '" + name + "'");
    return *d;
  };
  DtypeRules r;
  if (floating_default) r.floating_default = parse(*floating_default);
  for (const auto& [pattern, dtype] : rules) r.rules.emplace_back(pattern, parse(dtype));
  return r;
}

struct PySelection {
  std::shared_ptr<const Checkpoint> ckpt;
  std::vector<Pick> picks;
  std::vector<Dtype> targets;  // per pick, or empty: every tensor keeps its dtype
  ConvertMode mode = ConvertMode::kTorch;  // whose rules the conversions follow
  std::uint64_t nbytes() const {
    std::uint64_t n = 0;
    for (const Pick& p : picks) n += ckpt->extent(p).nbytes;
    return n;
  }
};

// Names of the tensors the files hold and the index does not name, in file order.
py::list unindexed_names(const Checkpoint& ckpt) {
  py::list out;
  for (TensorRef r : ckpt.unindexed()) out.append(py::str(ckpt.entry(r).name));
  return out;
}

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
    std::optional<py::error_already_set> py_error;
    auto tick = [&]() -> bool {
      py::gil_scoped_acquire gil;
      if (PyErr_CheckSignals() != 0) {
        py_error.emplace();
        return false;
      }
      if (!progress.is_none()) {
        try {
          progress(pending->bytes_done(), pending->bytes_total());
        } catch (py::error_already_set& e) {
          py_error.emplace(std::move(e));
          return false;
        }
      }
      return true;
    };
    LoadedTensors loaded;
    try {
      py::gil_scoped_release release;
      loaded = pending->wait(tick);
    } catch (...) {
      pending.reset();
      if (py_error) throw *py_error;
      throw;
    }
    pending.reset();
    if (!note.empty()) loaded.stats.reason = note + "; " + loaded.stats.reason;
    if (!progress.is_none()) progress(loaded.stats.bytes, loaded.stats.bytes);
    return PyLoaded{std::move(loaded), ckpt};
  }
};

ReadOptions read_options(const std::string& backend, unsigned threads, std::uint64_t alignment,
                         std::uint64_t view_alignment, bool allow_views) {
  ReadOptions opt;
  opt.backend = backend_from_name(backend);
  opt.threads = threads;
  opt.alignment = alignment;
  opt.view_alignment = view_alignment;
  opt.allow_views = allow_views;
  return opt;
}

// Single tensors on demand (safe_open): rows [lo, hi) of dimension 0, or the whole tensor.
struct PySource {
  std::shared_ptr<const Checkpoint> ckpt;
  std::shared_ptr<TensorSource> source;
  DtypeRules rules;
  ConvertMode mode;
  std::uint64_t alignment;

  ExportItem item(const std::string& name, std::optional<std::uint64_t> lo, std::optional<std::uint64_t> hi) const {
    const TensorRef r = ckpt->require(name);
    Pick pick{r};
    if (lo || hi) {
      const TensorEntry& e = ckpt->entry(r);
      std::uint64_t first = lo.value_or(0), last = hi.value_or(e.shape.empty() ? 1 : e.shape[0]);
      if (last < first) throw py::index_error("row range ends before it starts");
      pick.first_row = first;
      pick.rows = last - first;
    }
    const Dtype from = ckpt->entry(r).dtype, to = rules.target_for(ckpt->entry(r));
    TensorSource::Rows rows;
    {
      py::gil_scoped_release release;
      rows = source->get(pick);
      if (to != from) {  // fix up: convert into memory of its own
        const std::uint64_t count = ckpt->extent(pick).nbytes * 8 / dtype_bits(from);
        auto arena = std::make_shared<HostArena>(count * dtype_bits(to) / 8, alignment);
        convert_host(rows.data, from, arena->data(), to, count, ThreadPool::default_threads(), mode);
        rows = TensorSource::Rows{arena, arena->data()};
      }
    }
    return ExportItem{rows.owner, rows.data, to, signed_shape(ckpt->shape(pick), name), to};
  }
};

struct PyCheckpoint {
  std::shared_ptr<const Checkpoint> ckpt;

  const FileHeader& file(std::size_t i) const {
    if (i >= ckpt->files().size()) throw py::index_error("file index out of range");
    return ckpt->files()[i];
  }
  TensorRef ref(const std::string& name) const { return ckpt->require(name); }
  py::list names(bool sorted) const {
    std::vector<const std::string*> names;
    names.reserve(ckpt->all().size());
    for (TensorRef r : ckpt->all()) names.push_back(&ckpt->entry(r).name);
    if (sorted) std::sort(names.begin(), names.end(), [](auto* a, auto* b) { return *a < *b; });
    py::list out(names.size());
    for (std::size_t i = 0; i < names.size(); ++i) out[i] = py::str(*names[i]);
    return out;
  }
  py::tuple info(const std::string& name) const {
    TensorRef r = ref(name);
    const TensorEntry& e = ckpt->entry(r);
    return py::make_tuple(std::string(dtype_name(e.dtype)), py::tuple(py::cast(e.shape)),
                          py::make_tuple(e.begin, e.end), r.file);
  }
  // (name, dtype, shape, begin, end, file index, absolute offset) for every tensor, file order.
  py::list entries() const {
    py::list out(ckpt->all().size());
    std::size_t i = 0;
    for (TensorRef r : ckpt->all()) {
      const TensorEntry& e = ckpt->entry(r);
      out[i++] = py::make_tuple(py::str(e.name), std::string(dtype_name(e.dtype)),
                                py::tuple(py::cast(e.shape)), e.begin, e.end, r.file,
                                ckpt->absolute_offset(r));
    }
    return out;
  }
  py::object metadata(std::size_t i) const {
    const FileHeader& h = file(i);
    if (!h.has_metadata) return py::none();
    py::dict d;
    for (const auto& [k, v] : h.metadata) d[py::str(k)] = py::str(v);
    return d;
  }
  PySelection select(const std::optional<std::vector<std::string>>& patterns) const {
    std::vector<Pick> picks;
    py::gil_scoped_release release;
    if (patterns) {
      picks = ckpt->select(*patterns);
    } else {
      ckpt->check_complete();
      picks.reserve(ckpt->all().size());
      for (TensorRef r : ckpt->all()) picks.push_back(Pick{r});
    }
    return PySelection{ckpt, std::move(picks), {}};
  }
  // Shards: (name, first row, row count) of dimension 0 each, in the order given.
  PySelection select_rows(const std::vector<std::tuple<std::string, std::uint64_t, std::uint64_t>>& rows) const {
    std::vector<Pick> picks;
    picks.reserve(rows.size());
    for (const auto& [name, first, count] : rows) {
      Pick p{ref(name), first, count};
      ckpt->extent(p);  // bounds check now, with the tensor's name in the error
      picks.push_back(p);
    }
    return PySelection{ckpt, std::move(picks), {}};
  }
};

}  // namespace

void fst_register_convert(py::module_& m);  // cpp/bindings_convert.cpp
fst::ConvertMode parse_mode(const std::string& name);  // cpp/bindings_convert.cpp

// The device of a GDS load: cuFile into CUDA device memory (device >= 0), or O_DIRECT reads
// into host memory with the host twins of the kernels (device < 0: checkable without a GPU).
std::shared_ptr<GdsDevice> make_gds_device(int device, const std::string& bundled_library) {
  return device < 0 ? make_host_gds_device() : make_cufile_device(device, bundled_library);
}

// The sink of a staged load: CUDA device memory (device >= 0), or host memory through a host
// copy engine (device < 0: the same pipeline, checkable without a GPU).
std::shared_ptr<StagingSink> make_staging_sink(int device, std::uint64_t alignment, unsigned host_copy_delay_us,
                                               bool host_converts, unsigned host_fail_wait) {
  return device < 0 ? make_host_sink(alignment, host_copy_delay_us, host_converts, host_fail_wait)
                    : make_cuda_sink(device);
}

PYBIND11_MODULE(_core, m) {
  m.doc() = "fst core: strict safetensors planning, parallel reads, DLPack export";
  py::module_ errors = py::module_::import("fst.errors");
  g_fst_error = errors.attr("FstError");
  g_header_error = errors.attr("HeaderError");
  g_unsupported_error = errors.attr("UnsupportedError");
  g_cuda_error = errors.attr("CudaError");
  py::register_exception_translator(&translate);

  py::list dtype_names;
  for (int i = 0; i < kDtypeCount; ++i) dtype_names.append(std::string(dtype_name(static_cast<Dtype>(i))));
  m.attr("DTYPE_NAMES") = dtype_names;
  m.attr("MAX_HEADER_LEN") = kMaxHeaderLen;
#ifdef FST_HAVE_KERNELS
  m.attr("HAVE_KERNELS") = true;
#else
  m.attr("HAVE_KERNELS") = false;
#endif
  m.def("default_threads", &ThreadPool::default_threads);
  m.def("kernel_images", [] {
    py::list out;  // (kernel file, fatbin bytes) embedded in this build
    for (std::size_t i = 0; i < kernels::kFatbinCount; ++i) {
      const auto& img = kernels::kFatbins[i];
      out.append(py::make_tuple(img.name, py::bytes(reinterpret_cast<const char*>(img.begin),
                                                    static_cast<std::size_t>(img.end - img.begin))));
    }
    return out;
  });
  m.def("dtype_bits", [](const std::string& name) {
    auto d = dtype_from_name(name);
    if (!d) throw py::value_error("unknown dtype '" + name + "'");
    return dtype_bits(*d);
  });

  py::class_<DLPackTensor>(m, "DLPackTensor")
      .def("__dlpack__", &DLPackTensor::dlpack, py::kw_only(), py::arg("stream") = py::none(),
           py::arg("max_version") = py::none(), py::arg("dl_device") = py::none(),
           py::arg("copy") = py::none())
      .def("__dlpack_device__", &DLPackTensor::dlpack_device)
      .def_property_readonly("dtype", &DLPackTensor::dtype)
      .def_property_readonly("format_dtype", &DLPackTensor::format_dtype)
      .def_property_readonly("shape", &DLPackTensor::shape)
      .def_property_readonly("data_ptr", &DLPackTensor::data_ptr);

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

  // What several staged loads use one after another (the groups of a stream), one load at a
  // time: on a CUDA device, its device scratch memory (the pinned buffers come from the
  // device's process-wide pool either way); on the host (device -1), a pool of its own.
  py::class_<StagingSink, std::shared_ptr<StagingSink>>(m, "StagingSink")
      .def(py::init([](int device, std::uint64_t alignment, unsigned host_copy_delay_us, bool host_converts) {
             py::gil_scoped_release release;
             return make_staging_sink(device, alignment, host_copy_delay_us, host_converts, 0);
           }),
           py::arg("device"), py::arg("alignment") = 256, py::arg("host_copy_delay_us") = 0,
           py::arg("host_converts") = true)
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

  py::class_<PySelection>(m, "Selection")
      .def("__len__", [](const PySelection& s) { return s.picks.size(); })
      // The same picks, each to be converted to the dtype the rules give it after reading.
      .def("with_dtypes", [](const PySelection& s, const std::optional<std::string>& floating_default,
                             const std::vector<std::pair<std::string, std::string>>& rules,
                             const std::string& mode) {
        DtypeRules r = make_rules(floating_default, rules);
        PySelection out{s.ckpt, s.picks, {}, parse_mode(mode)};
        if (r.empty()) return out;
        bool any = false;
        out.targets.reserve(s.picks.size());
        for (const Pick& p : s.picks) {
          const TensorEntry& e = s.ckpt->entry(p.ref);
          out.targets.push_back(r.target_for(e));
          any = any || out.targets.back() != e.dtype;
        }
        if (!any) out.targets.clear();
        return out;
      }, py::arg("floating_default"), py::arg("rules"), py::arg("mode") = "torch")
      .def_property_readonly("nbytes", &PySelection::nbytes)
      .def("conversions", [](const PySelection& s) {
        py::list out;  // (name, dtype) of every pick whose dtype the rules change
        for (std::size_t i = 0; i < s.targets.size(); ++i) {
          const TensorEntry& e = s.ckpt->entry(s.picks[i].ref);
          if (s.targets[i] != e.dtype) out.append(py::make_tuple(py::str(e.name), std::string(dtype_name(s.targets[i]))));
        }
        return out;
      })
      .def("names", [](const PySelection& s) {
        py::list out;
        for (const Pick& p : s.picks) out.append(py::str(s.ckpt->entry(p.ref).name));
        return out;
      })
      .def("split", [](const PySelection& s, std::uint64_t budget) {
        // Consecutive groups of at most `budget` bytes (a larger tensor gets a group alone).
        std::vector<PySelection> groups;
        std::uint64_t bytes = 0;
        for (std::size_t i = 0; i < s.picks.size(); ++i) {
          std::uint64_t n = s.ckpt->extent(s.picks[i]).nbytes;
          if (groups.empty() || (bytes + n > budget && !groups.back().picks.empty())) {
            groups.push_back(PySelection{s.ckpt, {}, {}, s.mode});
            bytes = 0;
          }
          groups.back().picks.push_back(s.picks[i]);
          if (!s.targets.empty()) groups.back().targets.push_back(s.targets[i]);
          bytes += n;
        }
        return groups;
      }, py::arg("budget"))
      .def("start", [](const PySelection& s, const std::string& backend, unsigned threads,
                       std::uint64_t alignment, std::uint64_t view_alignment, bool allow_views) {
        ReadOptions opt = read_options(backend, threads, alignment, view_alignment, allow_views);
        opt.convert_mode = s.mode;
        PyPending p{nullptr, s.ckpt, {}};
        py::gil_scoped_release release;
        p.pending = std::make_unique<PendingLoad>(s.ckpt, s.picks, opt, s.targets);
        return p;
      }, py::arg("backend") = "auto", py::arg("threads") = 0, py::arg("alignment") = 64,
         py::arg("view_alignment") = 0, py::arg("allow_views") = true)
      // Through pinned staging buffers into device memory (device >= 0), or into host memory
      // with a host copy engine (device = -1: the same pipeline, checkable without a GPU).
      .def("start_staged", [](const PySelection& s, int device, const std::string& backend, unsigned threads,
                              std::uint64_t alignment, std::uint64_t budget, std::uint64_t buffer_bytes,
                              unsigned host_copy_delay_us, bool host_converts, unsigned host_fail_wait,
                              const std::string& note, std::shared_ptr<StagingSink> sink, std::uint32_t batch_pieces) {
        StagingOptions opt;
        opt.batch_pieces = batch_pieces;
        opt.backend = backend_from_name(backend);
        opt.threads = threads;
        opt.alignment = alignment;
        opt.budget = budget;
        opt.buffer_bytes = buffer_bytes;
        opt.convert_mode = s.mode;
        PyPending p{nullptr, s.ckpt, note};
        py::gil_scoped_release release;
        if (!sink) sink = make_staging_sink(device, alignment, host_copy_delay_us, host_converts, host_fail_wait);
        p.pending = std::make_unique<StagedLoad>(s.ckpt, s.picks, opt, std::move(sink), s.targets);
        return p;
      }, py::arg("device"), py::arg("backend") = "pread", py::arg("threads") = 0, py::arg("alignment") = 256,
         py::arg("budget") = StagingOptions{}.budget, py::arg("buffer_bytes") = StagingOptions{}.buffer_bytes,
         py::arg("host_copy_delay_us") = 0, py::arg("host_converts") = true, py::arg("host_fail_wait") = 0,
         py::arg("note") = "", py::arg("sink") = nullptr, py::arg("batch_pieces") = StagingOptions{}.batch_pieces)
      // The GDS plan itself, for tests: per window, its reads (file, offset, length, needed,
      // bulk offset), moves (bulk offset, slot offset, bytes, pick), conversions (bulk offset,
      // slot offset, count, from, to, pick) and the bulk bytes it uses.
      .def("plan_gds", [](const PySelection& s, std::uint64_t alignment, std::uint64_t request_bytes,
                          std::uint64_t bulk_bytes, std::uint64_t merge_gap) {
        GdsOptions opt;
        opt.alignment = alignment;
        opt.request_bytes = request_bytes;
        opt.bulk_bytes = bulk_bytes;
        opt.merge_gap = merge_gap;
        GdsPlan plan = plan_gds(*s.ckpt, s.picks, s.targets, opt);
        py::list windows;
        for (const GdsWindow& w : plan.windows) {
          py::list reads, moves, converts;
          for (const BulkRead& r : w.reads) reads.append(py::make_tuple(r.file, r.file_offset, r.length, r.needed, r.bulk_offset));
          for (const BulkMove& m : w.moves) moves.append(py::make_tuple(m.bulk_offset, m.slot_offset, m.bytes, m.pick));
          for (const BulkConvert& c : w.converts)
            converts.append(py::make_tuple(c.bulk_offset, c.slot_offset, c.count, std::string(dtype_name(c.from)),
                                           std::string(dtype_name(c.to)), c.pick));
          py::dict d;
          d["reads"] = reads;
          d["moves"] = moves;
          d["converts"] = converts;
          d["bulk_used"] = w.bulk_used;
          windows.append(d);
        }
        py::dict out;
        out["windows"] = windows;
        out["slots"] = plan.placement.offsets;
        out["arena_bytes"] = plan.placement.size;
        out["bulk_bytes"] = plan.bulk_bytes;
        out["bytes_read"] = plan.bytes_read;
        return out;
      }, py::arg("alignment") = 256, py::arg("request_bytes") = 16u << 20, py::arg("bulk_bytes") = 512u << 20,
         py::arg("merge_gap") = 1u << 20)
      // GPU Direct Storage into device memory (device >= 0), or the same plan run on host
      // memory with the host twins of the kernels (device = -1: checkable without a GPU).
      .def("start_gds", [](const PySelection& s, int device, unsigned threads, std::uint64_t alignment,
                           std::uint64_t request_bytes, std::uint64_t bulk_bytes, const std::string& bundled_library,
                           std::uint64_t merge_gap, std::shared_ptr<GdsDevice> gds_device) {
        GdsOptions opt;
        opt.threads = threads;
        opt.alignment = alignment;
        opt.request_bytes = request_bytes;
        opt.bulk_bytes = bulk_bytes;
        opt.merge_gap = merge_gap;
        opt.convert_mode = s.mode;
        PyPending p{nullptr, s.ckpt, {}};
        py::gil_scoped_release release;
        if (!gds_device) gds_device = make_gds_device(device, bundled_library);
        p.pending = std::make_unique<GdsLoad>(s.ckpt, s.picks, opt, std::move(gds_device), s.targets);
        return p;
      }, py::arg("device"), py::arg("threads") = 0, py::arg("alignment") = 256,
         py::arg("request_bytes") = 16u << 20, py::arg("bulk_bytes") = 512u << 20,
         py::arg("bundled_library") = "", py::arg("merge_gap") = 1u << 20, py::arg("gds_device") = nullptr);

  py::class_<PyCheckpoint>(m, "Checkpoint")
      // index: (index path, shard names one per path, tensor name -> shard name), or None.
      .def(py::init([](const std::vector<std::string>& paths, unsigned threads,
                       std::optional<std::tuple<std::string, std::vector<std::string>,
                                                std::unordered_map<std::string, std::string>>> index) {
             std::optional<IndexMap> map;
             if (index) map = IndexMap{std::move(std::get<0>(*index)), std::move(std::get<1>(*index)),
                                       std::move(std::get<2>(*index))};
             py::gil_scoped_release release;
             return PyCheckpoint{std::make_shared<const Checkpoint>(paths, threads, map ? &*map : nullptr)};
           }), py::arg("paths"), py::arg("threads") = 0, py::arg("index") = py::none())
      .def("unindexed", [](const PyCheckpoint& c) { return unindexed_names(*c.ckpt); })
      // For planners that take every tensor from entries() rather than select(None).
      .def("check_complete", [](const PyCheckpoint& c) { c.ckpt->check_complete(); })
      .def_property_readonly("files", [](const PyCheckpoint& c) {
        py::list out;
        for (const auto& f : c.ckpt->files()) out.append(f.path);
        return out;
      })
      .def("__len__", [](const PyCheckpoint& c) { return c.ckpt->all().size(); })
      .def("__contains__", [](const PyCheckpoint& c, const std::string& n) { return c.ckpt->find(n) != nullptr; })
      .def("names", &PyCheckpoint::names, py::arg("sorted") = false)
      .def("info", &PyCheckpoint::info)
      .def("entries", &PyCheckpoint::entries)
      .def("metadata", &PyCheckpoint::metadata, py::arg("file") = 0)
      .def("header_len", [](const PyCheckpoint& c, std::size_t i) { return c.file(i).header_len; })
      .def("file_size", [](const PyCheckpoint& c, std::size_t i) { return c.file(i).file_size; })
      .def("fd", [](const PyCheckpoint& c, std::size_t i) {
        // The descriptor file i's header was read from, owned by the checkpoint (never close it):
        // for hints such as posix_fadvise that must reach the parsed version, not the path.
        return c.file(i).file->fd();
      })
      .def("identity", [](const PyCheckpoint& c, std::size_t i) {
        // (device, inode, size, mtime_ns) of the version of file i whose header was parsed.
        const FileIdentity& id = c.file(i).file->identity();
        return py::make_tuple(id.device, id.inode, id.size, id.mtime_ns);
      })
      .def_property_readonly("nbytes", [](const PyCheckpoint& c) {
        std::uint64_t n = 0;
        for (const auto& f : c.ckpt->files()) n += f.data_size();
        return n;
      })
      .def("select", &PyCheckpoint::select, py::arg("patterns") = py::none())
      .def("select_rows", &PyCheckpoint::select_rows, py::arg("rows"))
      .def("source", [](const PyCheckpoint& c, const std::string& backend, std::uint64_t alignment,
                        std::uint64_t view_alignment, bool allow_views,
                        const std::optional<std::string>& floating_default,
                        const std::vector<std::pair<std::string, std::string>>& rules, const std::string& mode) {
        ReadOptions opt = read_options(backend, 1, alignment, view_alignment, allow_views);
        DtypeRules r = make_rules(floating_default, rules);
        const ConvertMode m = parse_mode(mode);
        py::gil_scoped_release release;
        return PySource{c.ckpt, std::make_shared<TensorSource>(c.ckpt, opt), std::move(r), m, alignment};
      }, py::arg("backend") = "auto", py::arg("alignment") = 64, py::arg("view_alignment") = 0,
         py::arg("allow_views") = true, py::arg("floating_default") = py::none(),
         py::arg("rules") = std::vector<std::pair<std::string, std::string>>{}, py::arg("mode") = "torch");

  py::class_<PySource>(m, "TensorSource")
      .def_property_readonly("backend", [](const PySource& s) { return backend_name(s.source->backend()); })
      .def_property_readonly("reason", [](const PySource& s) { return s.source->reason(); })
      .def("tensor", [](const PySource& s, const std::string& name, std::optional<std::uint64_t> lo,
                        std::optional<std::uint64_t> hi, const std::vector<bool>& bytes_for) {
        ExportItem it = s.item(name, lo, hi);
        if (bytes_for[static_cast<std::size_t>(it.dtype)]) it = as_bytes(std::move(it));
        return DLPackTensor(std::move(it));
      }, py::arg("name"), py::arg("lo") = py::none(), py::arg("hi") = py::none(), py::arg("bytes_for"))
      .def("array", [](const PySource& s, const std::string& name, std::optional<std::uint64_t> lo,
                       std::optional<std::uint64_t> hi, const py::list& dtypes) {
        ExportItem it = s.item(name, lo, hi);
        return numpy_array(it, dtypes, owner_capsule(it.owner), name);
      }, py::arg("name"), py::arg("lo") = py::none(), py::arg("hi") = py::none(), py::arg("dtypes"));

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
      sink = make_staging_sink(device, 256, 0, true, 0);
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
  fst_register_convert(m);
  m.def("page_cache_residency", [](const std::string& path) {
    fst::detail::PosixFile f(path, O_RDONLY);
    std::uint64_t size = f.size();
    return page_cache_residency(f.fd(), size, 0, size);
  });

}
