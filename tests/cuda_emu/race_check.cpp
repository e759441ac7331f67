// The CUDA kernels under the host emulation in a plain program without ATen, for ThreadSanitizer:
// `g++ -std=c++20 -O1 -g -fsanitize=thread -pthread -I csrc race_check.cpp` (tests/test_cuda_emulation.py
// builds and runs it).  Each CUDA thread is a host thread and __syncthreads a std::barrier, so
// ThreadSanitizer sees every pair of accesses to shared memory (or to a workspace) that no barrier
// orders, whatever the scheduling: a missing __syncthreads is reported even where the results
// happen to come out right.  The values are not checked here (the torch tests do that); the program
// prints one line per launch and exits non-zero when ThreadSanitizer reports a race.
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "cuda_host_emu.h"

#define __CUDA_ARCH__ 900
#include "cuda/gspn_attention_kernels.h"
#include "cuda/gspn_lanes_kernels.h"
#include "cuda/gspn_norm_kernels.h"
#include "cuda/gspn_propagate_kernels.h"
#include "cuda/gspn_scan_kernels.h"
#include "cuda/gspn_tile_kernels.h"
#undef __CUDA_ARCH__

namespace {

// 64-byte aligned storage, so the fused op's 16-byte copies are taken where the sizes allow.
struct Buffer {
  std::vector<float> data;
  explicit Buffer(int64_t n, std::mt19937& rng, float lo = -1.0f, float hi = 1.0f) : data(n + 16) {
    std::uniform_real_distribution<float> u(lo, hi);
    for (float& v : data) v = u(rng);
  }
  float* ptr() {
    auto p = reinterpret_cast<uintptr_t>(data.data());
    return reinterpret_cast<float*>((p + 63) / 64 * 64);
  }
};

void scan(int64_t N, int64_t L, int64_t M, int64_t k, bool reverse, std::mt19937& rng) {
  using namespace gspn::scan_cuda;
  const int64_t n = N * L * M;
  Buffer x(n, rng), lam(n, rng, 0.0f, 1.0f), wn(n, rng, 0.0f, 0.3f), wm(n, rng, 0.0f, 0.3f), wp(n, rng, 0.0f, 0.3f);
  Buffer h(n, rng), gh(n, rng), dx(n, rng), dlam(n, rng), dwn(n, rng), dwm(n, rng), dwp(n, rng);
  const LaunchPlan p = plan_launch<float>(N, L, M, k);
  Buffer ws(p.ws_elems, rng);
  const Geometry<float> geo = make_geometry<float>(p, N, L, M, k, reverse, ws.ptr());
  cuda_emu::launch(gspn_scan_fwd_kernel<float, float>, dim3(p.blocks), dim3(p.threads), p.shared_bytes, x.ptr(),
                   lam.ptr(), wn.ptr(), wm.ptr(), wp.ptr(), h.ptr(), geo);
  cuda_emu::launch(gspn_scan_bwd_kernel<float, float>, dim3(p.blocks), dim3(p.threads), p.shared_bytes, gh.ptr(),
                   x.ptr(), lam.ptr(), wn.ptr(), wm.ptr(), wp.ptr(), h.ptr(), dx.ptr(), dlam.ptr(), dwn.ptr(), dwm.ptr(),
                   dwp.ptr(), geo);
  std::printf("scan N=%lld L=%lld M=%lld k=%lld reverse=%d: %lld blocks of %d threads, global workspace %d\n",
              static_cast<long long>(N), static_cast<long long>(L), static_cast<long long>(M),
              static_cast<long long>(k), reverse, static_cast<long long>(p.blocks), p.threads, p.global_ws);
}

// All four directions, or with `rows` t2b and b2t only (column scans of long lines take a barrier
// per position).
void propagate(int64_t B, int64_t C, int64_t H, int64_t W, int64_t chunk, bool staging, std::mt19937& rng,
               bool rows = false) {
  using namespace gspn::propagate_cuda;
  const int64_t K = rows ? 2 : 4, n = B * C * H * W;
  const bool transpose[4] = {false, false, true, true}, reverse[4] = {false, true, false, true};
  Buffer x(n, rng), gates(n * K * 6, rng, -3.0f, 3.0f), merge(K * C, rng, 0.1f, 1.0f), y(n, rng), gy(n, rng);
  Buffer dx(n, rng), dgates(n * K * 6, rng), h_ws(n, rng);
  for (bool backward : {false, true}) {
    const PropagatePlan p = plan_propagate<float, float>(B, C, H, W, K, chunk, transpose, reverse, backward, staging,
                                                         /*aligned=*/true);
    Buffer ws(p.ws_elems, rng);
    std::vector<float> dm(B * C * K, 0.0f);
    float* w = p.ws_elems > 0 ? ws.ptr() : nullptr;
    if (!backward) {
      auto kernel = p.staged ? propagate_fwd_kernel<float, float, true> : propagate_fwd_kernel<float, float, false>;
      cuda_emu::launch(kernel, dim3(p.blocks), dim3(p.threads), p.shared_bytes, x.ptr(), gates.ptr(), merge.ptr(),
                       y.ptr(), w, p.geo);
    } else {
      auto kernel = p.staged ? propagate_bwd_kernel<float, float, true> : propagate_bwd_kernel<float, float, false>;
      cuda_emu::launch(kernel, dim3(p.blocks), dim3(p.threads), p.shared_bytes, gy.ptr(), x.ptr(), gates.ptr(),
                       merge.ptr(), dx.ptr(), dgates.ptr(), dm.data(), p.staged ? nullptr : h_ws.ptr(), w, p.geo);
    }
    std::printf("propagate %lldx%lldx%lldx%lld K=%lld chunk=%lld %s: %s, %d planes per block, %u blocks of %d threads\n",
                static_cast<long long>(B), static_cast<long long>(C), static_cast<long long>(H),
                static_cast<long long>(W), static_cast<long long>(K), static_cast<long long>(chunk), backward ? "backward" : "forward",
                p.staged ? "staged" : "in place", p.geo.ppb, p.blocks, p.threads);
  }
}


// The channels-last propagate_proj kernels (all four directions, or with `rows` t2b and b2t; S proxy
// channels), forward with the merge kernel and backward, with the plan's CTA target `ctas`.
void lanes(int64_t B, int64_t C, int64_t H, int64_t W, int64_t chunk, int64_t S, int64_t ctas, std::mt19937& rng,
           bool rows = false) {
  using namespace gspn::lanes_cuda;
  const int64_t K = rows ? 2 : 4, n = B * C * H * W, R = K * 6 * C;
  const bool transpose[4] = {false, false, true, true}, reverse[4] = {false, true, false, true};
  Buffer x(n, rng), proxy(B * S * H * W, rng), weight(R * S, rng), bias(R, rng), merge(K * C, rng, 0.1f, 1.0f);
  Buffer gy(n, rng), part(K * n, rng), y(n, rng);
  for (bool backward : {false, true}) {
    const LanesPlan p = plan_lanes<float>(B, C, H, W, K, chunk, S, transpose, reverse, backward, ctas);
    Buffer ws(p.ws_elems, rng);
    const dim3 grid(p.grid[0], p.grid[1], p.grid[2]), block(p.block[0], p.block[1]);
    if (!backward) {
      auto kernel = S <= 8 ? lanes_fwd_kernel<float, float, 8> : lanes_fwd_kernel<float, float, 16>;
      cuda_emu::launch(kernel, grid, block, p.shared_bytes, x.ptr(), proxy.ptr(), weight.ptr(), bias.ptr(),
                       merge.ptr(), part.ptr(), ws.ptr(), p.geo);
    } else {
      const int64_t zb = B * p.geo.zruns;
      Buffer dproxy(K * p.geo.groups * B * H * W * S, rng), dwb(zb * R * (S + 1), rng), dm(zb * K * C, rng);
      auto kernel = S <= 8 ? lanes_bwd_kernel<float, float, 8> : lanes_bwd_kernel<float, float, 16>;
      cuda_emu::launch(kernel, grid, block, p.shared_bytes, gy.ptr(), x.ptr(), proxy.ptr(), weight.ptr(), bias.ptr(),
                       merge.ptr(), part.ptr(), dproxy.ptr(), dwb.ptr(), dm.ptr(), ws.ptr(), p.geo);
    }
    cuda_emu::launch(lanes_merge_kernel<float, float>, dim3(merge_blocks(n)), dim3(kMergeThreads), 0, part.ptr(),
                     y.ptr(), n, K);
    std::printf("lanes %lldx%lldx%lldx%lld S=%lld chunk=%lld %s: G=%d P=%d, %lld runs, global lines %d\n",
                static_cast<long long>(B), static_cast<long long>(C), static_cast<long long>(H),
                static_cast<long long>(W), static_cast<long long>(S), static_cast<long long>(chunk),
                backward ? "backward" : "forward", p.geo.G, p.geo.P, static_cast<long long>(p.geo.zruns),
                p.geo.global_lines);
  }
}

// The attention kernels of the SD-XL swap (the first K of t2b, b2t, l2r, r2l; S proxy channels), forward
// with the merge kernel and backward with the prep and merge kernels, with the plan's CTA target `ctas`.
void attention(int64_t B, int64_t E, int64_t H, int64_t W, int64_t chunk, int64_t S, int64_t ctas, std::mt19937& rng,
               int64_t K = 4) {
  using namespace gspn::attn_cuda;
  const int64_t n = B * E * H * W, R = K * 3 * E;
  const bool transpose[4] = {false, false, true, true}, reverse[4] = {false, true, false, true};
  Buffer q(n, rng), k(n, rng), v(n, rng), proxy(B * S * H * W, rng), weight(R * S, rng), bias(R, rng);
  Buffer merge(K * E, rng, 0.1f, 1.0f), ub(E, rng), gy(n, rng), hn(K * n, rng), hd(K * n, rng), out(n, rng);
  Buffer dnum(n, rng), dden(n, rng), dgq(n, rng), dv_part(K * n, rng), dl_part(K * n, rng), dv(n, rng), dk(n, rng);
  const int values = reduce_values(S <= 8 ? 8 : 16);
  const float tiny = 1.17549435e-38f;
  for (bool backward : {false, true}) {
    using gspn::lanes_cuda::plan_lanes;
    const auto pf = plan_lanes<float>(B, E, H, W, K, chunk, S, transpose, reverse, false, ctas, values);
    Buffer wsf(pf.ws_elems, rng);
    auto fwd = S <= 8 ? attn_fwd_kernel<float, float, 8> : attn_fwd_kernel<float, float, 16>;
    const dim3 mg(gspn::lanes_cuda::merge_blocks(n)), mb(kMergeThreads);
    if (!backward) {  // the backward reads the states this forward left in hn, hd (no second forward)
      cuda_emu::launch(fwd, dim3(pf.grid[0], pf.grid[1], pf.grid[2]), dim3(pf.block[0], pf.block[1]), pf.shared_bytes,
                       k.ptr(), v.ptr(), proxy.ptr(), weight.ptr(), bias.ptr(), merge.ptr(), hn.ptr(), hd.ptr(),
                       wsf.ptr(), pf.geo);
      cuda_emu::launch(attn_merge_kernel<float, float>, mg, mb, 0, hn.ptr(), hd.ptr(), q.ptr(), merge.ptr(), ub.ptr(),
                       out.ptr(), n, E, K, tiny);
    } else {
      cuda_emu::launch(attn_prep_kernel<float, float>, mg, mb, 0, gy.ptr(), hn.ptr(), hd.ptr(), q.ptr(), merge.ptr(),
                       ub.ptr(), dnum.ptr(), dden.ptr(), dgq.ptr(), n, E, K, tiny);
      const auto p = plan_lanes<float>(B, E, H, W, K, chunk, S, transpose, reverse, true, ctas, values);
      const int64_t zb = B * p.geo.zruns;
      Buffer ws(p.ws_elems, rng), dproxy(K * p.geo.groups * B * H * W * S, rng), dwb(zb * R * (S + 1), rng),
          dm(zb * K * E, rng);
      auto bwd = S <= 8 ? attn_bwd_kernel<float, float, 8> : attn_bwd_kernel<float, float, 16>;
      cuda_emu::launch(bwd, dim3(p.grid[0], p.grid[1], p.grid[2]), dim3(p.block[0], p.block[1]), p.shared_bytes,
                       dnum.ptr(), dden.ptr(), hn.ptr(), hd.ptr(), k.ptr(), v.ptr(), proxy.ptr(), weight.ptr(),
                       bias.ptr(), merge.ptr(), dv_part.ptr(), dl_part.ptr(), dproxy.ptr(), dwb.ptr(), dm.ptr(), ws.ptr(),
                       p.geo);
      cuda_emu::launch(attn_bwd_merge_kernel<float, float>, mg, mb, 0, dv_part.ptr(), dl_part.ptr(), k.ptr(), dv.ptr(),
                       dk.ptr(), n, K);
      std::printf("attention %lldx%lldx%lldx%lld S=%lld chunk=%lld backward: G=%d P=%d, %lld runs, global lines %d\n",
                  static_cast<long long>(B), static_cast<long long>(H), static_cast<long long>(W),
                  static_cast<long long>(E), static_cast<long long>(S), static_cast<long long>(chunk), p.geo.G, p.geo.P,
                  static_cast<long long>(p.geo.zruns), p.geo.global_lines);
    }
  }
}

// The local tile kernels' forward (all four directions; S proxy channels; `states` 1: propagate_proj,
// 2: attention) or (`states` 0) propagate_proj's backward, with the plan's CTA target `ctas`.
void tile(int64_t B, int64_t C, int64_t H, int64_t W, int64_t chunk, int64_t S, int states, int64_t ctas,
          std::mt19937& rng) {
  using namespace gspn::tile_cuda;
  const int64_t K = 4, n = B * C * H * W, R = K * (states == 2 ? 3 : 6) * C;
  const bool transpose[4] = {false, false, true, true}, reverse[4] = {false, true, false, true};
  Buffer x(n, rng), q(n, rng), k(n, rng), proxy(B * S * H * W, rng), weight(R * S, rng), bias(R, rng);
  Buffer merge(K * C, rng, 0.1f, 1.0f), ub(C, rng), y(n, rng);
  const TilePlan p = plan_tile<float>(B, C, H, W, K, chunk, S, transpose, reverse, states == 0 ? 1 : states, ctas,
                                      states == 0);
  const dim3 grid(p.grid[0], p.grid[1], p.grid[2]), block(p.block[0], p.block[1]);
  if (states == 0) {
    const int64_t ctas_launched = static_cast<int64_t>(p.grid[0]) * p.grid[1] * p.grid[2];
    const int64_t groups = p.geo.groups, zb = B * p.grid[0];
    Buffer dproxy(groups * B * H * W * S, rng), dwb(zb * R * (S + 1), rng), dm(zb * K * C, rng);
    Buffer ws(p.geo.red_elems * ctas_launched, rng);
    auto kernel = S <= 8 ? tile_bwd_kernel<float, float, 8> : tile_bwd_kernel<float, float, 16>;
    cuda_emu::launch(kernel, grid, block, p.shared_bytes, q.ptr(), x.ptr(), proxy.ptr(), weight.ptr(), bias.ptr(),
                     merge.ptr(), y.ptr(), dproxy.ptr(), dwb.ptr(), dm.ptr(), ws.ptr(), p.geo);
  } else if (states == 1) {
    auto kernel = S <= 8 ? tile_fwd_kernel<float, float, 8> : tile_fwd_kernel<float, float, 16>;
    cuda_emu::launch(kernel, grid, block, p.shared_bytes, x.ptr(), proxy.ptr(), weight.ptr(), bias.ptr(), merge.ptr(),
                     y.ptr(), p.geo);
  } else {
    auto kernel = S <= 8 ? tile_attn_fwd_kernel<float, float, 8> : tile_attn_fwd_kernel<float, float, 16>;
    cuda_emu::launch(kernel, grid, block, p.shared_bytes, q.ptr(), k.ptr(), x.ptr(), proxy.ptr(), weight.ptr(),
                     bias.ptr(), merge.ptr(), ub.ptr(), y.ptr(), 1.17549435e-38f, p.geo);
  }
  std::printf("tile %lldx%lldx%lldx%lld S=%lld chunk=%lld states=%d: G=%d P=%d, %u tiles of %lldx%lld\n",
              static_cast<long long>(B), static_cast<long long>(C), static_cast<long long>(H),
              static_cast<long long>(W), static_cast<long long>(S), static_cast<long long>(chunk), states, p.geo.G,
              p.geo.P, p.grid[0], static_cast<long long>(p.geo.TH), static_cast<long long>(p.geo.TW));
}

// The fused LayerNorm + GRN, forward and backward (float, parameters float), with its plan.
void layer_norm_grn(int64_t B, int64_t C, int64_t H, int64_t W, int64_t ctas, std::mt19937& rng) {
  using namespace gspn::norm_cuda;
  const int64_t HW = H * W, n = B * HW * C;
  Buffer y(n, rng), go(n, rng), w(C, rng), b(C, rng), gamma(C, rng), beta(C, rng), mean(B * HW, rng),
      rstd(B * HW, rng), out(n, rng), dy(n, rng), gnorm(B * C, rng), scale(B * C, rng), st(B * 2 * C, rng),
      gb(B * 2 * C, rng);
  const NormPlan f = plan_norm_launch<float>(B, C, HW, 1e-6, 1e-6, 1, ctas);
  const NormPlan g = plan_norm_launch<float>(B, C, HW, 1e-6, 1e-6, 2, ctas);
  Buffer q(B * f.geo.tiles * C, rng), part1(B * g.geo.tiles * 2 * C, rng), part2(B * g.geo.tiles * 2 * C, rng);
  const dim3 fg(f.geo.tiles, B), fb(kNormWarp, f.warps), gg(g.geo.tiles, B), gbk(kNormWarp, g.warps);
  cuda_emu::launch(norm_stats_kernel<float, float, float>, fg, fb, f.shared_bytes, y.ptr(), w.ptr(), b.ptr(),
                   mean.ptr(), rstd.ptr(), q.ptr(), f.geo);
  cuda_emu::launch(norm_grn_kernel<float, float>, dim3(B), dim3(kNormFinalThreads), 0, q.ptr(), gamma.ptr(),
                   gnorm.ptr(), scale.ptr(), f.geo);
  cuda_emu::launch(norm_apply_kernel<float, float, float>, fg, fb, 0, y.ptr(), w.ptr(), b.ptr(), beta.ptr(),
                   mean.ptr(), rstd.ptr(), scale.ptr(), out.ptr(), f.geo);
  cuda_emu::launch(norm_grad_stats_kernel<float, float, float>, gg, gbk, g.shared_bytes, go.ptr(), y.ptr(), w.ptr(),
                   b.ptr(), mean.ptr(), rstd.ptr(), part1.ptr(), g.geo);
  cuda_emu::launch(norm_grn_grad_kernel<float, float>, dim3(B), dim3(kNormFinalThreads), 0, part1.ptr(), gnorm.ptr(),
                   gamma.ptr(), st.ptr(), gb.ptr(), g.geo);
  cuda_emu::launch(norm_grad_apply_kernel<float, float, float>, gg, gbk, g.shared_bytes, go.ptr(), y.ptr(), w.ptr(),
                   b.ptr(), mean.ptr(), rstd.ptr(), st.ptr(), dy.ptr(), part2.ptr(), g.geo);
  std::printf("layer_norm_grn %lldx%lldx%lldx%lld: %lld tiles of %lld pixels, %d / %d warps\n",
              static_cast<long long>(B), static_cast<long long>(C), static_cast<long long>(H),
              static_cast<long long>(W), static_cast<long long>(g.geo.tiles), static_cast<long long>(g.geo.tile),
              f.warps, g.warps);
}

}  // namespace

int main() {
  std::mt19937 rng(0);
  scan(2, 5, 33, 5, false, rng);   // several lines per block, several warps
  scan(3, 7, 6, 3, true, rng);     // chunks, reversed
  scan(1, 3, 1100, 3, false, rng);  // 1024 threads striding over a line
  scan(1, 2, 6150, 2, true, rng);  // the global workspace
  propagate(1, 1, 5, 33, 0, true, rng);
  propagate(1, 1, 5, 33, 2, false, rng);
  propagate(2, 3, 4, 4, 0, true, rng);    // several planes per block, 16-byte copies
  propagate(2, 5, 5, 33, 3, true, rng);   // several staged blocks, the last one partial
  propagate(1, 1, 2, 1600, 0, true, rng, true);  // in place, the global workspace in the backward
  lanes(1, 19, 9, 5, 0, 16, 1, rng);    // 32 lanes, masked ones, checkpoints every 8 lines
  lanes(2, 5, 7, 10, 3, 3, 264, rng);   // 8 lanes, runs of chunks
  lanes(1, 3, 2, 600, 0, 8, 264, rng, true);  // the line buffers in the global workspace (backward)
  attention(1, 19, 9, 5, 0, 16, 1, rng);   // 32 lanes, masked ones
  attention(2, 5, 7, 10, 3, 3, 264, rng);  // 8 lanes, runs of chunks
  // the line buffers in the global workspace (backward); t2b and b2t only: lines of 300, two steps (the
  // sideways directions would take 300 steps of 256 threads, a minute under ThreadSanitizer)
  attention(1, 5, 2, 300, 0, 8, 264, rng, 2);
  tile(1, 19, 17, 18, 2, 8, 1, 1, rng);    // 2 x 2 tiles (halos inside the map), 32 lanes, masked ones
  tile(2, 5, 9, 7, 3, 3, 2, 264, rng);     // attention: one tile, 8 lanes, a short last chunk
  tile(1, 5, 9, 7, 2, 3, 0, 264, rng);     // propagate_proj's backward: one tile, 8 lanes, a short chunk
  layer_norm_grn(2, 45, 7, 5, 3, rng);    // 8 warps, several pixels per warp, channels past a warp
  layer_norm_grn(1, 3000, 1, 3, 264, rng);  // fewer warps per CTA
  return 0;
}
