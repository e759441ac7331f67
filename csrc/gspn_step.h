// The GSPN line-scan recurrence: the single source of its math, shared by the CPU and CUDA kernels.
//
// A scan walks over L lines of length M.  Line s of the output takes the input at each position j
// plus three neighbours of the previous line in scan order, at line offsets -1, 0, +1, weighted by
// gates stored at the receiving pixel:
//
//     h_s[j] = lam_s[j] x_s[j] + wn_s[j] h_p[j-1] + wm_s[j] h_p[j] + wp_s[j] h_p[j+1]
//
// Neighbours outside the line are 0, and a line that starts a group (chunk) in scan order has no
// recurrence term.  Reverse-mode, with g = dL/dh and a = the total adjoint of h:
//
//     a_s[j]   = g_s[j] + wn_n[j+1] a_n[j+1] + wm_n[j] a_n[j] + wp_n[j-1] a_n[j-1]   (n: next line)
//     dx_s     = lam_s a_s,   dlam_s = x_s a_s,
//     dwn_s[j] = a_s[j] h_p[j-1],   dwm_s[j] = a_s[j] h_p[j],   dwp_s[j] = a_s[j] h_p[j+1]
//
// where the terms of a line that has no next / previous line in its group are 0.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define GSPN_HD __host__ __device__ __forceinline__
#else
#define GSPN_HD inline
#endif

namespace gspn {

// Output of a line with a previous line in its group.
template <typename acc_t>
GSPN_HD acc_t forward_step(acc_t x, acc_t lam, acc_t wn, acc_t wm, acc_t wp, acc_t h_neg, acc_t h_mid,
                           acc_t h_pos) {
  return lam * x + wn * h_neg + wm * h_mid + wp * h_pos;
}

// Output of the first line of a group in scan order: no recurrence term.
template <typename acc_t>
GSPN_HD acc_t forward_first(acc_t x, acc_t lam) {
  return lam * x;
}

// Adjoint of h at one pixel: its own incoming gradient plus what the three pixels of the next line
// that read it send back.  `wn_r` is the w_neg gate of the next line at j+1 (which reads j), `wm_c`
// the w_mid gate at j, `wp_l` the w_pos gate at j-1; `a_*` the adjoints there.  Taps outside the
// line are passed as 0.
template <typename acc_t>
GSPN_HD acc_t adjoint_step(acc_t g, acc_t wn_r, acc_t a_r, acc_t wm_c, acc_t a_c, acc_t wp_l, acc_t a_l) {
  return g + wn_r * a_r + wm_c * a_c + wp_l * a_l;
}

template <typename acc_t>
struct StepGrads {
  acc_t dx, dlam, dwn, dwm, dwp;
};

// Gradients of the five inputs at one pixel, given its adjoint `a` and the previous line's three
// neighbours (all 0 for the first line of a group).
template <typename acc_t>
GSPN_HD StepGrads<acc_t> step_grads(acc_t a, acc_t x, acc_t lam, acc_t h_neg, acc_t h_mid, acc_t h_pos) {
  return {lam * a, x * a, a * h_neg, a * h_mid, a * h_pos};
}

// Groups: the scan axis [0, L) is cut into groups floor(s / k) of absolute positions, the same for
// both scan orders.  Group g covers [g k, min(L, (g + 1) k)).
GSPN_HD int64_t num_groups(int64_t L, int64_t k) { return (L + k - 1) / k; }
GSPN_HD int64_t group_begin(int64_t g, int64_t k) { return g * k; }
GSPN_HD int64_t group_end(int64_t g, int64_t k, int64_t L) { return (g + 1) * k < L ? (g + 1) * k : L; }

// Position of the `step`-th line of a group [s0, s1) in scan order.
GSPN_HD int64_t line_at(int64_t step, int64_t s0, int64_t s1, bool reverse) {
  return reverse ? s1 - 1 - step : s0 + step;
}

}  // namespace gspn
