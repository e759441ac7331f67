// Channels-last CUDA kernels of the fused GSPN mixer propagation with the low-rank gate projection
// fused in (propagate_proj_fwd / propagate_proj_bwd), and their launch plan.  The math is
// gspn_step.h's (project_logits, fused_h, fused_y, fused_backward_with), the same as the CPU kernel's
// (csrc/cpu/gspn_propagate_proj_cpu.cpp), whose design this moves to the GPU: channels on lanes, the
// gate logits projected from the proxy in registers, nothing per channel materialised.  The launcher
// is gspn_lanes_cuda.cu (the ATen side, shared with the test suite's host emulation, is
// gspn_cuda_plan.h's lanes_forward / lanes_backward); see gspn_kernel_common.h for what may go in
// this header.
//
// Layout: x, dL/dy (B, C, H, W) and the proxy (B, S, H, W) channels-last ([b][i][j][c]), so the G
// channels of a pixel are contiguous for a row *and* a column direction (no transposed copies, no
// stride-W planes).  weight (K*6*C, S), bias (K*6*C) and merge (K, C) as the op takes them.
//
// Grid (channel groups of G, K directions, B x runs), block (G lanes, P positions): thread (c, p)
// handles channel c of the CTA's group at positions p, p + P, ... of every line of its direction; a
// line of a row direction is a row, of a column direction a column.  A *run* is a range of whole
// chunks (groups of `chunk_size` lines, independent of each other), so local (chunked) layers get
// CTAs along the scan axis; a global scan is one run.  Each lane keeps its direction's 6 projection
// rows (S values each, zero-padded to the compile-time capacity kS = 8 or 16) and 6 biases in
// registers (the backward: the rows in shared memory where they are large, float kS = 16 or double,
// see shared_rows), reads a pixel's S proxy values (one address for all lanes of the pixel: a broadcast)
// and projects the logits itself; the gate math runs in acc_t (float for 16-bit inputs).  Lanes past
// C load and store nothing and hold zero rows, so they stay finite and contribute nothing.
//
// Forward (lanes_fwd_kernel): the previous line's h in a zero-padded [2][M+2][G] acc_t buffer
// (shared memory, or a global workspace for lines too long for it), one __syncthreads per line.  A
// CTA writes its direction's term m_k (sigmoid(u) h + d x) into a per-direction partial [K][B][H][W][C]
// of scalar_t (the input dtype: bfloat16 / half partials for 16-bit inputs, float / double otherwise
// = acc_t); lanes_merge_kernel sums the K partials in acc_t in direction order and writes y
// channels-last (K = 1: the partial is y).  No atomics: results do not depend on scheduling.
//
// Backward (lanes_bwd_kernel), per CTA the same (b, k, channel group, run), chunk by chunk:
// 1. a forward pass saves h at every kCheckpoint-th line of the chunk (counted from the chunk's first
//    line in scan order) into a per-CTA global workspace (acc_t); a chunk of at most kCheckpoint lines
//    skips it;
// 2. segments of kCheckpoint lines, last first: h of the segment recomputed from its checkpoint into a
//    per-CTA global workspace [kCheckpoint + 1][M+2][G] (small: L2-resident), then walked backwards
//    with fused_backward_with; the next line's adjoint enters as three products (w_neg a, w_mid a,
//    w_pos a) per position in a double-buffered shared [2][3][M+2][G] buffer, one __syncthreads per
//    line.
// Per pixel and lane this gives dx_k (into a per-direction partial like the forward's, summed by
// lanes_merge_kernel), the six logit gradients dg_f and dm.  dbias_f += dg_f, dW[f][s] += dg_f p_s and
// dm accumulate in registers and are summed over the CTA's positions through shared memory at the end
// into per-(b, run) partial rows that the launcher adds (at::sum, fixed order).  dproxy[pixel][s] =
// sum over lanes and fields of dg_f W[f][s]: each lane's S values are summed over the G lanes of the
// pixel (one warp: lanes are innermost in the block) by a butterfly of shuffles and written as
// per-(direction, channel group) acc_t partial rows [K*groups][B][H][W][S], summed by the launcher.
// Nothing of size K*6*C per pixel is ever allocated.
//
// S > kMaxLaneS (16): not these kernels; the launcher materialises the logits and runs the per-plane
// kernels of gspn_propagate_kernels.h (gspn_cuda_plan.h, proj_*_materialised).
//
// Status: executed on the CPU by tests/test_cuda_emulation.py (host emulation) and compiled by nvcc
// for sm_80 / sm_90; not yet run or timed on a GPU.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "gspn_kernel_common.h"

namespace gspn {
namespace lanes_cuda {

constexpr int kMaxThreads = 256;                // G x P threads per CTA at most
constexpr int kMaxLaneS = 16;                   // proxies up to this many channels run these kernels
constexpr int kCheckpoint = 8;                  // backward: h saved every this many lines
constexpr int64_t kMaxShared = 96 * 1024;       // a CTA's shared memory at most (2 CTAs per SM)
constexpr int64_t kTargetCtas = 2 * 132;        // enough CTAs to fill an H100 / H200 twice
constexpr int kForwardLines = 2;                // h of the previous and the current line
constexpr int kBackwardLines = 6;               // (w_neg a, w_mid a, w_pos a) of the next and this line
constexpr int kMergeThreads = 256;
constexpr int64_t kMergeBlocks = 1024;

// Lines per chunk of a direction of L lines (chunk <= 0: global).
GSPN_HD int64_t chunk_of(int64_t chunk, int64_t L) { return (chunk <= 0 || chunk >= L) ? L : chunk; }

struct LanesGeometry {
  int64_t B, C, H, W, K, chunk, S;  // chunk <= 0: global
  int G, P;                         // lanes (channels) and positions of a CTA
  int64_t groups;                   // channel groups, ceil(C / G)
  int64_t cpr;                      // chunks per run
  int64_t zruns;                    // runs per batch element in the grid (the largest direction's)
  int64_t side;                     // max(H, W)
  int64_t line_elems;               // acc_t elements of a CTA's line buffers ([lines][side + 2][G])
  bool global_lines;                // line buffers in the global workspace instead of shared memory
  int64_t ckpt_elems, seg_elems;    // backward: a CTA's checkpoint and segment workspace (acc_t)
  int64_t red_elems;                // backward: a CTA's workspace for the sums over its positions
  int64_t ws_per_cta;               // acc_t elements of a CTA's global workspace
  bool transpose[4], reverse[4];
};

// What a thread of a CTA works on: its lane and positions, its CTA's direction, batch element, run
// and channel, and where the pixels of its direction's lines are.
struct LaneTask {
  int lane, p, tid, nthreads;
  int64_t c, b, k, run, cta;
  bool live;                 // c < C
  int64_t L, M, chunk;       // lines, positions per line, lines per chunk of this direction
  int64_t g0, g1;            // the run's chunks [g0, g1)
  bool transpose, reverse;
  __device__ LaneTask(const LanesGeometry& geo) {
    lane = static_cast<int>(threadIdx.x);
    p = static_cast<int>(threadIdx.y);
    tid = p * geo.G + lane;
    nthreads = geo.G * geo.P;
    k = blockIdx.y;
    b = static_cast<int64_t>(blockIdx.z) / geo.zruns;
    run = static_cast<int64_t>(blockIdx.z) % geo.zruns;
    c = static_cast<int64_t>(blockIdx.x) * geo.G + lane;
    live = c < geo.C;
    cta = (static_cast<int64_t>(blockIdx.z) * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
    transpose = geo.transpose[k];
    reverse = geo.reverse[k];
    L = transpose ? geo.W : geo.H;
    M = transpose ? geo.H : geo.W;
    chunk = chunk_of(geo.chunk, L);
    const int64_t n = num_groups(L, chunk);
    g0 = run * geo.cpr;
    g1 = g0 + geo.cpr < n ? g0 + geo.cpr : n;
  }
  // Pixel (b, i, j) of position j of line s, as an index of the B x H x W pixels.
  __device__ int64_t pixel(const LanesGeometry& geo, int64_t s, int64_t j) const {
    return transpose ? (b * geo.H + j) * geo.W + s : (b * geo.H + s) * geo.W + j;
  }
};

// A lane's projection rows of its direction ([s][field], zero past S and for lanes past C), biases
// and merge weight.
template <typename acc_t, int kS, int kFields = kGateFields>
struct LaneRows {
  acc_t w[kS * kFields];
  acc_t bias[kFields];
  acc_t m;
  template <typename scalar_t>
  __device__ void load(const LanesGeometry& geo, const LaneTask& t, const scalar_t* weight, const scalar_t* b,
                       const scalar_t* merge) {
    load_at(t.k, t.c, t.live, geo.C, geo.S, weight, b, merge);
  }
  // The rows of direction k and channel c (`live`: c < C) of C channels and S proxy channels.
  template <typename scalar_t>
  __device__ void load_at(int64_t k, int64_t c, bool live, int64_t C, int64_t S, const scalar_t* weight,
                          const scalar_t* b, const scalar_t* merge) {
    GSPN_UNROLL
    for (int f = 0; f < kFields; ++f) {
      const int64_t r = (k * kFields + f) * C + c;
      bias[f] = live ? static_cast<acc_t>(b[r]) : acc_t(0);
      GSPN_UNROLL
      for (int s = 0; s < kS; ++s) {
        w[s * kFields + f] = live && s < S ? static_cast<acc_t>(weight[r * S + s]) : acc_t(0);
      }
    }
    m = live ? static_cast<acc_t>(merge[k * C + c]) : acc_t(0);
  }
};

// A pixel's proxy (zero past S) into registers: the same addresses for every lane of the pixel.
template <typename acc_t, int kS, typename scalar_t>
__device__ void load_proxy(const scalar_t* proxy, int64_t q, int64_t S, acc_t (&p)[kS]) {
  const scalar_t* src = proxy + q * S;
  GSPN_UNROLL
  for (int s = 0; s < kS; ++s) p[s] = s < S ? static_cast<acc_t>(src[s]) : acc_t(0);
}

template <typename acc_t>
__device__ void zero_block(acc_t* buf, int64_t n, const LaneTask& t) {
  for (int64_t i = t.tid; i < n; i += t.nthreads) buf[i] = acc_t(0);
}

// The CTA's line buffers: shared memory, or its slice of the global workspace (after `ws_offset`).
template <typename acc_t>
__device__ acc_t* line_buffers(unsigned char* smem, acc_t* ws, const LanesGeometry& geo, const LaneTask& t,
                               int64_t ws_offset) {
  return geo.global_lines ? ws + t.cta * geo.ws_per_cta + ws_offset : reinterpret_cast<acc_t*>(smem);
}

// The backward keeps a lane's projection rows in shared memory instead of registers where they are
// large (kS x 6 values of more than 32 bytes per field: float kS = 16, double), next to dL/dweight's
// as many accumulators: that pair did not fit in 255 registers (ptxas spilled).  [lane][kS*6 + 1]: the
// odd stride puts the lanes of a row on different banks.
constexpr bool shared_rows(int kS, int acc_size) { return kS * acc_size > 32; }
constexpr int64_t shared_rows_elems(int kS, int64_t G) { return G * (kS * kGateFields + 1); }

// Values a lane sums over the CTA's positions in the backward: dL/dweight [kS][6], dL/dbias [6], dL/dm.
constexpr int reduce_values(int kS) { return kS * kGateFields + kGateFields + 1; }

// v[0, kS) of every lane summed over the G lanes of a pixel (lanes are threadIdx.x, G a power of two,
// so a pixel's lanes are one aligned group of a warp; every thread of the warp calls this).  Recursive
// halving: at the step over lane bit 2^i each lane keeps one half of its values (the upper half where
// its bit is set) and adds the partner's copy of that half, so the sums end up spread over the lanes
// with kS - 1 shuffles instead of kS log2(G); past kS lanes a butterfly of the one value left.  On
// return v[0, count) are the sums of proxy channels [first, first + count) (count = kS / min(G, kS));
// lanes from kS on hold copies (count 0).
template <int kS, typename acc_t>
__device__ void lane_reduce(acc_t (&v)[kS], int lane, int G, int& first, int& count) {
  first = 0;
  count = kS;
  GSPN_UNROLL
  for (int st = 0; (1 << st) < kS; ++st) {
    const int off = 1 << st, half = kS >> (st + 1);
    if (off < G) {
      const bool upper = (lane & off) != 0;
      GSPN_UNROLL
      for (int i = 0; i < half; ++i) {
        const acc_t send = upper ? v[i] : v[i + half];
        const acc_t keep = upper ? v[i + half] : v[i];
        v[i] = keep + __shfl_xor_sync(0xffffffffu, send, off, G);
      }
      first += upper ? half : 0;
      count = half;
    }
  }
  for (int off = kS; off < G; off <<= 1) v[0] += __shfl_xor_sync(0xffffffffu, v[0], off, G);
  if (lane >= kS) count = 0;
}

template <typename scalar_t, typename acc_t, int kS>
__global__ void __launch_bounds__(kMaxThreads)
    lanes_fwd_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ proxy,
                     const scalar_t* __restrict__ weight, const scalar_t* __restrict__ bias,
                     const scalar_t* __restrict__ merge, scalar_t* __restrict__ part, acc_t* ws,
                     const LanesGeometry geo) {
  GSPN_DYNAMIC_SHARED(smem_raw);
  const LaneTask t(geo);
  if (t.g0 >= t.g1) return;  // this direction has fewer runs than the grid (the whole CTA)
  LaneRows<acc_t, kS> rows;
  rows.load(geo, t, weight, bias, merge);
  const int64_t G = geo.G, P2 = t.M + 2, C = geo.C;
  acc_t* buf = line_buffers<acc_t>(smem_raw, ws, geo, t, 0);
  zero_block(buf, kForwardLines * P2 * G, t);  // the pads stay 0
  __syncthreads();
  scalar_t* out = part + t.k * geo.B * geo.H * geo.W * C;
  acc_t* prev = buf + G;  // position j at prev[j * G + lane]
  acc_t* cur = prev + P2 * G;
  for (int64_t grp = t.g0; grp < t.g1; ++grp) {
    const int64_t s0 = group_begin(grp, t.chunk), s1 = group_end(grp, t.chunk, t.L);
    for (int64_t step = 0; step < s1 - s0; ++step) {
      const int64_t s = line_at(step, s0, s1, t.reverse);
      for (int64_t j = t.p; j < t.M; j += geo.P) {
        const int64_t q = t.pixel(geo, s, j);
        acc_t pr[kS];
        load_proxy<acc_t, kS>(proxy, q, geo.S, pr);
        acc_t g[kGateFields];
        project_logits(rows.w, rows.bias, pr, kS, g);
        const acc_t xv = t.live ? static_cast<acc_t>(x[q * C + t.c]) : acc_t(0);
        const acc_t* hp = prev + j * G + t.lane;
        const acc_t h = fused_h<acc_t>(xv, g[kGateNeg], g[kGateMid], g[kGatePos], g[kGateLam], hp[-G], hp[0], hp[G],
                                       j > 0, j + 1 < t.M, step == 0);
        cur[j * G + t.lane] = h;
        if (t.live) out[q * C + t.c] = static_cast<scalar_t>(rows.m * fused_y<acc_t>(h, xv, g[kGateU], g[kGateD]));
      }
      __syncthreads();
      acc_t* tmp = prev;
      prev = cur;
      cur = tmp;
    }
  }
}

// y[i] = sum_k part[k n + i] (acc_t, k in order), n = B H W C channels-last values.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMergeThreads)
    lanes_merge_kernel(const scalar_t* __restrict__ part, scalar_t* __restrict__ y, int64_t n, int64_t K) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    acc_t sum = static_cast<acc_t>(part[i]);
    for (int64_t k = 1; k < K; ++k) sum += static_cast<acc_t>(part[k * n + i]);
    y[i] = static_cast<scalar_t>(sum);
  }
}

// One position's dL/d(the six gate logits) of a lane, from its fused backward step, into `dg`, and
// added into the lane's sums: dL/dbias (db[f] += dg_f) and dL/dweight (dw[s][f] += dg_f proxy_s).
template <int kS, typename acc_t>
__device__ __forceinline__ void add_gate_grads(const FusedGrads<acc_t>& r, const acc_t (&pr)[kS],
                                               acc_t (&dg)[kGateFields], acc_t (&db)[kGateFields],
                                               acc_t (&dw)[kS * kGateFields]) {
  dg[kGateNeg] = r.dgn;
  dg[kGateMid] = r.dgm;
  dg[kGatePos] = r.dgp;
  dg[kGateLam] = r.dgl;
  dg[kGateU] = r.dgu;
  dg[kGateD] = r.dgd;
  GSPN_UNROLL
  for (int f = 0; f < kGateFields; ++f) db[f] += dg[f];
  GSPN_UNROLL
  for (int s2 = 0; s2 < kS; ++s2) {
    GSPN_UNROLL
    for (int f = 0; f < kGateFields; ++f) dw[s2 * kGateFields + f] += dg[f] * pr[s2];
  }
}

// The end of a backward CTA: each lane's sums over the CTA's positions (dL/dweight [kS][kFields],
// dL/dbias [kFields], dL/dmerge), added in position order through the reduction workspace `red`
// ([value][position][lane]), into this (batch, run)'s partial rows: dwb_part [B*runs][K*kFields*C][S+1]
// (the bias last), dm_part [B*runs][K][C].  Every thread of the CTA calls it (one barrier).
template <int kS, int kFields, typename acc_t>
__device__ void store_lane_sums(const LanesGeometry& geo, const LaneTask& t, const acc_t (&dw)[kS * kFields],
                                const acc_t (&db)[kFields], acc_t dm, acc_t* red, acc_t* dwb_part,
                                acc_t* dm_part) {
  constexpr int kValues = kS * kFields + kFields + 1;
  const int G = geo.G;
  const int64_t C = geo.C, S = geo.S;
  const int64_t zb = t.b * geo.zruns + t.run, Rows = geo.K * kFields * C;
  GSPN_UNROLL
  for (int v = 0; v < kValues; ++v) {
    const acc_t val = v < kS * kFields ? dw[v] : (v < kS * kFields + kFields ? db[v - kS * kFields] : dm);
    red[(v * geo.P + t.p) * G + t.lane] = val;
  }
  __syncthreads();
  for (int64_t i = t.tid; i < kValues * G; i += t.nthreads) {
    const int v = static_cast<int>(i / G), l = static_cast<int>(i % G);
    const int64_t c = static_cast<int64_t>(blockIdx.x) * G + l;
    if (c >= C) continue;
    acc_t sum = acc_t(0);
    for (int pp = 0; pp < geo.P; ++pp) sum += red[(v * geo.P + pp) * G + l];
    if (v < kS * kFields) {
      const int s2 = v / kFields, f = v % kFields;
      if (s2 < S) dwb_part[(zb * Rows + (t.k * kFields + f) * C + c) * (S + 1) + s2] = sum;
    } else if (v < kS * kFields + kFields) {
      const int f = v - kS * kFields;
      dwb_part[(zb * Rows + (t.k * kFields + f) * C + c) * (S + 1) + S] = sum;
    } else {
      dm_part[(zb * geo.K + t.k) * C + c] = sum;
    }
  }
}

template <typename scalar_t, typename acc_t, int kS>
__global__ void __launch_bounds__(kMaxThreads)
    lanes_bwd_kernel(const scalar_t* __restrict__ gy, const scalar_t* __restrict__ x,
                     const scalar_t* __restrict__ proxy, const scalar_t* __restrict__ weight,
                     const scalar_t* __restrict__ bias, const scalar_t* __restrict__ merge,
                     scalar_t* __restrict__ dx_part, acc_t* __restrict__ dproxy_part, acc_t* __restrict__ dwb_part,
                     acc_t* __restrict__ dm_part, acc_t* ws, const LanesGeometry geo) {
  GSPN_DYNAMIC_SHARED(smem_raw);
  const LaneTask t(geo);
  if (t.g0 >= t.g1) return;
  LaneRows<acc_t, kS> rows;
  rows.load(geo, t, weight, bias, merge);
  const int64_t G = geo.G, P2 = t.M + 2, C = geo.C, S = geo.S, HWB = geo.B * geo.H * geo.W;
  constexpr bool kSharedRows = shared_rows(kS, sizeof(acc_t));
  const acc_t* wrow;  // the lane's projection rows [s][field]
  if constexpr (kSharedRows) {
    acc_t* wsm = reinterpret_cast<acc_t*>(smem_raw) + (geo.global_lines ? 0 : geo.line_elems) +
                 t.lane * (kS * kGateFields + 1);
    if (t.p == 0) {
      GSPN_UNROLL
      for (int i = 0; i < kS * kGateFields; ++i) wsm[i] = rows.w[i];
    }
    wrow = wsm;  // read after the first __syncthreads below
  } else {
    wrow = rows.w;
  }
  const int64_t R = kCheckpoint;
  acc_t* ckpt = ws + t.cta * geo.ws_per_cta;         // [segments - 1][M][G]
  acc_t* seg = ckpt + geo.ckpt_elems;                // [R + 1][M + 2][G]: the previous line, then R lines
  acc_t* buf = line_buffers<acc_t>(smem_raw, ws, geo, t, geo.ckpt_elems + geo.seg_elems + geo.red_elems);
  scalar_t* dxo = dx_part + t.k * HWB * C;
  acc_t* dpo = dproxy_part + (t.k * geo.groups + blockIdx.x) * HWB * S;
  // per-lane sums: dL/dweight [s][field], dL/dbias, dL/dmerge
  acc_t dw[kS * kGateFields], db[kGateFields], dm = acc_t(0);
  GSPN_UNROLL
  for (int i = 0; i < kS * kGateFields; ++i) dw[i] = acc_t(0);
  GSPN_UNROLL
  for (int f = 0; f < kGateFields; ++f) db[f] = acc_t(0);
  zero_block(seg, (R + 1) * P2 * G, t);  // the pads of every segment line stay 0
  // iterations of a CTA-uniform loop over a line's positions (the dL/dproxy shuffles need whole warps)
  const int64_t sweeps = (t.M + geo.P - 1) / geo.P;
  for (int64_t grp = t.g0; grp < t.g1; ++grp) {
    const int64_t s0 = group_begin(grp, t.chunk), s1 = group_end(grp, t.chunk, t.L), len = s1 - s0;
    const int64_t nseg = (len + R - 1) / R;
    // 1. checkpoints: h of step r R - 1 saved as checkpoint r - 1 (r = 1 .. nseg - 1)
    if (nseg > 1) {
      __syncthreads();  // the last chunk is done with the line buffers
      zero_block(buf, kForwardLines * P2 * G, t);
      __syncthreads();
      acc_t* prev = buf + G;
      acc_t* cur = prev + P2 * G;
      for (int64_t step = 0; step < (nseg - 1) * R; ++step) {
        const int64_t s = line_at(step, s0, s1, t.reverse);
        acc_t* save = (step + 1) % R == 0 ? ckpt + ((step + 1) / R - 1) * t.M * G : nullptr;
        for (int64_t j = t.p; j < t.M; j += geo.P) {
          const int64_t q = t.pixel(geo, s, j);
          acc_t pr[kS];
          load_proxy<acc_t, kS>(proxy, q, S, pr);
          acc_t g[kGateFields];
          project_logits(wrow, rows.bias, pr, kS, g);
          const acc_t xv = t.live ? static_cast<acc_t>(x[q * C + t.c]) : acc_t(0);
          const acc_t* hp = prev + j * G + t.lane;
          const acc_t h = fused_h<acc_t>(xv, g[kGateNeg], g[kGateMid], g[kGatePos], g[kGateLam], hp[-G], hp[0],
                                         hp[G], j > 0, j + 1 < t.M, step == 0);
          cur[j * G + t.lane] = h;
          if (save != nullptr) save[j * G + t.lane] = h;
        }
        __syncthreads();
        acc_t* tmp = prev;
        prev = cur;
        cur = tmp;
      }
    }
    // 2. the adjoint, segment by segment from the last; the next line's products start at 0
    __syncthreads();
    zero_block(buf, kBackwardLines * P2 * G, t);
    acc_t* nxt = buf + G;          // (w_neg a, w_mid a, w_pos a) of the next line at nxt + {0, 1, 2} P2 G
    acc_t* cur = nxt + 3 * P2 * G;  // the same for this line
    for (int64_t sg = nseg - 1; sg >= 0; --sg) {
      const int64_t t0 = sg * R, t1 = t0 + R < len ? t0 + R : len;
      // the line before the segment (0 before the chunk's first) as segment line 0
      for (int64_t j = t.p; j < t.M; j += geo.P) {
        seg[(j + 1) * G + t.lane] = t0 == 0 ? acc_t(0) : ckpt[((sg - 1) * t.M + j) * G + t.lane];
      }
      __syncthreads();
      // h of the segment's lines into segment lines 1 .. t1 - t0
      for (int64_t step = t0; step < t1; ++step) {
        const int64_t s = line_at(step, s0, s1, t.reverse);
        const acc_t* hl = seg + (step - t0) * P2 * G + G + t.lane;
        acc_t* hc = seg + (step - t0 + 1) * P2 * G + G + t.lane;
        for (int64_t j = t.p; j < t.M; j += geo.P) {
          const int64_t q = t.pixel(geo, s, j);
          acc_t pr[kS];
          load_proxy<acc_t, kS>(proxy, q, S, pr);
          acc_t g[kGateFields];
          project_logits(wrow, rows.bias, pr, kS, g);
          const acc_t xv = t.live ? static_cast<acc_t>(x[q * C + t.c]) : acc_t(0);
          const acc_t* hp = hl + j * G;
          hc[j * G] = fused_h<acc_t>(xv, g[kGateNeg], g[kGateMid], g[kGatePos], g[kGateLam], hp[-G], hp[0], hp[G],
                                     j > 0, j + 1 < t.M, step == 0);
        }
        __syncthreads();
      }
      // walk the segment backwards
      for (int64_t step = t1 - 1; step >= t0; --step) {
        const int64_t s = line_at(step, s0, s1, t.reverse);
        const acc_t* hl = seg + (step - t0) * P2 * G + G + t.lane;  // previous line
        const acc_t* hc = hl + P2 * G;                               // this line
        const acc_t* an = nxt + t.lane;
        acc_t* ac = cur + t.lane;
        for (int64_t sw = 0; sw < sweeps; ++sw) {
          const int64_t j = sw * geo.P + t.p;
          const bool active = j < t.M;
          acc_t pr[kS];
          acc_t dg[kGateFields];
          if (active) {
            const int64_t q = t.pixel(geo, s, j);
            load_proxy<acc_t, kS>(proxy, q, S, pr);
            acc_t g[kGateFields];
            project_logits(wrow, rows.bias, pr, kS, g);
            const acc_t xv = t.live ? static_cast<acc_t>(x[q * C + t.c]) : acc_t(0);
            const acc_t dy = t.live ? static_cast<acc_t>(gy[q * C + t.c]) : acc_t(0);
            const bool first = step == 0;
            const Taps<acc_t> zero = {};
            const Taps<acc_t> taps =
                first ? zero : normalize_taps<acc_t>(g[kGateNeg], g[kGateMid], g[kGatePos], j > 0, j + 1 < t.M);
            const acc_t* hp = hl + j * G;
            // the next line's three products enter with unit adjoints
            const FusedGrads<acc_t> r = fused_backward_with<acc_t>(
                dy, rows.m, xv, taps, sigmoid_and_grad<acc_t>(g[kGateLam]), g[kGateU], g[kGateD], hc[j * G], hp[-G],
                hp[0], hp[G], an[(j + 1) * G], acc_t(1), an[P2 * G + j * G], acc_t(1), an[2 * P2 * G + (j - 1) * G],
                acc_t(1), first);
            ac[j * G] = r.taps.wn * r.a;
            ac[P2 * G + j * G] = r.taps.wm * r.a;
            ac[2 * P2 * G + j * G] = r.taps.wp * r.a;
            if (t.live) dxo[q * C + t.c] = static_cast<scalar_t>(r.dx);
            dm += r.dm;
            add_gate_grads<kS>(r, pr, dg, db, dw);
          } else {
            GSPN_UNROLL
            for (int f = 0; f < kGateFields; ++f) dg[f] = acc_t(0);
          }
          // dL/dproxy of the pixel: this lane's share, summed over the G lanes, in blocks of up to 8
          // proxy channels (fewer live registers)
          constexpr int kBlock = kS < 8 ? kS : 8;
          const int64_t q = active ? t.pixel(geo, s, j) : 0;
          GSPN_UNROLL
          for (int h = 0; h < kS / kBlock; ++h) {
            if (h * kBlock < S) {
              acc_t v[kBlock];
              GSPN_UNROLL
              for (int s2 = 0; s2 < kBlock; ++s2) {
                const acc_t* w2 = wrow + (h * kBlock + s2) * kGateFields;
                v[s2] = (w2[0] * dg[0] + w2[1] * dg[1]) + (w2[2] * dg[2] + w2[3] * dg[3]) +
                        (w2[4] * dg[4] + w2[5] * dg[5]);
              }
              int first_s, count;
              lane_reduce<kBlock>(v, t.lane, geo.G, first_s, count);
              GSPN_UNROLL
              for (int i = 0; i < kBlock; ++i) {
                const int64_t s2 = h * kBlock + first_s + i;
                if (active && i < count && s2 < S) dpo[q * S + s2] = v[i];
              }
            }
          }
        }
        __syncthreads();
        acc_t* tmp = nxt;
        nxt = cur;
        cur = tmp;
      }
    }
  }
  // 3. the per-lane sums over the CTA's positions into this (b, run)'s partial rows
  store_lane_sums<kS, kGateFields>(geo, t, dw, db, dm, seg + geo.seg_elems, dwb_part, dm_part);
}

// The launch over (B, C, H, W) channels-last maps with K directions and a proxy of S <= kMaxLaneS
// channels: G from {32, 16, 8} (not above C rounded up to a power of two), the largest whose CTAs
// fill the GPU (kTargetCtas) with line buffers in kMaxShared bytes, else the smallest that fits; P
// positions so that G P <= kMaxThreads and whole warps; chunked scans cut into runs of whole chunks
// until there are kTargetCtas CTAs (`target_ctas`: the tests vary it to reach every G and run
// layout at small shapes).  Lines whose buffers fit no G go to a global workspace.
struct LanesPlan {
  LanesGeometry geo;
  unsigned int grid[3];
  unsigned int block[2];
  size_t shared_bytes;
  int64_t ws_elems;  // acc_t elements of the global workspace (0: none)
};

inline int64_t pow2_ceil(int64_t v) {
  int64_t p = 1;
  while (p < v) p *= 2;
  return p;
}

template <typename acc_t>
inline LanesPlan plan_lanes(int64_t B, int64_t C, int64_t H, int64_t W, int64_t K, int64_t chunk, int64_t S,
                            const bool* transpose, const bool* reverse, bool backward,
                            int64_t target_ctas = kTargetCtas, int attention_values = 0) {
  LanesPlan plan{};
  LanesGeometry& geo = plan.geo;
  geo.B = B;
  geo.C = C;
  geo.H = H;
  geo.W = W;
  geo.K = K;
  geo.chunk = chunk <= 0 ? 0 : chunk;
  geo.S = S;
  geo.side = std::max(H, W);
  for (int64_t k = 0; k < K; ++k) {
    geo.transpose[k] = transpose[k];
    geo.reverse[k] = reverse[k];
  }
  // the attention kernels (gspn_attention_kernels.h, attention_values > 0: the values a lane sums over
  // the CTA's positions in their backward) carry two states per lane: twice the line buffers, no
  // checkpoints or segments, the projection rows in registers
  const bool attention = attention_values > 0;
  const int lines = (backward ? kBackwardLines : kForwardLines) * (attention ? 2 : 1);
  const int64_t acc_size = sizeof(acc_t);
  const int kS = S <= 8 ? 8 : 16;
  const bool rows_smem = !attention && backward && shared_rows(kS, static_cast<int>(acc_size));
  auto lines_bytes = [&](int64_t G) { return lines * (geo.side + 2) * G * acc_size; };
  auto rows_bytes = [&](int64_t G) { return rows_smem ? shared_rows_elems(kS, G) * acc_size : 0; };
  auto smem = [&](int64_t G) { return lines_bytes(G) + rows_bytes(G); };
  // chunks per direction: the runs a chunked scan can be cut into
  int64_t max_groups = 1;
  for (int64_t k = 0; k < K; ++k) {
    const int64_t L = transpose[k] ? W : H;
    max_groups = std::max(max_groups, num_groups(L, chunk_of(chunk, L)));
  }
  const int64_t gmax = std::max<int64_t>(8, std::min<int64_t>(32, pow2_ceil(C)));
  int G = 0;  // the largest fitting G with enough CTAs, else the smallest fitting one
  for (int64_t cand = gmax; cand >= 8; cand /= 2) {
    if (smem(cand) > kMaxShared) continue;
    G = static_cast<int>(cand);
    if (B * K * ((C + cand - 1) / cand) * max_groups >= target_ctas) break;
  }
  geo.global_lines = G == 0;
  if (G == 0) G = 8;
  geo.G = G;
  geo.groups = (C + G - 1) / G;
  const int64_t per_warp = std::max<int64_t>(1, 32 / G);
  geo.P = static_cast<int>(std::min<int64_t>(kMaxThreads / G, (geo.side + per_warp - 1) / per_warp * per_warp));
  // runs: whole chunks per run, as few as give kTargetCtas CTAs
  const int64_t base = B * K * geo.groups;
  const int64_t want = std::max<int64_t>(1, (target_ctas + base - 1) / base);
  geo.cpr = std::max<int64_t>(1, (max_groups + want - 1) / want);
  geo.zruns = (max_groups + geo.cpr - 1) / geo.cpr;
  geo.line_elems = lines * (geo.side + 2) * G;
  // backward workspace: checkpoints of the longest chunk and a segment
  int64_t ckpt = 0;
  for (int64_t k = 0; k < K; ++k) {
    const int64_t L = transpose[k] ? W : H, M = transpose[k] ? H : W;
    const int64_t segs = (chunk_of(chunk, L) + kCheckpoint - 1) / kCheckpoint;
    ckpt = std::max(ckpt, (segs - 1) * M * G);
  }
  geo.ckpt_elems = backward && !attention ? ckpt : 0;
  geo.seg_elems = backward && !attention ? (kCheckpoint + 1) * (geo.side + 2) * G : 0;
  geo.red_elems = backward ? static_cast<int64_t>(attention ? attention_values : reduce_values(kS)) * geo.P * G : 0;
  geo.ws_per_cta = geo.ckpt_elems + geo.seg_elems + geo.red_elems + (geo.global_lines ? geo.line_elems : 0);
  plan.grid[0] = static_cast<unsigned int>(geo.groups);
  plan.grid[1] = static_cast<unsigned int>(K);
  plan.grid[2] = static_cast<unsigned int>(B * geo.zruns);
  plan.block[0] = static_cast<unsigned int>(G);
  plan.block[1] = static_cast<unsigned int>(geo.P);
  plan.shared_bytes = static_cast<size_t>((geo.global_lines ? 0 : lines_bytes(G)) + rows_bytes(G));
  plan.ws_elems = geo.ws_per_cta * geo.groups * K * B * geo.zruns;
  return plan;
}

// The merge kernel's launch over n values.
inline unsigned int merge_blocks(int64_t n) {
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min(kMergeBlocks, (n + kMergeThreads - 1) / kMergeThreads)));
}

}  // namespace lanes_cuda
}  // namespace gspn
