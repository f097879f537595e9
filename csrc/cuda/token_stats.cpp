// Torch bindings of the CUDA token-statistics kernels (kernels/token_stats.cu).
//
// torch.ops.unlearn_fast_cuda.token_stats_{rows,linear}_{fwd,bwd}: the same schemas and
// chunk loops as the CPU binding (csrc/token_stats.cpp).  The GEMM chunks go through
// at::mm_out / at::addmm_out (cuBLAS, csrc/linear_chunk.h) into reused (C, V) buffers;
// the row work is ours.
// No host synchronisation: every chunk is processed (no host-side skip of ignored chunks).
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/types.h>

#include "linear_chunk.h"
#include "token_stats.cuh"

namespace uf {
namespace {

uf_cuda::DType dtype_of(const at::Tensor& t, const char* fn) {
  switch (t.scalar_type()) {
    case at::kFloat: return uf_cuda::DType::kFloat32;
    case at::kBFloat16: return uf_cuda::DType::kBFloat16;
    case at::kHalf: return uf_cuda::DType::kFloat16;
    default: TORCH_CHECK(false, fn, ": unsupported dtype ", t.scalar_type(), " (float32/bfloat16/float16)");
  }
}

void check_cuda(cudaError_t err, const char* fn) {
  TORCH_CHECK(err == cudaSuccess, fn, ": CUDA launch failed: ", cudaGetErrorString(err));
}

void check_targets(const at::Tensor& targets, int64_t N, const char* fn) {
  TORCH_CHECK(targets.is_cuda() && targets.scalar_type() == at::kLong && targets.is_contiguous() && targets.numel() == N,
              fn, ": targets must be a contiguous int64 CUDA tensor of ", N, " elements");
}

void check_row_stats(const at::Tensor& grad, const at::Tensor& st, int64_t N, const char* fn) {
  TORCH_CHECK(grad.scalar_type() == at::kFloat && grad.is_contiguous() && grad.numel() == N, fn,
              ": grad must be contiguous float32 (N,)");
  TORCH_CHECK(st.scalar_type() == at::kFloat && st.is_contiguous() && st.numel() == 4 * N, fn,
              ": row stats must be contiguous float32 (N, 4)");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> alloc_stats(const at::Tensor& like, int64_t N) {
  auto f = like.options().dtype(at::kFloat);
  return {at::empty({N}, f), at::empty({N, 4}, f), at::empty({N}, like.options().dtype(at::kLong))};
}

void rows_forward(const at::Tensor& logits, int64_t n, int64_t V, const int64_t* tg, int64_t ignore_index, float* lp,
                  float* st, int64_t* am, const char* fn) {
  auto stream = c10::cuda::getCurrentCUDAStream();
  check_cuda(uf_cuda::token_stats_rows_fwd(logits.data_ptr(), dtype_of(logits, fn), n, V, logits.stride(0), tg,
                                           ignore_index, lp, st, am, stream),
             fn);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rows_fwd_cuda(const at::Tensor& logits, const at::Tensor& targets,
                                                             int64_t ignore_index) {
  const char* fn = "token_stats_rows_fwd";
  TORCH_CHECK(logits.is_cuda() && logits.dim() == 2 && logits.is_contiguous(), fn, ": contiguous (N, V) CUDA logits expected");
  c10::cuda::CUDAGuard guard(logits.device());
  const int64_t N = logits.size(0), V = logits.size(1);
  check_targets(targets, N, fn);
  auto [lp, st, am] = alloc_stats(logits, N);
  rows_forward(logits, N, V, targets.data_ptr<int64_t>(), ignore_index, lp.data_ptr<float>(), st.data_ptr<float>(),
               am.data_ptr<int64_t>(), fn);
  return {lp, st, am};
}

at::Tensor rows_bwd_cuda(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& targets,
                         const at::Tensor& row_stats, int64_t ignore_index) {
  const char* fn = "token_stats_rows_bwd";
  TORCH_CHECK(logits.is_cuda() && logits.dim() == 2 && logits.is_contiguous(), fn, ": contiguous (N, V) CUDA logits expected");
  c10::cuda::CUDAGuard guard(logits.device());
  const int64_t N = logits.size(0), V = logits.size(1);
  check_targets(targets, N, fn);
  check_row_stats(grad, row_stats, N, fn);
  at::Tensor out = at::empty_like(logits);
  auto stream = c10::cuda::getCurrentCUDAStream();
  check_cuda(uf_cuda::token_stats_rows_bwd(grad.data_ptr<float>(), logits.data_ptr(), dtype_of(logits, fn), N, V, V,
                                           targets.data_ptr<int64_t>(), ignore_index, row_stats.data_ptr<float>(),
                                           out.data_ptr(), dtype_of(out, fn), V, stream),
             fn);
  return out;
}

void check_linear(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const char* fn) {
  TORCH_CHECK(hidden.is_cuda() && weight.is_cuda(), fn, ": CUDA tensors expected");
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1), fn,
              ": expected hidden (N, H) and weight (V, H)");
  TORCH_CHECK(hidden.is_contiguous() && weight.is_contiguous(), fn, ": contiguous hidden and weight expected");
  TORCH_CHECK(hidden.scalar_type() == weight.scalar_type(), fn, ": hidden and weight dtypes differ");
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0) && bias->scalar_type() == weight.scalar_type(), fn,
                ": bias must be (V,) with the weight's dtype");
  }
}

at::Tensor from_float32(const at::Tensor& acc, at::ScalarType dtype) {
  return acc.scalar_type() == dtype ? acc : acc.to(dtype);
}

// Gradient rows coeff[r] * (onehot(t_r) - p_r) of a logits chunk (float32 math) into g
// (the logits' dtype; g may be the logits themselves for float32).
void chunk_gradient_rows(const at::Tensor& logits, at::Tensor& g, const int64_t* tg, int64_t ignore_index,
                         const float* st4, const float* coeff, const char* fn) {
  const int64_t n = logits.size(0), V = logits.size(1);
  check_cuda(uf_cuda::token_stats_rows_bwd(coeff, logits.data_ptr(), dtype_of(logits, fn), n, V, V, tg, ignore_index,
                                           st4, g.data_ptr(), dtype_of(g, fn), V, c10::cuda::getCurrentCUDAStream()),
             fn);
}

// The same contract as the CPU binding (csrc/token_stats.cpp linear_fwd_cpu): with
// gradients asked for, each chunk becomes its gradient rows right after the statistics
// (coefficient 1: the per-row Jacobian; row_weights c: the gradients of sum_r c_r logprob_r).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_fwd_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
    const std::optional<at::Tensor>& bias, int64_t ignore_index, int64_t chunk_size,
    const std::optional<at::Tensor>& row_weights, bool grad_hidden, bool grad_weight, bool grad_bias) {
  const char* fn = "token_stats_linear_fwd";
  check_linear(hidden, weight, bias, fn);
  c10::cuda::CUDAGuard guard(hidden.device());
  const int64_t N = hidden.size(0), V = weight.size(0), H = hidden.size(1);
  check_targets(targets, N, fn);
  TORCH_CHECK(chunk_size >= 1, fn, ": chunk_size must be >= 1");
  TORCH_CHECK(!grad_bias || has_tensor(bias), fn, ": grad_bias without a bias");
  if (has_tensor(row_weights)) {
    TORCH_CHECK(row_weights->device() == hidden.device() && row_weights->scalar_type() == at::kFloat &&
                    row_weights->is_contiguous() && row_weights->numel() == N,
                fn, ": row_weights must be contiguous float32 (N,) on the inputs' device");
  }
  auto [lp, st, am] = alloc_stats(hidden, N);
  auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor gh = grad_hidden ? at::empty_like(hidden) : at::empty({0}, hidden.options());
  at::Tensor gw = grad_weight ? at::zeros({V, H}, f32) : at::empty({0}, f32);  // float32 accumulators
  at::Tensor gb = grad_bias ? at::zeros({V}, f32) : at::empty({0}, f32);
  const bool any_grad = grad_hidden || grad_weight || grad_bias;
  const bool f32_logits = hidden.scalar_type() == at::kFloat;
  const int64_t C = std::min(chunk_size, std::max<int64_t>(N, 1));
  at::Tensor buf = at::empty({C, V}, hidden.options());
  at::Tensor gbuf = any_grad && !f32_logits ? at::empty({C, V}, hidden.options()) : buf;  // float32: in place
  at::Tensor coeff = has_tensor(row_weights) ? *row_weights : (any_grad ? at::ones({N}, f32) : at::Tensor());
  const int64_t* tg = targets.data_ptr<int64_t>();
  for (int64_t c0 = 0; c0 < N; c0 += C) {
    const int64_t n = std::min(C, N - c0);
    at::Tensor out = buf.narrow(0, 0, n);
    at::Tensor hc = hidden.narrow(0, c0, n);
    chunk_logits(out, hc, weight, bias);
    rows_forward(out, n, V, tg + c0, ignore_index, lp.data_ptr<float>() + c0, st.data_ptr<float>() + 4 * c0,
                 am.data_ptr<int64_t>() + c0, fn);
    if (!any_grad) continue;
    at::Tensor g = gbuf.narrow(0, 0, n);
    chunk_gradient_rows(out, g, tg + c0, ignore_index, st.data_ptr<float>() + 4 * c0, coeff.data_ptr<float>() + c0, fn);
    if (grad_hidden) {
      at::Tensor ghc = gh.narrow(0, c0, n);
      at::mm_out(ghc, g, weight);
    }
    if (grad_weight) add_weight_grad(gw, g, hc);
    if (grad_bias) add_bias_grad(gb, g);
  }
  const auto wtype = weight.scalar_type();
  return {lp, st, am, gh, grad_weight ? from_float32(gw, wtype) : gw, grad_bias ? from_float32(gb, wtype) : gb};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_bwd_cuda(const at::Tensor& grad, const at::Tensor& hidden,
                                                               const at::Tensor& weight, const at::Tensor& targets,
                                                               const std::optional<at::Tensor>& bias,
                                                               const at::Tensor& row_stats, int64_t ignore_index,
                                                               int64_t chunk_size, bool need_grad_hidden,
                                                               bool need_grad_weight, bool need_grad_bias) {
  const char* fn = "token_stats_linear_bwd";
  check_linear(hidden, weight, bias, fn);
  c10::cuda::CUDAGuard guard(hidden.device());
  const int64_t N = hidden.size(0), V = weight.size(0), H = hidden.size(1);
  check_targets(targets, N, fn);
  check_row_stats(grad, row_stats, N, fn);
  TORCH_CHECK(chunk_size >= 1, fn, ": chunk_size must be >= 1");
  TORCH_CHECK(!need_grad_bias || has_tensor(bias), fn, ": grad_bias without a bias");
  auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor gh = need_grad_hidden ? at::empty_like(hidden) : at::empty({0}, hidden.options());
  at::Tensor gw = need_grad_weight ? at::zeros({V, H}, f32) : at::empty({0}, f32);  // float32 accumulators
  at::Tensor gb = need_grad_bias ? at::zeros({V}, f32) : at::empty({0}, f32);
  const int64_t C = std::min(chunk_size, std::max<int64_t>(N, 1));
  at::Tensor buf = at::empty({C, V}, hidden.options());
  at::Tensor gbuf = hidden.scalar_type() == at::kFloat ? buf : at::empty({C, V}, hidden.options());
  const int64_t* tg = targets.data_ptr<int64_t>();
  for (int64_t c0 = 0; c0 < N; c0 += C) {
    const int64_t n = std::min(C, N - c0);
    at::Tensor hc = hidden.narrow(0, c0, n);
    at::Tensor out = buf.narrow(0, 0, n);
    chunk_logits(out, hc, weight, bias);
    at::Tensor g = gbuf.narrow(0, 0, n);
    chunk_gradient_rows(out, g, tg + c0, ignore_index, row_stats.data_ptr<float>() + 4 * c0,
                        grad.data_ptr<float>() + c0, fn);
    if (need_grad_hidden) {
      at::Tensor ghc = gh.narrow(0, c0, n);
      at::mm_out(ghc, g, weight);
    }
    if (need_grad_weight) add_weight_grad(gw, g, hc);
    if (need_grad_bias) add_bias_grad(gb, g);
  }
  const auto wtype = weight.scalar_type();
  return {gh, need_grad_weight ? from_float32(gw, wtype) : gw, need_grad_bias ? from_float32(gb, wtype) : gb};
}

}  // namespace
}  // namespace uf

TORCH_LIBRARY_FRAGMENT(unlearn_fast_cuda, m) {
  m.def("token_stats_rows_fwd(Tensor logits, Tensor targets, int ignore_index) -> (Tensor, Tensor, Tensor)",
        &uf::rows_fwd_cuda);
  m.def("token_stats_rows_bwd(Tensor grad, Tensor logits, Tensor targets, Tensor row_stats, int ignore_index) -> Tensor",
        &uf::rows_bwd_cuda);
  m.def("token_stats_linear_fwd(Tensor hidden, Tensor weight, Tensor targets, Tensor? bias, int ignore_index, "
        "int chunk_size, Tensor? row_weights, bool grad_hidden, bool grad_weight, bool grad_bias) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
        &uf::linear_fwd_cuda);
  m.def("token_stats_linear_bwd(Tensor grad, Tensor hidden, Tensor weight, Tensor targets, Tensor? bias, Tensor row_stats, "
        "int ignore_index, int chunk_size, bool need_grad_hidden, bool need_grad_weight, bool need_grad_bias) "
        "-> (Tensor, Tensor, Tensor)",
        &uf::linear_bwd_cuda);
}
