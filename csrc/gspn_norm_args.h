// The ATen side of the fused LayerNorm + GRN op (layer_norm_grn_fwd / _bwd), shared by the CPU kernel
// (cpu/gspn_norm_cpu.cpp), the CUDA op (cuda/gspn_norm_kernels.h's norm_cuda_fwd / _bwd) and the
// test suite's host emulation: argument checks, the channels-last view of the map, the outputs, the
// parameter-dtype dispatch.  The math is gspn_norm.h's.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "gspn_norm.h"

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <utility>

namespace gspn {

// y (B, C, H, W) as a channels-last block ([b][pixel][c]) and the four parameter vectors (C,), all of
// one dtype (the map's, or its opmath type: float32 parameters of a bfloat16 map under autocast).
struct NormArgs {
  at::Tensor y, weight, bias, gamma, beta;
  int64_t B, C, H, W, HW;
  double eps, grn_eps;
};

inline NormArgs norm_args(const at::Tensor& y, const at::Tensor& weight, const at::Tensor& bias,
                          const at::Tensor& gamma, const at::Tensor& beta, double eps, double grn_eps,
                          const char* op) {
  TORCH_CHECK(y.dim() == 4, op, ": y must be (B, C, H, W), got ", y.sizes());
  TORCH_CHECK(at::isFloatingType(y.scalar_type()), op, ": y must be floating point, got ", y.scalar_type());
  const int64_t B = y.size(0), C = y.size(1), H = y.size(2), W = y.size(3);
  TORCH_CHECK(C > 0, op, ": y has no channels");
  const at::ScalarType pt = weight.scalar_type();
  TORCH_CHECK(pt == y.scalar_type() || pt == at::toOpMathType(y.scalar_type()), op,
              ": the parameters must have the dtype of y or its accumulation dtype, got ", pt, " for y of ",
              y.scalar_type());
  for (const at::Tensor* t : {&weight, &bias, &gamma, &beta}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == C, op, ": weight, bias, gamma and beta must have shape (C,) = (",
                C, ",), got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == pt, op, ": weight, bias, gamma and beta must have one dtype");
    TORCH_CHECK(t->device() == y.device(), op, ": the parameters must be on the device of y");
  }
  return {y.contiguous(at::MemoryFormat::ChannelsLast),
          weight.contiguous(),
          bias.contiguous(),
          gamma.contiguous(),
          beta.contiguous(),
          B,
          C,
          H,
          W,
          H * W,
          eps,
          grn_eps};
}

// The forward's outputs: out (channels-last, y's dtype), the per-pixel mean and rstd (B, H, W) and the
// per-(batch, channel) GRN norms g (B, C), in the accumulation dtype.
struct NormOutputs {
  at::Tensor out, mean, rstd, gnorm;
};

inline NormOutputs norm_outputs(const NormArgs& a) {
  const auto acc = a.y.options().dtype(at::toOpMathType(a.y.scalar_type()));
  return {at::empty(a.y.sizes(), a.y.options().memory_format(at::MemoryFormat::ChannelsLast)),
          at::empty({a.B, a.H, a.W}, acc), at::empty({a.B, a.H, a.W}, acc), at::empty({a.B, a.C}, acc)};
}

inline void check_saved(const NormArgs& a, const at::Tensor& grad, const at::Tensor& mean, const at::Tensor& rstd,
                        const at::Tensor& gnorm, const char* op) {
  TORCH_CHECK(grad.sizes() == a.y.sizes() && grad.scalar_type() == a.y.scalar_type() && grad.device() == a.y.device(),
              op, ": grad_out must have the shape, dtype and device of y");
  const at::ScalarType acc = at::toOpMathType(a.y.scalar_type());
  for (const at::Tensor* t : {&mean, &rstd}) {
    TORCH_CHECK(t->numel() == a.B * a.HW && t->scalar_type() == acc && t->is_contiguous(), op,
                ": mean and rstd must be the forward's (B, H, W) statistics");
  }
  TORCH_CHECK(gnorm.numel() == a.B * a.C && gnorm.scalar_type() == acc && gnorm.is_contiguous(), op,
              ": gnorm must be the forward's (B, C) norms");
}

// Calls f(scalar_t{}, param_t{}) for the map's dtype and the parameters' (the map's or its opmath type).
template <typename F>
void dispatch_norm(const NormArgs& a, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.y.scalar_type(), "gspn_layer_norm_grn", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (a.weight.scalar_type() == a.y.scalar_type()) {
      f(scalar_t{}, scalar_t{});
    } else {
      f(scalar_t{}, acc_t{});
    }
  });
}

// A parameter gradient reduced from partial rows (..., C) to (C,) in the parameters' dtype.
inline at::Tensor param_grad(const at::Tensor& partial, const NormArgs& a) {
  return partial.reshape({-1, a.C}).sum(0).to(a.weight.scalar_type());
}

using NormGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The gradients of an empty map: zeros.
inline NormGrads empty_norm_grads(const NormArgs& a) {
  const auto z = [&] { return at::zeros({a.C}, a.weight.options()); };
  return {at::zeros_like(a.y), z(), z(), z(), z()};
}

}  // namespace gspn
