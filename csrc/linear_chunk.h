// GEMM pieces shared by the CPU chunk loops over a language-model head
// (csrc/token_stats.cpp, csrc/fused_linear.cpp).  They go through ATen, so the
// GEMMs run on the BLAS torch was built with (oneDNN / MKL / OpenBLAS), in the
// input dtype: a bfloat16 GEMM on a CPU with AVX512-BF16 is 2-4x faster than float32.
#pragma once

#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <optional>

namespace uf {

inline bool has_tensor(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// Vocabulary rows per slab of the CPU float32 GEMMs below (a (kVocabSlab, n) float32
// temporary: 4 MiB at n = 256).
constexpr int64_t kVocabSlab = 4096;

// The CPU float32 head GEMMs run "vocabulary-major" on slabs of the weight.  MKL runs the
// chunk's (n, H) @ (H, V) product with n of a few hundred rows well below its peak, but
// the same product as (V_slab, H) @ (H, n) near it (measured on the CI machine's 2-core
// EPYC, H = 3584, V = 151,936, n = 256: 133-149 GFLOP/s row-major vs 164-180 by slabs,
// the transposing copies included; the gradient product g @ W: 152-164 vs 167-181).
// Each slab's result is transposed into / out of the (n, V) row-major buffer the row
// kernels read, through a small slab temporary, so the chunk buffers stay as they are.
inline bool use_vocab_slabs(const at::Tensor& t) {
  return t.device().is_cpu() && t.scalar_type() == at::kFloat;
}

// out (n, V) = hc (n, H) @ weight(V, H)^T (+ bias).
inline void chunk_logits(at::Tensor& out, const at::Tensor& hc, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias) {
  if (use_vocab_slabs(out) && hc.size(0) > 1) {
    const int64_t V = weight.size(0), n = hc.size(0);
    at::Tensor slab_buf = at::empty({std::min(kVocabSlab, V), n}, out.options());
    const at::Tensor hc_t = hc.t();
    for (int64_t v0 = 0; v0 < V; v0 += kVocabSlab) {
      const int64_t s = std::min(kVocabSlab, V - v0);
      at::Tensor slab = slab_buf.narrow(0, 0, s);
      if (has_tensor(bias)) {
        at::addmm_out(slab, bias->narrow(0, v0, s).unsqueeze(1), weight.narrow(0, v0, s), hc_t);
      } else {
        at::mm_out(slab, weight.narrow(0, v0, s), hc_t);
      }
      out.narrow(1, v0, s).copy_(slab.t());
    }
    return;
  }
  if (has_tensor(bias)) {
    at::addmm_out(out, *bias, hc, weight.t());
  } else {
    at::mm_out(out, hc, weight.t());
  }
}

// grad_hc (n, H) = g (n, V) @ weight (V, H).
inline void chunk_grad_hidden(at::Tensor& grad_hc, const at::Tensor& g, const at::Tensor& weight) {
  if (use_vocab_slabs(g) && g.size(0) > 1) {
    const int64_t V = weight.size(0), n = g.size(0), H = weight.size(1);
    at::Tensor slab_buf = at::empty({std::min(kVocabSlab, V), n}, g.options());
    at::Tensor grad_t = at::zeros({H, n}, g.options());  // grad_hc^T, summed over the slabs
    for (int64_t v0 = 0; v0 < V; v0 += kVocabSlab) {
      const int64_t s = std::min(kVocabSlab, V - v0);
      at::Tensor slab = slab_buf.narrow(0, 0, s);
      slab.copy_(g.narrow(1, v0, s).t());
      grad_t.addmm_(weight.narrow(0, v0, s).t(), slab);
    }
    grad_hc.copy_(grad_t.t());
    return;
  }
  at::mm_out(grad_hc, g, weight);
}

// Vocabulary rows per partial product when a low-precision weight gradient is
// accumulated in float32 (a (kWeightGradSlab, H) temporary: 28 MiB at H = 3584).
constexpr int64_t kWeightGradSlab = 4096;

// dst (rows, H) float32 += a (rows, n) @ hc (n, H); with overwrite, = instead of +=.  A
// float32 product goes straight into dst.  A bfloat16/float16 one runs in that precision
// (float32 accumulation inside the GEMM, one rounding) into `part` (at least rows x H
// elements of hc's dtype) and is then added in float32.
inline void add_rows_product(at::Tensor dst, const at::Tensor& a, const at::Tensor& hc, bool overwrite,
                             const at::Tensor& part) {
  if (a.scalar_type() == at::kFloat) {
    if (overwrite) {
      at::mm_out(dst, a, hc);
    } else {
      dst.addmm_(a, hc);
    }
    return;
  }
  at::Tensor p = part.narrow(0, 0, a.size(0) * hc.size(1)).view({a.size(0), hc.size(1)});
  at::mm_out(p, a, hc);
  if (overwrite) {
    dst.copy_(p);
  } else {
    dst.add_(p);
  }
}

// grad_weight32 (V, H) float32 += g (n, V)^T @ hc (n, H); with overwrite, = instead of +=
// (the accumulator's first chunk: its old contents are never read, so it needs no zero fill).
//
// float32 g: one addmm into the accumulator.  bfloat16/float16 g: the GEMM runs in the
// low precision (float32 accumulation inside the GEMM, one rounding of each chunk's
// partial product) on slabs of the vocabulary, and the partial products are summed
// in float32 across chunks: summing the chunks in bfloat16 would drift with their
// number, and a float32 GEMM would be 2-4x slower.
inline void add_weight_grad(at::Tensor& grad_weight32, const at::Tensor& g, const at::Tensor& hc,
                            bool overwrite = false) {
  if (g.scalar_type() == at::kFloat) {
    add_rows_product(grad_weight32, g.t(), hc, overwrite, at::Tensor());
    return;
  }
  const int64_t V = g.size(1), H = hc.size(1);
  const at::Tensor part = at::empty({std::min(kWeightGradSlab, V) * H}, hc.options());
  for (int64_t v0 = 0; v0 < V; v0 += kWeightGradSlab) {
    const int64_t n = std::min(kWeightGradSlab, V - v0);
    add_rows_product(grad_weight32.narrow(0, v0, n), g.narrow(1, v0, n).t(), hc, overwrite, part);
  }
}

// The float32 (V, H) weight-gradient accumulator of a chunk loop over the tokens.  It is
// never zero-filled up front: the first chunk that contributes overwrites it, the later
// ones add to it, and result() zero-fills it only if no chunk contributed (every token
// ignored).  A zero fill is a whole extra write of the buffer (0.5 GB at LLaVA's head,
// where one chunk of 64 tokens costs about as much GEMM time), and the CPU loops take the
// buffer from empty_for_full_write (common.h), whose cache hands the same pages back every
// training step.  `grad` empty: no weight gradient was requested.
struct WeightGradAccumulator {
  at::Tensor grad;
  bool started = false;
  at::Tensor partial;  // add_block's low-precision partial product (allocated on first use)

  void add(const at::Tensor& g, const at::Tensor& hc) {
    add_weight_grad(grad, g, hc, /*overwrite=*/!started);
    started = true;
  }

  // Vocabulary-blocked loops: the rows [v0, v0 + vb) of one chunk's contribution, g_slab
  // (vb, n) the chunk's vocabulary-major gradient slab and hc (n, H) its hidden states.  A
  // chunk adds all of its blocks, then calls end_chunk().  bfloat16/float16: the product
  // runs in that precision and is added in float32, as add_weight_grad's slabs.
  void add_block(int64_t v0, const at::Tensor& g_slab, const at::Tensor& hc) {
    const int64_t need = g_slab.scalar_type() == at::kFloat ? 0 : g_slab.size(0) * hc.size(1);
    if (partial.numel() < need) partial = at::empty({need}, hc.options());
    add_rows_product(grad.narrow(0, v0, g_slab.size(0)), g_slab, hc, /*overwrite=*/!started, partial);
  }
  void end_chunk() { started = true; }

  // The gradient in the weight's dtype (float32: the accumulator itself).
  at::Tensor result(at::ScalarType weight_dtype) {
    if (grad.numel() == 0) return grad;
    if (!started) grad.zero_();
    return grad.scalar_type() == weight_dtype ? grad : grad.to(weight_dtype);
  }
};

// grad_bias32 (V,) float32 += column sums of g (n, V), summed in float32.
inline void add_bias_grad(at::Tensor& grad_bias32, const at::Tensor& g) {
  grad_bias32.add_(at::sum(g, {0}, false, at::kFloat));
}

}  // namespace uf
