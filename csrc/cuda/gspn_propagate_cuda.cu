// CUDA kernels of the fused GSPN mixer propagation (the math is in gspn_step.h, second part).
//
// One launch for all directions, one thread block per (batch x channel) plane: the block runs the
// directions one after another over its plane, walking each chunk line by line with one
// __syncthreads per line; its threads cover the positions of the current line.  The previous line
// (forward) or the next line's adjoint and taps (backward) sit in zero-padded float buffers in
// shared memory, or in a global workspace when they do not fit.  y and dx are accumulated over the
// directions in an opmath-typed (float32 for 16-bit inputs) tensor, each pixel by one thread at a
// time (directions are separated by __syncthreads), and cast at the end.  The backward recomputes a
// direction's h for the plane into a global float workspace (one plane per block, reused by every
// direction: the memory of one map, not of four h tensors) and walks it backwards.
//
// Column directions (l2r/r2l) read their lines with a stride of W (uncoalesced): simple and correct;
// a shared-memory tile transpose is the known next step for speed.  This file has been compiled in
// CI without a GPU; it is checked against the reference by the CUDA-parametrised tests when a GPU
// is present.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <climits>

#include "../gspn_step.h"
#include "gspn_cuda.h"

namespace gspn {
namespace {

constexpr int kMaxThreads = 1024;
constexpr size_t kMaxShared = 48 * 1024;
constexpr int kForwardLines = 2;   // previous and current line
constexpr int kBackwardLines = 8;  // adjoint, w_neg, w_mid, w_pos of the next and of this line

struct PropagateGeometry {
  int64_t B, C, H, W, K, chunk, P;  // P: padded line length, max(H, W) + 2
  int64_t buf_floats;               // line-buffer elements per block
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

// Direction k of the block's plane: lines, positions, chunk, and where pixel (s, j) is.
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

template <typename scalar_t>
struct PlaneGates {
  const scalar_t* g[kGateFields];
  __device__ PlaneGates(const scalar_t* gates, const PropagateGeometry& geo, int64_t b, int64_t k, int64_t c) {
    const int64_t HW = geo.H * geo.W;
    for (int f = 0; f < kGateFields; ++f) g[f] = gates + (((b * geo.K + k) * kGateFields + f) * geo.C + c) * HW;
  }
};

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMaxThreads)
    propagate_fwd_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ gates,
                         const scalar_t* __restrict__ merge, acc_t* __restrict__ y, acc_t* ws,
                         const PropagateGeometry geo) {
  extern __shared__ unsigned char smem_raw[];
  acc_t* buf = block_buffer(ws, geo.buf_floats, smem_raw);
  const int64_t n = blockIdx.x, b = n / geo.C, c = n % geo.C, HW = geo.H * geo.W;
  const scalar_t* xp = x + n * HW;
  acc_t* yp = y + n * HW;
  zero_fill(yp, HW);
  for (int64_t dir = 0; dir < geo.K; ++dir) {
    const DirectionView d(geo, dir);
    const PlaneGates<scalar_t> g(gates, geo, b, dir, c);
    const acc_t m = static_cast<acc_t>(merge[dir * geo.C + c]);
    for (int64_t grp = 0; grp < num_groups(d.L, d.k); ++grp) {
      const int64_t s0 = group_begin(grp, d.k), s1 = group_end(grp, d.k, d.L);
      __syncthreads();  // everyone is done with the buffer (and with y of the last direction)
      zero_fill(buf, kForwardLines * geo.P);
      __syncthreads();
      acc_t* prev = buf + 1;
      acc_t* cur = buf + geo.P + 1;
      for (int64_t step = 0; step < s1 - s0; ++step) {
        const int64_t s = line_at(step, s0, s1, d.reverse);
        for (int64_t j = threadIdx.x; j < d.M; j += blockDim.x) {
          const int64_t off = d.offset(s, j, geo.W);
          const acc_t xv = static_cast<acc_t>(xp[off]);
          const acc_t h = fused_h<acc_t>(xv, g.g[kGateNeg][off], g.g[kGateMid][off], g.g[kGatePos][off],
                                         g.g[kGateLam][off], prev[j - 1], prev[j], prev[j + 1], j > 0, j + 1 < d.M,
                                         step == 0);
          cur[j] = h;
          yp[off] += m * fused_y<acc_t>(h, xv, g.g[kGateU][off], g.g[kGateD][off]);
        }
        __syncthreads();
        acc_t* t = prev;
        prev = cur;
        cur = t;
      }
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMaxThreads)
    propagate_bwd_kernel(const scalar_t* __restrict__ gy, const scalar_t* __restrict__ x,
                         const scalar_t* __restrict__ gates, const scalar_t* __restrict__ merge,
                         acc_t* __restrict__ dx, scalar_t* __restrict__ dgates, acc_t* __restrict__ dm_partial,
                         acc_t* __restrict__ hws, acc_t* ws, const PropagateGeometry geo) {
  extern __shared__ unsigned char smem_raw[];
  acc_t* buf = block_buffer(ws, geo.buf_floats, smem_raw);
  const int64_t n = blockIdx.x, b = n / geo.C, c = n % geo.C, HW = geo.H * geo.W, P = geo.P;
  const scalar_t* xp = x + n * HW;
  const scalar_t* gyp = gy + n * HW;
  acc_t* dxp = dx + n * HW;
  acc_t* hp = hws + n * HW;  // this plane's recomputed h of the current direction
  zero_fill(dxp, HW);
  const acc_t zero(0);
  for (int64_t dir = 0; dir < geo.K; ++dir) {
    const DirectionView d(geo, dir);
    const PlaneGates<scalar_t> g(gates, geo, b, dir, c);
    scalar_t* dg[kGateFields];
    for (int f = 0; f < kGateFields; ++f) {
      dg[f] = dgates + (((b * geo.K + dir) * kGateFields + f) * geo.C + c) * HW;
    }
    const acc_t m = static_cast<acc_t>(merge[dir * geo.C + c]);
    acc_t dm = 0;
    for (int64_t grp = 0; grp < num_groups(d.L, d.k); ++grp) {
      const int64_t s0 = group_begin(grp, d.k), s1 = group_end(grp, d.k, d.L), len = s1 - s0;
      // h of the previous line in scan order at position j (0 outside the line or the group)
      auto h_prev = [&](int64_t step, int64_t j) -> acc_t {
        if (step == 0 || j < 0 || j >= d.M) return zero;
        return hp[d.offset(line_at(step - 1, s0, s1, d.reverse), j, geo.W)];
      };
      __syncthreads();  // the last direction's reads of hws and of the buffer are done
      for (int64_t step = 0; step < len; ++step) {
        const int64_t s = line_at(step, s0, s1, d.reverse);
        for (int64_t j = threadIdx.x; j < d.M; j += blockDim.x) {
          const int64_t off = d.offset(s, j, geo.W);
          hp[off] = fused_h<acc_t>(static_cast<acc_t>(xp[off]), g.g[kGateNeg][off], g.g[kGateMid][off],
                                   g.g[kGatePos][off], g.g[kGateLam][off], h_prev(step, j - 1), h_prev(step, j),
                                   h_prev(step, j + 1), j > 0, j + 1 < d.M, step == 0);
        }
        __syncthreads();
      }
      zero_fill(buf, kBackwardLines * P);
      __syncthreads();
      acc_t* nxt = buf + 1;          // a, w_neg, w_mid, w_pos of the next line at nxt + {0, 1, 2, 3} P
      acc_t* cur = buf + 4 * P + 1;  // the same for this line
      for (int64_t step = len - 1; step >= 0; --step) {
        const int64_t s = line_at(step, s0, s1, d.reverse);
        for (int64_t j = threadIdx.x; j < d.M; j += blockDim.x) {
          const int64_t off = d.offset(s, j, geo.W);
          const FusedGrads<acc_t> r = fused_backward<acc_t>(
              static_cast<acc_t>(gyp[off]), m, static_cast<acc_t>(xp[off]), g.g[kGateNeg][off], g.g[kGateMid][off],
              g.g[kGatePos][off], g.g[kGateLam][off], g.g[kGateU][off], g.g[kGateD][off], hp[off],
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
        acc_t* t = nxt;
        nxt = cur;
        cur = t;
      }
    }
    atomicAdd(dm_partial + n * geo.K + dir, dm);
  }
}

// Geometry, threads and line-buffer placement of a launch over the planes of `a`, for `lines`
// padded line buffers per block; calls `launch(blocks, threads, shared_bytes, stream, geo, ws)`.
template <typename acc_t, typename Launch>
void plan_propagate(const PropagateArgs& a, int lines, Launch&& launch) {
  PropagateGeometry geo{};
  geo.B = a.B;
  geo.C = a.C;
  geo.H = a.H;
  geo.W = a.W;
  geo.K = a.K;
  geo.chunk = a.chunk;
  geo.P = std::max(a.H, a.W) + 2;
  geo.buf_floats = lines * geo.P;
  for (int64_t k = 0; k < a.K; ++k) {
    geo.transpose[k] = a.dirs[k].transpose;
    geo.reverse[k] = a.dirs[k].reverse;
  }
  const int64_t planes = a.B * a.C;
  TORCH_CHECK(planes <= INT_MAX, "gspn propagate: too many (batch x channel) planes for one launch");
  const int64_t side = std::max(a.H, a.W);
  const int threads = static_cast<int>(std::min<int64_t>(kMaxThreads, (side + 31) / 32 * 32));
  const bool global = static_cast<size_t>(geo.buf_floats) * sizeof(acc_t) > kMaxShared;
  at::Tensor ws;
  if (global) {
    ws = at::empty({planes * geo.buf_floats}, a.x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  }
  const size_t smem = global ? 0 : static_cast<size_t>(geo.buf_floats) * sizeof(acc_t);
  launch(static_cast<unsigned int>(planes), threads, smem, at::cuda::getCurrentCUDAStream(), geo,
         global ? ws.mutable_data_ptr<acc_t>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void launch_propagate_fwd_cuda(const PropagateArgs& a, at::Tensor& y_acc) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "gspn_propagate_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    plan_propagate<acc_t>(a, kForwardLines, [&](unsigned int blocks, int threads, size_t smem, cudaStream_t stream,
                                                const PropagateGeometry& geo, acc_t* ws) {
      propagate_fwd_kernel<scalar_t, acc_t><<<blocks, threads, smem, stream>>>(
          a.x.const_data_ptr<scalar_t>(), a.gates.const_data_ptr<scalar_t>(), a.merge.const_data_ptr<scalar_t>(),
          y_acc.mutable_data_ptr<acc_t>(), ws, geo);
    });
  });
}

void launch_propagate_bwd_cuda(const PropagateArgs& a, const at::Tensor& grad_y, at::Tensor& dx_acc,
                               at::Tensor& dgates, at::Tensor& dm_partial, at::Tensor& h_ws) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "gspn_propagate_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    plan_propagate<acc_t>(a, kBackwardLines, [&](unsigned int blocks, int threads, size_t smem, cudaStream_t stream,
                                                 const PropagateGeometry& geo, acc_t* ws) {
      propagate_bwd_kernel<scalar_t, acc_t><<<blocks, threads, smem, stream>>>(
          grad_y.const_data_ptr<scalar_t>(), a.x.const_data_ptr<scalar_t>(), a.gates.const_data_ptr<scalar_t>(),
          a.merge.const_data_ptr<scalar_t>(), dx_acc.mutable_data_ptr<acc_t>(), dgates.mutable_data_ptr<scalar_t>(),
          dm_partial.mutable_data_ptr<acc_t>(), h_ws.mutable_data_ptr<acc_t>(), ws, geo);
    });
  });
}

}  // namespace gspn
