// What the binding files of fst._core share: the Python-facing objects that cross stages (a
// checkpoint and its selections, tensors ready for export) and each file's registration call.
// Internal to the extension module; the core's public headers are in cpp/include/fst/.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "fst/convert.hpp"
#include "fst/dtype.hpp"
#include "fst/export.hpp"
#include "fst/fixup.hpp"
#include "fst/gds.hpp"
#include "fst/plan.hpp"
#include "fst/reader.hpp"
#include "fst/staging.hpp"

namespace fst::bindings {

namespace py = pybind11;

// ---- registration, called by the module init (module.cpp) in this order: a type a signature
// names must be registered before the function that names it.
void register_errors(py::module_& m);   // errors.cpp: exception translation to fst.errors
void register_export(py::module_& m);   // export.cpp: DLPackTensor
void register_device(py::module_& m);   // device.cpp: sinks, GDS devices, staging pool, runtime info
void register_plan(py::module_& m);     // plan.cpp: Checkpoint, Selection, dtype names
void register_options(py::module_& m);  // options.cpp: ReadOptions, StagingOptions, GdsOptions
void register_load(py::module_& m);     // load.cpp: Loaded, PendingLoad, Selection.start*
void register_source(py::module_& m);   // source.cpp: TensorSource, Checkpoint.source
void register_convert(py::module_& m);  // convert.cpp: host and device conversion
void register_testing(py::module_& m);  // testing.cpp: fst._core._testing, hooks for the tests

// ---- export (export.cpp) -----------------------------------------------------------------

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
std::vector<std::int64_t> signed_shape(const std::vector<std::uint64_t>& shape, const std::string& name);

// A tensor that speaks the DLPack protocol (__dlpack__ / __dlpack_device__), so any
// framework's from_dlpack can take it without a copy.
class DLPackTensor {
 public:
  explicit DLPackTensor(ExportItem item) : item_(std::move(item)), device_(item_.device) {}

  py::capsule dlpack(py::object stream, py::object max_version, py::object dl_device, py::object copy);
  // A DLPack capsule of `item` that owns a reference to its memory.
  static py::capsule capsule(const ExportItem& item, bool versioned);
  std::pair<int, int> dlpack_device() const { return {device_.type, device_.id}; }
  std::string dtype() const { return std::string(dtype_name(item_.dtype)); }
  std::string format_dtype() const { return std::string(dtype_name(item_.format_dtype)); }
  py::tuple shape() const;
  std::uintptr_t data_ptr() const { return reinterpret_cast<std::uintptr_t>(item_.data); }

 private:
  ExportItem item_;
  ExportDevice device_;
};

// Tensors of dtypes whose consumer lacks a DLPack code travel as their bytes (U8, the last
// dimension scaled to bytes: F4's x2-packed layout) and are re-typed by the adapter.
ExportItem as_bytes(ExportItem item);

// A capsule holding a reference to `owner`: the base object of numpy arrays on its memory.
py::capsule owner_capsule(const std::shared_ptr<const Buffer>& owner);

// numpy arrays straight from C++ (one call for all tensors, no per-tensor Python work).
// `dtypes[d]` is the numpy dtype for fst Dtype d, or None when numpy has none.
py::object numpy_array(const ExportItem& item, const py::list& dtypes, py::handle base, const std::string& name);

// ---- plan (plan.cpp) ---------------------------------------------------------------------

// Dtype rules from Python: a default for floating tensors (or None) and (pattern, dtype) pairs.
DtypeRules make_rules(const std::optional<std::string>& floating_default,
                      const std::vector<std::pair<std::string, std::string>>& rules);

struct PySelection {
  std::shared_ptr<const Checkpoint> ckpt;
  std::vector<Pick> picks;
  std::vector<Dtype> targets;  // per pick, or empty: every tensor keeps its dtype
  ConvertMode mode = ConvertMode::kTorch;  // whose rules the conversions follow
  std::uint64_t nbytes() const;
};

// Names of the tensors the files hold and the index does not name, in file order.
py::list unindexed_names(const Checkpoint& ckpt);

struct PyCheckpoint {
  std::shared_ptr<const Checkpoint> ckpt;

  const FileHeader& file(std::size_t i) const;
  TensorRef ref(const std::string& name) const { return ckpt->require(name); }
  py::list names(bool sorted) const;
  py::tuple info(const std::string& name) const;
  // (name, dtype, shape, begin, end, file index, absolute offset) for every tensor, file order.
  py::list entries() const;
  py::object metadata(std::size_t i) const;
  PySelection select(const std::optional<std::vector<std::string>>& patterns) const;
  // Shards: (name, first row, row count) of dimension 0 each, in the order given.
  PySelection select_rows(const std::vector<std::tuple<std::string, std::uint64_t, std::uint64_t>>& rows) const;
};

// ---- read (load.cpp) ---------------------------------------------------------------------


// ---- convert (convert.cpp) ---------------------------------------------------------------

// A conversion mode named from Python (one of CONVERT_MODES); ValueError otherwise.
ConvertMode parse_mode(const std::string& name);

}  // namespace fst::bindings
