// Panel drivers for the similarity-matching losses, shared by the CPU binding
// (csrc/modality.cpp) and the CUDA binding (csrc/cuda/modality.cpp).
//
// S = a b^T / T (Bi x Bt) and R = c d^T / T are never held whole.  Rows are processed in
// panels of `block_rows`: the panel products go through ATen (BLAS / cuBLAS) into two
// reused (block_rows x Bt) float32 buffers, then a device-specific Policy runs the fused
// passes over the panel:
//
//   Policy::kl_rows(sp, rp, row_stats, row0, row_kl)        whole rows: KL and (max, log-sum)
//   Policy::kl_cols_update(sp, rp, col_state)                fold the panel into the running
//                                                            per-column online-softmax states
//   Policy::kl_cols_finalize(col_state, col_stats, col_kl)   column KL and statistics
//   Policy::kl_grad(sp, rp, row_stats, row0, col_stats, gw)  sp <- G = g_row (q - p) + g_col (q' - p')
//   Policy::sq_rows(ep, row0, row_vals)                      row sums of squares of a panel
//   Policy::empty_gradient(sizes, options)                   an uninitialised gradient buffer
//                                                            the panels write in full
//
// (sp, rp: contiguous float32 (n, Bt) panels; statistics: float32 (4, N) structure-of-arrays;
// col_state: float32 (5, Bt); gw: float32 (2,) = (g_row, g_col) on the device, read by the
// kernels, so no host synchronisation is needed.)  Everything else is ATen, identical on
// both devices.  Inputs arrive in their own dtype and are converted to float32 once.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <tuple>

namespace uf {
namespace panels {

inline at::Tensor as_f32(const at::Tensor& x) { return x.to(at::kFloat).contiguous(); }

inline void check_inputs(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, const at::Tensor& d,
                         const char* fn) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && c.sizes() == a.sizes() && d.sizes() == b.sizes() &&
                  a.size(1) == b.size(1),
              fn, ": expected a, c of shape (Bi, D) and b, d of shape (Bt, D)");
  TORCH_CHECK(a.scalar_type() == b.scalar_type() && a.scalar_type() == c.scalar_type() &&
                  a.scalar_type() == d.scalar_type(),
              fn, ": inputs must share one dtype");
  TORCH_CHECK(a.device() == b.device() && a.device() == c.device() && a.device() == d.device(), fn,
              ": inputs must share one device");
}

inline at::Tensor empty_f32(const at::Tensor& like) { return at::empty({0}, like.options().dtype(at::kFloat)); }

// (x, y) as a float32 (2,) tensor made on the device itself (fills, no host-to-device copy).
inline at::Tensor two_floats(double x, double y, const at::TensorOptions& f) {
  at::Tensor out = at::empty({2}, f);
  out.narrow(0, 0, 1).fill_(x);
  out.narrow(0, 1, 1).fill_(y);
  return out;
}

// out = alpha * x @ y^T  (out: a (n, Bt) panel buffer; beta = 0 ignores its old contents)
inline void panel_product(at::Tensor& out, const at::Tensor& x, const at::Tensor& y, double alpha) {
  at::addmm_out(out, out, x, y.t(), /*beta=*/0.0, /*alpha=*/alpha);
}

// Gradient products of one panel G (n x Bt) for rows [i0, i0 + n): ga[i0:] = G @ b,
// gb += G^T @ a[i0:] (the first panel, i0 = 0, initialises gb: no zero fill needed), each
// scaled by alpha.
inline void panel_gradients(const at::Tensor& g, const at::Tensor& a, const at::Tensor& b, int64_t i0, int64_t n,
                            at::Tensor& ga, at::Tensor& gb, double alpha) {
  if (ga.numel()) {
    at::Tensor out = ga.narrow(0, i0, n);
    at::addmm_out(out, out, g, b, 0.0, alpha);
  }
  if (gb.numel()) gb.addmm_(g.t(), a.narrow(0, i0, n), i0 == 0 ? 0.0 : 1.0, alpha);
}

template <class Policy>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> kl_forward(
    const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& c_in, const at::Tensor& d_in,
    double inv_t, double w_row, double w_col, int64_t block_rows, bool grad_in_forward) {
  check_inputs(a_in, b_in, c_in, d_in, "similarity_kl_fwd");
  const at::Tensor a = as_f32(a_in), b = as_f32(b_in), c = as_f32(c_in), d = as_f32(d_in);
  const int64_t bi = a.size(0), bt = b.size(0), dim = a.size(1);
  const auto f = a.options();
  const bool rows = w_row != 0.0, cols = w_col != 0.0;
  const int64_t R = std::max<int64_t>(1, std::min(block_rows, bi));
  TORCH_CHECK(!grad_in_forward || !cols || R >= bi,
              "similarity_kl_fwd: the gradient can be formed in the forward pass only with complete column "
              "statistics (one panel) or without the column direction");
  // statistics of a direction that is not used are returned as zeros; the others are written whole
  at::Tensor row_stats = rows ? at::empty({4, bi}, f) : at::zeros({4, bi}, f);
  at::Tensor col_stats = cols ? at::empty({4, bt}, f) : at::zeros({4, bt}, f);
  at::Tensor row_kl = rows ? at::empty({bi}, f) : at::zeros({bi}, f);
  at::Tensor col_kl = cols ? at::empty({bt}, f) : at::zeros({bt}, f);
  at::Tensor col_state = cols ? Policy::new_col_state(bt, f) : at::Tensor();
  at::Tensor ga = grad_in_forward ? Policy::empty_gradient({bi, dim}, f) : empty_f32(a);
  at::Tensor gb = grad_in_forward ? Policy::empty_gradient({bt, dim}, f) : empty_f32(a);
  at::Tensor gw = two_floats(w_row * inv_t, w_col * inv_t, f);
  at::Tensor sbuf = at::empty({R, bt}, f), rbuf = at::empty({R, bt}, f);  // beta = 0 products overwrite
  for (int64_t i0 = 0; i0 < bi; i0 += R) {
    const int64_t n = std::min(R, bi - i0);
    at::Tensor sp = sbuf.narrow(0, 0, n), rp = rbuf.narrow(0, 0, n);
    panel_product(sp, a.narrow(0, i0, n), b, inv_t);
    panel_product(rp, c.narrow(0, i0, n), d, inv_t);
    if (rows) Policy::kl_rows(sp, rp, row_stats, i0, row_kl);
    if (cols) Policy::kl_cols_update(sp, rp, col_state);
    if (grad_in_forward) {
      if (cols) Policy::kl_cols_finalize(col_state, col_stats, col_kl);  // one panel: complete
      Policy::kl_grad(sp, rp, rows ? row_stats : at::Tensor(), i0, cols ? col_stats : at::Tensor(), gw);
      panel_gradients(sp, a, b, i0, n, ga, gb, 1.0);
    }
  }
  if (cols && !grad_in_forward) Policy::kl_cols_finalize(col_state, col_stats, col_kl);
  at::Tensor loss = row_kl.sum(at::kDouble).mul(w_row).add(col_kl.sum(at::kDouble).mul(w_col)).to(at::kFloat);
  return {loss, row_stats, col_stats, ga, gb};
}

template <class Policy>
std::tuple<at::Tensor, at::Tensor> kl_backward(const at::Tensor& grad_loss, const at::Tensor& a_in,
                                               const at::Tensor& b_in, const at::Tensor& c_in, const at::Tensor& d_in,
                                               const at::Tensor& row_stats, const at::Tensor& col_stats, double inv_t,
                                               double w_row, double w_col, int64_t block_rows, bool need_a,
                                               bool need_b) {
  check_inputs(a_in, b_in, c_in, d_in, "similarity_kl_bwd");
  const at::Tensor a = as_f32(a_in), b = as_f32(b_in), c = as_f32(c_in), d = as_f32(d_in);
  const int64_t bi = a.size(0), bt = b.size(0), dim = a.size(1);
  TORCH_CHECK(row_stats.scalar_type() == at::kFloat && row_stats.is_contiguous() && row_stats.numel() == 4 * bi &&
                  col_stats.scalar_type() == at::kFloat && col_stats.is_contiguous() && col_stats.numel() == 4 * bt,
              "similarity_kl_bwd: statistics must be contiguous float32 (4, Bi) and (4, Bt)");
  const auto f = a.options();
  const bool rows = w_row != 0.0, cols = w_col != 0.0;
  const int64_t R = std::max<int64_t>(1, std::min(block_rows, bi));
  at::Tensor ga = need_a ? Policy::empty_gradient({bi, dim}, f) : empty_f32(a);
  at::Tensor gb = need_b ? Policy::empty_gradient({bt, dim}, f) : empty_f32(a);
  at::Tensor gw = grad_loss.to(at::kFloat).reshape({1}) * two_floats(w_row * inv_t, w_col * inv_t, f);
  at::Tensor sbuf = at::empty({R, bt}, f), rbuf = at::empty({R, bt}, f);  // beta = 0 products overwrite
  for (int64_t i0 = 0; i0 < bi && (need_a || need_b); i0 += R) {
    const int64_t n = std::min(R, bi - i0);
    at::Tensor sp = sbuf.narrow(0, 0, n), rp = rbuf.narrow(0, 0, n);
    panel_product(sp, a.narrow(0, i0, n), b, inv_t);
    panel_product(rp, c.narrow(0, i0, n), d, inv_t);
    Policy::kl_grad(sp, rp, rows ? row_stats : at::Tensor(), i0, cols ? col_stats : at::Tensor(), gw);
    panel_gradients(sp, a, b, i0, n, ga, gb, 1.0);
  }
  return {ga, gb};
}

// ||a b^T - c d^T||_F^2 panel by panel; with want_grad also its gradients
// 2 E b and 2 E^T a (E = a b^T - c d^T), formed while each panel of E is at hand.
template <class Policy>
std::tuple<at::Tensor, at::Tensor, at::Tensor> sq_forward(const at::Tensor& a_in, const at::Tensor& b_in,
                                                          const at::Tensor& c_in, const at::Tensor& d_in,
                                                          int64_t block_rows, bool want_grad) {
  check_inputs(a_in, b_in, c_in, d_in, "similarity_sqdiff_fwd");
  const at::Tensor a = as_f32(a_in), b = as_f32(b_in), c = as_f32(c_in), d = as_f32(d_in);
  const int64_t bi = a.size(0), bt = b.size(0), dim = a.size(1);
  const auto f = a.options();
  const int64_t R = std::max<int64_t>(1, std::min(block_rows, bi));
  at::Tensor row_vals = at::empty({bi}, f);
  at::Tensor ga = want_grad ? Policy::empty_gradient({bi, dim}, f) : empty_f32(a);
  at::Tensor gb = want_grad ? Policy::empty_gradient({bt, dim}, f) : empty_f32(a);
  at::Tensor ebuf = at::empty({R, bt}, f);
  for (int64_t i0 = 0; i0 < bi; i0 += R) {
    const int64_t n = std::min(R, bi - i0);
    at::Tensor ep = ebuf.narrow(0, 0, n);
    panel_product(ep, a.narrow(0, i0, n), b, 1.0);
    ep.addmm_(c.narrow(0, i0, n), d.t(), 1.0, -1.0);  // E = a b^T - c d^T
    Policy::sq_rows(ep, i0, row_vals);
    if (want_grad) panel_gradients(ep, a, b, i0, n, ga, gb, 2.0);
  }
  return {row_vals.sum(at::kDouble).to(at::kFloat), ga, gb};
}

// Gram identity: ||a b^T - c d^T||^2 = <a^T a, b^T b> - 2 <a^T c, b^T d> + <c^T c, d^T d>.
// Returns the value and the Grams [a^T a, b^T b, a^T c, b^T d] the gradient needs.
inline std::tuple<at::Tensor, at::Tensor> gram_forward(const at::Tensor& a_in, const at::Tensor& b_in,
                                                       const at::Tensor& c_in, const at::Tensor& d_in) {
  check_inputs(a_in, b_in, c_in, d_in, "similarity_gram_fwd");
  const at::Tensor a = as_f32(a_in), b = as_f32(b_in), c = as_f32(c_in), d = as_f32(d_in);
  const int64_t dim = a.size(1);
  at::Tensor grams = at::empty({4, dim, dim}, a.options());
  at::Tensor aa = grams[0], bb = grams[1], ac = grams[2], bd = grams[3];
  at::mm_out(aa, a.t(), a);
  at::mm_out(bb, b.t(), b);
  at::mm_out(ac, a.t(), c);
  at::mm_out(bd, b.t(), d);
  const at::Tensor cc = at::mm(c.t(), c), dd = at::mm(d.t(), d);
  auto frob = [](const at::Tensor& x, const at::Tensor& y) { return at::dot(x.reshape(-1), y.reshape(-1)).to(at::kDouble); };
  at::Tensor value = frob(aa, bb) - 2.0 * frob(ac, bd) + frob(cc, dd);
  return {value.to(at::kFloat), grams};
}

// d/da = 2 g (a (b^T b) - c (b^T d)^T),  d/db = 2 g (b (a^T a) - d (a^T c)^T)
inline std::tuple<at::Tensor, at::Tensor> gram_backward(const at::Tensor& grad, const at::Tensor& a_in,
                                                        const at::Tensor& b_in, const at::Tensor& c_in,
                                                        const at::Tensor& d_in, const at::Tensor& grams, bool need_a,
                                                        bool need_b) {
  check_inputs(a_in, b_in, c_in, d_in, "similarity_gram_bwd");
  const int64_t dim = a_in.size(1);
  TORCH_CHECK(grams.scalar_type() == at::kFloat && grams.dim() == 3 && grams.size(0) == 4 && grams.size(1) == dim &&
                  grams.size(2) == dim,
              "similarity_gram_bwd: grams must be float32 (4, D, D)");
  const at::Tensor two_g = grad.to(at::kFloat).reshape({}) * 2.0;
  auto side = [&](const at::Tensor& x_in, const at::Tensor& y_in, const at::Tensor& gxx, const at::Tensor& gcross) {
    const at::Tensor x = as_f32(x_in), y = as_f32(y_in);
    at::Tensor out = at::mm(x, gxx);
    out.addmm_(y, gcross.t(), 1.0, -1.0);
    return out.mul_(two_g);
  };
  at::Tensor ga = need_a ? side(a_in, c_in, grams[1], grams[3]) : empty_f32(a_in);
  at::Tensor gb = need_b ? side(b_in, d_in, grams[0], grams[2]) : empty_f32(a_in);
  return {ga, gb};
}

}  // namespace panels
}  // namespace uf
