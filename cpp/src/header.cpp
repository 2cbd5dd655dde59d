#include "fst/header.hpp"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <numeric>
#include <unordered_map>

#include "detail/json_reader.hpp"
#include "detail/posix_file.hpp"
#include "fst/errors.hpp"

namespace fst {

std::uint64_t TensorEntry::numel() const noexcept {
  std::uint64_t n = 1;
  for (auto d : shape) n *= d;
  return n;
}

namespace {

using detail::JsonReader;
using detail::JsonSyntaxError;

// A JSON value of the wrong shape: the reference reports it as a deserialization error.
struct SchemaError {
  std::string what;
};

std::uint64_t read_u64(JsonReader& r, const char* field) {
  const char* kind = "";
  char c = r.peek();
  if (c != '-' && (c < '0' || c > '9')) {
    r.skip_value();
    throw SchemaError{std::string(field) + " must hold unsigned integers"};
  }
  auto v = r.read_unsigned(kind);
  if (!v) throw SchemaError{std::string(field) + " holds a " + kind + ", expected an unsigned integer"};
  return *v;
}

void read_u64_list(JsonReader& r, std::vector<std::uint64_t>& out, const char* field) {
  out.clear();
  if (!r.consume('[')) {
    r.skip_value();
    throw SchemaError{std::string(field) + " must be an array"};
  }
  r.enter();
  if (!r.consume(']')) {
    do out.push_back(read_u64(r, field));
    while (r.consume(','));
    r.expect(']', "',' or ']'");
  }
  r.leave();
}

Dtype read_dtype(JsonReader& r, std::string& scratch) {
  // serde also takes a unit enum variant as a map of one entry to null: {"F32": null}.
  if (r.consume('{')) {
    r.enter();
    std::size_t entries = 0;
    bool unit = false;
    std::string key;
    if (!r.consume('}')) {
      do {
        if (r.peek() != '"') r.fail("key must be a string");
        r.read_string(key);
        r.expect(':', "':'");
        if (++entries == 1) {
          scratch = key;
          unit = r.consume_literal("null");
          if (!unit) r.skip_value();
        } else {
          r.skip_value();
        }
      } while (r.consume(','));
      r.expect('}', "',' or '}'");
    }
    r.leave();
    if (entries != 1 || !unit) throw SchemaError{"dtype given as a map must be {\"NAME\": null}"};
  } else if (r.peek() != '"') {
    r.skip_value();
    throw SchemaError{"dtype must be a string"};
  } else {
    r.read_string(scratch);
  }
  auto d = dtype_from_name(scratch);
  if (!d) throw SchemaError{"unknown dtype '" + scratch + "'"};
  return *d;
}

void read_offsets(JsonReader& r, TensorEntry& t, std::vector<std::uint64_t>& scratch) {
  read_u64_list(r, scratch, "data_offsets");
  if (scratch.size() != 2)
    throw SchemaError{"data_offsets must have 2 elements, not " + std::to_string(scratch.size())};
  t.begin = scratch[0];
  t.end = scratch[1];
}

// One tensor entry: an object with dtype, shape and data_offsets (other fields ignored), or,
// as serde also accepts for a struct, an array of exactly those three in that order.
void read_tensor(JsonReader& r, TensorEntry& t, std::string& scratch,
                 std::vector<std::uint64_t>& offsets) {
  if (r.consume('[')) {
    r.enter();
    const char* missing = nullptr;
    if (r.peek() == ']') missing = "dtype";
    else {
      t.dtype = read_dtype(r, scratch);
      if (!r.consume(',')) missing = "shape";
      else {
        read_u64_list(r, t.shape, "shape");
        if (!r.consume(',')) missing = "data_offsets";
        else read_offsets(r, t, offsets);
      }
    }
    if (missing) {
      r.expect(']', "',' or ']'");
      throw SchemaError{std::string("missing field `") + missing + "`"};
    }
    if (r.peek() != ']') throw SchemaError{"tensor entry array has more than 3 elements"};
    r.expect(']', "']'");
    r.leave();
    return;
  }
  if (!r.consume('{')) {
    r.skip_value();
    throw SchemaError{"tensor entry must be an object"};
  }
  r.enter();
  bool has_dtype = false, has_shape = false, has_offsets = false;
  std::string key;
  if (!r.consume('}')) {
    do {
      if (r.peek() != '"') r.fail("key must be a string");
      r.read_string(key);
      r.expect(':', "':'");
      bool* seen = nullptr;
      if (key == std::string_view("dtype")) {
        seen = &has_dtype;
        if (*seen) throw SchemaError{"duplicate field `dtype`"};
        t.dtype = read_dtype(r, scratch);
      } else if (key == std::string_view("shape")) {
        seen = &has_shape;
        if (*seen) throw SchemaError{"duplicate field `shape`"};
        read_u64_list(r, t.shape, "shape");
      } else if (key == std::string_view("data_offsets")) {
        seen = &has_offsets;
        if (*seen) throw SchemaError{"duplicate field `data_offsets`"};
        read_offsets(r, t, offsets);
      } else {
        r.skip_value();
      }
      if (seen) *seen = true;
    } while (r.consume(','));
    r.expect('}', "',' or '}'");
  }
  r.leave();
  if (!has_dtype) throw SchemaError{"missing field `dtype`"};
  if (!has_shape) throw SchemaError{"missing field `shape`"};
  if (!has_offsets) throw SchemaError{"missing field `data_offsets`"};
}

void read_metadata(JsonReader& r, FileHeader& h) {
  if (r.consume_literal("null")) return;
  if (!r.consume('{')) {
    r.skip_value();
    throw SchemaError{"__metadata__ must be a map of string to string"};
  }
  r.enter();
  h.has_metadata = true;
  std::unordered_map<std::string, std::size_t> index;
  if (!r.consume('}')) {
    std::string key, value;
    do {
      if (r.peek() != '"') r.fail("key must be a string");
      r.read_string(key);
      r.expect(':', "':'");
      if (r.peek() != '"') {
        r.skip_value();
        throw SchemaError{"__metadata__ value for '" + key + "' must be a string"};
      }
      r.read_string(value);
      auto [it, inserted] = index.emplace(key, h.metadata.size());
      if (inserted) h.metadata.emplace_back(key, value);
      else h.metadata[it->second].second = value;  // last one wins, as in the reference
    } while (r.consume(','));
    r.expect('}', "',' or '}'");
  }
  r.leave();
}

// The reference keeps tensors in a map: a name given twice keeps its last entry. Repeats are
// found by hashing every name once, then within 256 partitions of the hashes, each small
// enough to stay in cache (one table for 250,000 names missed the cache on every probe).
void drop_repeated_names(std::vector<TensorEntry>& tensors) {
  const std::size_t n = tensors.size();
  if (n < 2) return;
  std::vector<std::uint64_t> hashes(n);
  for (std::size_t i = 0; i < n; ++i) hashes[i] = std::hash<std::string_view>()(tensors[i].name);
  constexpr std::size_t kParts = 256;
  std::vector<std::uint32_t> start(kParts + 1, 0);
  for (std::uint64_t h : hashes) ++start[(h >> 56) + 1];
  for (std::size_t p = 0; p < kParts; ++p) start[p + 1] += start[p];
  std::vector<std::uint32_t> order(n), cursor(start.begin(), start.end() - 1);
  for (std::uint32_t i = 0; i < n; ++i) order[cursor[hashes[i] >> 56]++] = i;  // stable: file order kept

  constexpr std::uint32_t kFree = UINT32_MAX;
  std::vector<bool> dead(n, false);
  bool any = false;
  std::vector<std::uint32_t> table;
  for (std::size_t p = 0; p < kParts; ++p) {
    const std::size_t count = start[p + 1] - start[p];
    if (count < 2) continue;
    std::size_t cap = 16;
    while (cap < 2 * count) cap *= 2;
    table.assign(cap, kFree);
    for (std::size_t k = start[p]; k < start[p + 1]; ++k) {
      const std::uint32_t i = order[k];
      std::size_t s = hashes[i] & (cap - 1);
      for (;; s = (s + 1) & (cap - 1)) {
        const std::uint32_t j = table[s];
        if (j == kFree) {
          table[s] = i;
          break;
        }
        if (hashes[j] == hashes[i] && tensors[j].name == tensors[i].name) {
          dead[j] = true;  // the later entry replaces it
          table[s] = i;
          any = true;
          break;
        }
      }
    }
  }
  if (!any) return;
  std::size_t out = 0;
  for (std::size_t i = 0; i < n; ++i)
    if (!dead[i]) {
      if (out != i) tensors[out] = std::move(tensors[i]);
      ++out;
    }
  tensors.resize(out);
}

[[noreturn]] void json_error(const std::string& path, const std::string& tensor,
                             const std::string& what, std::size_t pos) {
  throw HeaderError(path, tensor, HeaderRule::InvalidJson,
                    what + " at header byte " + std::to_string(pos));
}

// Parses the JSON into h.tensors (file order not yet established; duplicates resolved).
void parse_json(FileHeader& h, std::string_view json) {
  JsonReader r(json);
  std::string key;                        // the entry being read
  const std::string* current = nullptr;   // the tensor being read, for error messages
  try {
    r.expect('{', "a JSON object");
    r.enter();
    bool seen_metadata = false;
    // Reserving by a small entry size (64 bytes of JSON) avoids regrowing for large headers.
    h.tensors.reserve(json.size() / 64 + 16);
    std::string scratch;
    std::vector<std::uint64_t> offsets;
    if (!r.consume('}')) {
      do {
        if (r.peek() != '"') r.fail("key must be a string");
        r.read_string(key);
        r.expect(':', "':'");
        if (key == std::string_view("__metadata__")) {
          if (seen_metadata) throw SchemaError{"duplicate field `__metadata__`"};
          seen_metadata = true;
          read_metadata(r, h);
          continue;
        }
        current = &key;
        TensorEntry t;
        read_tensor(r, t, scratch, offsets);
        current = nullptr;  // errors after this entry are not about this tensor
        t.name = std::move(key);
        key = std::string();
        h.tensors.push_back(std::move(t));
      } while (r.consume(','));
      r.expect('}', "',' or '}'");
    }
    r.leave();
    r.finish();
    drop_repeated_names(h.tensors);
  } catch (const JsonSyntaxError& e) {
    json_error(h.path, current ? *current : std::string(), e.what(), e.pos());
  } catch (const SchemaError& e) {
    json_error(h.path, current ? *current : std::string(), e.what, r.pos());
  }
}

bool mul_overflows(std::uint64_t a, std::uint64_t b, std::uint64_t& out) {
  return __builtin_mul_overflow(a, b, &out);
}

// The reference's validation: in offset order, tensors tile the data buffer exactly.
void validate(FileHeader& h) {
  auto by_offsets = [](const TensorEntry& a, const TensorEntry& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  };
  // Writers usually list tensors in offset order already: then there is nothing to move.
  if (!std::is_sorted(h.tensors.begin(), h.tensors.end(), by_offsets))
    std::stable_sort(h.tensors.begin(), h.tensors.end(), by_offsets);
  std::uint64_t start = 0;
  for (const TensorEntry& t : h.tensors) {
    if (t.begin != start || t.end < t.begin)
      throw HeaderError(h.path, t.name, HeaderRule::InvalidOffset,
                        "data_offsets [" + std::to_string(t.begin) + ", " + std::to_string(t.end) +
                            "] do not continue at byte " + std::to_string(start) +
                            " (tensors must tile the data buffer without holes or overlaps)");
    start = t.end;
    std::uint64_t numel = 1, bits = 0;
    for (auto d : t.shape)
      if (mul_overflows(numel, d, numel))
        throw HeaderError(h.path, t.name, HeaderRule::Overflow, "shape product overflows 64 bits");
    if (mul_overflows(numel, dtype_bits(t.dtype), bits))
      throw HeaderError(h.path, t.name, HeaderRule::Overflow, "size in bits overflows 64 bits");
    if (bits % 8 != 0)
      throw HeaderError(h.path, t.name, HeaderRule::MisalignedSubByte,
                        std::to_string(numel) + " elements of " + std::string(dtype_name(t.dtype)) +
                            " do not fill whole bytes");
    if (t.end - t.begin != bits / 8)
      throw HeaderError(h.path, t.name, HeaderRule::InvalidTensorInfo,
                        "data_offsets span " + std::to_string(t.end - t.begin) + " bytes but " +
                            std::string(dtype_name(t.dtype)) + " of this shape needs " +
                            std::to_string(bits / 8));
  }
  // 8 + N + start cannot overflow: N <= 1e8 and start was checked against the file below.
  if (start > h.file_size || h.data_start() + start != h.file_size)
    throw HeaderError(h.path, "", HeaderRule::IncompleteBuffer,
                      "header + tensors need " + std::to_string(h.data_start()) + " + " +
                          std::to_string(start) + " bytes but the file has " +
                          std::to_string(h.file_size));
}

}  // namespace

FileHeader parse_header(std::string path, std::string_view json, std::uint64_t file_size) {
  FileHeader h;
  h.path = std::move(path);
  h.header_len = json.size();
  h.file_size = file_size;
  if (!detail::is_valid_utf8(json))
    throw HeaderError(h.path, "", HeaderRule::InvalidUtf8, "the header is not valid UTF-8");
  parse_json(h, json);
  validate(h);
  return h;
}

namespace {
std::atomic<std::uint64_t> headers_read_count{0};
}

std::uint64_t headers_read() noexcept { return headers_read_count.load(std::memory_order_relaxed); }

FileHeader read_header(const std::string& path) {
  headers_read_count.fetch_add(1, std::memory_order_relaxed);
  auto file = FileHandle::open(path);
  const std::uint64_t size = file->identity().size;
  if (size < 8)
    throw HeaderError(path, "", HeaderRule::HeaderTooSmall,
                      "the file has " + std::to_string(size) + " bytes, fewer than the 8-byte length");
  unsigned char len_bytes[8];
  detail::read_exact(file->fd(), path, len_bytes, 8, 0);
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | len_bytes[i];
  if (n > kMaxHeaderLen)
    throw HeaderError(path, "", HeaderRule::HeaderTooLarge,
                      "header length " + std::to_string(n) + " exceeds the limit of " +
                          std::to_string(kMaxHeaderLen));
  if (8 + n > size)
    throw HeaderError(path, "", HeaderRule::InvalidHeaderLength,
                      "header length " + std::to_string(n) + " runs past the end of the file (" +
                          std::to_string(size) + " bytes)");
  std::string json(n, '\0');
  detail::read_exact(file->fd(), path, json.data(), n, 8);
  FileHeader header = parse_header(path, json, size);
  header.file = std::move(file);
  return header;
}

}  // namespace fst
