// The CUDA launch that the op headers' `launch(kernel, grid, block, shared_bytes, args...)` stands for
// (gspn_cuda_plan.h, gspn_norm_plan.h; the test suite's host emulation has its own): <<<...>>> on the
// current stream, opting into more than 48 KB of dynamic shared memory where the plan asks for it.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <utility>

namespace gspn {

struct CudaLaunch {
  template <typename... Params, typename... Args>
  void operator()(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, Args&&... args) const {
    if (shared_bytes > 48 * 1024) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(shared_bytes)));
    }
    kernel<<<grid, block, shared_bytes, at::cuda::getCurrentCUDAStream()>>>(std::forward<Args>(args)...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace gspn
