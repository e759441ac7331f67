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

#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#endif

#include <algorithm>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../gspn_layout.h"
#include "../gspn_step.h"
#include "gspn_transpose.h"

namespace gspn {
namespace {

// Flush denormals to zero (FTZ + DAZ) while a kernel thread runs, restoring the caller's mode after.
// The vectorised sigmoid/exp code otherwise meets denormal operands, each costing a ~100-cycle
// microcode assist (measured: 5x slower loops); values below 1e-38 matter nowhere in this op.
struct FlushDenormals {
#if defined(__x86_64__) || defined(_M_X64)
  unsigned int saved = _mm_getcsr();
  FlushDenormals() { _mm_setcsr(saved | 0x8040); }
  ~FlushDenormals() { _mm_setcsr(saved); }
#endif
};

// f(i, j) over [ib, ie) x [jb, je) in blocks of 16 x 16, so that a transpose's reads and writes both
// stay in cache.
template <typename F>
void for_blocks(int64_t ib, int64_t ie, int64_t jb, int64_t je, F&& f) {
  constexpr int64_t T = 16;
  for (int64_t i0 = ib; i0 < ie; i0 += T) {
    for (int64_t j0 = jb; j0 < je; j0 += T) {
      for (int64_t j = j0; j < std::min(je, j0 + T); ++j) {
        for (int64_t i = i0; i < std::min(ie, i0 + T); ++i) f(i, j);
      }
    }
  }
}

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

inline bool any_columns(const PropagateArgs& a) {
  return std::any_of(a.dirs.begin(), a.dirs.end(), [](const Direction& d) { return d.transpose; });
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

// ---- The fused op with the low-rank gate projection (propagate_proj_fwd / propagate_proj_bwd) ----
//
// Vectorised across channels: a task takes a *unit*, a group of `lanes` channels of one batch
// element, and runs every direction over it with one channel per vector lane, so every operation
// works on whole vectors whatever the line length (along a line, a 14-pixel line was one vector and a
// 4 + 2 remainder, ~40 % of the forward's time).  The unit's x (and dL/dy) are interleaved into
// [pixel][lane] vectors once, and where a column direction runs, copied once more in the transposed
// pixel order (whole vectors, in cache-sized blocks), as is the proxy.  The six logits of a pixel are
// projected on the fly from the proxy of batch element b (converted once per b that a thread meets,
// [pixel][S], S zero-padded to a multiple of 4) with the unit's projection rows as vectors,
// g_f = bias[r_f] + sum_s weight[r_f, s] proxy[b, s], r_f = (k*6 + f)*C + c.  The lanes past C in a batch element's last unit are padding: zero x,
// dL/dy, weights, bias and merge weight, so they stay finite and contribute nothing; their outputs
// are dropped.  The math is gspn_step.h's, instantiated on the vector type.
//
// The backward recomputes one group (chunk) of lines at a time, keeping per pixel h, the taps,
// sigmoid(lam) and the u, d logits, walks the group backwards, then reduces the group's logit
// gradients into dL/dweight, dL/dbias (per-lane sums) and dL/dproxy (summed over the lanes per pixel,
// kept per batch element and added into place when the thread moves to another one).  Units are split
// into one contiguous range per task (at most one task per thread), each with its own partial sums,
// added in task order afterwards, so results do not depend on scheduling.

// The lane vectors of acc_t (GCC vector extensions): 64 bytes where AVX-512 is available (one
// register), else 32 (one AVX2 register, two SSE registers on the baseline build).  Measured, not
// better: two registers per vector (16 float lanes on AVX2: GCC lowered parts of it to scalar code,
// ~7x slower), and a separate projection pass or projecting the next pixel ahead of this one's
// exps and divisions (no gain or slower).
#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
#else
constexpr int kVecBytes = 32;
#endif

template <typename acc_t>
struct Vec {
  typedef acc_t type __attribute__((vector_size(kVecBytes)));
  static constexpr int64_t lanes = kVecBytes / sizeof(acc_t);
};

// The lanes of a vector of kBytes bytes added as a tree of halves (vector adds, a fixed order).
template <typename acc_t, int kBytes>
inline __attribute__((always_inline)) acc_t tree_sum(const void* v) {
  if constexpr (kBytes == static_cast<int>(sizeof(acc_t))) {
    acc_t t;
    __builtin_memcpy(&t, v, sizeof(acc_t));
    return t;
  } else {
    typedef acc_t H __attribute__((vector_size(kBytes / 2)));
    H lo, hi;
    __builtin_memcpy(&lo, v, kBytes / 2);
    __builtin_memcpy(&hi, static_cast<const char*>(v) + kBytes / 2, kBytes / 2);
    const H sum = lo + hi;
    return tree_sum<acc_t, kBytes / 2>(&sum);
  }
}

template <bool kValue>
using Bool = std::integral_constant<bool, kValue>;

// f(has_neg, has_pos, j) over the positions of a line of M pixels, the boundary flags as constants.
template <typename F>
inline __attribute__((always_inline)) void for_line(int64_t M, F&& f) {
  if (M == 1) {
    f(Bool<false>{}, Bool<false>{}, 0);
    return;
  }
  f(Bool<false>{}, Bool<true>{}, 0);
  for (int64_t j = 1; j < M - 1; ++j) f(Bool<true>{}, Bool<true>{}, j);
  f(Bool<true>{}, Bool<false>{}, M - 1);
}

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

// The six logits of one pixel for the unit's lanes: g_f = b[f] + sum_s w[s * 6 + f] p[s].
template <typename V, typename acc_t>
inline __attribute__((always_inline)) void project_pixel(const V* w, const V* b, const acc_t* p, int64_t Sp,
                                                         V (&g)[kGateFields]) {
  for (int f = 0; f < kGateFields; ++f) g[f] = b[f];
  for (int64_t s = 0; s < Sp; ++s) {
    const V ps = V{} + p[s];
    const V* ws = w + s * kGateFields;
    for (int f = 0; f < kGateFields; ++f) g[f] += ws[f] * ps;
  }
}

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
};

// Thread-local buffers of the projection op.  The column directions work on transposed copies of the
// per-pixel arrays (suffix t, [column][row]), so that every direction walks its lines through
// contiguous memory: in the image layout a column's pixels lie a row apart (4 KB at W = 128, a new
// page per pixel), which made the column directions up to 1.9x slower than the rows at 128x128.
template <typename acc_t>
struct LaneWorkspace {
  using V = typename Vec<acc_t>::type;
  static constexpr int64_t lanes = Vec<acc_t>::lanes;
  int64_t H = 0, W = 0, HW = 0, S = 0, Sp = 0, b = -1;
  bool cols = false;                   // some direction is a column scan: the transposed copies exist
  std::vector<acc_t> p, pt;            // proxy of batch element b, [HW][Sp]
  std::vector<V> x, dy, acc;           // the unit's x, dL/dy and its y or dL/dx accumulator, [HW]
  std::vector<V> xt, dyt, acct;        // the transposed x, dL/dy and accumulator
  std::vector<acc_t> dpst;             // the transposed dL/dproxy sums
  std::vector<V> w, bias, merge;       // projection rows [K][Sp][6], biases [K][6], merge weights [K]
  std::vector<V> lines, h, zero;       // padded lines: two (forward h, backward adjoints), a group's h, zeros
  std::vector<LaneKept<V>> kept, zkept;  // a group's kept values (padded lines), a zero line
  std::vector<V> dg;                   // a group's logit gradients [pixel][6]
  std::vector<int64_t> qs;             // a group's pixels, in group order
  std::vector<acc_t> dps;              // dL/dproxy of b, summed over the lanes of its units so far [HW][Sp]
  std::vector<V> dwb;                  // dL/dweight [Sp][6], dL/dbias [6] per lane

  void init(const PropagateArgs& a, int64_t S_, bool backward) {
    H = a.H;
    W = a.W;
    HW = a.H * a.W;
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
    w.resize(a.K * Sp * kGateFields);
    bias.resize(a.K * kGateFields);
    merge.resize(a.K);
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
  }

  // The arrays of a row (image layout) or column (transposed) direction.
  LaneData<acc_t> data(bool columns) {
    if (columns) return {pt.data(), xt.data(), dyt.data(), acct.data(), dpst.data()};
    return {p.data(), x.data(), dy.data(), acc.data(), dps.data()};
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

  // The dL/dproxy sums of both layouts, in the image layout (the transposed part zeroed).
  void gather_dps() {
    if (!cols) return;
    transpose_records<true>(dpst.data(), dps.data(), W, H, Sp);
    std::fill(dpst.begin(), dpst.end(), acc_t(0));
  }

  // Convert (and lay out [pixel][s]) the proxy of batch element `bb` unless it is the current one.
  template <typename scalar_t>
  void load_proxy(const scalar_t* proxy, int64_t bb) {
    if (bb == b) return;
    b = bb;
    const scalar_t* src = proxy + bb * S * HW;
    for (int64_t s = 0; s < S; ++s) {
      for (int64_t q = 0; q < HW; ++q) p[q * Sp + s] = static_cast<acc_t>(src[s * HW + q]);
    }
    if (cols) transpose_records<false>(p.data(), pt.data(), H, W, Sp);
  }

  // The projection rows, biases and merge weights of channels [c0, c0 + nc), zero in the lanes past nc.
  template <typename scalar_t>
  void load_rows(const ProjInputs<scalar_t>& in, const PropagateArgs& a, int64_t c0, int64_t nc) {
    std::fill(w.begin(), w.end(), V{});
    std::fill(bias.begin(), bias.end(), V{});
    std::fill(merge.begin(), merge.end(), V{});
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

  // dst[q][l] = the plane of channel l at pixel q (`src`: nc planes of HW), zero in the lanes past nc.
  template <typename scalar_t>
  void interleave(const scalar_t* src, int64_t nc, std::vector<V>& dst) const {
    if (nc < lanes) std::fill(dst.begin(), dst.begin() + HW, V{});
    for (int64_t l = 0; l < nc; ++l) {
      for (int64_t q = 0; q < HW; ++q) dst[q][l] = static_cast<acc_t>(src[l * HW + q]);
    }
  }

  // The accumulator's first nc lanes written out as nc planes.
  template <typename scalar_t>
  void deinterleave(int64_t nc, scalar_t* dst) const {
    for (int64_t l = 0; l < nc; ++l) {
      for (int64_t q = 0; q < HW; ++q) dst[l * HW + q] = static_cast<scalar_t>(acc[q][l]);
    }
  }
};

// Forward of direction k over the unit: m * (sigmoid(u) h + d x) added to ws.acc.
template <typename acc_t>
void lane_forward(const LaneGeometry& lg, int64_t k, LaneWorkspace<acc_t>& ws) {
  using V = typename Vec<acc_t>::type;
  const int64_t M = lg.g.M, Sp = ws.Sp;
  const V m = ws.merge[k];
  const LaneData<acc_t> d = ws.data(lg.g.columns);
  const V *w = ws.w.data() + k * Sp * kGateFields, *bias = ws.bias.data() + k * kGateFields, *X = d.x;
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
        project_pixel(w, bias, P + q * Sp, Sp, g);
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

constexpr int64_t kSumBlock = 32;

// Backward of direction k over the unit: adds this direction's share of dL/dx to ws.acc, its dL/dproxy
// to ws.dps, sets ws.dwb to its dL/dweight, dL/dbias per lane and returns dL/dmerge per lane.
template <typename acc_t>
typename Vec<acc_t>::type lane_backward(const LaneGeometry& lg, int64_t k, LaneWorkspace<acc_t>& ws) {
  using V = typename Vec<acc_t>::type;
  const int64_t M = lg.g.M, P2 = M + 2, Sp = ws.Sp;
  const V m = ws.merge[k];
  const LaneData<acc_t> ld = ws.data(lg.g.columns);
  const V *w = ws.w.data() + k * Sp * kGateFields, *bias = ws.bias.data() + k * kGateFields, *X = ld.x,
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
        project_pixel(w, bias, P + q * Sp, Sp, g);
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
    // the adjoint of the projection: dL/dproxy (summed over the lanes at once: a scalar per pixel and
    // proxy channel to keep, not a vector), dL/dweight and dL/dbias (per lane)
    const int64_t n = len * M;
    for (int64_t i = 0; i < n; ++i) {
      const V* d = dg + i * kGateFields;
      acc_t* dp = ld.dps + qs[i] * Sp;
      for (int64_t s = 0; s < Sp; ++s) {
        const V* ws_ = w + s * kGateFields;
        // a tree, not a chain of six dependent multiply-adds
        const V v = (ws_[0] * d[0] + ws_[1] * d[1]) + (ws_[2] * d[2] + ws_[3] * d[3]) + (ws_[4] * d[4] + ws_[5] * d[5]);
        dp[s] += tree_sum<acc_t, kVecBytes>(&v);
      }
    }
    // (in blocks of kSumBlock pixels whose sums are then added: short chains, a float32 error like a
    // pairwise sum's for planes of a few thousand pixels)
    V* dwv = ws.dwb.data();
    for (int64_t i0 = 0; i0 < n; i0 += kSumBlock) {
      const int64_t i1 = std::min(n, i0 + kSumBlock);
      for (int f = 0; f < kGateFields; ++f) {
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
  at::parallel_for(0, U, grain, [&](int64_t begin, int64_t end) {
    const FlushDenormals ftz;
    LaneWorkspace<acc_t> ws;
    ws.init(a, S, /*backward=*/false);
    for (int64_t u = begin; u < end; ++u) {
      const int64_t b = u / G, c0 = (u % G) * NL, nc = std::min(NL, a.C - c0);
      ws.load_proxy(in.proxy, b);
      ws.load_rows(in, a, c0, nc);
      ws.load_unit(in.x + (b * a.C + c0) * HW, static_cast<const scalar_t*>(nullptr), nc);
      for (int64_t k = 0; k < a.K; ++k) lane_forward(lane_geometry(a, k), k, ws);
      ws.store_unit(nc, out + (b * a.C + c0) * HW);
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
    dprox[t] = at::zeros({nb, S, HW}, acc_opts);
  }
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
        acc_t* dst = dp + (ws.b - b0) * S * HW;
        for (int64_t q = 0; q < HW; ++q) {
          for (int64_t s = 0; s < S; ++s) dst[s * HW + q] += ws.dps[q * Sp + s];
        }
        std::fill(ws.dps.begin(), ws.dps.end(), acc_t(0));
      };
      ws.b = -1;
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t b = u / G, c0 = (u % G) * NL, nc = std::min(NL, a.C - c0);
        if (b != ws.b) flush();
        ws.load_proxy(in.proxy, b);
        ws.load_rows(in, a, c0, nc);
        ws.load_unit(in.x + (b * a.C + c0) * HW, gy + (b * a.C + c0) * HW, nc);
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
        ws.store_unit(nc, dxo + (b * a.C + c0) * HW);
      }
      flush();
    }
  });
  // reduce the partials in task order
  at::Tensor dwb_sum = dwb.sum(0);
  dweight.copy_(dwb_sum.narrow(0, 0, R * S).view({R, S}));
  dbias.copy_(dwb_sum.narrow(0, R * S, R));
  at::Tensor dp_acc = at::zeros({a.B, S, HW}, acc_opts);
  for (int64_t t = 0; t < tasks; ++t) {
    if (dprox[t].size(0) > 0) dp_acc.narrow(0, task_begin(t) / G, dprox[t].size(0)).add_(dprox[t]);
  }
  dproxy.copy_(dp_acc.view(dproxy.sizes()));
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

at::Tensor propagate_proj_fwd_cpu(const at::Tensor& x, const at::Tensor& proxy, const at::Tensor& weight,
                                  const at::Tensor& bias, const at::Tensor& merge, std::vector<std::string> directions,
                                  int64_t chunk_size) {
  const ProjArgs pa = proj_args(x, proxy, weight, bias, merge, directions, chunk_size, "gspn propagate_proj_fwd");
  at::Tensor y = at::empty_like(pa.p.x);
  if (y.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gspn_propagate_proj_fwd_cpu",
                                  [&] { propagate_proj_forward_cpu<scalar_t>(pa, y); });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> propagate_proj_bwd_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& proxy, const at::Tensor& weight,
    const at::Tensor& bias, const at::Tensor& merge, std::vector<std::string> directions, int64_t chunk_size) {
  const ProjArgs pa = proj_args(x, proxy, weight, bias, merge, directions, chunk_size, "gspn propagate_proj_bwd");
  TORCH_CHECK(grad_y.sizes() == x.sizes() && grad_y.scalar_type() == x.scalar_type(),
              "gspn propagate_proj_bwd: grad_y must have the shape and dtype of x");
  const PropagateArgs& a = pa.p;
  const at::Tensor gy = grad_y.contiguous();
  at::Tensor dx = at::empty_like(a.x), dproxy = at::zeros_like(pa.proxy), dweight = at::zeros_like(pa.weight),
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
  m.impl("propagate_fwd", &gspn::propagate_fwd_cpu);
  m.impl("propagate_bwd", &gspn::propagate_bwd_cpu);
  m.impl("propagate_proj_fwd", &gspn::propagate_proj_fwd_cpu);
  m.impl("propagate_proj_bwd", &gspn::propagate_proj_bwd_cpu);
}
