// Local tile kernels: the forward of chunked (local) GSPN layers on small grids, all directions of a
// spatial tile in one CTA, the merged output written once.  propagate_proj_fwd (tile_fwd_kernel, the
// mixer's fused propagation with its gate projection) and attention_fwd (tile_attn_fwd_kernel, the
// SD-XL swap's numerator and denominator states); the math is gspn_step.h's, as in the lane kernels
// (gspn_lanes_kernels.h, gspn_attention_kernels.h), whose lane layout, projection rows (LaneRows) and
// proxy loads these reuse; and propagate_proj's backward (tile_bwd_kernel, below, proxies of at most
// kMaxLaneS channels).  The ops' dispatch (gspn_cuda_plan.h) sends chunked layers with
// 1 <= chunk_size <= kMaxChunk here (tile_pays); attention's backward keeps the lane kernels.
//
// Why a tile: with chunk_size = k every direction restarts every k lines (absolute positions), so h
// of a group of k lines depends only on the inputs of those lines within k - 1 positions sideways.
// A CTA owns a tile of TH x TW pixels aligned to the chunk grid (TH, TW multiples of k, or the whole
// map's side) and one group of G channel lanes; for each direction in turn it recomputes the tile's
// lines over the tile's positions plus a halo of k - 1 positions on each side (clipped to the map),
// every group of the tile at once: k steps per direction, one __syncthreads each, the halo shrinking
// by one position per step (step s computes the positions the steps after it still read: every value
// read is exact, nothing is approximated at the halo's edge).  Each direction's term m_k (sigmoid(u) h
// + d x) (attention: m_k hn_k and m_k hd_k) of the tile's own pixels is added in direction order into
// an acc_t accumulator in shared memory; at the end the CTA writes y (attention: sigmoid(q + u) num /
// max(den, tiny)) once, channels-last.  No per-direction partials, no merge kernel, no atomics, and
// K k + 2 barriers per CTA instead of the lane kernels' one per line of every direction.  In float32
// and float64 the sums are the merge kernels' in the same order (the same values); in 16-bit types
// the terms are added in float instead of being rounded to the input type first.
//
// Grid (tiles, channel groups, B), block (G lanes, P): thread (lane, p) handles items p, p + P, ... of
// a step, an item being one position of one line (one per group of the tile).  Shared memory: the
// accumulators [accs][TH TW][G] and the states' line buffers [states][TH or TW lines][halo'd positions
// + 2 pads][G] (acc_t; all lines of the tile are kept, a step reads the line before it); for
// propagate_proj with a proxy of more than kMaxLaneS channels (GSPN-DiT: d_state = D / 16) also the
// direction's projection rows [G][S * 6 + 1], which do not fit in registers.
//
// Status: executed on the CPU by tests/test_cuda_emulation.py (host emulation) and compiled by nvcc for
// sm_80 / sm_90 (tests/test_ptxas.py); not yet run or timed on a GPU.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "gspn_attention_kernels.h"
#include "gspn_lanes_kernels.h"

#if defined(__CUDACC__) || defined(__HIPCC__)
#define GSPN_NO_UNROLL _Pragma("unroll 1")
#else
#define GSPN_NO_UNROLL
#endif

namespace gspn {
namespace tile_cuda {

constexpr int kMaxThreads = 256;          // G x P threads per CTA at most
constexpr int64_t kMaxChunk = 8;          // chunk sizes the tile kernels take (the dispatch rule)
constexpr int64_t kMaxTileS = 128;        // proxies the propagate_proj tile kernel takes (rows in shared
                                          // memory past kMaxLaneS)
constexpr int64_t kMinSide = 16;          // a tile's side: at least this, and at least 4 chunks
constexpr int64_t kMaxShared = lanes_cuda::kMaxShared;
constexpr int64_t kTargetCtas = lanes_cuda::kTargetCtas;

// The dispatch rule of the ops (forward): chunked layers with chunks of at most kMaxChunk lines and a
// proxy of at most `max_s` channels (propagate_proj: kMaxTileS, the projection rows in shared memory
// past kMaxLaneS, as GSPN-DiT's d_state = D / 16 needs; attention: kMaxLaneS, in registers).  Below
// it the serial chain is short (k steps a direction) and a tile's halo (k - 1 positions a side, a tile
// side of max(16, 4k)) costs at most ~1.5x the tile's projections, against the lane kernels' K
// partial maps written and read back by the merge kernel (or, past kMaxLaneS, the materialised logits).
inline bool tile_pays(int64_t chunk, int64_t S, int64_t max_s) { return chunk >= 1 && chunk <= kMaxChunk && S <= max_s; }

// The proxy capacity of a tile kernel instantiation: 8 or 16 (rows in registers), 0 (rows in shared
// memory, any S up to kMaxTileS).
inline int tile_capacity(int64_t S) { return S <= 8 ? 8 : (S <= lanes_cuda::kMaxLaneS ? 16 : 0); }

struct TileGeometry {
  int64_t B, C, H, W, K, chunk, S;
  int G, P;                    // lanes (channels) and item slots of a CTA
  int64_t groups;              // channel groups, ceil(C / G)
  int64_t TH, TW;              // a tile's rows and columns (the last tile of a row / column may be smaller)
  int64_t tiles_w;             // tiles per row of tiles
  int64_t acc_elems;           // acc_t elements of one accumulator: TH TW G
  int64_t h_elems;             // acc_t elements of one state's line buffers
  int64_t rows_elems;          // acc_t elements of the projection rows in shared memory (capacity 0)
  int64_t dp_elems;            // backward: acc_t elements of the tile's dL/dproxy accumulator, TH TW S
  int64_t red_elems;           // backward: acc_t elements of a CTA's global reduction workspace
  unsigned int transpose, reverse;  // bit k: direction k's (bits, not arrays: a kernel parameter indexed
                                    // at run time would be copied to local memory)
};

// What a thread of a CTA works on: its lane, item slot, batch element, channel and tile.
struct TileTask {
  int lane, p, tid, nthreads;
  int64_t b, c, i0, i1, j0, j1;  // the tile: rows [i0, i1), columns [j0, j1)
  bool live;                      // c < C
  __device__ TileTask(const TileGeometry& geo) {
    lane = static_cast<int>(threadIdx.x);
    p = static_cast<int>(threadIdx.y);
    tid = p * geo.G + lane;
    nthreads = geo.G * geo.P;
    const int64_t tile = blockIdx.x;
    c = static_cast<int64_t>(blockIdx.y) * geo.G + lane;
    b = blockIdx.z;
    live = c < geo.C;
    i0 = tile / geo.tiles_w * geo.TH;
    j0 = tile % geo.tiles_w * geo.TW;
    i1 = i0 + geo.TH < geo.H ? i0 + geo.TH : geo.H;
    j1 = j0 + geo.TW < geo.W ? j0 + geo.TW : geo.W;
  }
  __device__ int64_t pixels() const { return (i1 - i0) * (j1 - j0); }
  // Pixel index (of the B x H x W) of the tile's pixel `pix` (row-major in the tile).
  __device__ int64_t tile_pixel(const TileGeometry& geo, int64_t pix) const {
    const int64_t tw = j1 - j0;
    return (b * geo.H + i0 + pix / tw) * geo.W + j0 + pix % tw;
  }
};

// One item of a step: position j of line s of a direction of M positions per line, its pixel q, its
// slot and the previous line's in the line buffers (lane included; `prev` only where step > 0), and
// its pixel in the tile (-1: a halo position, not the tile's).
struct TilePoint {
  int64_t q, j, M, step, cur, prev, out;
};

// Direction k over the CTA's tile: `body(point)` for every item of every step, one __syncthreads after
// each step (every thread of the CTA calls it).  `buf` holds `states` line buffers of geo.h_elems.
template <typename acc_t, typename Body>
__device__ void sweep_direction(const TileGeometry& geo, const TileTask& t, int k, int states, acc_t* buf,
                                Body&& body) {
  const bool tr = (geo.transpose >> k) & 1u, rv = (geo.reverse >> k) & 1u;
  const int64_t L = tr ? geo.W : geo.H, M = tr ? geo.H : geo.W, ck = geo.chunk, G = geo.G;
  const int64_t l0 = tr ? t.j0 : t.i0, l1 = tr ? t.j1 : t.i1;  // the tile's lines
  const int64_t q0 = tr ? t.i0 : t.j0, q1 = tr ? t.i1 : t.j1;  // its positions
  const int64_t pa = q0 - (ck - 1) > 0 ? q0 - (ck - 1) : 0;    // with the halo
  const int64_t pb = q1 + (ck - 1) < M ? q1 + (ck - 1) : M;
  const int64_t P2 = pb - pa + 2, lines = l1 - l0;
  const int64_t ga = l0 / ck, ng = (l1 + ck - 1) / ck - ga;  // the tile's groups (l0 is a group's start)
  const int64_t tw = t.j1 - t.j0;
  // the pads (positions pa - 1 and pb) of every line: read, with a zero tap, at the map's edges only
  for (int64_t i = t.tid; i < states * lines * 2 * G; i += t.nthreads) {
    const int64_t l = i % G, side = i / G % 2, line = i / (2 * G);  // line over states x lines
    buf[line / lines * geo.h_elems + ((line % lines) * P2 + (side == 0 ? 0 : P2 - 1)) * G + l] = acc_t(0);
  }
  for (int64_t step = 0; step < ck; ++step) {
    // the positions the remaining ck - 1 - step steps still read
    const int64_t reach = ck - 1 - step;
    const int64_t lo = q0 - reach > pa ? q0 - reach : pa, hi = q1 + reach < pb ? q1 + reach : pb;
    const int64_t n = hi - lo, items = ng * n;
    for (int64_t it = t.p; it < items; it += geo.P) {
      const int64_t g = ga + it / n, j = lo + it % n;
      const int64_t s0 = group_begin(g, ck), s1 = group_end(g, ck, L);
      if (step >= s1 - s0) continue;  // a short last group
      const int64_t s = line_at(step, s0, s1, rv);
      TilePoint pt;
      pt.q = tr ? (t.b * geo.H + j) * geo.W + s : (t.b * geo.H + s) * geo.W + j;
      pt.j = j;
      pt.M = M;
      pt.step = step;
      pt.cur = ((s - l0) * P2 + (j - pa) + 1) * G + t.lane;
      pt.prev = step == 0 ? 0 : ((s - l0 + (rv ? 1 : -1)) * P2 + (j - pa) + 1) * G + t.lane;
      const bool own = j >= q0 && j < q1;
      pt.out = !own ? -1 : (tr ? (j - t.i0) * tw + (s - t.j0) : (s - t.i0) * tw + (j - t.j0));
      body(pt);
    }
    __syncthreads();
  }
}

template <typename acc_t>
__device__ void zero_accumulators(acc_t* acc, int64_t n, const TileTask& t) {
  for (int64_t i = t.tid; i < n; i += t.nthreads) acc[i] = acc_t(0);
  __syncthreads();
}

// The rows of direction k in shared memory, [lane][S * 6 + 1] (the odd stride puts a row's lanes on
// different banks), written by the whole CTA, then a barrier.  The caller's last barrier must follow
// every read of the previous direction's rows.
template <typename acc_t, typename scalar_t>
__device__ void load_shared_rows(acc_t* rows, const TileGeometry& geo, const TileTask& t, int k,
                                 const scalar_t* weight) {
  const int64_t G = geo.G, S = geo.S, F = kGateFields, stride = S * F + 1;
  for (int64_t i = t.tid; i < G * S * F; i += t.nthreads) {
    const int64_t l = i % G, f = i / G % F, s = i / (G * F);
    const int64_t c = static_cast<int64_t>(blockIdx.y) * G + l;
    rows[l * stride + s * F + f] = c < geo.C ? static_cast<acc_t>(weight[((k * F + f) * geo.C + c) * S + s]) : acc_t(0);
  }
  __syncthreads();
}

// kS = 8 or 16: the projection rows in registers (LaneRows); kS = 0: in shared memory (proxies of more
// than kMaxLaneS channels, read from global memory in the projection loop).  Launch bounds: 2 CTAs
// of 256 threads per SM (128 registers) with the rows in registers; with them in shared memory ptxas
// capped itself at 80 registers and spilled (sm_80, float) unless told 1.
template <typename scalar_t, typename acc_t, int kS>
__global__ void __launch_bounds__(kMaxThreads, kS > 0 ? 2 : 1)
    tile_fwd_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ proxy,
                    const scalar_t* __restrict__ weight, const scalar_t* __restrict__ bias,
                    const scalar_t* __restrict__ merge, scalar_t* __restrict__ y, const TileGeometry geo) {
  GSPN_DYNAMIC_SHARED(smem_raw);
  const TileTask t(geo);
  const int64_t G = geo.G, C = geo.C, n = t.pixels() * G;
  acc_t* yacc = reinterpret_cast<acc_t*>(smem_raw);  // [pixel of the tile][lane]
  acc_t* hbuf = yacc + geo.acc_elems;
  acc_t* srows = hbuf + geo.h_elems;  // capacity 0: this lane's rows at srows + lane (S * 6 + 1)
  zero_accumulators(yacc, n, t);
  constexpr int kRegS = kS > 0 ? kS : 1;
  for (int k = 0; k < geo.K; ++k) {
    lanes_cuda::LaneRows<acc_t, kRegS> rows;  // capacity 0: the biases and merge weight only
    if constexpr (kS > 0) {
      rows.load_at(k, t.c, t.live, C, geo.S, weight, bias, merge);
    } else {
      rows.load_at(k, t.c, t.live, C, int64_t{0}, weight, bias, merge);
      load_shared_rows(srows, geo, t, k, weight);
    }
    sweep_direction<acc_t>(geo, t, k, 1, hbuf, [&](const TilePoint& pt) {
      acc_t g[kGateFields];
      if constexpr (kS > 0) {
        acc_t pr[kS];
        lanes_cuda::load_proxy<acc_t, kS>(proxy, pt.q, geo.S, pr);
        project_logits(rows.w, rows.bias, pr, kS, g);
      } else {
        const acc_t* w = srows + t.lane * (geo.S * kGateFields + 1);
        const scalar_t* p = proxy + pt.q * geo.S;
        GSPN_UNROLL
        for (int f = 0; f < kGateFields; ++f) g[f] = rows.bias[f];
        GSPN_NO_UNROLL  // unrolled: ~150 registers instead of ~110
        for (int64_t s2 = 0; s2 < geo.S; ++s2) {
          const acc_t ps = static_cast<acc_t>(p[s2]);
          GSPN_UNROLL
          for (int f = 0; f < kGateFields; ++f) g[f] += w[s2 * kGateFields + f] * ps;
        }
      }
      const acc_t xv = t.live ? static_cast<acc_t>(x[pt.q * C + t.c]) : acc_t(0);
      acc_t hn = acc_t(0), hm = acc_t(0), hp = acc_t(0);
      if (pt.step > 0) {
        const acc_t* h = hbuf + pt.prev;
        hn = h[-G];
        hm = h[0];
        hp = h[G];
      }
      const acc_t h = fused_h<acc_t>(xv, g[kGateNeg], g[kGateMid], g[kGatePos], g[kGateLam], hn, hm, hp, pt.j > 0,
                                     pt.j + 1 < pt.M, pt.step == 0);
      hbuf[pt.cur] = h;
      if (pt.out >= 0) yacc[pt.out * G + t.lane] += rows.m * fused_y<acc_t>(h, xv, g[kGateU], g[kGateD]);
    });
  }
  // y once, the G channels of a pixel contiguous
  for (int64_t i = t.tid; i < n; i += t.nthreads) {
    const int64_t c = static_cast<int64_t>(blockIdx.y) * G + i % G;
    if (c < C) y[t.tile_pixel(geo, i / G) * C + c] = static_cast<scalar_t>(yacc[i]);
  }
}

template <typename scalar_t, typename acc_t, int kS>
__global__ void __launch_bounds__(kMaxThreads)
    tile_attn_fwd_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                         const scalar_t* __restrict__ v, const scalar_t* __restrict__ proxy,
                         const scalar_t* __restrict__ weight, const scalar_t* __restrict__ bias,
                         const scalar_t* __restrict__ merge, const scalar_t* __restrict__ ub,
                         scalar_t* __restrict__ out, acc_t tiny, const TileGeometry geo) {
  GSPN_DYNAMIC_SHARED(smem_raw);
  const TileTask t(geo);
  const int64_t G = geo.G, E = geo.C, n = t.pixels() * G;
  acc_t* num = reinterpret_cast<acc_t*>(smem_raw);  // [pixel of the tile][lane], then den
  acc_t* den = num + geo.acc_elems;
  acc_t* bn = den + geo.acc_elems;  // line buffers of hn, then of hd
  acc_t* bd = bn + geo.h_elems;
  zero_accumulators(num, 2 * geo.acc_elems, t);
  for (int d = 0; d < geo.K; ++d) {
    attn_cuda::TapRows<acc_t, kS> rows;
    rows.load_at(d, t.c, t.live, E, geo.S, weight, bias, merge);
    sweep_direction<acc_t>(geo, t, d, 2, bn, [&](const TilePoint& pt) {
      acc_t pr[kS];
      const Taps<acc_t> taps =
          attn_cuda::pixel_taps<acc_t, kS>(rows, proxy, pt.q, geo.S, pt.j, pt.M, pt.step == 0, pr);
      const acc_t xv = t.live ? static_cast<acc_t>(v[pt.q * E + t.c]) : acc_t(0);
      const acc_t lam = t.live ? sigmoid<acc_t>(static_cast<acc_t>(k[pt.q * E + t.c])) : acc_t(0);
      acc_t nn = acc_t(0), nm = acc_t(0), np = acc_t(0), dn = acc_t(0), dm = acc_t(0), dp = acc_t(0);
      if (pt.step > 0) {
        const acc_t* hn = bn + pt.prev;
        const acc_t* hd = bd + pt.prev;
        nn = hn[-G];
        nm = hn[0];
        np = hn[G];
        dn = hd[-G];
        dm = hd[0];
        dp = hd[G];
      }
      acc_t hn, hd;
      attention_h<acc_t>(xv, lam, taps, nn, nm, np, dn, dm, dp, pt.step == 0, hn, hd);
      bn[pt.cur] = hn;
      bd[pt.cur] = hd;
      if (pt.out >= 0) {
        num[pt.out * G + t.lane] += rows.m * hn;
        den[pt.out * G + t.lane] += rows.m * hd;
      }
    });
  }
  for (int64_t i = t.tid; i < n; i += t.nthreads) {
    const int64_t c = static_cast<int64_t>(blockIdx.y) * G + i % G;
    if (c >= E) continue;
    const int64_t o = t.tile_pixel(geo, i / G) * E + c;
    const acc_t gq = static_cast<acc_t>(q[o]) + static_cast<acc_t>(ub[c]);
    out[o] = static_cast<scalar_t>(attention_out<acc_t>(gq, num[i], den[i], tiny));
  }
}

// ---- the backward of propagate_proj (tile_bwd_kernel) ----
//
// Per CTA (tile, channel group, batch element) and direction, in direction order:
// 1. the forward over the tile's lines with the forward's halo (sweep_direction): h of every line of
//    the tile kept in the line buffers, exact at the tile's positions +- (k - 1 - step);
// 2. the adjoint walked back over the chunk's steps, last first (sweep_back): step s covers the
//    tile's positions +- s (clipped to the map): the own pixels of step s need the next line's
//    adjoint at +- 1, which needs its next line's at +- 2, ..., so the adjoint is exact wherever it is
//    read.  An item recomputes its pixel's logits from the proxy; the adjoint needs only the logits,
//    dL/dy and the next line's products (w_neg a, w_mid a, w_pos a), kept per line in three buffers
//    laid out as h's; h (of this line at the pixel, of the previous line at +- 1) is read for the
//    tile's own pixels only, where step 1 made it exact.
// The own pixels' gradients: dx added into a [TH TW][G] acc_t accumulator in shared memory (written
// once at the end, the directions summed in order as the lane kernels' merge does); dL/dweight,
// dL/dbias and dL/dmerge summed per lane in registers (the lane kernels' LaneRows capacity), added over
// the CTA's item slots in slot order through a global workspace into per-(batch, tile) partial rows
// after each direction (the lane kernels' layout, the launcher sums them with at::sum);
// dL/dproxy summed over the G lanes of a pixel by lane_reduce's shuffles and added, direction by
// direction, into a [TH TW][S] acc_t accumulator in shared memory (the part that does not scale with
// G), written once into the channel group's partial row.  No atomics.
//
// Proxies of at most kMaxLaneS channels (the rows and dL/dweight in registers); the dispatch keeps
// the lane kernels' path past that.

// The backward walk of direction k: `body(point, active)` for the items of every step from the
// chunk's last to its first (every thread of the CTA the same number of times, `active` false where
// it has no item: the body's shuffles need whole warps), one __syncthreads after each step.  `point`
// also gives the next line's slot in the buffers (`next`) and whether the item's line is its group's
// last (`last`: no next line).
struct TileBackPoint : TilePoint {
  int64_t next;
  bool last;
};

template <typename Body>
__device__ void sweep_back(const TileGeometry& geo, const TileTask& t, int k, Body&& body) {
  const bool tr = (geo.transpose >> k) & 1u, rv = (geo.reverse >> k) & 1u;
  const int64_t L = tr ? geo.W : geo.H, M = tr ? geo.H : geo.W, ck = geo.chunk, G = geo.G;
  const int64_t l0 = tr ? t.j0 : t.i0, l1 = tr ? t.j1 : t.i1;
  const int64_t q0 = tr ? t.i0 : t.j0, q1 = tr ? t.i1 : t.j1;
  const int64_t pa = q0 - (ck - 1) > 0 ? q0 - (ck - 1) : 0;
  const int64_t pb = q1 + (ck - 1) < M ? q1 + (ck - 1) : M;
  const int64_t P2 = pb - pa + 2;
  const int64_t ga = l0 / ck, ng = (l1 + ck - 1) / ck - ga;
  const int64_t tw = t.j1 - t.j0;
  for (int64_t step = ck - 1; step >= 0; --step) {
    // the positions whose adjoint the steps before this one still read
    const int64_t lo = q0 - step > pa ? q0 - step : pa, hi = q1 + step < pb ? q1 + step : pb;
    const int64_t n = hi - lo, items = ng * n, sweeps = (items + geo.P - 1) / geo.P;
    for (int64_t sw = 0; sw < sweeps; ++sw) {
      const int64_t it = sw * geo.P + t.p;
      TileBackPoint pt{};
      bool active = it < items;
      if (active) {
        const int64_t g = ga + it / n, j = lo + it % n;
        const int64_t s0 = group_begin(g, ck), s1 = group_end(g, ck, L);
        active = step < s1 - s0;  // a short last group
        if (active) {
          const int64_t s = line_at(step, s0, s1, rv);
          pt.q = tr ? (t.b * geo.H + j) * geo.W + s : (t.b * geo.H + s) * geo.W + j;
          pt.j = j;
          pt.M = M;
          pt.step = step;
          pt.cur = ((s - l0) * P2 + (j - pa) + 1) * G + t.lane;
          pt.prev = step == 0 ? 0 : ((s - l0 + (rv ? 1 : -1)) * P2 + (j - pa) + 1) * G + t.lane;
          pt.last = step == s1 - s0 - 1;
          pt.next = pt.last ? 0 : ((s - l0 + (rv ? -1 : 1)) * P2 + (j - pa) + 1) * G + t.lane;
          const bool own = j >= q0 && j < q1;
          pt.out = !own ? -1 : (tr ? (j - t.i0) * tw + (s - t.j0) : (s - t.i0) * tw + (j - t.j0));
        }
      }
      body(pt, active);
    }
    __syncthreads();
  }
}

// A lane's sums of direction k over the CTA's item slots (dL/dweight [kS][6], dL/dbias [6], dL/dmerge),
// added in slot order through the CTA's slice `red` ([value][slot][lane]) of the global workspace,
// into this (batch, tile)'s partial rows: dwb_part [B*tiles][K*6*C][S+1] (the bias last), dm_part
// [B*tiles][K][C]; then zeroed for the next direction.  Every thread of the CTA calls it (one barrier;
// the caller's next barrier must come before `red` is written again).
template <int kS, typename acc_t>
__device__ void store_tile_sums(const TileGeometry& geo, const TileTask& t, int k, acc_t (&dw)[kS * kGateFields],
                                acc_t (&db)[kGateFields], acc_t& dm, acc_t* red, acc_t* dwb_part, acc_t* dm_part) {
  constexpr int kFields = kGateFields, kValues = kS * kFields + kFields + 1;
  const int G = geo.G;
  const int64_t C = geo.C, S = geo.S, Rows = geo.K * kFields * C;
  const int64_t zb = t.b * gridDim.x + blockIdx.x;
  GSPN_UNROLL
  for (int v = 0; v < kValues; ++v) {
    const acc_t val = v < kS * kFields ? dw[v] : (v < kS * kFields + kFields ? db[v - kS * kFields] : dm);
    red[(v * geo.P + t.p) * G + t.lane] = val;
  }
  GSPN_UNROLL
  for (int i = 0; i < kS * kFields; ++i) dw[i] = acc_t(0);
  GSPN_UNROLL
  for (int f = 0; f < kFields; ++f) db[f] = acc_t(0);
  dm = acc_t(0);
  __syncthreads();
  for (int64_t i = t.tid; i < kValues * G; i += t.nthreads) {
    const int v = static_cast<int>(i / G), l = static_cast<int>(i % G);
    const int64_t c = static_cast<int64_t>(blockIdx.y) * G + l;
    if (c >= C) continue;
    acc_t sum = acc_t(0);
    for (int pp = 0; pp < geo.P; ++pp) sum += red[(v * geo.P + pp) * G + l];
    if (v < kS * kFields) {
      const int s2 = v / kFields, f = v % kFields;
      if (s2 < S) dwb_part[(zb * Rows + (k * kFields + f) * C + c) * (S + 1) + s2] = sum;
    } else if (v < kS * kFields + kFields) {
      const int f = v - kS * kFields;
      dwb_part[(zb * Rows + (k * kFields + f) * C + c) * (S + 1) + S] = sum;
    } else {
      dm_part[(zb * geo.K + k) * C + c] = sum;
    }
  }
}

// kS = 8 or 16 (S <= kMaxLaneS).  Outputs: dx (channels-last, scalar_t), dproxy_part [groups][B H W][S],
// dwb_part and dm_part (store_tile_sums), acc_t; ws: geo.red_elems per CTA.
template <typename scalar_t, typename acc_t, int kS>
__global__ void __launch_bounds__(kMaxThreads)
    tile_bwd_kernel(const scalar_t* __restrict__ gy, const scalar_t* __restrict__ x,
                    const scalar_t* __restrict__ proxy, const scalar_t* __restrict__ weight,
                    const scalar_t* __restrict__ bias, const scalar_t* __restrict__ merge,
                    scalar_t* __restrict__ dx, acc_t* __restrict__ dproxy_part, acc_t* __restrict__ dwb_part,
                    acc_t* __restrict__ dm_part, acc_t* ws, const TileGeometry geo) {
  GSPN_DYNAMIC_SHARED(smem_raw);
  const TileTask t(geo);
  const int64_t G = geo.G, C = geo.C, S = geo.S, pixels = t.pixels(), n = pixels * G;
  acc_t* dxacc = reinterpret_cast<acc_t*>(smem_raw);  // [pixel of the tile][lane]
  acc_t* hbuf = dxacc + geo.acc_elems;                // h, then the products w_neg a, w_mid a, w_pos a
  acc_t* pn = hbuf + geo.h_elems;
  acc_t* pm = pn + geo.h_elems;
  acc_t* pp = pm + geo.h_elems;
  acc_t* dpacc = pp + geo.h_elems;  // [pixel of the tile][S]
  const int64_t cta = (static_cast<int64_t>(blockIdx.z) * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
  acc_t* red = ws + cta * geo.red_elems;
  for (int64_t i = t.tid; i < n; i += t.nthreads) dxacc[i] = acc_t(0);
  zero_accumulators(dpacc, pixels * S, t);
  acc_t dw[kS * kGateFields], db[kGateFields], dm = acc_t(0);
  GSPN_UNROLL
  for (int i = 0; i < kS * kGateFields; ++i) dw[i] = acc_t(0);
  GSPN_UNROLL
  for (int f = 0; f < kGateFields; ++f) db[f] = acc_t(0);
  for (int k = 0; k < geo.K; ++k) {
    lanes_cuda::LaneRows<acc_t, kS> rows;
    rows.load_at(k, t.c, t.live, C, S, weight, bias, merge);
    // 1. h of the tile's lines (the pads of h and of the three product buffers zeroed)
    sweep_direction<acc_t>(geo, t, k, 4, hbuf, [&](const TilePoint& pt) {
      acc_t pr[kS];
      lanes_cuda::load_proxy<acc_t, kS>(proxy, pt.q, S, pr);
      acc_t g[kGateFields];
      project_logits(rows.w, rows.bias, pr, kS, g);
      const acc_t xv = t.live ? static_cast<acc_t>(x[pt.q * C + t.c]) : acc_t(0);
      acc_t hn = acc_t(0), hm = acc_t(0), hp = acc_t(0);
      if (pt.step > 0) {
        const acc_t* h = hbuf + pt.prev;
        hn = h[-G];
        hm = h[0];
        hp = h[G];
      }
      hbuf[pt.cur] = fused_h<acc_t>(xv, g[kGateNeg], g[kGateMid], g[kGatePos], g[kGateLam], hn, hm, hp, pt.j > 0,
                                    pt.j + 1 < pt.M, pt.step == 0);
    });
    // 2. the adjoint, last step first
    sweep_back(geo, t, k, [&](const TileBackPoint& pt, bool active) {
      acc_t dg[kGateFields];
      GSPN_UNROLL
      for (int f = 0; f < kGateFields; ++f) dg[f] = acc_t(0);
      const bool own = active && pt.out >= 0;
      if (active) {
        acc_t pr[kS];
        lanes_cuda::load_proxy<acc_t, kS>(proxy, pt.q, S, pr);
        acc_t g[kGateFields];
        project_logits(rows.w, rows.bias, pr, kS, g);
        const acc_t xv = t.live ? static_cast<acc_t>(x[pt.q * C + t.c]) : acc_t(0);
        const acc_t dy = t.live ? static_cast<acc_t>(gy[pt.q * C + t.c]) : acc_t(0);
        const bool first = pt.step == 0;
        const Taps<acc_t> zero = {};
        const Taps<acc_t> taps =
            first ? zero : normalize_taps<acc_t>(g[kGateNeg], g[kGateMid], g[kGatePos], pt.j > 0, pt.j + 1 < pt.M);
        acc_t an = acc_t(0), am = acc_t(0), ap = acc_t(0);  // the next line's products at j + 1, j, j - 1
        if (!pt.last) {
          an = pn[pt.next + G];
          am = pm[pt.next];
          ap = pp[pt.next - G];
        }
        acc_t h = acc_t(0), hn = acc_t(0), hm = acc_t(0), hp = acc_t(0);  // exact at the own pixels only
        if (own) {
          h = hbuf[pt.cur];
          if (!first) {
            hn = hbuf[pt.prev - G];
            hm = hbuf[pt.prev];
            hp = hbuf[pt.prev + G];
          }
        }
        const FusedGrads<acc_t> r =
            fused_backward_with<acc_t>(dy, rows.m, xv, taps, sigmoid_and_grad<acc_t>(g[kGateLam]), g[kGateU],
                                       g[kGateD], h, hn, hm, hp, an, acc_t(1), am, acc_t(1), ap, acc_t(1), first);
        pn[pt.cur] = r.taps.wn * r.a;
        pm[pt.cur] = r.taps.wm * r.a;
        pp[pt.cur] = r.taps.wp * r.a;
        if (own) {
          dxacc[pt.out * G + t.lane] += r.dx;
          dm += r.dm;
          lanes_cuda::add_gate_grads<kS>(r, pr, dg, db, dw);
        }
      }
      // dL/dproxy of an own pixel: this lane's share summed over the G lanes (whole warps call
      // lane_reduce), in blocks of 8 proxy channels, added into the tile's accumulator
      constexpr int kBlock = 8;
      GSPN_UNROLL
      for (int hb = 0; hb < kS / kBlock; ++hb) {
        if (hb * kBlock < S) {
          acc_t v[kBlock];
          GSPN_UNROLL
          for (int s2 = 0; s2 < kBlock; ++s2) {
            const acc_t* w2 = rows.w + (hb * kBlock + s2) * kGateFields;
            v[s2] = (w2[0] * dg[0] + w2[1] * dg[1]) + (w2[2] * dg[2] + w2[3] * dg[3]) + (w2[4] * dg[4] + w2[5] * dg[5]);
          }
          int first_s, count;
          lanes_cuda::lane_reduce<kBlock>(v, t.lane, G, first_s, count);
          GSPN_UNROLL
          for (int i = 0; i < kBlock; ++i) {
            const int64_t s2 = hb * kBlock + first_s + i;
            if (own && i < count && s2 < S) dpacc[pt.out * S + s2] += v[i];
          }
        }
      }
    });
    // 3. this direction's per-lane sums into the partial rows
    store_tile_sums<kS>(geo, t, k, dw, db, dm, red, dwb_part, dm_part);
  }
  __syncthreads();
  // dx once, the G channels of a pixel contiguous; dL/dproxy into the channel group's partial row
  for (int64_t i = t.tid; i < n; i += t.nthreads) {
    const int64_t c = static_cast<int64_t>(blockIdx.y) * G + i % G;
    if (c < C) dx[t.tile_pixel(geo, i / G) * C + c] = static_cast<scalar_t>(dxacc[i]);
  }
  acc_t* dpo = dproxy_part + static_cast<int64_t>(blockIdx.y) * geo.B * geo.H * geo.W * S;
  for (int64_t i = t.tid; i < pixels * S; i += t.nthreads) dpo[t.tile_pixel(geo, i / S) * S + i % S] = dpacc[i];
}

// The launch over (B, C, H, W) channels-last maps (attention: (B, H, W, E), C = E) with K directions,
// chunk 1 <= chunk <= kMaxChunk and S proxy channels (past kMaxLaneS: propagate_proj only, the rows
// in shared memory); `states` 1 (propagate_proj) or 2 (attention, two accumulators too).  The tile side is max(kMinSide, 4 chunk) rounded up to whole
// chunks (the map's side where that is smaller), less whole chunks until G = 8 fits in kMaxShared; G
// from {32, 16, 8} (not above C rounded up to a power of two): the largest that fits with
// `target_ctas` CTAs, else the smallest that fits; P item slots so that G P <= kMaxThreads, whole
// warps, not more than a step's items.  `fits` false: no tile fits (the caller keeps the lane kernels).
// `backward`: tile_bwd_kernel's plan (propagate_proj, states 1, S <= kMaxLaneS): four line buffers per
// lane and the dL/dproxy accumulator of TH TW S values, which does not scale with G, counted in the
// shared memory; red_elems its global workspace per CTA.
struct TilePlan {
  TileGeometry geo;
  unsigned int grid[3];
  unsigned int block[2];
  size_t shared_bytes;
  bool fits;
};

template <typename acc_t>
inline TilePlan plan_tile(int64_t B, int64_t C, int64_t H, int64_t W, int64_t K, int64_t chunk, int64_t S,
                          const bool* transpose, const bool* reverse, int states,
                          int64_t target_ctas = kTargetCtas, bool backward = false) {
  TilePlan plan{};
  TileGeometry& geo = plan.geo;
  geo.B = B;
  geo.C = C;
  geo.H = H;
  geo.W = W;
  geo.K = K;
  geo.chunk = chunk;
  geo.S = S;
  bool rows = false, cols = false;
  for (int64_t k = 0; k < K; ++k) {
    geo.transpose |= transpose[k] ? 1u << k : 0u;
    geo.reverse |= reverse[k] ? 1u << k : 0u;
    (transpose[k] ? cols : rows) = true;
  }
  const int64_t acc_size = sizeof(acc_t), halo = chunk - 1;
  // line buffer elements per lane of a tile TH x TW: rows directions walk TH lines of TW + halos
  auto line_elems = [&](int64_t th, int64_t tw) {
    const int64_t r = rows ? th * (std::min(W, tw + 2 * halo) + 2) : 0;
    const int64_t c = cols ? tw * (std::min(H, th + 2 * halo) + 2) : 0;
    return std::max(r, c);
  };
  // the forward: accumulators and line buffers of each state, the rows past kMaxLaneS; the backward
  // (propagate_proj, S <= kMaxLaneS): the dx accumulator, h's line buffers and three product buffers
  // laid out as h's, and (not per lane) the tile's dL/dproxy accumulator of TH TW S values
  const int64_t rows_per_lane = !backward && tile_capacity(S) == 0 ? S * kGateFields + 1 : 0;  // shared rows
  const int64_t buffers = backward ? 4 : states;
  auto per_lane = [&](int64_t th, int64_t tw) {
    return (states * th * tw + buffers * line_elems(th, tw) + rows_per_lane) * acc_size;
  };
  auto fixed = [&](int64_t th, int64_t tw) { return backward ? th * tw * S * acc_size : int64_t{0}; };
  int64_t side = (std::max(kMinSide, 4 * chunk) + chunk - 1) / chunk * chunk;
  auto extent = [&](int64_t n, int64_t sd) { return n <= sd ? n : sd; };
  auto bytes = [&](int64_t sd, int64_t g) {
    return per_lane(extent(H, sd), extent(W, sd)) * g + fixed(extent(H, sd), extent(W, sd));
  };
  while (side > chunk && bytes(side, 8) > kMaxShared) side -= chunk;
  geo.TH = std::max<int64_t>(1, extent(H, side));  // (an empty map: no launch, but a plan)
  geo.TW = std::max<int64_t>(1, extent(W, side));
  const int64_t lane_bytes = per_lane(geo.TH, geo.TW), fixed_bytes = fixed(geo.TH, geo.TW);
  const int64_t tiles_h = (H + geo.TH - 1) / geo.TH;
  geo.tiles_w = (W + geo.TW - 1) / geo.TW;
  const int64_t tiles = tiles_h * geo.tiles_w;
  const int64_t gmax = std::max<int64_t>(8, std::min<int64_t>(32, lanes_cuda::pow2_ceil(C)));
  int G = 0;
  for (int64_t cand = gmax; cand >= 8; cand /= 2) {
    if (lane_bytes * cand + fixed_bytes > kMaxShared) continue;
    G = static_cast<int>(cand);
    if (B * tiles * ((C + cand - 1) / cand) >= target_ctas) break;
  }
  plan.fits = G > 0;
  if (G == 0) G = 8;
  geo.G = G;
  geo.groups = (C + G - 1) / G;
  geo.acc_elems = geo.TH * geo.TW * G;
  geo.h_elems = line_elems(geo.TH, geo.TW) * G;
  geo.rows_elems = rows_per_lane * G;
  geo.dp_elems = backward ? geo.TH * geo.TW * S : 0;
  // a step's items at most: the tile's groups times its positions with the halo
  const int64_t items = std::max(rows ? (geo.TH + chunk - 1) / chunk * std::min(W, geo.TW + 2 * halo) : 0,
                                 cols ? (geo.TW + chunk - 1) / chunk * std::min(H, geo.TH + 2 * halo) : 0);
  const int64_t per_warp = std::max<int64_t>(1, 32 / G);
  geo.P = static_cast<int>(std::min<int64_t>(kMaxThreads / G, (items + per_warp - 1) / per_warp * per_warp));
  plan.grid[0] = static_cast<unsigned int>(tiles);
  plan.grid[1] = static_cast<unsigned int>(geo.groups);
  plan.grid[2] = static_cast<unsigned int>(B);
  plan.block[0] = static_cast<unsigned int>(G);
  plan.block[1] = static_cast<unsigned int>(geo.P);
  const int values = lanes_cuda::reduce_values(tile_capacity(S) == 8 ? 8 : 16);
  geo.red_elems = backward ? static_cast<int64_t>(values) * geo.P * G : 0;
  plan.shared_bytes = static_cast<size_t>(lane_bytes * G + fixed_bytes);
  return plan;
}

}  // namespace tile_cuda
}  // namespace gspn
