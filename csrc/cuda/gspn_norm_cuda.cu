// CUDA registration of the fused LayerNorm + GRN op (layer_norm_grn_fwd / _bwd): the op is
// gspn_norm_plan.h's norm_cuda_fwd / norm_cuda_bwd (which the test suite's host emulation runs too)
// with the CUDA launch; the kernels are gspn_norm_kernels.h.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "gspn_cuda_launch.h"
#include "gspn_norm_plan.h"

namespace gspn {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_grn_fwd_cuda(
    const at::Tensor& y, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& gamma,
    const at::Tensor& beta, double eps, double grn_eps) {
  const c10::cuda::CUDAGuard guard(y.device());
  return norm_cuda_fwd(y, weight, bias, gamma, beta, eps, grn_eps, CudaLaunch{});
}

NormGrads layer_norm_grn_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& y, const at::Tensor& weight,
                                  const at::Tensor& bias, const at::Tensor& gamma, const at::Tensor& beta,
                                  const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& gnorm,
                                  double grn_eps) {
  const c10::cuda::CUDAGuard guard(y.device());
  return norm_cuda_bwd(grad_out, y, weight, bias, gamma, beta, mean, rstd, gnorm, grn_eps, CudaLaunch{});
}

}  // namespace
}  // namespace gspn

TORCH_LIBRARY_IMPL(gspn_lightning, CUDA, m) {
  m.impl("layer_norm_grn_fwd", &gspn::layer_norm_grn_fwd_cuda);
  m.impl("layer_norm_grn_bwd", &gspn::layer_norm_grn_bwd_cuda);
}
