#include "threads.h"

#include <atomic>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#include "host_openmp.h"

namespace dfp {
namespace {

// Tasks handed out one at a time to whichever thread asks; the first exception is kept
// for the caller and stops the rest.
class TaskQueue {
 public:
  TaskQueue(int64_t ntasks, const std::function<void(int64_t)>& fn) : ntasks_(ntasks), fn_(fn) {}

  void work() {
    for (int64_t t = next_.fetch_add(1); t < ntasks_; t = next_.fetch_add(1)) {
      try {
        fn_(t);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mutex_);
        if (!error_) error_ = std::current_exception();
        next_.store(ntasks_);
      }
    }
  }
  void rethrow() const {
    if (error_) std::rethrow_exception(error_);
  }

 private:
  const int64_t ntasks_;
  const std::function<void(int64_t)>& fn_;
  std::atomic<int64_t> next_{0};
  std::mutex mutex_;
  std::exception_ptr error_;
};

// dfp's own threads, for a process without an OpenMP runtime.
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

  void run(TaskQueue& queue, int nthreads) {
    std::lock_guard<std::mutex> serial(run_mutex_);  // one parallel region at a time
    while (static_cast<int>(workers_.size()) < nthreads - 1) workers_.emplace_back([this] { loop(); });
    {
      std::lock_guard<std::mutex> lock(mutex_);
      queue_ = &queue;
      helpers_wanted_ = nthreads - 1;
      helpers_active_ = 0;
      ++generation_;
    }
    wake_.notify_all();
    queue.work();
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [&] { return helpers_active_ == 0 && helpers_wanted_ == 0; });
    queue_ = nullptr;
  }

 private:
  void loop() {
    uint64_t seen = 0;
    for (;;) {
      TaskQueue* queue;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return stopping_ || (generation_ != seen && helpers_wanted_ > 0); });
        if (stopping_) return;
        seen = generation_;
        --helpers_wanted_;
        ++helpers_active_;
        queue = queue_;
      }
      queue->work();
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
  TaskQueue* queue_ = nullptr;
  int helpers_wanted_ = 0, helpers_active_ = 0;
  uint64_t generation_ = 0;
  bool stopping_ = false;
};

}  // namespace

void parallel_for(int64_t ntasks, int nthreads, const std::function<void(int64_t)>& fn) {
  if (nthreads > ntasks) nthreads = static_cast<int>(ntasks);
  const HostOpenMP* omp = host_openmp();
  if (nthreads <= 1 || (omp && omp->in_parallel())) {  // one thread, or already inside a parallel region
    for (int64_t t = 0; t < ntasks; ++t) fn(t);
    return;
  }
  TaskQueue queue(ntasks, fn);
  if (omp) {
    omp->parallel([](void* q) { static_cast<TaskQueue*>(q)->work(); }, &queue, unsigned(nthreads), 0);
  } else {
    static Pool pool;
    pool.run(queue, nthreads);
  }
  queue.rethrow();
}

std::string thread_runtime() {
  const HostOpenMP* omp = host_openmp();
  return omp ? omp->path : "dfp's own threads";
}

}  // namespace dfp
