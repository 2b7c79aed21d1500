// A fixed pool of worker threads running void() tasks; used for host copies and CRCs.
// Thread-safe: Submit and Wait may be called from any thread.
#pragma once

#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace memento {

class ThreadPool {
 public:
  // `nice_increment` > 0 lowers the workers' scheduling priority (background work such as
  // checksums must not delay latency-sensitive threads on small machines).
  explicit ThreadPool(int threads, int nice_increment = 0);
  ~ThreadPool();  // finishes queued tasks, then joins
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  void Submit(std::function<void()> task);
  int size() const { return static_cast<int>(workers_.size()); }

 private:
  void Loop();
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> tasks_;  // GUARDED_BY(mu_)
  bool stop_ = false;                        // GUARDED_BY(mu_)
  std::vector<std::thread> workers_;
};

// Counts outstanding tasks of one batch; Wait() returns when all are done.
class TaskGroup {
 public:
  void Add(int n = 1);
  void Done();
  void Wait();

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int pending_ = 0;  // GUARDED_BY(mu_)
};

}  // namespace memento
