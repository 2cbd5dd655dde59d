#include "fst/errors.hpp"

#include <cstring>

namespace fst {

const char* header_rule_name(HeaderRule rule) noexcept {
  switch (rule) {
    case HeaderRule::HeaderTooSmall: return "header too small";
    case HeaderRule::HeaderTooLarge: return "header too large";
    case HeaderRule::InvalidHeaderLength: return "invalid header length";
    case HeaderRule::InvalidUtf8: return "invalid UTF-8";
    case HeaderRule::InvalidJson: return "invalid JSON";
    case HeaderRule::InvalidOffset: return "invalid offset";
    case HeaderRule::Overflow: return "overflow";
    case HeaderRule::MisalignedSubByte: return "misaligned sub-byte";
    case HeaderRule::InvalidTensorInfo: return "invalid tensor info";
    case HeaderRule::IncompleteBuffer: return "incomplete buffer";
    case HeaderRule::DuplicateTensor: return "duplicate tensor";
  }
  return "unknown";
}

static std::string header_message(const std::string& file, const std::string& tensor,
                                  HeaderRule rule, const std::string& detail) {
  std::string msg = file + ": " + header_rule_name(rule);
  if (!tensor.empty()) msg += " (tensor '" + tensor + "')";
  if (!detail.empty()) msg += ": " + detail;
  return msg;
}

HeaderError::HeaderError(std::string file, std::string tensor, HeaderRule rule,
                         const std::string& detail)
    : Error(header_message(file, tensor, rule, detail)),
      file_(std::move(file)), tensor_(std::move(tensor)), rule_(rule) {}

IoError::IoError(int err, std::string op, std::string path)
    : Error(op + " '" + path + "': " + std::strerror(err)), errno_(err), path_(std::move(path)) {}

}  // namespace fst
