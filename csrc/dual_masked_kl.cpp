// Torch bindings of the CPU dual masked KL kernels (csrc/cpu/dual_masked_kl.h).
//
// Registered as torch.ops.unlearn_fast_cpu.dual_masked_kl_{fwd,bwd}; the Python
// custom op in unlearn_fast/ops/dual_masked_kl.py wraps them with autograd and fake
// kernels.  Inputs arrive validated and flattened to (N, V) contiguous rows.
// fp32/bf16/fp16 logits run the float kernels (rows converted to float, float32 loss and
// statistics); float64 logits run the double kernels (float64 loss and statistics).
#include "common.h"
#include "cpu/dual_masked_kl.h"

namespace uf {
namespace {

// acc_t: the kernels' compute type (float, or double for float64 logits).
template <typename scalar_t, typename acc_t>
void dmk_fwd_rows(const scalar_t* s, const scalar_t* t, const float* ks, const float* kv, int64_t N, int64_t V,
                  acc_t inv_t, bool cross_entropy, acc_t* loss, acc_t* stats) {
  constexpr bool kConvert = !std::is_same<scalar_t, acc_t>::value;
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sbuf(kConvert ? V : 0), tbuf(kConvert ? V : 0);  // bf16/fp16 rows as float
    for (int64_t r = begin; r < end; ++r) {
      acc_t* out = stats + kDmkStats * r;
      if (ks != nullptr && ks[r] == 0.f) {  // masked position: no work, zero loss
        loss[r] = 0;
        std::fill(out, out + kDmkStats, acc_t(0));
        continue;
      }
      const acc_t* srow = row_as_float(s + r * V, V, sbuf.data());
      const acc_t* trow = row_as_float(t + r * V, V, tbuf.data());
      const DmkRowStatsT<acc_t> st = dmk_row_forward<acc_t>(srow, trow, kv, V, inv_t, cross_entropy);
      loss[r] = ks != nullptr ? static_cast<acc_t>(ks[r]) * st.loss : st.loss;
      out[0] = st.max_a;
      out[1] = st.logsum_a;
      out[2] = st.max_b;
      out[3] = st.logsum_b;
      out[4] = st.kept;
    }
  });
}

template <typename scalar_t, typename acc_t>
void dmk_bwd_rows(const acc_t* go, const scalar_t* s, const scalar_t* t, const float* ks, const float* kv,
                  const acc_t* stats, int64_t N, int64_t V, acc_t inv_t, scalar_t* g) {
  constexpr bool kConvert = !std::is_same<scalar_t, acc_t>::value;
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sbuf(kConvert ? V : 0), tbuf(kConvert ? V : 0), gbuf(kConvert ? V : 0);
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* grow = g + r * V;
      const acc_t scale = go[r] * inv_t * (ks != nullptr ? static_cast<acc_t>(ks[r]) : acc_t(1));
      if (scale == 0) {  // masked row or zero incoming gradient (its statistics are zeros)
        std::fill(grow, grow + V, scalar_t(0));
        continue;
      }
      const acc_t* srow = row_as_float(s + r * V, V, sbuf.data());
      const acc_t* trow = row_as_float(t + r * V, V, tbuf.data());
      acc_t* out = kConvert ? gbuf.data() : reinterpret_cast<acc_t*>(grow);
      const acc_t* rs = stats + kDmkStats * r;
      dmk_row_backward<acc_t>(srow, trow, kv, V, inv_t, rs[0], rs[1], rs[2], rs[3], rs[4], scale, out);
      store_row(out, V, grow);
    }
  });
}

void check_logits(const at::Tensor& student, const at::Tensor& teacher, const char* fn) {
  TORCH_CHECK(student.device().is_cpu() && teacher.device().is_cpu(), fn, ": CPU tensors expected");
  TORCH_CHECK(student.dim() == 2 && student.sizes() == teacher.sizes(), fn, ": expected (N, V) logits of one shape");
  TORCH_CHECK(student.is_contiguous() && teacher.is_contiguous(), fn, ": contiguous logits expected");
  TORCH_CHECK(student.scalar_type() == teacher.scalar_type(), fn, ": student and teacher dtypes differ");
}

std::tuple<at::Tensor, at::Tensor> dmk_fwd_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                               const std::optional<at::Tensor>& token_mask,
                                               const std::optional<at::Tensor>& vocab_mask,
                                               double inv_temperature, bool cross_entropy) {
  const char* fn = "dual_masked_kl_fwd";
  check_logits(student, teacher, fn);
  const int64_t N = student.size(0), V = student.size(1);
  const float* ks = optional_mask_ptr(token_mask, N, "token_mask");
  const float* kv = optional_mask_ptr(vocab_mask, V, "vocab_mask");
  if (student.scalar_type() == at::kDouble) {
    auto opts = student.options();
    at::Tensor loss = at::empty({N}, opts), stats = at::empty({N, kDmkStats}, opts);
    dmk_fwd_rows<double, double>(student.data_ptr<double>(), teacher.data_ptr<double>(), ks, kv, N, V,
                                 inv_temperature, cross_entropy, loss.data_ptr<double>(), stats.data_ptr<double>());
    return {loss, stats};
  }
  auto opts = student.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({N}, opts), stats = at::empty({N, kDmkStats}, opts);
  UF_DISPATCH_FLOAT(student.scalar_type(), fn, [&] {
    dmk_fwd_rows<scalar_t, float>(student.data_ptr<scalar_t>(), teacher.data_ptr<scalar_t>(), ks, kv, N, V,
                                  static_cast<float>(inv_temperature), cross_entropy, loss.data_ptr<float>(),
                                  stats.data_ptr<float>());
  });
  return {loss, stats};
}

at::Tensor dmk_bwd_cpu(const at::Tensor& grad_rows, const at::Tensor& student, const at::Tensor& teacher,
                       const std::optional<at::Tensor>& token_mask, const std::optional<at::Tensor>& vocab_mask,
                       const at::Tensor& stats, double inv_temperature) {
  const char* fn = "dual_masked_kl_bwd";
  check_logits(student, teacher, fn);
  const int64_t N = student.size(0), V = student.size(1);
  const bool f64 = student.scalar_type() == at::kDouble;
  const auto acc = f64 ? at::kDouble : at::kFloat;
  TORCH_CHECK(grad_rows.scalar_type() == acc && grad_rows.is_contiguous() && grad_rows.numel() == N, fn,
              ": grad_rows must be contiguous (N,) of dtype ", acc);
  TORCH_CHECK(stats.scalar_type() == acc && stats.is_contiguous() && stats.numel() == kDmkStats * N, fn,
              ": stats must be contiguous (N, 5) of dtype ", acc);
  const float* ks = optional_mask_ptr(token_mask, N, "token_mask");
  const float* kv = optional_mask_ptr(vocab_mask, V, "vocab_mask");
  at::Tensor grad = empty_for_full_write(student.sizes(), student.options());
  if (f64) {
    dmk_bwd_rows<double, double>(grad_rows.data_ptr<double>(), student.data_ptr<double>(), teacher.data_ptr<double>(),
                                 ks, kv, stats.data_ptr<double>(), N, V, inv_temperature, grad.data_ptr<double>());
    return grad;
  }
  UF_DISPATCH_FLOAT(student.scalar_type(), fn, [&] {
    dmk_bwd_rows<scalar_t, float>(grad_rows.data_ptr<float>(), student.data_ptr<scalar_t>(),
                                  teacher.data_ptr<scalar_t>(), ks, kv, stats.data_ptr<float>(), N, V,
                                  static_cast<float>(inv_temperature), grad.data_ptr<scalar_t>());
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
