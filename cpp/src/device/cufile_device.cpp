// The GPU Direct Storage device of a GdsLoad: cuFileRead into a registered device buffer, then
// the embedded batch kernels place (fst_move_batch) and convert (fst_convert_batch) the tensors.
#include <cerrno>
#include <cstring>
#include <optional>

#include "detail/fatbin.hpp"
#include "detail/kernel_abi.hpp"
#include "fst/cuda.hpp"
#include "fst/errors.hpp"
#include "fst/gds.hpp"
#include "shim/cuda_api.hpp"
#include "device/cuda_device.hpp"
#include "shim/cufile_api.hpp"

namespace fst {

namespace {

using namespace cuda;

class CufileDevice final : public GdsDevice {
 public:
  CufileDevice(int device, const cufile::Library& lib)
      : device_(device), lib_(lib), session_(cufile::Session::shared(lib)), stream_(device) {}

  ~CufileDevice() override {
    // No kernel may still read the bulk buffer when it goes, and cuFile deregisters in the
    // device's context (the destructor may run on any thread).
    // A failed synchronisation (a sticky device error) must not skip the deregistrations:
    // each step is tried on its own, all in the device's context where there is one.
    std::optional<ScopedDevice> scope;
    try {
      scope.emplace(device_);
    } catch (...) {
      // The driver may already be shut down at interpreter exit.
    }
    try {
      stream_.synchronize();
    } catch (...) {
    }
    registration_.reset();
    files_.clear();
  }

  void open_file(std::uint32_t file, std::shared_ptr<const FileHandle> source) override {
    ScopedDevice scope(device_);
    if (files_.size() <= file) files_.resize(file + 1);
    // Registered by an earlier group of the same stream: the very descriptor it parsed.
    if (files_[file] && &files_[file]->source() == source.get()) return;
    files_[file].reset();
    files_[file] = std::make_unique<cufile::RegisteredFile>(lib_, std::move(source));
  }

  std::shared_ptr<Buffer> allocate(std::uint64_t bytes) override { return make_device_arena(device_, bytes); }

  std::uint64_t bulk_buffer(std::uint64_t bytes) override {
    if (bulk_memory_ && bulk_bytes_ >= bytes) return bulk_;  // registered already, if it could be
    ScopedDevice scope(device_);
    registration_.reset();
    bulk_memory_.reset();
    // One spare page so the buffer can start on a page boundary whatever cuMemAlloc returns.
    bulk_memory_ = make_device_arena(device_, bytes + detail::kDirectAlign);
    bulk_bytes_ = bytes;
    ++bulk_allocations_;
    bulk_ = align_up(reinterpret_cast<std::uintptr_t>(bulk_memory_->data()), detail::kDirectAlign);
    // Registered, reads DMA straight into it; unregistered (BAR1 space too small, say), cuFile
    // stages each read through its own buffers: slower, still correct.
    try {
      registration_.emplace(lib_, reinterpret_cast<const void*>(bulk_), bytes);
      registration_note_ = "device buffer registered";
    } catch (const CudaError& e) {
      registration_note_ = std::string("device buffer not registered: ") + e.what();
    }
    return bulk_;
  }

  void reserve_tasks(std::size_t moves, std::size_t converts) override {
    if (!moves_ || moves_->capacity() < moves) {
      moves_.reset();
      moves_.emplace(device_, moves);
    }
    if (!converts_ || converts_->capacity() < converts) {
      converts_.reset();
      converts_.emplace(device_, converts);
    }
  }

  std::uint64_t read(std::uint32_t file, std::uint64_t file_offset, std::uint64_t length,
                     std::uint64_t bulk_offset) override {
    const cufile::RegisteredFile& f = *files_[file];
    ssize_t got;
    do {
      // With a registered buffer cuFile wants its base and the offset into it.
      got = lib_.cuFileRead(f.handle(), reinterpret_cast<void*>(bulk_), length, static_cast<off_t>(file_offset),
                            static_cast<off_t>(bulk_offset));
    } while (got == -1 && errno == EINTR);  // compatibility mode reads with POSIX calls
    if (got >= 0) return static_cast<std::uint64_t>(got);
    if (got == -1) throw IoError(errno, "cuFileRead", f.path());
    throw CudaError("cuFileRead of '" + f.path() + "' at offset " + std::to_string(file_offset) + ": " +
                    cufile::status_text(cufile::Status{static_cast<int>(-got), 0}));
  }

  void move_async(const std::vector<kernels::MoveTask>& tasks) override {
    std::uint64_t bytes = 0;
    for (const auto& t : tasks) bytes += t.bytes;
    launch_batch(batch_kernel(device_, "align", kernels::kMoveKernel), moves_->upload(tasks, stream_.get()),
                 static_cast<std::uint32_t>(tasks.size()), bytes, stream_.get(), "cuLaunchKernel (fst_move_batch)");
  }

  void convert_async(const std::vector<kernels::ConvertTask>& tasks) override {
    std::uint64_t bytes = 0;
    for (const auto& t : tasks) bytes += t.count * 8;  // an upper bound of the wider side
    launch_batch(batch_kernel(device_, "convert", kernels::kConvertKernel), converts_->upload(tasks, stream_.get()),
                 static_cast<std::uint32_t>(tasks.size()), bytes, stream_.get(), "cuLaunchKernel (fst_convert_batch)");
  }

  void synchronize() override { stream_.synchronize(); }

  // Reading threads belong to the load: the context can stay current on them.
  void bind_thread() override { make_current(device_); }

  ExportDevice device() const override { return ExportDevice{ExportDevice::kCUDA, device_}; }

  std::string describe() const override { return "cuFile, " + session_->describe() + ", " + registration_note_; }

 private:
  int device_;
  const cufile::Library& lib_;
  std::shared_ptr<cufile::Session> session_;
  std::vector<std::unique_ptr<cufile::RegisteredFile>> files_;  // by file number
  std::shared_ptr<Buffer> bulk_memory_;
  std::optional<cufile::RegisteredBuffer> registration_;
  std::uint64_t bulk_ = 0;
  std::uint64_t bulk_bytes_ = 0;
  std::string registration_note_;
  std::optional<TaskList<kernels::MoveTask>> moves_;
  std::optional<TaskList<kernels::ConvertTask>> converts_;
  Stream stream_;
};

}  // namespace

std::shared_ptr<GdsDevice> make_cufile_device(int device, const std::string& bundled_library) {
  const CufileInfo info = cufile_info(bundled_library);
  if (!info.available) throw UnsupportedError("GPU Direct Storage is not usable here: " + info.reason);
  if (kernels::kFatbinCount == 0)
    throw UnsupportedError("GPU Direct Storage needs fst's CUDA kernels (to align tensors after the bulk "
                           "reads), and this build has none (FST_CUDA=OFF or no nvcc)");
  return std::make_shared<CufileDevice>(device, cufile::Library::get(bundled_library));
}

}  // namespace fst
