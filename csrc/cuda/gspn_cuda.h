// Launchers of the CUDA kernels (gspn_cuda.cu, gspn_propagate_cuda.cu), called by the bindings
// (gspn_cuda.cpp, gspn_lanes_cuda.cu).
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <tuple>
#include <vector>

#include "../gspn_layout.h"

namespace gspn {

void launch_scan_fwd_cuda(const ScanArgs& a, at::Tensor& h);
void launch_scan_bwd_cuda(const ScanArgs& a, const at::Tensor& grad_h, const at::Tensor& h, at::Tensor& dx,
                          at::Tensor& dlam, at::Tensor& dwn, at::Tensor& dwm, at::Tensor& dwp);

// The fused propagation (gspn_propagate_cuda.cu): y and dx in opmath precision, dm_partial (B, C, K)
// zero-initialised.
void launch_propagate_fwd_cuda(const PropagateArgs& a, at::Tensor& y_acc);
void launch_propagate_bwd_cuda(const PropagateArgs& a, const at::Tensor& grad_y, at::Tensor& dx_acc,
                               at::Tensor& dgates, at::Tensor& dm_partial);

// The per-plane propagate_fwd / propagate_bwd ops on CUDA tensors (gspn_cuda.cpp): the CUDA
// propagate_proj ops (gspn_lanes_cuda.cu) call them on materialised logits for proxies of more than
// 16 channels.
at::Tensor propagate_fwd_cuda(const at::Tensor& x, const at::Tensor& gates, const at::Tensor& merge,
                              std::vector<std::string> directions, int64_t chunk_size);
std::tuple<at::Tensor, at::Tensor, at::Tensor> propagate_bwd_cuda(const at::Tensor& grad_y, const at::Tensor& x,
                                                                  const at::Tensor& gates, const at::Tensor& merge,
                                                                  std::vector<std::string> directions,
                                                                  int64_t chunk_size);

}  // namespace gspn
