#pragma once

#include <chrono>

namespace fst::detail {

// Monotonic seconds, for load timings.
inline double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

}  // namespace fst::detail
