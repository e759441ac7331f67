// CUDA kernels of the GSPN scan, forward and backward.
//
// One launch per scan, on the image layout for every direction: pixel (line s, position j) of plane
// n is at n L M + s ss + j sj, with (ss, sj) = (M, 1) for row scans and (1, L) for column scans (the
// plane is (H, W) = (M, L), so line s is column s).  No transposed copies are made.
//
// A thread block owns `lines` consecutive (batch x channel) lines of one chunk and walks that chunk
// along the scan axis, reading the previous line from a zero-padded opmath buffer in shared memory
// (or, for very long lines, in a global workspace) and writing the current one into the other half:
// one __syncthreads per step.  Accumulation is in at::opmath_type (float32 for 16-bit inputs);
// indexing into the tensors is 64-bit.
//
// Two paths:
//   * tiled (lines x M <= 1024, i.e. M <= 1024): each thread owns one position j of one line.  The
//     steps are taken in tiles of T: the thread first issues the loads of all T steps' inputs into
//     register arrays, then runs the T steps from registers, and stores the T outputs at the tile's
//     end.  T loads are in flight per thread and input instead of one, which hides the global-memory
//     latency that bound the old per-step loop.  For column scans a thread's T values are contiguous
//     (T = 8 float32: one 32-byte sector); for row scans each load is coalesced across the warp.
//     The backward loads only its own position (grad, x, lam, the three gates and the previous
//     line's h) and shares through shared memory what the neighbours need: this line's adjoint and
//     gates (read by the line before it at j-1, j, j+1) and the previous line's h (read by this line
//     at j-1 and j+1); the gradients are computed after the step's __syncthreads.
//   * simple (longer lines): the threads stride over the line's pixels, one global load per input
//     and step (the first version's loop, with the strides above).
//
// The backward is the reverse walk of the adjoint; it reads the incoming gradient and the saved
// output, and writes only its own five outputs.
//
// Status: this version (in-place column scans, tiles in registers) has been compiled (sm_90, ptxas:
// no spills in the tiled kernels) but not yet run on a GPU; the previous version, with transposed
// copies for column scans and only the simple path, was the one measured.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <climits>
#include <utility>

#include "../gspn_step.h"
#include "gspn_cuda.h"

namespace gspn {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxThreads = 1024;
constexpr size_t kDefaultSharedBytes = 48 * 1024;

// Steps per register tile: 32 bytes of each input per thread for 4-byte types (one sector of a
// column), fewer where 5 (forward) or 6 + 1 (backward) arrays of T values would not fit the 64
// registers a thread has at 1024 threads per block.
template <typename scalar_t>
constexpr int kFwdTile = sizeof(scalar_t) >= 8 ? 2 : 8;
template <typename scalar_t>
constexpr int kBwdTile = sizeof(scalar_t) >= 8 ? 1 : 4;

// Padded line buffers per half: the forward keeps h; the tiled backward keeps the adjoint and the
// three gates of a line and the h of the line before it; the simple backward only the adjoint.
constexpr int kFwdFields = 1;
constexpr int kBwdTiledFields = 5;
constexpr int kBwdSimpleFields = 1;

// What the kernels are told about the scan and the launch.
template <typename acc_t>
struct Geometry {
  int64_t N, L, M, k, groups, buf_floats;
  int64_t ss, sj;  // strides of the line and of the position within a plane of L * M elements
  int lines;
  bool reverse;
  acc_t* ws;  // global workspace for the line buffers, or nullptr for shared memory
};

// This block's share: lines [n0, n0 + lines) of the chunk [s0, s1), and its zeroed line buffer.
template <typename acc_t>
struct BlockShare {
  acc_t* buf;
  int64_t n0, s0, s1, P;
  int work;
};

// kSharedOnly: the buffer is known to be in shared memory (the tiled kernels; plan_launch never
// gives them a workspace), so that the compiler uses shared-memory addressing for it.
template <bool kSharedOnly, typename acc_t>
__device__ BlockShare<acc_t> block_share(const Geometry<acc_t>& geo, acc_t* smem) {
  BlockShare<acc_t> b;
  b.buf = kSharedOnly || geo.ws == nullptr ? smem : geo.ws + static_cast<int64_t>(blockIdx.x) * geo.buf_floats;
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

// Padded buffer `field` of line l in half `half` (of `fields` buffers per half): index j in [-1, M].
template <typename acc_t>
__device__ acc_t* line_buffer(const BlockShare<acc_t>& b, int lines, int fields, int half, int field, int l) {
  return b.buf + (static_cast<int64_t>(half * fields + field) * lines + l) * b.P + 1;
}

// One thread's pixel in the tiled kernels: position j of line n0 + l, and the offset of its pixel
// at scan step `step` of the block's chunk, origin + step * dstep.
struct ThreadPixel {
  int l, j;
  bool active;  // a pixel of the tensor (threads past the work or past the last line only synchronise)
  int64_t origin, dstep;
};

template <typename acc_t>
__device__ ThreadPixel thread_pixel(const Geometry<acc_t>& geo, const BlockShare<acc_t>& b) {
  ThreadPixel t;
  const int i = threadIdx.x;
  const int M = static_cast<int>(geo.M);
  t.l = i < b.work ? i / M : 0;
  t.j = i < b.work ? i - t.l * M : 0;
  const int64_t n = b.n0 + t.l;
  t.active = i < b.work && n < geo.N;
  const int64_t first = geo.reverse ? b.s1 - 1 : b.s0;
  t.origin = n * geo.L * geo.M + first * geo.ss + t.j * geo.sj;
  t.dstep = geo.reverse ? -geo.ss : geo.ss;
  return t;
}

// ---------------------------------------------------------------------------------------------------
// Tiled kernels (lines x M <= blockDim.x)
// ---------------------------------------------------------------------------------------------------

template <int T, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMaxThreads)
    gspn_scan_fwd_tiled(const scalar_t* __restrict__ x, const scalar_t* __restrict__ lam,
                        const scalar_t* __restrict__ wn, const scalar_t* __restrict__ wm,
                        const scalar_t* __restrict__ wp, scalar_t* __restrict__ h, const Geometry<acc_t> geo) {
  extern __shared__ unsigned char smem_raw[];
  const BlockShare<acc_t> b = block_share<true>(geo, reinterpret_cast<acc_t*>(smem_raw));
  const ThreadPixel px = thread_pixel(geo, b);
  const int64_t len = b.s1 - b.s0;
  const int j = px.j;
  acc_t* prev = line_buffer(b, geo.lines, kFwdFields, 0, 0, px.l);
  acc_t* cur = line_buffer(b, geo.lines, kFwdFields, 1, 0, px.l);
  for (int64_t t0 = 0; t0 < len; t0 += T) {
    const int64_t base = px.origin + t0 * px.dstep;  // the pixel at step t0; step t0 + u at base + u dstep
    // The tile's inputs, all loads issued before the first step uses them.
    acc_t xs[T], ls[T], ns[T], ms[T], ps[T];
#pragma unroll
    for (int u = 0; u < T; ++u) {
      const int64_t step = t0 + u, off = base + u * px.dstep;
      xs[u] = ls[u] = ns[u] = ms[u] = ps[u] = acc_t(0);
      if (px.active && step < len) {
        xs[u] = x[off];
        ls[u] = lam[off];
        if (step > 0) {
          ns[u] = wn[off];
          ms[u] = wm[off];
          ps[u] = wp[off];
        }
      }
    }
#pragma unroll
    for (int u = 0; u < T; ++u) {
      const int64_t step = t0 + u;
      if (step >= len) break;  // the same for the whole block
      const acc_t v = step == 0
                          ? forward_first<acc_t>(xs[u], ls[u])
                          : forward_step<acc_t>(xs[u], ls[u], ns[u], ms[u], ps[u], prev[j - 1], prev[j], prev[j + 1]);
      if (px.active) {
        cur[j] = v;
        h[base + u * px.dstep] = static_cast<scalar_t>(v);
      }
      __syncthreads();
      acc_t* tmp = prev;
      prev = cur;
      cur = tmp;
    }
  }
}

template <int T, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMaxThreads)
    gspn_scan_bwd_tiled(const scalar_t* __restrict__ gh, const scalar_t* __restrict__ x,
                        const scalar_t* __restrict__ lam, const scalar_t* __restrict__ wn,
                        const scalar_t* __restrict__ wm, const scalar_t* __restrict__ wp,
                        const scalar_t* __restrict__ h, scalar_t* __restrict__ dx, scalar_t* __restrict__ dlam,
                        scalar_t* __restrict__ dwn, scalar_t* __restrict__ dwm, scalar_t* __restrict__ dwp,
                        const Geometry<acc_t> geo) {
  extern __shared__ unsigned char smem_raw[];
  const BlockShare<acc_t> b = block_share<true>(geo, reinterpret_cast<acc_t*>(smem_raw));
  const ThreadPixel px = thread_pixel(geo, b);
  const int64_t len = b.s1 - b.s0;
  const int j = px.j;
  // Per half: the adjoint and the three gates of a line, and the output of the line before it.
  enum : int { kA = 0, kN = 1, kM = 2, kP = 3, kH = 4 };
  auto buffer = [&](int half, int field) { return line_buffer(b, geo.lines, kBwdTiledFields, half, field, px.l); };
  int half = 0;  // the half this step writes; the other holds the next line in scan order
  // Tiles of steps t = t0 .. t0 + T - 1 against scan order: scan step len - 1 - t.
  for (int64_t t0 = 0; t0 < len; t0 += T) {
    const int64_t base = px.origin + (len - 1 - t0) * px.dstep;  // scan step len - 1 - t0 - u at base - u dstep
    acc_t gs[T], xs[T], ls[T], ns[T], ms[T], ps[T], hs[T];
#pragma unroll
    for (int u = 0; u < T; ++u) {
      const int64_t step = len - 1 - (t0 + u), off = base - u * px.dstep;
      gs[u] = xs[u] = ls[u] = ns[u] = ms[u] = ps[u] = hs[u] = acc_t(0);
      if (px.active && step >= 0) {
        gs[u] = gh[off];
        xs[u] = x[off];
        ls[u] = lam[off];
        if (step > 0) {  // the first line of a group has no recurrence: its gates and h_p are unused
          ns[u] = wn[off];
          ms[u] = wm[off];
          ps[u] = wp[off];
          hs[u] = h[off - px.dstep];
        }
      }
    }
#pragma unroll
    for (int u = 0; u < T; ++u) {
      const int64_t t = t0 + u;
      if (t >= len) break;  // the same for the whole block
      const acc_t* an = buffer(1 - half, kA);
      acc_t a = gs[u];
      if (t > 0) {
        a = adjoint_step<acc_t>(a, buffer(1 - half, kN)[j + 1], an[j + 1], buffer(1 - half, kM)[j], an[j],
                                buffer(1 - half, kP)[j - 1], an[j - 1]);
      }
      acc_t* hb = buffer(half, kH);
      if (px.active) {
        buffer(half, kA)[j] = a;
        buffer(half, kN)[j] = ns[u];
        buffer(half, kM)[j] = ms[u];
        buffer(half, kP)[j] = ps[u];
        hb[j] = hs[u];
      }
      __syncthreads();
      if (px.active) {
        const StepGrads<acc_t> d = step_grads<acc_t>(a, xs[u], ls[u], hb[j - 1], hs[u], hb[j + 1]);
        const int64_t off = base - u * px.dstep;
        dx[off] = static_cast<scalar_t>(d.dx);
        dlam[off] = static_cast<scalar_t>(d.dlam);
        dwn[off] = static_cast<scalar_t>(d.dwn);
        dwm[off] = static_cast<scalar_t>(d.dwm);
        dwp[off] = static_cast<scalar_t>(d.dwp);
      }
      half = 1 - half;
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Simple kernels (longer lines): threads stride over the block's pixels at every step.
// ---------------------------------------------------------------------------------------------------

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMaxThreads)
    gspn_scan_fwd_simple(const scalar_t* __restrict__ x, const scalar_t* __restrict__ lam,
                         const scalar_t* __restrict__ wn, const scalar_t* __restrict__ wm,
                         const scalar_t* __restrict__ wp, scalar_t* __restrict__ h, const Geometry<acc_t> geo) {
  extern __shared__ unsigned char smem_raw[];
  const BlockShare<acc_t> b = block_share<false>(geo, reinterpret_cast<acc_t*>(smem_raw));
  const int64_t M = geo.M, P = b.P;
  acc_t* prev = line_buffer(b, geo.lines, kFwdFields, 0, 0, 0);
  acc_t* cur = line_buffer(b, geo.lines, kFwdFields, 1, 0, 0);
  for (int64_t step = 0; step < b.s1 - b.s0; ++step) {
    const int64_t s = line_at(step, b.s0, b.s1, geo.reverse);
    for (int i = threadIdx.x; i < b.work; i += blockDim.x) {
      const int l = i / static_cast<int>(M);
      const int j = i - l * static_cast<int>(M);
      const int64_t n = b.n0 + l;
      if (n >= geo.N) continue;
      const int64_t off = n * geo.L * M + s * geo.ss + j * geo.sj;
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
    gspn_scan_bwd_simple(const scalar_t* __restrict__ gh, const scalar_t* __restrict__ x,
                         const scalar_t* __restrict__ lam, const scalar_t* __restrict__ wn,
                         const scalar_t* __restrict__ wm, const scalar_t* __restrict__ wp,
                         const scalar_t* __restrict__ h, scalar_t* __restrict__ dx, scalar_t* __restrict__ dlam,
                         scalar_t* __restrict__ dwn, scalar_t* __restrict__ dwm, scalar_t* __restrict__ dwp,
                         const Geometry<acc_t> geo) {
  extern __shared__ unsigned char smem_raw[];
  const BlockShare<acc_t> b = block_share<false>(geo, reinterpret_cast<acc_t*>(smem_raw));
  const int64_t M = geo.M, P = b.P, len = b.s1 - b.s0, sj = geo.sj;
  // `nxt` holds the adjoint of the next line in scan order, `cur` receives this line's.
  acc_t* nxt = line_buffer(b, geo.lines, kBwdSimpleFields, 0, 0, 0);
  acc_t* cur = line_buffer(b, geo.lines, kBwdSimpleFields, 1, 0, 0);
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
      const int64_t pix = n * geo.L * M + j * sj;  // position j of line 0 of plane n
      const int64_t off = pix + s * geo.ss;
      const bool has_left = j > 0, has_right = j + 1 < M;
      acc_t a = gh[off];
      if (t > 0) {
        const int64_t on = pix + sn * geo.ss;
        const acc_t* an = nxt + l * P;
        a = adjoint_step<acc_t>(a, has_right ? acc_t(wn[on + sj]) : zero, an[j + 1], wm[on], an[j],
                                has_left ? acc_t(wp[on - sj]) : zero, an[j - 1]);
      }
      cur[l * P + j] = a;
      acc_t hn = zero, hm = zero, hp = zero;
      if (step > 0) {
        const int64_t op = pix + sp * geo.ss;
        hm = h[op];
        if (has_left) hn = h[op - sj];
        if (has_right) hp = h[op + sj];
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

// ---------------------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------------------

struct LaunchPlan {
  int lines;           // lines of the (batch x channel) axis per block
  int threads;         // threads per block
  int64_t blocks;      // line blocks x groups
  int64_t groups;      // chunks along the scan axis
  int64_t buf_floats;  // accumulator elements per block: two halves of `fields` padded buffers
  bool tiled;          // one thread per pixel of the block's lines: the tiled kernels
  bool global_ws;      // buffer in a global workspace instead of shared memory
};

template <typename acc_t>
LaunchPlan plan_launch(const ScanArgs& a, int tiled_fields, int simple_fields) {
  LaunchPlan p;
  const int64_t M = a.M;
  p.lines = M >= kThreads ? 1 : static_cast<int>(kThreads / M);
  if (p.lines > a.N) p.lines = static_cast<int>(a.N);
  const int64_t work = static_cast<int64_t>(p.lines) * M;
  const int64_t warps = (std::min<int64_t>(work, kMaxThreads) + 31) / 32;
  p.threads = static_cast<int>(warps * 32);
  p.groups = num_groups(a.L, a.k);
  p.blocks = ((a.N + p.lines - 1) / p.lines) * p.groups;
  TORCH_CHECK(p.blocks <= INT_MAX, "gspn scan: too many (batch x channel x chunk) blocks for one launch");
  const size_t max_shared =
      std::max<size_t>(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin, kDefaultSharedBytes);
  auto buffer_floats = [&](int fields) { return 2 * fields * static_cast<int64_t>(p.lines) * (M + 2); };
  // The tiled kernels keep their buffers in shared memory; where those would not fit (float64 on a
  // GPU with little shared memory) the simple kernels run instead.
  p.tiled = work <= kMaxThreads &&
            static_cast<size_t>(buffer_floats(tiled_fields)) * sizeof(acc_t) <= max_shared;
  p.buf_floats = buffer_floats(p.tiled ? tiled_fields : simple_fields);
  p.global_ws = static_cast<size_t>(p.buf_floats) * sizeof(acc_t) > max_shared;
  return p;
}

// Launches `kernel`, first raising its dynamic shared-memory limit where the buffers need more than
// the default 48 KiB (plan_launch keeps them within the device's opt-in limit).
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), unsigned int grid, int threads, size_t smem, cudaStream_t stream,
                   Args&&... args) {
  if (smem > kDefaultSharedBytes) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  kernel<<<grid, threads, smem, stream>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Plans the launch for `a` (with `tiled_fields` / `simple_fields` padded line buffers per half) and
// calls `launch(scalar zero, plan, shared_bytes, stream, geometry)` for the dtype of the tensors, with
// a global workspace when the line buffers do not fit in shared memory.
template <typename Launch>
void launch_scan(const ScanArgs& a, int tiled_fields, int simple_fields, Launch&& launch) {
  TORCH_CHECK(a.M <= (int64_t{1} << 30), "gspn scan: line length too large for the CUDA kernel");
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "gspn_scan_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const LaunchPlan p = plan_launch<acc_t>(a, tiled_fields, simple_fields);
    at::Tensor ws;
    if (p.global_ws) {
      ws = at::empty({p.blocks * p.buf_floats}, a.x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    }
    // Strides of (line, position) within a plane: rows are contiguous lines, columns strided ones.
    const int64_t ss = a.columns ? 1 : a.M, sj = a.columns ? a.L : 1;
    const Geometry<acc_t> geo{a.N, a.L, a.M, a.k, p.groups, p.buf_floats, ss, sj, p.lines, a.reverse,
                              p.global_ws ? ws.mutable_data_ptr<acc_t>() : nullptr};
    const size_t smem = p.global_ws ? 0 : static_cast<size_t>(p.buf_floats) * sizeof(acc_t);
    launch(scalar_t(0), p, smem, stream, geo);
  });
}

}  // namespace

void launch_scan_fwd_cuda(const ScanArgs& a, at::Tensor& h) {
  launch_scan(a, kFwdFields, kFwdFields, [&](auto zero, const LaunchPlan& p, size_t smem, cudaStream_t stream,
                                             const auto& geo) {
    using scalar_t = decltype(zero);
    using acc_t = at::opmath_type<scalar_t>;
    auto kernel = p.tiled ? gspn_scan_fwd_tiled<kFwdTile<scalar_t>, scalar_t, acc_t>
                          : gspn_scan_fwd_simple<scalar_t, acc_t>;
    launch_kernel(kernel, static_cast<unsigned int>(p.blocks), p.threads, smem, stream,
                  a.x.const_data_ptr<scalar_t>(), a.lam.const_data_ptr<scalar_t>(), a.wn.const_data_ptr<scalar_t>(),
                  a.wm.const_data_ptr<scalar_t>(), a.wp.const_data_ptr<scalar_t>(), h.mutable_data_ptr<scalar_t>(),
                  geo);
  });
}

void launch_scan_bwd_cuda(const ScanArgs& a, const at::Tensor& grad_h, const at::Tensor& h, at::Tensor& dx,
                          at::Tensor& dlam, at::Tensor& dwn, at::Tensor& dwm, at::Tensor& dwp) {
  launch_scan(a, kBwdTiledFields, kBwdSimpleFields, [&](auto zero, const LaunchPlan& p, size_t smem,
                                                        cudaStream_t stream, const auto& geo) {
    using scalar_t = decltype(zero);
    using acc_t = at::opmath_type<scalar_t>;
    auto kernel = p.tiled ? gspn_scan_bwd_tiled<kBwdTile<scalar_t>, scalar_t, acc_t>
                          : gspn_scan_bwd_simple<scalar_t, acc_t>;
    launch_kernel(kernel, static_cast<unsigned int>(p.blocks), p.threads, smem, stream,
                  grad_h.const_data_ptr<scalar_t>(), a.x.const_data_ptr<scalar_t>(), a.lam.const_data_ptr<scalar_t>(),
                  a.wn.const_data_ptr<scalar_t>(), a.wm.const_data_ptr<scalar_t>(), a.wp.const_data_ptr<scalar_t>(),
                  h.const_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>(), dlam.mutable_data_ptr<scalar_t>(),
                  dwn.mutable_data_ptr<scalar_t>(), dwm.mutable_data_ptr<scalar_t>(),
                  dwp.mutable_data_ptr<scalar_t>(), geo);
  });
}

}  // namespace gspn
