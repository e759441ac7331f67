// The GSPN line-scan recurrence: the single source of its math, shared by the CPU and CUDA kernels.
//
// A scan walks over L lines of length M.  Line s of the output takes the input at each position j
// plus three neighbours of the previous line in scan order, at line offsets -1, 0, +1, weighted by
// gates stored at the receiving pixel:
//
//     h_s[j] = lam_s[j] x_s[j] + wn_s[j] h_p[j-1] + wm_s[j] h_p[j] + wp_s[j] h_p[j+1]
//
// Neighbours outside the line are 0, and a line that starts a group (chunk) in scan order has no
// recurrence term.  Reverse-mode, with g = dL/dh and a = the total adjoint of h:
//
//     a_s[j]   = g_s[j] + wn_n[j+1] a_n[j+1] + wm_n[j] a_n[j] + wp_n[j-1] a_n[j-1]   (n: next line)
//     dx_s     = lam_s a_s,   dlam_s = x_s a_s,
//     dwn_s[j] = a_s[j] h_p[j-1],   dwm_s[j] = a_s[j] h_p[j],   dwp_s[j] = a_s[j] h_p[j+1]
//
// where the terms of a line that has no next / previous line in its group are 0.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define GSPN_HD __host__ __device__ __forceinline__
#else
#define GSPN_HD inline __attribute__((always_inline))
#endif
// Full unrolling of a loop with a compile-time trip count (register arrays stay in registers).
#if defined(__CUDACC__) || defined(__HIPCC__)
#define GSPN_UNROLL _Pragma("unroll")
#else
#define GSPN_UNROLL
#endif

namespace gspn {

// Output of a line with a previous line in its group.
template <typename acc_t>
GSPN_HD acc_t forward_step(acc_t x, acc_t lam, acc_t wn, acc_t wm, acc_t wp, acc_t h_neg, acc_t h_mid,
                           acc_t h_pos) {
  return lam * x + wn * h_neg + wm * h_mid + wp * h_pos;
}

// Output of the first line of a group in scan order: no recurrence term.
template <typename acc_t>
GSPN_HD acc_t forward_first(acc_t x, acc_t lam) {
  return lam * x;
}

// Adjoint of h at one pixel: its own incoming gradient plus what the three pixels of the next line
// that read it send back.  `wn_r` is the w_neg gate of the next line at j+1 (which reads j), `wm_c`
// the w_mid gate at j, `wp_l` the w_pos gate at j-1; `a_*` the adjoints there.  Taps outside the
// line are passed as 0.
template <typename acc_t>
GSPN_HD acc_t adjoint_step(acc_t g, acc_t wn_r, acc_t a_r, acc_t wm_c, acc_t a_c, acc_t wp_l, acc_t a_l) {
  return g + wn_r * a_r + wm_c * a_c + wp_l * a_l;
}

template <typename acc_t>
struct StepGrads {
  acc_t dx, dlam, dwn, dwm, dwp;
};

// Gradients of the five inputs at one pixel, given its adjoint `a` and the previous line's three
// neighbours (all 0 for the first line of a group).
template <typename acc_t>
GSPN_HD StepGrads<acc_t> step_grads(acc_t a, acc_t x, acc_t lam, acc_t h_neg, acc_t h_mid, acc_t h_pos) {
  return {lam * a, x * a, a * h_neg, a * h_mid, a * h_pos};
}

// Groups: the scan axis [0, L) is cut into groups floor(s / k) of absolute positions, the same for
// both scan orders.  Group g covers [g k, min(L, (g + 1) k)).
GSPN_HD int64_t num_groups(int64_t L, int64_t k) { return (L + k - 1) / k; }
GSPN_HD int64_t group_begin(int64_t g, int64_t k) { return g * k; }
GSPN_HD int64_t group_end(int64_t g, int64_t k, int64_t L) { return (g + 1) * k < L ? (g + 1) * k : L; }

// Position of the `step`-th line of a group [s0, s1) in scan order.
GSPN_HD int64_t line_at(int64_t step, int64_t s0, int64_t s1, bool reverse) {
  return reverse ? s1 - 1 - step : s0 + step;
}


// ---------------------------------------------------------------------------------------------------
// The fused propagation of the GSPN mixer (one pass over four directions).  Per direction k and
// pixel, six raw logits (g_neg, g_mid, g_pos, lam, u, d) give
//
//     (w_neg, w_mid, w_pos) = normalize_gates(g_neg, g_mid, g_pos)   (sigmoid taps, outside taps 0,
//                                                                     divided by their sum)
//     h_k = scan_k(x; sigmoid(lam), w)          y = sum_k m_k (sigmoid(u) h_k + d x)
//
// The taps are computed in a form that stays finite for any logits: with c = min(0, max of the
// present logits), s_t = sigmoid(g_t) e^-c = 1 / (e^c + e^(c - g_t)), whose largest is >= 1/2, so
// the sum never underflows; w_t = s_t / sum s.  Their adjoint is
//
//     dg_t = (dw_t - sum_r w_r dw_r) w_t (1 - sigmoid(g_t)),   1 - sigmoid(g_t) = e^(c - g_t) s_t,
//
// again without cancellation.  The sigmoids of lam and u use sigmoid(v) = 1 / (1 + e^-v) and
// 1 - sigmoid(v) = e^-v sigmoid(v).
//
// acc_t is float or double, or on the CPU a GCC vector of them (the projection op's kernel holds one
// channel per lane), so constants are written as plain literals and acc_t{} (a vector cannot be
// constructed from a scalar) and selects on acc_t comparisons work lane by lane.
// ---------------------------------------------------------------------------------------------------

// The six logits of a direction, in the channel order of the mixer's gate projection.
enum GateField : int { kGateNeg = 0, kGateMid = 1, kGatePos = 2, kGateLam = 3, kGateU = 4, kGateD = 5 };
constexpr int kGateFields = 6;

#if !defined(__CUDA_ARCH__)
// exp for float on the host, written in plain arithmetic so the compiler vectorises the loops that
// call it (libm's expf is not inlined): range reduction by ln 2 and a degree-7 polynomial, relative
// error below 2e-7.  Inputs are clamped to [-87, 88] (results stay normal floats); NaN propagates.
// `T` is float or a GCC vector of floats (the CPU kernel's channel lanes); `n` gets round(v / ln 2)
// and the result is e^r with r = v - n ln 2, so that e^v = result * 2^n.
template <typename T>
inline __attribute__((always_inline)) T exp_reduced(T v, T& n) {
  v = v < -87.0f ? T{} - 87.0f : v;
  v = v > 88.0f ? T{} + 88.0f : v;
  n = (v * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(v / ln 2)
  const T r = (v - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  T p = T{} + 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return p;
}
inline __attribute__((always_inline)) float exp_approx(float v) {
  float n;
  const float p = exp_reduced(v, n);
  union {
    int32_t i;
    float f;
  } scale;
  scale.i = (static_cast<int32_t>(n) + 127) << 23;  // 2^n
  return p * scale.f;
}
inline double exp_approx(double v) { return std::exp(v < -708.0 ? -708.0 : (v > 709.0 ? 709.0 : v)); }
#if !defined(__CUDACC__) && !defined(__HIPCC__)
// The same lane by lane for a GCC vector of floats (the polynomial, vectorised) or of doubles (libm).
template <typename V>
inline __attribute__((always_inline)) V exp_approx(V v) {
  constexpr int kLanes = sizeof(V) / sizeof(v[0]);
  if constexpr (sizeof(v[0]) == sizeof(float)) {
    typedef int32_t I __attribute__((vector_size(sizeof(V))));
    V n;
    const V p = exp_reduced(v, n);
    const I bits = (__builtin_convertvector(n, I) + 127) << 23;  // 2^n
    V scale;
    __builtin_memcpy(&scale, &bits, sizeof(V));
    return p * scale;
  } else {
    for (int i = 0; i < kLanes; ++i) v[i] = exp_approx(static_cast<double>(v[i]));
    return v;
  }
}
#endif
#endif

// exp clamped to finite, normal results (e^-87..e^88 in float, e^-708..e^709 in double), so that
// products like e^(c - g) s stay finite.
template <typename acc_t>
GSPN_HD acc_t gexp(acc_t v) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(acc_t) == 4) {
    return expf(v < -87.0f ? -87.0f : (v > 88.0f ? 88.0f : v));
  } else {
    return ::exp(v < -708.0 ? -708.0 : (v > 709.0 ? 709.0 : v));
  }
#else
  return exp_approx(v);
#endif
}

// The F logits of one pixel from its low-rank proxy: g_f = b[f] + sum_{s < n} w[s * F + f] p[s], the
// projection rows of a lane (or, on the CPU, of a vector of lanes) laid out [s][field].  `V` is acc_t
// or a vector of it, `P` the proxy's scalar (broadcast over the lanes); `n` is a compile-time
// capacity on the GPU (registers, zero-padded rows) and the padded proxy length on the CPU.
// project_logits: the mixer's six (GateField order); the attention op projects its three taps.
template <int F, typename V, typename P, typename N>
GSPN_HD void project_fields(const V* w, const V* b, const P* p, N n, V (&g)[F]) {
  GSPN_UNROLL
  for (int f = 0; f < F; ++f) g[f] = b[f];
  GSPN_UNROLL
  for (N s = 0; s < n; ++s) {
    const V ps = V{} + p[s];
    const V* ws = w + s * F;
    GSPN_UNROLL
    for (int f = 0; f < F; ++f) g[f] += ws[f] * ps;
  }
}

template <typename V, typename P, typename N>
GSPN_HD void project_logits(const V* w, const V* b, const P* p, N n, V (&g)[kGateFields]) {
  project_fields<kGateFields>(w, b, p, n, g);
}

// Normalised taps of one pixel; `q*` = 1 - sigmoid(logit) for the backward.  A tap whose neighbour
// lies outside the line (`has_neg` false at the first, `has_pos` false at the last position) is 0.
template <typename acc_t>
struct Taps {
  acc_t wn, wm, wp;
  acc_t qn, qm, qp;
};

template <typename acc_t>
GSPN_HD Taps<acc_t> normalize_taps(acc_t gn, acc_t gm, acc_t gp, bool has_neg, bool has_pos) {
  acc_t mx = gm;
  if (has_neg) mx = gn > mx ? gn : mx;
  if (has_pos) mx = gp > mx ? gp : mx;
  const acc_t c = mx < 0 ? mx : acc_t{};
  const acc_t ec = gexp(c);
  const acc_t en = gexp(c - gn), em = gexp(c - gm), ep = gexp(c - gp);
  const acc_t sn = has_neg ? 1 / (ec + en) : acc_t{};
  const acc_t sm = 1 / (ec + em);
  const acc_t sp = has_pos ? 1 / (ec + ep) : acc_t{};
  const acc_t inv = 1 / (sn + sm + sp);
  return {sn * inv, sm * inv, sp * inv, en * sn, em * sm, ep * sp};
}

// Adjoint of the three tap logits given the adjoints of the normalised taps.
template <typename acc_t>
struct TapGrads {
  acc_t dgn, dgm, dgp;
};

template <typename acc_t>
GSPN_HD TapGrads<acc_t> normalize_taps_backward(const Taps<acc_t>& t, acc_t dwn, acc_t dwm, acc_t dwp) {
  const acc_t dot = t.wn * dwn + t.wm * dwm + t.wp * dwp;
  return {(dwn - dot) * t.wn * t.qn, (dwm - dot) * t.wm * t.qm, (dwp - dot) * t.wp * t.qp};
}

// sigmoid(v) and its derivative sigmoid(v) (1 - sigmoid(v)).
template <typename acc_t>
struct Sigmoid {
  acc_t s, ds;
};

template <typename acc_t>
GSPN_HD Sigmoid<acc_t> sigmoid_and_grad(acc_t v) {
  const acc_t e = gexp(-v);
  const acc_t s = 1 / (1 + e);
  return {s, s * (e * s)};
}

template <typename acc_t>
GSPN_HD acc_t sigmoid(acc_t v) {
  return 1 / (1 + gexp(-v));
}

// h of one pixel of the fused op from its raw logits and the previous line's three neighbours.
template <typename acc_t>
GSPN_HD acc_t fused_h(acc_t x, acc_t gn, acc_t gm, acc_t gp, acc_t gl, acc_t hn, acc_t hm, acc_t hp,
                      bool has_neg, bool has_pos, bool first) {
  const acc_t lam = sigmoid(gl);
  if (first) return forward_first<acc_t>(x, lam);
  const Taps<acc_t> t = normalize_taps(gn, gm, gp, has_neg, has_pos);
  return forward_step<acc_t>(x, lam, t.wn, t.wm, t.wp, hn, hm, hp);
}

// This direction's term of y at one pixel, before the merge weight: sigmoid(u) h + d x.
template <typename acc_t>
GSPN_HD acc_t fused_y(acc_t h, acc_t x, acc_t gu, acc_t gd) {
  return sigmoid(gu) * h + gd * x;
}

// Backward of one pixel of one direction.  `dy` is dL/dy, `m` the merge weight, `h` this pixel's
// output and `hn, hm, hp` the previous line's neighbours (0 for the first line of a group); the
// `*_r, *_c, *_l` arguments are the next line's taps and adjoints as in adjoint_step (0 for the last
// line of a group).  Returns the adjoint of h, the taps (which the previous line needs), and the
// gradients of x (this direction's share), of the six logits and of the merge weight.
template <typename acc_t>
struct FusedGrads {
  acc_t a, dx, dgn, dgm, dgp, dgl, dgu, dgd, dm;
  Taps<acc_t> taps;
};

// The same with this pixel's taps and sigmoid(lam) already computed (the CPU kernel keeps them from
// its recomputation of the forward).
template <typename acc_t>
GSPN_HD FusedGrads<acc_t> fused_backward_with(acc_t dy, acc_t m, acc_t x, const Taps<acc_t>& taps,
                                              const Sigmoid<acc_t>& lam, acc_t gu, acc_t gd, acc_t h, acc_t hn,
                                              acc_t hm, acc_t hp, acc_t wn_r, acc_t a_r, acc_t wm_c, acc_t a_c,
                                              acc_t wp_l, acc_t a_l, bool first) {
  FusedGrads<acc_t> r;
  const Sigmoid<acc_t> u = sigmoid_and_grad(gu);
  const acc_t mdy = m * dy;
  r.a = adjoint_step<acc_t>(mdy * u.s, wn_r, a_r, wm_c, a_c, wp_l, a_l);
  const StepGrads<acc_t> d = step_grads<acc_t>(r.a, x, lam.s, hn, hm, hp);
  r.dx = d.dx + mdy * gd;
  r.dgl = d.dlam * lam.ds;
  r.dgu = mdy * h * u.ds;
  r.dgd = mdy * x;
  r.dm = dy * (u.s * h + gd * x);
  r.taps = taps;
  if (first) {
    r.dgn = r.dgm = r.dgp = acc_t{};
  } else {
    const TapGrads<acc_t> tg = normalize_taps_backward(taps, d.dwn, d.dwm, d.dwp);
    r.dgn = tg.dgn;
    r.dgm = tg.dgm;
    r.dgp = tg.dgp;
  }
  return r;
}

template <typename acc_t>
GSPN_HD FusedGrads<acc_t> fused_backward(acc_t dy, acc_t m, acc_t x, acc_t gn, acc_t gm, acc_t gp, acc_t gl,
                                         acc_t gu, acc_t gd, acc_t h, acc_t hn, acc_t hm, acc_t hp, acc_t wn_r,
                                         acc_t a_r, acc_t wm_c, acc_t a_c, acc_t wp_l, acc_t a_l, bool has_neg,
                                         bool has_pos, bool first) {
  const Taps<acc_t> zero = {};
  const Taps<acc_t> taps = first ? zero : normalize_taps(gn, gm, gp, has_neg, has_pos);
  return fused_backward_with(dy, m, x, taps, sigmoid_and_grad(gl), gu, gd, h, hn, hm, hp, wn_r, a_r, wm_c, a_c,
                             wp_l, a_l, first);
}

// ---------------------------------------------------------------------------------------------------
// The fused GSPN attention of the SD-XL swap (gspn_attention).  Per direction k, pixel and channel the
// three tap logits give the taps w = normalize_taps(g); lam = sigmoid(k) is shared by the directions.
// Each lane carries two states through the same recurrence, the numerator (input v) and the
// denominator (input 1):
//
//     hn = lam v + wn hn_p[j-1] + wm hn_p[j] + wp hn_p[j+1]      hd = lam + wn hd_p[j-1] + ...
//     num = sum_k m_k hn_k     den = sum_k m_k hd_k     out = sigmoid(q + u_bias) num / max(den, tiny)
//
// Reverse-mode, with dnum, dden from attention_out_backward: the adjoints an, ad of hn, hd follow
// adjoint_step with the same taps (inputs m dnum, m dden); dv = lam an, dlam = v an + ad,
// dw_t = an hn_p[t] + ad hd_p[t] (then normalize_taps_backward), dm = dnum hn + dden hd.
// ---------------------------------------------------------------------------------------------------

// The numerator and denominator states of one pixel, given the previous line's three neighbours of
// each (`first`: the first line of a group, no recurrence term, taps unused).
template <typename acc_t>
GSPN_HD void attention_h(acc_t v, acc_t lam, const Taps<acc_t>& t, acc_t nn, acc_t nm, acc_t np, acc_t dn,
                         acc_t dm, acc_t dp, bool first, acc_t& hn, acc_t& hd) {
  if (first) {
    hn = forward_first<acc_t>(v, lam);
    hd = lam;
  } else {
    hn = forward_step<acc_t>(v, lam, t.wn, t.wm, t.wp, nn, nm, np);
    hd = lam + t.wn * dn + t.wm * dm + t.wp * dp;
  }
}

// The normalised, gated output of one pixel: sigmoid(gq) num / max(den, tiny) (gq = q + u_bias).
template <typename acc_t>
GSPN_HD acc_t attention_out(acc_t gq, acc_t num, acc_t den, acc_t tiny) {
  const acc_t d = den < tiny ? tiny : den;
  return sigmoid(gq) * (num / d);
}

// Its backward: dL/dnum, dL/dden and dL/d(q + u_bias) given dL/dout `g` (den's gradient 0 where the
// clamp is active, as clamp_min's).
template <typename acc_t>
struct AttentionOutGrads {
  acc_t dnum, dden, dgq;
};

template <typename acc_t>
GSPN_HD AttentionOutGrads<acc_t> attention_out_backward(acc_t g, acc_t gq, acc_t num, acc_t den, acc_t tiny) {
  const Sigmoid<acc_t> u = sigmoid_and_grad(gq);
  const acc_t d = den < tiny ? tiny : den;
  const acc_t r = num / d;
  const acc_t dnum = g * u.s / d;
  const acc_t dden = den < tiny ? acc_t{} : acc_t{} - dnum * r;
  return {dnum, dden, g * r * u.ds};
}

// Backward of one pixel of one direction.  `m dnum`, `m dden` enter the adjoints; `hn, hd` are this
// pixel's states, `*_p` the previous line's neighbours (0 for the first line of a group), `*_r, *_c,
// *_l` the next line's taps and adjoints as in adjoint_step (0 for the last line of a group).
// Returns the adjoints (which the previous line needs), this direction's shares of dv and dlam, the
// tap logits' gradients and this pixel's share of dL/dm.
template <typename acc_t>
struct AttentionGrads {
  acc_t an, ad, dv, dlam, dgn, dgm, dgp, dm;
};

template <typename acc_t>
GSPN_HD AttentionGrads<acc_t> attention_backward_step(acc_t dnum, acc_t dden, acc_t m, acc_t v, acc_t lam,
                                                      const Taps<acc_t>& taps, acc_t hn, acc_t hd, acc_t nn,
                                                      acc_t nm, acc_t np, acc_t dn, acc_t dmid, acc_t dp,
                                                      acc_t wn_r, acc_t an_r, acc_t ad_r, acc_t wm_c, acc_t an_c,
                                                      acc_t ad_c, acc_t wp_l, acc_t an_l, acc_t ad_l, bool first) {
  AttentionGrads<acc_t> r;
  r.an = adjoint_step<acc_t>(m * dnum, wn_r, an_r, wm_c, an_c, wp_l, an_l);
  r.ad = adjoint_step<acc_t>(m * dden, wn_r, ad_r, wm_c, ad_c, wp_l, ad_l);
  r.dv = lam * r.an;
  r.dlam = v * r.an + r.ad;
  r.dm = dnum * hn + dden * hd;
  if (first) {
    r.dgn = r.dgm = r.dgp = acc_t{};
  } else {
    const TapGrads<acc_t> tg = normalize_taps_backward(taps, r.an * nn + r.ad * dn, r.an * nm + r.ad * dmid,
                                                       r.an * np + r.ad * dp);
    r.dgn = tg.dgn;
    r.dgm = tg.dgm;
    r.dgp = tg.dgp;
  }
  return r;
}

}  // namespace gspn
