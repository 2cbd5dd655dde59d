// Plan, step one: the header of one safetensors file, parsed and validated strictly as the
// reference implementation does (see README "Format rules").
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "fst/dtype.hpp"
#include "fst/file_handle.hpp"

namespace fst {

struct TensorEntry {
  std::string name;
  Dtype dtype;
  std::vector<std::uint64_t> shape;
  std::uint64_t begin = 0;  // data_offsets, relative to the start of the data buffer
  std::uint64_t end = 0;

  std::uint64_t nbytes() const noexcept { return end - begin; }
  std::uint64_t numel() const noexcept;
};

struct FileHeader {
  std::string path;
  // The descriptor the header was read from: every read of the data goes through it (null
  // for a header parsed from memory).
  std::shared_ptr<const FileHandle> file;
  std::uint64_t header_len = 0;  // N, the JSON length
  std::uint64_t file_size = 0;
  std::vector<TensorEntry> tensors;  // sorted by data offsets (file order)
  bool has_metadata = false;         // false when absent or null
  std::vector<std::pair<std::string, std::string>> metadata;

  std::uint64_t data_start() const noexcept { return 8 + header_len; }
  std::uint64_t data_size() const noexcept { return file_size - data_start(); }
};

// Largest header the reference accepts.
inline constexpr std::uint64_t kMaxHeaderLen = 100'000'000;

// Validates `json` (the N header bytes) of a file of `file_size` bytes. Throws HeaderError.
FileHeader parse_header(std::string path, std::string_view json, std::uint64_t file_size);

// Opens `path` (a regular file), reads and validates its header, and keeps the descriptor.
// Throws HeaderError or IoError.
FileHeader read_header(const std::string& path);

// Headers read_header has read in this process: what the tests count to prove that a load
// parses each header once.
std::uint64_t headers_read() noexcept;

}  // namespace fst
