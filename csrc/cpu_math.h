// fpt_fast native extension: float32 building blocks of the CPU kernels (cpu_math.cpp).
//
// A small register-tiled matrix product and vectorised row operations (max, exp, sums), compiled
// once per x86 instruction set (AVX-512, AVX2+FMA, baseline) and picked at load time from what the
// running CPU supports, so that one build runs on any x86-64 and is fast on recent ones. Other
// architectures get the portable version (GCC/Clang vector extensions at 128 bits).
//
// Limits: float32 only (callers convert); gemm needs M a multiple of kRowTile and N a multiple of
// kColPad (callers zero-pad their buffers); exp() is accurate to a few ulp for arguments <= 88 and
// flushes to 0 below -87.33 (callers only exponentiate shifted logits, which are <= 0 up to rounding).
#pragma once

#include <cstdint>

namespace fpt_native {
namespace cpu {

constexpr int64_t kRowTile = 8;   // M is padded to this: a multiple of every target's tile height
constexpr int64_t kColPad = 32;   // columns are padded to this: a multiple of every target's tile width

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

struct MathKernels {
  const char* isa;
  // C[M, N] = A[M, K] @ B[K, N], row-major with leading dimensions; C is overwritten.
  void (*gemm)(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
               float* C, int64_t ldc);
  float (*max)(const float* x, int64_t n);
  // x[i] = exp(x[i] - shift) in place; returns the sum of the new values (fixed order).
  float (*exp_sum)(float* x, int64_t n, float shift);
  void (*scale)(float* x, int64_t n, float s);
  void (*add)(float* acc, const float* x, int64_t n);  // acc += x
  // sum_i a[i] * b[i], fixed order
  float (*dot)(const float* a, const float* b, int64_t n);
  // x[i] = p[i] * (x[i] - c): the softmax backward dS = P * (dP - delta)
  void (*softmax_grad)(float* x, const float* p, int64_t n, float c);
};

// The kernels for this CPU, chosen once.
const MathKernels& math();

}  // namespace cpu
}  // namespace fpt_native
