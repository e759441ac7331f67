// The CUDA kernels of csrc/cuda, executed on the CPU under the host emulation (cuda_host_emu.h), as
// torch ops `torch.ops.gspn_cuda_emu.*` on CPU tensors: the scan and the per-plane fused propagation
// in float32 and float64, the channels-last propagate_proj kernels in every dtype the CUDA op takes
// (c10::BFloat16 and c10::Half are plain host types; the kernels use no 16-bit intrinsics), and the
// fused LayerNorm + GRN likewise.
//
// Each op does what the CUDA binding and launcher do (gspn_cuda.cpp, gspn_cuda.cu,
// gspn_propagate_cuda.cu, gspn_lanes_cuda.cu): the same layout code (gspn_layout.h), the same launch
// plan and workspaces (gspn_cuda_plan.h; for propagate_proj the whole op), then the kernels through
// cuda_emu::launch instead of <<<...>>>.  Built by tests/cuda_emu/__init__.py.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "gspn_layout.h"  // (ATen) before the emulation's macros

#include "cuda_host_emu.h"

// The kernels see the device side of gspn_step.h (gexp is expf / exp, as on a GPU).
#define __CUDA_ARCH__ 900
#include "cuda/gspn_attention_kernels.h"
#include "cuda/gspn_lanes_kernels.h"
#include "cuda/gspn_norm_kernels.h"
#include "cuda/gspn_propagate_kernels.h"
#include "cuda/gspn_scan_kernels.h"
#include "cuda/gspn_tile_kernels.h"
#undef __CUDA_ARCH__

#include "cuda/gspn_cuda_plan.h"
#include "cuda/gspn_norm_plan.h"

#include "emu_selftest.h"

namespace gspn_emu {
namespace {

using gspn::PropagateArgs;
using gspn::ScanArgs;

template <typename Fn>
void dispatch(at::ScalarType t, const char* name, Fn&& fn) {
  TORCH_CHECK(t == at::kFloat || t == at::kDouble, name,
              ": the CUDA emulation runs float32 and float64 only (no 16-bit types on the host)");
  if (t == at::kFloat) {
    fn(float(0));
  } else {
    fn(double(0));
  }
}

// ---- the scan (gspn_cuda.cu) ----

// Calls `launch(plan, geometry)` with the workspace the plan asks for (acc_t = scalar_t here).
template <typename scalar_t, typename Launch>
void with_scan_plan(const ScanArgs& a, Launch&& launch) {
  const auto p = gspn::plan_scan_launch<scalar_t>(a);
  at::Tensor ws = gspn::launch_workspace<scalar_t>(p.ws_elems, a.x);
  const auto geo =
      gspn::scan_cuda::make_geometry<scalar_t>(p, a.N, a.L, a.M, a.k, a.reverse, gspn::workspace_data<scalar_t>(ws));
  launch(p, geo);
}

void emu_scan_fwd_launch(const ScanArgs& a, at::Tensor& h) {
  dispatch(a.x.scalar_type(), "gspn_cuda_emu.scan_fwd", [&](auto zero) {
    using scalar_t = decltype(zero);
    with_scan_plan<scalar_t>(a, [&](const auto& p, const auto& geo) {
      cuda_emu::launch(gspn::scan_cuda::gspn_scan_fwd_kernel<scalar_t, scalar_t>, dim3(p.blocks), dim3(p.threads),
                       p.shared_bytes, a.x.const_data_ptr<scalar_t>(), a.lam.const_data_ptr<scalar_t>(),
                       a.wn.const_data_ptr<scalar_t>(), a.wm.const_data_ptr<scalar_t>(),
                       a.wp.const_data_ptr<scalar_t>(), h.mutable_data_ptr<scalar_t>(), geo);
    });
  });
}

void emu_scan_bwd_launch(const ScanArgs& a, const at::Tensor& grad_h, const at::Tensor& h, at::Tensor& dx,
                         at::Tensor& dlam, at::Tensor& dwn, at::Tensor& dwm, at::Tensor& dwp) {
  dispatch(a.x.scalar_type(), "gspn_cuda_emu.scan_bwd", [&](auto zero) {
    using scalar_t = decltype(zero);
    with_scan_plan<scalar_t>(a, [&](const auto& p, const auto& geo) {
      cuda_emu::launch(gspn::scan_cuda::gspn_scan_bwd_kernel<scalar_t, scalar_t>, dim3(p.blocks), dim3(p.threads),
                       p.shared_bytes, grad_h.const_data_ptr<scalar_t>(), a.x.const_data_ptr<scalar_t>(),
                       a.lam.const_data_ptr<scalar_t>(), a.wn.const_data_ptr<scalar_t>(),
                       a.wm.const_data_ptr<scalar_t>(), a.wp.const_data_ptr<scalar_t>(), h.const_data_ptr<scalar_t>(),
                       dx.mutable_data_ptr<scalar_t>(), dlam.mutable_data_ptr<scalar_t>(),
                       dwn.mutable_data_ptr<scalar_t>(), dwm.mutable_data_ptr<scalar_t>(),
                       dwp.mutable_data_ptr<scalar_t>(), geo);
    });
  });
}

// What gspn_cuda.cpp's scan_fwd_cuda / scan_bwd_cuda do, with the emulated launchers.
at::Tensor scan_fwd(const at::Tensor& x, const at::Tensor& lam, const at::Tensor& w_neg, const at::Tensor& w_mid,
                    const at::Tensor& w_pos, c10::string_view direction, int64_t chunk_size) {
  return gspn::scan_forward(x, lam, w_neg, w_mid, w_pos, direction, chunk_size, /*transpose_copy=*/true,
                            emu_scan_fwd_launch);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> scan_bwd(
    const at::Tensor& grad_h, const at::Tensor& x, const at::Tensor& lam, const at::Tensor& w_neg,
    const at::Tensor& w_mid, const at::Tensor& w_pos, const at::Tensor& h, c10::string_view direction,
    int64_t chunk_size) {
  return gspn::scan_backward(grad_h, x, lam, w_neg, w_mid, w_pos, h, direction, chunk_size, /*transpose_copy=*/true,
                             emu_scan_bwd_launch);
}

// (lines, threads, blocks, shared_bytes, global workspace) of the scan's launch, for the tests.
std::vector<int64_t> scan_plan_info(const at::Tensor& x, c10::string_view direction, int64_t chunk_size) {
  const gspn::Direction dir = gspn::parse_direction(direction);
  const ScanArgs a = gspn::canonical_args(x, x, x, x, x, dir, chunk_size, /*transpose_copy=*/true);
  std::vector<int64_t> out;
  dispatch(x.scalar_type(), "gspn_cuda_emu.scan_plan", [&](auto zero) {
    const auto p = gspn::plan_scan_launch<decltype(zero)>(a);
    out = {p.lines, p.threads, p.blocks, static_cast<int64_t>(p.shared_bytes), p.global_ws};
  });
  return out;
}

// ---- the fused propagation (gspn_propagate_cuda.cu) ----

// gspn_propagate_cuda.cu's launch_planned, with `staging` in place of GSPN_CUDA_STAGE: calls
// `launch(plan, ws)`.
template <typename scalar_t, typename acc_t, typename Launch>
void launch_planned(const PropagateArgs& a, bool backward, bool staging, std::initializer_list<const void*> pointers,
                    Launch&& launch) {
  const auto plan = gspn::plan_propagate_launch<scalar_t, acc_t>(a, backward, staging, pointers);
  at::Tensor ws = gspn::launch_workspace<acc_t>(plan.ws_elems, a.x);
  launch(plan, plan.staged ? nullptr : gspn::workspace_data<acc_t>(ws));
}

at::Tensor propagate_fwd(const at::Tensor& x, const at::Tensor& gates, const at::Tensor& merge,
                         std::vector<std::string> directions, int64_t chunk_size, bool staging) {
  const PropagateArgs a = gspn::propagate_args(x, gates, merge, directions, chunk_size, "gspn propagate_fwd");
  at::Tensor y = at::empty(a.x.sizes(), a.x.options());  // opmath of float / double is itself
  if (y.numel() == 0) return y;
  dispatch(x.scalar_type(), "gspn_cuda_emu.propagate_fwd", [&](auto zero) {
    using scalar_t = decltype(zero);
    const scalar_t* xp = a.x.const_data_ptr<scalar_t>();
    const scalar_t* gp = a.gates.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    launch_planned<scalar_t, scalar_t>(a, false, staging, {xp, gp, yp}, [&](const auto& plan, scalar_t* ws) {
      const scalar_t* mp = a.merge.const_data_ptr<scalar_t>();
      if (plan.staged) {
        cuda_emu::launch(gspn::propagate_cuda::propagate_fwd_kernel<scalar_t, scalar_t, true>, dim3(plan.blocks),
                         dim3(plan.threads), plan.shared_bytes, xp, gp, mp, yp, ws, plan.geo);
      } else {
        cuda_emu::launch(gspn::propagate_cuda::propagate_fwd_kernel<scalar_t, scalar_t, false>, dim3(plan.blocks),
                         dim3(plan.threads), plan.shared_bytes, xp, gp, mp, yp, ws, plan.geo);
      }
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> propagate_bwd(const at::Tensor& grad_y, const at::Tensor& x,
                                                             const at::Tensor& gates, const at::Tensor& merge,
                                                             std::vector<std::string> directions, int64_t chunk_size,
                                                             bool staging) {
  const PropagateArgs a = gspn::propagate_args(x, gates, merge, directions, chunk_size, "gspn propagate_bwd");
  TORCH_CHECK(grad_y.sizes() == x.sizes() && grad_y.scalar_type() == x.scalar_type(),
              "gspn propagate_bwd: grad_y must have the shape and dtype of x");
  const at::Tensor gy = grad_y.contiguous();
  at::Tensor dx = at::empty(a.x.sizes(), a.x.options()), dgates = at::empty_like(a.gates);
  at::Tensor dm_partial = at::zeros({a.B, a.C, a.K}, a.x.options());
  if (x.numel() > 0) {
    dispatch(x.scalar_type(), "gspn_cuda_emu.propagate_bwd", [&](auto zero) {
      using scalar_t = decltype(zero);
      const scalar_t* gyp = gy.const_data_ptr<scalar_t>();
      const scalar_t* xp = a.x.const_data_ptr<scalar_t>();
      const scalar_t* gp = a.gates.const_data_ptr<scalar_t>();
      scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
      scalar_t* dgp = dgates.mutable_data_ptr<scalar_t>();
      launch_planned<scalar_t, scalar_t>(a, true, staging, {gyp, xp, gp, dxp, dgp}, [&](const auto& plan, scalar_t* ws) {
        const scalar_t* mp = a.merge.const_data_ptr<scalar_t>();
        scalar_t* dmp = dm_partial.mutable_data_ptr<scalar_t>();
        if (plan.staged) {
          cuda_emu::launch(gspn::propagate_cuda::propagate_bwd_kernel<scalar_t, scalar_t, true>, dim3(plan.blocks),
                           dim3(plan.threads), plan.shared_bytes, gyp, xp, gp, mp, dxp, dgp, dmp, nullptr, ws,
                           plan.geo);
        } else {
          // unstaged blocks recompute h into a global float workspace of one plane per block
          at::Tensor h_ws = at::empty(a.x.sizes(), dx.options());
          cuda_emu::launch(gspn::propagate_cuda::propagate_bwd_kernel<scalar_t, scalar_t, false>, dim3(plan.blocks),
                           dim3(plan.threads), plan.shared_bytes, gyp, xp, gp, mp, dxp, dgp, dmp,
                           h_ws.mutable_data_ptr<scalar_t>(), ws, plan.geo);
        }
      });
    });
  }
  return {dx, dgates, gspn::merge_grad(dm_partial, x.scalar_type())};
}

// (staged, planes per block, threads, blocks, shared_bytes, global workspace, 16-byte copies) of the
// fused op's launch, for the tests.
std::vector<int64_t> propagate_plan_info(const at::Tensor& x, const at::Tensor& gates, const at::Tensor& merge,
                                         std::vector<std::string> directions, int64_t chunk_size, bool backward,
                                         bool staging) {
  const PropagateArgs a = gspn::propagate_args(x, gates, merge, directions, chunk_size, "gspn propagate_plan");
  std::vector<int64_t> out;
  dispatch(x.scalar_type(), "gspn_cuda_emu.propagate_plan", [&](auto zero) {
    using scalar_t = decltype(zero);
    // the tensors the launch would see: x and the gates (and, like them, freshly allocated outputs)
    launch_planned<scalar_t, scalar_t>(a, backward, staging, {a.x.const_data_ptr(), a.gates.const_data_ptr()},
                                       [&](const auto& plan, scalar_t*) {
                                         out = {plan.staged,
                                                plan.geo.ppb,
                                                plan.threads,
                                                plan.blocks,
                                                static_cast<int64_t>(plan.shared_bytes),
                                                plan.ws_elems > 0,
                                                plan.geo.vec};
                                       });
  });
  return out;
}


// ---- the channels-last propagate_proj kernels (gspn_lanes_cuda.cu) ----

// gspn_lanes_cuda.cu's launch, through the emulation.
struct EmuLaunch {
  template <typename... Params, typename... Args>
  void operator()(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, Args&&... args) const {
    cuda_emu::launch(kernel, grid, block, shared_bytes, std::forward<Args>(args)...);
  }
};

// What gspn_lanes_cuda.cu's bindings do (gspn_cuda_plan.h's lanes_proj_fwd / _bwd, every dtype the
// CUDA op takes: c10::BFloat16 and c10::Half are host types too), with the emulated per-plane kernels
// (staged where they fit) for proxies of more than 16 channels.  `target_ctas` is the plan's CTA
// target (gspn_lanes_kernels.h, kTargetCtas = 264 on the GPU): small shapes reach every G and run
// layout with it.
at::Tensor propagate_proj_fwd(const at::Tensor& x, const at::Tensor& proxy, const at::Tensor& weight,
                              const at::Tensor& bias, const at::Tensor& merge, std::vector<std::string> directions,
                              int64_t chunk_size, int64_t target_ctas, int64_t forward_kernel) {
  return gspn::lanes_proj_fwd(x, proxy, weight, bias, merge, directions, chunk_size, EmuLaunch{},
                              [](const at::Tensor& x_, const at::Tensor& g, const at::Tensor& m,
                                 const std::vector<std::string>& d, int64_t c) { return propagate_fwd(x_, g, m, d, c, true); },
                              target_ctas, gspn::forward_kernel(forward_kernel));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> propagate_proj_bwd(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& proxy, const at::Tensor& weight,
    const at::Tensor& bias, const at::Tensor& merge, std::vector<std::string> directions, int64_t chunk_size,
    int64_t target_ctas, int64_t backward_kernel) {
  return gspn::lanes_proj_bwd(grad_y, x, proxy, weight, bias, merge, directions, chunk_size, EmuLaunch{},
                              [](const at::Tensor& gy, const at::Tensor& x_, const at::Tensor& g, const at::Tensor& m,
                                 const std::vector<std::string>& d,
                                 int64_t c) { return propagate_bwd(gy, x_, g, m, d, c, true); },
                              target_ctas, gspn::backward_kernel(backward_kernel));
}

// (G, P, channel groups, runs per batch element, chunks per run, shared bytes, global line buffers,
// global workspace elements) of the lane kernels' launch, for the tests.
std::vector<int64_t> propagate_proj_plan_info(const at::Tensor& x, const at::Tensor& proxy,
                                              std::vector<std::string> directions, int64_t chunk_size,
                                              bool backward, int64_t target_ctas) {
  const int64_t K = static_cast<int64_t>(directions.size()), R = K * 6 * x.size(1);
  const at::Tensor weight = at::zeros({R, proxy.size(1)}, x.options()), bias = at::zeros({R}, x.options());
  const at::Tensor merge = at::zeros({K, x.size(1)}, x.options());
  const gspn::ProjArgs pa = gspn::lanes_args(x, proxy, weight, bias, merge, directions, chunk_size, "gspn plan");
  std::vector<int64_t> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gspn_lanes_plan", [&] {
    const auto p = gspn::plan_lanes_launch<at::opmath_type<scalar_t>>(pa, backward, target_ctas);
    out = {p.geo.G,         p.geo.P, p.geo.groups, p.geo.zruns, p.geo.cpr, static_cast<int64_t>(p.shared_bytes),
           p.geo.global_lines, p.ws_elems};
  });
  return out;
}

}  // namespace
}  // namespace gspn_emu

namespace gspn_emu {

// ---- the attention kernels of the SD-XL swap (gspn_attention_kernels.h, bound in gspn_lanes_cuda.cu) ----

at::Tensor attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& proxy,
                         const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& merge,
                         const at::Tensor& u_bias, std::vector<std::string> directions, int64_t chunk_size,
                         int64_t target_ctas, int64_t forward_kernel) {
  return gspn::attention_cuda_fwd(q, k, v, proxy, weight, bias, merge, u_bias, directions, chunk_size, EmuLaunch{},
                                  target_ctas, gspn::forward_kernel(forward_kernel));
}

gspn::AttentionGradsTuple attention_bwd(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                        const at::Tensor& v, const at::Tensor& proxy, const at::Tensor& weight,
                                        const at::Tensor& bias, const at::Tensor& merge, const at::Tensor& u_bias,
                                        std::vector<std::string> directions, int64_t chunk_size,
                                        int64_t target_ctas) {
  return gspn::attention_cuda_bwd(grad_out, q, k, v, proxy, weight, bias, merge, u_bias, directions, chunk_size,
                                  EmuLaunch{}, target_ctas);
}

// (G, P, channel groups, runs per batch element, chunks per run, shared bytes, global line buffers,
// global workspace elements) of the attention kernels' launch, for the tests.
std::vector<int64_t> attention_plan_info(const at::Tensor& v, int64_t S, std::vector<std::string> directions,
                                         int64_t chunk_size, bool backward, int64_t target_ctas) {
  const int64_t K = static_cast<int64_t>(directions.size()), E = v.size(3);
  const at::Tensor proxy = at::zeros({v.size(0), v.size(1), v.size(2), S}, v.options());
  const at::Tensor weight = at::zeros({K * 3 * E, S}, v.options()), bias = at::zeros({K * 3 * E}, v.options());
  const at::Tensor merge = at::zeros({K, E}, v.options()), ub = at::zeros({E}, v.options());
  const gspn::AttentionArgs a =
      gspn::attention_args(v, v, v, proxy, weight, bias, merge, ub, directions, chunk_size, "gspn plan");
  std::vector<int64_t> info;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "gspn_attention_plan", [&] {
    const auto p = gspn::plan_attention_launch<at::opmath_type<scalar_t>>(a, backward, target_ctas);
    info = {p.geo.G, p.geo.P, p.geo.groups, p.geo.zruns, p.geo.cpr, static_cast<int64_t>(p.shared_bytes),
            p.geo.global_lines ? 1 : 0, p.ws_elems};
  });
  return info;
}

// (uses the tile kernel by the dispatch rule, G, P, channel groups, TH, TW, tiles, shared bytes) of
// the tile kernels' launch over (B, C, H, W) maps with an S-channel proxy (`states` 1: propagate_proj's
// forward, 2: attention's, 0: propagate_proj's backward, tile_bwd_kernel), for the tests.
std::vector<int64_t> tile_plan_info(const at::Tensor& x, int64_t S, std::vector<std::string> directions,
                                    int64_t chunk_size, int64_t states, int64_t target_ctas) {
  const bool backward = states == 0;
  std::vector<gspn::Direction> dirs;
  for (const auto& d : directions) dirs.push_back(gspn::parse_direction(d));
  const int64_t chunk = chunk_size <= 0 ? 0 : chunk_size;
  std::vector<int64_t> info;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gspn_tile_plan", [&] {
    const auto p = gspn::plan_tile_launch<at::opmath_type<scalar_t>>(
        x.size(0), x.size(1), x.size(2), x.size(3), dirs, chunk, S, backward ? 1 : static_cast<int>(states),
        target_ctas, backward);
    const bool tile =
        backward ? gspn::use_tile_upto(gspn::ForwardKernel::kAuto, p, chunk, S, gspn::lanes_cuda::kMaxLaneS, "plan")
                 : gspn::use_tile(gspn::ForwardKernel::kAuto, p, chunk, S, static_cast<int>(states), "plan");
    info = {tile ? 1 : 0, p.geo.G, p.geo.P, p.geo.groups, p.geo.TH, p.geo.TW, static_cast<int64_t>(p.grid[0]),
            static_cast<int64_t>(p.shared_bytes)};
  });
  return info;
}

}  // namespace gspn_emu

namespace gspn_emu {

// ---- the fused LayerNorm + GRN (gspn_norm_kernels.h, bound in gspn_norm_cuda.cu) ----

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_grn_fwd(
    const at::Tensor& y, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& gamma,
    const at::Tensor& beta, double eps, double grn_eps, int64_t target_ctas) {
  return gspn::norm_cuda_fwd(y, weight, bias, gamma, beta, eps, grn_eps, EmuLaunch{}, target_ctas);
}

gspn::NormGrads layer_norm_grn_bwd(const at::Tensor& grad_out, const at::Tensor& y, const at::Tensor& weight,
                                   const at::Tensor& bias, const at::Tensor& gamma, const at::Tensor& beta,
                                   const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& gnorm,
                                   double grn_eps, int64_t target_ctas) {
  return gspn::norm_cuda_bwd(grad_out, y, weight, bias, gamma, beta, mean, rstd, gnorm, grn_eps, EmuLaunch{},
                             target_ctas);
}

// (tiles, pixels per tile, warps, shared bytes) of the pixel kernels' launch for y, the forward's
// (values = 1) or the backward's (values = 2), for the tests.
std::vector<int64_t> layer_norm_grn_plan(const at::Tensor& y, int64_t values, int64_t target_ctas) {
  std::vector<int64_t> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "gspn_norm_plan", [&] {
    const auto p = gspn::norm_cuda::plan_norm_launch<at::opmath_type<scalar_t>>(
        y.size(0), y.size(1), y.size(2) * y.size(3), 1e-6, 1e-6, static_cast<int>(values), target_ctas);
    out = {p.geo.tiles, p.geo.tile, p.warps, static_cast<int64_t>(p.shared_bytes)};
  });
  return out;
}

}  // namespace gspn_emu

TORCH_LIBRARY(gspn_cuda_emu, m) {
  m.def("tile_plan", &gspn_emu::tile_plan_info);
  m.def("scan_fwd", &gspn_emu::scan_fwd);
  m.def("scan_bwd", &gspn_emu::scan_bwd);
  m.def("scan_plan", &gspn_emu::scan_plan_info);
  m.def("propagate_fwd", &gspn_emu::propagate_fwd);
  m.def("propagate_bwd", &gspn_emu::propagate_bwd);
  m.def("propagate_plan", &gspn_emu::propagate_plan_info);
  m.def("propagate_proj_fwd", &gspn_emu::propagate_proj_fwd);
  m.def("propagate_proj_bwd", &gspn_emu::propagate_proj_bwd);
  m.def("propagate_proj_plan", &gspn_emu::propagate_proj_plan_info);
  m.def("attention_fwd", &gspn_emu::attention_fwd);
  m.def("attention_bwd", &gspn_emu::attention_bwd);
  m.def("attention_plan", &gspn_emu::attention_plan_info);
  m.def("layer_norm_grn_fwd", &gspn_emu::layer_norm_grn_fwd);
  m.def("layer_norm_grn_bwd", &gspn_emu::layer_norm_grn_bwd);
  m.def("layer_norm_grn_plan", &gspn_emu::layer_norm_grn_plan);
  gspn_emu::register_selftests(m);
}
