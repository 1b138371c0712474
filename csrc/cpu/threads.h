// A small persistent thread pool. dfp's core does not link OpenMP: torch already runs
// its own pool, and a second OpenMP runtime would fight it for the cores. The caller
// passes torch.get_num_threads(), so dfp uses exactly the threads torch was told to.
#pragma once
#include <cstdint>
#include <functional>

namespace dfp {

// Runs fn(task) for task in [0, ntasks) on up to nthreads threads (the caller's
// thread included) and returns when all are done. Tasks are handed out dynamically.
void parallel_for(int64_t ntasks, int nthreads, const std::function<void(int64_t)>& fn);

}  // namespace dfp
