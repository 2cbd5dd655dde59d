// A hash set of element indices keyed by the elements' names, with open addressing: one flat
// array of 32-bit slots instead of one heap node per name, which matters with 250,000 tensors.
// The names stay where they are; `name_of(i)` fetches element i's name when needed.
#pragma once

#include <cstdint>
#include <functional>
#include <string_view>
#include <utility>
#include <vector>

namespace fst::detail {

template <class NameOf>
class NameIndex {
 public:
  NameIndex(std::size_t expected, NameOf name_of) : name_of_(std::move(name_of)) { rehash(expected * 2 + 16); }

  // Adds element `i`; if an element of the same name is already there, returns
  // {that element, false} and leaves the set unchanged.
  std::pair<std::uint32_t, bool> insert(std::uint32_t i) {
    if ((size_ + 1) * 2 > slots_.size()) rehash(slots_.size() * 2);
    std::string_view name = name_of_(i);
    for (std::size_t s = hash(name) & mask_;; s = (s + 1) & mask_) {
      if (slots_[s] == kEmpty) {
        slots_[s] = i;
        ++size_;
        return {i, true};
      }
      if (name_of_(slots_[s]) == name) return {slots_[s], false};
    }
  }

  // The element named `name`, or kEmpty.
  std::uint32_t find(std::string_view name) const {
    for (std::size_t s = hash(name) & mask_;; s = (s + 1) & mask_) {
      if (slots_[s] == kEmpty || name_of_(slots_[s]) == name) return slots_[s];
    }
  }

  static constexpr std::uint32_t kEmpty = UINT32_MAX;

 private:
  static std::size_t hash(std::string_view s) noexcept { return std::hash<std::string_view>()(s); }

  void rehash(std::size_t want) {
    std::size_t cap = 16;
    while (cap < want) cap *= 2;
    std::vector<std::uint32_t> old = std::move(slots_);
    slots_.assign(cap, kEmpty);
    mask_ = cap - 1;
    for (std::uint32_t i : old) {
      if (i == kEmpty) continue;
      std::size_t s = hash(name_of_(i)) & mask_;
      while (slots_[s] != kEmpty) s = (s + 1) & mask_;
      slots_[s] = i;
    }
  }

  NameOf name_of_;
  std::vector<std::uint32_t> slots_;
  std::size_t mask_ = 0;
  std::size_t size_ = 0;
};

}  // namespace fst::detail
