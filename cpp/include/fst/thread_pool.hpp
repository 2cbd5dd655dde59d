// A fixed set of worker threads owned by one load; joined when the pool is destroyed, so a
// load never leaves threads behind, also when it fails.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <deque>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace fst {

// Counts the tasks of one batch; the first exception any of them throws is kept and
// rethrown by wait(). After a failure or cancel(), tasks not yet started are skipped.
class TaskGroup {
 public:
  void add(std::size_t n = 1);
  void done(std::exception_ptr error = nullptr);
  // Waits up to `timeout_ms` (negative: forever); true once every task has finished.
  bool wait_for(int timeout_ms);
  // Rethrows the first task failure, if any. Call after wait_for() returned true.
  void rethrow() const;
  // Waits for every task, calling `tick` every `tick_ms` meanwhile (none: `tick` empty). When
  // `tick` returns false: cancels, waits for the running tasks, throws Error("load
  // cancelled"). Then rethrows the first task failure.
  void drive(const std::function<bool()>& tick, int tick_ms);
  void cancel() noexcept { cancelled_.store(true, std::memory_order_relaxed); }
  // Cancels and waits until no task of the group runs any more: what an owner does before the
  // members its tasks use go away (a no-op once every task has finished).
  void stop() {
    cancel();
    wait_for(-1);
  }
  bool cancelled() const noexcept { return cancelled_.load(std::memory_order_relaxed); }

 private:
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::size_t pending_ = 0;
  std::exception_ptr error_;
  std::atomic<bool> cancelled_{false};
};

class ThreadPool {
 public:
  explicit ThreadPool(unsigned threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  unsigned size() const noexcept { return static_cast<unsigned>(workers_.size()); }
  // Runs `fn(worker_index)` on a worker; `group` is told when it ends.
  void submit(TaskGroup& group, std::function<void(unsigned)> fn);

  // Threads to use when the caller says 0: the CPUs this process may run on.
  static unsigned default_threads() noexcept;

 private:
  struct Task {
    TaskGroup* group;
    std::function<void(unsigned)> fn;
  };
  void run(unsigned index);

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Task> queue_;
  bool stopping_ = false;
  std::vector<std::thread> workers_;
};

}  // namespace fst
