// Launchers of the CUDA kernels of the fused GSPN mixer propagation (the kernels and their launch
// plan in gspn_propagate_kernels.h and gspn_cuda_plan.h): dtype dispatch, stream and the launch.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <cstdlib>
#include <initializer_list>
#include <string>

#include "gspn_cuda.h"
#include "gspn_cuda_plan.h"

namespace gspn {
namespace {

using propagate_cuda::PropagateGeometry;

// GSPN_CUDA_STAGE=0 turns staging off (every plane read in place): for side-by-side benchmarks.
bool staging_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("GSPN_CUDA_STAGE");
    return v == nullptr || std::string(v) != "0";
  }();
  return enabled;
}

// Plans the launch over the planes of `a` (gspn_cuda_plan.h) and calls
// `launch(staged, blocks, threads, shared_bytes, stream, geo, ws)`, `staged` a std::bool_constant,
// with a global workspace when an unstaged block's line buffers do not fit in shared memory.
template <typename scalar_t, typename acc_t, typename Launch>
void launch_planned(const PropagateArgs& a, bool backward, std::initializer_list<const void*> pointers,
                    Launch&& launch) {
  const propagate_cuda::PropagatePlan plan =
      plan_propagate_launch<scalar_t, acc_t>(a, backward, staging_enabled(), pointers);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor ws = launch_workspace<acc_t>(plan.ws_elems, a.x);
  if (plan.staged) {
    launch(std::true_type{}, plan.blocks, plan.threads, plan.shared_bytes, stream, plan.geo,
           static_cast<acc_t*>(nullptr));
  } else {
    launch(std::false_type{}, plan.blocks, plan.threads, plan.shared_bytes, stream, plan.geo,
           workspace_data<acc_t>(ws));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Lets `kernel` take `smem` bytes of dynamic shared memory (beyond the default 48 KB).
template <typename Kernel>
void allow_shared(Kernel kernel, size_t smem) {
  if (smem > propagate_cuda::kMaxShared) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
}

}  // namespace

void launch_propagate_fwd_cuda(const PropagateArgs& a, at::Tensor& y_acc) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "gspn_propagate_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = a.x.const_data_ptr<scalar_t>();
    const scalar_t* gates = a.gates.const_data_ptr<scalar_t>();
    acc_t* y = y_acc.mutable_data_ptr<acc_t>();
    launch_planned<scalar_t, acc_t>(
        a, /*backward=*/false, {x, gates, y},
        [&](auto staged, unsigned int blocks, int threads, size_t smem, cudaStream_t stream,
            const PropagateGeometry& geo, acc_t* ws) {
          const auto kernel = propagate_cuda::propagate_fwd_kernel<scalar_t, acc_t, decltype(staged)::value>;
          allow_shared(kernel, smem);
          kernel<<<blocks, threads, smem, stream>>>(x, gates, a.merge.const_data_ptr<scalar_t>(), y, ws, geo);
        });
  });
}

void launch_propagate_bwd_cuda(const PropagateArgs& a, const at::Tensor& grad_y, at::Tensor& dx_acc,
                               at::Tensor& dgates, at::Tensor& dm_partial) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "gspn_propagate_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gy = grad_y.const_data_ptr<scalar_t>();
    const scalar_t* x = a.x.const_data_ptr<scalar_t>();
    const scalar_t* gates = a.gates.const_data_ptr<scalar_t>();
    acc_t* dx = dx_acc.mutable_data_ptr<acc_t>();
    scalar_t* dg = dgates.mutable_data_ptr<scalar_t>();
    launch_planned<scalar_t, acc_t>(
        a, /*backward=*/true, {gy, x, gates, dx, dg},
        [&](auto staged, unsigned int blocks, int threads, size_t smem, cudaStream_t stream,
            const PropagateGeometry& geo, acc_t* ws) {
          constexpr bool kStaged = decltype(staged)::value;
          // unstaged blocks recompute h into a global float workspace of one plane per block
          at::Tensor h_ws = kStaged ? at::Tensor() : at::empty(a.x.sizes(), dx_acc.options());
          const auto kernel = propagate_cuda::propagate_bwd_kernel<scalar_t, acc_t, kStaged>;
          allow_shared(kernel, smem);
          kernel<<<blocks, threads, smem, stream>>>(gy, x, gates, a.merge.const_data_ptr<scalar_t>(), dx, dg,
                                                    dm_partial.mutable_data_ptr<acc_t>(),
                                                    kStaged ? nullptr : h_ws.mutable_data_ptr<acc_t>(), ws, geo);
        });
  });
}

}  // namespace gspn
