// Fused linear dual masked KL on the CPU: torch bindings of the chunk loop over the
// student and teacher heads.  The row work is the torch-free DMK core
// (csrc/cpu/dual_masked_kl.h); the GEMMs go through ATen (csrc/linear_chunk.h).
//
// torch.ops.unlearn_fast_cpu.fused_linear_dmk_fwd
//   For each chunk of C tokens: student logits hs_c @ Ws^T (+ bs) and teacher logits
//   ht_c @ Wt^T (+ bt) into two reused (C, V) buffers, then one parallel pass over the
//   rows gives the per-row loss and the 5 saved statistics.  When gradients are asked
//   for, the same pass turns the student buffer into the gradient rows
//   g = K_S (q S - K_V p) / T (float32 math, stored in the input dtype), and
//     grad_hidden[c] = g @ Ws                 (per-row Jacobian: exact for any grad_output)
//     grad_weight   += g^T @ hs_c             (float32 accumulator; only if asked)
//     grad_bias     += column sums of g       (float32; only if asked)
//   while the logits are still in cache, so the backward need not recompute them.
//   The caller asks for grad_weight/grad_bias here only when the loss is the plain sum
//   of the rows (then every row's grad_output is the same scalar).
// torch.ops.unlearn_fast_cpu.fused_linear_dmk_bwd
//   grad_weight / grad_bias for an arbitrary per-row grad_output: recomputes each
//   chunk's logits and accumulates g^T @ hs_c with g scaled by grad_rows.
//
// Chunks whose tokens are all masked (K_S = 0, or grad_output 0 in the backward) are
// skipped without a GEMM.  Nothing of size N x V is allocated.
#include "common.h"
#include "cpu/dual_masked_kl.h"
#include "linear_chunk.h"

namespace uf {
namespace {

// One chunk's rows.  student (n, V) holds the student logits on entry; with grad_scale
// != nullptr it holds the gradient rows on exit, row r scaled by grad_scale[r] (0: a
// zero row).  With loss != nullptr the forward statistics are computed and written to
// (loss, out_stats); otherwise the saved statistics are read from saved_stats.
template <typename scalar_t>
void dmk_chunk_rows(scalar_t* student, const scalar_t* teacher, int64_t n, int64_t V, const float* token_mask,
                    const float* vocab_mask, float inv_t, bool cross_entropy, float* loss, float* out_stats,
                    const float* saved_stats, const float* grad_scale) {
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    constexpr bool is_float = std::is_same<scalar_t, float>::value;
    std::vector<float> sbuf, tbuf, gbuf;
    if (!is_float) {
      sbuf.resize(V);
      tbuf.resize(V);
      if (grad_scale != nullptr) gbuf.resize(V);
    }
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* srow = student + r * V;
      const float keep = token_mask != nullptr ? token_mask[r] : 1.f;
      const float* st = (loss != nullptr ? out_stats : saved_stats) + kDmkStats * r;
      if (loss != nullptr && keep == 0.f) {  // masked position: zero loss, zero gradient
        loss[r] = 0.f;
        std::fill(out_stats + kDmkStats * r, out_stats + kDmkStats * (r + 1), 0.f);
        if (grad_scale != nullptr) std::fill(srow, srow + V, scalar_t(0.f));
        continue;
      }
      const float* s = row_as_float(srow, V, sbuf.data());
      const float* t = row_as_float(teacher + r * V, V, tbuf.data());
      if (loss != nullptr) {
        const DmkRowStats rs = dmk_row_forward(s, t, vocab_mask, V, inv_t, cross_entropy);
        loss[r] = keep * rs.loss;
        float* out = out_stats + kDmkStats * r;
        out[0] = rs.max_a;
        out[1] = rs.logsum_a;
        out[2] = rs.max_b;
        out[3] = rs.logsum_b;
        out[4] = rs.kept;
      }
      if (grad_scale == nullptr) continue;
      const float scale = grad_scale[r] * keep * inv_t;
      if (scale == 0.f) {
        std::fill(srow, srow + V, scalar_t(0.f));
        continue;
      }
      // float32: the gradient overwrites the logits in place (element i reads s[i] first)
      float* g = is_float ? reinterpret_cast<float*>(srow) : gbuf.data();
      dmk_row_backward(s, t, vocab_mask, V, inv_t, st[0], st[1], st[2], st[3], st[4], scale, g);
      store_row(g, V, srow);
    }
  });
}

struct Heads {
  const at::Tensor& sh;
  const at::Tensor& sw;
  const at::Tensor& th;
  const at::Tensor& tw;
  const std::optional<at::Tensor>& sb;
  const std::optional<at::Tensor>& tb;
};

void check_heads(const Heads& x, const char* fn) {
  TORCH_CHECK(x.sh.dim() == 2 && x.sw.dim() == 2 && x.sh.size(1) == x.sw.size(1), fn,
              ": expected student_hidden (N, H) and student_weight (V, H)");
  TORCH_CHECK(x.th.sizes() == x.sh.sizes() && x.tw.sizes() == x.sw.sizes(), fn,
              ": teacher hidden/weight must have the student's shapes");
  for (const at::Tensor* t : {&x.sh, &x.sw, &x.th, &x.tw}) {
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == x.sh.scalar_type(), fn,
                ": contiguous tensors of one dtype expected");
  }
  for (const std::optional<at::Tensor>* b : {&x.sb, &x.tb}) {
    if (has_tensor(*b)) {
      TORCH_CHECK((*b)->dim() == 1 && (*b)->size(0) == x.sw.size(0) && (*b)->scalar_type() == x.sw.scalar_type(), fn,
                  ": biases must be (V,) with the weights' dtype");
    }
  }
}

bool chunk_all_zero(const float* a, const float* b, int64_t n) {
  for (int64_t r = 0; r < n; ++r) {
    if ((a == nullptr || a[r] != 0.f) && (b == nullptr || b[r] != 0.f)) return false;
  }
  return true;
}

at::Tensor from_float32(const at::Tensor& acc, at::ScalarType dtype) {
  return acc.scalar_type() == dtype ? acc : acc.to(dtype);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_linear_dmk_fwd_cpu(
    const at::Tensor& student_hidden, const at::Tensor& student_weight, const at::Tensor& teacher_hidden,
    const at::Tensor& teacher_weight, const std::optional<at::Tensor>& student_bias,
    const std::optional<at::Tensor>& teacher_bias, const std::optional<at::Tensor>& token_mask,
    const std::optional<at::Tensor>& vocab_mask, double inv_temperature, bool cross_entropy, int64_t chunk_size,
    bool grad_hidden, bool grad_weight, bool grad_bias) {
  const char* fn = "fused_linear_dmk_fwd";
  const Heads x{student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias};
  check_heads(x, fn);
  TORCH_CHECK(chunk_size >= 1, fn, ": chunk_size must be >= 1");
  TORCH_CHECK(!grad_bias || has_tensor(student_bias), fn, ": grad_bias without a student bias");
  const int64_t N = x.sh.size(0), H = x.sh.size(1), V = x.sw.size(0);
  const float* ks = optional_mask_ptr(token_mask, N, "token_mask");
  const float* kv = optional_mask_ptr(vocab_mask, V, "vocab_mask");
  auto f32 = x.sh.options().dtype(at::kFloat);
  at::Tensor rows = at::empty({N}, f32);
  at::Tensor stats = at::empty({N, kDmkStats}, f32);
  at::Tensor gh = grad_hidden ? at::empty_like(x.sh) : at::empty({0}, x.sh.options());
  // float32 accumulator, not zero-filled (for a float32 weight, the returned gradient itself)
  WeightGradAccumulator gw{grad_weight ? empty_for_full_write({V, H}, f32) : at::empty({0}, f32)};
  at::Tensor gb = grad_bias ? at::zeros({V}, f32) : at::empty({0}, f32);
  const bool any_grad = grad_hidden || grad_weight || grad_bias;
  const int64_t C = std::min(chunk_size, std::max<int64_t>(N, 1));
  at::Tensor sbuf = empty_for_full_write({C, V}, x.sh.options());
  at::Tensor tbuf = empty_for_full_write({C, V}, x.sh.options());
  // the forward's gradient rows are those of the plain row sum: grad_output 1 per row
  std::vector<float> ones(any_grad ? C : 0, 1.f);
  const float inv_t = static_cast<float>(inv_temperature);
  for (int64_t c0 = 0; c0 < N; c0 += C) {
    const int64_t n = std::min(C, N - c0);
    if (ks != nullptr && chunk_all_zero(ks + c0, nullptr, n)) {  // e.g. a masked target phrase
      rows.narrow(0, c0, n).zero_();
      stats.narrow(0, c0, n).zero_();
      if (grad_hidden) gh.narrow(0, c0, n).zero_();
      continue;
    }
    at::Tensor s = sbuf.narrow(0, 0, n);
    at::Tensor t = tbuf.narrow(0, 0, n);
    at::Tensor hc = x.sh.narrow(0, c0, n);
    chunk_logits(s, hc, x.sw, x.sb);
    chunk_logits(t, x.th.narrow(0, c0, n), x.tw, x.tb);
    UF_DISPATCH_FLOAT(x.sh.scalar_type(), fn, [&] {
      dmk_chunk_rows<scalar_t>(s.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(), n, V, ks == nullptr ? nullptr : ks + c0,
                               kv, inv_t, cross_entropy, rows.data_ptr<float>() + c0,
                               stats.data_ptr<float>() + kDmkStats * c0, stats.data_ptr<float>() + kDmkStats * c0,
                               any_grad ? ones.data() : nullptr);
    });
    if (grad_hidden) {
      at::Tensor ghc = gh.narrow(0, c0, n);
      chunk_grad_hidden(ghc, s, x.sw);
    }
    if (grad_weight) gw.add(s, hc);
    if (grad_bias) add_bias_grad(gb, s);
  }
  const auto wtype = x.sw.scalar_type();
  return {rows, stats, gh, gw.result(wtype), grad_bias ? from_float32(gb, wtype) : gb};
}

std::tuple<at::Tensor, at::Tensor> fused_linear_dmk_bwd_cpu(
    const at::Tensor& grad_rows, const at::Tensor& student_hidden, const at::Tensor& student_weight,
    const at::Tensor& teacher_hidden, const at::Tensor& teacher_weight, const std::optional<at::Tensor>& student_bias,
    const std::optional<at::Tensor>& teacher_bias, const std::optional<at::Tensor>& token_mask,
    const std::optional<at::Tensor>& vocab_mask, const at::Tensor& stats, double inv_temperature, int64_t chunk_size,
    bool grad_weight, bool grad_bias) {
  const char* fn = "fused_linear_dmk_bwd";
  const Heads x{student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias};
  check_heads(x, fn);
  TORCH_CHECK(chunk_size >= 1, fn, ": chunk_size must be >= 1");
  TORCH_CHECK(!grad_bias || has_tensor(student_bias), fn, ": grad_bias without a student bias");
  const int64_t N = x.sh.size(0), H = x.sh.size(1), V = x.sw.size(0);
  TORCH_CHECK(grad_rows.scalar_type() == at::kFloat && grad_rows.is_contiguous() && grad_rows.numel() == N, fn,
              ": grad_rows must be contiguous float32 (N,)");
  TORCH_CHECK(stats.scalar_type() == at::kFloat && stats.is_contiguous() && stats.numel() == kDmkStats * N, fn,
              ": stats must be contiguous float32 (N, 5)");
  const float* ks = optional_mask_ptr(token_mask, N, "token_mask");
  const float* kv = optional_mask_ptr(vocab_mask, V, "vocab_mask");
  auto f32 = x.sh.options().dtype(at::kFloat);
  WeightGradAccumulator gw{grad_weight ? empty_for_full_write({V, H}, f32) : at::empty({0}, f32)};
  at::Tensor gb = grad_bias ? at::zeros({V}, f32) : at::empty({0}, f32);
  if (grad_weight || grad_bias) {
    const int64_t C = std::min(chunk_size, std::max<int64_t>(N, 1));
    at::Tensor sbuf = empty_for_full_write({C, V}, x.sh.options());
    at::Tensor tbuf = empty_for_full_write({C, V}, x.sh.options());
    const float* go = grad_rows.data_ptr<float>();
    const float inv_t = static_cast<float>(inv_temperature);
    for (int64_t c0 = 0; c0 < N; c0 += C) {
      const int64_t n = std::min(C, N - c0);
      if (chunk_all_zero(ks == nullptr ? nullptr : ks + c0, go + c0, n)) continue;  // no gradient from this chunk
      at::Tensor s = sbuf.narrow(0, 0, n);
      at::Tensor t = tbuf.narrow(0, 0, n);
      at::Tensor hc = x.sh.narrow(0, c0, n);
      chunk_logits(s, hc, x.sw, x.sb);
      chunk_logits(t, x.th.narrow(0, c0, n), x.tw, x.tb);
      UF_DISPATCH_FLOAT(x.sh.scalar_type(), fn, [&] {
        dmk_chunk_rows<scalar_t>(s.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(), n, V,
                                 ks == nullptr ? nullptr : ks + c0, kv, inv_t, false, nullptr, nullptr,
                                 stats.data_ptr<float>() + kDmkStats * c0, go + c0);
      });
      if (grad_weight) gw.add(s, hc);
      if (grad_bias) add_bias_grad(gb, s);
    }
  }
  const auto wtype = x.sw.scalar_type();
  return {gw.result(wtype), grad_bias ? from_float32(gb, wtype) : gb};
}

}  // namespace
}  // namespace uf

TORCH_LIBRARY_FRAGMENT(unlearn_fast_cpu, m) {
  m.def("fused_linear_dmk_fwd(Tensor student_hidden, Tensor student_weight, Tensor teacher_hidden, "
        "Tensor teacher_weight, Tensor? student_bias, Tensor? teacher_bias, Tensor? token_mask, Tensor? vocab_mask, "
        "float inv_temperature, bool cross_entropy, int chunk_size, bool grad_hidden, bool grad_weight, "
        "bool grad_bias) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
        &uf::fused_linear_dmk_fwd_cpu);
  m.def("fused_linear_dmk_bwd(Tensor grad_rows, Tensor student_hidden, Tensor student_weight, Tensor teacher_hidden, "
        "Tensor teacher_weight, Tensor? student_bias, Tensor? teacher_bias, Tensor? token_mask, Tensor? vocab_mask, "
        "Tensor stats, float inv_temperature, int chunk_size, bool grad_weight, bool grad_bias) -> (Tensor, Tensor)",
        &uf::fused_linear_dmk_bwd_cpu);
}
