// fpt_fast native extension: float32 building blocks of the CPU kernels, one copy per x86 ISA.
//
// The bodies are templates over a GCC/Clang vector type and are force-inlined into thin wrappers
// compiled with target attributes (AVX-512, AVX2+FMA, baseline), so a single build needs no -march
// flag and still uses the widest units of the CPU it runs on. FPT_FAST_NATIVE_ISA=avx512|avx2|baseline
// forces a narrower choice (tests use it to cover every path on one machine).
//
// Limits: see cpu_math.h. Results of reductions depend on the ISA chosen (lane count changes the
// summation order) but never on the number of threads.
#include "cpu_math.h"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>

#pragma GCC diagnostic ignored "-Wpsabi"  // vectors passed by value only between force-inlined bodies

#define FPT_INLINE inline __attribute__((always_inline))

namespace fpt_native {
namespace cpu {
namespace {

typedef float f4 __attribute__((vector_size(16)));
typedef float f8 __attribute__((vector_size(32)));
typedef float f16 __attribute__((vector_size(64)));
typedef int32_t i4 __attribute__((vector_size(16)));
typedef int32_t i8 __attribute__((vector_size(32)));
typedef int32_t i16 __attribute__((vector_size(64)));

template <typename V> struct IntOf;
template <> struct IntOf<f4> { using type = i4; };
template <> struct IntOf<f8> { using type = i8; };
template <> struct IntOf<f16> { using type = i16; };

template <typename V> FPT_INLINE V splat(float x) { return V{} + x; }
// memcpy is the portable unaligned vector load/store; compilers emit a single vmovups.
template <typename V> FPT_INLINE V load(const float* p) { V v; std::memcpy(&v, p, sizeof(V)); return v; }
template <typename V> FPT_INLINE void store(float* p, V v) { std::memcpy(p, &v, sizeof(V)); }
template <typename V> FPT_INLINE float hsum(V v) {
  constexpr int W = sizeof(V) / sizeof(float);
  float s = 0.f;
  for (int i = 0; i < W; ++i) s += v[i];  // fixed lane order: reproducible
  return s;
}

// exp(x) = 2^m * e^r with m = round(x / ln 2), r = x - m ln 2 (ln 2 split in two for accuracy),
// e^r from a degree-7 polynomial (the Cephes single-precision coefficients). Clamped so that 2^m
// stays a normal float; inputs below -87.33 give 0, NaN stays NaN.
template <typename V> FPT_INLINE V vexp(V x) {
  using VI = typename IntOf<V>::type;
  const V lo = splat<V>(-87.33654f), hi = splat<V>(88.0f);
  V xc = x > lo ? x : lo;
  xc = xc < hi ? xc : hi;
  const V magic = splat<V>(12582912.0f);  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  V m = (xc * 1.44269504088896341f + magic) - magic;
  V r = xc - m * 0.693359375f;
  r = r - m * -2.12194440e-4f;
  V y = splat<V>(1.9875691500e-4f);
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  VI bits = (__builtin_convertvector(m, VI) + 127) << 23;
  V result = y * (V)bits;  // same-size vector cast: a reinterpretation of the bits
  result = x < lo ? splat<V>(0.f) : result;
  return x != x ? x : result;
}

template <typename V, int MR, int NV>
FPT_INLINE void gemm_body(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                          int64_t ldb, float* C, int64_t ldc) {
  constexpr int W = sizeof(V) / sizeof(float);
  constexpr int NR = W * NV;
  // Column tiles outside, row tiles inside: a K x NR panel of B stays in L1 across all row tiles.
  for (int64_t j = 0; j < N; j += NR) {
    for (int64_t i = 0; i < M; i += MR) {
      V acc[MR][NV];
      for (int r = 0; r < MR; ++r)
        for (int c = 0; c < NV; ++c) acc[r][c] = V{};
      const float* a = A + i * lda;
      const float* b = B + j;
      for (int64_t p = 0; p < K; ++p) {
        V bv[NV];
        for (int c = 0; c < NV; ++c) bv[c] = load<V>(b + p * ldb + c * W);
        for (int r = 0; r < MR; ++r) {
          const float av = a[r * lda + p];
          for (int c = 0; c < NV; ++c) acc[r][c] += av * bv[c];
        }
      }
      for (int r = 0; r < MR; ++r)
        for (int c = 0; c < NV; ++c) store<V>(C + (i + r) * ldc + j + c * W, acc[r][c]);
    }
  }
}

template <typename V> FPT_INLINE float max_body(const float* x, int64_t n) {
  constexpr int W = sizeof(V) / sizeof(float);
  V m = splat<V>(-std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    V v = load<V>(x + i);
    m = v > m ? v : m;
  }
  float out = -std::numeric_limits<float>::infinity();
  for (int l = 0; l < W; ++l) out = m[l] > out ? m[l] : out;
  for (; i < n; ++i) out = x[i] > out ? x[i] : out;
  return out;
}

template <typename V> FPT_INLINE float exp_sum_body(float* x, int64_t n, float shift) {
  constexpr int W = sizeof(V) / sizeof(float);
  V s = V{};
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    V e = vexp<V>(load<V>(x + i) - shift);
    store<V>(x + i, e);
    s += e;
  }
  if (i < n) {  // the tail goes through the same vector code (padded with -inf, whose exp is 0)
    float tmp[W];
    for (int l = 0; l < W; ++l) tmp[l] = i + l < n ? x[i + l] : -std::numeric_limits<float>::infinity();
    V e = vexp<V>(load<V>(tmp) - shift);
    store<V>(tmp, e);
    s += e;
    for (int64_t l = 0; i + l < n; ++l) x[i + l] = tmp[l];
  }
  return hsum<V>(s);
}

template <typename V> FPT_INLINE void scale_body(float* x, int64_t n, float s) {
  constexpr int W = sizeof(V) / sizeof(float);
  int64_t i = 0;
  for (; i + W <= n; i += W) store<V>(x + i, load<V>(x + i) * s);
  for (; i < n; ++i) x[i] *= s;
}

template <typename V> FPT_INLINE void add_body(float* acc, const float* x, int64_t n) {
  constexpr int W = sizeof(V) / sizeof(float);
  int64_t i = 0;
  for (; i + W <= n; i += W) store<V>(acc + i, load<V>(acc + i) + load<V>(x + i));
  for (; i < n; ++i) acc[i] += x[i];
}

template <typename V> FPT_INLINE float dot_body(const float* a, const float* b, int64_t n) {
  constexpr int W = sizeof(V) / sizeof(float);
  V s = V{};
  int64_t i = 0;
  for (; i + W <= n; i += W) s += load<V>(a + i) * load<V>(b + i);
  float out = hsum<V>(s);
  for (; i < n; ++i) out += a[i] * b[i];
  return out;
}

template <typename V> FPT_INLINE void softmax_grad_body(float* x, const float* p, int64_t n, float c) {
  constexpr int W = sizeof(V) / sizeof(float);
  int64_t i = 0;
  for (; i + W <= n; i += W) store<V>(x + i, load<V>(p + i) * (load<V>(x + i) - c));
  for (; i < n; ++i) x[i] = p[i] * (x[i] - c);
}

// One set of wrappers per ISA: ATTR is the target attribute, V the vector type, NV vectors per tile row.
#define FPT_DEFINE_KERNELS(SUFFIX, ATTR, V, MR, NV)                                                           \
  ATTR void gemm_##SUFFIX(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,   \
                          int64_t ldb, float* C, int64_t ldc) {                                           \
    gemm_body<V, MR, NV>(M, N, K, A, lda, B, ldb, C, ldc);                                                     \
  }                                                                                                        \
  ATTR float max_##SUFFIX(const float* x, int64_t n) { return max_body<V>(x, n); }                        \
  ATTR float exp_sum_##SUFFIX(float* x, int64_t n, float s) { return exp_sum_body<V>(x, n, s); }          \
  ATTR void scale_##SUFFIX(float* x, int64_t n, float s) { scale_body<V>(x, n, s); }                      \
  ATTR void add_##SUFFIX(float* a, const float* x, int64_t n) { add_body<V>(a, x, n); }                   \
  ATTR float dot_##SUFFIX(const float* a, const float* b, int64_t n) { return dot_body<V>(a, b, n); }     \
  ATTR void softmax_grad_##SUFFIX(float* x, const float* p, int64_t n, float c) {                          \
    softmax_grad_body<V>(x, p, n, c);                                                                      \
  }                                                                                                        \
  const MathKernels kernels_##SUFFIX = {#SUFFIX,           gemm_##SUFFIX, max_##SUFFIX, exp_sum_##SUFFIX,  \
                                        scale_##SUFFIX,    add_##SUFFIX,  dot_##SUFFIX, softmax_grad_##SUFFIX};

// Baseline: 4 x 8 tiles of 128-bit vectors (SSE2 on x86-64, NEON on arm64).
FPT_DEFINE_KERNELS(baseline, , f4, 4, 2)

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FPT_HAVE_X86_DISPATCH 1
// AVX2: 4 x 16 tiles = 8 of the 16 ymm registers (8 x 8 measured slower).
FPT_DEFINE_KERNELS(avx2, __attribute__((target("avx2,fma"))), f8, 4, 2)
// AVX-512: 8 x 32 tiles = 16 of the 32 zmm registers as accumulators (measured 2x the 4 x 32 tile).
FPT_DEFINE_KERNELS(avx512, __attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma"))), f16, 8, 2)
#endif

const MathKernels& choose() {
  const char* forced = std::getenv("FPT_FAST_NATIVE_ISA");
  const std::string want = forced ? forced : "";
#ifdef FPT_HAVE_X86_DISPATCH
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw");
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx512 && (want.empty() || want == "avx512")) return kernels_avx512;
  if (avx2 && (want.empty() || want == "avx512" || want == "avx2")) return kernels_avx2;
#endif
  return kernels_baseline;
}

}  // namespace

const MathKernels& math() {
  static const MathKernels& chosen = choose();  // thread-safe one-time choice (C++11 statics)
  return chosen;
}

}  // namespace cpu
}  // namespace fpt_native
