// CUDA kernels of the GSPN scan, forward and backward, and their launch plan (the launchers are in
// gspn_cuda.cu; see gspn_kernel_common.h for what may go in this header).
//
// One launch per scan.  A thread block owns `lines` consecutive (batch x channel) lines of one chunk
// and walks that chunk along the scan axis; at each step its threads cover the `lines x M` pixels
// of the current line (consecutive threads on consecutive, contiguous pixels), reading the previous
// line from a zero-padded float32 buffer in shared memory (or, for very long lines, in a global
// workspace) and writing the current one into the other half: one __syncthreads per step.
// Accumulation is in acc_t (at::opmath_type: float32 for 16-bit inputs); indexing into the tensors
// is 64-bit.  The backward is the reverse walk of the adjoint; it reads the incoming gradient and the
// saved output, and writes only its own five outputs.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "gspn_kernel_common.h"

namespace gspn {
namespace scan_cuda {

constexpr int kThreads = 256;
constexpr int kMaxThreads = 1024;
constexpr size_t kMaxSharedBytes = 48 * 1024;

struct LaunchPlan {
  int lines;           // lines of the (batch x channel) axis per block
  int threads;         // threads per block
  int64_t blocks;      // line blocks x groups
  int64_t groups;      // chunks along the scan axis
  int64_t buf_floats;  // accumulator elements per block: two padded halves
  bool global_ws;      // buffer in a global workspace instead of shared memory
  size_t shared_bytes;  // dynamic shared memory of the launch (0 with a global workspace)
  int64_t ws_elems;     // acc_t elements of the global workspace (0 without one)
};

// The launch over N lines (the batch x channel planes) of a scan of L lines of length M, in chunks
// of k.  The launcher checks that `blocks` fits a 1-D grid.
template <typename acc_t>
inline LaunchPlan plan_launch(int64_t N, int64_t L, int64_t M, int64_t k) {
  LaunchPlan p;
  p.lines = M >= kThreads ? 1 : static_cast<int>(kThreads / M);
  if (p.lines > N) p.lines = static_cast<int>(N);
  const int64_t work = static_cast<int64_t>(p.lines) * M;
  const int64_t warps = (std::min<int64_t>(work, kMaxThreads) + 31) / 32;
  p.threads = static_cast<int>(warps * 32);
  p.groups = num_groups(L, k);
  p.blocks = ((N + p.lines - 1) / p.lines) * p.groups;
  p.buf_floats = 2 * static_cast<int64_t>(p.lines) * (M + 2);
  p.global_ws = static_cast<size_t>(p.buf_floats) * sizeof(acc_t) > kMaxSharedBytes;
  p.shared_bytes = p.global_ws ? 0 : static_cast<size_t>(p.buf_floats) * sizeof(acc_t);
  p.ws_elems = p.global_ws ? p.blocks * p.buf_floats : 0;
  return p;
}

// What both kernels are told about the scan and the launch.
template <typename acc_t>
struct Geometry {
  int64_t N, L, M, k, groups, buf_floats;
  int lines;
  bool reverse;
  acc_t* ws;  // global workspace for the line buffers, or nullptr for shared memory
};

// The kernels' view of the plan `p` for the scan (N, L, M, k, reverse); `ws` holds `p.ws_elems`.
template <typename acc_t>
inline Geometry<acc_t> make_geometry(const LaunchPlan& p, int64_t N, int64_t L, int64_t M, int64_t k, bool reverse,
                                     acc_t* ws) {
  return {N, L, M, k, p.groups, p.buf_floats, p.lines, reverse, p.global_ws ? ws : nullptr};
}

// This block's share: lines [n0, n0 + lines) of the chunk [s0, s1), and its zeroed line buffer
// (two halves of `lines` padded lines of M + 2).
template <typename acc_t>
struct BlockShare {
  acc_t* buf;
  int64_t n0, s0, s1, P;
  int work;
};

template <typename acc_t>
__device__ BlockShare<acc_t> block_share(const Geometry<acc_t>& geo, acc_t* smem) {
  BlockShare<acc_t> b;
  b.buf = geo.ws == nullptr ? smem : geo.ws + static_cast<int64_t>(blockIdx.x) * geo.buf_floats;
  const int64_t g = blockIdx.x % geo.groups;
  b.n0 = (blockIdx.x / geo.groups) * geo.lines;
  b.s0 = group_begin(g, geo.k);
  b.s1 = group_end(g, geo.k, geo.L);
  b.P = geo.M + 2;
  b.work = geo.lines * static_cast<int>(geo.M);
  for (int64_t i = threadIdx.x; i < geo.buf_floats; i += blockDim.x) b.buf[i] = acc_t(0);
  __syncthreads();
  return b;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMaxThreads)
    gspn_scan_fwd_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ lam,
                         const scalar_t* __restrict__ wn, const scalar_t* __restrict__ wm,
                         const scalar_t* __restrict__ wp, scalar_t* __restrict__ h, const Geometry<acc_t> geo) {
  GSPN_DYNAMIC_SHARED(smem_raw);
  const BlockShare<acc_t> b = block_share(geo, reinterpret_cast<acc_t*>(smem_raw));
  const int64_t M = geo.M, L = geo.L, P = b.P;
  acc_t* prev = b.buf + 1;
  acc_t* cur = b.buf + geo.lines * P + 1;
  for (int64_t step = 0; step < b.s1 - b.s0; ++step) {
    const int64_t s = line_at(step, b.s0, b.s1, geo.reverse);
    for (int i = threadIdx.x; i < b.work; i += blockDim.x) {
      const int l = i / static_cast<int>(M);
      const int j = i - l * static_cast<int>(M);
      const int64_t n = b.n0 + l;
      if (n >= geo.N) continue;
      const int64_t off = (n * L + s) * M + j;
      const acc_t* p = prev + l * P;
      acc_t v;
      if (step == 0) {
        v = forward_first<acc_t>(x[off], lam[off]);
      } else {
        v = forward_step<acc_t>(x[off], lam[off], wn[off], wm[off], wp[off], p[j - 1], p[j], p[j + 1]);
      }
      cur[l * P + j] = v;
      h[off] = static_cast<scalar_t>(v);
    }
    __syncthreads();
    acc_t* t = prev;
    prev = cur;
    cur = t;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMaxThreads)
    gspn_scan_bwd_kernel(const scalar_t* __restrict__ gh, const scalar_t* __restrict__ x,
                         const scalar_t* __restrict__ lam, const scalar_t* __restrict__ wn,
                         const scalar_t* __restrict__ wm, const scalar_t* __restrict__ wp,
                         const scalar_t* __restrict__ h, scalar_t* __restrict__ dx, scalar_t* __restrict__ dlam,
                         scalar_t* __restrict__ dwn, scalar_t* __restrict__ dwm, scalar_t* __restrict__ dwp,
                         const Geometry<acc_t> geo) {
  GSPN_DYNAMIC_SHARED(smem_raw);
  const BlockShare<acc_t> b = block_share(geo, reinterpret_cast<acc_t*>(smem_raw));
  const int64_t M = geo.M, L = geo.L, P = b.P, len = b.s1 - b.s0;
  // `nxt` holds the adjoint of the next line in scan order, `cur` receives this line's.
  acc_t* nxt = b.buf + 1;
  acc_t* cur = b.buf + geo.lines * P + 1;
  const acc_t zero(0);
  for (int64_t t = 0; t < len; ++t) {
    const int64_t step = len - 1 - t;  // position of this line in scan order
    const int64_t s = line_at(step, b.s0, b.s1, geo.reverse);
    const int64_t sn = t > 0 ? line_at(step + 1, b.s0, b.s1, geo.reverse) : 0;
    const int64_t sp = step > 0 ? line_at(step - 1, b.s0, b.s1, geo.reverse) : 0;
    for (int i = threadIdx.x; i < b.work; i += blockDim.x) {
      const int l = i / static_cast<int>(M);
      const int j = i - l * static_cast<int>(M);
      const int64_t n = b.n0 + l;
      if (n >= geo.N) continue;
      const int64_t row = n * L;
      const int64_t off = (row + s) * M + j;
      const bool has_left = j > 0, has_right = j + 1 < M;
      acc_t a = gh[off];
      if (t > 0) {
        const int64_t on = (row + sn) * M + j;
        const acc_t* an = nxt + l * P;
        a = adjoint_step<acc_t>(a, has_right ? acc_t(wn[on + 1]) : zero, an[j + 1], wm[on], an[j],
                                has_left ? acc_t(wp[on - 1]) : zero, an[j - 1]);
      }
      cur[l * P + j] = a;
      acc_t hn = zero, hm = zero, hp = zero;
      if (step > 0) {
        const int64_t op = (row + sp) * M + j;
        hm = h[op];
        if (has_left) hn = h[op - 1];
        if (has_right) hp = h[op + 1];
      }
      const StepGrads<acc_t> d = step_grads<acc_t>(a, x[off], lam[off], hn, hm, hp);
      dx[off] = static_cast<scalar_t>(d.dx);
      dlam[off] = static_cast<scalar_t>(d.dlam);
      dwn[off] = static_cast<scalar_t>(d.dwn);
      dwm[off] = static_cast<scalar_t>(d.dwm);
      dwp[off] = static_cast<scalar_t>(d.dwp);
    }
    __syncthreads();
    acc_t* tmp = nxt;
    nxt = cur;
    cur = tmp;
  }
}

}  // namespace scan_cuda
}  // namespace gspn
