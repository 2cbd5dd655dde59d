// fst._core._testing: hooks for the test suite, kept out of the signatures fst itself calls.
// Not part of fst's API.
#include "bindings.hpp"
#include "fst/header.hpp"

namespace fst::bindings {

void register_testing(py::module_& m) {
  py::module_ t = m.def_submodule("_testing", "Test hooks of fst._core; not part of fst's API.");
  // A host staging sink (the device -1 stand-in for CUDA, as StagingSink(-1)) whose copy engine
  // misbehaves on request, for Selection.start_staged(-1, ..., sink=...): each copy starts
  // `copy_delay_us` late (a slow engine: buffers reused too early would show), converts=False
  // leaves the dtype conversions to the framework (a device without kernels), and with
  // fail_wait = n > 0 the n-th wait for a buffer's copies and every later one fail (a device
  // error in the middle of a load).
  t.def("host_sink", [](std::uint64_t alignment, unsigned copy_delay_us, bool converts, unsigned fail_wait) {
    py::gil_scoped_release release;
    return make_host_sink(alignment, copy_delay_us, converts, fail_wait);
  }, py::kw_only(), py::arg("alignment") = 256, py::arg("copy_delay_us") = 0, py::arg("converts") = true,
     py::arg("fail_wait") = 0);
  // Headers read (files opened and parsed) by this process so far.
  t.def("headers_read", &headers_read);
}

}  // namespace fst::bindings
