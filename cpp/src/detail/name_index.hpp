// A hash set of element indices keyed by the elements' names, with open addressing: one flat
// array of 64-bit slots (32 bits of the name's hash beside the index) instead of one heap node
// per name, which matters with 250,000 tensors. The stored hash bits settle almost every
// probe without touching the names; `name_of(i)` fetches element i's name when needed.
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
  static constexpr std::uint32_t kEmpty = UINT32_MAX;

  NameIndex(std::size_t expected, NameOf name_of) : name_of_(std::move(name_of)) { rehash(expected * 2 + 16); }

  // Adds element `i`; if an element of the same name is already there, returns
  // {that element, false} and leaves the set unchanged.
  std::pair<std::uint32_t, bool> insert(std::uint32_t i) {
    if ((size_ + 1) * 2 > slots_.size()) rehash(slots_.size() * 2);
    std::string_view name = name_of_(i);
    const std::size_t h = hash(name);
    const auto tag = static_cast<std::uint32_t>(h >> 32);
    for (std::size_t s = h & mask_;; s = (s + 1) & mask_) {
      if (slots_[s] == kFree) {
        slots_[s] = pack(tag, i);
        ++size_;
        return {i, true};
      }
      if (tag_of(slots_[s]) == tag && name_of_(index_of(slots_[s])) == name) return {index_of(slots_[s]), false};
    }
  }

  // The element named `name`, or kEmpty.
  std::uint32_t find(std::string_view name) const {
    const std::size_t h = hash(name);
    const auto tag = static_cast<std::uint32_t>(h >> 32);
    for (std::size_t s = h & mask_;; s = (s + 1) & mask_) {
      if (slots_[s] == kFree) return kEmpty;
      if (tag_of(slots_[s]) == tag && name_of_(index_of(slots_[s])) == name) return index_of(slots_[s]);
    }
  }

 private:
  static constexpr std::uint64_t kFree = UINT64_MAX;
  static std::size_t hash(std::string_view s) noexcept { return std::hash<std::string_view>()(s); }
  static std::uint64_t pack(std::uint32_t tag, std::uint32_t i) noexcept { return (std::uint64_t{tag} << 32) | i; }
  static std::uint32_t tag_of(std::uint64_t slot) noexcept { return static_cast<std::uint32_t>(slot >> 32); }
  static std::uint32_t index_of(std::uint64_t slot) noexcept { return static_cast<std::uint32_t>(slot); }

  void rehash(std::size_t want) {
    std::size_t cap = 16;
    while (cap < want) cap *= 2;
    std::vector<std::uint64_t> old = std::move(slots_);
    slots_.assign(cap, kFree);
    mask_ = cap - 1;
    for (std::uint64_t slot : old) {
      if (slot == kFree) continue;
      // The bucket comes from the low hash bits, which the slot does not keep: hash again.
      std::size_t s = hash(name_of_(index_of(slot))) & mask_;
      while (slots_[s] != kFree) s = (s + 1) & mask_;
      slots_[s] = slot;
    }
  }

  NameOf name_of_;
  std::vector<std::uint64_t> slots_;
  std::size_t mask_ = 0;
  std::size_t size_ = 0;
};

}  // namespace fst::detail
