// The OpenMP runtime that the host process has already loaded (torch's libgomp, or an
// Intel or LLVM runtime), found at run time. dfp runs its parallel loops on that
// runtime's threads rather than on threads of its own: on a machine with as many
// threads as cores, torch's OpenMP workers spin for a while after each torch op, and
// a second pool's threads then wait for a core (2 threads on 2 cores: a layer's
// forward and backward were no faster than on one thread).
#pragma once
#include <string>

namespace dfp {

struct HostOpenMP {
  std::string path;  // the runtime's file
  // The libgomp entry point behind `#pragma omp parallel`, exported by all three runtimes.
  void (*parallel)(void (*fn)(void*), void* data, unsigned nthreads, unsigned flags);
  int (*in_parallel)();
};

// Null when no OpenMP runtime is loaded, or DFP_THREAD_POOL=own is set: then dfp runs
// its own threads.
const HostOpenMP* host_openmp();

}  // namespace dfp
