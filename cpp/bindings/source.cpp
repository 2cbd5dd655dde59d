// safe_open's tensors on demand: Checkpoint.source opens a TensorSource, which reads one tensor
// (or rows [lo, hi) of its dimension 0) at a time, converted by the dtype rules when they say so.
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include "bindings.hpp"
#include "fst/source.hpp"

namespace fst::bindings {

namespace {

// Single tensors on demand (safe_open): rows [lo, hi) of dimension 0, or the whole tensor.
struct PySource {
  std::shared_ptr<const Checkpoint> ckpt;
  std::shared_ptr<TensorSource> source;
  DtypeRules rules;

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
    const Dtype to = rules.target_for(ckpt->entry(r));
    TensorSource::Rows rows;
    {
      py::gil_scoped_release release;
      rows = source->get_as(pick, to);
    }
    return ExportItem{rows.owner, rows.data, to, signed_shape(ckpt->shape(pick), name), to};
  }
};

}  // namespace

void register_source(py::module_& m) {
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

  // A method of Checkpoint (registered by plan.cpp), bound here after TensorSource so that its
  // signature names the Python class it returns.
  py::class_<PyCheckpoint> checkpoint = m.attr("Checkpoint");
  checkpoint.def("source", [](const PyCheckpoint& c, ReadOptions opt,
                              const std::optional<std::string>& floating_default,
                              const std::vector<std::pair<std::string, std::string>>& rules, const std::string& mode) {
    opt.threads = 1;  // a source serves each tensor on the calling thread
    opt.convert_mode = parse_mode(mode);
    DtypeRules r = make_rules(floating_default, rules);
    py::gil_scoped_release release;
    return PySource{c.ckpt, std::make_shared<TensorSource>(c.ckpt, opt), std::move(r)};
  }, py::arg("options") = ReadOptions{}, py::arg("floating_default") = py::none(),
     py::arg("rules") = std::vector<std::pair<std::string, std::string>>{}, py::arg("mode") = "torch");
}

}  // namespace fst::bindings
