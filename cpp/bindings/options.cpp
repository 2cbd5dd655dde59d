// Options: how each load reads, as keyword-constructed objects (ReadOptions for host loads and
// safe_open's sources, StagingOptions for staged loads, GdsOptions for GPU Direct Storage).
// The conversion mode is not among them: a Selection carries it (with_dtypes).
#include <pybind11/stl.h>

#include "bindings.hpp"

namespace fst::bindings {

namespace {

// `backend` as its name, the form Python speaks.
template <class Options>
void backend_property(py::class_<Options>& cls) {
  cls.def_property(
      "backend", [](const Options& o) { return std::string(backend_name(o.backend)); },
      [](Options& o, const std::string& name) { o.backend = backend_from_name(name); });
}

}  // namespace

void register_options(py::module_& m) {
  const ReadOptions read;
  py::class_<ReadOptions> read_cls(m, "ReadOptions", "How a host load (or safe_open's source) reads.");
  read_cls
      .def(py::init([](const std::string& backend, unsigned threads, std::uint64_t alignment,
                       std::uint64_t view_alignment, bool allow_views, std::uint64_t max_request) {
             ReadOptions o;
             o.backend = backend_from_name(backend);
             o.threads = threads;
             o.alignment = alignment;
             o.view_alignment = view_alignment;
             o.allow_views = allow_views;
             o.max_request = max_request;
             return o;
           }),
           py::kw_only(), py::arg("backend") = backend_name(read.backend), py::arg("threads") = read.threads,
           py::arg("alignment") = read.alignment, py::arg("view_alignment") = read.view_alignment,
           py::arg("allow_views") = read.allow_views, py::arg("max_request") = read.max_request)
      .def_readwrite("threads", &ReadOptions::threads)
      .def_readwrite("alignment", &ReadOptions::alignment)
      .def_readwrite("view_alignment", &ReadOptions::view_alignment)
      .def_readwrite("allow_views", &ReadOptions::allow_views)
      .def_readwrite("max_request", &ReadOptions::max_request);
  backend_property(read_cls);

  const StagingOptions staging;
  py::class_<StagingOptions> staging_cls(m, "StagingOptions", "How a staged load reads through pinned buffers.");
  staging_cls
      .def(py::init([](const std::string& backend, unsigned threads, std::uint64_t alignment, std::uint64_t budget,
                       std::uint64_t buffer_bytes, std::uint32_t batch_pieces) {
             StagingOptions o;
             o.backend = backend_from_name(backend);
             o.threads = threads;
             o.alignment = alignment;
             o.budget = budget;
             o.buffer_bytes = buffer_bytes;
             o.batch_pieces = batch_pieces;
             return o;
           }),
           py::kw_only(), py::arg("backend") = backend_name(staging.backend), py::arg("threads") = staging.threads,
           py::arg("alignment") = staging.alignment, py::arg("budget") = staging.budget,
           py::arg("buffer_bytes") = staging.buffer_bytes, py::arg("batch_pieces") = staging.batch_pieces)
      .def_readwrite("threads", &StagingOptions::threads)
      .def_readwrite("alignment", &StagingOptions::alignment)
      .def_readwrite("budget", &StagingOptions::budget)
      .def_readwrite("buffer_bytes", &StagingOptions::buffer_bytes)
      .def_readwrite("batch_pieces", &StagingOptions::batch_pieces);
  backend_property(staging_cls);

  const GdsOptions gds;
  py::class_<GdsOptions>(m, "GdsOptions", "How a GPU Direct Storage load reads.")
      .def(py::init([](unsigned threads, std::uint64_t alignment, std::uint64_t request_bytes,
                       std::uint64_t bulk_bytes, std::uint64_t merge_gap) {
             GdsOptions o;
             o.threads = threads;
             o.alignment = alignment;
             o.request_bytes = request_bytes;
             o.bulk_bytes = bulk_bytes;
             o.merge_gap = merge_gap;
             return o;
           }),
           py::kw_only(), py::arg("threads") = gds.threads, py::arg("alignment") = gds.alignment,
           py::arg("request_bytes") = gds.request_bytes, py::arg("bulk_bytes") = gds.bulk_bytes,
           py::arg("merge_gap") = gds.merge_gap)
      .def_readwrite("threads", &GdsOptions::threads)
      .def_readwrite("alignment", &GdsOptions::alignment)
      .def_readwrite("request_bytes", &GdsOptions::request_bytes)
      .def_readwrite("bulk_bytes", &GdsOptions::bulk_bytes)
      .def_readwrite("merge_gap", &GdsOptions::merge_gap);
}

}  // namespace fst::bindings
