// Exception translation: fst's C++ errors become the classes of fst.errors (with the header
// error's file, tensor and rule as attributes), OSError, or KeyError.
#include <initializer_list>
#include <string>
#include <utility>

#include "bindings.hpp"
#include "fst/errors.hpp"

namespace fst::bindings {

namespace {

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

}  // namespace

void register_errors(py::module_&) {
  py::module_ errors = py::module_::import("fst.errors");
  g_fst_error = errors.attr("FstError");
  g_header_error = errors.attr("HeaderError");
  g_unsupported_error = errors.attr("UnsupportedError");
  g_cuda_error = errors.attr("CudaError");
  py::register_exception_translator(&translate);
}

}  // namespace fst::bindings
