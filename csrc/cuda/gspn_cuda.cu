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
//     steps are taken in tiles of T (kFwdTile / kBwdTile): the thread first issues the loads of all
//     T steps' inputs into register arrays, then runs the T steps from registers (still one
//     __syncthreads per step for the line buffer).  T loads per input are in flight per thread
//     instead of one, which is meant to hide the global-memory latency that bound the old per-step
//     loop.  Row scans load directly (each load coalesced across the warp) and store each step's
//     output at once.  Column scans read a thread's T values from contiguous memory, but 32 threads
//     reading their own would touch 32 cache lines per instruction; instead the warp reads them
//     cooperatively (T lanes per pixel, one 32-byte sector for T = 8 float32) and moves them to
//     their owners through a small per-warp stage in shared memory; outputs go the reverse way at
//     the tile's end (see for_slots / slots_to_owners).
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
// Status: this version (in-place column scans, register tiles, cooperative column loads) has been
// compiled for sm_90 (ptxas -v: no spills, at most 64 registers, in any kernel) and checked against
// the reference in a host emulation of the kernels (a std::thread per CUDA thread, barriers for
// __syncthreads / __syncwarp; float32 and float64), but NOT yet run on a GPU: its speed is
// unmeasured.  The numbers measured so far are those of the previous version (transposed copies
// for column scans, only the simple path).
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

// Steps per register tile: 8 for the forward of 2- and 4-byte types (32 bytes of a float32 column:
// one sector), fewer where the 5 (forward) or 7 (backward) arrays of T values would not fit the 64
// registers a thread has at 1024 threads per block without spilling (ptxas -v, sm_90).  T divides 32
// (the column slots of for_slots).
template <typename scalar_t>
constexpr int kFwdTile = sizeof(scalar_t) >= 8 ? 2 : 8;
template <typename scalar_t>
constexpr int kBwdTile = sizeof(scalar_t) >= 8 ? 1 : 4;

// Padded line buffers per half: the forward keeps h; the tiled backward keeps the adjoint and the
// three gates of a line and the h of the line before it; the simple backward only the adjoint.
constexpr int kFwdFields = 1;
constexpr int kBwdTiledFields = 5;
constexpr int kBwdSimpleFields = 1;
// Outputs per pixel that column tiles pass through the warp stage.
constexpr int kFwdOutFields = 1;
constexpr int kBwdOutFields = 5;

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
// at scan step `step` of the block's chunk, origin + step * dstep.  Thread i of the block owns block
// pixel i = l M + j; those below `pixels` are pixels of the tensor, the others only synchronise.
struct ThreadPixel {
  int l, j;
  int pixels;
  bool active;  // threadIdx.x < pixels
  int dstep;    // +-ss: at most M <= 1024 in the tiled kernels
  int64_t origin;
};

template <typename acc_t>
__device__ ThreadPixel thread_pixel(const Geometry<acc_t>& geo, const BlockShare<acc_t>& b) {
  ThreadPixel t;
  const int i = threadIdx.x;
  const int M = static_cast<int>(geo.M);
  const int l = i / M, j = i - l * M;
  t.l = i < b.work ? l : 0;
  t.j = i < b.work ? j : 0;
  const int64_t lines_left = geo.N - b.n0;
  t.pixels = lines_left < geo.lines ? static_cast<int>(lines_left) * M : b.work;
  t.active = i < t.pixels;
  const int64_t first = geo.reverse ? b.s1 - 1 : b.s0;
  // The formula for every thread, also those past the work: for column scans (ss = 1, sj = L) it is
  // the block's first pixel + i L, which for_slots relies on.
  t.origin = (b.n0 + l) * geo.L * geo.M + first * geo.ss + j * geo.sj;
  t.dstep = static_cast<int>(geo.reverse ? -geo.ss : geo.ss);
  return t;
}

// ---------------------------------------------------------------------------------------------------
// The tiled walk (lines x M <= blockDim.x): helpers
//
// A tile is the T steps t0 .. t0 + count - 1 of the walk; each thread holds its pixel's inputs for
// all of them in registers, in[field][u] for tile step u.  Rows load them directly: at each u the
// warp's 32 pixels are consecutive in memory.  Columns would read 32 cache lines per instruction
// that way (a thread's T values are contiguous, its neighbours' L elements away), so the warp reads
// cooperatively instead: in "slot" q a lane fetches tile step u = lane % T of the pixel of lane
// q * 32/T + lane / T (T lanes read one pixel's T contiguous values, 32/T cache lines per
// instruction), and the values then move to their owners through a per-warp stage in shared memory.
// Column outputs take the reverse way at the tile's end; row outputs are stored at each step.
// ---------------------------------------------------------------------------------------------------

// Slot q of this lane: the lane whose pixel it fetches and the tile step.
template <int T, bool kColumns>
__device__ int slot_owner(int q, int lane) {
  return kColumns ? q * (32 / T) + lane / T : lane;
}
template <int T, bool kColumns>
__device__ int slot_step(int q, int lane) {
  return kColumns ? lane % T : q;
}

// The lane index, read so that the compiler cannot hoist what is computed from it out of the tile
// loop: at 64 registers a thread, T slot offsets kept across the loop spilled (the column forward).
__device__ __forceinline__ int lane_id() {
#if defined(__CUDA_ARCH__)
  int lane;
  asm volatile("mov.u32 %0, %%laneid;" : "=r"(lane));
  return lane;
#else
  return static_cast<int>(threadIdx.x % 32);
#endif
}

// Calls fetch(q, offset, u) for every slot q of this lane whose pixel is a pixel of the tensor and
// whose tile step u is < count.  This thread's pixel at tile step u is at base + u * ustep; in a
// column scan the pixel of thread i + d is at base + d L (block pixel i lies i L after the block's
// first, see thread_pixel), so the lanes find their slots' pixels without communicating.
template <int T, bool kColumns, typename Fetch>
__device__ __forceinline__ void for_slots(const ThreadPixel& px, int64_t base, int L, int ustep, int count,
                                          Fetch&& fetch) {
  const int i = threadIdx.x, lane = lane_id();
  // Slot q's thread and offset from base advance by fixed strides from slot 0's (written out, so that
  // the compiler keeps two values across the tiles rather than T offsets).  |rel| stays below
  // 33 L + T M < 2^31 (plan_launch's limit on L for column tiles).
  const int u0 = slot_step<T, kColumns>(0, lane);
  const int i_stride = slot_owner<T, kColumns>(1, lane) - slot_owner<T, kColumns>(0, lane);
  const int u_stride = slot_step<T, kColumns>(1, lane) - u0;
  int owner = i - lane + slot_owner<T, kColumns>(0, lane);
  int rel = (owner - i) * L + u0 * ustep;
  const int rel_stride = i_stride * L + u_stride * ustep;
#pragma unroll
  for (int q = 0; q < T; ++q) {
    const int u = u0 + q * u_stride;
    if (owner < px.pixels && u < count) fetch(q, base + rel, u);
    owner += i_stride;
    rel += rel_stride;
  }
}

// This warp's stage (columns only): `fields` x 32 lanes x T values, padded to T + 1 against bank
// conflicts.  at(f, lane, u) is value u of field f of lane `lane`'s pixel.
template <int T, typename acc_t>
struct WarpStage {
  acc_t* p;
  __device__ acc_t& at(int f, int lane, int u) const { return p[(f * 32 + lane) * (T + 1) + u]; }
};

template <int T, typename acc_t>
__device__ WarpStage<T, acc_t> warp_stage(acc_t* stage_base, int fields) {
  return {stage_base + (threadIdx.x / 32) * fields * 32 * (T + 1)};
}

// Columns: the fetched values in[f][q] (slot order) of the first `Moved` fields become in[f][u] (this
// lane's pixel, tile step u).
template <int T, bool kColumns, int Moved, int F, typename acc_t>
__device__ __forceinline__ void slots_to_owners(acc_t (&in)[F][T], const WarpStage<T, acc_t>& st) {
  static_assert(Moved <= F, "more fields to move than fetched");
  if constexpr (kColumns) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int f = 0; f < Moved; ++f) {
      __syncwarp();
#pragma unroll
      for (int q = 0; q < T; ++q) st.at(0, slot_owner<T, true>(q, lane), slot_step<T, true>(q, lane)) = in[f][q];
      __syncwarp();
#pragma unroll
      for (int u = 0; u < T; ++u) in[f][u] = st.at(0, lane, u);
    }
    __syncwarp();
  }
}

// ---------------------------------------------------------------------------------------------------
// The kernels.  Each has two walks: the tiled one above (kTiled), and the simple one for longer
// lines, where the threads stride over the block's pixels at every step.
// ---------------------------------------------------------------------------------------------------

// The forward: the tiled walk (kTiled: lines x M <= blockDim.x, T steps a tile) or the simple one.
template <int T, bool kTiled, bool kColumns, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMaxThreads)
    gspn_scan_fwd_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ lam,
                         const scalar_t* __restrict__ wn, const scalar_t* __restrict__ wm,
                         const scalar_t* __restrict__ wp, scalar_t* __restrict__ h, const Geometry<acc_t> geo) {
  extern __shared__ unsigned char smem_raw[];
  const BlockShare<acc_t> b = block_share<kTiled>(geo, reinterpret_cast<acc_t*>(smem_raw));
  if constexpr (kTiled) {
    const ThreadPixel px = thread_pixel(geo, b);
    const WarpStage<T, acc_t> st = warp_stage<T>(b.buf + geo.buf_floats, kFwdOutFields);
    const int64_t len = b.s1 - b.s0;
    const int j = px.j, lane = threadIdx.x % 32;
    acc_t* prev = line_buffer(b, geo.lines, kFwdFields, 0, 0, px.l);
    acc_t* cur = line_buffer(b, geo.lines, kFwdFields, 1, 0, px.l);
    int64_t base = px.origin;  // this thread's pixel at the tile's first step t0; step t0 + u at base + u dstep
    for (int64_t t0 = 0; t0 < len; t0 += T, base += T * px.dstep) {
      const int count = static_cast<int>(len - t0 < T ? len - t0 : T);
      // The tile's inputs, all loads issued before the first step: x (then lam x), w_neg, w_mid,
      // w_pos and lam.
      acc_t in[5][T] = {};
      for_slots<T, kColumns>(px, base, static_cast<int>(geo.L), px.dstep, count, [&](int q, int64_t off, int u) {
        in[0][q] = x[off];
        in[4][q] = lam[off];
        if (t0 + u > 0) {  // the first line of a group has no recurrence: its gates are unused
          in[1][q] = wn[off];
          in[2][q] = wm[off];
          in[3][q] = wp[off];
        }
      });
      // lam x before the steps, so that the walk holds 4 values per step (and columns stage 4 fields).
#pragma unroll
      for (int q = 0; q < T; ++q) in[0][q] = forward_first<acc_t>(in[0][q], in[4][q]);
      slots_to_owners<T, kColumns, 4>(in, st);
#pragma unroll
      for (int u = 0; u < T; ++u) {
        if (u >= count) break;  // the same for the whole block
        const acc_t v = t0 + u == 0 ? in[0][u]
                                    : forward_recur<acc_t>(in[0][u], in[1][u], in[2][u], in[3][u], prev[j - 1],
                                                           prev[j], prev[j + 1]);
        if (px.active) cur[j] = v;
        if constexpr (kColumns) {
          st.at(0, lane, u) = v;
        } else if (px.active) {
          h[base + u * px.dstep] = static_cast<scalar_t>(v);
        }
        __syncthreads();
        acc_t* tmp = prev;
        prev = cur;
        cur = tmp;
      }
      if constexpr (kColumns) {
        __syncwarp();
        for_slots<T, true>(px, base, static_cast<int>(geo.L), px.dstep, count, [&](int q, int64_t off, int) {
          h[off] = static_cast<scalar_t>(st.at(0, slot_owner<T, true>(q, lane), slot_step<T, true>(q, lane)));
        });
        __syncwarp();
      }
    }
  } else {
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
}

// The backward: the tiled walk (kTiled: lines x M <= blockDim.x, T steps a tile) or the simple one.
template <int T, bool kTiled, bool kColumns, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMaxThreads)
    gspn_scan_bwd_kernel(const scalar_t* __restrict__ gh, const scalar_t* __restrict__ x,
                         const scalar_t* __restrict__ lam, const scalar_t* __restrict__ wn,
                         const scalar_t* __restrict__ wm, const scalar_t* __restrict__ wp,
                         const scalar_t* __restrict__ h, scalar_t* __restrict__ dx, scalar_t* __restrict__ dlam,
                         scalar_t* __restrict__ dwn, scalar_t* __restrict__ dwm, scalar_t* __restrict__ dwp,
                         const Geometry<acc_t> geo) {
  extern __shared__ unsigned char smem_raw[];
  const BlockShare<acc_t> b = block_share<kTiled>(geo, reinterpret_cast<acc_t*>(smem_raw));
  if constexpr (kTiled) {
    const ThreadPixel px = thread_pixel(geo, b);
    const WarpStage<T, acc_t> st = warp_stage<T>(b.buf + geo.buf_floats, kBwdOutFields);
    const int64_t len = b.s1 - b.s0;
    const int j = px.j, lane = threadIdx.x % 32;
    // Per half: the adjoint and the three gates of a line, and the output of the line before it.
    enum : int { kA = 0, kN = 1, kM = 2, kP = 3, kH = 4 };
    auto buffer = [&](int half, int field) {
      return line_buffer(b, geo.lines, kBwdTiledFields, half, field, px.l);
    };
    scalar_t* const grads_out[kBwdOutFields] = {dx, dlam, dwn, dwm, dwp};
    int half = 0;  // the half this step writes; the other holds the next line in scan order
    // Tiles of steps t = t0 .. t0 + T - 1 against scan order: scan step len - 1 - t.
    for (int64_t t0 = 0; t0 < len; t0 += T) {
      const int64_t base = px.origin + (len - 1 - t0) * px.dstep;  // tile step u at base - u dstep
      const int count = static_cast<int>(len - t0 < T ? len - t0 : T);
      // grad_h, x, lam, w_neg, w_mid, w_pos of the line and h of the line before it in scan order.
      acc_t in[7][T] = {};
      for_slots<T, kColumns>(px, base, static_cast<int>(geo.L), -px.dstep, count, [&](int q, int64_t off, int u) {
        in[0][q] = gh[off];
        in[1][q] = x[off];
        in[2][q] = lam[off];
        if (len - 1 - t0 - u > 0) {  // the first line of a group has no recurrence: gates and h_p unused
          in[3][q] = wn[off];
          in[4][q] = wm[off];
          in[5][q] = wp[off];
          in[6][q] = h[off - px.dstep];
        }
      });
      slots_to_owners<T, kColumns, 7>(in, st);
#pragma unroll
      for (int u = 0; u < T; ++u) {
        if (u >= count) break;  // the same for the whole block
        const acc_t* an = buffer(1 - half, kA);
        acc_t a = in[0][u];
        if (t0 + u > 0) {
          a = adjoint_step<acc_t>(a, buffer(1 - half, kN)[j + 1], an[j + 1], buffer(1 - half, kM)[j], an[j],
                                  buffer(1 - half, kP)[j - 1], an[j - 1]);
        }
        acc_t* hb = buffer(half, kH);
        if (px.active) {
          buffer(half, kA)[j] = a;
          buffer(half, kN)[j] = in[3][u];
          buffer(half, kM)[j] = in[4][u];
          buffer(half, kP)[j] = in[5][u];
          hb[j] = in[6][u];
        }
        __syncthreads();
        const StepGrads<acc_t> d = step_grads<acc_t>(a, in[1][u], in[2][u], hb[j - 1], in[6][u], hb[j + 1]);
        const acc_t ds[kBwdOutFields] = {d.dx, d.dlam, d.dwn, d.dwm, d.dwp};
#pragma unroll
        for (int f = 0; f < kBwdOutFields; ++f) {
          if constexpr (kColumns) {
            st.at(f, lane, u) = ds[f];
          } else if (px.active) {
            grads_out[f][base - u * px.dstep] = static_cast<scalar_t>(ds[f]);
          }
        }
        half = 1 - half;
      }
      if constexpr (kColumns) {
        __syncwarp();
        for_slots<T, true>(px, base, static_cast<int>(geo.L), -px.dstep, count, [&](int q, int64_t off, int) {
          const int o = slot_owner<T, true>(q, lane), u = slot_step<T, true>(q, lane);
#pragma unroll
          for (int f = 0; f < kBwdOutFields; ++f) grads_out[f][off] = static_cast<scalar_t>(st.at(f, o, u));
        });
        __syncwarp();
      }
    }
  } else {
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
}

// ---------------------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------------------

// What one of the two ops asks of the launch: its padded line buffers per half (tiled and simple
// kernels), the outputs a column tile stages, and its tile length T for the dtype.
struct ScanKind {
  int tiled_fields, simple_fields, out_fields;
  bool backward;
};

constexpr ScanKind kForward{kFwdFields, kFwdFields, kFwdOutFields, false};
constexpr ScanKind kBackward{kBwdTiledFields, kBwdSimpleFields, kBwdOutFields, true};

template <typename scalar_t>
constexpr int tile_steps(const ScanKind& kind) {
  return kind.backward ? kBwdTile<scalar_t> : kFwdTile<scalar_t>;
}

struct LaunchPlan {
  int lines;            // lines of the (batch x channel) axis per block
  int threads;          // threads per block
  int64_t blocks;       // line blocks x groups
  int64_t groups;       // chunks along the scan axis
  int64_t buf_floats;   // accumulator elements per block: two halves of `fields` padded buffers
  size_t shared_bytes;  // dynamic shared memory: the line buffers, then (column tiles) the warp stages
  bool tiled;           // one thread per pixel of the block's lines: the tiled kernels
  bool global_ws;       // line buffers in a global workspace instead of shared memory
};

template <typename scalar_t, typename acc_t>
LaunchPlan plan_launch(const ScanArgs& a, const ScanKind& kind) {
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
  auto buffer_bytes = [&](int fields) {
    return 2 * fields * static_cast<size_t>(p.lines) * static_cast<size_t>(M + 2) * sizeof(acc_t);
  };
  const size_t stage_floats =
      a.columns ? static_cast<size_t>(p.threads) * (tile_steps<scalar_t>(kind) + 1) * kind.out_fields : 0;
  const size_t stage_bytes = stage_floats * sizeof(acc_t);
  // The tiled kernels keep everything in shared memory; where that would not fit (float64 on a GPU
  // with little shared memory) the simple kernels run instead.
  // (Column tiles also address a warp's pixels by 32-bit offsets of up to 33 L: L < 2^25.)
  p.tiled = work <= kMaxThreads && buffer_bytes(kind.tiled_fields) + stage_bytes <= max_shared &&
            (!a.columns || a.L < (int64_t{1} << 25));
  const int fields = p.tiled ? kind.tiled_fields : kind.simple_fields;
  p.buf_floats = 2 * fields * static_cast<int64_t>(p.lines) * (M + 2);
  p.global_ws = buffer_bytes(fields) > max_shared;
  p.shared_bytes = p.global_ws ? 0 : buffer_bytes(fields) + (p.tiled ? stage_bytes : 0);
  return p;
}

// Launches `kernel`, first raising its dynamic shared-memory limit where the buffers need more than
// the default 48 KiB (plan_launch keeps them within the device's opt-in limit).
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), unsigned int grid, int threads, size_t smem, cudaStream_t stream,
                   Args&&... args) {
  if (smem > kDefaultSharedBytes) {
    C10_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  kernel<<<grid, threads, smem, stream>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Plans the launch of `kind` for `a` and calls `launch(scalar zero, plan, stream, geometry)` for the
// dtype of the tensors, with a global workspace when the line buffers do not fit in shared memory.
template <typename Launch>
void launch_scan(const ScanArgs& a, const ScanKind& kind, Launch&& launch) {
  TORCH_CHECK(a.M <= (int64_t{1} << 30), "gspn scan: line length too large for the CUDA kernel");
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "gspn_scan_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const LaunchPlan p = plan_launch<scalar_t, acc_t>(a, kind);
    at::Tensor ws;
    if (p.global_ws) {
      ws = at::empty({p.blocks * p.buf_floats}, a.x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    }
    // Strides of (line, position) within a plane: rows are contiguous lines, columns strided ones.
    const int64_t ss = a.columns ? 1 : a.M, sj = a.columns ? a.L : 1;
    const Geometry<acc_t> geo{a.N, a.L, a.M, a.k, p.groups, p.buf_floats, ss, sj, p.lines, a.reverse,
                              p.global_ws ? ws.mutable_data_ptr<acc_t>() : nullptr};
    launch(scalar_t(0), p, stream, geo);
  });
}

}  // namespace

void launch_scan_fwd_cuda(const ScanArgs& a, at::Tensor& h) {
  launch_scan(a, kForward, [&](auto zero, const LaunchPlan& p, cudaStream_t stream, const auto& geo) {
    using scalar_t = decltype(zero);
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int T = tile_steps<scalar_t>(kForward);
    auto kernel = &gspn_scan_fwd_kernel<1, false, false, scalar_t, acc_t>;  // the simple walk
    if (p.tiled && a.columns) kernel = &gspn_scan_fwd_kernel<T, true, true, scalar_t, acc_t>;
    if (p.tiled && !a.columns) kernel = &gspn_scan_fwd_kernel<T, true, false, scalar_t, acc_t>;
    launch_kernel(kernel, static_cast<unsigned int>(p.blocks), p.threads, p.shared_bytes, stream,
                  a.x.const_data_ptr<scalar_t>(), a.lam.const_data_ptr<scalar_t>(),
                  a.wn.const_data_ptr<scalar_t>(), a.wm.const_data_ptr<scalar_t>(),
                  a.wp.const_data_ptr<scalar_t>(), h.mutable_data_ptr<scalar_t>(), geo);
  });
}

void launch_scan_bwd_cuda(const ScanArgs& a, const at::Tensor& grad_h, const at::Tensor& h, at::Tensor& dx,
                          at::Tensor& dlam, at::Tensor& dwn, at::Tensor& dwm, at::Tensor& dwp) {
  launch_scan(a, kBackward, [&](auto zero, const LaunchPlan& p, cudaStream_t stream, const auto& geo) {
    using scalar_t = decltype(zero);
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int T = tile_steps<scalar_t>(kBackward);
    auto kernel = &gspn_scan_bwd_kernel<1, false, false, scalar_t, acc_t>;  // the simple walk
    if (p.tiled && a.columns) kernel = &gspn_scan_bwd_kernel<T, true, true, scalar_t, acc_t>;
    if (p.tiled && !a.columns) kernel = &gspn_scan_bwd_kernel<T, true, false, scalar_t, acc_t>;
    launch_kernel(kernel, static_cast<unsigned int>(p.blocks), p.threads, p.shared_bytes, stream,
                  grad_h.const_data_ptr<scalar_t>(), a.x.const_data_ptr<scalar_t>(),
                  a.lam.const_data_ptr<scalar_t>(), a.wn.const_data_ptr<scalar_t>(),
                  a.wm.const_data_ptr<scalar_t>(), a.wp.const_data_ptr<scalar_t>(), h.const_data_ptr<scalar_t>(),
                  dx.mutable_data_ptr<scalar_t>(), dlam.mutable_data_ptr<scalar_t>(),
                  dwn.mutable_data_ptr<scalar_t>(), dwm.mutable_data_ptr<scalar_t>(),
                  dwp.mutable_data_ptr<scalar_t>(), geo);
  });
}

}  // namespace gspn
