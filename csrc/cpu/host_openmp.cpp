#include "host_openmp.h"

#include <cstdlib>
#include <cstring>
#include <string>

#if defined(__linux__)
#include <dlfcn.h>
#include <link.h>
#endif

namespace dfp {
namespace {

#if defined(__linux__)
bool is_openmp_runtime(const char* path) {
  const char* slash = std::strrchr(path, '/');
  const std::string name = slash ? slash + 1 : path;
  for (const char* prefix : {"libgomp", "libiomp5", "libomp"})
    if (name.rfind(prefix, 0) == 0) return true;
  return false;
}

// Looks the entry points up in an already loaded runtime: torch loads its libgomp
// privately (RTLD_LOCAL), so a global lookup would not find it, but dlopen with
// RTLD_NOLOAD hands back that very instance by its path, never a second copy.
bool find(HostOpenMP& omp) {
  std::string path;
  dl_iterate_phdr(
      [](dl_phdr_info* info, size_t, void* out) {
        if (!info->dlpi_name || !is_openmp_runtime(info->dlpi_name)) return 0;
        *static_cast<std::string*>(out) = info->dlpi_name;
        return 1;
      },
      &path);
  if (path.empty()) return false;
  void* lib = dlopen(path.c_str(), RTLD_LAZY | RTLD_NOLOAD);
  omp.path = path;
  if (!lib) return false;
  omp.parallel = reinterpret_cast<decltype(omp.parallel)>(dlsym(lib, "GOMP_parallel"));
  omp.thread_num = reinterpret_cast<decltype(omp.thread_num)>(dlsym(lib, "omp_get_thread_num"));
  omp.in_parallel = reinterpret_cast<decltype(omp.in_parallel)>(dlsym(lib, "omp_in_parallel"));
  return omp.parallel && omp.thread_num && omp.in_parallel;  // the handle stays open: the runtime stays
}
#else
bool find(HostOpenMP&) { return false; }
#endif

}  // namespace

const HostOpenMP* host_openmp() {
  // Looked up once: dfp imports torch, and with it torch's runtime, before its core.
  static const HostOpenMP found = [] {
    HostOpenMP omp{};
    const char* pool = std::getenv("DFP_THREAD_POOL");
    if (pool && std::string(pool) == "own") return omp;
    return find(omp) ? omp : HostOpenMP{};
  }();
  return found.parallel ? &found : nullptr;
}

}  // namespace dfp
