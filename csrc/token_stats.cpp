// Torch bindings of the CPU token-statistics kernels (csrc/cpu/token_stats.h).
//
// torch.ops.unlearn_fast_cpu.token_stats_rows_{fwd,bwd}     on (N, V) logits
// torch.ops.unlearn_fast_cpu.token_stats_linear_{fwd,bwd}   on hidden (N, H) and the
//     head weight (V, H): chunks of C tokens, logits chunk = hidden_chunk @ W^T (+ bias)
//     through ATen (BLAS) into one reused (C, V) buffer, then the fused row pass; the
//     backward recomputes each chunk's logits, forms grad_logits = go * (onehot - p) in
//     float32 (in place for float32), and accumulates grad_hidden = g @ W and
//     grad_weight += g^T @ hidden_chunk (float32 accumulator), grad_bias += sum_rows g.
// Nothing of size N x V is allocated.  The Python custom ops in
// unlearn_fast/ops/token_stats.py validate and flatten the inputs first.
#include "common.h"
#include "cpu/token_stats.h"

namespace uf {
namespace {

inline int64_t map_target(int64_t t, int64_t ignore_index, int64_t V) {
  if (t == ignore_index) return -1;
  return (t < 0 || t >= V) ? V : t;  // out of range (validated in Python): NaN log-prob
}

template <typename scalar_t>
void rows_forward_impl(const scalar_t* logits, int64_t n, int64_t V, const int64_t* tg, int64_t ignore_index,
                       float* lp, float* st4, int64_t* am) {
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf;
    if (!std::is_same<scalar_t, float>::value) buf.resize(V);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t t = map_target(tg[r], ignore_index, V);
      TokenRowStats st{0.f, 0.f, 0.f, 0.f, 0.f, 0};
      if (t >= 0) st = token_row_forward(row_as_float(logits + r * V, V, buf.data()), V, t);
      lp[r] = st.logprob;
      st4[4 * r] = st.max;
      st4[4 * r + 1] = st.log_s;
      st4[4 * r + 2] = st.entropy;
      st4[4 * r + 3] = st.std_logp;
      am[r] = st.argmax;
    }
  });
}

// Gradient rows into out (float or the logits dtype); out may alias logits for float.
template <typename scalar_t, typename out_t>
void rows_backward_impl(const scalar_t* logits, int64_t n, int64_t V, const int64_t* tg, int64_t ignore_index,
                        const float* st4, const float* go, out_t* out) {
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> zbuf, gbuf;
    if (!std::is_same<scalar_t, float>::value) zbuf.resize(V);
    if (!std::is_same<out_t, float>::value) gbuf.resize(V);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t t = map_target(tg[r], ignore_index, V);
      float* g = std::is_same<out_t, float>::value ? reinterpret_cast<float*>(out + r * V) : gbuf.data();
      if (t < 0 || go[r] == 0.f) {
        std::fill(g, g + V, 0.f);
      } else {
        token_row_backward(row_as_float(logits + r * V, V, zbuf.data()), V, t, st4[4 * r], st4[4 * r + 1], go[r], g);
      }
      if (!std::is_same<out_t, float>::value) store_row(g, V, out + r * V);
    }
  });
}

void check_targets(const at::Tensor& targets, int64_t N, const char* fn) {
  TORCH_CHECK(targets.scalar_type() == at::kLong && targets.is_contiguous() && targets.numel() == N, fn,
              ": targets must be a contiguous int64 tensor of ", N, " elements");
}

// (logprob (N,), row stats (N, 4) = [max, log_s, entropy, std_logp], argmax (N,) int64)
std::tuple<at::Tensor, at::Tensor, at::Tensor> alloc_stats(const at::Tensor& like, int64_t N) {
  auto f = like.options().dtype(at::kFloat);
  return {at::empty({N}, f), at::empty({N, 4}, f), at::empty({N}, like.options().dtype(at::kLong))};
}

void check_row_stats(const at::Tensor& grad, const at::Tensor& st, int64_t N, const char* fn) {
  TORCH_CHECK(grad.scalar_type() == at::kFloat && grad.is_contiguous() && grad.numel() == N, fn,
              ": grad must be contiguous float32 (N,)");
  TORCH_CHECK(st.scalar_type() == at::kFloat && st.is_contiguous() && st.numel() == 4 * N, fn,
              ": row stats must be contiguous float32 (N, 4)");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rows_fwd_cpu(const at::Tensor& logits, const at::Tensor& targets,
                                                                        int64_t ignore_index) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(), "token_stats_rows_fwd: contiguous (N, V) logits expected");
  const int64_t N = logits.size(0), V = logits.size(1);
  check_targets(targets, N, "token_stats_rows_fwd");
  auto [lp, st, am] = alloc_stats(logits, N);
  UF_DISPATCH_FLOAT(logits.scalar_type(), "token_stats_rows_fwd", [&] {
    rows_forward_impl(logits.data_ptr<scalar_t>(), N, V, targets.data_ptr<int64_t>(), ignore_index,
                      lp.data_ptr<float>(), st.data_ptr<float>(), am.data_ptr<int64_t>());
  });
  return {lp, st, am};
}

at::Tensor rows_bwd_cpu(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& targets,
                        const at::Tensor& row_stats, int64_t ignore_index) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(), "token_stats_rows_bwd: contiguous (N, V) logits expected");
  const int64_t N = logits.size(0), V = logits.size(1);
  check_targets(targets, N, "token_stats_rows_bwd");
  check_row_stats(grad, row_stats, N, "token_stats_rows_bwd");
  at::Tensor out = at::empty_like(logits);
  UF_DISPATCH_FLOAT(logits.scalar_type(), "token_stats_rows_bwd", [&] {
    rows_backward_impl<scalar_t, scalar_t>(logits.data_ptr<scalar_t>(), N, V, targets.data_ptr<int64_t>(), ignore_index,
                                           row_stats.data_ptr<float>(), grad.data_ptr<float>(), out.data_ptr<scalar_t>());
  });
  return out;
}

void check_linear(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const char* fn) {
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1), fn,
              ": expected hidden (N, H) and weight (V, H)");
  TORCH_CHECK(hidden.is_contiguous() && weight.is_contiguous(), fn, ": contiguous hidden and weight expected");
  TORCH_CHECK(hidden.scalar_type() == weight.scalar_type(), fn, ": hidden and weight dtypes differ");
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0) && bias->scalar_type() == weight.scalar_type(), fn,
                ": bias must be (V,) with the weight's dtype");
  }
}

// logits chunk = hidden[c0:c0+n] @ W^T (+ bias) into out (n, V).
void chunk_logits(at::Tensor& out, const at::Tensor& hc, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  if (bias.has_value() && bias->defined()) {
    at::addmm_out(out, *bias, hc, weight.t());
  } else {
    at::mm_out(out, hc, weight.t());
  }
}

bool chunk_all_ignored(const int64_t* tg, const float* go, int64_t n, int64_t ignore_index) {
  for (int64_t r = 0; r < n; ++r) {
    if (tg[r] != ignore_index && (go == nullptr || go[r] != 0.f)) return false;
  }
  return true;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_fwd_cpu(const at::Tensor& hidden, const at::Tensor& weight,
                                                                          const at::Tensor& targets,
                                                                          const std::optional<at::Tensor>& bias,
                                                                          int64_t ignore_index, int64_t chunk_size) {
  check_linear(hidden, weight, bias, "token_stats_linear_fwd");
  const int64_t N = hidden.size(0), V = weight.size(0);
  check_targets(targets, N, "token_stats_linear_fwd");
  TORCH_CHECK(chunk_size >= 1, "token_stats_linear_fwd: chunk_size must be >= 1");
  auto [lp, st, am] = alloc_stats(hidden, N);
  const int64_t C = std::min(chunk_size, std::max<int64_t>(N, 1));
  at::Tensor buf = at::empty({C, V}, hidden.options());
  const int64_t* tg = targets.data_ptr<int64_t>();
  for (int64_t c0 = 0; c0 < N; c0 += C) {
    const int64_t n = std::min(C, N - c0);
    if (chunk_all_ignored(tg + c0, nullptr, n, ignore_index)) {  // e.g. prompt tokens: no GEMM
      lp.narrow(0, c0, n).zero_();
      st.narrow(0, c0, n).zero_();
      am.narrow(0, c0, n).zero_();
      continue;
    }
    at::Tensor out = buf.narrow(0, 0, n);
    chunk_logits(out, hidden.narrow(0, c0, n), weight, bias);
    UF_DISPATCH_FLOAT(hidden.scalar_type(), "token_stats_linear_fwd", [&] {
      rows_forward_impl(out.data_ptr<scalar_t>(), n, V, tg + c0, ignore_index, lp.data_ptr<float>() + c0,
                        st.data_ptr<float>() + 4 * c0, am.data_ptr<int64_t>() + c0);
    });
  }
  return {lp, st, am};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_bwd_cpu(const at::Tensor& grad, const at::Tensor& hidden,
                                                              const at::Tensor& weight, const at::Tensor& targets,
                                                              const std::optional<at::Tensor>& bias,
                                                              const at::Tensor& row_stats, int64_t ignore_index, int64_t chunk_size, bool need_grad_weight,
                                                              bool need_grad_bias) {
  check_linear(hidden, weight, bias, "token_stats_linear_bwd");
  const int64_t N = hidden.size(0), V = weight.size(0), H = hidden.size(1);
  check_targets(targets, N, "token_stats_linear_bwd");
  check_row_stats(grad, row_stats, N, "token_stats_linear_bwd");
  TORCH_CHECK(chunk_size >= 1, "token_stats_linear_bwd: chunk_size must be >= 1");
  const bool f32 = hidden.scalar_type() == at::kFloat;
  auto fopts = hidden.options().dtype(at::kFloat);
  at::Tensor gh = at::empty_like(hidden);
  at::Tensor gw = need_grad_weight ? at::zeros({V, H}, fopts) : at::empty({0}, fopts);  // float32 accumulator
  at::Tensor gb = need_grad_bias ? at::zeros({V}, fopts) : at::empty({0}, fopts);
  const int64_t C = std::min(chunk_size, std::max<int64_t>(N, 1));
  at::Tensor buf = at::empty({C, V}, hidden.options());
  at::Tensor g32 = f32 ? buf : at::empty({C, V}, fopts);  // float32: gradient rows overwrite the logits in place
  const int64_t* tg = targets.data_ptr<int64_t>();
  const float* go = grad.data_ptr<float>();
  for (int64_t c0 = 0; c0 < N; c0 += C) {
    const int64_t n = std::min(C, N - c0);
    at::Tensor ghc = gh.narrow(0, c0, n);
    if (chunk_all_ignored(tg + c0, go + c0, n, ignore_index)) {
      ghc.zero_();
      continue;
    }
    at::Tensor hc = hidden.narrow(0, c0, n);
    at::Tensor out = buf.narrow(0, 0, n);
    chunk_logits(out, hc, weight, bias);
    at::Tensor gn = g32.narrow(0, 0, n);
    UF_DISPATCH_FLOAT(hidden.scalar_type(), "token_stats_linear_bwd", [&] {
      rows_backward_impl<scalar_t, float>(out.data_ptr<scalar_t>(), n, V, tg + c0, ignore_index,
                                          row_stats.data_ptr<float>() + 4 * c0, go + c0, gn.data_ptr<float>());
    });
    if (f32) {
      at::mm_out(ghc, gn, weight);
      if (need_grad_weight) gw.addmm_(gn.t(), hc);
    } else {
      out.copy_(gn);  // round the float32 gradient rows once, for the grad_hidden GEMM
      at::mm_out(ghc, out, weight);
      if (need_grad_weight) gw.addmm_(gn.t(), hc.to(at::kFloat));
    }
    if (need_grad_bias) gb.add_(gn.sum(0));
  }
  if (!f32) {
    if (need_grad_weight) gw = gw.to(weight.scalar_type());
    if (need_grad_bias) gb = gb.to(weight.scalar_type());
  }
  return {gh, gw, gb};
}

}  // namespace
}  // namespace uf

TORCH_LIBRARY_FRAGMENT(unlearn_fast_cpu, m) {
  m.def("token_stats_rows_fwd(Tensor logits, Tensor targets, int ignore_index) -> (Tensor, Tensor, Tensor)",
        &uf::rows_fwd_cpu);
  m.def("token_stats_rows_bwd(Tensor grad, Tensor logits, Tensor targets, Tensor row_stats, int ignore_index) -> Tensor",
        &uf::rows_bwd_cpu);
  m.def("token_stats_linear_fwd(Tensor hidden, Tensor weight, Tensor targets, Tensor? bias, int ignore_index, "
        "int chunk_size) -> (Tensor, Tensor, Tensor)",
        &uf::linear_fwd_cpu);
  m.def("token_stats_linear_bwd(Tensor grad, Tensor hidden, Tensor weight, Tensor targets, Tensor? bias, Tensor row_stats, "
        "int ignore_index, int chunk_size, bool need_grad_weight, bool need_grad_bias) -> (Tensor, Tensor, Tensor)",
        &uf::linear_bwd_cpu);
}
