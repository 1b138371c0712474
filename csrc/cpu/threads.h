// Parallel loops on the threads of torch's own OpenMP runtime (host_openmp.h), or on a
// small pool of dfp's own where none is loaded. dfp's core does not link OpenMP: a
// second runtime would fight torch's for the cores. The caller passes
// torch.get_num_threads(), so dfp uses exactly the threads torch was told to.
#pragma once
#include <algorithm>
#include <cstdint>
#include <functional>

#include <string>

namespace dfp {

// Runs fn(task) for task in [0, ntasks) on up to nthreads threads (the caller's
// thread included) and returns when all are done. Tasks are handed out dynamically.
void parallel_for(int64_t ntasks, int nthreads, const std::function<void(int64_t)>& fn);

constexpr int64_t kMinTaskElements = 1 << 15;  // below this a task costs more than it saves

// Calls fn(row_begin, row_end) over [0, rows) of rows of row_len elements, in tasks of
// about kMinTaskElements or more.
template <typename Fn>
void for_row_chunks(int64_t rows, int64_t row_len, int nthreads, Fn fn) {
  const int64_t per_task = std::max<int64_t>(1, kMinTaskElements / std::max<int64_t>(row_len, 1));
  const int64_t tasks = (rows + per_task - 1) / per_task;
  parallel_for(tasks, nthreads, [&](int64_t t) { fn(t * per_task, std::min(rows, (t + 1) * per_task)); });
}

// Whose threads parallel_for runs on: the OpenMP runtime's file, or "dfp's own threads".
std::string thread_runtime();

}  // namespace dfp
