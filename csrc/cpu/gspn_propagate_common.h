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

inline bool any_columns(const PropagateArgs& a) {
  return std::any_of(a.dirs.begin(), a.dirs.end(), [](const Direction& d) { return d.transpose; });
}

}  // namespace gspn
