// Torch bindings of the CUDA dual masked KL kernels (kernels/dual_masked_kl.cu).
//
// torch.ops.unlearn_fast_cuda.dual_masked_kl_{fwd,bwd}: the same schemas as the CPU ops
// (csrc/dual_masked_kl.cpp); the Python custom op in unlearn_fast/ops/dual_masked_kl.py
// validates and flattens the inputs to contiguous (N, V) rows and wraps these with
// autograd and fake kernels.  float32/bfloat16/float16 logits; float32 loss and stats.
// No host synchronisation.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include "dual_masked_kl.cuh"

namespace uf {
namespace {

namespace dmk = uf_cuda::dmk;

dmk::DType dtype_of(const at::Tensor& t, const char* fn) {
  switch (t.scalar_type()) {
    case at::kFloat: return dmk::DType::kFloat32;
    case at::kBFloat16: return dmk::DType::kBFloat16;
    case at::kHalf: return dmk::DType::kFloat16;
    default: TORCH_CHECK(false, fn, ": unsupported dtype ", t.scalar_type(), " (float32/bfloat16/float16)");
  }
}

void check_logits(const at::Tensor& student, const at::Tensor& teacher, const char* fn) {
  TORCH_CHECK(student.is_cuda() && teacher.device() == student.device(), fn, ": logits on one CUDA device expected");
  TORCH_CHECK(student.dim() == 2 && student.sizes() == teacher.sizes(), fn, ": expected (N, V) logits of one shape");
  TORCH_CHECK(student.is_contiguous() && teacher.is_contiguous(), fn, ": contiguous logits expected");
  TORCH_CHECK(student.scalar_type() == teacher.scalar_type(), fn, ": student and teacher dtypes differ");
}

// A float32 0/1 mask of `expected` elements on the logits' device, or nullptr.
const float* mask_ptr(const std::optional<at::Tensor>& mask, const at::Tensor& like, int64_t expected,
                      const char* name) {
  if (!mask.has_value() || !mask->defined()) return nullptr;
  TORCH_CHECK(mask->device() == like.device() && mask->scalar_type() == at::kFloat && mask->is_contiguous() &&
                  mask->numel() == expected,
              name, ": expected a contiguous float32 tensor of ", expected, " elements on ", like.device());
  return mask->data_ptr<float>();
}

void check_cuda(cudaError_t err, const char* fn) {
  TORCH_CHECK(err == cudaSuccess, fn, ": CUDA launch failed: ", cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor> dmk_fwd_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                const std::optional<at::Tensor>& token_mask,
                                                const std::optional<at::Tensor>& vocab_mask, double inv_temperature,
                                                bool cross_entropy) {
  const char* fn = "dual_masked_kl_fwd";
  check_logits(student, teacher, fn);
  c10::cuda::CUDAGuard guard(student.device());
  const int64_t N = student.size(0), V = student.size(1);
  const float* ks = mask_ptr(token_mask, student, N, "token_mask");
  const float* kv = mask_ptr(vocab_mask, student, V, "vocab_mask");
  auto opts = student.options().dtype(at::kFloat);
  at::Tensor rows = at::empty({N}, opts), stats = at::empty({N, dmk::kStats}, opts);
  check_cuda(dmk::forward(student.data_ptr(), teacher.data_ptr(), dtype_of(student, fn), N, V, ks, kv,
                          static_cast<float>(inv_temperature), cross_entropy, rows.data_ptr<float>(),
                          stats.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()),
             fn);
  return {rows, stats};
}

at::Tensor dmk_bwd_cuda(const at::Tensor& grad_rows, const at::Tensor& student, const at::Tensor& teacher,
                        const std::optional<at::Tensor>& token_mask, const std::optional<at::Tensor>& vocab_mask,
                        const at::Tensor& stats, double inv_temperature) {
  const char* fn = "dual_masked_kl_bwd";
  check_logits(student, teacher, fn);
  c10::cuda::CUDAGuard guard(student.device());
  const int64_t N = student.size(0), V = student.size(1);
  TORCH_CHECK(grad_rows.device() == student.device() && grad_rows.scalar_type() == at::kFloat &&
                  grad_rows.is_contiguous() && grad_rows.numel() == N,
              fn, ": grad_rows must be contiguous float32 (N,) on the logits' device");
  TORCH_CHECK(stats.device() == student.device() && stats.scalar_type() == at::kFloat && stats.is_contiguous() &&
                  stats.numel() == dmk::kStats * N,
              fn, ": stats must be contiguous float32 (N, 5) on the logits' device");
  const float* ks = mask_ptr(token_mask, student, N, "token_mask");
  const float* kv = mask_ptr(vocab_mask, student, V, "vocab_mask");
  at::Tensor grad = at::empty_like(student);
  check_cuda(dmk::backward(grad_rows.data_ptr<float>(), student.data_ptr(), teacher.data_ptr(), dtype_of(student, fn),
                           N, V, ks, kv, stats.data_ptr<float>(), static_cast<float>(inv_temperature),
                           grad.data_ptr(), c10::cuda::getCurrentCUDAStream()),
             fn);
  return grad;
}

}  // namespace
}  // namespace uf

TORCH_LIBRARY_FRAGMENT(unlearn_fast_cuda, m) {
  m.def("dual_masked_kl_fwd(Tensor student, Tensor teacher, Tensor? token_mask, Tensor? vocab_mask, "
        "float inv_temperature, bool cross_entropy) -> (Tensor, Tensor)");
  m.def("dual_masked_kl_bwd(Tensor grad_rows, Tensor student, Tensor teacher, Tensor? token_mask, "
        "Tensor? vocab_mask, Tensor stats, float inv_temperature) -> Tensor");
}

TORCH_LIBRARY_IMPL(unlearn_fast_cuda, CUDA, m) {
  m.impl("dual_masked_kl_fwd", &uf::dmk_fwd_cuda);
  m.impl("dual_masked_kl_bwd", &uf::dmk_bwd_cuda);
}
