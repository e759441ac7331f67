// Launchers of the CUDA kernels of the GSPN scan (the kernels are in gspn_scan_kernels.h, their launch
// plan in gspn_scan_kernels.h and gspn_cuda_plan.h): dtype dispatch, stream and the launch.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "gspn_cuda.h"
#include "gspn_cuda_plan.h"

namespace gspn {
namespace {

// Plans the launch for `a` and calls `launch(grid, threads, shared_bytes, stream, geometry)` for the
// dtype of the tensors, with a global workspace when the line buffers do not fit in shared memory.
template <typename Launch>
void launch_scan(const ScanArgs& a, Launch&& launch) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "gspn_scan_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scan_cuda::LaunchPlan p = plan_scan_launch<acc_t>(a);
    at::Tensor ws = launch_workspace<acc_t>(p.ws_elems, a.x);
    const scan_cuda::Geometry<acc_t> geo =
        scan_cuda::make_geometry<acc_t>(p, a.N, a.L, a.M, a.k, a.reverse, workspace_data<acc_t>(ws));
    launch(scalar_t(0), static_cast<unsigned int>(p.blocks), p.threads, p.shared_bytes, stream, geo);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

void launch_scan_fwd_cuda(const ScanArgs& a, at::Tensor& h) {
  launch_scan(a, [&](auto zero, unsigned int grid, int threads, size_t smem,
                                           cudaStream_t stream, const auto& geo) {
    using scalar_t = decltype(zero);
    using acc_t = at::opmath_type<scalar_t>;
    scan_cuda::gspn_scan_fwd_kernel<scalar_t, acc_t><<<grid, threads, smem, stream>>>(
        a.x.const_data_ptr<scalar_t>(), a.lam.const_data_ptr<scalar_t>(), a.wn.const_data_ptr<scalar_t>(),
        a.wm.const_data_ptr<scalar_t>(), a.wp.const_data_ptr<scalar_t>(), h.mutable_data_ptr<scalar_t>(), geo);
  });
}

void launch_scan_bwd_cuda(const ScanArgs& a, const at::Tensor& grad_h, const at::Tensor& h, at::Tensor& dx,
                          at::Tensor& dlam, at::Tensor& dwn, at::Tensor& dwm, at::Tensor& dwp) {
  launch_scan(a, [&](auto zero, unsigned int grid, int threads, size_t smem,
                                           cudaStream_t stream, const auto& geo) {
    using scalar_t = decltype(zero);
    using acc_t = at::opmath_type<scalar_t>;
    scan_cuda::gspn_scan_bwd_kernel<scalar_t, acc_t><<<grid, threads, smem, stream>>>(
        grad_h.const_data_ptr<scalar_t>(), a.x.const_data_ptr<scalar_t>(), a.lam.const_data_ptr<scalar_t>(),
        a.wn.const_data_ptr<scalar_t>(), a.wm.const_data_ptr<scalar_t>(), a.wp.const_data_ptr<scalar_t>(),
        h.const_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>(), dlam.mutable_data_ptr<scalar_t>(),
        dwn.mutable_data_ptr<scalar_t>(), dwm.mutable_data_ptr<scalar_t>(), dwp.mutable_data_ptr<scalar_t>(), geo);
  });
}

}  // namespace gspn
