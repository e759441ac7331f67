// CUDA kernels of the fused GSPN mixer propagation and their launch plan (the math is in
// gspn_step.h, second part; the launchers are in gspn_propagate_cuda.cu; see gspn_kernel_common.h for
// what may go in this header).
//
// One launch for all directions.  A thread block owns one (batch x channel) plane, or, for planes that
// fit in shared memory, `ppb` planes ("staged"): the block first copies each plane's operands (x, its
// 6 K gate maps and, in the backward, dL/dy) into shared memory with 16-byte coalesced loads, runs
// every direction there, and writes the results (y; dx and each direction's six gate gradients) back
// with coalesced stores.  Staging takes the column directions' strided reads off global memory and
// puts several small planes (a 16 x 16 DiT grid, say) in one block so its threads are not idle.
// Larger planes are read in place: column directions (l2r/r2l) then read their lines with a stride
// of W (uncoalesced).  Either way the block walks each direction's chunks line by line with one
// __syncthreads per line, its threads on the positions of the current line; the previous line
// (forward) or the next line's adjoint and taps (backward) sit in zero-padded float buffers (shared
// memory, or a global workspace for very long lines).  y and dx are accumulated over the directions
// in opmath precision (float32 for 16-bit inputs), each pixel by one thread at a time.  The backward
// recomputes a direction's h for the plane (shared memory when staged, else a global float
// workspace of one plane per block) and walks it backwards.
//
// Status: run on an NVIDIA H200 (2026-11-26), where the CUDA tests pass, staged and in-place layouts
// both; the staged path's speed against the in-place one (GSPN_CUDA_STAGE=0) is not yet measured.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "gspn_kernel_common.h"

namespace gspn {
namespace propagate_cuda {

constexpr int kMaxThreads = 1024;
constexpr size_t kMaxShared = 48 * 1024;     // unstaged: line buffers in shared memory up to this
constexpr size_t kStagedShared = 100 * 1024;  // staged: a block's shared memory at most (2 blocks per SM)
constexpr int kStagedThreads = 256;           // staged: planes per block until this many threads
constexpr int kForwardLines = 2;   // previous and current line
constexpr int kBackwardLines = 8;  // adjoint, w_neg, w_mid, w_pos of the next and of this line

GSPN_HD int64_t round16(int64_t bytes) { return (bytes + 15) / 16 * 16; }

// Byte offsets of a staged plane's segments in shared memory (each 16-byte aligned).
struct StagedLayout {
  int64_t buf, acc0, acc1, x, gy, gates, dg, total;  // acc0: y or h; acc1: dx
  int64_t map;                                       // bytes between two scalar maps
};

GSPN_HD StagedLayout staged_layout(bool backward, int64_t P, int64_t HW, int64_t K, int64_t acc_size,
                                   int64_t scalar_size) {
  StagedLayout s{};
  const int64_t acc_map = round16(HW * acc_size);
  s.map = round16(HW * scalar_size);
  int64_t o = 0;
  s.buf = o;
  o += round16((backward ? kBackwardLines : kForwardLines) * P * acc_size);
  s.acc0 = o;
  o += acc_map;
  s.acc1 = o;
  o += backward ? acc_map : 0;
  s.x = o;
  o += s.map;
  s.gy = o;
  o += backward ? s.map : 0;
  s.gates = o;
  o += kGateFields * K * s.map;
  s.dg = o;
  o += backward ? kGateFields * s.map : 0;
  s.total = o;
  return s;
}

struct PropagateGeometry {
  int64_t B, C, H, W, K, chunk, P;  // P: padded line length, max(H, W) + 2
  int64_t buf_floats;               // unstaged: line-buffer elements per block
  StagedLayout st;                  // staged: one plane's shared memory
  int side;                         // max(H, W)
  int ppb;                          // planes per block (1 unless staged)
  bool vec;                         // staged copies in 16-byte units (every map and pointer aligned)
  bool transpose[4], reverse[4];
};

template <typename acc_t>
__device__ acc_t* block_buffer(acc_t* ws, int64_t buf_floats, unsigned char* smem) {
  return ws == nullptr ? reinterpret_cast<acc_t*>(smem) : ws + static_cast<int64_t>(blockIdx.x) * buf_floats;
}

template <typename acc_t>
__device__ void zero_fill(acc_t* p, int64_t n) {
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) p[i] = acc_t(0);
}

// Copies `maps` maps of `units` units U for each of `nb` planes between global memory (`global(p, m)`)
// and shared memory (`shared(p, m)`), the other way round unless kIn, with every thread of the block
// and up to kBatch loads in flight per thread.
template <typename U, bool kIn, typename Global, typename Shared>
__device__ void copy_units(int nb, int maps, int64_t units, Global global, Shared shared) {
  constexpr int kBatch = 4;
  const int64_t per_plane = maps * units, total = nb * per_plane;
  for (int64_t base = threadIdx.x; base < total; base += kBatch * static_cast<int64_t>(blockDim.x)) {
    U r[kBatch];
    U* dst[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int64_t i = base + u * static_cast<int64_t>(blockDim.x);
      dst[u] = nullptr;
      if (i < total) {
        const int p = static_cast<int>(i / per_plane);
        const int64_t rem = i - p * per_plane;
        const int m = static_cast<int>(rem / units);
        const int64_t e = rem - m * units;
        U* g = reinterpret_cast<U*>(global(p, m)) + e;
        U* sh = reinterpret_cast<U*>(shared(p, m)) + e;
        r[u] = kIn ? *g : *sh;
        dst[u] = kIn ? sh : g;
      }
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      if (dst[u] != nullptr) *dst[u] = r[u];
    }
  }
}

// The same for maps of HW elements T: in 16-byte units where `vec`, else element by element.
template <typename T, bool kIn, typename Global, typename Shared>
__device__ void copy_maps(int nb, int maps, int64_t HW, bool vec, Global global, Shared shared) {
  if (vec) {
    copy_units<uint4, kIn>(nb, maps, HW * static_cast<int64_t>(sizeof(T)) / 16, global, shared);
  } else {
    copy_units<T, kIn>(nb, maps, HW, global, shared);
  }
}

// Direction k of the block's planes: lines, positions, chunk, and where pixel (s, j) is.
struct DirectionView {
  int64_t L, M, k;
  bool transpose, reverse;
  __device__ DirectionView(const PropagateGeometry& g, int64_t dir) {
    transpose = g.transpose[dir];
    reverse = g.reverse[dir];
    L = transpose ? g.W : g.H;
    M = transpose ? g.H : g.W;
    k = (g.chunk <= 0 || g.chunk >= L) ? L : g.chunk;
  }
  __device__ int64_t offset(int64_t s, int64_t j, int64_t W) const { return transpose ? j * W + s : s * W + j; }
};

// Which plane of the block a thread works on and which positions of a line it covers.  With several
// planes per block the block has ppb * side threads (rounded up to a warp): one position each, so a
// thread's plane never changes; with one plane per block the threads stride over the line.
struct ThreadPlace {
  int pl, nb;     // the thread's plane in the block, the block's planes
  int64_t n;      // the thread's plane
  int j0, jstep;  // first position, stride
  bool live;      // the thread has a plane
  __device__ ThreadPlace(const PropagateGeometry& geo) {
    const int64_t planes = geo.B * geo.C, n0 = static_cast<int64_t>(blockIdx.x) * geo.ppb;
    nb = static_cast<int>(planes - n0 < geo.ppb ? planes - n0 : geo.ppb);
    const bool many = geo.ppb > 1;
    pl = many ? static_cast<int>(threadIdx.x) / geo.side : 0;
    j0 = many ? static_cast<int>(threadIdx.x) % geo.side : static_cast<int>(threadIdx.x);
    jstep = many ? geo.side : static_cast<int>(blockDim.x);
    live = pl < nb;
    n = n0 + (live ? pl : 0);
  }
};

// Plane p of the block in shared memory (staged).
inline __device__ unsigned char* staged_plane(unsigned char* smem, const PropagateGeometry& geo, int p) {
  return smem + static_cast<int64_t>(p) * geo.st.total;
}

// Global address of gate map (k, f) of plane n in a (B, K, 6, C, H, W) tensor.
template <typename T>
__device__ T* gate_map(T* gates, const PropagateGeometry& geo, int64_t n, int64_t k, int f) {
  const int64_t b = n / geo.C, c = n % geo.C;
  return gates + (((b * geo.K + k) * kGateFields + f) * geo.C + c) * geo.H * geo.W;
}

// Zeroes the block's line buffers: every staged plane's, or the one buffer of an unstaged block.
template <typename acc_t, bool kStaged>
__device__ void zero_lines(unsigned char* smem, acc_t* buf, const PropagateGeometry& geo, int nb, int lines) {
  const int64_t n = static_cast<int64_t>(lines) * geo.P;
  if constexpr (!kStaged) {
    zero_fill(buf, n);
  } else {
    for (int64_t i = threadIdx.x; i < nb * n; i += blockDim.x) {
      const int p = static_cast<int>(i / n);
      reinterpret_cast<acc_t*>(staged_plane(smem, geo, p) + geo.st.buf)[i - p * n] = acc_t(0);
    }
  }
}

// Zeroes the float segments (line buffers, y or h, dx) of every staged plane of the block.
template <typename acc_t>
__device__ void zero_staged_floats(unsigned char* smem, const PropagateGeometry& geo, int nb) {
  const int64_t n = geo.st.x / static_cast<int64_t>(sizeof(acc_t));
  for (int64_t i = threadIdx.x; i < nb * n; i += blockDim.x) {
    const int p = static_cast<int>(i / n);
    reinterpret_cast<acc_t*>(staged_plane(smem, geo, p))[i - p * n] = acc_t(0);
  }
}

// Where a thread's plane lives: its operands and results in shared memory (staged) or global memory.
template <typename scalar_t, typename acc_t>
struct PlaneView {
  const scalar_t* x;
  const scalar_t* gy;
  const scalar_t* g0;  // gate map (k, f) at g0 + k * k_stride + f * f_stride
  scalar_t* dg0;       // gate-gradient map (k, f) at dg0 + k * dk_stride + f * f_stride
  int64_t f_stride, k_stride, dk_stride;
  acc_t* acc0;  // y (forward) or h (backward)
  acc_t* acc1;  // dx (backward)
  acc_t* buf;   // line buffers
};

template <typename scalar_t, typename acc_t, bool kStaged>
__device__ PlaneView<scalar_t, acc_t> plane_view(unsigned char* smem, const PropagateGeometry& geo,
                                                 const ThreadPlace& t, const scalar_t* x, const scalar_t* gy,
                                                 const scalar_t* gates, scalar_t* dgates, acc_t* acc0,
                                                 acc_t* acc1, acc_t* ws) {
  PlaneView<scalar_t, acc_t> v;
  const int64_t HW = geo.H * geo.W;
  if constexpr (kStaged) {
    unsigned char* base = staged_plane(smem, geo, t.pl);
    v.x = reinterpret_cast<const scalar_t*>(base + geo.st.x);
    v.gy = reinterpret_cast<const scalar_t*>(base + geo.st.gy);
    v.g0 = reinterpret_cast<const scalar_t*>(base + geo.st.gates);
    v.dg0 = reinterpret_cast<scalar_t*>(base + geo.st.dg);
    v.f_stride = geo.st.map / static_cast<int64_t>(sizeof(scalar_t));
    v.k_stride = kGateFields * v.f_stride;
    v.dk_stride = 0;  // one direction's six maps at a time, written back after each direction
    v.acc0 = reinterpret_cast<acc_t*>(base + geo.st.acc0);
    v.acc1 = reinterpret_cast<acc_t*>(base + geo.st.acc1);
    v.buf = reinterpret_cast<acc_t*>(base + geo.st.buf);
  } else {
    v.x = x + t.n * HW;
    v.gy = gy == nullptr ? nullptr : gy + t.n * HW;
    v.g0 = gate_map(gates, geo, t.n, 0, 0);
    v.dg0 = dgates == nullptr ? nullptr : gate_map(dgates, geo, t.n, 0, 0);
    v.f_stride = geo.C * HW;
    v.k_stride = v.dk_stride = kGateFields * geo.C * HW;
    v.acc0 = acc0 + t.n * HW;
    v.acc1 = acc1 == nullptr ? nullptr : acc1 + t.n * HW;
    v.buf = block_buffer(ws, geo.buf_floats, smem);
  }
  return v;
}

// Staged blocks: x (and dL/dy) and the 6 K gate maps of every plane into shared memory.
template <typename scalar_t>
__device__ void stage_inputs(unsigned char* smem, const PropagateGeometry& geo, int64_t n0, int nb,
                             const scalar_t* x, const scalar_t* gy, const scalar_t* gates) {
  const int64_t HW = geo.H * geo.W;
  const int first_gate = gy == nullptr ? 1 : 2, maps = first_gate + kGateFields * static_cast<int>(geo.K);
  auto global = [&](int p, int m) -> scalar_t* {
    const int64_t n = n0 + p;
    if (m == 0) return const_cast<scalar_t*>(x + n * HW);
    if (m < first_gate) return const_cast<scalar_t*>(gy + n * HW);
    const int g = m - first_gate;
    return const_cast<scalar_t*>(gate_map(gates, geo, n, g / kGateFields, g % kGateFields));
  };
  auto shared = [&](int p, int m) -> scalar_t* {
    unsigned char* base = staged_plane(smem, geo, p);
    if (m == 0) return reinterpret_cast<scalar_t*>(base + geo.st.x);
    if (m < first_gate) return reinterpret_cast<scalar_t*>(base + geo.st.gy);
    return reinterpret_cast<scalar_t*>(base + geo.st.gates + (m - first_gate) * geo.st.map);
  };
  copy_maps<scalar_t, true>(nb, maps, HW, geo.vec, global, shared);
}

// Staged blocks: one float map per plane (y or dx, at `offset` in the plane) back to global memory.
template <typename acc_t>
__device__ void unstage_floats(unsigned char* smem, const PropagateGeometry& geo, int64_t n0, int nb,
                               int64_t offset, acc_t* out) {
  const int64_t HW = geo.H * geo.W;
  copy_maps<acc_t, false>(
      nb, 1, HW, geo.vec, [&](int p, int) { return out + (n0 + p) * HW; },
      [&](int p, int) { return reinterpret_cast<acc_t*>(staged_plane(smem, geo, p) + offset); });
}

template <typename scalar_t, typename acc_t, bool kStaged>
__global__ void __launch_bounds__(kStaged ? kStagedThreads : kMaxThreads)
    propagate_fwd_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ gates,
                         const scalar_t* __restrict__ merge, acc_t* __restrict__ y, acc_t* ws,
                         const PropagateGeometry geo) {
  GSPN_DYNAMIC_SHARED(smem_raw);
  const ThreadPlace t(geo);
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * geo.ppb, c = t.n % geo.C;
  const PlaneView<scalar_t, acc_t> v = plane_view<scalar_t, acc_t, kStaged>(
      smem_raw, geo, t, x, nullptr, gates, nullptr, y, nullptr, ws);
  if constexpr (kStaged) {
    stage_inputs(smem_raw, geo, n0, t.nb, x, static_cast<const scalar_t*>(nullptr), gates);
    zero_staged_floats<acc_t>(smem_raw, geo, t.nb);
  } else {
    zero_fill(v.acc0, geo.H * geo.W);
  }
  acc_t* yp = v.acc0;
  for (int64_t dir = 0; dir < geo.K; ++dir) {
    const DirectionView d(geo, dir);
    const scalar_t* g[kGateFields];
    for (int f = 0; f < kGateFields; ++f) g[f] = v.g0 + dir * v.k_stride + f * v.f_stride;
    const acc_t m = t.live ? static_cast<acc_t>(merge[dir * geo.C + c]) : acc_t(0);
    for (int64_t grp = 0; grp < num_groups(d.L, d.k); ++grp) {
      const int64_t s0 = group_begin(grp, d.k), s1 = group_end(grp, d.k, d.L);
      __syncthreads();  // everyone is done with the buffers (and with y of the last direction)
      zero_lines<acc_t, kStaged>(smem_raw, v.buf, geo, t.nb, kForwardLines);
      __syncthreads();
      acc_t* prev = v.buf + 1;
      acc_t* cur = v.buf + geo.P + 1;
      for (int64_t step = 0; step < s1 - s0; ++step) {
        const int64_t s = line_at(step, s0, s1, d.reverse);
        for (int64_t j = t.j0; t.live && j < d.M; j += t.jstep) {
          const int64_t off = d.offset(s, j, geo.W);
          const acc_t xv = static_cast<acc_t>(v.x[off]);
          const acc_t h = fused_h<acc_t>(xv, g[kGateNeg][off], g[kGateMid][off], g[kGatePos][off],
                                         g[kGateLam][off], prev[j - 1], prev[j], prev[j + 1], j > 0, j + 1 < d.M,
                                         step == 0);
          cur[j] = h;
          yp[off] += m * fused_y<acc_t>(h, xv, g[kGateU][off], g[kGateD][off]);
        }
        __syncthreads();
        acc_t* tmp = prev;
        prev = cur;
        cur = tmp;
      }
    }
  }
  if constexpr (kStaged) {
    __syncthreads();
    unstage_floats(smem_raw, geo, n0, t.nb, geo.st.acc0, y);
  }
}

template <typename scalar_t, typename acc_t, bool kStaged>
__global__ void __launch_bounds__(kStaged ? kStagedThreads : kMaxThreads)
    propagate_bwd_kernel(const scalar_t* __restrict__ gy, const scalar_t* __restrict__ x,
                         const scalar_t* __restrict__ gates, const scalar_t* __restrict__ merge,
                         acc_t* __restrict__ dx, scalar_t* __restrict__ dgates, acc_t* __restrict__ dm_partial,
                         acc_t* __restrict__ hws, acc_t* ws, const PropagateGeometry geo) {
  GSPN_DYNAMIC_SHARED(smem_raw);
  const ThreadPlace t(geo);
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * geo.ppb, c = t.n % geo.C, HW = geo.H * geo.W;
  const int64_t P = geo.P;
  const PlaneView<scalar_t, acc_t> v = plane_view<scalar_t, acc_t, kStaged>(
      smem_raw, geo, t, x, gy, gates, dgates, hws, dx, ws);
  if constexpr (kStaged) {
    stage_inputs(smem_raw, geo, n0, t.nb, x, gy, gates);
    zero_staged_floats<acc_t>(smem_raw, geo, t.nb);
  } else {
    zero_fill(v.acc1, HW);
  }
  acc_t* hp = v.acc0;   // this plane's recomputed h of the current direction
  acc_t* dxp = v.acc1;
  const acc_t zero(0);
  for (int64_t dir = 0; dir < geo.K; ++dir) {
    const DirectionView d(geo, dir);
    const scalar_t* g[kGateFields];
    scalar_t* dg[kGateFields];
    for (int f = 0; f < kGateFields; ++f) {
      g[f] = v.g0 + dir * v.k_stride + f * v.f_stride;
      dg[f] = v.dg0 + dir * v.dk_stride + f * v.f_stride;
    }
    const acc_t m = t.live ? static_cast<acc_t>(merge[dir * geo.C + c]) : acc_t(0);
    acc_t dm = 0;
    for (int64_t grp = 0; grp < num_groups(d.L, d.k); ++grp) {
      const int64_t s0 = group_begin(grp, d.k), s1 = group_end(grp, d.k, d.L), len = s1 - s0;
      // h of the previous line in scan order at position j (0 outside the line or the group)
      auto h_prev = [&](int64_t step, int64_t j) -> acc_t {
        if (step == 0 || j < 0 || j >= d.M) return zero;
        return hp[d.offset(line_at(step - 1, s0, s1, d.reverse), j, geo.W)];
      };
      __syncthreads();  // the last direction's reads of h, of the buffers and of its gate gradients are done
      for (int64_t step = 0; step < len; ++step) {
        const int64_t s = line_at(step, s0, s1, d.reverse);
        for (int64_t j = t.j0; t.live && j < d.M; j += t.jstep) {
          const int64_t off = d.offset(s, j, geo.W);
          hp[off] = fused_h<acc_t>(static_cast<acc_t>(v.x[off]), g[kGateNeg][off], g[kGateMid][off],
                                   g[kGatePos][off], g[kGateLam][off], h_prev(step, j - 1), h_prev(step, j),
                                   h_prev(step, j + 1), j > 0, j + 1 < d.M, step == 0);
        }
        __syncthreads();
      }
      zero_lines<acc_t, kStaged>(smem_raw, v.buf, geo, t.nb, kBackwardLines);
      __syncthreads();
      acc_t* nxt = v.buf + 1;          // a, w_neg, w_mid, w_pos of the next line at nxt + {0, 1, 2, 3} P
      acc_t* cur = v.buf + 4 * P + 1;  // the same for this line
      for (int64_t step = len - 1; step >= 0; --step) {
        const int64_t s = line_at(step, s0, s1, d.reverse);
        for (int64_t j = t.j0; t.live && j < d.M; j += t.jstep) {
          const int64_t off = d.offset(s, j, geo.W);
          const FusedGrads<acc_t> r = fused_backward<acc_t>(
              static_cast<acc_t>(v.gy[off]), m, static_cast<acc_t>(v.x[off]), g[kGateNeg][off], g[kGateMid][off],
              g[kGatePos][off], g[kGateLam][off], g[kGateU][off], g[kGateD][off], hp[off],
              h_prev(step, j - 1), h_prev(step, j), h_prev(step, j + 1), nxt[P + j + 1], nxt[j + 1], nxt[2 * P + j],
              nxt[j], nxt[3 * P + j - 1], nxt[j - 1], j > 0, j + 1 < d.M, step == 0);
          cur[j] = r.a;
          cur[P + j] = r.taps.wn;
          cur[2 * P + j] = r.taps.wm;
          cur[3 * P + j] = r.taps.wp;
          dxp[off] += r.dx;
          dm += r.dm;
          dg[kGateNeg][off] = static_cast<scalar_t>(r.dgn);
          dg[kGateMid][off] = static_cast<scalar_t>(r.dgm);
          dg[kGatePos][off] = static_cast<scalar_t>(r.dgp);
          dg[kGateLam][off] = static_cast<scalar_t>(r.dgl);
          dg[kGateU][off] = static_cast<scalar_t>(r.dgu);
          dg[kGateD][off] = static_cast<scalar_t>(r.dgd);
        }
        __syncthreads();
        acc_t* tmp = nxt;
        nxt = cur;
        cur = tmp;
      }
    }
    if constexpr (kStaged) {  // this direction's six gate-gradient maps of every plane back to global memory
      __syncthreads();
      copy_maps<scalar_t, false>(
          t.nb, kGateFields, HW, geo.vec, [&](int p, int f) { return gate_map(dgates, geo, n0 + p, dir, f); },
          [&](int p, int f) {
            return reinterpret_cast<scalar_t*>(staged_plane(smem_raw, geo, p) + geo.st.dg + f * geo.st.map);
          });
    }
    if (t.live) atomicAdd(dm_partial + t.n * geo.K + dir, dm);
  }
  if constexpr (kStaged) {
    __syncthreads();
    unstage_floats(smem_raw, geo, n0, t.nb, geo.st.acc1, dx);
  }
}

// The launch over the planes of a (B, C, H, W) map with K directions: staged when a plane's
// operands fit in kStagedShared bytes and its lines in kStagedThreads threads (and `staging`), else
// one plane per block with its line buffers in shared memory or, when they do not fit in kMaxShared
// bytes, in a global workspace.  `aligned`: every tensor pointer of the launch is 16-byte aligned.
// The launcher checks first that B C fits an int and max(H, W) fits INT_MAX / 2.
struct PropagatePlan {
  PropagateGeometry geo;
  bool staged;
  unsigned int blocks;
  int threads;
  size_t shared_bytes;
  int64_t ws_elems;  // acc_t elements of the global line-buffer workspace (0 without one)
};

template <typename scalar_t, typename acc_t>
inline PropagatePlan plan_propagate(int64_t B, int64_t C, int64_t H, int64_t W, int64_t K, int64_t chunk,
                                    const bool* transpose, const bool* reverse, bool backward, bool staging,
                                    bool aligned) {
  const int lines = backward ? kBackwardLines : kForwardLines;
  PropagatePlan plan{};
  PropagateGeometry& geo = plan.geo;
  geo.B = B;
  geo.C = C;
  geo.H = H;
  geo.W = W;
  geo.K = K;
  geo.chunk = chunk;
  geo.P = std::max(H, W) + 2;
  geo.buf_floats = lines * geo.P;
  for (int64_t k = 0; k < K; ++k) {
    geo.transpose[k] = transpose[k];
    geo.reverse[k] = reverse[k];
  }
  const int64_t planes = B * C, HW = H * W;
  const int64_t side = std::max(H, W);
  geo.side = static_cast<int>(side);
  geo.st = staged_layout(backward, geo.P, HW, K, sizeof(acc_t), sizeof(scalar_t));
  if (staging && side <= kStagedThreads && static_cast<size_t>(geo.st.total) <= kStagedShared) {
    const int64_t by_threads = std::max<int64_t>(1, kStagedThreads / side);
    const int64_t by_memory = static_cast<int64_t>(kStagedShared) / geo.st.total;
    geo.ppb = static_cast<int>(std::min({by_threads, by_memory, planes}));
    geo.vec = (HW * static_cast<int64_t>(sizeof(scalar_t))) % 16 == 0 &&
              (HW * static_cast<int64_t>(sizeof(acc_t))) % 16 == 0 && aligned;
    plan.staged = true;
    // at least 128 threads, for the copies; at most kStagedThreads
    plan.threads = static_cast<int>(std::max<int64_t>(128, (geo.ppb * side + 31) / 32 * 32));
    plan.shared_bytes = static_cast<size_t>(geo.ppb * geo.st.total);
    plan.blocks = static_cast<unsigned int>((planes + geo.ppb - 1) / geo.ppb);
    plan.ws_elems = 0;
  } else {
    geo.ppb = 1;
    plan.staged = false;
    plan.threads = static_cast<int>(std::min<int64_t>(kMaxThreads, (side + 31) / 32 * 32));
    const bool global = static_cast<size_t>(geo.buf_floats) * sizeof(acc_t) > kMaxShared;
    plan.ws_elems = global ? planes * geo.buf_floats : 0;
    plan.shared_bytes = global ? 0 : static_cast<size_t>(geo.buf_floats) * sizeof(acc_t);
    plan.blocks = static_cast<unsigned int>(planes);
  }
  return plan;
}

}  // namespace propagate_cuda
}  // namespace gspn
