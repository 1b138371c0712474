#include "threads.h"

#include <atomic>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace dfp {
namespace {

class Pool {
 public:
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
  }

  void run(int64_t ntasks, int nthreads, const std::function<void(int64_t)>& fn) {
    std::lock_guard<std::mutex> serial(run_mutex_);  // one parallel region at a time
    grow(nthreads - 1);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      fn_ = &fn;
      ntasks_ = ntasks;
      next_.store(0);
      helpers_wanted_ = nthreads - 1;
      helpers_active_ = 0;
      error_ = nullptr;
      ++generation_;
    }
    wake_.notify_all();
    work();
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [&] { return helpers_active_ == 0 && helpers_wanted_ == 0; });
    fn_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void grow(int n) {
    while (static_cast<int>(workers_.size()) < n) workers_.emplace_back([this] { loop(); });
  }

  void work() {
    for (int64_t t = next_.fetch_add(1); t < ntasks_; t = next_.fetch_add(1)) {
      try {
        (*fn_)(t);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mutex_);
        if (!error_) error_ = std::current_exception();
        next_.store(ntasks_);
      }
    }
  }

  void loop() {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return stopping_ || (generation_ != seen && helpers_wanted_ > 0); });
        if (stopping_) return;
        seen = generation_;
        --helpers_wanted_;
        ++helpers_active_;
      }
      work();
      {
        std::lock_guard<std::mutex> lock(mutex_);
        --helpers_active_;
      }
      done_.notify_all();
    }
  }

  std::vector<std::thread> workers_;
  std::mutex mutex_, run_mutex_;
  std::condition_variable wake_, done_;
  const std::function<void(int64_t)>* fn_ = nullptr;
  int64_t ntasks_ = 0;
  std::atomic<int64_t> next_{0};
  int helpers_wanted_ = 0, helpers_active_ = 0;
  uint64_t generation_ = 0;
  bool stopping_ = false;
  std::exception_ptr error_;
};

}  // namespace

void parallel_for(int64_t ntasks, int nthreads, const std::function<void(int64_t)>& fn) {
  if (nthreads > ntasks) nthreads = static_cast<int>(ntasks);
  if (nthreads <= 1) {
    for (int64_t t = 0; t < ntasks; ++t) fn(t);
    return;
  }
  static Pool pool;
  pool.run(ntasks, nthreads, fn);
}

}  // namespace dfp
