// fpt_fast native extension: fused top-n selection + gather on the CPU (docs/method.md, section 2).
//
// Per (b, h) row: every score becomes a 64-bit key (monotone uint32 of the float, then the inverted
// token index), so that "larger key" means "higher score, or equal score and lower index": a strict
// total order. std::nth_element (average O(N), never a full sort) puts the n-th largest key in place;
// a row keeps exactly the tokens whose key is >= it, emitted by one scan in ascending token index,
// copying (and casting, if asked) their K and V rows straight into the outputs, and, when asked
// (select_tokens_with_indices), writing each kept token's index into an int64 (B, H, n) output in the same scan.
//
// Ties at the n-th score go to the lower token index. -0.0 counts as +0.0; NaN ranks above +inf and
// NaNs tie with each other (torch's sort/topk order). Limits: N < 2^31; scores, k, v float32/float16/
// bfloat16 (k and v of one dtype); k, v read through their strides; outputs contiguous (B, H, n, d).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <vector>

#include "fpt_native.h"
#include "select_key.h"

namespace fpt_native {

void check_select_args(const at::Tensor& scores, const at::Tensor& k, const at::Tensor& v, int64_t n,
                       std::optional<at::ScalarType> out_dtype) {
  check_float(scores, "scores");
  check_float(k, "k");
  TORCH_CHECK(k.dim() == 4, "fpt_fast_native.select_tokens: k must be 4-D (B, H, N, d), got shape ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "fpt_fast_native.select_tokens: v ", v.sizes(), " must have the shape of k ",
              k.sizes());
  TORCH_CHECK(v.scalar_type() == k.scalar_type(), "fpt_fast_native.select_tokens: v (", v.scalar_type(),
              ") and k (", k.scalar_type(), ") must have the same dtype");
  TORCH_CHECK(scores.dim() == 3 && scores.size(0) == k.size(0) && scores.size(1) == k.size(1) &&
                  scores.size(2) == k.size(2),
              "fpt_fast_native.select_tokens: scores ", scores.sizes(), " must be (B, H, N) = ", k.sizes().slice(0, 3));
  TORCH_CHECK(scores.device() == k.device() && v.device() == k.device(),
              "fpt_fast_native.select_tokens: scores, k and v must be on one device");
  TORCH_CHECK(k.numel() > 0, "fpt_fast_native.select_tokens: k is empty (shape ", k.sizes(), ")");
  const int64_t N = k.size(2);
  TORCH_CHECK(N < (int64_t(1) << 31), "fpt_fast_native.select_tokens: N = ", N, " is too large");
  TORCH_CHECK(n >= 1 && n <= N, "fpt_fast_native.select_tokens: n = ", n, " is out of range: expected 1 <= n <= N = ", N);
  if (out_dtype.has_value()) {
    TORCH_CHECK(is_supported_float(*out_dtype), "fpt_fast_native.select_tokens: out_dtype must be float32, "
                "float16 or bfloat16, got ", *out_dtype);
  }
}

namespace {

template <typename S>
inline uint64_t combined_key(const S* scores, int64_t stride, int64_t j) {
  // High half: the score's order key; low half: ~j, so that among equal scores the lower index is larger.
  return (static_cast<uint64_t>(float_order_key(static_cast<float>(scores[j * stride]))) << 32) |
         static_cast<uint64_t>(0xFFFFFFFFu - static_cast<uint32_t>(j));
}

// index_out: nullptr, or (B, H, n) int64 contiguous to receive the kept token indices.
template <typename S, typename In, typename Out>
void select_rows(const at::Tensor& scores, const at::Tensor& k, const at::Tensor& v, int64_t n, at::Tensor& k_out,
                 at::Tensor& v_out, int64_t* index_out) {
  const int64_t B = k.size(0), H = k.size(1), N = k.size(2), d = k.size(3);
  const S* sp = scores.data_ptr<S>();
  const In* kp = k.data_ptr<In>();
  const In* vp = v.data_ptr<In>();
  Out* ko = k_out.data_ptr<Out>();
  Out* vo = v_out.data_ptr<Out>();
  const int64_t ss0 = scores.stride(0), ss1 = scores.stride(1), ss2 = scores.stride(2);
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), ks2 = k.stride(2);
  const int64_t vs0 = v.stride(0), vs1 = v.stride(1), vs2 = v.stride(2);
  // A grain of 1 row per task would be too fine for tiny N; 16 rows is still plenty of tasks.
  at::parallel_for(0, B * H, 16, [&](int64_t begin, int64_t end) {
    std::vector<uint64_t> keys(N);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / H, h = row % H;
      const S* s = sp + b * ss0 + h * ss1;
      for (int64_t j = 0; j < N; ++j) keys[j] = combined_key(s, ss2, j);
      std::nth_element(keys.begin(), keys.begin() + (n - 1), keys.end(), std::greater<uint64_t>());
      const uint64_t pivot = keys[n - 1];
      const In* krow = kp + b * ks0 + h * ks1;
      const In* vrow = vp + b * vs0 + h * vs1;
      Out* kdst = ko + row * n * d;
      Out* vdst = vo + row * n * d;
      int64_t* idst = index_out == nullptr ? nullptr : index_out + row * n;
      int64_t slot = 0;
      for (int64_t j = 0; j < N && slot < n; ++j) {
        if (combined_key(s, ss2, j) < pivot) continue;
        const In* ks = krow + j * ks2;
        const In* vs = vrow + j * vs2;
        Out* kd = kdst + slot * d;
        Out* vd = vdst + slot * d;
        if constexpr (std::is_same<In, Out>::value) {
          std::memcpy(kd, ks, d * sizeof(In));
          std::memcpy(vd, vs, d * sizeof(In));
        } else {
          for (int64_t c = 0; c < d; ++c) kd[c] = static_cast<Out>(static_cast<float>(ks[c]));
          for (int64_t c = 0; c < d; ++c) vd[c] = static_cast<Out>(static_cast<float>(vs[c]));
        }
        if (idst != nullptr) idst[slot] = j;
        ++slot;
      }
      // Exactly n keys are >= the pivot (keys are distinct), so every slot is filled.
      TORCH_INTERNAL_ASSERT(slot == n, "select_tokens: filled ", slot, " of ", n, " slots");
    }
  });
}

}  // namespace

SelectResult select_tokens_cpu(const at::Tensor& scores, const at::Tensor& k_in, const at::Tensor& v_in, int64_t n,
                               std::optional<at::ScalarType> out_dtype, bool with_indices) {
  check_select_args(scores, k_in, v_in, n, out_dtype);
  const at::Tensor k = rows_contiguous(k_in), v = rows_contiguous(v_in);
  const at::ScalarType out_t = out_dtype.value_or(k.scalar_type());
  const int64_t B = k.size(0), H = k.size(1), d = k.size(3);
  at::Tensor k_out = at::empty({B, H, n, d}, k.options().dtype(out_t));
  at::Tensor v_out = at::empty({B, H, n, d}, k.options().dtype(out_t));
  at::Tensor index_out = with_indices ? at::empty({B, H, n}, k.options().dtype(at::kLong)) : at::Tensor();
  int64_t* index_ptr = with_indices ? index_out.data_ptr<int64_t>() : nullptr;
  dispatch_float(scores.scalar_type(), "select_tokens", [&](auto s_tag) {
    dispatch_float(k.scalar_type(), "select_tokens", [&](auto in_tag) {
      dispatch_float(out_t, "select_tokens", [&](auto out_tag) {
        select_rows<decltype(s_tag), decltype(in_tag), decltype(out_tag)>(scores, k, v, n, k_out, v_out, index_ptr);
      });
    });
  });
  return {k_out, v_out, index_out};
}

}  // namespace fpt_native
