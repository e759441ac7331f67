// What the two fused CPU ops share: gspn_propagate_cpu.cpp (propagate_fwd / propagate_bwd, the gate
// logits read from memory) and gspn_propagate_proj_cpu.cpp (propagate_proj_fwd / propagate_proj_bwd,
// the logits projected on the fly from a low-rank proxy).  The math of both is gspn_step.h's; the
// layout handling (PropagateArgs, plane_geometry) is gspn_layout.h's.
#pragma once

#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../gspn_layout.h"

namespace gspn {

// Flush denormals to zero (FTZ + DAZ) while a kernel thread runs, restoring the caller's mode after.
// The vectorised sigmoid/exp code otherwise meets denormal operands, each costing a ~100-cycle
// microcode assist (measured: 5x slower loops); values below 1e-38 matter nowhere in this op.
struct FlushDenormals {
#if defined(__x86_64__) || defined(_M_X64)
  unsigned int saved = _mm_getcsr();
  FlushDenormals() { _mm_setcsr(saved | 0x8040); }
  ~FlushDenormals() { _mm_setcsr(saved); }
#endif
};

// f(i, j) over [ib, ie) x [jb, je) in blocks of 16 x 16, so that a transpose's reads and writes both
// stay in cache.
template <typename F>
void for_blocks(int64_t ib, int64_t ie, int64_t jb, int64_t je, F&& f) {
  constexpr int64_t T = 16;
  for (int64_t i0 = ib; i0 < ie; i0 += T) {
    for (int64_t j0 = jb; j0 < je; j0 += T) {
      for (int64_t j = j0; j < std::min(je, j0 + T); ++j) {
        for (int64_t i = i0; i < std::min(ie, i0 + T); ++i) f(i, j);
      }
    }
  }
}

// ---- channel lanes (the propagate_proj and attention kernels) ----

// The lane vectors of acc_t (GCC vector extensions): 64 bytes where AVX-512 is available (one
// register), else 32 (one AVX2 register, two SSE registers on the baseline build).  Measured, not
// better: two registers per vector (16 float lanes on AVX2: GCC lowered parts of it to scalar code,
// ~7x slower), and a separate projection pass or projecting the next pixel ahead of this one's
// exps and divisions (no gain or slower).
#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
#else
constexpr int kVecBytes = 32;
#endif

template <typename acc_t>
struct Vec {
  typedef acc_t type __attribute__((vector_size(kVecBytes)));
  static constexpr int64_t lanes = kVecBytes / sizeof(acc_t);
};

// The lanes of a vector of kBytes bytes added as a tree of halves (vector adds, a fixed order).
template <typename acc_t, int kBytes>
inline __attribute__((always_inline)) acc_t tree_sum(const void* v) {
  if constexpr (kBytes == static_cast<int>(sizeof(acc_t))) {
    acc_t t;
    __builtin_memcpy(&t, v, sizeof(acc_t));
    return t;
  } else {
    typedef acc_t H __attribute__((vector_size(kBytes / 2)));
    H lo, hi;
    __builtin_memcpy(&lo, v, kBytes / 2);
    __builtin_memcpy(&hi, static_cast<const char*>(v) + kBytes / 2, kBytes / 2);
    const H sum = lo + hi;
    return tree_sum<acc_t, kBytes / 2>(&sum);
  }
}

template <bool kValue>
using Bool = std::integral_constant<bool, kValue>;

// f(has_neg, has_pos, j) over the positions of a line of M pixels, the boundary flags as constants.
template <typename F>
inline __attribute__((always_inline)) void for_line(int64_t M, F&& f) {
  if (M == 1) {
    f(Bool<false>{}, Bool<false>{}, 0);
    return;
  }
  f(Bool<false>{}, Bool<true>{}, 0);
  for (int64_t j = 1; j < M - 1; ++j) f(Bool<true>{}, Bool<true>{}, j);
  f(Bool<true>{}, Bool<false>{}, M - 1);
}

inline bool any_columns(const PropagateArgs& a) {
  return std::any_of(a.dirs.begin(), a.dirs.end(), [](const Direction& d) { return d.transpose; });
}

// The adjoint of a low-rank projection's weight and bias, added per lane into dwv ([Sp][kFields]
// weight rows, then [kFields] biases): n pixels' logit gradients dg ([n][kFields] vectors), pixel i
// reading proxy row qs[i] of P ([pixel][Sp] scalars, Sp a multiple of 4).  In blocks of 32 pixels whose
// sums are then added: short chains, a float32 error like a pairwise sum's for planes of a few thousand
// pixels.  Shared by the projection op (6 fields) and the SD-XL attention op (3 taps).
template <int kFields, typename V, typename acc_t>
void add_projection_grads(V* __restrict__ dwv, const V* __restrict__ dg, const acc_t* __restrict__ P,
                          const int64_t* __restrict__ qs, int64_t n, int64_t Sp) {
  constexpr int64_t kSumBlock = 32;
  for (int64_t i0 = 0; i0 < n; i0 += kSumBlock) {
    const int64_t i1 = std::min(n, i0 + kSumBlock);
    for (int f = 0; f < kFields; ++f) {
      V sb{};
      for (int64_t i = i0; i < i1; ++i) sb += dg[i * kFields + f];
      dwv[Sp * kFields + f] += sb;
      for (int64_t s0 = 0; s0 < Sp; s0 += 4) {
        V a0{}, a1{}, a2{}, a3{};
        for (int64_t i = i0; i < i1; ++i) {
          const V d = dg[i * kFields + f];
          const acc_t* p = P + qs[i] * Sp + s0;
          a0 += d * p[0];
          a1 += d * p[1];
          a2 += d * p[2];
          a3 += d * p[3];
        }
        dwv[(s0 + 0) * kFields + f] += a0;
        dwv[(s0 + 1) * kFields + f] += a1;
        dwv[(s0 + 2) * kFields + f] += a2;
        dwv[(s0 + 3) * kFields + f] += a3;
      }
    }
  }
}

}  // namespace gspn
