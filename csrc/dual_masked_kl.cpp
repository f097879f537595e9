// Torch bindings of the CPU dual masked KL kernels (csrc/cpu/dual_masked_kl.h).
//
// Registered as torch.ops.unlearn_fast_cpu.dual_masked_kl_{fwd,bwd}; the Python
// custom op in unlearn_fast/ops/dual_masked_kl.py wraps them with autograd and fake
// kernels.  Inputs arrive validated and flattened to (N, V) contiguous rows.
#include "common.h"
#include "cpu/dual_masked_kl.h"

namespace uf {
namespace {

std::tuple<at::Tensor, at::Tensor> dmk_fwd_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                               const std::optional<at::Tensor>& token_mask,
                                               const std::optional<at::Tensor>& vocab_mask,
                                               double inv_temperature, bool cross_entropy) {
  TORCH_CHECK(student.dim() == 2 && student.sizes() == teacher.sizes(), "dual_masked_kl_fwd: expected (N, V) logits");
  TORCH_CHECK(student.is_contiguous() && teacher.is_contiguous(), "dual_masked_kl_fwd: contiguous logits expected");
  TORCH_CHECK(student.scalar_type() == teacher.scalar_type(), "dual_masked_kl_fwd: dtype mismatch");
  const int64_t N = student.size(0), V = student.size(1);
  const float* ks = optional_mask_ptr(token_mask, N, "token_mask");
  const float* kv = optional_mask_ptr(vocab_mask, V, "vocab_mask");
  auto opts = student.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({N}, opts);
  at::Tensor stats = at::empty({N, kDmkStats}, opts);
  float* loss_p = loss.data_ptr<float>();
  float* stats_p = stats.data_ptr<float>();
  const float inv_t = static_cast<float>(inv_temperature);
  UF_DISPATCH_FLOAT(student.scalar_type(), "dual_masked_kl_fwd", [&] {
    const scalar_t* s = student.data_ptr<scalar_t>();
    const scalar_t* t = teacher.data_ptr<scalar_t>();
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> sbuf, tbuf;
      if (!std::is_same<scalar_t, float>::value) {
        sbuf.resize(V);
        tbuf.resize(V);
      }
      for (int64_t r = begin; r < end; ++r) {
        if (ks != nullptr && ks[r] == 0.f) {  // masked position: no work, zero loss
          loss_p[r] = 0.f;
          std::fill(stats_p + kDmkStats * r, stats_p + kDmkStats * (r + 1), 0.f);
          continue;
        }
        const float* srow = row_as_float(s + r * V, V, sbuf.data());
        const float* trow = row_as_float(t + r * V, V, tbuf.data());
        DmkRowStats st = dmk_row_forward(srow, trow, kv, V, inv_t, cross_entropy);
        loss_p[r] = ks != nullptr ? ks[r] * st.loss : st.loss;
        float* out = stats_p + kDmkStats * r;
        out[0] = st.max_a;
        out[1] = st.logsum_a;
        out[2] = st.max_b;
        out[3] = st.logsum_b;
        out[4] = st.kept;
      }
    });
  });
  return {loss, stats};
}

at::Tensor dmk_bwd_cpu(const at::Tensor& grad_rows, const at::Tensor& student, const at::Tensor& teacher,
                       const std::optional<at::Tensor>& token_mask, const std::optional<at::Tensor>& vocab_mask,
                       const at::Tensor& stats, double inv_temperature) {
  const int64_t N = student.size(0), V = student.size(1);
  TORCH_CHECK(grad_rows.scalar_type() == at::kFloat && grad_rows.is_contiguous() && grad_rows.numel() == N,
              "dual_masked_kl_bwd: grad_rows must be float32 (N,)");
  TORCH_CHECK(stats.scalar_type() == at::kFloat && stats.is_contiguous() && stats.numel() == kDmkStats * N,
              "dual_masked_kl_bwd: stats must be float32 (N, 5)");
  const float* ks = optional_mask_ptr(token_mask, N, "token_mask");
  const float* kv = optional_mask_ptr(vocab_mask, V, "vocab_mask");
  at::Tensor grad = at::empty_like(student);
  const float* go = grad_rows.data_ptr<float>();
  const float* st = stats.data_ptr<float>();
  const float inv_t = static_cast<float>(inv_temperature);
  UF_DISPATCH_FLOAT(student.scalar_type(), "dual_masked_kl_bwd", [&] {
    const scalar_t* s = student.data_ptr<scalar_t>();
    const scalar_t* t = teacher.data_ptr<scalar_t>();
    scalar_t* g = grad.data_ptr<scalar_t>();
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> sbuf, tbuf, gbuf;
      if (!std::is_same<scalar_t, float>::value) {
        sbuf.resize(V);
        tbuf.resize(V);
        gbuf.resize(V);
      }
      for (int64_t r = begin; r < end; ++r) {
        scalar_t* grow = g + r * V;
        const float scale = go[r] * inv_t * (ks != nullptr ? ks[r] : 1.f);
        if (scale == 0.f) {
          std::fill(grow, grow + V, scalar_t(0.f));
          continue;
        }
        const float* srow = row_as_float(s + r * V, V, sbuf.data());
        const float* trow = row_as_float(t + r * V, V, tbuf.data());
        float* out = std::is_same<scalar_t, float>::value ? reinterpret_cast<float*>(grow) : gbuf.data();
        const float* rs = st + kDmkStats * r;
        dmk_row_backward(srow, trow, kv, V, inv_t, rs[0], rs[1], rs[2], rs[3], rs[4], scale, out);
        store_row(out, V, grow);
      }
    });
  });
  return grad;
}

}  // namespace
}  // namespace uf

TORCH_LIBRARY_FRAGMENT(unlearn_fast_cpu, m) {
  m.def("dual_masked_kl_fwd(Tensor student, Tensor teacher, Tensor? token_mask, Tensor? vocab_mask, "
        "float inv_temperature, bool cross_entropy) -> (Tensor, Tensor)",
        &uf::dmk_fwd_cpu);
  m.def("dual_masked_kl_bwd(Tensor grad_rows, Tensor student, Tensor teacher, Tensor? token_mask, "
        "Tensor? vocab_mask, Tensor stats, float inv_temperature) -> Tensor",
        &uf::dmk_bwd_cpu);
}
