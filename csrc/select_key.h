// fpt_fast native extension: the score -> uint32 key map shared by the CPU and CUDA selections.
//
// Unsigned key order equals float order: non-negative floats get their sign bit set, negative ones
// have every bit flipped. -0.0 is first made +0.0 (they compare equal in torch) and every NaN maps to
// the largest key (torch's sort and topk rank NaN above +inf), so equal scores always get equal keys.
#pragma once

#include <cstdint>
#include <cstring>

#ifdef __CUDACC__
#define FPT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FPT_HOST_DEVICE inline
#endif

namespace fpt_native {

FPT_HOST_DEVICE uint32_t float_order_key(float f) {
  if (f != f) return 0xFFFFFFFFu;  // NaN
  if (f == 0.0f) f = 0.0f;         // -0.0 -> +0.0
#ifdef __CUDA_ARCH__
  const uint32_t u = __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
#endif
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

}  // namespace fpt_native
