// Small kernels that check the host emulation itself (cuda_host_emu.h): warp shuffles of every kind
// with subgroups, ballots, static and dynamic shared memory with barriers, atomics, and the errors it
// must report.  The GSPN kernels use barriers and atomics but no warp collectives yet; these keep the
// emulation of the rest honest for the kernels that will.  Included by emu_ops.cpp.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

namespace gspn_emu {
namespace selftest {

// Per thread g of the grid, with v = in[g] and `width` a power of two up to 32 (subgroups of lanes):
// red: a tree reduction with __shfl_down_sync (lane 0 of a subgroup holds the subgroup's sum),
// all: the butterfly all-reduce with __shfl_xor_sync (every lane holds it), scan: the inclusive
// prefix sum with __shfl_up_sync, perm: v of lane base + ((lane * 7 + 3) mod width) by __shfl_sync,
// ballot: the warp's __ballot_sync of "v is odd"; block[b]: the sum of v over block b, through a
// static __shared__ accumulator and shared-memory atomics, and of the subgroup sums through the
// dynamic shared memory and global atomics into total[0].
__global__ void warp_kernel(const int64_t* in, int64_t* red, int64_t* all, int64_t* scan, int64_t* perm,
                            int64_t* ballot, double* block, double* total, int width) {
  const int t = static_cast<int>(threadIdx.x), lane = t % warpSize;
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + t;
  const unsigned full = 0xffffffffu;
  const int64_t v = in[g];
  int64_t r = v;
  for (int o = width / 2; o > 0; o /= 2) r += __shfl_down_sync(full, r, o, width);
  red[g] = r;
  int64_t a = v;
  for (int o = width / 2; o > 0; o /= 2) a += __shfl_xor_sync(full, a, o, width);
  all[g] = a;
  int64_t s = v;
  for (int o = 1; o < width; o *= 2) {
    const int64_t n = __shfl_up_sync(full, s, o, width);
    if (lane % width >= o) s += n;
  }
  scan[g] = s;
  perm[g] = __shfl_sync(full, v, lane * 7 + 3, width);
  ballot[g] = __ballot_sync(full, v % 2 != 0);

  __shared__ double sum;
  GSPN_DYNAMIC_SHARED(smem);
  double* groups = reinterpret_cast<double*>(smem);  // one slot per subgroup
  if (t == 0) sum = 0;
  __syncthreads();
  atomicAdd(&sum, static_cast<double>(v));
  if (lane % width == 0) groups[t / width] = static_cast<double>(a);
  __syncwarp();
  __syncthreads();
  if (t == 0) {
    block[blockIdx.x] = sum;
    double gs = 0;
    for (int i = 0; i * width < static_cast<int>(blockDim.x); ++i) gs += groups[i];
    atomicAdd(total, gs);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> warp(
    const at::Tensor& in, int64_t threads, int64_t width) {
  TORCH_CHECK(in.scalar_type() == at::kLong && in.is_contiguous() && in.numel() % threads == 0);
  const int64_t blocks = in.numel() / threads;
  auto like = [&] { return at::full_like(in, -1); };
  at::Tensor red = like(), all = like(), scan = like(), perm = like(), ballot = like();
  at::Tensor block = at::zeros({blocks}, in.options().dtype(at::kDouble));
  at::Tensor total = at::zeros({1}, in.options().dtype(at::kDouble));
  const size_t smem = static_cast<size_t>((threads + width - 1) / width) * sizeof(double);
  cuda_emu::launch(warp_kernel, dim3(static_cast<unsigned>(blocks)), dim3(static_cast<unsigned>(threads)), smem,
                   in.const_data_ptr<int64_t>(), red.mutable_data_ptr<int64_t>(), all.mutable_data_ptr<int64_t>(),
                   scan.mutable_data_ptr<int64_t>(), perm.mutable_data_ptr<int64_t>(),
                   ballot.mutable_data_ptr<int64_t>(), block.mutable_data_ptr<double>(),
                   total.mutable_data_ptr<double>(), static_cast<int>(width));
  return {red, all, scan, perm, ballot, block, total};
}

// Reads the dynamic shared memory without writing it: NaN (the emulation fills it with 0xff bytes).
__global__ void unwritten_shared_kernel(float* out) {
  GSPN_DYNAMIC_SHARED(smem);
  out[threadIdx.x] = reinterpret_cast<const float*>(smem)[threadIdx.x];
}

at::Tensor unwritten_shared(int64_t threads) {
  at::Tensor out = at::zeros({threads}, at::kFloat);
  cuda_emu::launch(unwritten_shared_kernel, dim3(1), dim3(static_cast<unsigned>(threads)),
                   static_cast<size_t>(threads) * sizeof(float), out.mutable_data_ptr<float>());
  return out;
}

// Two __syncthreads in the two branches of a divergent `if`: an error.
__global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

// A shuffle that reads a lane of a partial warp that does not exist: an error.
__global__ void missing_lane_kernel(int* out) {
  out[threadIdx.x] = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x), 20);
}

// A warp collective over a subset of the warp: unsupported, reported.
__global__ void subset_mask_kernel(int* out) {
  out[threadIdx.x] = __shfl_sync(0x0000ffffu, static_cast<int>(threadIdx.x), 0);
}

// Lane 0 waits in __syncwarp while the rest of its warp waits in __syncthreads: a deadlock, which
// the watchdog reports by aborting the process (run in a subprocess, with a short timeout).
__global__ void deadlock_kernel(int* out) {
  if (threadIdx.x == 0) {
    __syncwarp();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

// Runs one of the failing kernels by name ("divergent_barrier", "missing_lane", "subset_mask",
// "deadlock"); the emulation's error comes back as a RuntimeError.
void failing(c10::string_view name) {
  const int threads = name == "missing_lane" ? 16 : 64;
  at::Tensor out = at::zeros({threads}, at::kInt);
  void (*kernel)(int*) = nullptr;
  if (name == "divergent_barrier") kernel = divergent_barrier_kernel;
  if (name == "missing_lane") kernel = missing_lane_kernel;
  if (name == "subset_mask") kernel = subset_mask_kernel;
  if (name == "deadlock") kernel = deadlock_kernel;
  TORCH_CHECK(kernel != nullptr, "no failing kernel named ", std::string(name));
  cuda_emu::launch(kernel, dim3(2), dim3(threads), 0, out.mutable_data_ptr<int>());
}

}  // namespace selftest

inline void register_selftests(torch::Library& m) {
  m.def("selftest_warp", &selftest::warp);
  m.def("selftest_unwritten_shared", &selftest::unwritten_shared);
  m.def("selftest_failing", &selftest::failing);
}

}  // namespace gspn_emu
