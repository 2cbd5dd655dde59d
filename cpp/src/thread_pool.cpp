#include "fst/thread_pool.hpp"

#include <sched.h>

#include <chrono>

#include "fst/errors.hpp"

namespace fst {

void TaskGroup::add(std::size_t n) {
  std::lock_guard<std::mutex> lock(mu_);
  pending_ += n;
}

void TaskGroup::done(std::exception_ptr error) {
  std::lock_guard<std::mutex> lock(mu_);
  if (error && !error_) {
    error_ = error;
    cancelled_.store(true, std::memory_order_relaxed);
  }
  if (--pending_ == 0) cv_.notify_all();
}

bool TaskGroup::wait_for(int timeout_ms) {
  std::unique_lock<std::mutex> lock(mu_);
  if (timeout_ms < 0) {
    cv_.wait(lock, [&] { return pending_ == 0; });
    return true;
  }
  return cv_.wait_for(lock, std::chrono::milliseconds(timeout_ms), [&] { return pending_ == 0; });
}

void TaskGroup::rethrow() const {
  std::lock_guard<std::mutex> lock(mu_);
  if (error_) std::rethrow_exception(error_);
}

void TaskGroup::drive(const std::function<bool()>& tick, int tick_ms) {
  while (!wait_for(tick ? tick_ms : -1)) {
    if (!tick()) {
      cancel();
      wait_for(-1);
      throw Error("load cancelled");
    }
  }
  rethrow();
}

ThreadPool::ThreadPool(unsigned threads) {
  if (threads == 0) threads = default_threads();
  workers_.reserve(threads);
  try {
    for (unsigned i = 0; i < threads; ++i) workers_.emplace_back([this, i] { run(i); });
  } catch (...) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
    }
    cv_.notify_all();
    for (auto& w : workers_) w.join();
    throw;
  }
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  for (auto& w : workers_) w.join();
}

void ThreadPool::submit(TaskGroup& group, std::function<void(unsigned)> fn) {
  group.add();
  {
    std::lock_guard<std::mutex> lock(mu_);
    queue_.push_back(Task{&group, std::move(fn)});
  }
  cv_.notify_one();
}

void ThreadPool::run(unsigned index) {
  while (true) {
    Task task;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
      // Drain the queue even when stopping: every submitted task must report to its group.
      if (queue_.empty()) return;
      task = std::move(queue_.front());
      queue_.pop_front();
    }
    std::exception_ptr error;
    if (!task.group->cancelled()) {
      try {
        task.fn(index);
      } catch (...) {
        error = std::current_exception();
      }
    }
    task.group->done(error);
  }
}

unsigned ThreadPool::default_threads() noexcept {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    int n = CPU_COUNT(&set);
    if (n > 0) return static_cast<unsigned>(n);
  }
  unsigned n = std::thread::hardware_concurrency();
  return n ? n : 1;
}

}  // namespace fst
