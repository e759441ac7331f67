// CPU kernel of the fused GSPN mixer propagation: gate normalisation, the scans of all directions
// and the merge in one pass (the math is in gspn_step.h, second part).
//
// Parallel over (batch x channel) planes: a thread takes one plane and runs every direction over it
// while the plane's inputs stay in its cache, accumulating y in a float32 plane buffer that is
// written out once.  Row scans (t2b/b2t) read their lines in place; column scans (l2r/r2l) work on
// transposed copies of the plane's inputs in thread-local buffers (x once for both, the six logits
// per direction), so every inner loop runs over contiguous memory and vectorises.
//
// The backward recomputes each direction's scan of the plane into a thread-local buffer (one plane
// of float32, in cache) and walks it backwards; nothing but the inputs is saved by the forward.
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
#include "gspn_transpose.h"

namespace gspn {
namespace {

// dst[j * R + i] = src[i * C + j] (kAdd: +=): a (R, C) plane transposed.  float planes move 8 x 8
// blocks through registers where AVX2 is available; the rest goes in 16 x 16 blocks element by element.
template <bool kAdd, typename D, typename S>
void transpose_plane(const S* __restrict__ src, D* __restrict__ dst, int64_t R, int64_t C) {
  auto put = [&](int64_t i, int64_t j) {
    if (kAdd) {
      dst[j * R + i] += static_cast<D>(src[i * C + j]);
    } else {
      dst[j * R + i] = static_cast<D>(src[i * C + j]);
    }
  };
  int64_t R8 = 0, C8 = 0;  // the part done in registers: [0, R8) x [0, C8)
#if defined(__AVX2__)
  if constexpr (std::is_same_v<D, float> && std::is_same_v<S, float>) {
    R8 = R / 8 * 8;
    C8 = C / 8 * 8;
    for (int64_t i0 = 0; i0 < R8; i0 += 8) {
      for (int64_t j0 = 0; j0 < C8; j0 += 8) {
        __m256 r[8];
        for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + (i0 + i) * C + j0);
        transpose8(r);
        for (int k = 0; k < 8; ++k) {
          float* d = dst + (j0 + k) * R + i0;
          _mm256_storeu_ps(d, kAdd ? _mm256_add_ps(_mm256_loadu_ps(d), r[k]) : r[k]);
        }
      }
    }
  }
#endif
  // the rest: the columns right of C8 (all rows), the rows below R8 (left of C8)
  for_blocks(0, R, C8, C, put);
  for_blocks(R8, R, 0, C8, put);
}

template <typename D, typename S>
void transpose_copy(const S* src, D* dst, int64_t R, int64_t C) {
  transpose_plane<false>(src, dst, R, C);
}

template <typename D, typename S>
void transpose_add(const S* src, D* dst, int64_t R, int64_t C) {
  transpose_plane<true>(src, dst, R, C);
}

// One line's inputs: x and the six logits (g[kGateNeg] ... g[kGateD]).
template <typename scalar_t>
struct LineIn {
  const scalar_t* x;
  const scalar_t* g[kGateFields];
};

// Lines shorter than this run as one loop over [0, M) whose boundary taps are masked per position
// (kMasked), so that a short line is a few whole vectors instead of a short interior loop (mostly its
// scalar remainder) plus two scalar ends; longer lines keep the boundaries apart (no selects inside).
constexpr int64_t kShortLine = 32;

// Forward over positions [j0, j1) of a line: h into `cur` (and, with kY, m * (sigmoid(u) h + d x)
// added to `y`), reading the previous line's h from the zero-padded `prev`.  With kMasked the range is
// the whole line and the left / right taps exist where j > 0 / j < j1 - 1 (kNeg, kPos unused).
template <bool kNeg, bool kPos, bool kFirst, bool kY, bool kMasked = false, typename scalar_t, typename acc_t>
inline void forward_range(const LineIn<scalar_t>& in, const acc_t* prev, acc_t* cur, acc_t* y, acc_t m,
                          int64_t j0, int64_t j1) {
  const scalar_t *x = in.x, *gn = in.g[kGateNeg], *gm = in.g[kGateMid], *gp = in.g[kGatePos],
                 *gl = in.g[kGateLam], *gu = in.g[kGateU], *gd = in.g[kGateD];
#pragma GCC ivdep
  for (int64_t j = j0; j < j1; ++j) {
    const acc_t xv = x[j];
    const bool has_neg = kMasked ? j > 0 : kNeg, has_pos = kMasked ? j + 1 < j1 : kPos;
    const acc_t h = fused_h<acc_t>(xv, gn[j], gm[j], gp[j], gl[j], prev[j - 1], prev[j], prev[j + 1], has_neg,
                                   has_pos, kFirst);
    cur[j] = h;
    if (kY) y[j] += m * fused_y<acc_t>(h, xv, gu[j], gd[j]);
  }
}

// Short lines in one masked loop; longer ones with the boundary positions (no left / right neighbour)
// apart, so the interior loop has no selects.
template <bool kFirst, bool kY, typename scalar_t, typename acc_t>
void forward_line(const LineIn<scalar_t>& in, const acc_t* prev, acc_t* cur, acc_t* y, acc_t m, int64_t M) {
  if (M < kShortLine) {
    forward_range<false, false, kFirst, kY, true>(in, prev, cur, y, m, 0, M);
    return;
  }
  forward_range<false, true, kFirst, kY>(in, prev, cur, y, m, 0, 1);
  forward_range<true, true, kFirst, kY>(in, prev, cur, y, m, 1, M - 1);
  forward_range<true, false, kFirst, kY>(in, prev, cur, y, m, M - 1, M);
}

template <bool kY, typename scalar_t, typename acc_t>
void forward_line(const LineIn<scalar_t>& in, const acc_t* prev, acc_t* cur, acc_t* y, acc_t m, int64_t M,
                  bool first) {
  if (first) {
    forward_line<true, kY>(in, prev, cur, y, m, M);
  } else {
    forward_line<false, kY>(in, prev, cur, y, m, M);
  }
}

// Zero-padded float lines: element -1 and M of every line are 0 (the taps outside the line).
template <typename acc_t>
struct PaddedLines {
  std::vector<acc_t> buf;
  int64_t P = 0;
  // `lines` lines of length M; with `clear` everything is zeroed, else only the pads.
  void shape(int64_t lines, int64_t M, bool clear) {
    P = M + 2;
    if (static_cast<int64_t>(buf.size()) < lines * P) buf.resize(lines * P);
    if (clear) {
      std::fill(buf.begin(), buf.begin() + lines * P, acc_t(0));
    } else {
      for (int64_t i = 0; i < lines; ++i) buf[i * P] = buf[i * P + M + 1] = acc_t(0);
    }
  }
  acc_t* line(int64_t i) { return buf.data() + i * P + 1; }
};

// What the backward's recomputation of the forward keeps of each pixel, one padded line per field
// (the pads, and every tap of a group's first line, stay 0): the normalised taps, their
// 1 - sigmoid factors, and sigmoid(lam) with its derivative.
template <typename acc_t>
struct Kept {
  acc_t *wn, *wm, *wp, *qn, *qm, *qp, *ls, *lds;
};
constexpr int kKeptFields = 8;

template <bool kNeg, bool kPos, bool kFirst, bool kMasked = false, typename scalar_t, typename acc_t>
inline void recompute_range(const LineIn<scalar_t>& in, const acc_t* prev, acc_t* cur, const Kept<acc_t>& k,
                            int64_t j0, int64_t j1) {
  const scalar_t *x = in.x, *gn = in.g[kGateNeg], *gm = in.g[kGateMid], *gp = in.g[kGatePos], *gl = in.g[kGateLam];
  acc_t *wn = k.wn, *wm = k.wm, *wp = k.wp, *qn = k.qn, *qm = k.qm, *qp = k.qp, *ls = k.ls, *lds = k.lds;
#pragma GCC ivdep
  for (int64_t j = j0; j < j1; ++j) {
    const Sigmoid<acc_t> lam = sigmoid_and_grad<acc_t>(gl[j]);
    ls[j] = lam.s;
    lds[j] = lam.ds;
    if (kFirst) {
      cur[j] = forward_first<acc_t>(x[j], lam.s);
    } else {
      const bool has_neg = kMasked ? j > 0 : kNeg, has_pos = kMasked ? j + 1 < j1 : kPos;
      const Taps<acc_t> t = normalize_taps<acc_t>(gn[j], gm[j], gp[j], has_neg, has_pos);
      cur[j] = forward_step<acc_t>(x[j], lam.s, t.wn, t.wm, t.wp, prev[j - 1], prev[j], prev[j + 1]);
      wn[j] = t.wn;
      wm[j] = t.wm;
      wp[j] = t.wp;
      qn[j] = t.qn;
      qm[j] = t.qm;
      qp[j] = t.qp;
    }
  }
}

template <bool kFirst, typename scalar_t, typename acc_t>
void recompute_line(const LineIn<scalar_t>& in, const acc_t* prev, acc_t* cur, const Kept<acc_t>& k, int64_t M) {
  if (M < kShortLine) {
    recompute_range<false, false, kFirst, true>(in, prev, cur, k, 0, M);
    return;
  }
  recompute_range<false, true, kFirst>(in, prev, cur, k, 0, 1);
  recompute_range<true, true, kFirst>(in, prev, cur, k, 1, M - 1);
  recompute_range<true, false, kFirst>(in, prev, cur, k, M - 1, M);
}

template <typename scalar_t, typename acc_t>
struct LineGrads {
  acc_t* dx;  // accumulated over directions
  scalar_t* dg[kGateFields];
  acc_t* dm;  // per-position partial sums of dL/dm
};

// One line of the backward, against scan order: `k` is what the recomputation kept of this line,
// `kn` and `an` the next line's taps and adjoint (zero lines after the group's last line); this
// line's adjoint goes to `ac`.
template <bool kFirst, typename scalar_t, typename acc_t>
void backward_line(const LineIn<scalar_t>& in, const scalar_t* dy, acc_t m, const acc_t* h, const acc_t* hp,
                   const Kept<acc_t>& k, const Kept<acc_t>& kn, const acc_t* an, acc_t* ac,
                   const LineGrads<scalar_t, acc_t>& out, int64_t M) {
  const scalar_t *x = in.x, *gu = in.g[kGateU], *gd = in.g[kGateD];
  const acc_t *wn = k.wn, *wm = k.wm, *wp = k.wp, *qn = k.qn, *qm = k.qm, *qp = k.qp, *ls = k.ls, *lds = k.lds;
  const acc_t *wnn = kn.wn, *wmn = kn.wm, *wpn = kn.wp;
  acc_t *dx = out.dx, *dm = out.dm;
  scalar_t *dgn = out.dg[kGateNeg], *dgm = out.dg[kGateMid], *dgp = out.dg[kGatePos], *dgl = out.dg[kGateLam],
           *dgu = out.dg[kGateU], *dgd = out.dg[kGateD];
#pragma GCC ivdep
  for (int64_t j = 0; j < M; ++j) {
    const Taps<acc_t> taps = {wn[j], wm[j], wp[j], qn[j], qm[j], qp[j]};
    const Sigmoid<acc_t> lam = {ls[j], lds[j]};
    const FusedGrads<acc_t> r =
        fused_backward_with<acc_t>(dy[j], m, x[j], taps, lam, gu[j], gd[j], h[j], hp[j - 1], hp[j], hp[j + 1],
                                   wnn[j + 1], an[j + 1], wmn[j], an[j], wpn[j - 1], an[j - 1], kFirst);
    ac[j] = r.a;
    dx[j] += r.dx;
    dm[j] += r.dm;
    dgn[j] = static_cast<scalar_t>(r.dgn);
    dgm[j] = static_cast<scalar_t>(r.dgm);
    dgp[j] = static_cast<scalar_t>(r.dgp);
    dgl[j] = static_cast<scalar_t>(r.dgl);
    dgu[j] = static_cast<scalar_t>(r.dgu);
    dgd[j] = static_cast<scalar_t>(r.dgd);
  }
}

template <typename scalar_t>
LineIn<scalar_t> line_in(const scalar_t* x, const scalar_t* const* g, int64_t off) {
  LineIn<scalar_t> in;
  in.x = x + off;
  for (int f = 0; f < kGateFields; ++f) in.g[f] = g[f] + off;
  return in;
}

// Scratch of one thread's scans: the recomputed h of a group, what else the recomputation keeps, the
// adjoints of two lines, a zero line and per-position partial sums of dL/dm.
template <typename acc_t>
struct ScanScratch {
  PaddedLines<acc_t> h, kept, state, zero;
  std::vector<acc_t> dm;

  void init_backward(int64_t side) {
    dm.resize(side);
    zero.shape(1, side, /*clear=*/true);
  }
};

// Forward of direction `geo` over one plane in its canonical layout (lines contiguous): x `xs`, the
// six logit planes `g`; m * (sigmoid(u) h + d x) is added to the plane accumulator `acc`.
template <typename scalar_t, typename acc_t>
void forward_direction(const PlaneGeometry& geo, acc_t m, const scalar_t* xs, const scalar_t* const* g, acc_t* acc,
                       ScanScratch<acc_t>& sc) {
  sc.state.shape(2, geo.M, /*clear=*/false);
  for (int64_t grp = 0; grp < num_groups(geo.L, geo.k); ++grp) {
    const int64_t s0 = group_begin(grp, geo.k), s1 = group_end(grp, geo.k, geo.L);
    acc_t* prev = sc.state.line(0);
    acc_t* cur = sc.state.line(1);
    for (int64_t step = 0; step < s1 - s0; ++step) {
      const int64_t off = line_at(step, s0, s1, geo.reverse) * geo.M;
      forward_line<true>(line_in(xs, g, off), prev, cur, acc + off, m, geo.M, step == 0);
      std::swap(prev, cur);
    }
  }
}

// Backward of direction `geo` over one plane in its canonical layout: recomputes each group's scan,
// walks it backwards, writes the six logit gradients to `dg`, adds this direction's share of dL/dx to
// `acc` and returns dL/dm summed over the plane.
template <typename scalar_t, typename acc_t>
acc_t backward_direction(const PlaneGeometry& geo, acc_t m, const scalar_t* xs, const scalar_t* const* g,
                         const scalar_t* dys, acc_t* acc, scalar_t* const* dg, ScanScratch<acc_t>& sc) {
  const int64_t M = geo.M;
  std::fill(sc.dm.begin(), sc.dm.end(), acc_t(0));
  LineGrads<scalar_t, acc_t> lg;
  lg.dm = sc.dm.data();
  sc.h.shape(geo.k, M, /*clear=*/false);
  sc.kept.shape(kKeptFields * geo.k, M, /*clear=*/false);  // a first line's taps are never read
  auto kept = [&](int64_t step) {
    acc_t* f[kKeptFields];
    for (int i = 0; i < kKeptFields; ++i) f[i] = sc.kept.line(i * geo.k + step);
    return Kept<acc_t>{f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[7]};
  };
  acc_t* z = sc.zero.line(0);
  const Kept<acc_t> none{z, z, z, z, z, z, z, z};
  for (int64_t grp = 0; grp < num_groups(geo.L, geo.k); ++grp) {
    const int64_t s0 = group_begin(grp, geo.k), s1 = group_end(grp, geo.k, geo.L), len = s1 - s0;
    // recompute this group's h (line `step` in scan order at sc.h.line(step)) and keep its taps
    for (int64_t step = 0; step < len; ++step) {
      const LineIn<scalar_t> in = line_in(xs, g, line_at(step, s0, s1, geo.reverse) * M);
      if (step == 0) {
        recompute_line<true>(in, z, sc.h.line(step), kept(step), M);
      } else {
        recompute_line<false>(in, sc.h.line(step - 1), sc.h.line(step), kept(step), M);
      }
    }
    // walk it backwards; the adjoint of the next line is in `an` (0 after the last line)
    sc.state.shape(2, M, /*clear=*/true);
    acc_t* an = sc.state.line(0);
    acc_t* ac = sc.state.line(1);
    for (int64_t step = len - 1; step >= 0; --step) {
      const int64_t off = line_at(step, s0, s1, geo.reverse) * M;
      LineGrads<scalar_t, acc_t> out = lg;
      out.dx = acc + off;
      for (int f = 0; f < kGateFields; ++f) out.dg[f] = dg[f] + off;
      const LineIn<scalar_t> in = line_in(xs, g, off);
      const Kept<acc_t> kn = step + 1 < len ? kept(step + 1) : none;
      if (step == 0) {
        backward_line<true>(in, dys + off, m, sc.h.line(step), z, kept(step), kn, an, ac, out, M);
      } else {
        backward_line<false>(in, dys + off, m, sc.h.line(step), sc.h.line(step - 1), kept(step), kn, an, ac, out, M);
      }
      std::swap(an, ac);
    }
  }
  acc_t dm_sum = 0;
  for (int64_t j = 0; j < M; ++j) dm_sum += sc.dm[j];
  return dm_sum;
}

// Thread-local work space, reused across the planes of one parallel chunk.
template <typename scalar_t, typename acc_t>
struct Workspace {
  std::vector<acc_t> rows, cols;     // plane accumulators (y or dx), image and transposed layout
  std::vector<scalar_t> xt, dyt;     // transposed x and dL/dy
  std::vector<scalar_t> gt, dgt;     // transposed logits of one direction and their gradients
  ScanScratch<acc_t> scan;

  void init(int64_t HW, bool columns, bool backward) {
    rows.resize(HW);
    if (!columns) return;
    cols.resize(HW);
    xt.resize(HW);
    gt.resize(kGateFields * HW);
    if (backward) {
      dyt.resize(HW);
      dgt.resize(kGateFields * HW);
    }
  }

  // Zero the accumulators of a new plane.
  void clear(bool columns) {
    std::fill(rows.begin(), rows.end(), acc_t(0));
    if (columns) std::fill(cols.begin(), cols.end(), acc_t(0));
  }

  // The plane's accumulated result (the column directions' part transposed in) written to `out`.
  template <typename out_t>
  void finish(bool columns, int64_t H, int64_t W, out_t* out) {
    if (columns) transpose_add(cols.data(), rows.data(), W, H);
    for (int64_t i = 0; i < H * W; ++i) out[i] = static_cast<out_t>(rows[i]);
  }
};

template <typename scalar_t>
const scalar_t* gate_plane(const scalar_t* gates, const PropagateArgs& a, int64_t b, int64_t k, int f, int64_t c) {
  return gates + (((b * a.K + k) * kGateFields + f) * a.C + c) * a.H * a.W;
}


template <typename scalar_t>
void propagate_forward_cpu(const PropagateArgs& a, at::Tensor& y) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x = a.x.const_data_ptr<scalar_t>();
  const scalar_t* gates = a.gates.const_data_ptr<scalar_t>();
  const scalar_t* merge = a.merge.const_data_ptr<scalar_t>();
  scalar_t* out = y.mutable_data_ptr<scalar_t>();
  const int64_t HW = a.H * a.W, N = a.B * a.C;
  const bool columns = any_columns(a);
  const int64_t grain = parallel_grain(HW * a.K);
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    const FlushDenormals ftz;
    Workspace<scalar_t, acc_t> ws;
    ws.init(HW, columns, /*backward=*/false);
    for (int64_t n = begin; n < end; ++n) {
      const int64_t b = n / a.C, c = n % a.C;
      const scalar_t* xp = x + n * HW;
      ws.clear(columns);
      if (columns) transpose_copy(xp, ws.xt.data(), a.H, a.W);
      for (int64_t k = 0; k < a.K; ++k) {
        const PlaneGeometry geo = plane_geometry(a, k);
        const scalar_t* g[kGateFields];
        for (int f = 0; f < kGateFields; ++f) {
          const scalar_t* gp = gate_plane(gates, a, b, k, f, c);
          if (geo.columns) {
            transpose_copy(gp, ws.gt.data() + f * HW, a.H, a.W);
            gp = ws.gt.data() + f * HW;
          }
          g[f] = gp;
        }
        forward_direction(geo, static_cast<acc_t>(merge[k * a.C + c]), geo.columns ? ws.xt.data() : xp, g,
                          geo.columns ? ws.cols.data() : ws.rows.data(), ws.scan);
      }
      ws.finish(columns, a.H, a.W, out + n * HW);
    }
  });
}

template <typename scalar_t>
void propagate_backward_cpu(const PropagateArgs& a, const at::Tensor& grad_y, at::Tensor& dx, at::Tensor& dgates,
                            at::Tensor& dm_partial) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x = a.x.const_data_ptr<scalar_t>();
  const scalar_t* gates = a.gates.const_data_ptr<scalar_t>();
  const scalar_t* merge = a.merge.const_data_ptr<scalar_t>();
  const scalar_t* gy = grad_y.const_data_ptr<scalar_t>();
  scalar_t* dxo = dx.mutable_data_ptr<scalar_t>();
  scalar_t* dgo = dgates.mutable_data_ptr<scalar_t>();
  acc_t* dmo = dm_partial.mutable_data_ptr<acc_t>();
  const int64_t HW = a.H * a.W, N = a.B * a.C;
  const bool columns = any_columns(a);
  // the backward does about three times the forward's work per pixel
  const int64_t grain = parallel_grain(3 * HW * a.K);
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    const FlushDenormals ftz;
    Workspace<scalar_t, acc_t> ws;
    ws.init(HW, columns, /*backward=*/true);
    ws.scan.init_backward(std::max(a.H, a.W));
    for (int64_t n = begin; n < end; ++n) {
      const int64_t b = n / a.C, c = n % a.C;
      const scalar_t* xp = x + n * HW;
      const scalar_t* dyp = gy + n * HW;
      ws.clear(columns);
      if (columns) {
        transpose_copy(xp, ws.xt.data(), a.H, a.W);
        transpose_copy(dyp, ws.dyt.data(), a.H, a.W);
      }
      for (int64_t k = 0; k < a.K; ++k) {
        const PlaneGeometry geo = plane_geometry(a, k);
        const scalar_t* g[kGateFields];
        scalar_t* dg[kGateFields];
        for (int f = 0; f < kGateFields; ++f) {
          const scalar_t* gp = gate_plane(gates, a, b, k, f, c);
          scalar_t* dgp = const_cast<scalar_t*>(gate_plane<scalar_t>(dgo, a, b, k, f, c));
          if (geo.columns) {
            transpose_copy(gp, ws.gt.data() + f * HW, a.H, a.W);
            gp = ws.gt.data() + f * HW;
            dgp = ws.dgt.data() + f * HW;
          }
          g[f] = gp;
          dg[f] = dgp;
        }
        dmo[n * a.K + k] = backward_direction(
            geo, static_cast<acc_t>(merge[k * a.C + c]), geo.columns ? ws.xt.data() : xp, g,
            geo.columns ? ws.dyt.data() : dyp, geo.columns ? ws.cols.data() : ws.rows.data(), dg, ws.scan);
        if (geo.columns) {
          for (int f = 0; f < kGateFields; ++f) {
            transpose_copy(ws.dgt.data() + f * HW, const_cast<scalar_t*>(gate_plane<scalar_t>(dgo, a, b, k, f, c)),
                           a.W, a.H);
          }
        }
      }
      ws.finish(columns, a.H, a.W, dxo + n * HW);
    }
  });
}

at::Tensor propagate_fwd_cpu(const at::Tensor& x, const at::Tensor& gates, const at::Tensor& merge,
                             std::vector<std::string> directions, int64_t chunk_size) {
  const PropagateArgs a = propagate_args(x, gates, merge, directions, chunk_size, "gspn propagate_fwd");
  at::Tensor y = at::empty_like(a.x);
  if (y.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "gspn_propagate_fwd_cpu",
                                  [&] { propagate_forward_cpu<scalar_t>(a, y); });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> propagate_bwd_cpu(const at::Tensor& grad_y, const at::Tensor& x,
                                                                 const at::Tensor& gates, const at::Tensor& merge,
                                                                 std::vector<std::string> directions,
                                                                 int64_t chunk_size) {
  const PropagateArgs a = propagate_args(x, gates, merge, directions, chunk_size, "gspn propagate_bwd");
  TORCH_CHECK(grad_y.sizes() == x.sizes() && grad_y.scalar_type() == x.scalar_type(),
              "gspn propagate_bwd: grad_y must have the shape and dtype of x");
  const at::Tensor gy = grad_y.contiguous();
  at::Tensor dx = at::empty_like(a.x), dgates = at::empty_like(a.gates);
  const auto acc_type = at::toOpMathType(x.scalar_type());
  at::Tensor dm_partial = at::zeros({a.B, a.C, a.K}, x.options().dtype(acc_type));
  if (x.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "gspn_propagate_bwd_cpu",
                                    [&] { propagate_backward_cpu<scalar_t>(a, gy, dx, dgates, dm_partial); });
  }
  return {dx, dgates, merge_grad(dm_partial, x.scalar_type())};
}

}  // namespace
}  // namespace gspn

TORCH_LIBRARY_IMPL(gspn_lightning, CPU, m) {
  m.impl("propagate_fwd", &gspn::propagate_fwd_cpu);
  m.impl("propagate_bwd", &gspn::propagate_bwd_cpu);
}
