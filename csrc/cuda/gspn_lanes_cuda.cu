// Launcher and CUDA registration of the channels-last propagate_proj kernels (gspn_lanes_kernels.h)
// and of the attention kernels of the SD-XL swap (gspn_attention_kernels.h, the whole op in
// gspn_cuda_plan.h's attention_cuda_fwd / _bwd), with the local tile kernels of chunked layers
// (gspn_tile_kernels.h) in their forwards and propagate_proj's backward.
// The op itself — channels-last arguments, plan, workspaces, partial buffers, the kernel sequence and
// the final sums — is gspn_cuda_plan.h's lanes_proj_fwd / lanes_proj_bwd, which the test suite's
// host emulation runs too; this file gives it the CUDA launch (<<<...>>> on the current stream) and,
// for proxies of more than kMaxLaneS (16) channels, the per-plane propagate kernels
// (gspn_propagate_cuda.cu) on materialised logits.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>
#include <tuple>
#include <vector>

#include "gspn_cuda.h"
#include "gspn_cuda_launch.h"
#include "gspn_cuda_plan.h"

namespace gspn {
namespace {

// GSPN_CUDA_FORWARD=lanes / tile picks the forward kernel of chunked layers (gspn_cuda_plan.h
// ForwardKernel; unset or anything else: the dispatch rule), read at every call: for side-by-side
// benchmarks in one process (benchmarks/gpu_check/tile.py).
ForwardKernel forward_kernel_from_env() {
  const char* v = std::getenv("GSPN_CUDA_FORWARD");
  const std::string s = v == nullptr ? "" : v;
  return s == "lanes" ? ForwardKernel::kLanes : (s == "tile" ? ForwardKernel::kTile : ForwardKernel::kAuto);
}

// GSPN_CUDA_BACKWARD=lanes / tile likewise for propagate_proj's backward (BackwardKernel).
BackwardKernel backward_kernel_from_env() {
  const char* v = std::getenv("GSPN_CUDA_BACKWARD");
  const std::string s = v == nullptr ? "" : v;
  return s == "lanes" ? BackwardKernel::kLanes : (s == "tile" ? BackwardKernel::kTile : BackwardKernel::kAuto);
}

at::Tensor propagate_proj_fwd_cuda(const at::Tensor& x, const at::Tensor& proxy, const at::Tensor& weight,
                                   const at::Tensor& bias, const at::Tensor& merge,
                                   std::vector<std::string> directions, int64_t chunk_size) {
  const c10::cuda::CUDAGuard guard(x.device());
  return lanes_proj_fwd(x, proxy, weight, bias, merge, directions, chunk_size, CudaLaunch{},
                        [](const at::Tensor& x_, const at::Tensor& gates, const at::Tensor& m,
                           const std::vector<std::string>& d, int64_t c) { return propagate_fwd_cuda(x_, gates, m, d, c); },
                        lanes_cuda::kTargetCtas, forward_kernel_from_env());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> propagate_proj_bwd_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& proxy, const at::Tensor& weight,
    const at::Tensor& bias, const at::Tensor& merge, std::vector<std::string> directions, int64_t chunk_size) {
  const c10::cuda::CUDAGuard guard(x.device());
  return lanes_proj_bwd(grad_y, x, proxy, weight, bias, merge, directions, chunk_size, CudaLaunch{},
                        [](const at::Tensor& gy, const at::Tensor& x_, const at::Tensor& gates, const at::Tensor& m,
                           const std::vector<std::string>& d,
                           int64_t c) { return propagate_bwd_cuda(gy, x_, gates, m, d, c); },
                        lanes_cuda::kTargetCtas, backward_kernel_from_env());
}

at::Tensor attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& proxy,
                              const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& merge,
                              const at::Tensor& u_bias, std::vector<std::string> directions, int64_t chunk_size) {
  const c10::cuda::CUDAGuard guard(v.device());
  return attention_cuda_fwd(q, k, v, proxy, weight, bias, merge, u_bias, directions, chunk_size, CudaLaunch{},
                            lanes_cuda::kTargetCtas, forward_kernel_from_env());
}

AttentionGradsTuple attention_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                       const at::Tensor& v, const at::Tensor& proxy, const at::Tensor& weight,
                                       const at::Tensor& bias, const at::Tensor& merge, const at::Tensor& u_bias,
                                       std::vector<std::string> directions, int64_t chunk_size) {
  const c10::cuda::CUDAGuard guard(v.device());
  return attention_cuda_bwd(grad_out, q, k, v, proxy, weight, bias, merge, u_bias, directions, chunk_size,
                            CudaLaunch{});
}

}  // namespace
}  // namespace gspn

TORCH_LIBRARY_IMPL(gspn_lightning, CUDA, m) {
  m.impl("propagate_proj_fwd", &gspn::propagate_proj_fwd_cuda);
  m.impl("propagate_proj_bwd", &gspn::propagate_proj_bwd_cuda);
  m.impl("attention_fwd", &gspn::attention_fwd_cuda);
  m.impl("attention_bwd", &gspn::attention_bwd_cuda);
}
