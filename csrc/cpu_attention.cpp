// fpt_fast native extension: CPU attention kernels of FPT (docs/method.md, sections 2, 4 and 10).
//
//   token_importance_cpu           s_j = (1/N) sum_i exp(q_i.k_j/sqrt(d) - LSE_i), LSE given or computed;
//                                  or the class token's c_j = exp(q_0.k_j/sqrt(d) - LSE_0) (query row 0 only)
//   attention_with_importance_cpu  softmax(q k^T/sqrt(d)) v and the importance (global or class token)
//   prompt_attention_cpu           P prompt queries over n selected keys per (l, b, h): out and row LSE
//   prompt_attention_backward_cpu  dq, dk, dv from the saved LSE (probabilities recomputed, never stored)
//
// How: work items are (batch x head x group of query rows); an item converts its head's K (transposed)
// and V to zero-padded float32 panels, then walks its rows in blocks of kBlockRows: logits of one
// block against all keys (a register-tiled gemm, cpu_math), row max / exp / sum in place, the row LSE,
// the block's contribution to the column sums, and P @ V. Extra memory per item is O(N * d): never
// N x N. Column sums are reduced over a fixed number of groups (a function of N only) in a fixed
// order, so results are bitwise identical for any thread count.
//
// Limits: float32/float16/bfloat16 in, float32 compute; q, k, v are read through their strides (the
// last dimension is copied to unit stride first if it is not); the exp is a polynomial accurate to a
// few ulp (cpu_math.h); N < 2^31. Tested on x86-64 (AVX-512, AVX2 and baseline paths) with GCC 12.
#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu_math.h"
#include "fpt_native.h"

namespace fpt_native {
namespace {

using cpu::kColPad;
using cpu::kRowTile;
using cpu::MathKernels;
using cpu::round_up;

constexpr int64_t kBlockRows = 32;     // query rows per logits block (32 x N floats stay in L2)
constexpr int64_t kMaxGroups = 8;      // query-row groups per head: bounds the partial column sums
constexpr int64_t kMinGroupRows = 128; // smaller groups would spend more on building K/V panels

// A 4-D (or 5-D) tensor's data pointer with its strides: element (i0, i1, i2, row, col).
template <typename T>
struct Strided {
  const T* data;
  int64_t s0, s1, s2, s_row;
  const T* row(int64_t i0, int64_t i1, int64_t i2, int64_t r) const {
    return data + i0 * s0 + i1 * s1 + i2 * s2 + r * s_row;
  }
};

// rows x cols of src (row stride ld_src) -> float32 dst (row stride ld_dst), multiplied by scale.
template <typename T>
void load_rows(const T* src, int64_t ld_src, int64_t rows, int64_t cols, float scale, float* dst, int64_t ld_dst) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* s = src + r * ld_src;
    float* d = dst + r * ld_dst;
    for (int64_t c = 0; c < cols; ++c) d[c] = static_cast<float>(s[c]) * scale;
  }
}

// The transpose: dst[c * ld_dst + r] = src[r][c], for a (cols x rows) panel.
template <typename T>
void load_transposed(const T* src, int64_t ld_src, int64_t rows, int64_t cols, float* dst, int64_t ld_dst) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* s = src + r * ld_src;
    for (int64_t c = 0; c < cols; ++c) dst[c * ld_dst + r] = static_cast<float>(s[c]);
  }
}

template <typename T>
void store_rows(const float* src, int64_t ld_src, int64_t rows, int64_t cols, T* dst, int64_t ld_dst) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[r * ld_dst + c] = static_cast<T>(src[r * ld_src + c]);
}

// In place over rows [0, rows) of S (only the first n columns): either p = exp(s - lse_in[r]) (lse
// given), or the softmax p = exp(s - max) / sum, writing the row LSE to lse_out when asked.
void softmax_rows(const MathKernels& mk, float* S, int64_t ld, int64_t rows, int64_t n, const float* lse_in,
                  int64_t lse_in_stride, float* lse_out) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = S + r * ld;
    if (lse_in != nullptr) {
      mk.exp_sum(row, n, lse_in[r * lse_in_stride]);
      continue;
    }
    const float m = mk.max(row, n);
    const float sum = mk.exp_sum(row, n, m);
    mk.scale(row, n, 1.0f / sum);
    if (lse_out != nullptr) lse_out[r] = m + std::log(sum);
  }
}

// ----------------------------------------------------------------- self-attention + importance
template <typename T>
struct SelfAttention {
  int64_t B, H, N, d;
  int64_t M;                   // query rows walked: N, or 1 for the class token's importance alone
  Strided<T> q, k, v;          // v.data == nullptr: importance only
  const float* lse;            // optional (B, H, N) float32, strides below
  int64_t lse_s0, lse_s1, lse_s2;
  bool class_token;            // scores = probabilities of query row 0
  T* out;                      // (B, H, N, d) contiguous, or nullptr
  float* scores;               // (B, H, N) contiguous
  float* partial;              // (B * H, groups, N): per-group column sums (global mode)
  int64_t groups, group_rows;

  void run_item(int64_t item, std::vector<float>& buf) const {
    const MathKernels& mk = cpu::math();
    const int64_t bh = item / groups, g = item % groups, b = bh / H, h = bh % H;
    const int64_t row_begin = g * group_rows, row_end = std::min(M, row_begin + group_rows);
    const int64_t Np = round_up(N, kColPad), dp = round_up(d, kColPad);
    const bool with_v = v.data != nullptr;
    const float scale = 1.0f / std::sqrt(static_cast<float>(d));

    buf.assign(d * Np + (with_v ? Np * dp : 0) + kBlockRows * d + kBlockRows * Np + kBlockRows * dp + N, 0.f);
    float* kt = buf.data();                        // (d, Np) keys transposed, zero-padded columns
    float* vb = kt + d * Np;                       // (Np, dp) values, zero-padded rows and columns
    float* qb = vb + (with_v ? Np * dp : 0);       // (kBlockRows, d) scaled queries
    float* S = qb + kBlockRows * d;                // (kBlockRows, Np) logits, then probabilities
    float* ob = S + kBlockRows * Np;               // (kBlockRows, dp) output rows
    float* colsum = ob + kBlockRows * dp;          // (N) this group's column sums

    load_transposed(k.row(b, h, 0, 0), k.s_row, N, d, kt, Np);
    if (with_v) load_rows(v.row(b, h, 0, 0), v.s_row, N, d, 1.0f, vb, dp);

    for (int64_t r0 = row_begin; r0 < row_end; r0 += kBlockRows) {
      const int64_t rows = std::min(kBlockRows, row_end - r0), rows_p = round_up(rows, kRowTile);
      load_rows(q.row(b, h, 0, r0), q.s_row, rows, d, scale, qb, d);
      std::fill(qb + rows * d, qb + rows_p * d, 0.f);  // padded rows give zero logits, never read
      mk.gemm(rows_p, Np, d, qb, d, kt, Np, S, Np);
      const float* lse_rows = lse ? lse + b * lse_s0 + h * lse_s1 + r0 * lse_s2 : nullptr;
      softmax_rows(mk, S, Np, rows, N, lse_rows, lse_s2, nullptr);
      if (!class_token) {
        for (int64_t r = 0; r < rows; ++r) mk.add(colsum, S + r * Np, N);  // ascending rows: fixed order
      } else if (r0 == 0) {
        std::memcpy(scores + bh * N, S, N * sizeof(float));
      }
      if (with_v) {
        // Columns N..Np of S are exactly 0 (zero-padded keys, never exponentiated), as are vb's padded rows.
        mk.gemm(rows_p, dp, Np, S, Np, vb, dp, ob, dp);
        store_rows(ob, dp, rows, d, out + (bh * N + r0) * d, d);
      }
    }
    if (!class_token) std::memcpy(partial + (bh * groups + g) * N, colsum, N * sizeof(float));
  }

  void run() {
    group_rows = round_up(std::max(kMinGroupRows, (M + kMaxGroups - 1) / kMaxGroups), kBlockRows);
    groups = (M + group_rows - 1) / group_rows;
    std::vector<float> partial_buf(class_token ? 0 : B * H * groups * N);
    partial = partial_buf.data();
    at::parallel_for(0, B * H * groups, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> buf;
      for (int64_t item = begin; item < end; ++item) run_item(item, buf);
    });
    if (class_token) return;
    const float inv_n = 1.0f / static_cast<float>(N);
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) {
        float* s = scores + bh * N;
        const float* p = partial + bh * groups * N;
        for (int64_t j = 0; j < N; ++j) {
          float acc = 0.f;
          for (int64_t g = 0; g < groups; ++g) acc += p[g * N + j];  // groups in order
          s[j] = acc * inv_n;
        }
      }
    });
  }
};

void check_qk(const at::Tensor& q, const at::Tensor& k, const char* op) {
  check_float(q, "q");
  TORCH_CHECK(q.dim() == 4, "fpt_fast_native.", op, ": q must be 4-D (B, H, N, d), got shape ", q.sizes());
  TORCH_CHECK(k.sizes() == q.sizes(), "fpt_fast_native.", op, ": k ", k.sizes(), " must have the shape of q ",
              q.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), "fpt_fast_native.", op, ": k (", k.scalar_type(),
              ") and q (", q.scalar_type(), ") must have the same dtype");
  TORCH_CHECK(k.device() == q.device(), "fpt_fast_native.", op, ": q and k must be on the same device");
  TORCH_CHECK(q.numel() > 0, "fpt_fast_native.", op, ": q is empty (shape ", q.sizes(), ")");
  TORCH_CHECK(q.size(2) < (int64_t(1) << 31), "fpt_fast_native.", op, ": N = ", q.size(2), " is too large");
}

template <typename T>
Strided<T> strided4(const at::Tensor& t) {
  return {t.data_ptr<T>(), t.stride(0), t.stride(1), 0, t.stride(2)};
}

std::tuple<at::Tensor, at::Tensor> self_attention(const at::Tensor& q_in, const at::Tensor& k_in,
                                                  const at::Tensor* v_in, const at::Tensor* lse_in,
                                                  bool class_token) {
  const at::Tensor q = rows_contiguous(q_in), k = rows_contiguous(k_in);
  const at::Tensor v = v_in ? rows_contiguous(*v_in) : at::Tensor();
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), d = q.size(3);
  at::Tensor out = v_in ? at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous)) : at::Tensor();
  at::Tensor scores = at::empty({B, H, N}, q.options().dtype(at::kFloat));
  dispatch_float(q.scalar_type(), "attention", [&](auto tag) {
    using T = decltype(tag);
    SelfAttention<T> job{};
    job.B = B; job.H = H; job.N = N; job.d = d;
    // Without v only the scores are wanted, and the class token's need query row 0 alone.
    job.M = (class_token && v_in == nullptr) ? 1 : N;
    job.q = strided4<T>(q);
    job.k = strided4<T>(k);
    job.v = v_in ? strided4<T>(v) : Strided<T>{nullptr, 0, 0, 0, 0};
    if (lse_in) {
      job.lse = lse_in->data_ptr<float>();
      job.lse_s0 = lse_in->stride(0); job.lse_s1 = lse_in->stride(1); job.lse_s2 = lse_in->stride(2);
    }
    job.class_token = class_token;
    job.out = v_in ? out.data_ptr<T>() : nullptr;
    job.scores = scores.data_ptr<float>();
    job.run();
  });
  return {out, scores};
}

// ------------------------------------------------------------------------ prompt attention
// Shapes: q (L, [B,] H, P, d) (b stride 0 when shared), k, v (L, B, H, n, d), out (L, B, P, H * d).
template <typename T>
struct PromptShapes {
  int64_t L, B, H, P, n, d;
  Strided<T> q, k, v;
  int64_t Pp() const { return round_up(P, kRowTile); }
  int64_t np() const { return round_up(n, kColPad); }
  int64_t dp() const { return round_up(d, kColPad); }
};

template <typename T>
Strided<T> strided5(const at::Tensor& t, bool shared_b) {
  if (shared_b) return {t.data_ptr<T>(), t.stride(0), 0, t.stride(1), t.stride(2)};
  return {t.data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

template <typename T>
void prompt_forward(const PromptShapes<T>& s, T* out, float* lse) {
  const int64_t Pp = s.Pp(), np = s.np(), dp = s.dp(), P = s.P, n = s.n, d = s.d;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  at::parallel_for(0, s.L * s.B * s.H, 1, [&](int64_t begin, int64_t end) {
    const MathKernels& mk = cpu::math();
    std::vector<float> buf(Pp * d + d * np + np * dp + Pp * np + Pp * dp, 0.f);
    float* qb = buf.data();
    float* kt = qb + Pp * d;
    float* vb = kt + d * np;
    float* S = vb + np * dp;
    float* ob = S + Pp * np;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t l = item / (s.B * s.H), b = item / s.H % s.B, h = item % s.H;
      load_rows(s.q.row(l, b, h, 0), s.q.s_row, P, d, scale, qb, d);  // padded rows stay zero
      load_transposed(s.k.row(l, b, h, 0), s.k.s_row, n, d, kt, np);  // padded columns stay zero
      load_rows(s.v.row(l, b, h, 0), s.v.s_row, n, d, 1.0f, vb, dp);
      mk.gemm(Pp, np, d, qb, d, kt, np, S, np);
      float* lse_rows = lse + ((l * s.B + b) * s.H + h) * P;
      softmax_rows(mk, S, np, P, n, nullptr, 0, lse_rows);
      mk.gemm(Pp, dp, np, S, np, vb, dp, ob, dp);
      // Heads merged: row p of this item goes to out[l, b, p, h*d : (h+1)*d].
      store_rows(ob, dp, P, d, out + ((l * s.B + b) * P) * s.H * d + h * d, s.H * d);
    }
  });
}

// Per (l, h) item, b in order: recompute P from the LSE, dP = dO V^T, delta = rowsum(P * dP),
// dS = P * (dP - delta), dQ = dS K / sqrt(d), dK = dS^T Q / sqrt(d), dV = P^T dO. A shared q sums its
// gradient over b in this fixed order (deterministic, no atomics, no per-b buffer).
template <typename T>
void prompt_backward(const PromptShapes<T>& s, bool shared_q, const T* grad_out, int64_t go_s0, int64_t go_s1,
                     int64_t go_s2, const float* lse, T* dq, T* dk, T* dv, bool need_kv_grad) {
  const int64_t Pp = s.Pp(), np = s.np(), dp = s.dp(), P = s.P, n = s.n, d = s.d, H = s.H, B = s.B;
  const int64_t n8 = round_up(n, kRowTile);
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  at::parallel_for(0, s.L * H, 1, [&](int64_t begin, int64_t end) {
    const MathKernels& mk = cpu::math();
    std::vector<float> buf(Pp * dp * 4 + d * np * 2 + np * dp + Pp * np * 2 + n8 * Pp + n8 * dp, 0.f);
    float* qs = buf.data();        // (Pp, dp) q / sqrt(d)
    float* dob = qs + Pp * dp;     // (Pp, dp) grad_out rows of this head
    float* dqa = dob + Pp * dp;    // (Pp, dp) dq accumulator
    float* dq_part = dqa + Pp * dp;  // (Pp, dp) this b's dS @ K
    float* kt = dq_part + Pp * dp; // (d, np)
    float* vt = kt + d * np;       // (d, np)
    float* kb = vt + d * np;       // (np, dp)
    float* Pm = kb + np * dp;      // (Pp, np) probabilities
    float* dS = Pm + Pp * np;      // (Pp, np) dP, then dS
    float* tr = dS + Pp * np;      // (n8, Pp) a transpose (P^T, then dS^T)
    float* kv_grad = tr + n8 * Pp; // (n8, dp) dV, then dK
    for (int64_t item = begin; item < end; ++item) {
      const int64_t l = item / H, h = item % H;
      std::fill(dqa, dqa + Pp * dp, 0.f);
      for (int64_t b = 0; b < B; ++b) {
        if (!shared_q || b == 0) load_rows(s.q.row(l, b, h, 0), s.q.s_row, P, d, scale, qs, dp);
        load_transposed(s.k.row(l, b, h, 0), s.k.s_row, n, d, kt, np);
        load_transposed(s.v.row(l, b, h, 0), s.v.s_row, n, d, vt, np);
        load_rows(s.k.row(l, b, h, 0), s.k.s_row, n, d, 1.0f, kb, dp);
        load_rows(grad_out + l * go_s0 + b * go_s1 + h * d, go_s2, P, d, 1.0f, dob, dp);
        mk.gemm(Pp, np, d, qs, dp, kt, np, Pm, np);
        softmax_rows(mk, Pm, np, P, n, lse + ((l * B + b) * H + h) * P, 1, nullptr);
        mk.gemm(Pp, np, d, dob, dp, vt, np, dS, np);
        for (int64_t i = 0; i < P; ++i) {
          const float delta = mk.dot(Pm + i * np, dS + i * np, n);
          mk.softmax_grad(dS + i * np, Pm + i * np, n, delta);
        }
        // dQ += dS @ K (scaled once at the end).
        if (!shared_q) std::fill(dqa, dqa + Pp * dp, 0.f);
        mk.gemm(Pp, dp, n, dS, np, kb, dp, dq_part, dp);
        for (int64_t i = 0; i < P; ++i) mk.add(dqa + i * dp, dq_part + i * dp, d);
        if (!shared_q) {
          mk.scale(dqa, Pp * dp, scale);
          store_rows(dqa, dp, P, d, dq + ((l * B + b) * H + h) * P * d, d);
        }
        if (!need_kv_grad) continue;
        // dV = P^T @ dO
        for (int64_t i = 0; i < P; ++i)
          for (int64_t j = 0; j < n; ++j) tr[j * Pp + i] = Pm[i * np + j];
        mk.gemm(n8, dp, P, tr, Pp, dob, dp, kv_grad, dp);
        T* kv_out = dv + ((l * B + b) * H + h) * n * d;
        store_rows(kv_grad, dp, n, d, kv_out, d);
        // dK = dS^T @ (Q / sqrt(d))
        for (int64_t i = 0; i < P; ++i)
          for (int64_t j = 0; j < n; ++j) tr[j * Pp + i] = dS[i * np + j];
        mk.gemm(n8, dp, P, tr, Pp, qs, dp, kv_grad, dp);
        store_rows(kv_grad, dp, n, d, dk + ((l * B + b) * H + h) * n * d, d);
      }
      if (shared_q) {
        mk.scale(dqa, Pp * dp, scale);
        store_rows(dqa, dp, P, d, dq + (l * H + h) * P * d, d);
      }
    }
  });
}

void check_prompt_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const char* op) {
  check_float(q, "q");
  TORCH_CHECK(k.dim() == 5, "fpt_fast_native.", op, ": k must be 5-D (L, B, H, n, d), got shape ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "fpt_fast_native.", op, ": v ", v.sizes(), " must have the shape of k ",
              k.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "fpt_fast_native.", op,
              ": q, k and v must have one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(), "fpt_fast_native.", op,
              ": q, k and v must be on one device");
  const int64_t L = k.size(0), B = k.size(1), H = k.size(2), d = k.size(4);
  if (q.dim() == 4) {
    TORCH_CHECK(q.size(0) == L && q.size(1) == H && q.size(3) == d, "fpt_fast_native.", op, ": q ", q.sizes(),
                " must be (L, H, P, d) = (", L, ", ", H, ", P, ", d, ") to match k ", k.sizes());
  } else {
    TORCH_CHECK(q.dim() == 5, "fpt_fast_native.", op, ": q must be (L, H, P, d) or (L, B, H, P, d), got shape ",
                q.sizes());
    TORCH_CHECK(q.size(0) == L && q.size(1) == B && q.size(2) == H && q.size(4) == d, "fpt_fast_native.", op,
                ": q ", q.sizes(), " must be (L, B, H, P, d) = (", L, ", ", B, ", ", H, ", P, ", d,
                ") to match k ", k.sizes());
  }
  TORCH_CHECK(q.numel() > 0 && k.numel() > 0, "fpt_fast_native.", op, ": empty input: q ", q.sizes(), ", k ",
              k.sizes());
}

template <typename T>
PromptShapes<T> prompt_shapes(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  const bool shared = q.dim() == 4;
  PromptShapes<T> s{k.size(0), k.size(1), k.size(2), q.size(q.dim() - 2), k.size(3), k.size(4),
                    strided5<T>(q, shared), strided5<T>(k, false), strided5<T>(v, false)};
  return s;
}

}  // namespace

// ---------------------------------------------------------------------------------- the ops
at::Tensor token_importance_cpu(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& lse,
                                bool class_token) {
  check_qk(q, k, "token_importance");
  if (lse.has_value()) {
    const at::Tensor& l = *lse;
    TORCH_CHECK(l.scalar_type() == at::kFloat, "fpt_fast_native.token_importance: lse must be float32, got ",
                l.scalar_type());
    TORCH_CHECK(l.dim() == 3 && l.size(0) == q.size(0) && l.size(1) == q.size(1) && l.size(2) == q.size(2),
                "fpt_fast_native.token_importance: lse ", l.sizes(), " must be (B, H, N) = ", q.sizes().slice(0, 3));
    TORCH_CHECK(l.device() == q.device(), "fpt_fast_native.token_importance: lse must be on q's device");
  }
  return std::get<1>(self_attention(q, k, nullptr, lse.has_value() ? &*lse : nullptr, class_token));
}

std::tuple<at::Tensor, at::Tensor> attention_with_importance_cpu(const at::Tensor& q, const at::Tensor& k,
                                                                 const at::Tensor& v, bool class_token) {
  check_qk(q, k, "attention_with_importance");
  TORCH_CHECK(v.sizes() == q.sizes() && v.scalar_type() == q.scalar_type() && v.device() == q.device(),
              "fpt_fast_native.attention_with_importance: v (", v.sizes(), ", ", v.scalar_type(),
              ") must have q's shape ", q.sizes(), " and dtype ", q.scalar_type());
  return self_attention(q, k, &v, nullptr, class_token);
}

std::tuple<at::Tensor, at::Tensor> prompt_attention_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                        const at::Tensor& v_in) {
  check_prompt_args(q_in, k_in, v_in, "prompt_attention");
  const at::Tensor q = rows_contiguous(q_in), k = rows_contiguous(k_in), v = rows_contiguous(v_in);
  const int64_t L = k.size(0), B = k.size(1), H = k.size(2), d = k.size(4), P = q.size(q.dim() - 2);
  at::Tensor out = at::empty({L, B, P, H * d}, q.options());
  at::Tensor lse = at::empty({L, B, H, P}, q.options().dtype(at::kFloat));
  dispatch_float(q.scalar_type(), "prompt_attention", [&](auto tag) {
    using T = decltype(tag);
    prompt_forward<T>(prompt_shapes<T>(q, k, v), out.data_ptr<T>(), lse.data_ptr<float>());
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> prompt_attention_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& lse_in, bool need_kv_grad) {
  check_prompt_args(q_in, k_in, v_in, "prompt_attention_backward");
  const int64_t L = k_in.size(0), B = k_in.size(1), H = k_in.size(2), d = k_in.size(4), P = q_in.size(q_in.dim() - 2);
  TORCH_CHECK(grad_out_in.dim() == 4 && grad_out_in.size(0) == L && grad_out_in.size(1) == B &&
                  grad_out_in.size(2) == P && grad_out_in.size(3) == H * d,
              "fpt_fast_native.prompt_attention_backward: grad_out ", grad_out_in.sizes(), " must be (L, B, P, H*d) = (",
              L, ", ", B, ", ", P, ", ", H * d, ")");
  TORCH_CHECK(grad_out_in.scalar_type() == q_in.scalar_type() && grad_out_in.device() == q_in.device(),
              "fpt_fast_native.prompt_attention_backward: grad_out (", grad_out_in.scalar_type(),
              ") must have q's dtype (", q_in.scalar_type(), ") and device");
  TORCH_CHECK(lse_in.scalar_type() == at::kFloat && lse_in.dim() == 4 && lse_in.size(0) == L && lse_in.size(1) == B &&
                  lse_in.size(2) == H && lse_in.size(3) == P && lse_in.device() == q_in.device(),
              "fpt_fast_native.prompt_attention_backward: lse ", lse_in.sizes(), " (", lse_in.scalar_type(),
              ") must be float32 (L, B, H, P) = (", L, ", ", B, ", ", H, ", ", P, ")");
  const at::Tensor q = rows_contiguous(q_in), k = rows_contiguous(k_in), v = rows_contiguous(v_in);
  const at::Tensor grad_out = rows_contiguous(grad_out_in), lse = lse_in.contiguous();
  at::Tensor dq = at::empty(q.sizes(), q.options());
  // Without need_kv_grad (k, v constants, as in FPT) only dq is computed; dk, dv come back empty.
  at::Tensor dk = at::empty(need_kv_grad ? k.sizes() : at::IntArrayRef{0}, k.options());
  at::Tensor dv = at::empty(need_kv_grad ? v.sizes() : at::IntArrayRef{0}, v.options());
  dispatch_float(q.scalar_type(), "prompt_attention_backward", [&](auto tag) {
    using T = decltype(tag);
    prompt_backward<T>(prompt_shapes<T>(q, k, v), q.dim() == 4, grad_out.data_ptr<T>(), grad_out.stride(0),
                       grad_out.stride(1), grad_out.stride(2), lse.data_ptr<float>(), dq.data_ptr<T>(),
                       dk.data_ptr<T>(), dv.data_ptr<T>(), need_kv_grad);
  });
  return {dq, dk, dv};
}

}  // namespace fpt_native
