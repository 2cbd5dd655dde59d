// Plan: a checkpoint's files and tensors (Checkpoint), the tensors picked from it (Selection)
// with the dtypes the rules give them, groups of a byte budget, and the GDS plan for tests.
#include <pybind11/stl.h>

#include <algorithm>
#include <unordered_map>

#include "bindings.hpp"
#include "fst/errors.hpp"
#include "fst/header.hpp"

namespace fst::bindings {

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

std::uint64_t PySelection::nbytes() const {
  std::uint64_t n = 0;
  for (const Pick& p : picks) n += ckpt->extent(p).nbytes;
  return n;
}

py::list unindexed_names(const Checkpoint& ckpt) {
  py::list out;
  for (TensorRef r : ckpt.unindexed()) out.append(py::str(ckpt.entry(r).name));
  return out;
}

const FileHeader& PyCheckpoint::file(std::size_t i) const {
  if (i >= ckpt->files().size()) throw py::index_error("file index out of range");
  return ckpt->files()[i];
}

py::list PyCheckpoint::names(bool sorted) const {
  std::vector<const std::string*> names;
  names.reserve(ckpt->all().size());
  for (TensorRef r : ckpt->all()) names.push_back(&ckpt->entry(r).name);
  if (sorted) std::sort(names.begin(), names.end(), [](auto* a, auto* b) { return *a < *b; });
  py::list out(names.size());
  for (std::size_t i = 0; i < names.size(); ++i) out[i] = py::str(*names[i]);
  return out;
}

py::tuple PyCheckpoint::info(const std::string& name) const {
  TensorRef r = ref(name);
  const TensorEntry& e = ckpt->entry(r);
  return py::make_tuple(std::string(dtype_name(e.dtype)), py::tuple(py::cast(e.shape)),
                        py::make_tuple(e.begin, e.end), r.file);
}

namespace {

// fst._core.TensorRecord: one tensor of the headers, a named tuple (a struct sequence, which
// builds as fast as a plain tuple: entries() makes 250,000 of them for a large checkpoint).
PyStructSequence_Field record_fields[] = {
    {"name", "the tensor's name"},
    {"dtype", "its dtype in the file (a format name such as \"BF16\")"},
    {"shape", "its shape, a tuple"},
    {"begin", "first byte within its file's data section"},
    {"end", "end of its bytes within its file's data section"},
    {"file", "index of its file in the checkpoint"},
    {"offset", "absolute offset of its first byte in that file"},
    {nullptr, nullptr},
};
PyStructSequence_Desc record_desc = {"fst._core.TensorRecord", "One tensor of a checkpoint's headers.",
                                     record_fields, 7};
PyTypeObject* record_type = nullptr;

}  // namespace

py::list PyCheckpoint::entries() const {
  py::list out(ckpt->all().size());
  std::size_t i = 0;
  for (TensorRef r : ckpt->all()) {
    const TensorEntry& e = ckpt->entry(r);
    py::object fields[] = {py::str(e.name), py::str(dtype_name(e.dtype)), py::tuple(py::cast(e.shape)),
                           py::int_(e.begin), py::int_(e.end), py::int_(r.file),
                           py::int_(ckpt->absolute_offset(r))};
    PyObject* record = PyStructSequence_New(record_type);
    if (!record) throw py::error_already_set();
    for (Py_ssize_t k = 0; k < 7; ++k) PyStructSequence_SetItem(record, k, fields[k].release().ptr());
    out[i++] = py::reinterpret_steal<py::object>(record);
  }
  return out;
}

py::object PyCheckpoint::metadata(std::size_t i) const {
  const FileHeader& h = file(i);
  if (!h.has_metadata) return py::none();
  py::dict d;
  for (const auto& [k, v] : h.metadata) d[py::str(k)] = py::str(v);
  return d;
}

PySelection PyCheckpoint::select(const std::optional<std::vector<std::string>>& patterns) const {
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

PySelection PyCheckpoint::select_rows(
    const std::vector<std::tuple<std::string, std::uint64_t, std::uint64_t>>& rows) const {
  std::vector<Pick> picks;
  picks.reserve(rows.size());
  for (const auto& [name, first, count] : rows) {
    Pick p{ref(name), first, count};
    ckpt->extent(p);  // bounds check now, with the tensor's name in the error
    picks.push_back(p);
  }
  return PySelection{ckpt, std::move(picks), {}};
}

namespace {

void register_dtypes(py::module_& m) {
  py::list dtype_names;
  for (int i = 0; i < kDtypeCount; ++i) dtype_names.append(std::string(dtype_name(static_cast<Dtype>(i))));
  m.attr("DTYPE_NAMES") = dtype_names;
  m.attr("MAX_HEADER_LEN") = kMaxHeaderLen;
  m.def("dtype_bits", [](const std::string& name) {
    auto d = dtype_from_name(name);
    if (!d) throw py::value_error("unknown dtype '" + name + "'");
    return dtype_bits(*d);
  });
  m.def("group_starts", &group_starts, py::arg("sizes"), py::arg("budget"),
        "Index of the first item of each group of consecutive items whose sizes add up to at most\n"
        "`budget` (an item larger than the budget is a group of its own): Selection.split's rule.");
  m.def("name_matches", &name_matches, py::arg("pattern"), py::arg("name"),
        "Whether `name` is `pattern` or matches it as a glob (POSIX fnmatch rules, no flags): the\n"
        "one rule of every name pattern fst takes (keys=, dtype=, shard=, sharding=).");
}

void register_selection(py::module_& m) {
  py::class_<PySelection>(m, "Selection")
      .def("__len__", [](const PySelection& s) { return s.picks.size(); })
      // The same picks, each to be converted to the dtype the rules give it after reading.
      .def("with_dtypes", [](const PySelection& s, const std::optional<std::string>& floating_default,
                             const std::vector<std::pair<std::string, std::string>>& rules,
                             const std::string& mode) {
        return PySelection{s.ckpt, s.picks, target_dtypes(*s.ckpt, s.picks, make_rules(floating_default, rules)),
                           parse_mode(mode)};
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
        std::vector<std::uint64_t> sizes;
        sizes.reserve(s.picks.size());
        for (const Pick& p : s.picks) sizes.push_back(s.ckpt->extent(p).nbytes);
        const std::vector<std::size_t> starts = group_starts(sizes, budget);
        std::vector<PySelection> groups;
        for (std::size_t g = 0; g < starts.size(); ++g) {
          const std::size_t first = starts[g], last = g + 1 < starts.size() ? starts[g + 1] : s.picks.size();
          PySelection group{s.ckpt, {s.picks.begin() + first, s.picks.begin() + last}, {}, s.mode};
          if (!s.targets.empty()) group.targets.assign(s.targets.begin() + first, s.targets.begin() + last);
          groups.push_back(std::move(group));
        }
        return groups;
      }, py::arg("budget"))
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
         py::arg("merge_gap") = 1u << 20);
}

void register_checkpoint(py::module_& m) {
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
      .def("check_unchanged", [](const PyCheckpoint& c, std::size_t i) {
        // Raises FstError naming file i when its size or mtime are no longer the parsed
        // version's: for readers that copy out of a mapping, where read_into's check is not made.
        c.file(i).file->check_unchanged();
      }, py::arg("file"))
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
      .def("select_rows", &PyCheckpoint::select_rows, py::arg("rows"));
}

}  // namespace

void register_plan(py::module_& m) {
  record_type = PyStructSequence_NewType(&record_desc);
  if (!record_type) throw py::error_already_set();
  m.attr("TensorRecord") = py::reinterpret_steal<py::object>(reinterpret_cast<PyObject*>(record_type));
  register_dtypes(m);
  register_selection(m);
  register_checkpoint(m);
}

}  // namespace fst::bindings
