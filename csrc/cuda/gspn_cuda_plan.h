// The launch plans of the CUDA kernels from the ops' arguments: argument checks, plan and workspace.
// Shared by the launchers (gspn_cuda.cu, gspn_propagate_cuda.cu) and the test suite's host emulation
// of the kernels (tests/cuda_emu/), so both launch the same grids.  ATen, but no CUDA runtime.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <initializer_list>

#include "../gspn_layout.h"
#include "gspn_propagate_kernels.h"
#include "gspn_scan_kernels.h"

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

}  // namespace gspn
