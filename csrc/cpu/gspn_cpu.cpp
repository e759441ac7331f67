// CPU kernels of the GSPN scan, forward and backward.
//
// Parallel (at::parallel_for, OpenMP) over (batch x channel) lines x chunks; within one line of the
// scan a plain loop over the contiguous line axis that the compiler vectorises.  The previous line
// is kept in a zero-padded accumulator buffer, so the boundary taps need no branches and 16-bit
// inputs carry their state in float32.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../gspn_layout.h"
#include "../gspn_step.h"
#include "gspn_transpose.h"

namespace gspn {
namespace {

// Lines are walked against their memory order where the scan walks them that way (b2t's forward,
// t2b's backward): elements in blocks of kBlock, the blocks from the end of the line to its start,
// so that the whole op reads memory in one descending sweep.  Walking each line upwards while the
// lines go downwards leaves the hardware prefetchers a sawtooth they do not follow (the b2t forward
// ran ~1.8x slower than the t2b one at 512x512).  No element depends on another of its line, so the
// order changes no result.
constexpr int64_t kBlock = 16;

// Calls span(j0, j1) on [lo, hi): once, or (kDesc) on blocks of kBlock from hi down to lo.  The spans
// are always-inline functions taking the pointers as __restrict__ arguments, so that their loops
// vectorise although the call goes through a lambda.
template <bool kDesc, typename Span>
inline __attribute__((always_inline)) void walk_line(int64_t lo, int64_t hi, Span&& span) {
  if constexpr (kDesc) {
    int64_t j = hi;
    for (; j - kBlock >= lo; j -= kBlock) span(j - kBlock, j);
    if (j > lo) span(lo, j);
  } else {
    span(lo, hi);
  }
}

// One line of the forward.  Separate functions with __restrict__ pointers (a lambda's captures lose
// the qualifier) so that the compiler vectorises the loops over the line.
template <typename scalar_t, typename acc_t>
inline __attribute__((always_inline)) void forward_span(
    const scalar_t* __restrict__ xs, const scalar_t* __restrict__ ls, const scalar_t* __restrict__ ns,
    const scalar_t* __restrict__ ms, const scalar_t* __restrict__ ps, const acc_t* __restrict__ prev,
    acc_t* __restrict__ cur, scalar_t* __restrict__ hs, int64_t j0, int64_t j1, bool first) {
  if (first) {
    for (int64_t j = j0; j < j1; ++j) {
      const acc_t v = forward_first<acc_t>(xs[j], ls[j]);
      cur[j] = v;
      hs[j] = static_cast<scalar_t>(v);
    }
  } else {
    for (int64_t j = j0; j < j1; ++j) {
      const acc_t v = forward_step<acc_t>(xs[j], ls[j], ns[j], ms[j], ps[j], prev[j - 1], prev[j], prev[j + 1]);
      cur[j] = v;
      hs[j] = static_cast<scalar_t>(v);
    }
  }
}

template <bool kDesc, typename scalar_t, typename acc_t>
void forward_line(const scalar_t* __restrict__ xs, const scalar_t* __restrict__ ls,
                  const scalar_t* __restrict__ ns, const scalar_t* __restrict__ ms,
                  const scalar_t* __restrict__ ps, const acc_t* __restrict__ prev, acc_t* __restrict__ cur,
                  scalar_t* __restrict__ hs, int64_t M, bool first) {
  walk_line<kDesc>(0, M, [&](int64_t j0, int64_t j1) {
    forward_span<scalar_t, acc_t>(xs, ls, ns, ms, ps, prev, cur, hs, j0, j1, first);
  });
}

// One line of the backward: the adjoint from the next line's (a_n, w*_n), the five gradients, and
// this line's adjoint.  Only the adjoints live in zero-padded buffers (a_n[-1] = a_n[M] = 0); the
// next line's gates and the previous line's output h_p are read where they are (the inputs, a column
// tile, or a line of zeros), so the first and last positions, whose outer taps are 0, are done apart.
template <typename scalar_t, typename acc_t>
inline __attribute__((always_inline)) void backward_point(
    int64_t j, acc_t wn_r, acc_t wp_l, acc_t h_neg, acc_t h_pos, const scalar_t* gs, const scalar_t* xs,
    const scalar_t* ls, const acc_t* a_n, const scalar_t* wm_n, const scalar_t* h_p, acc_t* a_c, scalar_t* dx,
    scalar_t* dlam, scalar_t* dwn, scalar_t* dwm, scalar_t* dwp) {
  const acc_t a = adjoint_step<acc_t>(gs[j], wn_r, a_n[j + 1], wm_n[j], a_n[j], wp_l, a_n[j - 1]);
  const StepGrads<acc_t> d = step_grads<acc_t>(a, xs[j], ls[j], h_neg, h_p[j], h_pos);
  dx[j] = static_cast<scalar_t>(d.dx);
  dlam[j] = static_cast<scalar_t>(d.dlam);
  dwn[j] = static_cast<scalar_t>(d.dwn);
  dwm[j] = static_cast<scalar_t>(d.dwm);
  dwp[j] = static_cast<scalar_t>(d.dwp);
  a_c[j] = a;
}

// Positions [j0, j1) of a line, all inside it (0 < j0, j1 < M - 1).
template <typename scalar_t, typename acc_t>
inline __attribute__((always_inline)) void backward_span(
    const scalar_t* __restrict__ gs, const scalar_t* __restrict__ xs, const scalar_t* __restrict__ ls,
    const acc_t* __restrict__ a_n, const scalar_t* __restrict__ wn_n, const scalar_t* __restrict__ wm_n,
    const scalar_t* __restrict__ wp_n, const scalar_t* __restrict__ h_p, acc_t* __restrict__ a_c,
    scalar_t* __restrict__ dx, scalar_t* __restrict__ dlam, scalar_t* __restrict__ dwn, scalar_t* __restrict__ dwm,
    scalar_t* __restrict__ dwp, int64_t j0, int64_t j1) {
  for (int64_t j = j0; j < j1; ++j) {
    backward_point<scalar_t, acc_t>(j, wn_n[j + 1], wp_n[j - 1], h_p[j - 1], h_p[j + 1], gs, xs, ls, a_n, wm_n, h_p,
                                    a_c, dx, dlam, dwn, dwm, dwp);
  }
}

template <bool kDesc, typename scalar_t, typename acc_t>
void backward_line(const scalar_t* __restrict__ gs, const scalar_t* __restrict__ xs,
                   const scalar_t* __restrict__ ls, const acc_t* __restrict__ a_n,
                   const scalar_t* __restrict__ wn_n, const scalar_t* __restrict__ wm_n,
                   const scalar_t* __restrict__ wp_n, const scalar_t* __restrict__ h_p, acc_t* __restrict__ a_c,
                   scalar_t* __restrict__ dx, scalar_t* __restrict__ dlam, scalar_t* __restrict__ dwn,
                   scalar_t* __restrict__ dwm, scalar_t* __restrict__ dwp, int64_t M) {
  const acc_t zero(0);
  // The first and last positions, whose outer taps are 0 (scalar code: a lambda is fine here).
  const auto end_point = [&](int64_t j) {
    backward_point<scalar_t, acc_t>(j, j + 1 < M ? acc_t(wn_n[j + 1]) : zero, j > 0 ? acc_t(wp_n[j - 1]) : zero,
                                    j > 0 ? acc_t(h_p[j - 1]) : zero, j + 1 < M ? acc_t(h_p[j + 1]) : zero, gs, xs,
                                    ls, a_n, wm_n, h_p, a_c, dx, dlam, dwn, dwm, dwp);
  };
  end_point(kDesc ? M - 1 : 0);
  walk_line<kDesc>(1, M - 1, [&](int64_t j0, int64_t j1) {
    backward_span<scalar_t, acc_t>(gs, xs, ls, a_n, wn_n, wm_n, wp_n, h_p, a_c, dx, dlam, dwn, dwm, dwp, j0, j1);
  });
  if (M > 1) end_point(kDesc ? 0 : M - 1);
}

// Column scans (l2r / r2l) keep the image layout: line s of a plane is its column s, element j at
// j * L + s.  They are processed in tiles of kTile lines, transpose-copied between the plane and a
// small contiguous buffer (kTile consecutive elements of each row: whole cache lines), so the line
// loops run on contiguous memory without a full-tensor transpose.  The tile's lines are kPad
// elements longer than M: with a stride of exactly M (a power of two, typically) the kTile lines
// written for one row would map onto one or two L1 sets and evict each other.
constexpr int64_t kTile = 16;
constexpr int64_t kPad = 16;
// Rows ahead that the column gathers and scatters prefetch (see move_columns).
constexpr int64_t kAhead = 32;

#if defined(__AVX2__)
// The tile lines of the 8 columns cols[h .. h + 7], which must be consecutive (ascending or
// descending): the lowest column c0, and for column c0 + k its tile line.
struct ColumnBlock {
  int64_t c0;
  int64_t line[8];
};

inline bool consecutive_columns(const int64_t* cols, int64_t tn) {
  if (tn % 8 != 0) return false;
  const int64_t step = tn > 1 ? cols[1] - cols[0] : 1;
  if (step != 1 && step != -1) return false;
  for (int64_t t = 1; t < tn; ++t) {
    if (cols[t] - cols[t - 1] != step) return false;
  }
  return true;
}

inline ColumnBlock column_block(const int64_t* cols, int64_t h) {
  ColumnBlock blk;
  const bool ascending = cols[h + 7] > cols[h];
  blk.c0 = ascending ? cols[h] : cols[h + 7];
  for (int k = 0; k < 8; ++k) blk.line[k] = ascending ? h + k : h + 7 - k;
  return blk;
}
#endif

// Between the plane and a tile of tn lines: tile[t * stride + j] = plane[j * L + cols[t]] for the M
// rows (kScatter: the other way).  float tiles of consecutive columns (every tile but a chunk's last,
// partial one) move 8 x 8 blocks through registers where AVX2 is available; the rest element by
// element.
template <bool kScatter, typename T>
void move_columns(T* __restrict__ plane, T* __restrict__ tile, const int64_t* cols, int64_t tn, int64_t L, int64_t M,
                  int64_t stride) {
  int64_t j_done = 0;
#if defined(__AVX2__)
  if constexpr (std::is_same_v<T, float>) {
    if (consecutive_columns(cols, tn)) {
      const int64_t c_lo = std::min(cols[0], cols[tn - 1]), c_hi = std::max(cols[0], cols[tn - 1]);
      for (int64_t j0 = 0; j0 + 8 <= M; j0 += 8) {
        if (j0 + kAhead + 8 <= M) {
          for (int i = 0; i < 8; ++i) {
            T* row = plane + (j0 + kAhead + i) * L;
            if (kScatter) {
              __builtin_prefetch(row + c_lo, 1, 3);
              __builtin_prefetch(row + c_hi, 1, 3);
            } else {
              __builtin_prefetch(row + c_lo, 0, 3);
              __builtin_prefetch(row + c_hi, 0, 3);
            }
          }
        }
        for (int64_t h = 0; h < tn; h += 8) {
          const ColumnBlock blk = column_block(cols, h);
          __m256 r[8];
          for (int i = 0; i < 8; ++i) {
            r[i] = _mm256_loadu_ps(kScatter ? tile + blk.line[i] * stride + j0 : plane + (j0 + i) * L + blk.c0);
          }
          transpose8(r);
          for (int i = 0; i < 8; ++i) {
            _mm256_storeu_ps(kScatter ? plane + (j0 + i) * L + blk.c0 : tile + blk.line[i] * stride + j0, r[i]);
          }
        }
      }
      j_done = M / 8 * 8;
    }
  }
#endif
  for (int64_t j = j_done; j < M; ++j) {
    T* row = plane + j * L;
    for (int64_t t = 0; t < tn; ++t) {
      if (kScatter) {
        row[cols[t]] = tile[t * stride + j];
      } else {
        tile[t * stride + j] = row[cols[t]];
      }
    }
  }
}

template <typename T>
void gather_columns(const T* plane, T* tile, const int64_t* cols, int64_t tn, int64_t L, int64_t M, int64_t stride) {
  move_columns<false>(const_cast<T*>(plane), tile, cols, tn, L, M, stride);
}

template <typename T>
void scatter_columns(T* plane, const T* tile, const int64_t* cols, int64_t tn, int64_t L, int64_t M, int64_t stride) {
  move_columns<true>(plane, const_cast<T*>(tile), cols, tn, L, M, stride);
}

template <typename scalar_t>
void forward_cpu_kernel(const scalar_t* x, const scalar_t* lam, const scalar_t* wn, const scalar_t* wm,
                        const scalar_t* wp, scalar_t* h, int64_t N, int64_t L, int64_t M, int64_t k, bool reverse,
                        bool columns) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t G = num_groups(L, k);
  const int64_t Mp = M + kPad, TM = kTile * Mp;
  at::parallel_for(0, N * G, parallel_grain(L / G * M), [&](int64_t begin, int64_t end) {
    // Two padded lines: index 0 and M + 1 stay 0 and stand for the taps outside the line.
    std::vector<acc_t> buf(2 * (M + 2), acc_t(0));
    // Column scans: tiles of the five inputs and of the output.
    std::vector<scalar_t> tile(columns ? 6 * TM : 0);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / G, g = task % G;
      const int64_t s0 = group_begin(g, k), s1 = group_end(g, k, L), len = s1 - s0;
      const int64_t plane = n * L * M;
      const scalar_t* in[5] = {x + plane, lam + plane, wn + plane, wm + plane, wp + plane};
      acc_t* prev = buf.data() + 1;
      acc_t* cur = buf.data() + (M + 2) + 1;
      for (int64_t t0 = 0; t0 < len; t0 += columns ? kTile : len) {
        const int64_t tn = columns ? std::min(kTile, len - t0) : len - t0;
        int64_t cols[kTile];
        if (columns) {
          for (int64_t t = 0; t < tn; ++t) cols[t] = line_at(t0 + t, s0, s1, reverse);
          for (int a = 0; a < 5; ++a) gather_columns(in[a], tile.data() + a * TM, cols, tn, L, M, Mp);
        }
        for (int64_t t = 0; t < tn; ++t) {
          const int64_t step = t0 + t;
          const scalar_t* p[5];
          scalar_t* out;
          if (columns) {
            for (int a = 0; a < 5; ++a) p[a] = tile.data() + a * TM + t * Mp;
            out = tile.data() + 5 * TM + t * Mp;
          } else {
            const int64_t off = line_at(step, s0, s1, reverse) * M;
            for (int a = 0; a < 5; ++a) p[a] = in[a] + off;
            out = h + plane + off;
          }
          // Row scans walking backwards in memory (b2t) walk their lines backwards too.
          if (!columns && reverse) {
            forward_line<true, scalar_t, acc_t>(p[0], p[1], p[2], p[3], p[4], prev, cur, out, M, step == 0);
          } else {
            forward_line<false, scalar_t, acc_t>(p[0], p[1], p[2], p[3], p[4], prev, cur, out, M, step == 0);
          }
          std::swap(prev, cur);
        }
        if (columns) scatter_columns(h + plane, tile.data() + 5 * TM, cols, tn, L, M, Mp);
      }
    }
  });
}

template <typename scalar_t>
void backward_cpu_kernel(const scalar_t* gh, const scalar_t* x, const scalar_t* lam, const scalar_t* wn,
                         const scalar_t* wm, const scalar_t* wp, const scalar_t* h, scalar_t* dx, scalar_t* dlam,
                         scalar_t* dwn, scalar_t* dwm, scalar_t* dwp, int64_t N, int64_t L, int64_t M, int64_t k,
                         bool reverse, bool columns) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t G = num_groups(L, k);
  const int64_t P = M + 2;
  const int64_t Mp = M + kPad, TM = kTile * Mp;
  at::parallel_for(0, N * G, parallel_grain(3 * L / G * M), [&](int64_t begin, int64_t end) {
    // Zero-padded lines (index 0 and M + 1 stay 0): the adjoint of the next line in scan order
    // (read) and of this line (written; the two swap every step).  A line of zeros stands for the
    // gates of the line after a group's last and the output of the line before its first; the next
    // line's gates are read in place, except at a column tile's edge, where they are kept in `edge`
    // before the next tile is gathered over them.
    std::vector<acc_t> buf(2 * P, acc_t(0));
    std::vector<scalar_t> zeros(M, scalar_t(0));
    std::vector<scalar_t> edge(columns ? 3 * M : 0);
    // Column scans: tiles of the six inputs (grad, x, lam, w_neg, w_mid, w_pos), the five gradients,
    // and the outputs of the previous lines.
    std::vector<scalar_t> tile(columns ? 12 * TM : 0);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / G, g = task % G;
      const int64_t s0 = group_begin(g, k), s1 = group_end(g, k, L), len = s1 - s0;
      const int64_t plane = n * L * M;
      const scalar_t* in[6] = {gh + plane, x + plane, lam + plane, wn + plane, wm + plane, wp + plane};
      scalar_t* grad[5] = {dx + plane, dlam + plane, dwn + plane, dwm + plane, dwp + plane};
      std::fill(buf.begin(), buf.end(), acc_t(0));
      acc_t* a_nxt = buf.data() + 1;
      acc_t* a_cur = buf.data() + P + 1;
      const scalar_t* w_nxt[3] = {zeros.data(), zeros.data(), zeros.data()};
      // Tiles [t_lo, t_hi) of scan steps, walked against scan order.
      for (int64_t t_hi = len; t_hi > 0;) {
        const int64_t t_lo = columns ? std::max<int64_t>(0, t_hi - kTile) : 0;
        const int64_t tn = t_hi - t_lo;
        const int64_t h_lo = std::max<int64_t>(0, t_lo - 1);  // previous lines: steps [h_lo, t_hi - 1)
        int64_t cols[kTile], hcols[kTile];
        if (columns) {
          for (int64_t t = 0; t < tn; ++t) cols[t] = line_at(t_lo + t, s0, s1, reverse);
          for (int64_t t = 0; t < t_hi - 1 - h_lo; ++t) hcols[t] = line_at(h_lo + t, s0, s1, reverse);
          for (int a = 0; a < 6; ++a) gather_columns(in[a], tile.data() + a * TM, cols, tn, L, M, Mp);
          gather_columns(h + plane, tile.data() + 11 * TM, hcols, t_hi - 1 - h_lo, L, M, Mp);
        }
        for (int64_t step = t_hi - 1; step >= t_lo; --step) {
          const scalar_t* p[6];
          scalar_t* d[5];
          const scalar_t* hp = zeros.data();
          if (columns) {
            const int64_t t = step - t_lo;
            for (int a = 0; a < 6; ++a) p[a] = tile.data() + a * TM + t * Mp;
            for (int a = 0; a < 5; ++a) d[a] = tile.data() + (6 + a) * TM + t * Mp;
            if (step > 0) hp = tile.data() + 11 * TM + (step - 1 - h_lo) * Mp;
          } else {
            const int64_t off = line_at(step, s0, s1, reverse) * M;
            for (int a = 0; a < 6; ++a) p[a] = in[a] + off;
            for (int a = 0; a < 5; ++a) d[a] = grad[a] + off;
            if (step > 0) hp = h + plane + line_at(step - 1, s0, s1, reverse) * M;
          }
          // The backward walks the scan's lines last to first: for t2b row scans, backwards in memory.
          if (!columns && !reverse) {
            backward_line<true, scalar_t, acc_t>(p[0], p[1], p[2], a_nxt, w_nxt[0], w_nxt[1], w_nxt[2], hp, a_cur,
                                                 d[0], d[1], d[2], d[3], d[4], M);
          } else {
            backward_line<false, scalar_t, acc_t>(p[0], p[1], p[2], a_nxt, w_nxt[0], w_nxt[1], w_nxt[2], hp, a_cur,
                                                  d[0], d[1], d[2], d[3], d[4], M);
          }
          std::swap(a_nxt, a_cur);
          for (int a = 0; a < 3; ++a) w_nxt[a] = p[3 + a];
        }
        if (columns && t_lo > 0) {
          for (int a = 0; a < 3; ++a) {
            std::copy(w_nxt[a], w_nxt[a] + M, edge.data() + a * M);
            w_nxt[a] = edge.data() + a * M;
          }
        }
        if (columns) {
          for (int a = 0; a < 5; ++a) scatter_columns(grad[a], tile.data() + (6 + a) * TM, cols, tn, L, M, Mp);
        }
        t_hi = t_lo;
      }
    }
  });
}

at::Tensor scan_fwd_cpu(const at::Tensor& x, const at::Tensor& lam, const at::Tensor& w_neg,
                        const at::Tensor& w_mid, const at::Tensor& w_pos, c10::string_view direction,
                        int64_t chunk_size) {
  return scan_forward(x, lam, w_neg, w_mid, w_pos, direction, chunk_size, /*transpose_copy=*/false,
                      [](const ScanArgs& a, at::Tensor& h) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "gspn_scan_fwd_cpu", [&] {
      forward_cpu_kernel<scalar_t>(a.x.const_data_ptr<scalar_t>(), a.lam.const_data_ptr<scalar_t>(),
                                   a.wn.const_data_ptr<scalar_t>(), a.wm.const_data_ptr<scalar_t>(),
                                   a.wp.const_data_ptr<scalar_t>(), h.mutable_data_ptr<scalar_t>(), a.N, a.L,
                                   a.M, a.k, a.reverse, a.columns);
    });
  });
}

Grads scan_bwd_cpu(const at::Tensor& grad_h, const at::Tensor& x, const at::Tensor& lam, const at::Tensor& w_neg,
                   const at::Tensor& w_mid, const at::Tensor& w_pos, const at::Tensor& h,
                   c10::string_view direction, int64_t chunk_size) {
  return scan_backward(
      grad_h, x, lam, w_neg, w_mid, w_pos, h, direction, chunk_size, /*transpose_copy=*/false,
      [](const ScanArgs& a, const at::Tensor& g, const at::Tensor& hc, at::Tensor& dx, at::Tensor& dlam,
         at::Tensor& dwn, at::Tensor& dwm, at::Tensor& dwp) {
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "gspn_scan_bwd_cpu", [&] {
          backward_cpu_kernel<scalar_t>(
              g.const_data_ptr<scalar_t>(), a.x.const_data_ptr<scalar_t>(), a.lam.const_data_ptr<scalar_t>(),
              a.wn.const_data_ptr<scalar_t>(), a.wm.const_data_ptr<scalar_t>(), a.wp.const_data_ptr<scalar_t>(),
              hc.const_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>(), dlam.mutable_data_ptr<scalar_t>(),
              dwn.mutable_data_ptr<scalar_t>(), dwm.mutable_data_ptr<scalar_t>(), dwp.mutable_data_ptr<scalar_t>(),
              a.N, a.L, a.M, a.k, a.reverse, a.columns);
        });
      });
}

}  // namespace
}  // namespace gspn

TORCH_LIBRARY_IMPL(gspn_lightning, CPU, m) {
  m.impl("scan_fwd", &gspn::scan_fwd_cpu);
  m.impl("scan_bwd", &gspn::scan_bwd_cpu);
}
