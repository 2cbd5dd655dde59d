// RAII handle on a shared library opened with dlopen.
#pragma once

#include <dlfcn.h>

#include <string>

namespace fst::shim {

class DlLibrary {
 public:
  DlLibrary() = default;
  explicit DlLibrary(const char* name) : handle_(::dlopen(name, RTLD_NOW | RTLD_LOCAL)) {
    if (!handle_) {
      const char* e = ::dlerror();
      error_ = e ? e : "dlopen failed";
    }
  }
  ~DlLibrary() {
    if (handle_) ::dlclose(handle_);
  }
  DlLibrary(const DlLibrary&) = delete;
  DlLibrary& operator=(const DlLibrary&) = delete;

  bool loaded() const noexcept { return handle_ != nullptr; }
  const std::string& error() const noexcept { return error_; }
  template <class Fn>
  Fn symbol(const char* name) const noexcept {
    return handle_ ? reinterpret_cast<Fn>(::dlsym(handle_, name)) : nullptr;
  }

 private:
  void* handle_ = nullptr;
  std::string error_;
};

}  // namespace fst::shim
