#include "host_openmp.h"

#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__linux__)
#include <dlfcn.h>
#include <link.h>
#endif

namespace dfp {
namespace {

#if defined(__linux__)
std::string file_name(const std::string& path) { return path.substr(path.rfind('/') + 1); }

// The paths of the loaded shared objects, in load order.
std::vector<std::string> loaded_objects() {
  std::vector<std::string> paths;
  dl_iterate_phdr(
      [](dl_phdr_info* info, size_t, void* out) {
        if (info->dlpi_name && *info->dlpi_name) static_cast<std::vector<std::string>*>(out)->push_back(info->dlpi_name);
        return 0;
      },
      &paths);
  return paths;
}

// The runtime torch's own parallel regions enter: the one libtorch_cpu resolves
// GOMP_parallel to among its dependencies. Another may be loaded beside it (scikit-learn
// ships its own libgomp), and its threads would fight torch's. Without torch, the
// first runtime loaded.
std::string runtime_path() {
  const std::vector<std::string> objects = loaded_objects();
  for (const std::string& path : objects) {
    if (file_name(path).rfind("libtorch_cpu", 0) != 0) continue;
    void* torch = dlopen(path.c_str(), RTLD_LAZY | RTLD_NOLOAD);
    if (!torch) continue;
    Dl_info info{};
    void* entry = dlsym(torch, "GOMP_parallel");  // searched in torch's dependencies too
    const bool found = entry && dladdr(entry, &info) && info.dli_fname;
    dlclose(torch);
    if (found) return info.dli_fname;
  }
  for (const std::string& path : objects)
    for (const char* prefix : {"libgomp", "libiomp5", "libomp"})
      if (file_name(path).rfind(prefix, 0) == 0) return path;
  return "";
}

// Looks the entry points up in that runtime: torch loads its libgomp privately
// (RTLD_LOCAL), so a global lookup would not find it, but dlopen with RTLD_NOLOAD
// hands back that very instance by its path, never a second copy.
bool find(HostOpenMP& omp) {
  omp.path = runtime_path();
  void* lib = omp.path.empty() ? nullptr : dlopen(omp.path.c_str(), RTLD_LAZY | RTLD_NOLOAD);
  if (!lib) return false;  // the handle stays open, and with it the runtime
  omp.parallel = reinterpret_cast<decltype(omp.parallel)>(dlsym(lib, "GOMP_parallel"));
  omp.in_parallel = reinterpret_cast<decltype(omp.in_parallel)>(dlsym(lib, "omp_in_parallel"));
  return omp.parallel && omp.in_parallel;
}
#else
bool find(HostOpenMP&) { return false; }
#endif

}  // namespace

const HostOpenMP* host_openmp() {
  // Looked up once: dfp imports torch, and with it torch's runtime, before its core.
  static const HostOpenMP found = [] {
    HostOpenMP omp{};
    const char* env = std::getenv("DFP_THREAD_POOL");
    const std::string pool = env ? env : "";
    if (pool == "own") return omp;
    if (!pool.empty())
      throw std::invalid_argument("DFP_THREAD_POOL='" + pool +
                                  "' is not a choice: set it to 'own' for dfp's own threads, or leave it unset "
                                  "for torch's OpenMP threads");
    return find(omp) ? omp : HostOpenMP{};
  }();
  return found.parallel ? &found : nullptr;
}

}  // namespace dfp
