// Buffers kept from call to call (per thread, or a caller's workspace).
#pragma once
#include <cstdint>
#include <vector>

namespace dfp {

// `buffer` with room for n elements: grown, never shrunk, and what it already holds is
// not written. std::vector::resize value-initializes what it appends, so a buffer that a
// smaller call shrank was zeroed again by the next larger one (a 16-channel grad_weight
// memset its 4 MB of packed dY on every call), though the callers write every element
// they read.
template <typename T>
T* at_least(std::vector<T>& buffer, int64_t n) {
  if (int64_t(buffer.size()) < n) buffer.resize(n);
  return buffer.data();
}

}  // namespace dfp
