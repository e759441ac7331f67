// CUDA kernels of the fused LayerNorm + GRN of the GSPN mixer (layer_norm_grn_fwd / _bwd) and their
// launch plan.  The math is gspn_norm.h's, the same as the CPU kernel's (cpu/gspn_norm_cpu.cpp); the
// ATen side of the op (outputs, partial buffers, the kernel sequence, the final sums) is
// gspn_norm_plan.h, which the test suite's host emulation runs too; see gspn_kernel_common.h for what
// may go in this header.
//
// Layout: y and dL/dout channels-last, [b][pixel][c]: a pixel's C channels are contiguous.
//
// A *pixel kernel* has grid (tiles, B), block (32 lanes, `warps` warps): CTA (t, b) owns a range of
// `tile` pixels of batch element b (gspn_norm_args.h's norm_tiles), each warp one pixel at a time
// (pixels warp, warp + warps, ... of the range), its lanes across the channels (c = lane, lane + 32,
// ...: coalesced loads of the pixel's row), the channel sums of a pixel (mean, variance, the layer
// norm's backward means) by a butterfly of shuffles.  Per-channel sums over the CTA's pixels
// accumulate in a per-warp row of shared memory ([warp][value][C] acc_t, each lane owning its
// channels), added over the warps in order at the end into the CTA's partial row
// [b][t][value][C] in global memory.  A *batch kernel* has grid (B), block (kNormFinalThreads): it
// adds the partial rows of b in tile order per channel and runs the per-batch GRN step, whose mean
// over channels is a block reduction in shared memory (fixed order).  No atomics: results do not
// depend on scheduling.
//
//   forward:  norm_stats_kernel (mean, rstd per pixel; sum z^2 per channel) -> norm_grn_kernel
//             (g, the scale s) -> norm_apply_kernel (out = z s + beta)
//   backward: norm_grad_stats_kernel (sum dout z, sum dout) -> norm_grn_grad_kernel (s, t, dgamma and
//             dbeta rows) -> norm_grad_apply_kernel (dy; sum dz zhat, sum dz per channel)
//
// The normalised map is never stored: each pass recomputes z from y and the pixel's (mean, rstd).
//
// Status: executed on the CPU by tests/test_cuda_emulation.py (host emulation) and compiled by nvcc
// for sm_80 / sm_90; not yet run or timed on a GPU.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "../gspn_norm.h"
#include "gspn_kernel_common.h"

namespace gspn {
namespace norm_cuda {

constexpr int kNormWarp = 32;
constexpr int kNormMaxWarps = 8;
constexpr int kNormFinalThreads = 256;
constexpr int64_t kNormTargetCtas = 2 * 132;  // enough CTAs to fill an H100 / H200 twice
constexpr size_t kNormMaxShared = 48 * 1024;  // per-warp rows within the default shared memory

struct NormGeo {
  int64_t B, C, HW, tiles, tile;
  double eps, grn_eps;
};

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
  for (int off = kNormWarp / 2; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// The sum of every thread's `v` over the block (kNormFinalThreads threads), in a fixed order; every
// thread gets it.  `red` holds kNormFinalThreads values; every thread must call it.
template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t v, acc_t* red) {
  const int tid = threadIdx.x;
  red[tid] = v;
  __syncthreads();
  for (int half = kNormFinalThreads / 2; half > 0; half >>= 1) {
    if (tid < half) red[tid] += red[tid + half];
    __syncthreads();
  }
  const acc_t sum = red[0];
  __syncthreads();  // red is reused by the next call
  return sum;
}

// The pixel range of this CTA and the per-warp shared rows (zeroed) of `values` x C acc_t.
template <typename acc_t>
struct PixelTile {
  int64_t b, p0, p1;
  int lane, warp, warps;
  acc_t* rows;  // this warp's [values][C]

  __device__ __forceinline__ PixelTile(const NormGeo& geo, acc_t* smem, int values) {
    b = blockIdx.y;
    p0 = static_cast<int64_t>(blockIdx.x) * geo.tile;
    p1 = p0 + geo.tile < geo.HW ? p0 + geo.tile : geo.HW;
    lane = threadIdx.x;
    warp = threadIdx.y;
    warps = blockDim.y;
    rows = smem + static_cast<int64_t>(warp) * values * geo.C;
    // each lane zeroes (and later adds to) only its own channels c = lane (mod 32) of every row
    for (int v = 0; v < values; ++v) {
      for (int64_t c = lane; c < geo.C; c += kNormWarp) rows[v * geo.C + c] = acc_t(0);
    }
  }
};

// The end of a pixel kernel: the warps' rows added in warp order into the CTA's partial row
// part[(b * tiles + t) * values * C ...].  Every thread calls it.
template <typename acc_t>
__device__ __forceinline__ void store_partial_rows(const NormGeo& geo, const acc_t* smem, int values, acc_t* part) {
  __syncthreads();
  const int64_t n = values * geo.C;
  acc_t* out = part + (static_cast<int64_t>(blockIdx.y) * geo.tiles + blockIdx.x) * n;
  const int threads = blockDim.x * blockDim.y;
  for (int64_t i = threadIdx.y * blockDim.x + threadIdx.x; i < n; i += threads) {
    acc_t sum = 0;
    for (unsigned int w = 0; w < blockDim.y; ++w) sum += smem[w * n + i];
    out[i] = sum;
  }
}

// Forward pass 1: mean and rstd per pixel, sum z^2 per channel (one partial row per CTA).
template <typename scalar_t, typename param_t, typename acc_t>
__global__ void __launch_bounds__(kNormWarp * kNormMaxWarps)
    norm_stats_kernel(const scalar_t* __restrict__ y, const param_t* __restrict__ weight,
                      const param_t* __restrict__ bias, acc_t* __restrict__ mean, acc_t* __restrict__ rstd,
                      acc_t* __restrict__ q_part, NormGeo geo) {
  GSPN_DYNAMIC_SHARED(smem_raw);
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);
  const PixelTile<acc_t> t(geo, smem, 1);
  const int64_t C = geo.C;
  const acc_t eps = static_cast<acc_t>(geo.eps);
  for (int64_t p = t.p0 + t.warp; p < t.p1; p += t.warps) {
    const int64_t i = t.b * geo.HW + p;
    const scalar_t* yp = y + i * C;
    acc_t s = 0;
    for (int64_t c = t.lane; c < C; c += kNormWarp) s += static_cast<acc_t>(yp[c]);
    const acc_t mu = warp_sum(s) / static_cast<acc_t>(C);
    acc_t v = 0;
    for (int64_t c = t.lane; c < C; c += kNormWarp) {
      const acc_t d = static_cast<acc_t>(yp[c]) - mu;
      v += d * d;
    }
    const acc_t r = norm::ln_rstd(warp_sum(v), C, eps);
    if (t.lane == 0) {
      mean[i] = mu;
      rstd[i] = r;
    }
    for (int64_t c = t.lane; c < C; c += kNormWarp) {
      const acc_t z = (static_cast<acc_t>(yp[c]) - mu) * r * static_cast<acc_t>(weight[c]) + static_cast<acc_t>(bias[c]);
      t.rows[c] += z * z;
    }
  }
  store_partial_rows(geo, smem, 1, q_part);
}

// Forward, per batch element b: g = sqrt(sum_tiles q), 1 / m, s = 1 + gamma g / m.
template <typename param_t, typename acc_t>
__global__ void __launch_bounds__(kNormFinalThreads)
    norm_grn_kernel(const acc_t* __restrict__ q_part, const param_t* __restrict__ gamma, acc_t* __restrict__ gnorm,
                    acc_t* __restrict__ scale, NormGeo geo) {
  __shared__ acc_t red[kNormFinalThreads];
  const int64_t b = blockIdx.x, C = geo.C;
  acc_t local = 0;
  for (int64_t c = threadIdx.x; c < C; c += kNormFinalThreads) {
    acc_t q = 0;
    for (int64_t t = 0; t < geo.tiles; ++t) q += q_part[(b * geo.tiles + t) * C + c];
    const acc_t g = norm::nsqrt(q);
    gnorm[b * C + c] = g;
    local += g;
  }
  const acc_t inv_m = acc_t(1) / (block_sum(local, red) / static_cast<acc_t>(C) + static_cast<acc_t>(geo.grn_eps));
  for (int64_t c = threadIdx.x; c < C; c += kNormFinalThreads) {
    scale[b * C + c] = norm::grn_scale(gnorm[b * C + c], inv_m, static_cast<acc_t>(gamma[c]));
  }
}

// Forward pass 2: out = z s + beta.
template <typename scalar_t, typename param_t, typename acc_t>
__global__ void __launch_bounds__(kNormWarp * kNormMaxWarps)
    norm_apply_kernel(const scalar_t* __restrict__ y, const param_t* __restrict__ weight,
                      const param_t* __restrict__ bias, const param_t* __restrict__ beta,
                      const acc_t* __restrict__ mean, const acc_t* __restrict__ rstd, const acc_t* __restrict__ scale,
                      scalar_t* __restrict__ out, NormGeo geo) {
  const int64_t b = blockIdx.y, C = geo.C;
  const int64_t p0 = static_cast<int64_t>(blockIdx.x) * geo.tile;
  const int64_t p1 = p0 + geo.tile < geo.HW ? p0 + geo.tile : geo.HW;
  const acc_t* s = scale + b * C;
  for (int64_t p = p0 + threadIdx.y; p < p1; p += blockDim.y) {
    const int64_t i = b * geo.HW + p;
    const acc_t mu = mean[i], r = rstd[i];
    for (int64_t c = threadIdx.x; c < C; c += kNormWarp) {
      const acc_t z = (static_cast<acc_t>(y[i * C + c]) - mu) * r * static_cast<acc_t>(weight[c]) +
                      static_cast<acc_t>(bias[c]);
      out[i * C + c] = static_cast<scalar_t>(z * s[c] + static_cast<acc_t>(beta[c]));
    }
  }
}

// Backward pass 1: per channel sum dout z and sum dout (partial rows [ds][dbeta]).
template <typename scalar_t, typename param_t, typename acc_t>
__global__ void __launch_bounds__(kNormWarp * kNormMaxWarps)
    norm_grad_stats_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ y,
                           const param_t* __restrict__ weight, const param_t* __restrict__ bias,
                           const acc_t* __restrict__ mean, const acc_t* __restrict__ rstd, acc_t* __restrict__ part,
                           NormGeo geo) {
  GSPN_DYNAMIC_SHARED(smem_raw);
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);
  const PixelTile<acc_t> t(geo, smem, 2);
  const int64_t C = geo.C;
  for (int64_t p = t.p0 + t.warp; p < t.p1; p += t.warps) {
    const int64_t i = t.b * geo.HW + p;
    const acc_t mu = mean[i], r = rstd[i];
    for (int64_t c = t.lane; c < C; c += kNormWarp) {
      const acc_t z = (static_cast<acc_t>(y[i * C + c]) - mu) * r * static_cast<acc_t>(weight[c]) +
                      static_cast<acc_t>(bias[c]);
      const acc_t d = static_cast<acc_t>(grad[i * C + c]);
      t.rows[c] += d * z;
      t.rows[C + c] += d;
    }
  }
  store_partial_rows(geo, smem, 2, part);
}

// Backward, per batch element b: from ds = sum_tiles, the scale s and the weight t of z in dz
// (st [b][2][C]), and the rows of dgamma and dbeta (gb_part [b][2][C]).
template <typename param_t, typename acc_t>
__global__ void __launch_bounds__(kNormFinalThreads)
    norm_grn_grad_kernel(const acc_t* __restrict__ part, const acc_t* __restrict__ gnorm,
                         const param_t* __restrict__ gamma, acc_t* __restrict__ st, acc_t* __restrict__ gb_part,
                         NormGeo geo) {
  __shared__ acc_t red[kNormFinalThreads];
  const int64_t b = blockIdx.x, C = geo.C;
  const acc_t* g = gnorm + b * C;
  acc_t* dgamma = gb_part + b * 2 * C;
  acc_t* dbeta = dgamma + C;
  acc_t local = 0;
  for (int64_t c = threadIdx.x; c < C; c += kNormFinalThreads) local += g[c];
  const acc_t inv_m = acc_t(1) / (block_sum(local, red) / static_cast<acc_t>(C) + static_cast<acc_t>(geo.grn_eps));
  local = 0;
  for (int64_t c = threadIdx.x; c < C; c += kNormFinalThreads) {
    acc_t ds = 0, db = 0;
    for (int64_t t = 0; t < geo.tiles; ++t) {
      const acc_t* row = part + (b * geo.tiles + t) * 2 * C;
      ds += row[c];
      db += row[C + c];
    }
    const acc_t n = g[c] * inv_m;
    dgamma[c] = ds * n;
    dbeta[c] = db;
    st[b * 2 * C + C + c] = ds;  // kept (by this thread) until t is known
    local += ds * static_cast<acc_t>(gamma[c]) * n;
  }
  const acc_t mean_dnn = block_sum(local, red) / static_cast<acc_t>(C);
  for (int64_t c = threadIdx.x; c < C; c += kNormFinalThreads) {
    const acc_t gm = static_cast<acc_t>(gamma[c]);
    const acc_t ds = st[b * 2 * C + C + c];
    st[b * 2 * C + c] = norm::grn_scale(g[c], inv_m, gm);
    st[b * 2 * C + C + c] = norm::grn_z_weight(ds * gm, mean_dnn, g[c], inv_m);
  }
}

// Backward pass 2: dy, and per channel sum dz zhat and sum dz (partial rows [dw][db]).
template <typename scalar_t, typename param_t, typename acc_t>
__global__ void __launch_bounds__(kNormWarp * kNormMaxWarps)
    norm_grad_apply_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ y,
                           const param_t* __restrict__ weight, const param_t* __restrict__ bias,
                           const acc_t* __restrict__ mean, const acc_t* __restrict__ rstd, const acc_t* __restrict__ st,
                           scalar_t* __restrict__ dy, acc_t* __restrict__ part, NormGeo geo) {
  GSPN_DYNAMIC_SHARED(smem_raw);
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);
  const PixelTile<acc_t> t(geo, smem, 2);
  const int64_t C = geo.C;
  const acc_t* s = st + t.b * 2 * C;
  const acc_t* tz = s + C;
  for (int64_t p = t.p0 + t.warp; p < t.p1; p += t.warps) {
    const int64_t i = t.b * geo.HW + p;
    const acc_t mu = mean[i], r = rstd[i];
    acc_t m1 = 0, m2 = 0;
    for (int64_t c = t.lane; c < C; c += kNormWarp) {
      const acc_t w = static_cast<acc_t>(weight[c]);
      const acc_t zh = (static_cast<acc_t>(y[i * C + c]) - mu) * r;
      const acc_t dz = static_cast<acc_t>(grad[i * C + c]) * s[c] + (zh * w + static_cast<acc_t>(bias[c])) * tz[c];
      const acc_t dzh = dz * w;
      t.rows[c] += dz * zh;
      t.rows[C + c] += dz;
      m1 += dzh;
      m2 += dzh * zh;
    }
    m1 = warp_sum(m1) / static_cast<acc_t>(C);
    m2 = warp_sum(m2) / static_cast<acc_t>(C);
    for (int64_t c = t.lane; c < C; c += kNormWarp) {
      const acc_t w = static_cast<acc_t>(weight[c]);
      const acc_t zh = (static_cast<acc_t>(y[i * C + c]) - mu) * r;
      const acc_t dz = static_cast<acc_t>(grad[i * C + c]) * s[c] + (zh * w + static_cast<acc_t>(bias[c])) * tz[c];
      dy[i * C + c] = static_cast<scalar_t>(norm::ln_input_grad(dz * w, zh, r, m1, m2));
    }
  }
  store_partial_rows(geo, smem, 2, part);
}

// The launch of the pixel kernels: warps per CTA (as many as fit kNormMaxShared with `values` rows of
// C acc_t each, at most kNormMaxWarps; 0 when not even one fits) and the tiling.
struct NormPlan {
  NormGeo geo;
  int warps;
  size_t shared_bytes;
};

template <typename acc_t>
NormPlan plan_norm_launch(int64_t B, int64_t C, int64_t HW, double eps, double grn_eps, int values,
                          int64_t target_ctas = kNormTargetCtas) {
  NormPlan plan{};
  const size_t row = static_cast<size_t>(values) * static_cast<size_t>(C) * sizeof(acc_t);
  plan.warps = static_cast<int>(std::min<size_t>(kNormMaxWarps, kNormMaxShared / row));
  const int warps = plan.warps > 0 ? plan.warps : 1;
  plan.shared_bytes = row * static_cast<size_t>(warps);
  const int64_t max_tiles = std::max<int64_t>(1, (target_ctas + B - 1) / std::max<int64_t>(1, B));
  const norm::Tiles t = norm::pixel_tiles(HW, max_tiles, 4 * static_cast<int64_t>(warps));
  plan.geo = {B, C, HW, t.tiles, t.tile, eps, grn_eps};
  return plan;
}

}  // namespace norm_cuda
}  // namespace gspn
