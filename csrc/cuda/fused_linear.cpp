// Fused linear dual masked KL on CUDA: torch bindings of the chunk loop over the student
// and teacher heads (the same schemas and algorithm as the CPU binding,
// csrc/fused_linear.cpp).  The GEMMs go through at::mm_out / at::addmm_out (cuBLAS)
// into reused (C, V) buffers; the row work is the DMK row kernels of
// kernels/dual_masked_kl.cuh (uf_cuda::dmk::forward / backward).
//
// torch.ops.unlearn_fast_cuda.fused_linear_dmk_fwd: per chunk, student and teacher
//   logits, then the row losses and statistics; when gradients are asked for, the
//   gradient rows of the plain row sum (grad_output 1; the backward launcher writes
//   them to a third buffer, it may not alias its inputs), grad_hidden[c] = g @ Ws and,
//   when asked, grad_weight += g^T @ hs_c (float32 accumulator), grad_bias += sum g.
// torch.ops.unlearn_fast_cuda.fused_linear_dmk_bwd: grad_weight / grad_bias for an
//   arbitrary per-row grad_output, recomputing each chunk's logits.
// No host synchronisation: every chunk is processed (no host-side skip of masked chunks).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include "dual_masked_kl.cuh"
#include "linear_chunk.h"

namespace uf {
namespace {

namespace dmk = uf_cuda::dmk;

dmk::DType dmk_dtype(const at::Tensor& t, const char* fn) {
  switch (t.scalar_type()) {
    case at::kFloat: return dmk::DType::kFloat32;
    case at::kBFloat16: return dmk::DType::kBFloat16;
    case at::kHalf: return dmk::DType::kFloat16;
    default: TORCH_CHECK(false, fn, ": unsupported dtype ", t.scalar_type(), " (float32/bfloat16/float16)");
  }
}

void check_launch(cudaError_t err, const char* fn) {
  TORCH_CHECK(err == cudaSuccess, fn, ": CUDA launch failed: ", cudaGetErrorString(err));
}

const float* mask_ptr(const std::optional<at::Tensor>& mask, const at::Tensor& like, int64_t expected,
                      const char* name) {
  if (!has_tensor(mask)) return nullptr;
  TORCH_CHECK(mask->device() == like.device() && mask->scalar_type() == at::kFloat && mask->is_contiguous() &&
                  mask->numel() == expected,
              name, ": expected a contiguous float32 tensor of ", expected, " elements on ", like.device());
  return mask->data_ptr<float>();
}

void check_heads(const at::Tensor& sh, const at::Tensor& sw, const at::Tensor& th, const at::Tensor& tw,
                 const std::optional<at::Tensor>& sb, const std::optional<at::Tensor>& tb, const char* fn) {
  TORCH_CHECK(sh.is_cuda(), fn, ": CUDA tensors expected");
  TORCH_CHECK(sh.dim() == 2 && sw.dim() == 2 && sh.size(1) == sw.size(1), fn,
              ": expected student_hidden (N, H) and student_weight (V, H)");
  TORCH_CHECK(th.sizes() == sh.sizes() && tw.sizes() == sw.sizes(), fn,
              ": teacher hidden/weight must have the student's shapes");
  for (const at::Tensor* t : {&sh, &sw, &th, &tw}) {
    TORCH_CHECK(t->device() == sh.device() && t->is_contiguous() && t->scalar_type() == sh.scalar_type(), fn,
                ": contiguous tensors of one dtype on one device expected");
  }
  for (const std::optional<at::Tensor>* b : {&sb, &tb}) {
    if (has_tensor(*b)) {
      TORCH_CHECK((*b)->device() == sh.device() && (*b)->dim() == 1 && (*b)->size(0) == sw.size(0) &&
                      (*b)->scalar_type() == sw.scalar_type(),
                  fn, ": biases must be (V,) with the weights' dtype and device");
    }
  }
}

at::Tensor from_float32(const at::Tensor& acc, at::ScalarType dtype) {
  return acc.scalar_type() == dtype ? acc : acc.to(dtype);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_linear_dmk_fwd_cuda(
    const at::Tensor& sh, const at::Tensor& sw, const at::Tensor& th, const at::Tensor& tw,
    const std::optional<at::Tensor>& sb, const std::optional<at::Tensor>& tb,
    const std::optional<at::Tensor>& token_mask, const std::optional<at::Tensor>& vocab_mask,
    double inv_temperature, bool cross_entropy, int64_t chunk_size, bool grad_hidden, bool grad_weight,
    bool grad_bias) {
  const char* fn = "fused_linear_dmk_fwd";
  check_heads(sh, sw, th, tw, sb, tb, fn);
  TORCH_CHECK(chunk_size >= 1, fn, ": chunk_size must be >= 1");
  TORCH_CHECK(!grad_bias || has_tensor(sb), fn, ": grad_bias without a student bias");
  c10::cuda::CUDAGuard guard(sh.device());
  const int64_t N = sh.size(0), H = sh.size(1), V = sw.size(0);
  const float* ks = mask_ptr(token_mask, sh, N, "token_mask");
  const float* kv = mask_ptr(vocab_mask, sh, V, "vocab_mask");
  auto f32 = sh.options().dtype(at::kFloat);
  at::Tensor rows = at::empty({N}, f32);
  at::Tensor stats = at::empty({N, dmk::kStats}, f32);
  at::Tensor gh = grad_hidden ? at::empty_like(sh) : at::empty({0}, sh.options());
  at::Tensor gw = grad_weight ? at::zeros({V, H}, f32) : at::empty({0}, f32);
  at::Tensor gb = grad_bias ? at::zeros({V}, f32) : at::empty({0}, f32);
  const bool any_grad = grad_hidden || grad_weight || grad_bias;
  const int64_t C = std::min(chunk_size, std::max<int64_t>(N, 1));
  at::Tensor sbuf = at::empty({C, V}, sh.options());
  at::Tensor tbuf = at::empty({C, V}, sh.options());
  at::Tensor gbuf = any_grad ? at::empty({C, V}, sh.options()) : at::Tensor();
  at::Tensor ones = any_grad ? at::ones({C}, f32) : at::Tensor();  // gradient rows of the plain row sum
  const dmk::DType dtype = dmk_dtype(sh, fn);
  const float inv_t = static_cast<float>(inv_temperature);
  auto stream = c10::cuda::getCurrentCUDAStream();
  for (int64_t c0 = 0; c0 < N; c0 += C) {
    const int64_t n = std::min(C, N - c0);
    at::Tensor s = sbuf.narrow(0, 0, n);
    at::Tensor t = tbuf.narrow(0, 0, n);
    at::Tensor hc = sh.narrow(0, c0, n);
    chunk_logits(s, hc, sw, sb);
    chunk_logits(t, th.narrow(0, c0, n), tw, tb);
    const float* ksc = ks == nullptr ? nullptr : ks + c0;
    float* st = stats.data_ptr<float>() + dmk::kStats * c0;
    check_launch(dmk::forward(s.data_ptr(), t.data_ptr(), dtype, n, V, ksc, kv, inv_t, cross_entropy,
                              rows.data_ptr<float>() + c0, st, stream),
                 fn);
    if (!any_grad) continue;
    at::Tensor g = gbuf.narrow(0, 0, n);
    check_launch(dmk::backward(ones.data_ptr<float>(), s.data_ptr(), t.data_ptr(), dtype, n, V, ksc, kv, st, inv_t,
                               g.data_ptr(), stream),
                 fn);
    if (grad_hidden) {
      at::Tensor ghc = gh.narrow(0, c0, n);
      at::mm_out(ghc, g, sw);
    }
    if (grad_weight) add_weight_grad(gw, g, hc);
    if (grad_bias) add_bias_grad(gb, g);
  }
  const auto wtype = sw.scalar_type();
  return {rows, stats, gh, grad_weight ? from_float32(gw, wtype) : gw, grad_bias ? from_float32(gb, wtype) : gb};
}

std::tuple<at::Tensor, at::Tensor> fused_linear_dmk_bwd_cuda(
    const at::Tensor& grad_rows, const at::Tensor& sh, const at::Tensor& sw, const at::Tensor& th,
    const at::Tensor& tw, const std::optional<at::Tensor>& sb, const std::optional<at::Tensor>& tb,
    const std::optional<at::Tensor>& token_mask, const std::optional<at::Tensor>& vocab_mask,
    const at::Tensor& stats, double inv_temperature, int64_t chunk_size, bool grad_weight, bool grad_bias) {
  const char* fn = "fused_linear_dmk_bwd";
  check_heads(sh, sw, th, tw, sb, tb, fn);
  TORCH_CHECK(chunk_size >= 1, fn, ": chunk_size must be >= 1");
  TORCH_CHECK(!grad_bias || has_tensor(sb), fn, ": grad_bias without a student bias");
  c10::cuda::CUDAGuard guard(sh.device());
  const int64_t N = sh.size(0), H = sh.size(1), V = sw.size(0);
  TORCH_CHECK(grad_rows.device() == sh.device() && grad_rows.scalar_type() == at::kFloat && grad_rows.is_contiguous() &&
                  grad_rows.numel() == N,
              fn, ": grad_rows must be contiguous float32 (N,) on the inputs' device");
  TORCH_CHECK(stats.device() == sh.device() && stats.scalar_type() == at::kFloat && stats.is_contiguous() &&
                  stats.numel() == dmk::kStats * N,
              fn, ": stats must be contiguous float32 (N, 5) on the inputs' device");
  const float* ks = mask_ptr(token_mask, sh, N, "token_mask");
  const float* kv = mask_ptr(vocab_mask, sh, V, "vocab_mask");
  auto f32 = sh.options().dtype(at::kFloat);
  at::Tensor gw = grad_weight ? at::zeros({V, H}, f32) : at::empty({0}, f32);
  at::Tensor gb = grad_bias ? at::zeros({V}, f32) : at::empty({0}, f32);
  if (grad_weight || grad_bias) {
    const int64_t C = std::min(chunk_size, std::max<int64_t>(N, 1));
    at::Tensor sbuf = at::empty({C, V}, sh.options());
    at::Tensor tbuf = at::empty({C, V}, sh.options());
    at::Tensor gbuf = at::empty({C, V}, sh.options());
    const dmk::DType dtype = dmk_dtype(sh, fn);
    const float inv_t = static_cast<float>(inv_temperature);
    auto stream = c10::cuda::getCurrentCUDAStream();
    for (int64_t c0 = 0; c0 < N; c0 += C) {
      const int64_t n = std::min(C, N - c0);
      at::Tensor s = sbuf.narrow(0, 0, n);
      at::Tensor t = tbuf.narrow(0, 0, n);
      at::Tensor g = gbuf.narrow(0, 0, n);
      at::Tensor hc = sh.narrow(0, c0, n);
      chunk_logits(s, hc, sw, sb);
      chunk_logits(t, th.narrow(0, c0, n), tw, tb);
      check_launch(dmk::backward(grad_rows.data_ptr<float>() + c0, s.data_ptr(), t.data_ptr(), dtype, n, V,
                                 ks == nullptr ? nullptr : ks + c0, kv, stats.data_ptr<float>() + dmk::kStats * c0,
                                 inv_t, g.data_ptr(), stream),
                   fn);
      if (grad_weight) add_weight_grad(gw, g, hc);
      if (grad_bias) add_bias_grad(gb, g);
    }
  }
  const auto wtype = sw.scalar_type();
  return {grad_weight ? from_float32(gw, wtype) : gw, grad_bias ? from_float32(gb, wtype) : gb};
}

}  // namespace
}  // namespace uf

TORCH_LIBRARY_FRAGMENT(unlearn_fast_cuda, m) {
  m.def("fused_linear_dmk_fwd(Tensor student_hidden, Tensor student_weight, Tensor teacher_hidden, "
        "Tensor teacher_weight, Tensor? student_bias, Tensor? teacher_bias, Tensor? token_mask, Tensor? vocab_mask, "
        "float inv_temperature, bool cross_entropy, int chunk_size, bool grad_hidden, bool grad_weight, "
        "bool grad_bias) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("fused_linear_dmk_bwd(Tensor grad_rows, Tensor student_hidden, Tensor student_weight, Tensor teacher_hidden, "
        "Tensor teacher_weight, Tensor? student_bias, Tensor? teacher_bias, Tensor? token_mask, Tensor? vocab_mask, "
        "Tensor stats, float inv_temperature, int chunk_size, bool grad_weight, bool grad_bias) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(unlearn_fast_cuda, CUDA, m) {
  m.impl("fused_linear_dmk_fwd", &uf::fused_linear_dmk_fwd_cuda);
  m.impl("fused_linear_dmk_bwd", &uf::fused_linear_dmk_bwd_cuda);
}
