// Exceptions thrown by the fst core. Each carries the context a user needs to act on it:
// the file, the tensor and the rule for a malformed header; errno, operation and path for I/O.
#pragma once

#include <stdexcept>
#include <string>

namespace fst {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// The rules of the safetensors format, named as the reference implementation names its errors.
enum class HeaderRule {
  HeaderTooSmall,
  HeaderTooLarge,
  InvalidHeaderLength,
  InvalidUtf8,
  InvalidJson,
  InvalidOffset,
  Overflow,
  MisalignedSubByte,
  InvalidTensorInfo,
  IncompleteBuffer,
  DuplicateTensor,  // fst only: the same name in two files of one checkpoint
};
const char* header_rule_name(HeaderRule rule) noexcept;

class HeaderError : public Error {
 public:
  HeaderError(std::string file, std::string tensor, HeaderRule rule, const std::string& detail);
  const std::string& file() const noexcept { return file_; }
  const std::string& tensor() const noexcept { return tensor_; }
  HeaderRule rule() const noexcept { return rule_; }

 private:
  std::string file_, tensor_;
  HeaderRule rule_;
};

class IoError : public Error {
 public:
  IoError(int err, std::string op, std::string path);
  int err() const noexcept { return errno_; }
  const std::string& path() const noexcept { return path_; }

 private:
  int errno_;
  std::string path_;
};

// A requested feature or backend is not available here (with the reason).
class UnsupportedError : public Error {
 public:
  using Error::Error;
};

// A tensor name asked for by exact name is not in the checkpoint (KeyError in Python).
class KeyNotFoundError : public Error {
 public:
  explicit KeyNotFoundError(const std::string& name) : Error(name) {}
};

// A CUDA driver or cuFile call failed.
class CudaError : public Error {
 public:
  using Error::Error;
};

}  // namespace fst
