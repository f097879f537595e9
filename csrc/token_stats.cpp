// Torch bindings of the CPU token-statistics kernels (csrc/cpu/token_stats.h).
//
// torch.ops.unlearn_fast_cpu.token_stats_rows_{fwd,bwd}     on (N, V) logits
// torch.ops.unlearn_fast_cpu.token_stats_linear_{fwd,bwd}   on hidden (N, H) and the
//     head weight (V, H): chunks of C tokens, logits chunk = hidden_chunk @ W^T (+ bias)
//     through ATen (BLAS, csrc/linear_chunk.h) into one reused (C, V) buffer, then the
//     fused row pass.  When gradients are asked for, the forward turns each chunk into
//     its gradient rows (float32 math, true-class term included) while it is at hand
//     and returns grad_hidden (the per-row Jacobian, or the gradient of a row-weighted
//     sum together with grad_weight / grad_bias); the backward recomputes the chunks
//     only for what depends on an arbitrary per-token grad_output (the weight gradient).
// Nothing of size N x V is allocated.  The Python custom ops in
// unlearn_fast/ops/token_stats.py validate and flatten the inputs first.
#include "common.h"
#include "cpu/token_stats.h"
#include "linear_chunk.h"

#include <atomic>
#include <limits>

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

bool chunk_all_ignored(const int64_t* tg, const float* go, int64_t n, int64_t ignore_index) {
  for (int64_t r = 0; r < n; ++r) {
    if (tg[r] != ignore_index && (go == nullptr || go[r] != 0.f)) return false;
  }
  return true;
}

at::Tensor from_float32(const at::Tensor& acc, at::ScalarType dtype) {
  return acc.scalar_type() == dtype ? acc : acc.to(dtype);
}

// Turn a logits chunk (n, V) into its gradient rows coeff[r] * (onehot(t_r) - p_r) in
// place (float32 math, stored in the logits' dtype); ignored rows and coeff 0 -> zeros.
void chunk_gradient_rows(at::Tensor& chunk, const int64_t* tg, int64_t ignore_index, const float* st4,
                         const float* coeff) {
  const int64_t n = chunk.size(0), V = chunk.size(1);
  UF_DISPATCH_FLOAT(chunk.scalar_type(), "token_stats_gradient_rows", [&] {
    rows_backward_impl<scalar_t, scalar_t>(chunk.data_ptr<scalar_t>(), n, V, tg, ignore_index, st4, coeff,
                                           chunk.data_ptr<scalar_t>());
  });
}

// ---- Vocabulary-blocked loops -------------------------------------------------------
// Chunks of C tokens, and within a chunk blocks of kVocabSlab vocabulary rows: the GEMM of
// a block gives a vocabulary-major (vb, n) slab (the fast orientation on the CPU, see
// linear_chunk.h), the column kernels of cpu/token_stats.h fold it into per-token running
// statistics, and the next block overwrites it.  The largest buffer is one slab
// (kVocabSlab x C floats: 4 MiB at C = 256) instead of the (C, V) logits chunk (148 MiB at
// V = 151,936), with the same GEMMs:
//   forward without a weight gradient: the logits GEMM, and for the hidden-state gradient
//     one more (the softmax weights e^(z - m) of each block times W, summed over the
//     blocks with the online-softmax rescaling, as flash attention sums its values);
//   backward (the statistics are known): the logits GEMM and the gradient GEMMs, each
//     block's gradient slab formed exactly as in the unblocked loop.
// A trainable head's forward with the weight gradient (linear_logprob_sum) cannot be
// blocked without one more GEMM: the weight gradient of a block needs every token's final
// softmax normaliser, so it keeps the (C, V) chunk (see linear_fwd_cpu).
//
// bfloat16/float16 inputs: the GEMMs run in the input dtype and each slab is converted to
// float32 for the column kernels (and a gradient slab back, rounded once, as the unblocked
// loop stores its gradient rows).  The hidden-state gradient is blocked in float32 only:
// in low precision each block's partial product would be rounded on its own, so a
// low-precision forward that needs it keeps the (C, V) chunk (one GEMM over the whole row).
bool blocked_ok(const at::Tensor& hidden, bool hidden_gradient) {
  return hidden.scalar_type() == at::kFloat || !hidden_gradient;
}

// Tokens per parallel task of the column kernels (they run down a whole slab per task).
constexpr int64_t kColumnGrain = 32;

// Per-token running state of one chunk (cpu/token_stats.h, TokenColumnState).
struct ColumnState {
  std::vector<float> m, s, a1, a2, s_excl, zt, m_old, factor;
  std::vector<int64_t> arg;
  explicit ColumnState(int64_t C)
      : m(C), s(C), a1(C), a2(C), s_excl(C), zt(C), m_old(C), factor(C), arg(C) {}
  TokenColumnState reset(int64_t n) {
    std::fill(m.begin(), m.begin() + n, -std::numeric_limits<float>::infinity());
    for (auto* v : {&s, &a1, &a2, &s_excl, &zt}) std::fill(v->begin(), v->begin() + n, 0.f);
    std::fill(arg.begin(), arg.begin() + n, int64_t(0));
    return TokenColumnState{m.data(), s.data(), a1.data(), a2.data(), s_excl.data(), zt.data(), arg.data()};
  }
};

// The buffers of one blocked loop over chunks of at most C tokens: the logits slab in the
// input dtype, its float32 copy (bfloat16/float16 only) and, with the hidden-state
// gradient, the transposed (H, C) float32 accumulator.
struct BlockBuffers {
  at::Tensor slab_buf, f32_buf, acc_buf;

  BlockBuffers(const at::Tensor& hidden, int64_t vocab_block, int64_t C, bool hidden_gradient) {
    auto f32 = hidden.options().dtype(at::kFloat);
    slab_buf = empty_for_full_write({vocab_block * C}, hidden.options());
    f32_buf = hidden.scalar_type() != at::kFloat ? empty_for_full_write({vocab_block * C}, f32) : at::empty({0}, f32);
    acc_buf = hidden_gradient ? empty_for_full_write({hidden.size(1) * C}, f32) : at::empty({0}, f32);
  }

  static at::Tensor front(const at::Tensor& flat, int64_t rows, int64_t cols) {
    return flat.narrow(0, 0, rows * cols).view({rows, cols});
  }

  // The (H, n) accumulator of a chunk of n tokens.
  at::Tensor acc(int64_t H, int64_t n) const { return acc_buf.numel() > 0 ? front(acc_buf, H, n) : acc_buf; }

  // The logits of block [v0, v0 + vb) for a chunk, weight[v0 : v0 + vb] @ hc^T (+ bias),
  // into the (vb, n) slab; returns the slab and the float32 slab the column kernels work
  // on (the slab itself for float32, else a converted copy).
  std::pair<at::Tensor, at::Tensor> logits(const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                           const at::Tensor& hc_t, int64_t v0, int64_t vb) const {
    at::Tensor slab = front(slab_buf, vb, hc_t.size(1));
    if (has_tensor(bias)) {
      at::addmm_out(slab, bias->narrow(0, v0, vb).unsqueeze(1), weight.narrow(0, v0, vb), hc_t);
    } else {
      at::mm_out(slab, weight.narrow(0, v0, vb), hc_t);
    }
    if (slab.scalar_type() == at::kFloat) return {slab, slab};
    at::Tensor zf = front(f32_buf, vb, hc_t.size(1));
    zf.copy_(slab);
    return {slab, zf};
  }
};

// acc_t (H, n) += weight[v0 : v0 + vb]^T @ slab (vb, n); the first block (v0 = 0) overwrites.
void add_hidden_block(at::Tensor& acc_t, const at::Tensor& weight, int64_t v0, const at::Tensor& slab) {
  const at::Tensor w_t = weight.narrow(0, v0, slab.size(0)).t();
  if (v0 == 0) {
    at::mm_out(acc_t, w_t, slab);
  } else {
    acc_t.addmm_(w_t, slab);
  }
}

// The blocked forward: statistics, and with grad_hidden the hidden-state gradient of
// sum_r c_r logprob_r (c = row_weights, or 1: the per-row Jacobian):
//   gh_r = c_r (W_t - sum_v p_v W_v) = c_r (s_excl W_t - acc_r) / s,  acc_r = sum_{v != t} e^(z_v - m) W_v
// (1 - p_t = s_excl / s: no cancellation when p_t -> 1).  acc is kept transposed, (H, n),
// and summed block by block with the rescaling of each token's running maximum.
void linear_fwd_blocked(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        const int64_t* tg, int64_t ignore_index, int64_t C, const float* rw, at::Tensor& lp,
                        at::Tensor& st, at::Tensor& am, at::Tensor& gh, bool grad_hidden) {
  const int64_t N = hidden.size(0), V = weight.size(0), H = hidden.size(1);
  const int64_t VB = std::min(kVocabSlab, V);
  const BlockBuffers bufs(hidden, VB, C, grad_hidden);
  ColumnState state(C);
  std::vector<int64_t> tgm(C);
  float* lpp = lp.data_ptr<float>();
  float* st4 = st.data_ptr<float>();
  int64_t* amp = am.data_ptr<int64_t>();
  for (int64_t c0 = 0; c0 < N; c0 += C) {
    const int64_t n = std::min(C, N - c0);
    if (chunk_all_ignored(tg + c0, nullptr, n, ignore_index)) {
      lp.narrow(0, c0, n).zero_();
      st.narrow(0, c0, n).zero_();
      am.narrow(0, c0, n).zero_();
      if (grad_hidden) gh.narrow(0, c0, n).zero_();
      continue;
    }
    for (int64_t r = 0; r < n; ++r) tgm[r] = map_target(tg[c0 + r], ignore_index, V);
    TokenColumnState cs = state.reset(n);
    const at::Tensor hc = hidden.narrow(0, c0, n);
    const at::Tensor hc_t = hc.t();
    at::Tensor acc_t = bufs.acc(H, n);
    for (int64_t v0 = 0; v0 < V; v0 += VB) {
      const int64_t vb = std::min(VB, V - v0);
      auto [slab, zf] = bufs.logits(weight, bias, hc_t, v0, vb);
      float* z = zf.data_ptr<float>();
      std::atomic<bool> rescaled{false};
      at::parallel_for(0, n, kColumnGrain, [&](int64_t r0, int64_t r1) {
        token_columns_raise_max(z, vb, n, v0, r0, r1, cs, state.m_old.data());
        if (token_columns_rescale(state.m_old.data(), r0, r1, cs, state.factor.data())) rescaled = true;
        token_columns_accumulate(z, vb, n, v0, r0, r1, tgm.data(), cs, grad_hidden);
      });
      if (!grad_hidden) continue;
      // the earlier blocks' sum, rescaled to the raised maxima (on the first block the
      // sum is overwritten)
      if (v0 > 0 && rescaled) acc_t.mul_(at::from_blob(state.factor.data(), {1, n}, zf.options()));
      add_hidden_block(acc_t, weight, v0, slab);
    }
    for (int64_t r = 0; r < n; ++r) {
      const TokenRowStats s = token_column_finish(cs, r, tgm[r], V);
      const int64_t i = c0 + r;
      lpp[i] = s.logprob;
      st4[4 * i] = s.max;
      st4[4 * i + 1] = s.log_s;
      st4[4 * i + 2] = s.entropy;
      st4[4 * i + 3] = s.std_logp;
      amp[i] = s.argmax;
    }
    if (!grad_hidden) continue;
    at::Tensor ghc = gh.narrow(0, c0, n);
    ghc.copy_(acc_t.t());
    const float* w = weight.data_ptr<float>();
    float* g = ghc.data_ptr<float>();
    at::parallel_for(0, n, 8, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t t = tgm[r];
        const float c = rw != nullptr ? rw[c0 + r] : 1.f;
        float* row = g + r * H;
        if (t < 0 || t >= V || c == 0.f) {
          std::fill(row, row + H, 0.f);
          continue;
        }
        const float scale = c / cs.s[r], keep = cs.s_excl[r];
        const float* wt = w + t * H;
#pragma omp simd
        for (int64_t h = 0; h < H; ++h) row[h] = scale * (keep * wt[h] - row[h]);
      }
    });
  }
}

// The blocked backward for an arbitrary per-token grad_output (statistics known).
void linear_bwd_blocked(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        const int64_t* tg, int64_t ignore_index, int64_t C, const float* st4, const float* go,
                        at::Tensor& gh, WeightGradAccumulator& gw, at::Tensor& gb, bool need_gh, bool need_gw,
                        bool need_gb) {
  const int64_t N = hidden.size(0), V = weight.size(0), H = hidden.size(1);
  const int64_t VB = std::min(kVocabSlab, V);
  const BlockBuffers bufs(hidden, VB, C, need_gh);
  std::vector<int64_t> tgm(C);
  std::vector<float> scratch(2 * C);
  for (int64_t c0 = 0; c0 < N; c0 += C) {
    const int64_t n = std::min(C, N - c0);
    if (chunk_all_ignored(tg + c0, go + c0, n, ignore_index)) {
      if (need_gh) gh.narrow(0, c0, n).zero_();
      continue;
    }
    for (int64_t r = 0; r < n; ++r) tgm[r] = map_target(tg[c0 + r], ignore_index, V);
    const at::Tensor hc = hidden.narrow(0, c0, n);
    const at::Tensor hc_t = hc.t();
    at::Tensor acc_t = bufs.acc(H, n);
    for (int64_t v0 = 0; v0 < V; v0 += VB) {
      const int64_t vb = std::min(VB, V - v0);
      auto [slab, zf] = bufs.logits(weight, bias, hc_t, v0, vb);
      float* z = zf.data_ptr<float>();
      at::parallel_for(0, n, kColumnGrain, [&](int64_t r0, int64_t r1) {
        token_columns_gradient(z, vb, n, v0, r0, r1, tgm.data(), V, st4 + 4 * c0, go + c0, scratch.data());
      });
      if (!zf.is_same(slab)) slab.copy_(zf);  // the gradient slab in the GEMMs' dtype
      if (need_gw) gw.add_block(v0, slab, hc);
      if (need_gb) gb.narrow(0, v0, vb).add_(at::sum(zf, {1}));
      if (need_gh) add_hidden_block(acc_t, weight, v0, slab);
    }
    if (need_gw) gw.end_chunk();
    if (need_gh) gh.narrow(0, c0, n).copy_(acc_t.t());
  }
}

// Forward over chunks.  With gradients asked for, each chunk's logits become its gradient
// rows right after the statistics (no recomputation later):
//   row_weights == None: coefficient 1 -> grad_hidden = per-row Jacobian of logprob
//     (the backward scales row r by grad_output[r]: exact for any grad_output);
//   row_weights = c (N,): the gradients of total = sum_r c_r logprob_r -- grad_hidden,
//     grad_weight (float32 accumulator) and grad_bias of that scalar.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_fwd_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
    const std::optional<at::Tensor>& bias, int64_t ignore_index, int64_t chunk_size,
    const std::optional<at::Tensor>& row_weights, bool grad_hidden, bool grad_weight, bool grad_bias) {
  const char* fn = "token_stats_linear_fwd";
  check_linear(hidden, weight, bias, fn);
  const int64_t N = hidden.size(0), V = weight.size(0), H = hidden.size(1);
  check_targets(targets, N, fn);
  TORCH_CHECK(chunk_size >= 1, fn, ": chunk_size must be >= 1");
  TORCH_CHECK(!grad_bias || has_tensor(bias), fn, ": grad_bias without a bias");
  const float* rw = optional_mask_ptr(row_weights, N, "row_weights");
  auto [lp, st, am] = alloc_stats(hidden, N);
  auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor gh = grad_hidden ? at::empty_like(hidden) : at::empty({0}, hidden.options());
  if (blocked_ok(hidden, grad_hidden) && !grad_weight && !grad_bias) {
    linear_fwd_blocked(hidden, weight, bias, targets.data_ptr<int64_t>(), ignore_index,
                       std::min(chunk_size, std::max<int64_t>(N, 1)), rw, lp, st, am, gh, grad_hidden);
    return {lp, st, am, gh, at::empty({0}, f32), at::empty({0}, f32)};
  }
  WeightGradAccumulator gw{grad_weight ? empty_for_full_write({V, H}, f32) : at::empty({0}, f32)};
  at::Tensor gb = grad_bias ? at::zeros({V}, f32) : at::empty({0}, f32);
  const bool any_grad = grad_hidden || grad_weight || grad_bias;
  const int64_t C = std::min(chunk_size, std::max<int64_t>(N, 1));
  at::Tensor buf = empty_for_full_write({C, V}, hidden.options());
  std::vector<float> ones(any_grad && rw == nullptr ? C : 0, 1.f);
  const int64_t* tg = targets.data_ptr<int64_t>();
  for (int64_t c0 = 0; c0 < N; c0 += C) {
    const int64_t n = std::min(C, N - c0);
    if (chunk_all_ignored(tg + c0, nullptr, n, ignore_index)) {  // e.g. prompt tokens: no GEMM
      lp.narrow(0, c0, n).zero_();
      st.narrow(0, c0, n).zero_();
      am.narrow(0, c0, n).zero_();
      if (grad_hidden) gh.narrow(0, c0, n).zero_();
      continue;
    }
    at::Tensor out = buf.narrow(0, 0, n);
    at::Tensor hc = hidden.narrow(0, c0, n);
    chunk_logits(out, hc, weight, bias);
    UF_DISPATCH_FLOAT(hidden.scalar_type(), fn, [&] {
      rows_forward_impl(out.data_ptr<scalar_t>(), n, V, tg + c0, ignore_index, lp.data_ptr<float>() + c0,
                        st.data_ptr<float>() + 4 * c0, am.data_ptr<int64_t>() + c0);
    });
    if (!any_grad) continue;
    chunk_gradient_rows(out, tg + c0, ignore_index, st.data_ptr<float>() + 4 * c0,
                        rw != nullptr ? rw + c0 : ones.data());
    if (grad_hidden) {
      at::Tensor ghc = gh.narrow(0, c0, n);
      chunk_grad_hidden(ghc, out, weight);
    }
    if (grad_weight) gw.add(out, hc);
    if (grad_bias) add_bias_grad(gb, out);
  }
  const auto wtype = weight.scalar_type();
  return {lp, st, am, gh, gw.result(wtype), grad_bias ? from_float32(gb, wtype) : gb};
}

// Backward for an arbitrary per-token grad_output: recomputes each chunk's logits, forms
// grad_logits = go * (onehot - p) in float32 (stored in the logits' dtype, in place) and
// accumulates the requested grad_hidden = g @ W, grad_weight += g^T @ hidden_chunk
// (float32 accumulator), grad_bias += sum_rows g.
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_bwd_cpu(const at::Tensor& grad, const at::Tensor& hidden,
                                                              const at::Tensor& weight, const at::Tensor& targets,
                                                              const std::optional<at::Tensor>& bias,
                                                              const at::Tensor& row_stats, int64_t ignore_index,
                                                              int64_t chunk_size, bool need_grad_hidden,
                                                              bool need_grad_weight, bool need_grad_bias) {
  const char* fn = "token_stats_linear_bwd";
  check_linear(hidden, weight, bias, fn);
  const int64_t N = hidden.size(0), V = weight.size(0), H = hidden.size(1);
  check_targets(targets, N, fn);
  check_row_stats(grad, row_stats, N, fn);
  TORCH_CHECK(chunk_size >= 1, fn, ": chunk_size must be >= 1");
  TORCH_CHECK(!need_grad_bias || has_tensor(bias), fn, ": grad_bias without a bias");
  auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor gh = need_grad_hidden ? at::empty_like(hidden) : at::empty({0}, hidden.options());
  WeightGradAccumulator gw{need_grad_weight ? empty_for_full_write({V, H}, f32) : at::empty({0}, f32)};
  at::Tensor gb = need_grad_bias ? at::zeros({V}, f32) : at::empty({0}, f32);
  const int64_t C = std::min(chunk_size, std::max<int64_t>(N, 1));
  const int64_t* tg = targets.data_ptr<int64_t>();
  const float* go = grad.data_ptr<float>();
  const auto wtype = weight.scalar_type();
  if (blocked_ok(hidden, need_grad_hidden)) {
    linear_bwd_blocked(hidden, weight, bias, tg, ignore_index, C, row_stats.data_ptr<float>(), go, gh, gw, gb,
                       need_grad_hidden, need_grad_weight, need_grad_bias);
    return {gh, gw.result(wtype), need_grad_bias ? from_float32(gb, wtype) : gb};
  }
  at::Tensor buf = empty_for_full_write({C, V}, hidden.options());
  for (int64_t c0 = 0; c0 < N; c0 += C) {
    const int64_t n = std::min(C, N - c0);
    if (chunk_all_ignored(tg + c0, go + c0, n, ignore_index)) {
      if (need_grad_hidden) gh.narrow(0, c0, n).zero_();
      continue;
    }
    at::Tensor hc = hidden.narrow(0, c0, n);
    at::Tensor out = buf.narrow(0, 0, n);
    chunk_logits(out, hc, weight, bias);
    chunk_gradient_rows(out, tg + c0, ignore_index, row_stats.data_ptr<float>() + 4 * c0, go + c0);
    if (need_grad_hidden) {
      at::Tensor ghc = gh.narrow(0, c0, n);
      chunk_grad_hidden(ghc, out, weight);
    }
    if (need_grad_weight) gw.add(out, hc);
    if (need_grad_bias) add_bias_grad(gb, out);
  }
  return {gh, gw.result(wtype), need_grad_bias ? from_float32(gb, wtype) : gb};
}

}  // namespace
}  // namespace uf

TORCH_LIBRARY_FRAGMENT(unlearn_fast_cpu, m) {
  m.def("token_stats_rows_fwd(Tensor logits, Tensor targets, int ignore_index) -> (Tensor, Tensor, Tensor)",
        &uf::rows_fwd_cpu);
  m.def("token_stats_rows_bwd(Tensor grad, Tensor logits, Tensor targets, Tensor row_stats, int ignore_index) -> Tensor",
        &uf::rows_bwd_cpu);
  m.def("token_stats_linear_fwd(Tensor hidden, Tensor weight, Tensor targets, Tensor? bias, int ignore_index, "
        "int chunk_size, Tensor? row_weights, bool grad_hidden, bool grad_weight, bool grad_bias) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
        &uf::linear_fwd_cpu);
  m.def("token_stats_linear_bwd(Tensor grad, Tensor hidden, Tensor weight, Tensor targets, Tensor? bias, Tensor row_stats, "
        "int ignore_index, int chunk_size, bool need_grad_hidden, bool need_grad_weight, bool need_grad_bias) "
        "-> (Tensor, Tensor, Tensor)",
        &uf::linear_bwd_cpu);
}
