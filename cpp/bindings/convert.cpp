// Python bindings of the conversion and move arithmetic: fst._core.convert (host),
// fst._core.convert_on_device and fst._core.move_on_device (the CUDA kernels on device memory),
// fst._core.conversion_supported and fst._core.CONVERT_MODES.
#include <pybind11/stl.h>

#include <cstdint>
#include <memory>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "bindings.hpp"
#include "fst/convert.hpp"
#include "fst/cuda.hpp"
#include "fst/dtype.hpp"
#include "fst/errors.hpp"

namespace fst::bindings {

fst::ConvertMode parse_mode(const std::string& name) {
  const auto m = fst::convert_mode_from_name(name);
  if (!m) throw py::value_error("unknown conversion mode '" + name + "'");
  return *m;
}

namespace {

fst::Dtype parse_dtype(const std::string& name) {
  const auto d = fst::dtype_from_name(name);
  if (!d) throw py::value_error("unknown dtype '" + name + "'");
  return *d;
}

// A contiguous view of an object with the buffer protocol, released on scope exit.
class BufferView {
 public:
  BufferView(const py::handle& obj, bool writable) {
    const int flags = writable ? PyBUF_WRITABLE : PyBUF_SIMPLE;
    if (PyObject_GetBuffer(obj.ptr(), &view_, flags) != 0) throw py::error_already_set();
  }
  ~BufferView() { PyBuffer_Release(&view_); }
  BufferView(const BufferView&) = delete;
  BufferView& operator=(const BufferView&) = delete;
  void* data() const { return view_.buf; }
  std::size_t size() const { return static_cast<std::size_t>(view_.len); }

 private:
  Py_buffer view_{};
};

// Fresh output memory is first touched by the conversion, and page faults can cost as much as
// the conversion itself: ask for transparent huge pages on the 2 MiB-aligned interior of a
// large buffer (advice only; ignored where unsupported).
void advise_huge_pages(void* p, std::size_t n) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr std::uintptr_t kHuge = std::uintptr_t{1} << 21;
  if (n < 4 * kHuge) return;
  const auto begin = (reinterpret_cast<std::uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const auto end = (reinterpret_cast<std::uintptr_t>(p) + n) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)p;
  (void)n;
#endif
}

py::object convert(const py::object& src, const std::string& src_dtype,
                   const std::string& dst_dtype, int threads, const py::object& out,
                   const std::string& mode_name) {
  fst::Dtype from = parse_dtype(src_dtype);
  fst::Dtype to = parse_dtype(dst_dtype);
  const fst::ConvertMode mode = parse_mode(mode_name);
  if (threads < 0) throw py::value_error("threads must be >= 0");
  if (!fst::conversion_supported(from, to))
    throw fst::UnsupportedError("conversion from " + src_dtype + " to " + dst_dtype +
                                " is not supported");
  BufferView in(src, false);
  std::size_t count = 0, out_bytes = in.size();
  if (from != to) {
    const std::size_t ss = fst::dtype_bits(from) / 8;
    if (in.size() % ss != 0)
      throw py::value_error("buffer of " + std::to_string(in.size()) +
                            " bytes is not a whole number of " + src_dtype + " elements");
    count = in.size() / ss;
    out_bytes = count * (fst::dtype_bits(to) / 8);
  } else {
    // Copy the bytes as they are (sub-byte dtypes included, whatever their packing).
    count = out_bytes;
    from = to = fst::Dtype::U8;
  }

  py::object result;
  void* dst = nullptr;
  std::unique_ptr<BufferView> out_view;
  if (out.is_none()) {
    PyObject* raw = PyByteArray_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(out_bytes));
    if (!raw) throw py::error_already_set();
    result = py::reinterpret_steal<py::object>(raw);
    dst = PyByteArray_AS_STRING(raw);
    advise_huge_pages(dst, out_bytes);
  } else {
    out_view = std::make_unique<BufferView>(out, true);
    if (out_view->size() != out_bytes)
      throw py::value_error("out has " + std::to_string(out_view->size()) + " bytes, " +
                            std::to_string(out_bytes) + " needed");
    result = out;
    dst = out_view->data();
  }

  unsigned nt = static_cast<unsigned>(threads);
  if (nt == 0) nt = std::thread::hardware_concurrency();
  if (count) {
    py::gil_scoped_release nogil;
    fst::convert_host(in.data(), from, dst, to, count, nt, mode);
  }
  return result;
}

}  // namespace

void register_convert(py::module_& m) {
  py::list modes;
  for (unsigned i = 0; i < fst::kConvertModeCount; ++i)
    modes.append(py::str(std::string(fst::convert_mode_name(static_cast<fst::ConvertMode>(i)))));
  m.attr("CONVERT_MODES") = py::tuple(modes);
  m.def("convert", &convert, py::arg("src"), py::arg("src_dtype"), py::arg("dst_dtype"),
        py::arg("threads") = 0, py::arg("out") = py::none(), py::arg("mode") = "torch",
        "Convert the elements of a contiguous buffer from src_dtype to dst_dtype (safetensors\n"
        "dtype names such as \"BF16\", \"F8_E4M3\"), bit-identical to the CPU conversion of the\n"
        "reference `mode` names (one of CONVERT_MODES: \"torch\", torch 2.13's tensor.to();\n"
        "\"torch-fp8-nan\", torch 2.11's; \"numpy\", astype with ml_dtypes; \"jax\", XLA's CPU\n"
        "astype). Returns a new bytearray, or writes into `out` (a writable contiguous buffer of\n"
        "exactly the converted size, not overlapping src) and returns it. threads=0 uses every\n"
        "hardware thread. The GIL is released while converting.");
  m.def(
      "convert_on_device",
      [](int device, std::uint64_t src, const std::string& src_dtype, std::uint64_t dst,
         const std::string& dst_dtype, std::uint64_t count, unsigned repeats,
         const std::string& mode_name) {
        const fst::Dtype from = parse_dtype(src_dtype), to = parse_dtype(dst_dtype);
        const fst::ConvertMode mode = parse_mode(mode_name);
        py::gil_scoped_release nogil;
        fst::convert_on_device(device, src, from, dst, to, count, repeats, mode);
      },
      py::arg("device"), py::arg("src"), py::arg("src_dtype"), py::arg("dst"), py::arg("dst_dtype"),
      py::arg("count"), py::arg("repeats") = 1, py::arg("mode") = "torch",
      "Convert `count` elements at device address src into dst on CUDA device `device` with\n"
      "fst's batched conversion kernel by the rules of `mode` (as convert()), `repeats`\n"
      "launches in a row on the legacy default stream, and wait for them. Addresses come from\n"
      "the framework (torch: data_ptr()).");
  m.def(
      "move_on_device",
      [](int device, const std::vector<std::tuple<std::uint64_t, std::uint64_t, std::uint64_t>>& moves,
         unsigned repeats) {
        std::vector<fst::DeviceMove> list;
        list.reserve(moves.size());
        for (const auto& [src, dst, bytes] : moves) list.push_back(fst::DeviceMove{src, dst, bytes});
        py::gil_scoped_release nogil;
        fst::move_on_device(device, list, repeats);
      },
      py::arg("device"), py::arg("moves"), py::arg("repeats") = 1,
      "Copy each (src, dst, bytes) of device addresses on CUDA device `device` with fst's batched\n"
      "move kernel, all in one launch (`repeats` launches in a row), and wait. Destinations must\n"
      "not overlap any source or other destination.");
  m.def(
      "conversion_supported",
      [](const std::string& src_dtype, const std::string& dst_dtype) {
        return fst::conversion_supported(parse_dtype(src_dtype), parse_dtype(dst_dtype));
      },
      py::arg("src_dtype"), py::arg("dst_dtype"),
      "Whether convert() supports this pair of dtype names.");
}

}  // namespace fst::bindings
