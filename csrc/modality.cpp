// Torch bindings of the CPU modality-decoupling kernels (csrc/cpu/modality.h).
//
// torch.ops.unlearn_fast_cpu.modality_decoupling_{fwd,bwd}
//     Three (student, reference) pairs of (N_k, D_k) embeddings in one parallel loop: the
//     work items are blocks of rows of all three pairs together, so a small pair does not
//     leave threads idle.  Forward: per pair, the sum of (s - r)^2 over elements or of
//     1 - cos over rows (float32 rows, double block partials summed in a fixed order:
//     deterministic for any thread count), times the pair's scale (1 / count for a mean),
//     and the weighted total: (4,) = (L_MD, L_multi, L_uni, total).  Backward: the
//     gradient rows, scaled by (grad[k] + weight[k] grad[3]) scale[k], in the student's dtype.
// torch.ops.unlearn_fast_cpu.similarity_{kl,sqdiff,gram}_*
//     The panel drivers of csrc/modality_panels.h with the CPU passes below (OpenMP via
//     at::parallel_for, `omp simd` rows).
#include "common.h"
#include "cpu/modality.h"
#include "modality_panels.h"

namespace uf {
namespace {

// ---------------------------------------------------------------------------------------
// Modality decoupling (multi-tensor)
// ---------------------------------------------------------------------------------------
constexpr int64_t kElementsPerItem = 16384;

struct WorkItem {
  int pair;
  int64_t row_begin, row_end;
};

std::vector<WorkItem> work_items(const at::Tensor* students, const bool* include) {
  std::vector<WorkItem> items;
  for (int k = 0; k < 3; ++k) {
    if (!include[k]) continue;
    const int64_t rows = students[k].size(0), dim = students[k].size(1);
    const int64_t per = std::max<int64_t>(1, kElementsPerItem / std::max<int64_t>(dim, 1));
    for (int64_t r0 = 0; r0 < rows; r0 += per) items.push_back({k, r0, std::min(rows, r0 + per)});
  }
  return items;
}

void check_pairs(const at::Tensor* s, const at::Tensor* r, const char* fn) {
  for (int k = 0; k < 3; ++k) {
    TORCH_CHECK(s[k].dim() == 2 && s[k].sizes() == r[k].sizes() && s[k].is_contiguous() && r[k].is_contiguous(), fn,
                ": pair ", k, " must be two contiguous (N, D) tensors of one shape");
    TORCH_CHECK(s[k].scalar_type() == s[0].scalar_type() && r[k].scalar_type() == s[0].scalar_type(), fn,
                ": all six tensors must share one dtype");
    TORCH_CHECK(s[k].device().is_cpu() && r[k].device().is_cpu(), fn, ": CPU tensors expected");
  }
}

template <typename scalar_t>
void md_forward_impl(const at::Tensor* s, const at::Tensor* r, bool cosine, double* total) {
  const bool all[3] = {true, true, true};
  const std::vector<WorkItem> items = work_items(s, all);
  std::vector<double> partial(items.size(), 0.0);
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> sbuf, rbuf;
    for (int64_t it = begin; it < end; ++it) {
      const WorkItem& w = items[it];
      const int64_t dim = s[w.pair].size(1);
      if (!std::is_same<scalar_t, float>::value) {
        sbuf.resize(dim);
        rbuf.resize(dim);
      }
      const scalar_t* sp = s[w.pair].data_ptr<scalar_t>();
      const scalar_t* rp = r[w.pair].data_ptr<scalar_t>();
      double acc = 0.0;
      for (int64_t row = w.row_begin; row < w.row_end; ++row) {
        const float* sr = row_as_float(sp + row * dim, dim, sbuf.data());
        const float* rr = row_as_float(rp + row * dim, dim, rbuf.data());
        acc += cosine ? cosine_distance_row(sr, rr, dim) : sq_diff_row(sr, rr, dim);
      }
      partial[it] = acc;
    }
  });
  for (size_t it = 0; it < items.size(); ++it) total[items[it].pair] += partial[it];
}

void check_coefficients(at::ArrayRef<double> scales, at::ArrayRef<double> weights, const char* fn) {
  TORCH_CHECK(scales.size() == 3 && weights.size() == 3, fn, ": expected three scales and three weights");
}

// (L_MD, L_multi, L_uni, weighted total): term k = scales[k] * (pair k's sum)
at::Tensor md_fwd_cpu(const at::Tensor& s0, const at::Tensor& r0, const at::Tensor& s1, const at::Tensor& r1,
                      const at::Tensor& s2, const at::Tensor& r2, bool cosine, at::ArrayRef<double> scales,
                      at::ArrayRef<double> weights) {
  const at::Tensor s[3] = {s0, s1, s2}, r[3] = {r0, r1, r2};
  check_pairs(s, r, "modality_decoupling_fwd");
  check_coefficients(scales, weights, "modality_decoupling_fwd");
  double sums[3] = {0.0, 0.0, 0.0};
  UF_DISPATCH_FLOAT(s0.scalar_type(), "modality_decoupling_fwd", [&] { md_forward_impl<scalar_t>(s, r, cosine, sums); });
  at::Tensor out = at::empty({4}, s0.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  double total = 0.0;
  for (int k = 0; k < 3; ++k) {
    const double term = scales[k] * sums[k];
    o[k] = static_cast<float>(term);
    total += weights[k] * term;
  }
  o[3] = static_cast<float>(total);
  return out;
}

template <typename scalar_t>
void md_backward_impl(const float* go, const at::Tensor* s, const at::Tensor* r, bool cosine, const bool* need,
                      at::Tensor* grads) {
  const std::vector<WorkItem> items = work_items(s, need);
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> sbuf, rbuf, gbuf;
    for (int64_t it = begin; it < end; ++it) {
      const WorkItem& w = items[it];
      const int64_t dim = s[w.pair].size(1);
      if (!std::is_same<scalar_t, float>::value) {
        sbuf.resize(dim);
        rbuf.resize(dim);
        gbuf.resize(dim);
      }
      const scalar_t* sp = s[w.pair].data_ptr<scalar_t>();
      const scalar_t* rp = r[w.pair].data_ptr<scalar_t>();
      scalar_t* gp = grads[w.pair].data_ptr<scalar_t>();
      const float g = go[w.pair];
      for (int64_t row = w.row_begin; row < w.row_end; ++row) {
        const float* sr = row_as_float(sp + row * dim, dim, sbuf.data());
        const float* rr = row_as_float(rp + row * dim, dim, rbuf.data());
        float* out = std::is_same<scalar_t, float>::value ? reinterpret_cast<float*>(gp + row * dim) : gbuf.data();
        if (cosine) {
          cosine_distance_row_grad(sr, rr, dim, g, out);
        } else {
          sq_diff_row_grad(sr, rr, dim, g, out);
        }
        if (!std::is_same<scalar_t, float>::value) store_row(out, dim, gp + row * dim);
      }
    }
  });
}

// Gradient rows of pair k scaled by (grad[k] + weights[k] grad[3]) scales[k].
std::tuple<at::Tensor, at::Tensor, at::Tensor> md_bwd_cpu(const at::Tensor& grad, const at::Tensor& s0,
                                                          const at::Tensor& r0, const at::Tensor& s1,
                                                          const at::Tensor& r1, const at::Tensor& s2,
                                                          const at::Tensor& r2, bool cosine,
                                                          at::ArrayRef<double> scales, at::ArrayRef<double> weights,
                                                          bool need0, bool need1, bool need2) {
  const at::Tensor s[3] = {s0, s1, s2}, r[3] = {r0, r1, r2};
  check_pairs(s, r, "modality_decoupling_bwd");
  check_coefficients(scales, weights, "modality_decoupling_bwd");
  TORCH_CHECK(grad.scalar_type() == at::kFloat && grad.is_contiguous() && grad.numel() == 4 && grad.device().is_cpu(),
              "modality_decoupling_bwd: grad must be a contiguous float32 (4,) CPU tensor");
  const float* g = grad.data_ptr<float>();
  float go[3];
  for (int k = 0; k < 3; ++k) go[k] = static_cast<float>((g[k] + weights[k] * g[3]) * scales[k]);
  const bool need[3] = {need0, need1, need2};
  at::Tensor grads[3];
  for (int k = 0; k < 3; ++k) {
    grads[k] = need[k] ? empty_for_full_write(s[k].sizes(), s[k].options()) : at::empty({0}, s[k].options());
  }
  UF_DISPATCH_FLOAT(s0.scalar_type(), "modality_decoupling_bwd",
                    [&] { md_backward_impl<scalar_t>(go, s, r, cosine, need, grads); });
  return {grads[0], grads[1], grads[2]};
}

// ---------------------------------------------------------------------------------------
// Similarity panels: the CPU policy for csrc/modality_panels.h
// ---------------------------------------------------------------------------------------
constexpr int64_t kColumnChunk = 256;

struct CpuPolicy {
  // a gradient the panels write in full (common.h: huge pages, fewer first-touch faults)
  static at::Tensor empty_gradient(at::IntArrayRef sizes, const at::TensorOptions& f) {
    return empty_for_full_write(sizes, f);
  }

  static at::Tensor new_col_state(int64_t bt, const at::TensorOptions& f) {
    at::Tensor st = at::empty({5, bt}, f);
    column_states_init(states(st), bt);
    return st;
  }

  static ColumnStates states(at::Tensor& st) {
    float* p = st.data_ptr<float>();
    const int64_t bt = st.size(1);
    return {p, p + bt, p + 2 * bt, p + 3 * bt, p + 4 * bt};
  }

  static void kl_rows(const at::Tensor& sp, const at::Tensor& rp, at::Tensor& row_stats, int64_t row0,
                      at::Tensor& row_kl) {
    const int64_t n = sp.size(0), bt = sp.size(1), bi = row_stats.size(1);
    const float* s = sp.data_ptr<float>();
    const float* r = rp.data_ptr<float>();
    float* st = row_stats.data_ptr<float>();
    float* kl = row_kl.data_ptr<float>();
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const SimRowResult res = sim_kl_row(s + i * bt, r + i * bt, bt);
        const int64_t row = row0 + i;
        st[row] = res.max_s;
        st[bi + row] = res.log_sum_s;
        st[2 * bi + row] = res.max_r;
        st[3 * bi + row] = res.log_sum_r;
        kl[row] = res.kl;
      }
    });
  }

  static void kl_cols_update(const at::Tensor& sp, const at::Tensor& rp, at::Tensor& col_state) {
    const int64_t n = sp.size(0), bt = sp.size(1);
    const float* s = sp.data_ptr<float>();
    const float* r = rp.data_ptr<float>();
    const ColumnStates st = states(col_state);
    const int64_t chunks = (bt + kColumnChunk - 1) / kColumnChunk;
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scratch(5 * kColumnChunk);
      for (int64_t ch = begin; ch < end; ++ch) {
        const int64_t j0 = ch * kColumnChunk, j1 = std::min(bt, j0 + kColumnChunk);
        sim_kl_columns_update(s, r, n, bt, j0, j1, st, scratch.data());
      }
    });
  }

  static void kl_cols_finalize(at::Tensor& col_state, at::Tensor& col_stats, at::Tensor& col_kl) {
    const int64_t bt = col_state.size(1);
    const ColumnStates st = states(col_state);
    float* out = col_stats.data_ptr<float>();
    float* kl = col_kl.data_ptr<float>();
    for (int64_t j = 0; j < bt; ++j) {
      const float lss = std::log(st.ss[j]), lsr = std::log(st.sr[j]);
      out[j] = st.ms[j];
      out[bt + j] = lss;
      out[2 * bt + j] = st.mr[j];
      out[3 * bt + j] = lsr;
      kl[j] = st.w[j] / st.sr[j] + lss - lsr;
    }
  }

  static void kl_grad(at::Tensor& sp, const at::Tensor& rp, const at::Tensor& row_stats, int64_t row0,
                      const at::Tensor& col_stats, const at::Tensor& gw) {
    const int64_t n = sp.size(0), bt = sp.size(1);
    float* s = sp.data_ptr<float>();
    const float* r = rp.data_ptr<float>();
    const float g_row = gw.data_ptr<float>()[0], g_col = gw.data_ptr<float>()[1];
    const float* rs = row_stats.defined() ? row_stats.data_ptr<float>() : nullptr;
    const int64_t ld_row = row_stats.defined() ? row_stats.size(1) : 0;
    const float* cs = col_stats.defined() ? col_stats.data_ptr<float>() : nullptr;
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        sim_kl_grad_row(s + i * bt, r + i * bt, bt, rs ? rs + row0 + i : nullptr, ld_row, g_row, cs, bt, g_col);
      }
    });
  }

  static void sq_rows(const at::Tensor& ep, int64_t row0, at::Tensor& row_vals) {
    const int64_t n = ep.size(0), bt = ep.size(1);
    const float* e = ep.data_ptr<float>();
    float* out = row_vals.data_ptr<float>();
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) out[row0 + i] = sq_sum_row(e + i * bt, bt);
    });
  }
};

void check_cpu(const at::Tensor& a, const char* fn) { TORCH_CHECK(a.device().is_cpu(), fn, ": CPU tensors expected"); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> kl_fwd_cpu(
    const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, const at::Tensor& d, double inv_t, double w_row,
    double w_col, int64_t block_rows, bool grad_in_forward) {
  check_cpu(a, "similarity_kl_fwd");
  return panels::kl_forward<CpuPolicy>(a, b, c, d, inv_t, w_row, w_col, block_rows, grad_in_forward);
}

std::tuple<at::Tensor, at::Tensor> kl_bwd_cpu(const at::Tensor& grad, const at::Tensor& a, const at::Tensor& b,
                                              const at::Tensor& c, const at::Tensor& d, const at::Tensor& row_stats,
                                              const at::Tensor& col_stats, double inv_t, double w_row, double w_col,
                                              int64_t block_rows, bool need_a, bool need_b) {
  check_cpu(a, "similarity_kl_bwd");
  return panels::kl_backward<CpuPolicy>(grad, a, b, c, d, row_stats, col_stats, inv_t, w_row, w_col, block_rows,
                                        need_a, need_b);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sq_fwd_cpu(const at::Tensor& a, const at::Tensor& b,
                                                          const at::Tensor& c, const at::Tensor& d, int64_t block_rows,
                                                          bool want_grad) {
  check_cpu(a, "similarity_sqdiff_fwd");
  return panels::sq_forward<CpuPolicy>(a, b, c, d, block_rows, want_grad);
}

std::tuple<at::Tensor, at::Tensor> gram_fwd_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c,
                                                const at::Tensor& d) {
  check_cpu(a, "similarity_gram_fwd");
  return panels::gram_forward(a, b, c, d);
}

std::tuple<at::Tensor, at::Tensor> gram_bwd_cpu(const at::Tensor& grad, const at::Tensor& a, const at::Tensor& b,
                                                const at::Tensor& c, const at::Tensor& d, const at::Tensor& grams,
                                                bool need_a, bool need_b) {
  check_cpu(a, "similarity_gram_bwd");
  return panels::gram_backward(grad, a, b, c, d, grams, need_a, need_b);
}

}  // namespace
}  // namespace uf

TORCH_LIBRARY_FRAGMENT(unlearn_fast_cpu, m) {
  m.def("modality_decoupling_fwd(Tensor s0, Tensor r0, Tensor s1, Tensor r1, Tensor s2, Tensor r2, bool cosine, "
        "float[] scales, float[] weights) -> Tensor",
        &uf::md_fwd_cpu);
  m.def("modality_decoupling_bwd(Tensor grad, Tensor s0, Tensor r0, Tensor s1, Tensor r1, Tensor s2, Tensor r2, "
        "bool cosine, float[] scales, float[] weights, bool need0, bool need1, bool need2) -> (Tensor, Tensor, Tensor)",
        &uf::md_bwd_cpu);
  m.def("similarity_kl_fwd(Tensor a, Tensor b, Tensor c, Tensor d, float inv_t, float w_row, float w_col, "
        "int block_rows, bool grad_in_forward) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
        &uf::kl_fwd_cpu);
  m.def("similarity_kl_bwd(Tensor grad, Tensor a, Tensor b, Tensor c, Tensor d, Tensor row_stats, Tensor col_stats, "
        "float inv_t, float w_row, float w_col, int block_rows, bool need_a, bool need_b) -> (Tensor, Tensor)",
        &uf::kl_bwd_cpu);
  m.def("similarity_sqdiff_fwd(Tensor a, Tensor b, Tensor c, Tensor d, int block_rows, bool want_grad) "
        "-> (Tensor, Tensor, Tensor)",
        &uf::sq_fwd_cpu);
  m.def("similarity_gram_fwd(Tensor a, Tensor b, Tensor c, Tensor d) -> (Tensor, Tensor)", &uf::gram_fwd_cpu);
  m.def("similarity_gram_bwd(Tensor grad, Tensor a, Tensor b, Tensor c, Tensor d, Tensor grams, bool need_a, "
        "bool need_b) -> (Tensor, Tensor)",
        &uf::gram_bwd_cpu);
}
