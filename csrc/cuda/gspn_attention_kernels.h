// Channels-last CUDA kernels of the fused GSPN attention of the SD-XL swap (attention_fwd /
// attention_bwd).  The math is gspn_step.h's (project_fields, normalize_taps, attention_h,
// attention_out(_backward), attention_backward_step), the same as the CPU kernel's
// (csrc/cpu/gspn_attention_cpu.cpp); the launch design is the mixer's lane kernels'
// (gspn_lanes_kernels.h: LanesGeometry, LaneTask, plan_lanes with two states per lane, lane_reduce),
// whose header comment describes the grid: CTAs per (channel group of G lanes, direction, batch
// element x run of whole chunks), thread (lane, position), lines walked with one __syncthreads each.
// The op itself (arguments to outputs) is gspn_cuda_plan.h's attention_cuda_fwd / _bwd.
//
// Layout: q, k, v, dL/dout (B, H, W, E) and the proxy (B, H, W, S), contiguous: the token grids as the
// projections produce them (the lanes of a pixel are contiguous).  weight (K*3*E, S), bias (K*3*E),
// merge (K, E), u_bias (E).
//
// Forward (attn_fwd_kernel): a lane projects its pixel's three tap logits from the proxy in registers,
// normalises them once and advances both states, the numerator hn (input v) and the denominator hd
// (input 1), lam = sigmoid(k) read from k; the previous line's states in a zero-padded [2 states][2
// lines][M+2][G] acc_t buffer (shared memory or the global workspace).  A CTA writes its direction's
// raw states into per-direction acc_t buffers hn[K][n], hd[K][n] (n = B H W E);
// attn_merge_kernel sums m_k hn_k and m_k hd_k in direction order and writes sigmoid(q + u) num /
// max(den, tiny).  No atomics.
//
// Backward: the forward kernel's states are kept (2 K acc_t maps: the memory the mixer's checkpointed
// backward avoids; a follow-up can checkpoint these the same way); attn_prep_kernel turns dL/dout into
// dL/dnum, dL/dden (acc_t maps) and dL/d(q + u) (acc_t, the launcher sums it into dL/du_bias);
// attn_bwd_kernel walks each direction's lines backwards with attention_backward_step, the next line's
// adjoints entering as products (w_neg a, w_mid a, w_pos a) of both states in a double-buffered
// [2][6][M+2][G] buffer, and writes per-direction dL/dv and dL/dlam partials (acc_t), dL/dproxy partial
// rows per (direction, channel group) (summed over the lanes of a pixel by lane_reduce), and
// per-(b, run) partial rows of dL/dweight, dL/dbias and dL/dmerge (summed over the CTA's positions
// through shared memory); attn_bwd_merge_kernel sums the dv and dlam partials and applies sigmoid'(k).
//
// Status: executed on the CPU by tests/test_cuda_emulation.py (host emulation) and compiled by nvcc for
// sm_80 / sm_90; not yet run on a GPU (gspn_attention's "auto" keeps the planes path on CUDA).
#pragma once

#include <cstdint>

#include "gspn_lanes_kernels.h"

namespace gspn {
namespace attn_cuda {

using lanes_cuda::LanesGeometry;
using lanes_cuda::LaneTask;

constexpr int kTaps = 3;
constexpr int kStates = 2;
constexpr int kMaxThreads = lanes_cuda::kMaxThreads;
constexpr int kMergeThreads = lanes_cuda::kMergeThreads;

// Values a lane sums over the CTA's positions in the backward: dL/dweight [kS][3], dL/dbias [3], dL/dm.
constexpr int reduce_values(int kS) { return kS * kTaps + kTaps + 1; }

// A lane's tap projection rows of its direction ([s][tap], zero past S and for lanes past E), biases
// and merge weight: the mixer's LaneRows with 3 logits instead of 6.
template <typename acc_t, int kS>
using TapRows = lanes_cuda::LaneRows<acc_t, kS, kTaps>;

// The normalised taps of pixel q at position j of a line of M (zero on a group's first line).
template <typename acc_t, int kS, typename scalar_t>
__device__ Taps<acc_t> pixel_taps(const TapRows<acc_t, kS>& rows, const scalar_t* proxy, int64_t q, int64_t S,
                                  int64_t j, int64_t M, bool first, acc_t (&pr)[kS]) {
  lanes_cuda::load_proxy<acc_t, kS>(proxy, q, S, pr);
  if (first) return Taps<acc_t>{};
  acc_t g[kTaps];
  project_fields<kTaps>(rows.w, rows.bias, pr, kS, g);
  return normalize_taps<acc_t>(g[0], g[1], g[2], j > 0, j + 1 < M);
}

template <typename scalar_t, typename acc_t, int kS>
__global__ void __launch_bounds__(kMaxThreads)
    attn_fwd_kernel(const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
                    const scalar_t* __restrict__ proxy, const scalar_t* __restrict__ weight,
                    const scalar_t* __restrict__ bias, const scalar_t* __restrict__ merge, acc_t* __restrict__ hn_out,
                    acc_t* __restrict__ hd_out, acc_t* ws, const LanesGeometry geo) {
  GSPN_DYNAMIC_SHARED(smem_raw);
  const LaneTask t(geo);
  if (t.g0 >= t.g1) return;  // this direction has fewer runs than the grid (the whole CTA)
  TapRows<acc_t, kS> rows;
  rows.load(geo, t, weight, bias, merge);
  const int64_t G = geo.G, P2 = t.M + 2, C = geo.C, n = geo.B * geo.H * geo.W * C;
  acc_t* buf = lanes_cuda::line_buffers<acc_t>(smem_raw, ws, geo, t, 0);
  lanes_cuda::zero_block(buf, kStates * 2 * P2 * G, t);  // the pads stay 0
  __syncthreads();
  acc_t* hno = hn_out + t.k * n;
  acc_t* hdo = hd_out + t.k * n;
  acc_t* pn = buf + G;  // position j at pn[j * G + lane]
  acc_t* cn = pn + P2 * G;
  acc_t* pd = cn + P2 * G;
  acc_t* cd = pd + P2 * G;
  for (int64_t grp = t.g0; grp < t.g1; ++grp) {
    const int64_t s0 = group_begin(grp, t.chunk), s1 = group_end(grp, t.chunk, t.L);
    for (int64_t step = 0; step < s1 - s0; ++step) {
      const int64_t s = line_at(step, s0, s1, t.reverse);
      for (int64_t j = t.p; j < t.M; j += geo.P) {
        const int64_t q = t.pixel(geo, s, j);
        acc_t pr[kS];
        const Taps<acc_t> taps = pixel_taps<acc_t, kS>(rows, proxy, q, geo.S, j, t.M, step == 0, pr);
        const acc_t xv = t.live ? static_cast<acc_t>(v[q * C + t.c]) : acc_t(0);
        const acc_t lam = t.live ? sigmoid<acc_t>(static_cast<acc_t>(k[q * C + t.c])) : acc_t(0);
        const acc_t* hp = pn + j * G + t.lane;
        const acc_t* dp = pd + j * G + t.lane;
        acc_t hn, hd;
        attention_h<acc_t>(xv, lam, taps, hp[-G], hp[0], hp[G], dp[-G], dp[0], dp[G], step == 0, hn, hd);
        cn[j * G + t.lane] = hn;
        cd[j * G + t.lane] = hd;
        if (t.live) {
          hno[q * C + t.c] = hn;
          hdo[q * C + t.c] = hd;
        }
      }
      __syncthreads();
      acc_t* tmp = pn;
      pn = cn;
      cn = tmp;
      tmp = pd;
      pd = cd;
      cd = tmp;
    }
  }
}

// out[i] = sigmoid(q + u) num / max(den, tiny), num = sum_k m_k hn[k n + i] (den likewise), k in order.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMergeThreads)
    attn_merge_kernel(const acc_t* __restrict__ hn, const acc_t* __restrict__ hd, const scalar_t* __restrict__ q,
                      const scalar_t* __restrict__ merge, const scalar_t* __restrict__ ub, scalar_t* __restrict__ out,
                      int64_t n, int64_t E, int64_t K, acc_t tiny) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t c = i % E;
    acc_t num = acc_t(0), den = acc_t(0);
    for (int64_t k = 0; k < K; ++k) {
      const acc_t m = static_cast<acc_t>(merge[k * E + c]);
      num += m * hn[k * n + i];
      den += m * hd[k * n + i];
    }
    const acc_t gq = static_cast<acc_t>(q[i]) + static_cast<acc_t>(ub[c]);
    out[i] = static_cast<scalar_t>(attention_out<acc_t>(gq, num, den, tiny));
  }
}

// dL/dnum, dL/dden and dL/d(q + u) of every value from dL/dout (the sums recomputed as the merge does).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMergeThreads)
    attn_prep_kernel(const scalar_t* __restrict__ gy, const acc_t* __restrict__ hn, const acc_t* __restrict__ hd,
                     const scalar_t* __restrict__ q, const scalar_t* __restrict__ merge,
                     const scalar_t* __restrict__ ub, acc_t* __restrict__ dnum, acc_t* __restrict__ dden,
                     acc_t* __restrict__ dgq, int64_t n, int64_t E, int64_t K, acc_t tiny) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t c = i % E;
    acc_t num = acc_t(0), den = acc_t(0);
    for (int64_t k = 0; k < K; ++k) {
      const acc_t m = static_cast<acc_t>(merge[k * E + c]);
      num += m * hn[k * n + i];
      den += m * hd[k * n + i];
    }
    const acc_t gq = static_cast<acc_t>(q[i]) + static_cast<acc_t>(ub[c]);
    const AttentionOutGrads<acc_t> r = attention_out_backward<acc_t>(static_cast<acc_t>(gy[i]), gq, num, den, tiny);
    dnum[i] = r.dnum;
    dden[i] = r.dden;
    dgq[i] = r.dgq;
  }
}

// dv[i] = sum_k dv_part[k n + i], dk[i] = sigmoid'(k[i]) sum_k dlam_part[k n + i], k in order.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMergeThreads)
    attn_bwd_merge_kernel(const acc_t* __restrict__ dv_part, const acc_t* __restrict__ dlam_part,
                          const scalar_t* __restrict__ k, scalar_t* __restrict__ dv, scalar_t* __restrict__ dk,
                          int64_t n, int64_t K) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    acc_t sv = dv_part[i], sl = dlam_part[i];
    for (int64_t kk = 1; kk < K; ++kk) {
      sv += dv_part[kk * n + i];
      sl += dlam_part[kk * n + i];
    }
    dv[i] = static_cast<scalar_t>(sv);
    dk[i] = static_cast<scalar_t>(sl * sigmoid_and_grad<acc_t>(static_cast<acc_t>(k[i])).ds);
  }
}

template <typename scalar_t, typename acc_t, int kS>
__global__ void __launch_bounds__(kMaxThreads)
    attn_bwd_kernel(const acc_t* __restrict__ dnum, const acc_t* __restrict__ dden, const acc_t* __restrict__ hn_in,
                    const acc_t* __restrict__ hd_in, const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
                    const scalar_t* __restrict__ proxy, const scalar_t* __restrict__ weight,
                    const scalar_t* __restrict__ bias, const scalar_t* __restrict__ merge,
                    acc_t* __restrict__ dv_part, acc_t* __restrict__ dlam_part, acc_t* __restrict__ dproxy_part,
                    acc_t* __restrict__ dwb_part, acc_t* __restrict__ dm_part, acc_t* ws, const LanesGeometry geo) {
  GSPN_DYNAMIC_SHARED(smem_raw);
  const LaneTask t(geo);
  if (t.g0 >= t.g1) return;
  TapRows<acc_t, kS> rows;
  rows.load(geo, t, weight, bias, merge);
  const int64_t G = geo.G, P2 = t.M + 2, C = geo.C, S = geo.S, HWB = geo.B * geo.H * geo.W, n = HWB * C;
  const acc_t* HN = hn_in + t.k * n;
  const acc_t* HD = hd_in + t.k * n;
  acc_t* dvo = dv_part + t.k * n;
  acc_t* dlo = dlam_part + t.k * n;
  acc_t* dpo = dproxy_part + (t.k * geo.groups + blockIdx.x) * HWB * S;
  acc_t* red = ws + t.cta * geo.ws_per_cta;  // the sums over positions [value][position][lane]
  acc_t* buf = lanes_cuda::line_buffers<acc_t>(smem_raw, ws, geo, t, geo.red_elems);
  acc_t dw[kS * kTaps], db[kTaps], dm = acc_t(0);
  GSPN_UNROLL
  for (int i = 0; i < kS * kTaps; ++i) dw[i] = acc_t(0);
  GSPN_UNROLL
  for (int f = 0; f < kTaps; ++f) db[f] = acc_t(0);
  const int64_t sweeps = (t.M + geo.P - 1) / geo.P;
  const int64_t L6 = 6 * P2 * G;  // one set of products: (wn, wm, wp) x (an, ad) lines
  for (int64_t grp = t.g0; grp < t.g1; ++grp) {
    const int64_t s0 = group_begin(grp, t.chunk), s1 = group_end(grp, t.chunk, t.L), len = s1 - s0;
    __syncthreads();  // the last chunk is done with the buffers
    lanes_cuda::zero_block(buf, 2 * L6, t);
    __syncthreads();
    // products of the next line at nxt + f P2 G (f: wn an, wm an, wp an, wn ad, wm ad, wp ad)
    acc_t* nxt = buf + G + t.lane;
    acc_t* cur = nxt + L6;
    for (int64_t step = len - 1; step >= 0; --step) {
      const int64_t s = line_at(step, s0, s1, t.reverse);
      const bool first = step == 0;
      const int64_t sp = first ? 0 : line_at(step - 1, s0, s1, t.reverse);  // the previous line
      for (int64_t sw = 0; sw < sweeps; ++sw) {
        const int64_t j = sw * geo.P + t.p;
        const bool active = j < t.M;
        acc_t dg[kTaps] = {acc_t(0), acc_t(0), acc_t(0)};
        if (active) {
          const int64_t q = t.pixel(geo, s, j);
          acc_t pr[kS];
          const Taps<acc_t> taps = pixel_taps<acc_t, kS>(rows, proxy, q, S, j, t.M, first, pr);
          acc_t hp[kStates][3] = {{acc_t(0), acc_t(0), acc_t(0)}, {acc_t(0), acc_t(0), acc_t(0)}};
          if (!first && t.live) {
            GSPN_UNROLL
            for (int o = 0; o < 3; ++o) {
              const int64_t jj = j + o - 1;
              if (jj >= 0 && jj < t.M) {
                const int64_t qp = t.pixel(geo, sp, jj) * C + t.c;
                hp[0][o] = HN[qp];
                hp[1][o] = HD[qp];
              }
            }
          }
          const int64_t qc = q * C + t.c;
          const acc_t xv = t.live ? static_cast<acc_t>(v[qc]) : acc_t(0);
          const acc_t lam = t.live ? sigmoid<acc_t>(static_cast<acc_t>(k[qc])) : acc_t(0);
          const acc_t hn = t.live ? HN[qc] : acc_t(0), hd = t.live ? HD[qc] : acc_t(0);
          const acc_t gn = t.live ? dnum[qc] : acc_t(0), gd = t.live ? dden[qc] : acc_t(0);
          const acc_t* a = nxt + j * G;
          const AttentionGrads<acc_t> r = attention_backward_step<acc_t>(
              gn, gd, rows.m, xv, lam, taps, hn, hd, hp[0][0], hp[0][1], hp[0][2], hp[1][0], hp[1][1], hp[1][2],
              acc_t(1), a[G], a[3 * P2 * G + G], acc_t(1), a[P2 * G], a[4 * P2 * G], acc_t(1), a[2 * P2 * G - G],
              a[5 * P2 * G - G], first);
          acc_t* o = cur + j * G;
          o[0] = taps.wn * r.an;
          o[P2 * G] = taps.wm * r.an;
          o[2 * P2 * G] = taps.wp * r.an;
          o[3 * P2 * G] = taps.wn * r.ad;
          o[4 * P2 * G] = taps.wm * r.ad;
          o[5 * P2 * G] = taps.wp * r.ad;
          if (t.live) {
            dvo[qc] = r.dv;
            dlo[qc] = r.dlam;
          }
          dm += r.dm;
          dg[0] = r.dgn;
          dg[1] = r.dgm;
          dg[2] = r.dgp;
          GSPN_UNROLL
          for (int f = 0; f < kTaps; ++f) db[f] += dg[f];
          GSPN_UNROLL
          for (int s2 = 0; s2 < kS; ++s2) {
            GSPN_UNROLL
            for (int f = 0; f < kTaps; ++f) dw[s2 * kTaps + f] += dg[f] * pr[s2];
          }
        }
        // dL/dproxy of the pixel: this lane's share, summed over the G lanes, in blocks of up to 8
        constexpr int kBlock = kS < 8 ? kS : 8;
        const int64_t q = active ? t.pixel(geo, s, j) : 0;
        GSPN_UNROLL
        for (int h = 0; h < kS / kBlock; ++h) {
          if (h * kBlock < S) {
            acc_t pv[kBlock];
            GSPN_UNROLL
            for (int s2 = 0; s2 < kBlock; ++s2) {
              const acc_t* w2 = rows.w + (h * kBlock + s2) * kTaps;
              pv[s2] = w2[0] * dg[0] + (w2[1] * dg[1] + w2[2] * dg[2]);
            }
            int first_s, count;
            lanes_cuda::lane_reduce<kBlock>(pv, t.lane, geo.G, first_s, count);
            GSPN_UNROLL
            for (int i = 0; i < kBlock; ++i) {
              const int64_t s2 = h * kBlock + first_s + i;
              if (active && i < count && s2 < S) dpo[q * S + s2] = pv[i];
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
  // the per-lane sums over the CTA's positions into this (b, run)'s partial rows
  lanes_cuda::store_lane_sums<kS, kTaps>(geo, t, dw, db, dm, red, dwb_part, dm_part);
}

}  // namespace attn_cuda
}  // namespace gspn
