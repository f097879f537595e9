// Torch bindings of the CUDA modality-decoupling kernels (kernels/modality.cu).
//
// torch.ops.unlearn_fast_cuda.modality_decoupling_{fwd,bwd}: the same schemas as the CPU
//     binding (csrc/modality.cpp); one kernel launch covers the three pairs.
// torch.ops.unlearn_fast_cuda.similarity_{kl,sqdiff,gram}_*: the panel drivers of
//     csrc/modality_panels.h; panel products and D x D Grams through cuBLAS (at::addmm /
//     at::mm), the fused passes over each panel are ours (CudaPolicy below).  No host
//     synchronisation: per-row results stay on the device and are summed there.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include "modality.cuh"
#include "modality_panels.h"

namespace uf {
namespace {

namespace mk = uf_cuda::modality;

void check_cuda(cudaError_t err, const char* fn) {
  TORCH_CHECK(err == cudaSuccess, fn, ": CUDA launch failed: ", cudaGetErrorString(err));
}

mk::DType dtype_of(const at::Tensor& t, const char* fn) {
  switch (t.scalar_type()) {
    case at::kFloat: return mk::DType::kFloat32;
    case at::kBFloat16: return mk::DType::kBFloat16;
    case at::kHalf: return mk::DType::kFloat16;
    default: TORCH_CHECK(false, fn, ": unsupported dtype ", t.scalar_type(), " (float32/bfloat16/float16)");
  }
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }

// ---------------------------------------------------------------------------------------
// Modality decoupling
// ---------------------------------------------------------------------------------------
mk::EmbeddingPairs make_pairs(const at::Tensor* s, const at::Tensor* r, const char* fn) {
  mk::EmbeddingPairs pairs{};
  for (int k = 0; k < 3; ++k) {
    TORCH_CHECK(s[k].is_cuda() && r[k].is_cuda(), fn, ": CUDA tensors expected");
    TORCH_CHECK(s[k].dim() == 2 && s[k].sizes() == r[k].sizes() && s[k].is_contiguous() && r[k].is_contiguous(), fn,
                ": pair ", k, " must be two contiguous (N, D) tensors of one shape");
    TORCH_CHECK(s[k].scalar_type() == s[0].scalar_type() && r[k].scalar_type() == s[0].scalar_type(), fn,
                ": all six tensors must share one dtype");
    pairs.pair[k] = {s[k].data_ptr(), r[k].data_ptr(), nullptr, s[k].size(0), s[k].size(1)};
  }
  return pairs;
}

mk::Coefficients coefficients(at::ArrayRef<double> scales, at::ArrayRef<double> weights, const char* fn) {
  TORCH_CHECK(scales.size() == 3 && weights.size() == 3, fn, ": expected three scales and three weights");
  mk::Coefficients coef{};
  for (int k = 0; k < 3; ++k) {
    coef.scale[k] = static_cast<float>(scales[k]);
    coef.weight[k] = static_cast<float>(weights[k]);
  }
  return coef;
}

// (L_MD, L_multi, L_uni, weighted total)
at::Tensor md_fwd_cuda(const at::Tensor& s0, const at::Tensor& r0, const at::Tensor& s1, const at::Tensor& r1,
                       const at::Tensor& s2, const at::Tensor& r2, bool cosine, at::ArrayRef<double> scales,
                       at::ArrayRef<double> weights) {
  const char* fn = "modality_decoupling_fwd";
  c10::cuda::CUDAGuard guard(s0.device());
  const at::Tensor s[3] = {s0, s1, s2}, r[3] = {r0, r1, r2};
  const mk::EmbeddingPairs pairs = make_pairs(s, r, fn);
  const auto f = s0.options().dtype(at::kFloat);
  at::Tensor partial = at::empty({3, mk::decoupling_num_blocks(pairs)}, f);
  at::Tensor out = at::empty({4}, f);
  check_cuda(mk::decoupling_forward(pairs, dtype_of(s0, fn), cosine, coefficients(scales, weights, fn),
                                    partial.data_ptr<float>(), out.data_ptr<float>(), stream()),
             fn);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> md_bwd_cuda(const at::Tensor& grad, const at::Tensor& s0,
                                                           const at::Tensor& r0, const at::Tensor& s1,
                                                           const at::Tensor& r1, const at::Tensor& s2,
                                                           const at::Tensor& r2, bool cosine,
                                                           at::ArrayRef<double> scales, at::ArrayRef<double> weights,
                                                           bool need0, bool need1, bool need2) {
  const char* fn = "modality_decoupling_bwd";
  c10::cuda::CUDAGuard guard(s0.device());
  const at::Tensor s[3] = {s0, s1, s2}, r[3] = {r0, r1, r2};
  TORCH_CHECK(grad.is_cuda() && grad.scalar_type() == at::kFloat && grad.is_contiguous() && grad.numel() == 4, fn,
              ": grad must be a contiguous float32 (4,) CUDA tensor");
  mk::EmbeddingPairs pairs = make_pairs(s, r, fn);
  const bool need[3] = {need0, need1, need2};
  at::Tensor grads[3];
  for (int k = 0; k < 3; ++k) {
    grads[k] = need[k] ? at::empty_like(s[k]) : at::empty({0}, s[k].options());
    pairs.pair[k].grad = need[k] && grads[k].numel() ? grads[k].data_ptr() : nullptr;
  }
  check_cuda(mk::decoupling_backward(grad.data_ptr<float>(), pairs, dtype_of(s0, fn), cosine,
                                     coefficients(scales, weights, fn), stream()),
             fn);
  return {grads[0], grads[1], grads[2]};
}

// ---------------------------------------------------------------------------------------
// Similarity panels: the CUDA policy for csrc/modality_panels.h
// ---------------------------------------------------------------------------------------
struct CudaPolicy {
  static at::Tensor empty_gradient(at::IntArrayRef sizes, const at::TensorOptions& f) { return at::empty(sizes, f); }

  static at::Tensor new_col_state(int64_t bt, const at::TensorOptions& f) {
    at::Tensor st = at::empty({5, bt}, f);
    check_cuda(mk::sim_kl_cols_init(st.data_ptr<float>(), bt, stream()), "similarity_kl_fwd");
    return st;
  }

  static void kl_rows(const at::Tensor& sp, const at::Tensor& rp, at::Tensor& row_stats, int64_t row0,
                      at::Tensor& row_kl) {
    check_cuda(mk::sim_kl_rows(sp.data_ptr<float>(), rp.data_ptr<float>(), sp.size(0), sp.size(1),
                               row_stats.data_ptr<float>(), row_stats.size(1), row0, row_kl.data_ptr<float>(),
                               stream()),
               "similarity_kl_fwd");
  }

  static void kl_cols_update(const at::Tensor& sp, const at::Tensor& rp, at::Tensor& col_state) {
    check_cuda(mk::sim_kl_cols_update(sp.data_ptr<float>(), rp.data_ptr<float>(), sp.size(0), sp.size(1),
                                      col_state.data_ptr<float>(), stream()),
               "similarity_kl_fwd");
  }

  static void kl_cols_finalize(at::Tensor& col_state, at::Tensor& col_stats, at::Tensor& col_kl) {
    check_cuda(mk::sim_kl_cols_finalize(col_state.data_ptr<float>(), col_state.size(1), col_stats.data_ptr<float>(),
                                        col_kl.data_ptr<float>(), stream()),
               "similarity_kl_fwd");
  }

  static void kl_grad(at::Tensor& sp, const at::Tensor& rp, const at::Tensor& row_stats, int64_t row0,
                      const at::Tensor& col_stats, const at::Tensor& gw) {
    check_cuda(mk::sim_kl_grad(sp.data_ptr<float>(), rp.data_ptr<float>(), sp.size(0), sp.size(1),
                               row_stats.defined() ? row_stats.data_ptr<float>() : nullptr,
                               row_stats.defined() ? row_stats.size(1) : 0, row0,
                               col_stats.defined() ? col_stats.data_ptr<float>() : nullptr, gw.data_ptr<float>(),
                               stream()),
               "similarity_kl");
  }

  static void sq_rows(const at::Tensor& ep, int64_t row0, at::Tensor& row_vals) {
    check_cuda(mk::sim_sq_rows(ep.data_ptr<float>(), ep.size(0), ep.size(1), row0, row_vals.data_ptr<float>(),
                               stream()),
               "similarity_sqdiff_fwd");
  }
};

void check_device(const at::Tensor& a, const char* fn) { TORCH_CHECK(a.is_cuda(), fn, ": CUDA tensors expected"); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> kl_fwd_cuda(
    const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, const at::Tensor& d, double inv_t, double w_row,
    double w_col, int64_t block_rows, bool grad_in_forward) {
  check_device(a, "similarity_kl_fwd");
  c10::cuda::CUDAGuard guard(a.device());
  return panels::kl_forward<CudaPolicy>(a, b, c, d, inv_t, w_row, w_col, block_rows, grad_in_forward);
}

std::tuple<at::Tensor, at::Tensor> kl_bwd_cuda(const at::Tensor& grad, const at::Tensor& a, const at::Tensor& b,
                                               const at::Tensor& c, const at::Tensor& d, const at::Tensor& row_stats,
                                               const at::Tensor& col_stats, double inv_t, double w_row, double w_col,
                                               int64_t block_rows, bool need_a, bool need_b) {
  check_device(a, "similarity_kl_bwd");
  c10::cuda::CUDAGuard guard(a.device());
  return panels::kl_backward<CudaPolicy>(grad, a, b, c, d, row_stats, col_stats, inv_t, w_row, w_col, block_rows,
                                         need_a, need_b);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sq_fwd_cuda(const at::Tensor& a, const at::Tensor& b,
                                                           const at::Tensor& c, const at::Tensor& d,
                                                           int64_t block_rows, bool want_grad) {
  check_device(a, "similarity_sqdiff_fwd");
  c10::cuda::CUDAGuard guard(a.device());
  return panels::sq_forward<CudaPolicy>(a, b, c, d, block_rows, want_grad);
}

std::tuple<at::Tensor, at::Tensor> gram_fwd_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c,
                                                 const at::Tensor& d) {
  check_device(a, "similarity_gram_fwd");
  c10::cuda::CUDAGuard guard(a.device());
  return panels::gram_forward(a, b, c, d);
}

std::tuple<at::Tensor, at::Tensor> gram_bwd_cuda(const at::Tensor& grad, const at::Tensor& a, const at::Tensor& b,
                                                 const at::Tensor& c, const at::Tensor& d, const at::Tensor& grams,
                                                 bool need_a, bool need_b) {
  check_device(a, "similarity_gram_bwd");
  c10::cuda::CUDAGuard guard(a.device());
  return panels::gram_backward(grad, a, b, c, d, grams, need_a, need_b);
}

}  // namespace
}  // namespace uf

TORCH_LIBRARY_FRAGMENT(unlearn_fast_cuda, m) {
  m.def("modality_decoupling_fwd(Tensor s0, Tensor r0, Tensor s1, Tensor r1, Tensor s2, Tensor r2, bool cosine, "
        "float[] scales, float[] weights) -> Tensor",
        &uf::md_fwd_cuda);
  m.def("modality_decoupling_bwd(Tensor grad, Tensor s0, Tensor r0, Tensor s1, Tensor r1, Tensor s2, Tensor r2, "
        "bool cosine, float[] scales, float[] weights, bool need0, bool need1, bool need2) -> (Tensor, Tensor, Tensor)",
        &uf::md_bwd_cuda);
  m.def("similarity_kl_fwd(Tensor a, Tensor b, Tensor c, Tensor d, float inv_t, float w_row, float w_col, "
        "int block_rows, bool grad_in_forward) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
        &uf::kl_fwd_cuda);
  m.def("similarity_kl_bwd(Tensor grad, Tensor a, Tensor b, Tensor c, Tensor d, Tensor row_stats, Tensor col_stats, "
        "float inv_t, float w_row, float w_col, int block_rows, bool need_a, bool need_b) -> (Tensor, Tensor)",
        &uf::kl_bwd_cuda);
  m.def("similarity_sqdiff_fwd(Tensor a, Tensor b, Tensor c, Tensor d, int block_rows, bool want_grad) "
        "-> (Tensor, Tensor, Tensor)",
        &uf::sq_fwd_cuda);
  m.def("similarity_gram_fwd(Tensor a, Tensor b, Tensor c, Tensor d) -> (Tensor, Tensor)", &uf::gram_fwd_cuda);
  m.def("similarity_gram_bwd(Tensor grad, Tensor a, Tensor b, Tensor c, Tensor d, Tensor grams, bool need_a, "
        "bool need_b) -> (Tensor, Tensor)",
        &uf::gram_bwd_cuda);
}
