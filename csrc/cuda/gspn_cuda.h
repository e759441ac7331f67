// Launchers of the CUDA kernels (gspn_cuda.cu), called by the bindings (gspn_cuda.cpp).
#pragma once

#include <ATen/ATen.h>

#include "../gspn_layout.h"

namespace gspn {

void launch_scan_fwd_cuda(const ScanArgs& a, at::Tensor& h);
void launch_scan_bwd_cuda(const ScanArgs& a, const at::Tensor& grad_h, const at::Tensor& h, at::Tensor& dx,
                          at::Tensor& dlam, at::Tensor& dwn, at::Tensor& dwm, at::Tensor& dwp);

}  // namespace gspn
