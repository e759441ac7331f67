// The fused LayerNorm + GRN of the GSPN mixer (layer_norm_grn_fwd / _bwd): the single source of its
// math, shared by the CPU kernel (cpu/gspn_norm_cpu.cpp) and the CUDA kernels
// (cuda/gspn_norm_kernels.h).  No ATen: plain scalars, __host__ __device__.
//
// For a channels-last map y [b][pixel][c] (C channels), per pixel the layer norm
//     mean = sum_c y / C,   rstd = 1 / sqrt(sum_c (y - mean)^2 / C + eps),
//     zhat = (y - mean) rstd,   z = zhat w + b,
// then per (batch, channel) GRN over the pixels
//     g = sqrt(sum_pixels z^2),   m = mean_c g + grn_eps,   s = 1 + gamma g / m,
//     out = z s + beta.
// Reverse mode, given dout (per (batch, channel): ds = sum_pixels dout z, dbeta = sum dout):
//     N = g / m,  dgamma = sum_b ds N,  dn = ds gamma,  t = (dn - mean_c(dn N)) / (m g)  (0 where g = 0),
//     dz = dout s + z t,   dw = sum dz zhat,   db = sum dz,   dzhat = dz w,
//     dy = rstd (dzhat - mean_c dzhat - zhat mean_c(dzhat zhat)).
// Every kernel takes two passes over the map each way (statistics, then output), holds only per-pixel
// (mean, rstd) and per-(batch, channel) values besides the map, and computes in acc_t (float for
// 16-bit maps): zhat and z are recomputed from y, never stored.
#pragma once

#include <cmath>
#include <cstdint>

#include "gspn_step.h"  // GSPN_HD

namespace gspn {
namespace norm {

// The pixels of a batch element cut into `tiles` ranges of `tile` pixels (the last may be shorter):
// each range is one task (CPU) or one CTA (CUDA) and writes one row of per-channel partial sums,
// added in range order, so results do not depend on scheduling.  At most `max_tiles` ranges, of at
// least `min_pixels` pixels (where there are that many).
struct Tiles {
  int64_t tiles, tile;
};

inline Tiles pixel_tiles(int64_t HW, int64_t max_tiles, int64_t min_pixels) {
  const int64_t by_size = (HW + min_pixels - 1) / min_pixels;
  const int64_t tiles = by_size < max_tiles ? (by_size > 1 ? by_size : 1) : (max_tiles > 1 ? max_tiles : 1);
  const int64_t tile = HW > tiles ? (HW + tiles - 1) / tiles : 1;
  return {(HW + tile - 1) / tile, tile};
}

template <typename acc_t>
GSPN_HD acc_t nsqrt(acc_t v) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(acc_t) == 4) {
    return sqrtf(v);
  } else {
    return ::sqrt(v);
  }
#else
  return std::sqrt(v);
#endif
}

// 1 / sqrt(variance + eps) from the sum of squared deviations of C values.
template <typename acc_t>
GSPN_HD acc_t ln_rstd(acc_t sq_dev, int64_t C, acc_t eps) {
  return acc_t(1) / nsqrt(sq_dev / static_cast<acc_t>(C) + eps);
}

// The GRN scale of one channel: 1 + gamma g / m (inv_m = 1 / m).
template <typename acc_t>
GSPN_HD acc_t grn_scale(acc_t g, acc_t inv_m, acc_t gamma) {
  return acc_t(1) + gamma * g * inv_m;
}

// The weight of z in dz of one channel: t = (dn - mean_c(dn N)) / (m g), 0 where g = 0 (that channel
// of z is 0 everywhere).  dn = ds gamma; `mean_dn_n` = mean_c(dn N).
template <typename acc_t>
GSPN_HD acc_t grn_z_weight(acc_t dn, acc_t mean_dn_n, acc_t g, acc_t inv_m) {
  return g > acc_t(0) ? (dn - mean_dn_n) * inv_m / g : acc_t(0);
}

// The input gradient of one channel of the layer norm given dzhat = dz w and the pixel's means
// mean_c(dzhat) and mean_c(dzhat zhat).
template <typename acc_t>
GSPN_HD acc_t ln_input_grad(acc_t dzhat, acc_t zhat, acc_t rstd, acc_t mean_dzhat, acc_t mean_dzhat_zhat) {
  return rstd * (dzhat - mean_dzhat - zhat * mean_dzhat_zhat);
}

}  // namespace norm
}  // namespace gspn
