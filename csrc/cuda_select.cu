// fpt_fast native extension: fused radix-select + gather on CUDA (docs/method.md, section 2).
//
// One thread block per (b, h) row:
// 1. Radix select of the n-th largest key over the row's scores, 8 bits at a time from the top (4
//    passes): each pass builds a 256-bin shared-memory histogram of the keys that match the prefix
//    found so far, then one thread walks the bins from the top to the bin holding the n-th key. Keys
//    are the monotone uint32 images of the scores (select_key.h: -0.0 -> +0.0, NaN largest). The
//    result is the threshold key T and how many of the keys equal to T are kept (the lowest indices).
// 2. Compaction in a fixed order: the row is walked in tiles of blockDim tokens in ascending index;
//    ballots and per-warp counts give each kept token its output slot (key > T, or key == T and its
//    rank among the ties is below the tie budget), so the output is in ascending token index and
//    ties at the n-th score go to the lower index, whatever the scheduling.
// 3. Gather: each tile's kept rows of K and V are copied by one warp per row, as 16-byte vectors
//    when every row is 16-byte aligned (base pointers, strides and row size), element by element
//    otherwise; a dtype cast happens in registers. select_tokens_with_indices also stores each kept
//    row's token index (int64, ascending) from the same tile list.
//
// Limits: scores float32/float16/bfloat16 (read through strides); k, v float32/float16/bfloat16
// of one dtype, unit stride in the last dimension (others are copied first); N < 2^31; B*H <= 2^31-1
// blocks. Caution: checked bitwise against the CPU kernel (every in/out dtype pair, ties, NaN, +-0,
// strided and unaligned rows) only on an H100 (sm_90a, torch 2.11, nvcc 13.0); elsewhere compile-only.
// Not tuned: one block per row with a serial 256-bin scan, so small batches are latency-bound
// (about 45 us for B*H = 24 rows of N = 1025 on the H100, 6x faster than the "torch" backend there).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: that one needs the cuBLAS/cuSPARSE headers
#include <torch/library.h>

#include <cstdint>

#include "fpt_native.h"
#include "select_key.h"

namespace fpt_native {
namespace {

constexpr int kThreads = 256;  // 8 warps: enough to hide the score loads of one row
constexpr int kWarps = kThreads / 32;

enum ScoreType : int { kScoreF32 = 0, kScoreF16 = 1, kScoreBF16 = 2 };

__device__ __forceinline__ uint32_t load_key(const void* scores, int type, int64_t offset) {
  float f;
  if (type == kScoreF32) {
    f = static_cast<const float*>(scores)[offset];
  } else if (type == kScoreF16) {
    f = static_cast<float>(static_cast<const at::Half*>(scores)[offset]);
  } else {
    f = static_cast<float>(static_cast<const at::BFloat16*>(scores)[offset]);
  }
  return float_order_key(f);
}

struct RowArgs {
  const void* scores;
  int score_type;
  int64_t ss0, ss1, ss2;
  int64_t ks0, ks1, ks2, vs0, vs1, vs2;
  int H, N, n, d;
  bool vec_in;   // K and V rows are 16-byte aligned and a whole number of 16-byte vectors
  bool vec_out;  // output rows likewise
};

// Copies one row of d elements, by one warp.
template <typename In, typename Out>
__device__ __forceinline__ void copy_row(const In* __restrict__ src, Out* __restrict__ dst, int d, int lane,
                                         bool vec_in, bool vec_out) {
  constexpr int kInPerVec = 16 / sizeof(In);
  if (vec_in && vec_out && sizeof(In) == sizeof(Out) && std::is_same<In, Out>::value) {
    const uint4* s = reinterpret_cast<const uint4*>(src);
    uint4* t = reinterpret_cast<uint4*>(dst);
    for (int i = lane; i < d / kInPerVec; i += 32) t[i] = s[i];
  } else if (vec_in) {
    // Cast while copying: 16-byte loads, element stores (the output row may have another width).
    const uint4* s = reinterpret_cast<const uint4*>(src);
    for (int i = lane; i < d / kInPerVec; i += 32) {
      const uint4 raw = s[i];
      const In* e = reinterpret_cast<const In*>(&raw);
#pragma unroll
      for (int j = 0; j < kInPerVec; ++j) dst[i * kInPerVec + j] = static_cast<Out>(static_cast<float>(e[j]));
    }
  } else {
    for (int c = lane; c < d; c += 32) dst[c] = static_cast<Out>(static_cast<float>(src[c]));
  }
}

template <typename In, typename Out>
__global__ void __launch_bounds__(kThreads) radix_select_gather_kernel(RowArgs a, const In* __restrict__ k,
                                                                        const In* __restrict__ v,
                                                                        Out* __restrict__ k_out,
                                                                        Out* __restrict__ v_out,
                                                                        int64_t* __restrict__ index_out) {
  __shared__ unsigned int hist[256];
  __shared__ uint32_t s_prefix;
  __shared__ int s_remaining;
  __shared__ int warp_ties[kWarps];
  __shared__ int warp_keeps[kWarps];
  __shared__ int tile_index[kThreads];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t row = blockIdx.x;
  const int64_t b = row / a.H, h = row % a.H;
  const int64_t score_base = b * a.ss0 + h * a.ss1;

  // ---- 1. radix select: T = the n-th largest key, remaining = ties at T to keep
  uint32_t prefix = 0, mask = 0;
  int remaining = a.n;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = tid; i < 256; i += kThreads) hist[i] = 0;
    __syncthreads();
    for (int j = tid; j < a.N; j += kThreads) {
      const uint32_t key = load_key(a.scores, a.score_type, score_base + j * a.ss2);
      if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 0xFFu], 1u);
    }
    __syncthreads();
    if (tid == 0) {
      // Bins from the top: the digit whose bin holds the remaining-th largest matching key.
      int above = 0;
      for (int digit = 255; digit >= 0; --digit) {
        const int count = static_cast<int>(hist[digit]);
        if (above + count >= remaining) {
          s_prefix = prefix | (static_cast<uint32_t>(digit) << shift);
          s_remaining = remaining - above;
          break;
        }
        above += count;
      }
    }
    __syncthreads();
    prefix = s_prefix;
    remaining = s_remaining;
    mask |= 0xFFu << shift;
  }
  const uint32_t threshold = prefix;  // exact: all 32 bits fixed
  const int tie_budget = remaining;   // keys == T to keep, lowest indices first

  // ---- 2 + 3. ordered compaction, tile by tile, and the gather of each tile's kept rows
  const unsigned lanes_below = (1u << lane) - 1u;
  const In* k_row = k + b * a.ks0 + h * a.ks1;
  const In* v_row = v + b * a.vs0 + h * a.vs1;
  Out* k_dst = k_out + row * a.n * a.d;
  Out* v_dst = v_out + row * a.n * a.d;
  int kept = 0, ties_seen = 0;  // uniform over the block
  for (int base = 0; base < a.N && kept < a.n; base += kThreads) {
    const int j = base + tid;
    const uint32_t key = j < a.N ? load_key(a.scores, a.score_type, score_base + j * a.ss2) : 0u;
    const bool gt = j < a.N && key > threshold;
    const bool tie = j < a.N && key == threshold;
    const unsigned tie_ballot = __ballot_sync(0xFFFFFFFFu, tie);
    if (lane == 0) warp_ties[warp] = __popc(tie_ballot);
    __syncthreads();
    int tie_rank = ties_seen + __popc(tie_ballot & lanes_below);
    int tile_ties = 0;
    for (int w = 0; w < kWarps; ++w) {
      if (w < warp) tie_rank += warp_ties[w];
      tile_ties += warp_ties[w];
    }
    const bool keep = gt || (tie && tie_rank < tie_budget);
    const unsigned keep_ballot = __ballot_sync(0xFFFFFFFFu, keep);
    if (lane == 0) warp_keeps[warp] = __popc(keep_ballot);
    __syncthreads();
    int slot = __popc(keep_ballot & lanes_below);
    int tile_kept = 0;
    for (int w = 0; w < kWarps; ++w) {
      if (w < warp) slot += warp_keeps[w];
      tile_kept += warp_keeps[w];
    }
    if (keep) tile_index[slot] = j;
    __syncthreads();
    for (int r = warp; r < tile_kept; r += kWarps) {
      const int out_slot = kept + r;
      if (out_slot >= a.n) break;  // cannot happen (exactly n keys qualify); guards the writes anyway
      const int64_t token = tile_index[r];
      const int64_t dst_offset = static_cast<int64_t>(out_slot) * a.d;
      copy_row<In, Out>(k_row + token * a.ks2, k_dst + dst_offset, a.d, lane, a.vec_in, a.vec_out);
      copy_row<In, Out>(v_row + token * a.vs2, v_dst + dst_offset, a.d, lane, a.vec_in, a.vec_out);
      if (index_out != nullptr && lane == 0) index_out[row * a.n + out_slot] = token;
    }
    kept += tile_kept;
    ties_seen += tile_ties;
    __syncthreads();  // tile_index and the warp counts are reused by the next tile
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

SelectResult select_tokens_cuda(const at::Tensor& scores, const at::Tensor& k_in, const at::Tensor& v_in, int64_t n,
                                std::optional<at::ScalarType> out_dtype, bool with_indices) {
  check_select_args(scores, k_in, v_in, n, out_dtype);
  TORCH_CHECK(k_in.is_cuda() && scores.is_cuda(), "fpt_fast_native.select_tokens: expected CUDA tensors");
  TORCH_CHECK(k_in.size(0) * k_in.size(1) <= INT32_MAX, "fpt_fast_native.select_tokens: B * H = ",
              k_in.size(0) * k_in.size(1), " rows exceed one launch");
  const c10::cuda::CUDAGuard guard(k_in.device());
  const at::Tensor k = rows_contiguous(k_in), v = rows_contiguous(v_in);
  const at::ScalarType out_t = out_dtype.value_or(k.scalar_type());
  const int64_t B = k.size(0), H = k.size(1), N = k.size(2), d = k.size(3);
  at::Tensor k_out = at::empty({B, H, n, d}, k.options().dtype(out_t));
  at::Tensor v_out = at::empty({B, H, n, d}, k.options().dtype(out_t));
  at::Tensor index_out = with_indices ? at::empty({B, H, n}, k.options().dtype(at::kLong)) : at::Tensor();

  RowArgs a{};
  a.scores = scores.data_ptr();
  a.score_type = scores.scalar_type() == at::kFloat ? kScoreF32 : scores.scalar_type() == at::kHalf ? kScoreF16 : kScoreBF16;
  a.ss0 = scores.stride(0); a.ss1 = scores.stride(1); a.ss2 = scores.stride(2);
  a.ks0 = k.stride(0); a.ks1 = k.stride(1); a.ks2 = k.stride(2);
  a.vs0 = v.stride(0); a.vs1 = v.stride(1); a.vs2 = v.stride(2);
  a.H = static_cast<int>(H); a.N = static_cast<int>(N); a.n = static_cast<int>(n); a.d = static_cast<int>(d);
  TORCH_CHECK(H <= INT32_MAX && d <= INT32_MAX, "fpt_fast_native.select_tokens: H or d too large");
  const int64_t in_size = k.element_size(), out_size = k_out.element_size();
  bool vec_in = aligned16(k.data_ptr()) && aligned16(v.data_ptr()) && (d * in_size) % 16 == 0;
  for (int64_t s : {a.ks0, a.ks1, a.ks2, a.vs0, a.vs1, a.vs2}) vec_in = vec_in && (s * in_size) % 16 == 0;
  a.vec_in = vec_in;
  a.vec_out = aligned16(k_out.data_ptr()) && aligned16(v_out.data_ptr()) && (d * out_size) % 16 == 0;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(k.scalar_type(), "select_tokens", [&](auto in_tag) {
    dispatch_float(out_t, "select_tokens", [&](auto out_tag) {
      using In = decltype(in_tag);
      using Out = decltype(out_tag);
      radix_select_gather_kernel<In, Out><<<static_cast<unsigned>(B * H), kThreads, 0, stream>>>(
          a, k.data_ptr<In>(), v.data_ptr<In>(), k_out.data_ptr<Out>(), v_out.data_ptr<Out>(),
          with_indices ? index_out.data_ptr<int64_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {k_out, v_out, index_out};
}

}  // namespace fpt_native

TORCH_LIBRARY_IMPL(fpt_fast_native, CUDA, m) {
  m.impl("select_tokens", &fpt_native::select_op<&fpt_native::select_tokens_cuda>);
  m.impl("select_tokens_with_indices", &fpt_native::select_with_indices_op<&fpt_native::select_tokens_cuda>);
}
