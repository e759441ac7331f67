// CUDA bindings of the GSPN scan: device guard, layout, then the launchers in gspn_cuda.cu.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

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
}  // namespace gspn

TORCH_LIBRARY_IMPL(gspn_lightning, CUDA, m) {
  m.impl("scan_fwd", &gspn::scan_fwd_cuda);
  m.impl("scan_bwd", &gspn::scan_bwd_cuda);
}
