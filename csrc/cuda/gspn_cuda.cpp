// CUDA bindings of the GSPN scan: device guard, layout, then the launchers in gspn_cuda.cu.
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

#include "gspn_cuda.h"

namespace gspn {
namespace {

at::Tensor scan_fwd_cuda(const at::Tensor& x, const at::Tensor& lam, const at::Tensor& w_neg,
                         const at::Tensor& w_mid, const at::Tensor& w_pos, c10::string_view direction,
                         int64_t chunk_size) {
  const c10::cuda::CUDAGuard guard(x.device());
  return scan_forward(x, lam, w_neg, w_mid, w_pos, direction, chunk_size, /*transpose_copy=*/true,
                      launch_scan_fwd_cuda);
}

Grads scan_bwd_cuda(const at::Tensor& grad_h, const at::Tensor& x, const at::Tensor& lam,
                    const at::Tensor& w_neg, const at::Tensor& w_mid, const at::Tensor& w_pos, const at::Tensor& h,
                    c10::string_view direction, int64_t chunk_size) {
  const c10::cuda::CUDAGuard guard(x.device());
  return scan_backward(grad_h, x, lam, w_neg, w_mid, w_pos, h, direction, chunk_size, /*transpose_copy=*/true,
                       launch_scan_bwd_cuda);
}

}  // namespace

// The per-plane fused propagation ops (also the fallback of propagate_proj for large proxies,
// gspn_lanes_cuda.cu).
at::Tensor propagate_fwd_cuda(const at::Tensor& x, const at::Tensor& gates, const at::Tensor& merge,
                              std::vector<std::string> directions, int64_t chunk_size) {
  const c10::cuda::CUDAGuard guard(x.device());
  const PropagateArgs a = propagate_args(x, gates, merge, directions, chunk_size, "gspn propagate_fwd");
  at::Tensor y = at::empty(a.x.sizes(), a.x.options().dtype(at::toOpMathType(x.scalar_type())));
  if (y.numel() > 0) launch_propagate_fwd_cuda(a, y);
  return y.to(x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> propagate_bwd_cuda(const at::Tensor& grad_y, const at::Tensor& x,
                                                                  const at::Tensor& gates, const at::Tensor& merge,
                                                                  std::vector<std::string> directions,
                                                                  int64_t chunk_size) {
  const c10::cuda::CUDAGuard guard(x.device());
  const PropagateArgs a = propagate_args(x, gates, merge, directions, chunk_size, "gspn propagate_bwd");
  TORCH_CHECK(grad_y.sizes() == x.sizes() && grad_y.scalar_type() == x.scalar_type() &&
                  grad_y.device() == x.device(),
              "gspn propagate_bwd: grad_y must have the shape, dtype and device of x");
  const auto acc = a.x.options().dtype(at::toOpMathType(x.scalar_type()));
  at::Tensor dx = at::empty(a.x.sizes(), acc), dgates = at::empty_like(a.gates);
  at::Tensor dm_partial = at::zeros({a.B, a.C, a.K}, acc);
  if (x.numel() > 0) launch_propagate_bwd_cuda(a, grad_y.contiguous(), dx, dgates, dm_partial);
  return {dx.to(x.scalar_type()), dgates, merge_grad(dm_partial, x.scalar_type())};
}

}  // namespace gspn

TORCH_LIBRARY_IMPL(gspn_lightning, CUDA, m) {
  m.impl("scan_fwd", &gspn::scan_fwd_cuda);
  m.impl("scan_bwd", &gspn::scan_bwd_cuda);
  m.impl("propagate_fwd", &gspn::propagate_fwd_cuda);
  m.impl("propagate_bwd", &gspn::propagate_bwd_cuda);
}
