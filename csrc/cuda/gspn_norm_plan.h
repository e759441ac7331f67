// The CUDA layer_norm_grn op, from the arguments to the returned tensors, around a
// `launch(kernel, grid, block, shared_bytes, args...)` (gspn_norm_cuda.cu: <<<...>>> on the current
// stream; the test suite's host emulation: cuda_emu::launch), so both run the same plan, buffers and
// kernel sequence.  ATen, no CUDA runtime.  Kernels: gspn_norm_kernels.h.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <tuple>

#include "../gspn_norm_args.h"
#include "gspn_norm_kernels.h"

namespace gspn {

template <typename acc_t>
norm_cuda::NormPlan norm_plan(const NormArgs& a, int values, int64_t target_ctas) {
  const norm_cuda::NormPlan p = norm_cuda::plan_norm_launch<acc_t>(a.B, a.C, a.HW, a.eps, a.grn_eps, values,
                                                                   target_ctas);
  TORCH_CHECK(p.warps > 0, "gspn layer_norm_grn: ", a.C, " channels are too many for the CUDA kernels (",
              values, " row(s) of C values per warp must fit ", norm_cuda::kNormMaxShared, " bytes)");
  return p;
}

template <typename Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_cuda_fwd(
    const at::Tensor& y, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& gamma,
    const at::Tensor& beta, double eps, double grn_eps, Launch&& launch,
    int64_t target_ctas = norm_cuda::kNormTargetCtas) {
  const NormArgs a = norm_args(y, weight, bias, gamma, beta, eps, grn_eps, "gspn layer_norm_grn_fwd");
  NormOutputs o = norm_outputs(a);
  if (a.y.numel() == 0) {
    o.gnorm.zero_();
    return {o.out, o.mean, o.rstd, o.gnorm};
  }
  dispatch_norm(a, [&](auto s, auto p) {
    using scalar_t = decltype(s);
    using param_t = decltype(p);
    using acc_t = at::opmath_type<scalar_t>;
    const norm_cuda::NormPlan plan = norm_plan<acc_t>(a, 1, target_ctas);
    const auto acc = a.y.options().dtype(at::toOpMathType(a.y.scalar_type()));
    at::Tensor q_part = at::empty({a.B * plan.geo.tiles, a.C}, acc), scale = at::empty({a.B, a.C}, acc);
    const dim3 grid(static_cast<unsigned int>(plan.geo.tiles), static_cast<unsigned int>(a.B));
    const dim3 block(norm_cuda::kNormWarp, static_cast<unsigned int>(plan.warps));
    const scalar_t* yp = a.y.const_data_ptr<scalar_t>();
    const param_t* wp = a.weight.const_data_ptr<param_t>();
    const param_t* bp = a.bias.const_data_ptr<param_t>();
    launch(norm_cuda::norm_stats_kernel<scalar_t, param_t, acc_t>, grid, block, plan.shared_bytes, yp, wp, bp,
           o.mean.mutable_data_ptr<acc_t>(), o.rstd.mutable_data_ptr<acc_t>(), q_part.mutable_data_ptr<acc_t>(),
           plan.geo);
    launch(norm_cuda::norm_grn_kernel<param_t, acc_t>, dim3(static_cast<unsigned int>(a.B)),
           dim3(norm_cuda::kNormFinalThreads), size_t{0}, q_part.const_data_ptr<acc_t>(),
           a.gamma.const_data_ptr<param_t>(), o.gnorm.mutable_data_ptr<acc_t>(), scale.mutable_data_ptr<acc_t>(),
           plan.geo);
    launch(norm_cuda::norm_apply_kernel<scalar_t, param_t, acc_t>, grid, block, size_t{0}, yp, wp, bp,
           a.beta.const_data_ptr<param_t>(), o.mean.const_data_ptr<acc_t>(), o.rstd.const_data_ptr<acc_t>(),
           scale.const_data_ptr<acc_t>(), o.out.mutable_data_ptr<scalar_t>(), plan.geo);
  });
  return {o.out, o.mean, o.rstd, o.gnorm};
}

template <typename Launch>
NormGrads norm_cuda_bwd(const at::Tensor& grad_out, const at::Tensor& y, const at::Tensor& weight,
                        const at::Tensor& bias, const at::Tensor& gamma, const at::Tensor& beta,
                        const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& gnorm, double grn_eps,
                        Launch&& launch, int64_t target_ctas = norm_cuda::kNormTargetCtas) {
  const NormArgs a = norm_args(y, weight, bias, gamma, beta, 0.0, grn_eps, "gspn layer_norm_grn_bwd");
  check_saved(a, grad_out, mean, rstd, gnorm, "gspn layer_norm_grn_bwd");
  if (a.y.numel() == 0) return empty_norm_grads(a);
  const at::Tensor go = grad_out.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor dy = at::empty(a.y.sizes(), a.y.options().memory_format(at::MemoryFormat::ChannelsLast));
  NormGrads grads;
  dispatch_norm(a, [&](auto s, auto p) {
    using scalar_t = decltype(s);
    using param_t = decltype(p);
    using acc_t = at::opmath_type<scalar_t>;
    const norm_cuda::NormPlan plan = norm_plan<acc_t>(a, 2, target_ctas);
    const auto acc = a.y.options().dtype(at::toOpMathType(a.y.scalar_type()));
    at::Tensor part1 = at::empty({a.B * plan.geo.tiles, 2, a.C}, acc), part2 = at::empty_like(part1);
    at::Tensor st = at::empty({a.B, 2, a.C}, acc), gb_part = at::empty({a.B, 2, a.C}, acc);
    const dim3 grid(static_cast<unsigned int>(plan.geo.tiles), static_cast<unsigned int>(a.B));
    const dim3 block(norm_cuda::kNormWarp, static_cast<unsigned int>(plan.warps));
    const scalar_t* gp = go.const_data_ptr<scalar_t>();
    const scalar_t* yp = a.y.const_data_ptr<scalar_t>();
    const param_t* wp = a.weight.const_data_ptr<param_t>();
    const param_t* bp = a.bias.const_data_ptr<param_t>();
    const acc_t* mp = mean.const_data_ptr<acc_t>();
    const acc_t* rp = rstd.const_data_ptr<acc_t>();
    launch(norm_cuda::norm_grad_stats_kernel<scalar_t, param_t, acc_t>, grid, block, plan.shared_bytes, gp, yp, wp,
           bp, mp, rp, part1.mutable_data_ptr<acc_t>(), plan.geo);
    launch(norm_cuda::norm_grn_grad_kernel<param_t, acc_t>, dim3(static_cast<unsigned int>(a.B)),
           dim3(norm_cuda::kNormFinalThreads), size_t{0}, part1.const_data_ptr<acc_t>(), gnorm.const_data_ptr<acc_t>(),
           a.gamma.const_data_ptr<param_t>(), st.mutable_data_ptr<acc_t>(), gb_part.mutable_data_ptr<acc_t>(),
           plan.geo);
    launch(norm_cuda::norm_grad_apply_kernel<scalar_t, param_t, acc_t>, grid, block, plan.shared_bytes, gp, yp, wp,
           bp, mp, rp, st.const_data_ptr<acc_t>(), dy.mutable_data_ptr<scalar_t>(), part2.mutable_data_ptr<acc_t>(),
           plan.geo);
    grads = {dy, param_grad(part2.select(1, 0), a), param_grad(part2.select(1, 1), a),
             param_grad(gb_part.select(1, 0), a), param_grad(gb_part.select(1, 1), a)};
  });
  return grads;
}

}  // namespace gspn
