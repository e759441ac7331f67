// CPU kernel of the fused LayerNorm + GRN of the GSPN mixer (layer_norm_grn_fwd / _bwd; math in
// gspn_norm.h, ATen side in gspn_norm_args.h).
//
// The map is read channels-last, [b][pixel][c], so a pixel's C channels are one contiguous row.  A
// task is a range of pixels of one batch element (gspn_norm.h's pixel_tiles); it writes per-pixel
// values directly and its per-channel sums into its own partial row, and the rows are added in task
// order afterwards, so results do not depend on the number of threads.  Forward: pass 1 (per pixel
// mean and rstd; per channel the sum of z^2), the per-batch GRN step, pass 2 (out).  Backward: pass 1
// (per channel sum dout z and sum dout), the per-batch GRN adjoint, pass 2 (dy; per channel the sums
// for dw and db).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "../gspn_layout.h"
#include "../gspn_norm.h"
#include "../gspn_norm_args.h"

namespace gspn {
namespace {

using norm::grn_scale;
using norm::grn_z_weight;
using norm::ln_input_grad;
using norm::ln_rstd;
using norm::nsqrt;

// At most this many tasks per batch element, of at least this many pixels.
constexpr int64_t kCpuMaxTiles = 64;
constexpr int64_t kCpuMinPixels = 64;

template <typename acc_t, typename param_t>
std::vector<acc_t> to_acc(const at::Tensor& t) {
  const param_t* p = t.const_data_ptr<param_t>();
  return std::vector<acc_t>(p, p + t.numel());
}

// fn(task, b, p0, p1) for every task of the tiling, in parallel.
template <typename Fn>
void for_tiles(const NormArgs& a, const norm::Tiles& t, Fn&& fn) {
  at::parallel_for(0, a.B * t.tiles, parallel_grain(t.tile * a.C), [&](int64_t t0, int64_t t1) {
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / t.tiles, p0 = (task % t.tiles) * t.tile;
      fn(task, b, p0, std::min(a.HW, p0 + t.tile));
    }
  });
}

// Per-channel partial rows (tasks, C) summed in task order over the tiles of batch element b.
template <typename acc_t>
void sum_tiles(const acc_t* part, int64_t b, const norm::Tiles& t, int64_t C, acc_t* out) {
  std::fill(out, out + C, acc_t(0));
  for (int64_t i = 0; i < t.tiles; ++i) {
    const acc_t* row = part + (b * t.tiles + i) * C;
    for (int64_t c = 0; c < C; ++c) out[c] += row[c];
  }
}

template <typename scalar_t, typename param_t>
void norm_forward_cpu(const NormArgs& a, NormOutputs& o) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = a.C;
  const norm::Tiles t = norm::pixel_tiles(a.HW, kCpuMaxTiles, kCpuMinPixels);
  const auto w = to_acc<acc_t, param_t>(a.weight), bb = to_acc<acc_t, param_t>(a.bias),
             gamma = to_acc<acc_t, param_t>(a.gamma), beta = to_acc<acc_t, param_t>(a.beta);
  const scalar_t* y = a.y.const_data_ptr<scalar_t>();
  acc_t* mean = o.mean.mutable_data_ptr<acc_t>();
  acc_t* rstd = o.rstd.mutable_data_ptr<acc_t>();
  const acc_t eps = static_cast<acc_t>(a.eps);
  std::vector<acc_t> q_part(a.B * t.tiles * C, acc_t(0));
  for_tiles(a, t, [&](int64_t task, int64_t b, int64_t p0, int64_t p1) {
    acc_t* __restrict__ q = q_part.data() + task * C;
    const acc_t* __restrict__ wc = w.data();
    const acc_t* __restrict__ bc = bb.data();
    for (int64_t p = p0; p < p1; ++p) {
      const scalar_t* __restrict__ yp = y + (b * a.HW + p) * C;
      acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t c = 0; c < C; ++c) sum += static_cast<acc_t>(yp[c]);
      const acc_t mu = sum / static_cast<acc_t>(C);
      acc_t sq = 0;
#pragma omp simd reduction(+ : sq)
      for (int64_t c = 0; c < C; ++c) {
        const acc_t d = static_cast<acc_t>(yp[c]) - mu;
        sq += d * d;
      }
      const acc_t r = ln_rstd(sq, C, eps);
      mean[b * a.HW + p] = mu;
      rstd[b * a.HW + p] = r;
      for (int64_t c = 0; c < C; ++c) {
        const acc_t z = (static_cast<acc_t>(yp[c]) - mu) * r * wc[c] + bc[c];
        q[c] += z * z;
      }
    }
  });
  // the GRN step per batch element: g, m, the scale s
  acc_t* g = o.gnorm.mutable_data_ptr<acc_t>();
  std::vector<acc_t> s(a.B * C);
  for (int64_t b = 0; b < a.B; ++b) {
    acc_t* gb = g + b * C;
    sum_tiles(q_part.data(), b, t, C, gb);
    acc_t sum = 0;
    for (int64_t c = 0; c < C; ++c) sum += (gb[c] = nsqrt(gb[c]));
    const acc_t inv_m = acc_t(1) / (sum / static_cast<acc_t>(C) + static_cast<acc_t>(a.grn_eps));
    for (int64_t c = 0; c < C; ++c) s[b * C + c] = grn_scale(gb[c], inv_m, gamma[c]);
  }
  scalar_t* out = o.out.mutable_data_ptr<scalar_t>();
  for_tiles(a, t, [&](int64_t, int64_t b, int64_t p0, int64_t p1) {
    const acc_t* __restrict__ sb = s.data() + b * C;
    const acc_t* __restrict__ wc = w.data();
    const acc_t* __restrict__ bc = bb.data();
    const acc_t* __restrict__ be = beta.data();
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t i = b * a.HW + p;
      const scalar_t* __restrict__ yp = y + i * C;
      scalar_t* __restrict__ op = out + i * C;
      const acc_t mu = mean[i], r = rstd[i];
      for (int64_t c = 0; c < C; ++c) {
        const acc_t z = (static_cast<acc_t>(yp[c]) - mu) * r * wc[c] + bc[c];
        op[c] = static_cast<scalar_t>(z * sb[c] + be[c]);
      }
    }
  });
}

template <typename scalar_t, typename param_t>
NormGrads norm_backward_cpu(const NormArgs& a, const at::Tensor& grad, const at::Tensor& mean_t,
                            const at::Tensor& rstd_t, const at::Tensor& gnorm) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = a.C;
  const norm::Tiles t = norm::pixel_tiles(a.HW, kCpuMaxTiles, kCpuMinPixels);
  const int64_t tasks = a.B * t.tiles;
  const auto w = to_acc<acc_t, param_t>(a.weight), bb = to_acc<acc_t, param_t>(a.bias),
             gamma = to_acc<acc_t, param_t>(a.gamma);
  const scalar_t* y = a.y.const_data_ptr<scalar_t>();
  const at::Tensor go_t = grad.contiguous(at::MemoryFormat::ChannelsLast);
  const scalar_t* go = go_t.const_data_ptr<scalar_t>();
  const acc_t* mean = mean_t.const_data_ptr<acc_t>();
  const acc_t* rstd = rstd_t.const_data_ptr<acc_t>();
  const acc_t* g = gnorm.const_data_ptr<acc_t>();
  // pass 1: per channel sum dout z (ds) and sum dout (dbeta)
  const auto acc_opts = a.y.options().dtype(at::toOpMathType(a.y.scalar_type()));
  at::Tensor part1 = at::zeros({tasks, 2, C}, acc_opts);
  acc_t* p1 = part1.mutable_data_ptr<acc_t>();
  for_tiles(a, t, [&](int64_t task, int64_t b, int64_t q0, int64_t q1) {
    acc_t* __restrict__ ds = p1 + task * 2 * C;
    acc_t* __restrict__ db = ds + C;
    const acc_t* __restrict__ wc = w.data();
    const acc_t* __restrict__ bc = bb.data();
    for (int64_t p = q0; p < q1; ++p) {
      const int64_t i = b * a.HW + p;
      const scalar_t* __restrict__ yp = y + i * C;
      const scalar_t* __restrict__ gp = go + i * C;
      const acc_t mu = mean[i], r = rstd[i];
      for (int64_t c = 0; c < C; ++c) {
        const acc_t z = (static_cast<acc_t>(yp[c]) - mu) * r * wc[c] + bc[c];
        const acc_t d = static_cast<acc_t>(gp[c]);
        ds[c] += d * z;
        db[c] += d;
      }
    }
  });
  // the GRN adjoint per batch element: s, t (the weight of z in dz) and dgamma's rows
  std::vector<acc_t> st(a.B * 2 * C), ds(C);
  at::Tensor dgamma_part = at::empty({a.B, C}, acc_opts);
  acc_t* dgp = dgamma_part.mutable_data_ptr<acc_t>();
  for (int64_t b = 0; b < a.B; ++b) {
    std::fill(ds.begin(), ds.end(), acc_t(0));
    for (int64_t i = 0; i < t.tiles; ++i) {
      const acc_t* row = p1 + (b * t.tiles + i) * 2 * C;
      for (int64_t c = 0; c < C; ++c) ds[c] += row[c];
    }
    const acc_t* gb = g + b * C;
    acc_t sum = 0;
    for (int64_t c = 0; c < C; ++c) sum += gb[c];
    const acc_t inv_m = acc_t(1) / (sum / static_cast<acc_t>(C) + static_cast<acc_t>(a.grn_eps));
    acc_t dnn = 0;
    for (int64_t c = 0; c < C; ++c) dnn += ds[c] * gamma[c] * gb[c] * inv_m;
    const acc_t mean_dnn = dnn / static_cast<acc_t>(C);
    for (int64_t c = 0; c < C; ++c) {
      dgp[b * C + c] = ds[c] * gb[c] * inv_m;
      st[b * 2 * C + c] = grn_scale(gb[c], inv_m, gamma[c]);
      st[b * 2 * C + C + c] = grn_z_weight(ds[c] * gamma[c], mean_dnn, gb[c], inv_m);
    }
  }
  // pass 2: dy, and per channel sum dz zhat (dw) and sum dz (db)
  at::Tensor dy = at::empty(a.y.sizes(), a.y.options().memory_format(at::MemoryFormat::ChannelsLast));
  scalar_t* dyp = dy.mutable_data_ptr<scalar_t>();
  at::Tensor part2 = at::zeros({tasks, 2, C}, acc_opts);
  acc_t* p2 = part2.mutable_data_ptr<acc_t>();
  for_tiles(a, t, [&](int64_t task, int64_t b, int64_t q0, int64_t q1) {
    acc_t* __restrict__ dw = p2 + task * 2 * C;
    acc_t* __restrict__ db = dw + C;
    const acc_t* __restrict__ sb = st.data() + b * 2 * C;
    const acc_t* __restrict__ tb = sb + C;
    const acc_t* __restrict__ wc = w.data();
    const acc_t* __restrict__ bc = bb.data();
    std::vector<acc_t> zhat_v(C), dzhat_v(C);
    acc_t* __restrict__ zhat = zhat_v.data();
    acc_t* __restrict__ dzhat = dzhat_v.data();
    for (int64_t p = q0; p < q1; ++p) {
      const int64_t i = b * a.HW + p;
      const scalar_t* __restrict__ yp = y + i * C;
      const scalar_t* __restrict__ gp = go + i * C;
      const acc_t mu = mean[i], r = rstd[i];
      acc_t m1 = 0, m2 = 0;
#pragma omp simd reduction(+ : m1, m2)
      for (int64_t c = 0; c < C; ++c) {
        const acc_t zh = (static_cast<acc_t>(yp[c]) - mu) * r;
        const acc_t dz = static_cast<acc_t>(gp[c]) * sb[c] + (zh * wc[c] + bc[c]) * tb[c];
        const acc_t dzh = dz * wc[c];
        dw[c] += dz * zh;
        db[c] += dz;
        m1 += dzh;
        m2 += dzh * zh;
        zhat[c] = zh;
        dzhat[c] = dzh;
      }
      m1 /= static_cast<acc_t>(C);
      m2 /= static_cast<acc_t>(C);
      scalar_t* __restrict__ dp = dyp + i * C;
      for (int64_t c = 0; c < C; ++c) dp[c] = static_cast<scalar_t>(ln_input_grad(dzhat[c], zhat[c], r, m1, m2));
    }
  });
  return {dy, param_grad(part2.select(1, 0), a), param_grad(part2.select(1, 1), a), param_grad(dgamma_part, a),
          param_grad(part1.select(1, 1), a)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_grn_fwd_cpu(
    const at::Tensor& y, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& gamma,
    const at::Tensor& beta, double eps, double grn_eps) {
  const NormArgs a = norm_args(y, weight, bias, gamma, beta, eps, grn_eps, "gspn layer_norm_grn_fwd");
  NormOutputs o = norm_outputs(a);
  if (a.y.numel() == 0) {
    o.gnorm.zero_();
  } else {
    dispatch_norm(a, [&](auto s, auto p) {
      norm_forward_cpu<decltype(s), decltype(p)>(a, o);
    });
  }
  return {o.out, o.mean, o.rstd, o.gnorm};
}

NormGrads layer_norm_grn_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& y, const at::Tensor& weight,
                                 const at::Tensor& bias, const at::Tensor& gamma, const at::Tensor& beta,
                                 const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& gnorm,
                                 double grn_eps) {
  const NormArgs a = norm_args(y, weight, bias, gamma, beta, 0.0, grn_eps, "gspn layer_norm_grn_bwd");
  check_saved(a, grad_out, mean, rstd, gnorm, "gspn layer_norm_grn_bwd");
  if (a.y.numel() == 0) return empty_norm_grads(a);
  NormGrads grads;
  dispatch_norm(a, [&](auto s, auto p) {
    grads = norm_backward_cpu<decltype(s), decltype(p)>(a, grad_out, mean, rstd, gnorm);
  });
  return grads;
}

}  // namespace
}  // namespace gspn

TORCH_LIBRARY_IMPL(gspn_lightning, CPU, m) {
  m.impl("layer_norm_grn_fwd", &gspn::layer_norm_grn_fwd_cpu);
  m.impl("layer_norm_grn_bwd", &gspn::layer_norm_grn_bwd_cpu);
}
