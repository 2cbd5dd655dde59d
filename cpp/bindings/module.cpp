// The fst._core extension module: registration only. Each stage binds its objects in a file of
// its own (bindings.hpp lists them); the work is done in cpp/src. The GIL is released for every
// stage that touches files.
#include "bindings.hpp"

namespace py = pybind11;

PYBIND11_MODULE(_core, m) {
  m.doc() = "fst core: strict safetensors planning, parallel reads, DLPack export";
  using namespace fst::bindings;
  // The order matters where one stage's signatures name another's types: pybind11 writes a
  // type's Python name into a docstring only once the type is registered.
  register_errors(m);
  register_export(m);   // DLPackTensor, which loads, sources and staging return
  register_device(m);   // StagingSink and GdsDevice, which Selection.start_* take
  register_plan(m);     // Checkpoint and Selection
  register_options(m);  // ReadOptions, StagingOptions, GdsOptions, which the loads take
  register_load(m);     // Loaded, PendingLoad, and Selection's start methods
  register_source(m);   // TensorSource and Checkpoint.source
  register_convert(m);
  register_testing(m);  // after StagingSink, which its host_sink returns
}
