// Parallel loops on the threads of torch's own OpenMP runtime (host_openmp.h), or on a
// small pool of dfp's own where none is loaded. dfp's core does not link OpenMP: a
// second runtime would fight torch's for the cores. The caller passes
// torch.get_num_threads(), so dfp uses exactly the threads torch was told to.
#pragma once
#include <cstdint>
#include <functional>

#include <string>

namespace dfp {

// Runs fn(task) for task in [0, ntasks) on up to nthreads threads (the caller's
// thread included) and returns when all are done. Tasks are handed out dynamically.
void parallel_for(int64_t ntasks, int nthreads, const std::function<void(int64_t)>& fn);

// Whose threads parallel_for runs on: the OpenMP runtime's file, or "dfp's own threads".
std::string thread_runtime();

}  // namespace dfp
