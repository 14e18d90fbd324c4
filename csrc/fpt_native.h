// fpt_fast native extension: declarations shared by the CPU (.cpp) and CUDA (.cu) sources.
//
// Every op is registered in the torch library namespace `fpt_fast_native` (registration.cpp), so
// it is an ordinary torch op: torch.ops.fpt_fast_native.<op>, dispatched by device.
//
// Limits: inputs float32 / float16 / bfloat16, computed in float32; sizes up to what an int64 index
// holds; every size, index and dtype is checked with TORCH_CHECK before memory is touched.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace fpt_native {

// The dtypes every op accepts; a shared message keeps the errors alike.
inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

inline void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(is_supported_float(t.scalar_type()), "fpt_fast_native: ", name,
              " must be float32, float16 or bfloat16, got ", t.scalar_type());
}

// The row of the last dimension must be contiguous so that kernels can copy rows; anything else is
// copied once here (rare: views of a fused qkv tensor already have a unit last stride).
inline at::Tensor rows_contiguous(const at::Tensor& t) {
  return (t.dim() == 0 || t.stride(-1) == 1 || t.size(-1) == 1) ? t : t.contiguous();
}

// Calls f(scalar_t{}) for the three supported dtypes (callers check the dtype first).
template <typename F>
inline void dispatch_float(at::ScalarType t, const char* name, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(at::Half{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    default: TORCH_CHECK(false, "fpt_fast_native: ", name, ": unsupported dtype ", t);
  }
}

// ---------------------------------------------------------------------------------- CPU ops
at::Tensor token_importance_cpu(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& lse,
                                bool class_token);
std::tuple<at::Tensor, at::Tensor> attention_with_importance_cpu(const at::Tensor& q, const at::Tensor& k,
                                                                 const at::Tensor& v, bool class_token);
// k_sel, v_sel and, with with_indices, the kept token indices ((B, H, n) int64, ascending, written
// in the same scan as the rows; an undefined tensor otherwise). CUDA: select_tokens_cuda, same form.
using SelectResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
SelectResult select_tokens_cpu(const at::Tensor& scores, const at::Tensor& k, const at::Tensor& v, int64_t n,
                               std::optional<at::ScalarType> out_dtype, bool with_indices);
std::tuple<at::Tensor, at::Tensor> prompt_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v);
std::tuple<at::Tensor, at::Tensor, at::Tensor> prompt_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& lse, bool need_kv_grad);

// Shared argument checks (the CUDA select uses the same ones).
void check_select_args(const at::Tensor& scores, const at::Tensor& k, const at::Tensor& v, int64_t n,
                       std::optional<at::ScalarType> out_dtype);

// The two registered ops over one device's select: "select_tokens" -> (k_sel, v_sel) and
// "select_tokens_with_indices" -> (k_sel, v_sel, indices).
using SelectFn = SelectResult (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                  std::optional<at::ScalarType>, bool);

template <SelectFn Select>
std::tuple<at::Tensor, at::Tensor> select_op(const at::Tensor& scores, const at::Tensor& k, const at::Tensor& v,
                                             int64_t n, std::optional<at::ScalarType> out_dtype) {
  const SelectResult selected = Select(scores, k, v, n, out_dtype, false);
  return {std::get<0>(selected), std::get<1>(selected)};
}

template <SelectFn Select>
SelectResult select_with_indices_op(const at::Tensor& scores, const at::Tensor& k, const at::Tensor& v, int64_t n,
                                    std::optional<at::ScalarType> out_dtype) {
  return Select(scores, k, v, n, out_dtype, true);
}

}  // namespace fpt_native
