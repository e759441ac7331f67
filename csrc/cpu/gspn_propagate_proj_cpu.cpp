// CPU kernel of the fused GSPN mixer propagation with the low-rank gate projection fused in
// (propagate_proj_fwd / propagate_proj_bwd; the op without the projection is gspn_propagate_cpu.cpp).
//
// Vectorised across channels: a task takes a *unit*, a group of `lanes` channels of one batch
// element, and runs every direction over it with one channel per vector lane, so every operation
// works on whole vectors whatever the line length (along a line, a 14-pixel line was one vector and a
// 4 + 2 remainder, ~40 % of the forward's time).  x, dL/dy, the proxy and the map outputs (y, dL/dx,
// dL/dproxy) are channels-last, as the mixer's convolutions leave and take them, so a unit's pixel is
// `lanes` contiguous channels: its x (and dL/dy) are loaded as [pixel][lane] vectors once (no copy of
// the map to another layout), and where a column direction runs, copied once more in the transposed
// pixel order (whole vectors, in cache-sized blocks), as is the proxy.  The six logits of a pixel are
// projected on the fly from the proxy of batch element b (converted once per b that a thread meets,
// [pixel][S], S zero-padded to a multiple of 4) with the unit's projection rows as vectors (laid out
// once per call for every channel group, ProjRows), g_f = bias[r_f] + sum_s weight[r_f, s] proxy[b, s],
// r_f = (k*6 + f)*C + c; on the first line of a group, which has no recurrence term, only lam, u and d
// are projected.  The lanes past C in a batch element's last unit are padding: zero x, dL/dy, weights,
// bias and merge weight, so they stay finite and contribute nothing; their outputs are dropped.  The
// math is gspn_step.h's, instantiated on the vector type.
//
// The backward recomputes one group (chunk) of lines at a time, keeping per pixel h, the taps,
// sigmoid(lam) and the u, d logits, walks the group backwards, then reduces the group's logit
// gradients into dL/dweight, dL/dbias (per-lane sums) and dL/dproxy (kept per lane and pixel while that
// fits kLaneProxyBytes, else summed over the lanes per pixel at once; kept per batch element and added
// into place when the thread moves to another one).  Units are split into one contiguous range per task
// (at most one task per thread), each with its own partial sums, added in task order afterwards, so
// results do not depend on scheduling.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../gspn_layout.h"
#include "../gspn_step.h"
#include "gspn_propagate_common.h"

namespace gspn {
namespace {

// (Vec, tree_sum, for_line: gspn_propagate_common.h.)

// Direction k over its own layout, lines contiguous: pixel (line s, position j) at s * M + j (the image
// layout for rows, the transposed one for columns).
struct LaneGeometry {
  PlaneGeometry g;
  int64_t pixel(int64_t s, int64_t j) const { return s * g.M + j; }
};

inline LaneGeometry lane_geometry(const PropagateArgs& a, int64_t k) { return {plane_geometry(a, k)}; }

// dst[(j * R + i) * n + e] = src[(i * C + j) * n + e] (kAdd: +=): an (R, C) grid of n-element records
// transposed, in blocks of 16 x 16 records.
template <bool kAdd, typename T>
void transpose_records(const T* __restrict__ src, T* __restrict__ dst, int64_t R, int64_t C, int64_t n) {
  for_blocks(0, R, 0, C, [&](int64_t i, int64_t j) {
    const T* s = src + (i * C + j) * n;
    T* d = dst + (j * R + i) * n;
    for (int64_t e = 0; e < n; ++e) {
      if constexpr (kAdd) {
        d[e] += s[e];
      } else {
        d[e] = s[e];
      }
    }
  });
}

// The inputs' data of the projection op.
template <typename scalar_t>
struct ProjInputs {
  const scalar_t *x, *proxy, *weight, *bias, *merge;
  explicit ProjInputs(const ProjArgs& pa)
      : x(pa.p.x.const_data_ptr<scalar_t>()),
        proxy(pa.proxy.const_data_ptr<scalar_t>()),
        weight(pa.weight.const_data_ptr<scalar_t>()),
        bias(pa.bias.const_data_ptr<scalar_t>()),
        merge(pa.p.merge.const_data_ptr<scalar_t>()) {}
};

// What the backward keeps of a pixel between its recomputation and its adjoint.
template <typename V>
struct LaneKept {
  Taps<V> taps;
  Sigmoid<V> lam;
  V gu, gd;
};

// The per-pixel arrays one direction works on, in its own layout (see LaneGeometry).
template <typename acc_t>
struct LaneData {
  using V = typename Vec<acc_t>::type;
  const acc_t* p;
  const V *x, *dy;
  V* acc;
  acc_t* dps;
  V* dpv;  // dL/dproxy per lane [pixel][Sp] (summed over the lanes later), or null: summed at once into dps
};

// Per-lane dL/dproxy accumulators (LaneData::dpv) while both layouts' take at most this many bytes: each
// pixel's proxy gradient then stays a vector, summed over the lanes once per batch element instead of once
// per pixel, direction and unit (at an 8x8 grid that per-pixel sum was a quarter of the backward).
constexpr int64_t kLaneProxyBytes = int64_t{256} << 10;

// The projection rows, biases and merge weights of every channel group, laid out once per call (they
// depend on the group only, not on the batch element): group g's block holds the rows [K][Sp][6], then
// the biases [K][6], then the merge weights [K], of channels [g * lanes, g * lanes + lanes), zero in the
// lanes past C.
template <typename acc_t>
struct ProjRows {
  using V = typename Vec<acc_t>::type;
  static constexpr int64_t lanes = Vec<acc_t>::lanes;
  int64_t bias_at = 0, merge_at = 0, stride = 0;
  std::vector<V> data;

  template <typename scalar_t>
  ProjRows(const ProjInputs<scalar_t>& in, const PropagateArgs& a, int64_t S) {
    const int64_t Sp = (S + 3) / 4 * 4, G = (a.C + lanes - 1) / lanes;
    bias_at = a.K * Sp * kGateFields;
    merge_at = bias_at + a.K * kGateFields;
    stride = merge_at + a.K;
    data.assign(G * stride, V{});
    for (int64_t g = 0; g < G; ++g) {
      V* w = data.data() + g * stride;
      V* bias = w + bias_at;
      V* merge = w + merge_at;
      const int64_t c0 = g * lanes, nc = std::min(lanes, a.C - c0);
      for (int64_t k = 0; k < a.K; ++k) {
        for (int64_t l = 0; l < nc; ++l) {
          const int64_t c = c0 + l;
          merge[k][l] = static_cast<acc_t>(in.merge[k * a.C + c]);
          for (int f = 0; f < kGateFields; ++f) {
            const int64_t r = (k * kGateFields + f) * a.C + c;
            bias[k * kGateFields + f][l] = static_cast<acc_t>(in.bias[r]);
            for (int64_t s = 0; s < S; ++s) {
              w[(k * Sp + s) * kGateFields + f][l] = static_cast<acc_t>(in.weight[r * S + s]);
            }
          }
        }
      }
    }
  }
  const V* group(int64_t g) const { return data.data() + g * stride; }
};

// Thread-local buffers of the projection op.  The column directions work on transposed copies of the
// per-pixel arrays (suffix t, [column][row]), so that every direction walks its lines through
// contiguous memory: in the image layout a column's pixels lie a row apart (4 KB at W = 128, a new
// page per pixel), which made the column directions up to 1.9x slower than the rows at 128x128.
template <typename acc_t>
struct LaneWorkspace {
  using V = typename Vec<acc_t>::type;
  static constexpr int64_t lanes = Vec<acc_t>::lanes;
  int64_t H = 0, W = 0, HW = 0, C = 0, S = 0, Sp = 0, b = -1;
  bool cols = false;                   // some direction is a column scan: the transposed copies exist
  std::vector<acc_t> p, pt;            // proxy of batch element b, [HW][Sp]
  std::vector<V> x, dy, acc;           // the unit's x, dL/dy and its y or dL/dx accumulator, [HW]
  std::vector<V> xt, dyt, acct;        // the transposed x, dL/dy and accumulator
  std::vector<acc_t> dpst;             // the transposed dL/dproxy sums
  const V *w = nullptr, *bias = nullptr, *merge = nullptr;  // the unit's rows (see ProjRows)
  std::vector<V> lines, h, zero;       // padded lines: two (forward h, backward adjoints), a group's h, zeros
  std::vector<LaneKept<V>> kept, zkept;  // a group's kept values (padded lines), a zero line
  std::vector<V> dg;                   // a group's logit gradients [pixel][6]
  std::vector<int64_t> qs;             // a group's pixels, in group order
  std::vector<acc_t> dps;              // dL/dproxy of b, summed over the lanes of its units so far [HW][Sp]
  std::vector<V> dpv, dpvt;            // the same per lane (small grids, see kLaneProxyBytes), both layouts
  std::vector<V> dwb;                  // dL/dweight [Sp][6], dL/dbias [6] per lane

  void init(const PropagateArgs& a, int64_t S_, bool backward) {
    H = a.H;
    W = a.W;
    HW = a.H * a.W;
    C = a.C;
    S = S_;
    Sp = (S + 3) / 4 * 4;
    cols = any_columns(a);
    p.assign(HW * Sp, acc_t(0));
    x.resize(HW);
    acc.resize(HW);
    if (cols) {
      pt.assign(HW * Sp, acc_t(0));
      xt.resize(HW);
      acct.resize(HW);
    }
    const int64_t side = std::max(a.H, a.W);
    lines.assign(2 * (side + 2), V{});
    if (!backward) return;
    dy.resize(HW);
    h.resize(HW + 2 * side);
    zero.assign(side + 2, V{});
    kept.resize(HW + 2 * side);
    zkept.assign(side + 2, LaneKept<V>{});
    dg.resize(HW * kGateFields);
    qs.resize(HW);
    dps.assign(HW * Sp, acc_t(0));
    dwb.resize((Sp + 1) * kGateFields);
    if (cols) {
      dyt.resize(HW);
      dpst.assign(HW * Sp, acc_t(0));
    }
    if (HW * Sp * static_cast<int64_t>(sizeof(V)) * (cols ? 2 : 1) <= kLaneProxyBytes) {
      dpv.assign(HW * Sp, V{});
      if (cols) dpvt.assign(HW * Sp, V{});
    }
  }

  // The arrays of a row (image layout) or column (transposed) direction.
  LaneData<acc_t> data(bool columns) {
    const bool vec = !dpv.empty();
    if (columns) return {pt.data(), xt.data(), dyt.data(), acct.data(), dpst.data(), vec ? dpvt.data() : nullptr};
    return {p.data(), x.data(), dy.data(), acc.data(), dps.data(), vec ? dpv.data() : nullptr};
  }

  // A new unit: its x (and dL/dy) interleaved, transposed where needed, the accumulators zeroed.
  template <typename scalar_t>
  void load_unit(const scalar_t* xs, const scalar_t* dys, int64_t nc) {
    interleave(xs, nc, x);
    if (dys != nullptr) interleave(dys, nc, dy);
    std::fill(acc.begin(), acc.end(), V{});
    if (!cols) return;
    transpose_records<false>(x.data(), xt.data(), H, W, 1);
    if (dys != nullptr) transpose_records<false>(dy.data(), dyt.data(), H, W, 1);
    std::fill(acct.begin(), acct.end(), V{});
  }

  // The unit's result (y or dL/dx: both accumulators) written out as nc planes.
  template <typename scalar_t>
  void store_unit(int64_t nc, scalar_t* dst) {
    if (cols) transpose_records<true>(acct.data(), acc.data(), W, H, 1);
    deinterleave(nc, dst);
  }

  // The dL/dproxy sums of both layouts, in the image layout (the transposed and per-lane parts zeroed).
  void gather_dps() {
    if (!dpv.empty()) {
      // per lane -> summed over the lanes, the transposed layout's pixel (w, h) at w * H + h
      for (int64_t q = 0; q < HW; ++q) {
        for (int64_t s = 0; s < Sp; ++s) dps[q * Sp + s] += tree_sum<acc_t, kVecBytes>(&dpv[q * Sp + s]);
      }
      std::fill(dpv.begin(), dpv.end(), V{});
      if (cols) {
        for (int64_t w = 0; w < W; ++w) {
          for (int64_t h = 0; h < H; ++h) {
            const V* src = &dpvt[(w * H + h) * Sp];
            acc_t* dst = &dps[(h * W + w) * Sp];
            for (int64_t s = 0; s < Sp; ++s) dst[s] += tree_sum<acc_t, kVecBytes>(&src[s]);
          }
        }
        std::fill(dpvt.begin(), dpvt.end(), V{});
      }
    }
    if (!cols) return;
    transpose_records<true>(dpst.data(), dps.data(), W, H, Sp);
    std::fill(dpst.begin(), dpst.end(), acc_t(0));
  }

  // Convert (and lay out [pixel][s]) the proxy of batch element `bb` unless it is the current one.
  template <typename scalar_t>
  void load_proxy(const scalar_t* proxy, int64_t bb) {
    if (bb == b) return;
    b = bb;
    const scalar_t* src = proxy + bb * HW * S;  // channels-last: [pixel][s]
    for (int64_t q = 0; q < HW; ++q) {
      for (int64_t s = 0; s < S; ++s) p[q * Sp + s] = static_cast<acc_t>(src[q * S + s]);
    }
    if (cols) transpose_records<false>(p.data(), pt.data(), H, W, Sp);
  }

  // Point at the rows of the unit's channel group.
  void use_rows(const ProjRows<acc_t>& rows, int64_t group) {
    const V* r = rows.group(group);
    w = r;
    bias = r + rows.bias_at;
    merge = r + rows.merge_at;
  }

  // dst[q][l] = channel l of pixel q (`src`: the unit's first channel in a channels-last map of C
  // channels), zero in the lanes past nc.
  template <typename scalar_t>
  void interleave(const scalar_t* src, int64_t nc, std::vector<V>& dst) const {
    for (int64_t q = 0; q < HW; ++q) {
      const scalar_t* sq = src + q * C;
      V v{};
      for (int64_t l = 0; l < nc; ++l) v[l] = static_cast<acc_t>(sq[l]);
      dst[q] = v;
    }
  }

  // The accumulator's first nc lanes written out into the unit's channels of a channels-last map.
  template <typename scalar_t>
  void deinterleave(int64_t nc, scalar_t* dst) const {
    for (int64_t q = 0; q < HW; ++q) {
      scalar_t* dq = dst + q * C;
      for (int64_t l = 0; l < nc; ++l) dq[l] = static_cast<scalar_t>(acc[q][l]);
    }
  }
};

// The six logits of a pixel (project_logits), or, on the first line of a group (`first`), only lam, u and
// d: that line has no recurrence term, so its tap logits are never read (and their gradients are 0).
// The fields computed are the same sums as project_logits's, in the same order.
template <typename V, typename P>
inline __attribute__((always_inline)) void project_unit_logits(const V* w, const V* b, const P* p, int64_t n,
                                                               V (&g)[kGateFields], bool first) {
  if (!first) {
    project_logits(w, b, p, n, g);
    return;
  }
  g[kGateNeg] = g[kGateMid] = g[kGatePos] = V{};
  for (int f = kGateLam; f < kGateFields; ++f) g[f] = b[f];
  for (int64_t s = 0; s < n; ++s) {
    const V ps = V{} + p[s];
    const V* ws = w + s * kGateFields;
    for (int f = kGateLam; f < kGateFields; ++f) g[f] += ws[f] * ps;
  }
}

// add_projection_grads (gspn_propagate_common.h) for a group of lines whose first line (its first M
// pixels in group order) has tap-logit gradients of 0: the tap fields sum over the other lines only.
template <typename V, typename acc_t>
void add_group_projection_grads(V* __restrict__ dwv, const V* __restrict__ dg, const acc_t* __restrict__ P,
                                const int64_t* __restrict__ qs, int64_t n, int64_t M, int64_t Sp) {
  constexpr int64_t kSumBlock = 32;
  for (int f = 0; f < kGateFields; ++f) {
    const int64_t begin = f < kGateLam ? M : 0;
    for (int64_t i0 = begin; i0 < n; i0 += kSumBlock) {
      const int64_t i1 = std::min(n, i0 + kSumBlock);
      V sb{};
      for (int64_t i = i0; i < i1; ++i) sb += dg[i * kGateFields + f];
      dwv[Sp * kGateFields + f] += sb;
      for (int64_t s0 = 0; s0 < Sp; s0 += 4) {
        V a0{}, a1{}, a2{}, a3{};
        for (int64_t i = i0; i < i1; ++i) {
          const V d = dg[i * kGateFields + f];
          const acc_t* p = P + qs[i] * Sp + s0;
          a0 += d * p[0];
          a1 += d * p[1];
          a2 += d * p[2];
          a3 += d * p[3];
        }
        dwv[(s0 + 0) * kGateFields + f] += a0;
        dwv[(s0 + 1) * kGateFields + f] += a1;
        dwv[(s0 + 2) * kGateFields + f] += a2;
        dwv[(s0 + 3) * kGateFields + f] += a3;
      }
    }
  }
}

// Forward of direction k over the unit: m * (sigmoid(u) h + d x) added to ws.acc.
template <typename acc_t>
void lane_forward(const LaneGeometry& lg, int64_t k, LaneWorkspace<acc_t>& ws) {
  using V = typename Vec<acc_t>::type;
  const int64_t M = lg.g.M, Sp = ws.Sp;
  const V m = ws.merge[k];
  const LaneData<acc_t> d = ws.data(lg.g.columns);
  const V *w = ws.w + k * Sp * kGateFields, *bias = ws.bias + k * kGateFields, *X = d.x;
  const acc_t* P = d.p;
  V* Y = d.acc;
  V* prev = ws.lines.data() + 1;
  V* cur = prev + M + 2;
  prev[-1] = prev[M] = cur[-1] = cur[M] = V{};
  for (int64_t grp = 0; grp < num_groups(lg.g.L, lg.g.k); ++grp) {
    const int64_t s0 = group_begin(grp, lg.g.k), s1 = group_end(grp, lg.g.k, lg.g.L);
    for (int64_t step = 0; step < s1 - s0; ++step) {
      const int64_t s = line_at(step, s0, s1, lg.g.reverse);
      for_line(M, [&](auto neg, auto pos, int64_t j) {
        const int64_t q = lg.pixel(s, j);
        V g[kGateFields];
        project_unit_logits(w, bias, P + q * Sp, Sp, g, step == 0);
        const V xv = X[q];
        const V hv = fused_h<V>(xv, g[kGateNeg], g[kGateMid], g[kGatePos], g[kGateLam], prev[j - 1], prev[j],
                                prev[j + 1], neg, pos, step == 0);
        cur[j] = hv;
        Y[q] += m * fused_y<V>(hv, xv, g[kGateU], g[kGateD]);
      });
      std::swap(prev, cur);
    }
  }
}


// Backward of direction k over the unit: adds this direction's share of dL/dx to ws.acc, its dL/dproxy
// to ws.dps, sets ws.dwb to its dL/dweight, dL/dbias per lane and returns dL/dmerge per lane.
template <typename acc_t>
typename Vec<acc_t>::type lane_backward(const LaneGeometry& lg, int64_t k, LaneWorkspace<acc_t>& ws) {
  using V = typename Vec<acc_t>::type;
  const int64_t M = lg.g.M, P2 = M + 2, Sp = ws.Sp;
  const V m = ws.merge[k];
  const LaneData<acc_t> ld = ws.data(lg.g.columns);
  const V *w = ws.w + k * Sp * kGateFields, *bias = ws.bias + k * kGateFields, *X = ld.x,
          *DY = ld.dy;
  const acc_t* P = ld.p;
  V* DX = ld.acc;
  V* dg = ws.dg.data();
  int64_t* qs = ws.qs.data();
  auto hline = [&](int64_t step) { return ws.h.data() + step * P2 + 1; };
  auto kline = [&](int64_t step) { return ws.kept.data() + step * P2 + 1; };
  const V* zh = ws.zero.data() + 1;
  const LaneKept<V>* zk = ws.zkept.data() + 1;
  for (int64_t i = 0; i < lg.g.k; ++i) {  // the pads stay 0
    hline(i)[-1] = hline(i)[M] = V{};
    kline(i)[-1] = kline(i)[M] = LaneKept<V>{};
  }
  std::fill(ws.dwb.begin(), ws.dwb.end(), V{});
  V dm{};
  for (int64_t grp = 0; grp < num_groups(lg.g.L, lg.g.k); ++grp) {
    const int64_t s0 = group_begin(grp, lg.g.k), s1 = group_end(grp, lg.g.k, lg.g.L), len = s1 - s0;
    // recompute the group's h, keeping what the adjoint needs
    for (int64_t step = 0; step < len; ++step) {
      const int64_t s = line_at(step, s0, s1, lg.g.reverse);
      V* hc = hline(step);
      const V* hp = step > 0 ? hline(step - 1) : zh;
      LaneKept<V>* kc = kline(step);
      for_line(M, [&](auto neg, auto pos, int64_t j) {
        const int64_t q = lg.pixel(s, j);
        qs[step * M + j] = q;
        V g[kGateFields];
        project_unit_logits(w, bias, P + q * Sp, Sp, g, step == 0);
        LaneKept<V>& kp = kc[j];
        kp.lam = sigmoid_and_grad<V>(g[kGateLam]);
        kp.gu = g[kGateU];
        kp.gd = g[kGateD];
        if (step == 0) {
          kp.taps = Taps<V>{};
          hc[j] = forward_first<V>(X[q], kp.lam.s);
        } else {
          kp.taps = normalize_taps<V>(g[kGateNeg], g[kGateMid], g[kGatePos], neg, pos);
          hc[j] = forward_step<V>(X[q], kp.lam.s, kp.taps.wn, kp.taps.wm, kp.taps.wp, hp[j - 1], hp[j], hp[j + 1]);
        }
      });
    }
    // walk it backwards; the next line's adjoint is in `an` (0 after the last line)
    V* an = ws.lines.data() + 1;
    V* ac = an + P2;
    std::fill(ws.lines.begin(), ws.lines.begin() + 2 * P2, V{});
    for (int64_t step = len - 1; step >= 0; --step) {
      const V* hc = hline(step);
      const V* hp = step > 0 ? hline(step - 1) : zh;
      const LaneKept<V>* kc = kline(step);
      const LaneKept<V>* kn = step + 1 < len ? kline(step + 1) : zk;
      V dml{};  // this line's part of dL/dm (summed per line: short chains)
      for (int64_t j = 0; j < M; ++j) {
        const int64_t i = step * M + j, q = qs[i];
        const LaneKept<V>& kp = kc[j];
        const FusedGrads<V> r = fused_backward_with<V>(DY[q], m, X[q], kp.taps, kp.lam, kp.gu, kp.gd, hc[j], hp[j - 1],
                                                       hp[j], hp[j + 1], kn[j + 1].taps.wn, an[j + 1], kn[j].taps.wm,
                                                       an[j], kn[j - 1].taps.wp, an[j - 1], step == 0);
        ac[j] = r.a;
        DX[q] += r.dx;
        dml += r.dm;
        const V grads[kGateFields] = {r.dgn, r.dgm, r.dgp, r.dgl, r.dgu, r.dgd};  // GateField order
        std::copy(grads, grads + kGateFields, dg + i * kGateFields);
      }
      dm += dml;
      std::swap(an, ac);
    }
    // the adjoint of the projection: dL/dproxy (per lane, or summed over the lanes at once: see
    // kLaneProxyBytes), dL/dweight and dL/dbias (per lane); the first line's tap fields are 0
    const int64_t n = len * M;
    // (a tree per value, not a chain of six dependent multiply-adds)
    auto add_dproxy = [&](int64_t i, auto first) {
      const V* d = dg + i * kGateFields;
      V* dv = ld.dpv != nullptr ? ld.dpv + qs[i] * Sp : nullptr;
      acc_t* dp = ld.dps + qs[i] * Sp;
      for (int64_t s = 0; s < Sp; ++s) {
        const V* ws_ = w + s * kGateFields;
        const V tail = ws_[4] * d[4] + ws_[5] * d[5];
        V v;
        if constexpr (decltype(first)::value) {  // the group's first line: tap-logit gradients 0
          v = ws_[3] * d[3] + tail;
        } else {
          v = (ws_[0] * d[0] + ws_[1] * d[1]) + (ws_[2] * d[2] + ws_[3] * d[3]) + tail;
        }
        if (dv != nullptr) {
          dv[s] += v;
        } else {
          dp[s] += tree_sum<acc_t, kVecBytes>(&v);
        }
      }
    };
    for (int64_t i = 0; i < std::min(n, M); ++i) add_dproxy(i, Bool<true>{});
    for (int64_t i = M; i < n; ++i) add_dproxy(i, Bool<false>{});
    add_group_projection_grads(ws.dwb.data(), dg, P, qs, n, M, Sp);
  }
  return dm;
}

template <typename scalar_t>
void propagate_proj_forward_cpu(const ProjArgs& pa, at::Tensor& y) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t NL = Vec<acc_t>::lanes;
  const PropagateArgs& a = pa.p;
  const ProjInputs<scalar_t> in(pa);
  scalar_t* out = y.mutable_data_ptr<scalar_t>();
  const int64_t HW = a.H * a.W, S = pa.S, G = (a.C + NL - 1) / NL, U = a.B * G;
  const int64_t grain = parallel_grain(HW * a.K * NL * (1 + S / 4));
  const ProjRows<acc_t> rows(in, a, S);
  at::parallel_for(0, U, grain, [&](int64_t begin, int64_t end) {
    const FlushDenormals ftz;
    LaneWorkspace<acc_t> ws;
    ws.init(a, S, /*backward=*/false);
    for (int64_t u = begin; u < end; ++u) {
      const int64_t b = u / G, c0 = (u % G) * NL, nc = std::min(NL, a.C - c0);
      ws.load_proxy(in.proxy, b);
      ws.use_rows(rows, u % G);
      ws.load_unit(in.x + b * HW * a.C + c0, static_cast<const scalar_t*>(nullptr), nc);
      for (int64_t k = 0; k < a.K; ++k) lane_forward(lane_geometry(a, k), k, ws);
      ws.store_unit(nc, out + b * HW * a.C + c0);
    }
  });
}

template <typename scalar_t>
void propagate_proj_backward_cpu(const ProjArgs& pa, const at::Tensor& grad_y, at::Tensor& dx, at::Tensor& dproxy,
                                 at::Tensor& dweight, at::Tensor& dbias, at::Tensor& dm_partial) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t NL = Vec<acc_t>::lanes;
  const PropagateArgs& a = pa.p;
  const ProjInputs<scalar_t> in(pa);
  const scalar_t* gy = grad_y.const_data_ptr<scalar_t>();
  scalar_t* dxo = dx.mutable_data_ptr<scalar_t>();
  acc_t* dmo = dm_partial.mutable_data_ptr<acc_t>();
  const int64_t HW = a.H * a.W, S = pa.S, R = a.K * kGateFields * a.C;
  const int64_t G = (a.C + NL - 1) / NL, U = a.B * G;
  // tasks: contiguous unit ranges, at most one per thread, none smaller than the grain
  const int64_t grain = parallel_grain(3 * HW * a.K * NL * (1 + S / 4));
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (U + grain - 1) / grain));
  auto task_begin = [&](int64_t t) { return U * t / tasks; };
  const auto acc_opts = a.x.options().dtype(at::toOpMathType(a.x.scalar_type()));
  // per task: dweight (R, S) and dbias (R) partials; dproxy for batch elements [b_first, b_last]
  at::Tensor dwb = at::zeros({tasks, R * (S + 1)}, acc_opts);
  std::vector<at::Tensor> dprox(tasks);
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t u0 = task_begin(t), u1 = task_begin(t + 1);
    const int64_t nb = u1 > u0 ? (u1 - 1) / G - u0 / G + 1 : 0;
    dprox[t] = at::zeros({nb, HW, S}, acc_opts);
  }
  const ProjRows<acc_t> rows(in, a, S);
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    const FlushDenormals ftz;
    LaneWorkspace<acc_t> ws;
    ws.init(a, S, /*backward=*/true);
    const int64_t Sp = ws.Sp;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t u0 = task_begin(t), u1 = task_begin(t + 1), b0 = u0 / G;
      acc_t* dw = dwb[t].mutable_data_ptr<acc_t>();
      acc_t* db = dw + R * S;
      acc_t* dp = dprox[t].mutable_data_ptr<acc_t>();
      // the dL/dproxy sums of the current batch element added into place
      auto flush = [&]() {
        if (ws.b < 0) return;
        ws.gather_dps();
        acc_t* dst = dp + (ws.b - b0) * HW * S;
        for (int64_t q = 0; q < HW; ++q) {
          for (int64_t s = 0; s < S; ++s) dst[q * S + s] += ws.dps[q * Sp + s];
        }
        std::fill(ws.dps.begin(), ws.dps.end(), acc_t(0));
      };
      ws.b = -1;
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t b = u / G, c0 = (u % G) * NL, nc = std::min(NL, a.C - c0);
        if (b != ws.b) flush();
        ws.load_proxy(in.proxy, b);
        ws.use_rows(rows, u % G);
        ws.load_unit(in.x + b * HW * a.C + c0, gy + b * HW * a.C + c0, nc);
        for (int64_t k = 0; k < a.K; ++k) {
          const auto dm = lane_backward(lane_geometry(a, k), k, ws);
          for (int64_t l = 0; l < nc; ++l) {
            const int64_t c = c0 + l;
            dmo[(b * a.C + c) * a.K + k] = dm[l];
            for (int f = 0; f < kGateFields; ++f) {
              const int64_t r = (k * kGateFields + f) * a.C + c;
              db[r] += ws.dwb[Sp * kGateFields + f][l];
              for (int64_t s = 0; s < S; ++s) dw[r * S + s] += ws.dwb[s * kGateFields + f][l];
            }
          }
        }
        ws.store_unit(nc, dxo + b * HW * a.C + c0);
      }
      flush();
    }
  });
  // reduce the partials in task order
  at::Tensor dwb_sum = dwb.sum(0);
  dweight.copy_(dwb_sum.narrow(0, 0, R * S).view({R, S}));
  dbias.copy_(dwb_sum.narrow(0, R * S, R));
  at::Tensor dp_acc = at::zeros({a.B, HW, S}, acc_opts);
  for (int64_t t = 0; t < tasks; ++t) {
    if (dprox[t].size(0) > 0) dp_acc.narrow(0, task_begin(t) / G, dprox[t].size(0)).add_(dprox[t]);
  }
  dproxy.copy_(dp_acc.view({a.B, a.H, a.W, S}).permute({0, 3, 1, 2}));  // both channels-last
}

at::Tensor propagate_proj_fwd_cpu(const at::Tensor& x, const at::Tensor& proxy, const at::Tensor& weight,
                                  const at::Tensor& bias, const at::Tensor& merge, std::vector<std::string> directions,
                                  int64_t chunk_size) {
  const ProjArgs pa = proj_args(x, proxy, weight, bias, merge, directions, chunk_size, "gspn propagate_proj_fwd",
                                at::MemoryFormat::ChannelsLast);
  at::Tensor y = at::empty_like(pa.p.x, at::MemoryFormat::ChannelsLast);
  if (y.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gspn_propagate_proj_fwd_cpu",
                                  [&] { propagate_proj_forward_cpu<scalar_t>(pa, y); });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> propagate_proj_bwd_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& proxy, const at::Tensor& weight,
    const at::Tensor& bias, const at::Tensor& merge, std::vector<std::string> directions, int64_t chunk_size) {
  const ProjArgs pa = proj_args(x, proxy, weight, bias, merge, directions, chunk_size, "gspn propagate_proj_bwd",
                                at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(grad_y.sizes() == x.sizes() && grad_y.scalar_type() == x.scalar_type(),
              "gspn propagate_proj_bwd: grad_y must have the shape and dtype of x");
  const PropagateArgs& a = pa.p;
  constexpr auto cl = at::MemoryFormat::ChannelsLast;
  const at::Tensor gy = grad_y.contiguous(cl);
  at::Tensor dx = at::empty_like(a.x, cl), dproxy = at::zeros_like(pa.proxy, cl), dweight = at::zeros_like(pa.weight),
             dbias = at::zeros_like(pa.bias);
  at::Tensor dm_partial = at::zeros({a.B, a.C, a.K}, x.options().dtype(at::toOpMathType(x.scalar_type())));
  if (x.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gspn_propagate_proj_bwd_cpu", [&] {
      propagate_proj_backward_cpu<scalar_t>(pa, gy, dx, dproxy, dweight, dbias, dm_partial);
    });
  }
  return {dx, dproxy, dweight, dbias, merge_grad(dm_partial, x.scalar_type())};
}

}  // namespace
}  // namespace gspn

TORCH_LIBRARY_IMPL(gspn_lightning, CPU, m) {
  m.impl("propagate_proj_fwd", &gspn::propagate_proj_fwd_cpu);
  m.impl("propagate_proj_bwd", &gspn::propagate_proj_bwd_cpu);
}
