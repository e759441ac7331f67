// The launch plans of the CUDA kernels from the ops' arguments: argument checks, plan and workspace.
// Shared by the launchers (gspn_cuda.cu, gspn_propagate_cuda.cu, gspn_lanes_cuda.cu) and the test
// suite's host emulation of the kernels (tests/cuda_emu/), so both launch the same grids.  ATen, but
// no CUDA runtime: the propagate_proj ops (lanes_proj_fwd / lanes_proj_bwd) are written here whole,
// from the arguments to the returned tensors, around a `launch(kernel, grid, block, shared_bytes,
// args...)` that the CUDA launcher implements with <<<...>>> and the emulation with cuda_emu::launch.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "../gspn_layout.h"
#include "gspn_attention_kernels.h"
#include "gspn_lanes_kernels.h"
#include "gspn_propagate_kernels.h"
#include "gspn_scan_kernels.h"
#include "gspn_tile_kernels.h"

namespace gspn {

// A workspace of `n` acc_t elements on the device of `like` (undefined when n is 0), and its data.
template <typename acc_t>
at::Tensor launch_workspace(int64_t n, const at::Tensor& like) {
  return n > 0 ? at::empty({n}, like.options().dtype(c10::CppTypeToScalarType<acc_t>::value)) : at::Tensor();
}

template <typename acc_t>
acc_t* workspace_data(at::Tensor& ws) {
  return ws.defined() ? ws.mutable_data_ptr<acc_t>() : nullptr;
}

// The scan's launch for `a` (lines on transposed copies for column scans).
template <typename acc_t>
scan_cuda::LaunchPlan plan_scan_launch(const ScanArgs& a) {
  TORCH_CHECK(!a.columns, "gspn scan: the CUDA kernels take transposed copies for column scans");
  TORCH_CHECK(a.M <= (int64_t{1} << 30), "gspn scan: line length too large for the CUDA kernel");
  const scan_cuda::LaunchPlan p = scan_cuda::plan_launch<acc_t>(a.N, a.L, a.M, a.k);
  TORCH_CHECK(p.blocks <= INT_MAX, "gspn scan: too many (batch x channel x chunk) blocks for one launch");
  return p;
}

// The fused propagation's launch over the planes of `a`; `staging` allows staged blocks, `pointers`
// are the tensors the kernel reads and writes (16-byte copies need them all aligned).
template <typename scalar_t, typename acc_t>
propagate_cuda::PropagatePlan plan_propagate_launch(const PropagateArgs& a, bool backward, bool staging,
                                                    std::initializer_list<const void*> pointers) {
  const int64_t planes = a.B * a.C;
  TORCH_CHECK(planes <= INT_MAX, "gspn propagate: too many (batch x channel) planes for one launch");
  TORCH_CHECK(std::max(a.H, a.W) <= INT_MAX / 2, "gspn propagate: lines too long for the CUDA kernel");
  bool transpose[4] = {}, reverse[4] = {};
  for (int64_t k = 0; k < a.K; ++k) {
    transpose[k] = a.dirs[k].transpose;
    reverse[k] = a.dirs[k].reverse;
  }
  bool aligned = true;
  for (const void* p : pointers) aligned = aligned && reinterpret_cast<uintptr_t>(p) % 16 == 0;
  return propagate_cuda::plan_propagate<scalar_t, acc_t>(a.B, a.C, a.H, a.W, a.K, a.chunk, transpose, reverse,
                                                         backward, staging, aligned);
}

// ---- propagate_proj: the channels-last lane kernels (gspn_lanes_kernels.h) ----

// The lane kernels' launch for `pa` (x and proxy channels-last).
template <typename acc_t>
lanes_cuda::LanesPlan plan_lanes_launch(const ProjArgs& pa, bool backward,
                                        int64_t target_ctas = lanes_cuda::kTargetCtas) {
  const PropagateArgs& a = pa.p;
  TORCH_CHECK(pa.S <= lanes_cuda::kMaxLaneS, "gspn propagate_proj: the lane kernels take proxies of at most ",
              lanes_cuda::kMaxLaneS, " channels");
  TORCH_CHECK(std::max(a.H, a.W) <= INT_MAX / 2, "gspn propagate_proj: lines too long for the CUDA kernel");
  bool transpose[4] = {}, reverse[4] = {};
  for (int64_t k = 0; k < a.K; ++k) {
    transpose[k] = a.dirs[k].transpose;
    reverse[k] = a.dirs[k].reverse;
  }
  const lanes_cuda::LanesPlan p =
      lanes_cuda::plan_lanes<acc_t>(a.B, a.C, a.H, a.W, a.K, a.chunk, pa.S, transpose, reverse, backward, target_ctas);
  TORCH_CHECK(p.grid[2] <= 65535 && static_cast<int64_t>(p.grid[2]) == a.B * p.geo.zruns,
              "gspn propagate_proj: too many (batch x run) blocks for one launch");
  TORCH_CHECK(p.geo.groups <= INT_MAX, "gspn propagate_proj: too many channel groups for one launch");
  return p;
}

// The projection op's arguments with x and the proxy channels-last.
inline ProjArgs lanes_args(const at::Tensor& x, const at::Tensor& proxy, const at::Tensor& weight,
                           const at::Tensor& bias, const at::Tensor& merge, const std::vector<std::string>& directions,
                           int64_t chunk_size, const char* op) {
  return proj_args(x, proxy, weight, bias, merge, directions, chunk_size, op, at::MemoryFormat::ChannelsLast);
}

inline at::Tensor empty_channels_last(const at::Tensor& like, at::IntArrayRef sizes) {
  return at::empty(sizes, like.options().memory_format(at::MemoryFormat::ChannelsLast));
}

// y = sum_k part[k] (K partials of n values each; K = 1: part is y already).
template <typename scalar_t, typename acc_t, typename Launch>
void lanes_merge(const at::Tensor& part, at::Tensor& out, int64_t K, Launch&& launch) {
  if (K == 1) return;
  const int64_t n = out.numel();
  launch(lanes_cuda::lanes_merge_kernel<scalar_t, acc_t>, dim3(lanes_cuda::merge_blocks(n)),
         dim3(lanes_cuda::kMergeThreads), size_t{0}, part.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
         n, K);
}

// Calls f(std::integral_constant<int, kS>) with the register capacity for S proxy channels.
template <typename F>
void with_lane_capacity(int64_t S, F&& f) {
  if (S <= 8) {
    f(std::integral_constant<int, 8>{});
  } else {
    f(std::integral_constant<int, 16>{});
  }
}

template <typename scalar_t, typename acc_t, typename Launch>
at::Tensor lanes_forward(const ProjArgs& pa, Launch&& launch, int64_t target_ctas) {
  const PropagateArgs& a = pa.p;
  at::Tensor y = empty_channels_last(a.x, a.x.sizes());
  if (y.numel() == 0) return y;
  const lanes_cuda::LanesPlan p = plan_lanes_launch<acc_t>(pa, /*backward=*/false, target_ctas);
  at::Tensor ws = launch_workspace<acc_t>(p.ws_elems, a.x);
  at::Tensor part = a.K == 1 ? y : at::empty({a.K, y.numel()}, a.x.options());
  with_lane_capacity(pa.S, [&](auto cap) {
    launch(lanes_cuda::lanes_fwd_kernel<scalar_t, acc_t, decltype(cap)::value>, dim3(p.grid[0], p.grid[1], p.grid[2]),
           dim3(p.block[0], p.block[1]), p.shared_bytes, a.x.const_data_ptr<scalar_t>(),
           pa.proxy.const_data_ptr<scalar_t>(), pa.weight.const_data_ptr<scalar_t>(),
           pa.bias.const_data_ptr<scalar_t>(), a.merge.const_data_ptr<scalar_t>(), part.mutable_data_ptr<scalar_t>(),
           workspace_data<acc_t>(ws), p.geo);
  });
  lanes_merge<scalar_t, acc_t>(part, y, a.K, launch);
  return y;
}

using ProjGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

template <typename scalar_t, typename acc_t, typename Launch>
ProjGrads lanes_backward(const ProjArgs& pa, const at::Tensor& grad_y, Launch&& launch, int64_t target_ctas) {
  const PropagateArgs& a = pa.p;
  const int64_t S = pa.S, R = a.K * kGateFields * a.C, n = a.x.numel();
  const at::ScalarType dtype = a.x.scalar_type();
  const at::Tensor gy = grad_y.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor dx = empty_channels_last(a.x, a.x.sizes());
  if (n == 0) {
    return {dx, at::zeros_like(pa.proxy), at::zeros_like(pa.weight), at::zeros_like(pa.bias), at::zeros_like(a.merge)};
  }
  const lanes_cuda::LanesPlan p = plan_lanes_launch<acc_t>(pa, /*backward=*/true, target_ctas);
  const auto acc = a.x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const int64_t pixels = a.B * a.H * a.W, zb = a.B * p.geo.zruns;
  at::Tensor ws = launch_workspace<acc_t>(p.ws_elems, a.x);
  at::Tensor dx_part = a.K == 1 ? dx : at::empty({a.K, n}, a.x.options());
  at::Tensor dproxy_part = at::empty({a.K * p.geo.groups, pixels * S}, acc);
  at::Tensor dwb_part = at::zeros({zb, R * (S + 1)}, acc);
  at::Tensor dm_part = at::zeros({zb, a.K * a.C}, acc);
  with_lane_capacity(S, [&](auto cap) {
    launch(lanes_cuda::lanes_bwd_kernel<scalar_t, acc_t, decltype(cap)::value>, dim3(p.grid[0], p.grid[1], p.grid[2]),
           dim3(p.block[0], p.block[1]), p.shared_bytes, gy.const_data_ptr<scalar_t>(), a.x.const_data_ptr<scalar_t>(),
           pa.proxy.const_data_ptr<scalar_t>(), pa.weight.const_data_ptr<scalar_t>(),
           pa.bias.const_data_ptr<scalar_t>(), a.merge.const_data_ptr<scalar_t>(),
           dx_part.mutable_data_ptr<scalar_t>(), dproxy_part.mutable_data_ptr<acc_t>(),
           dwb_part.mutable_data_ptr<acc_t>(), dm_part.mutable_data_ptr<acc_t>(), workspace_data<acc_t>(ws), p.geo);
  });
  lanes_merge<scalar_t, acc_t>(dx_part, dx, a.K, launch);
  // the partial sums added in a fixed order (deterministic)
  const at::Tensor dproxy =
      dproxy_part.sum(0).view({a.B, a.H, a.W, S}).permute({0, 3, 1, 2}).to(dtype);  // channels-last strides
  const at::Tensor dwb = dwb_part.sum(0).view({R, S + 1});
  const at::Tensor dweight = dwb.narrow(1, 0, S).to(dtype).contiguous();
  const at::Tensor dbias = dwb.select(1, S).to(dtype).contiguous();
  const at::Tensor dmerge = dm_part.sum(0).view({a.K, a.C}).to(dtype);
  return {dx, dproxy, dweight, dbias, dmerge};
}

// The logits materialised: gates (B, K, 6, C, H, W) = weight @ proxy + bias per pixel (proxies of more
// than kMaxLaneS channels, whose rows do not fit in a lane's registers).
inline at::Tensor materialise_gates(const ProjArgs& pa) {
  const PropagateArgs& a = pa.p;
  const int64_t R = a.K * kGateFields * a.C;
  const at::Tensor p = pa.proxy.reshape({a.B, pa.S, a.H * a.W});
  return at::matmul(pa.weight, p).add_(pa.bias.view({1, R, 1})).view({a.B, a.K, kGateFields, a.C, a.H, a.W});
}

// propagate_proj_fwd for S > kMaxLaneS: the logits materialised and `propagate_fwd(x, gates, merge,
// directions, chunk)` (the per-plane kernels of gspn_propagate_kernels.h); y channels-last like the
// lane kernels'.
template <typename PropagateFwd>
at::Tensor proj_fwd_materialised(const ProjArgs& pa, const std::vector<std::string>& directions, int64_t chunk,
                                 PropagateFwd&& propagate_fwd) {
  const at::Tensor y = propagate_fwd(pa.p.x, materialise_gates(pa), pa.p.merge, directions, chunk);
  return y.contiguous(at::MemoryFormat::ChannelsLast);
}

// propagate_proj_bwd likewise: `propagate_bwd` on the recomputed logits, then the projection's adjoint.
template <typename PropagateBwd>
ProjGrads proj_bwd_materialised(const ProjArgs& pa, const at::Tensor& grad_y, const std::vector<std::string>& directions,
                                int64_t chunk, PropagateBwd&& propagate_bwd) {
  const PropagateArgs& a = pa.p;
  auto [dx, dgates, dmerge] = propagate_bwd(grad_y, a.x, materialise_gates(pa), a.merge, directions, chunk);
  const at::Tensor dg = dgates.reshape({a.B, -1, a.H * a.W});
  const at::Tensor p = pa.proxy.reshape({a.B, pa.S, a.H * a.W});
  const at::Tensor dproxy = at::matmul(pa.weight.t(), dg).view({a.B, pa.S, a.H, a.W});
  const at::Tensor dweight = at::matmul(dg, p.transpose(1, 2)).sum(0);
  return {dx.contiguous(at::MemoryFormat::ChannelsLast), dproxy.contiguous(at::MemoryFormat::ChannelsLast), dweight,
          dg.sum({0, 2}), dmerge};
}

// ---- the local tile kernels of chunked layers (gspn_tile_kernels.h), forward and propagate_proj's backward ----

// Which kernel a forward runs: kAuto the dispatch rule (tile_cuda::tile_pays and a tile that fits in
// shared memory), kLanes / kTile one of them (the tests; kTile fails where no tile applies).
enum class ForwardKernel : int64_t { kAuto = 0, kLanes = 1, kTile = 2 };

inline ForwardKernel forward_kernel(int64_t v) {
  TORCH_CHECK(v >= 0 && v <= 2, "gspn: forward kernel 0 (auto), 1 (lanes) or 2 (tile), got ", v);
  return static_cast<ForwardKernel>(v);
}

// The tile kernels' launch over (B, C, H, W) maps with the directions `dirs` (`states`: 1 for
// propagate_proj, 2 for attention).
template <typename acc_t>
tile_cuda::TilePlan plan_tile_launch(int64_t B, int64_t C, int64_t H, int64_t W, const std::vector<Direction>& dirs,
                                     int64_t chunk, int64_t S, int states, int64_t target_ctas,
                                     bool backward = false) {
  bool transpose[4] = {}, reverse[4] = {};
  const int64_t K = static_cast<int64_t>(dirs.size());
  for (int64_t k = 0; k < K; ++k) {
    transpose[k] = dirs[k].transpose;
    reverse[k] = dirs[k].reverse;
  }
  const int64_t ck = chunk >= 1 && chunk <= tile_cuda::kMaxChunk ? chunk : 1;  // planned only where it applies
  tile_cuda::TilePlan p =
      tile_cuda::plan_tile<acc_t>(B, C, H, W, K, ck, S, transpose, reverse, states, target_ctas, backward);
  p.fits = p.fits && p.geo.groups <= 65535 && B <= 65535;  // grid.y, grid.z
  return p;
}

// Whether the forward runs the tile kernel (`plan` from plan_tile_launch for `chunk`, S and `states`).
// `max_s`: the proxies the kernel takes.
inline bool use_tile_upto(ForwardKernel kernel, const tile_cuda::TilePlan& plan, int64_t chunk, int64_t S,
                          int64_t max_s, const char* op) {
  if (kernel == ForwardKernel::kLanes) return false;
  const bool applies = tile_cuda::tile_pays(chunk, S, max_s) && plan.fits;
  TORCH_CHECK(kernel == ForwardKernel::kAuto || applies, op, ": the tile kernel takes chunk sizes 1 to ",
              tile_cuda::kMaxChunk, " and proxies of at most ", max_s, " channels, got chunk ", chunk, " and ",
              S);
  return applies;
}

inline bool use_tile(ForwardKernel kernel, const tile_cuda::TilePlan& plan, int64_t chunk, int64_t S, int states,
                     const char* op) {
  return use_tile_upto(kernel, plan, chunk, S, states == 1 ? tile_cuda::kMaxTileS : lanes_cuda::kMaxLaneS, op);
}

// Calls f(std::integral_constant<int, kS>) with the tile kernel's capacity for S proxy channels (0:
// the rows in shared memory).
template <typename F>
void with_tile_capacity(int64_t S, F&& f) {
  switch (tile_cuda::tile_capacity(S)) {
    case 8:
      f(std::integral_constant<int, 8>{});
      break;
    case 16:
      f(std::integral_constant<int, 16>{});
      break;
    default:
      f(std::integral_constant<int, 0>{});
  }
}

template <typename scalar_t, typename acc_t, typename Launch>
at::Tensor tile_forward(const ProjArgs& pa, const tile_cuda::TilePlan& p, Launch&& launch) {
  const PropagateArgs& a = pa.p;
  at::Tensor y = empty_channels_last(a.x, a.x.sizes());
  if (y.numel() == 0) return y;
  with_tile_capacity(pa.S, [&](auto cap) {
    launch(tile_cuda::tile_fwd_kernel<scalar_t, acc_t, decltype(cap)::value>, dim3(p.grid[0], p.grid[1], p.grid[2]),
           dim3(p.block[0], p.block[1]), p.shared_bytes, a.x.const_data_ptr<scalar_t>(),
           pa.proxy.const_data_ptr<scalar_t>(), pa.weight.const_data_ptr<scalar_t>(),
           pa.bias.const_data_ptr<scalar_t>(), a.merge.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(),
           p.geo);
  });
  return y;
}

// The whole propagate_proj_fwd op around `launch`: the tile kernel where use_tile says so (chunked
// layers), else the lane kernels or, for S > kMaxLaneS, `propagate_fwd` (materialised logits).
// `target_ctas`: the plans' CTA target (the CUDA launcher keeps the default; the emulated op lets the
// tests vary it); `kernel`: the dispatch rule or a forced kernel (GSPN_CUDA_FORWARD, the tests).
template <typename Launch, typename PropagateFwd>
at::Tensor lanes_proj_fwd(const at::Tensor& x, const at::Tensor& proxy, const at::Tensor& weight,
                          const at::Tensor& bias, const at::Tensor& merge, const std::vector<std::string>& directions,
                          int64_t chunk_size, Launch&& launch, PropagateFwd&& propagate_fwd,
                          int64_t target_ctas = lanes_cuda::kTargetCtas,
                          ForwardKernel kernel = ForwardKernel::kAuto) {
  const char* op = "gspn propagate_proj_fwd";
  const ProjArgs pa = lanes_args(x, proxy, weight, bias, merge, directions, chunk_size, op);
  const PropagateArgs& a = pa.p;
  at::Tensor y;
  bool done = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gspn_propagate_proj_fwd_lanes", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const tile_cuda::TilePlan tp = plan_tile_launch<acc_t>(a.B, a.C, a.H, a.W, a.dirs, a.chunk, pa.S, 1, target_ctas);
    if (use_tile(kernel, tp, a.chunk, pa.S, 1, op)) {
      y = tile_forward<scalar_t, acc_t>(pa, tp, launch);
      done = true;
    } else if (pa.S <= lanes_cuda::kMaxLaneS) {
      y = lanes_forward<scalar_t, acc_t>(pa, launch, target_ctas);
      done = true;
    }
  });
  if (!done) y = proj_fwd_materialised(pa, directions, chunk_size, propagate_fwd);
  return y;
}

// Which kernel the backward of propagate_proj runs (GSPN_CUDA_BACKWARD, the tests): the same choices,
// the tile kernel where the rule takes a chunked layer and S <= kMaxLaneS (its dL/dweight sums are in
// registers) and its plan fits.
using BackwardKernel = ForwardKernel;

inline BackwardKernel backward_kernel(int64_t v) {
  TORCH_CHECK(v >= 0 && v <= 2, "gspn: backward kernel 0 (auto), 1 (lanes) or 2 (tile), got ", v);
  return static_cast<BackwardKernel>(v);
}

template <typename scalar_t, typename acc_t, typename Launch>
ProjGrads tile_backward(const ProjArgs& pa, const at::Tensor& grad_y, const tile_cuda::TilePlan& p, Launch&& launch) {
  const PropagateArgs& a = pa.p;
  const int64_t S = pa.S, R = a.K * kGateFields * a.C, n = a.x.numel(), pixels = a.B * a.H * a.W;
  const at::ScalarType dtype = a.x.scalar_type();
  const at::Tensor gy = grad_y.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor dx = empty_channels_last(a.x, a.x.sizes());
  if (n == 0) {
    return {dx, at::zeros_like(pa.proxy), at::zeros_like(pa.weight), at::zeros_like(pa.bias), at::zeros_like(a.merge)};
  }
  const auto acc = a.x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const int64_t ctas = static_cast<int64_t>(p.grid[0]) * p.grid[1] * p.grid[2], zb = a.B * p.grid[0];
  at::Tensor ws = launch_workspace<acc_t>(p.geo.red_elems * ctas, a.x);
  at::Tensor dproxy_part = at::empty({p.geo.groups, pixels * S}, acc);  // every pixel written once per group
  at::Tensor dwb_part = at::empty({zb, R * (S + 1)}, acc);             // every row written by its CTA
  at::Tensor dm_part = at::empty({zb, a.K * a.C}, acc);
  with_lane_capacity(S, [&](auto cap) {
    launch(tile_cuda::tile_bwd_kernel<scalar_t, acc_t, decltype(cap)::value>, dim3(p.grid[0], p.grid[1], p.grid[2]),
           dim3(p.block[0], p.block[1]), p.shared_bytes, gy.const_data_ptr<scalar_t>(), a.x.const_data_ptr<scalar_t>(),
           pa.proxy.const_data_ptr<scalar_t>(), pa.weight.const_data_ptr<scalar_t>(),
           pa.bias.const_data_ptr<scalar_t>(), a.merge.const_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>(),
           dproxy_part.mutable_data_ptr<acc_t>(), dwb_part.mutable_data_ptr<acc_t>(), dm_part.mutable_data_ptr<acc_t>(),
           workspace_data<acc_t>(ws), p.geo);
  });
  // the partial sums added in a fixed order (deterministic), as lanes_backward's
  const at::Tensor dproxy =
      dproxy_part.sum(0).view({a.B, a.H, a.W, S}).permute({0, 3, 1, 2}).to(dtype);  // channels-last strides
  const at::Tensor dwb = dwb_part.sum(0).view({R, S + 1});
  const at::Tensor dweight = dwb.narrow(1, 0, S).to(dtype).contiguous();
  const at::Tensor dbias = dwb.select(1, S).to(dtype).contiguous();
  const at::Tensor dmerge = dm_part.sum(0).view({a.K, a.C}).to(dtype);
  return {dx, dproxy, dweight, dbias, dmerge};
}

// The whole propagate_proj_bwd op around `launch`: the tile kernel where the rule takes the layer
// (chunk 1 to kMaxChunk, S <= kMaxLaneS, a plan that fits), else the lane kernels or, for
// S > kMaxLaneS, `propagate_bwd` on the materialised logits; `kernel`: the rule or a forced kernel
// (GSPN_CUDA_BACKWARD, the tests).
template <typename Launch, typename PropagateBwd>
ProjGrads lanes_proj_bwd(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& proxy,
                         const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& merge,
                         const std::vector<std::string>& directions, int64_t chunk_size, Launch&& launch,
                         PropagateBwd&& propagate_bwd, int64_t target_ctas = lanes_cuda::kTargetCtas,
                         BackwardKernel kernel = BackwardKernel::kAuto) {
  const char* op = "gspn propagate_proj_bwd";
  const ProjArgs pa = lanes_args(x, proxy, weight, bias, merge, directions, chunk_size, op);
  TORCH_CHECK(grad_y.sizes() == x.sizes() && grad_y.scalar_type() == x.scalar_type() && grad_y.device() == x.device(),
              "gspn propagate_proj_bwd: grad_y must have the shape, dtype and device of x");
  const PropagateArgs& a = pa.p;
  ProjGrads out;
  bool done = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gspn_propagate_proj_bwd_lanes", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const tile_cuda::TilePlan tp =
        plan_tile_launch<acc_t>(a.B, a.C, a.H, a.W, a.dirs, a.chunk, pa.S, 1, target_ctas, /*backward=*/true);
    // the tile's backward keeps dL/dweight in registers: proxies of at most kMaxLaneS channels
    if (use_tile_upto(kernel, tp, a.chunk, pa.S, lanes_cuda::kMaxLaneS, op)) {
      out = tile_backward<scalar_t, acc_t>(pa, grad_y, tp, launch);
      done = true;
    } else if (pa.S <= lanes_cuda::kMaxLaneS) {
      out = lanes_backward<scalar_t, acc_t>(pa, grad_y, launch, target_ctas);
      done = true;
    }
  });
  if (!done) out = proj_bwd_materialised(pa, grad_y, directions, chunk_size, propagate_bwd);
  return out;
}

// ---- attention: the channels-last lane kernels of the SD-XL swap (gspn_attention_kernels.h) ----

// The launch plan of the attention kernels for `a` (two states per lane).
template <typename acc_t>
lanes_cuda::LanesPlan plan_attention_launch(const AttentionArgs& a, bool backward,
                                            int64_t target_ctas = lanes_cuda::kTargetCtas) {
  TORCH_CHECK(a.S <= lanes_cuda::kMaxLaneS, "gspn attention: the CUDA kernels take proxies of at most ",
              lanes_cuda::kMaxLaneS, " channels, got ", a.S);
  bool transpose[4], reverse[4];
  for (int64_t k = 0; k < a.K; ++k) {
    transpose[k] = a.dirs[k].transpose;
    reverse[k] = a.dirs[k].reverse;
  }
  const int values = attn_cuda::reduce_values(a.S <= 8 ? 8 : 16);
  const lanes_cuda::LanesPlan p = lanes_cuda::plan_lanes<acc_t>(a.B, a.E, a.H, a.W, a.K, a.chunk, a.S, transpose,
                                                                reverse, backward, target_ctas, values);
  TORCH_CHECK(p.grid[2] <= 65535, "gspn attention: too many (batch x run) CTAs for one launch");
  return p;
}

template <typename acc_t>
acc_t attention_tiny(at::ScalarType t) {
  return t == at::kDouble ? static_cast<acc_t>(std::numeric_limits<double>::min())
                          : static_cast<acc_t>(std::numeric_limits<float>::min());
}

// The forward kernel's raw states hn, hd ([K][n] acc_t each) of every direction.
template <typename scalar_t, typename acc_t, typename Launch>
std::pair<at::Tensor, at::Tensor> attention_states(const AttentionArgs& a, Launch&& launch, int64_t target_ctas) {
  const lanes_cuda::LanesPlan p = plan_attention_launch<acc_t>(a, /*backward=*/false, target_ctas);
  const auto acc = a.v.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  at::Tensor hn = at::empty({a.K, a.v.numel()}, acc), hd = at::empty({a.K, a.v.numel()}, acc);
  at::Tensor ws = launch_workspace<acc_t>(p.ws_elems, a.v);
  with_lane_capacity(a.S, [&](auto cap) {
    launch(attn_cuda::attn_fwd_kernel<scalar_t, acc_t, decltype(cap)::value>, dim3(p.grid[0], p.grid[1], p.grid[2]),
           dim3(p.block[0], p.block[1]), p.shared_bytes, a.k.const_data_ptr<scalar_t>(),
           a.v.const_data_ptr<scalar_t>(), a.proxy.const_data_ptr<scalar_t>(), a.weight.const_data_ptr<scalar_t>(),
           a.bias.const_data_ptr<scalar_t>(), a.merge.const_data_ptr<scalar_t>(), hn.mutable_data_ptr<acc_t>(),
           hd.mutable_data_ptr<acc_t>(), workspace_data<acc_t>(ws), p.geo);
  });
  return {hn, hd};
}

// The whole attention_fwd op around `launch`.  `target_ctas`: the plan's CTA target (the CUDA launcher
// keeps the default; the emulated op lets the tests vary it).
template <typename Launch>
at::Tensor attention_cuda_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& proxy,
                              const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& merge,
                              const at::Tensor& u_bias, const std::vector<std::string>& directions,
                              int64_t chunk_size, Launch&& launch, int64_t target_ctas = lanes_cuda::kTargetCtas,
                              ForwardKernel kernel = ForwardKernel::kAuto) {
  const char* op = "gspn attention_fwd";
  const AttentionArgs a = attention_args(q, k, v, proxy, weight, bias, merge, u_bias, directions, chunk_size, op);
  at::Tensor out = at::empty_like(a.v);
  const int64_t n = out.numel();
  if (n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "gspn_attention_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const tile_cuda::TilePlan tp = plan_tile_launch<acc_t>(a.B, a.E, a.H, a.W, a.dirs, a.chunk, a.S, 2, target_ctas);
    if (use_tile(kernel, tp, a.chunk, a.S, 2, op)) {
      with_lane_capacity(a.S, [&](auto cap) {
        launch(tile_cuda::tile_attn_fwd_kernel<scalar_t, acc_t, decltype(cap)::value>,
               dim3(tp.grid[0], tp.grid[1], tp.grid[2]), dim3(tp.block[0], tp.block[1]), tp.shared_bytes,
               a.q.const_data_ptr<scalar_t>(), a.k.const_data_ptr<scalar_t>(), a.v.const_data_ptr<scalar_t>(),
               a.proxy.const_data_ptr<scalar_t>(), a.weight.const_data_ptr<scalar_t>(),
               a.bias.const_data_ptr<scalar_t>(), a.merge.const_data_ptr<scalar_t>(),
               a.u_bias.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
               attention_tiny<acc_t>(v.scalar_type()), tp.geo);
      });
      return;
    }
    at::Tensor hn, hd;
    std::tie(hn, hd) = attention_states<scalar_t, acc_t>(a, launch, target_ctas);
    launch(attn_cuda::attn_merge_kernel<scalar_t, acc_t>, dim3(lanes_cuda::merge_blocks(n)),
           dim3(attn_cuda::kMergeThreads), size_t{0}, hn.const_data_ptr<acc_t>(), hd.const_data_ptr<acc_t>(),
           a.q.const_data_ptr<scalar_t>(), a.merge.const_data_ptr<scalar_t>(), a.u_bias.const_data_ptr<scalar_t>(),
           out.mutable_data_ptr<scalar_t>(), n, a.E, a.K, attention_tiny<acc_t>(v.scalar_type()));
  });
  return out;
}

using AttentionGradsTuple =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

template <typename Launch>
AttentionGradsTuple attention_cuda_bwd(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                       const at::Tensor& v, const at::Tensor& proxy, const at::Tensor& weight,
                                       const at::Tensor& bias, const at::Tensor& merge, const at::Tensor& u_bias,
                                       const std::vector<std::string>& directions, int64_t chunk_size,
                                       Launch&& launch, int64_t target_ctas = lanes_cuda::kTargetCtas) {
  const AttentionArgs a =
      attention_args(q, k, v, proxy, weight, bias, merge, u_bias, directions, chunk_size, "gspn attention_bwd");
  TORCH_CHECK(grad_out.sizes() == v.sizes() && grad_out.scalar_type() == v.scalar_type() &&
                  grad_out.device() == v.device(),
              "gspn attention_bwd: grad_out must have the shape, dtype and device of v");
  const int64_t n = a.v.numel(), S = a.S, R = a.K * 3 * a.E, pixels = a.B * a.H * a.W;
  const at::ScalarType dtype = v.scalar_type();
  if (n == 0) {
    return {at::zeros_like(a.q),      at::zeros_like(a.k),    at::zeros_like(a.v),
            at::zeros_like(a.proxy),  at::zeros_like(a.weight), at::zeros_like(a.bias),
            at::zeros_like(a.merge),  at::zeros_like(a.u_bias)};
  }
  const at::Tensor gy = grad_out.contiguous();
  AttentionGradsTuple out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "gspn_attention_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t tiny = attention_tiny<acc_t>(dtype);
    const auto acc = a.v.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    at::Tensor hn, hd;
    std::tie(hn, hd) = attention_states<scalar_t, acc_t>(a, launch, target_ctas);
    at::Tensor dnum = at::empty({n}, acc), dden = at::empty({n}, acc), dgq = at::empty({n}, acc);
    const dim3 mgrid(lanes_cuda::merge_blocks(n)), mblock(attn_cuda::kMergeThreads);
    launch(attn_cuda::attn_prep_kernel<scalar_t, acc_t>, mgrid, mblock, size_t{0}, gy.const_data_ptr<scalar_t>(),
           hn.const_data_ptr<acc_t>(), hd.const_data_ptr<acc_t>(), a.q.const_data_ptr<scalar_t>(),
           a.merge.const_data_ptr<scalar_t>(), a.u_bias.const_data_ptr<scalar_t>(), dnum.mutable_data_ptr<acc_t>(),
           dden.mutable_data_ptr<acc_t>(), dgq.mutable_data_ptr<acc_t>(), n, a.E, a.K, tiny);
    const lanes_cuda::LanesPlan p = plan_attention_launch<acc_t>(a, /*backward=*/true, target_ctas);
    const int64_t zb = a.B * p.geo.zruns;
    at::Tensor ws = launch_workspace<acc_t>(p.ws_elems, a.v);
    at::Tensor dv_part = at::empty({a.K, n}, acc), dlam_part = at::empty({a.K, n}, acc);
    at::Tensor dproxy_part = at::empty({a.K * p.geo.groups, pixels * S}, acc);
    at::Tensor dwb_part = at::zeros({zb, R * (S + 1)}, acc);
    at::Tensor dm_part = at::zeros({zb, a.K * a.E}, acc);
    with_lane_capacity(S, [&](auto cap) {
      launch(attn_cuda::attn_bwd_kernel<scalar_t, acc_t, decltype(cap)::value>, dim3(p.grid[0], p.grid[1], p.grid[2]),
             dim3(p.block[0], p.block[1]), p.shared_bytes, dnum.const_data_ptr<acc_t>(), dden.const_data_ptr<acc_t>(),
             hn.const_data_ptr<acc_t>(), hd.const_data_ptr<acc_t>(), a.k.const_data_ptr<scalar_t>(),
             a.v.const_data_ptr<scalar_t>(), a.proxy.const_data_ptr<scalar_t>(), a.weight.const_data_ptr<scalar_t>(),
             a.bias.const_data_ptr<scalar_t>(), a.merge.const_data_ptr<scalar_t>(), dv_part.mutable_data_ptr<acc_t>(),
             dlam_part.mutable_data_ptr<acc_t>(), dproxy_part.mutable_data_ptr<acc_t>(),
             dwb_part.mutable_data_ptr<acc_t>(), dm_part.mutable_data_ptr<acc_t>(), workspace_data<acc_t>(ws), p.geo);
    });
    at::Tensor dv = at::empty_like(a.v), dk = at::empty_like(a.v);
    launch(attn_cuda::attn_bwd_merge_kernel<scalar_t, acc_t>, mgrid, mblock, size_t{0},
           dv_part.const_data_ptr<acc_t>(), dlam_part.const_data_ptr<acc_t>(), a.k.const_data_ptr<scalar_t>(),
           dv.mutable_data_ptr<scalar_t>(), dk.mutable_data_ptr<scalar_t>(), n, a.K);
    // the partial sums added in a fixed order (deterministic)
    const at::Tensor dq = dgq.view(a.v.sizes()).to(dtype);
    const at::Tensor dub = dgq.view({pixels, a.E}).sum(0).to(dtype);
    const at::Tensor dproxy = dproxy_part.sum(0).view({a.B, a.H, a.W, S}).to(dtype);
    const at::Tensor dwb = dwb_part.sum(0).view({R, S + 1});
    const at::Tensor dweight = dwb.narrow(1, 0, S).to(dtype).contiguous();
    const at::Tensor dbias = dwb.select(1, S).to(dtype).contiguous();
    const at::Tensor dmerge = dm_part.sum(0).view({a.K, a.E}).to(dtype);
    out = {dq, dk, dv, dproxy, dweight, dbias, dmerge, dub};
  });
  return out;
}

}  // namespace gspn
